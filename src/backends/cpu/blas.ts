// Optional OpenBLAS path: cblas_sgemm/cblas_dgemm called through koffi (an optional dependency).
// Everything here fails soft: a missing koffi, library or symbol just makes the path unavailable.
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import type { FloatArray } from './gemm.js';

/** The slice of koffi's API used here (declared locally so the build does not need koffi). */
interface KoffiLib {
  func(signature: string): (...args: unknown[]) => unknown;
}
interface Koffi {
  load(path: string): KoffiLib;
}

type CblasGemm = (
  order: number, transA: number, transB: number, m: number, n: number, k: number,
  alpha: number, a: FloatArray, lda: number, b: FloatArray, ldb: number,
  beta: number, c: FloatArray, ldc: number,
) => void;

export interface Blas {
  /** Library path as loaded, plus OpenBLAS's build configuration when it reports one. */
  readonly library: string;
  readonly sgemm: CblasGemm;
  readonly dgemm: CblasGemm;
  /** Present only for OpenBLAS. */
  readonly setNumThreads?: (n: number) => void;
}

export const CBLAS_ROW_MAJOR = 101;
export const CBLAS_NO_TRANS = 111;
export const CBLAS_TRANS = 112;

const CANDIDATES = ['libopenblas.so.0', 'libopenblas.so', 'libcblas.so.3', 'libblas.so.3'];

let cached: Blas | null | undefined;

/** Loads BLAS once; null if disabled (TTT_NO_BLAS=1) or not loadable. */
export function loadBlas(): Blas | null {
  if (cached !== undefined) return cached;
  cached = null;
  if (process.env.TTT_NO_BLAS === '1') return cached;
  let koffi: Koffi;
  try {
    koffi = createRequire(import.meta.url)('koffi') as Koffi;
  } catch {
    return cached;
  }
  const override = process.env.TTT_BLAS_LIB;
  for (const path of override ? [override] : CANDIDATES) {
    const blas = tryLoad(koffi, path);
    if (blas) return (cached = blas);
  }
  return cached;
}

/**
 * OpenBLAS releases older than the CPU (Debian 12 ships 0.3.21) detect AMD Zen 4/5 as plain "Zen" and
 * run the AVX2 Haswell kernels at half the speed the core can do; their SkylakeX kernels run fine on
 * it (measured on Zen 5: 127 -> 223 GFLOP/s sgemm). OpenBLAS reads OPENBLAS_CORETYPE while the
 * library loads, so it is set just around dlopen and only when the user has not chosen one.
 */
function coretypeHint(): string | undefined {
  if (process.env.OPENBLAS_CORETYPE !== undefined || process.arch !== 'x64' || process.platform !== 'linux') return undefined;
  let cpuinfo: string;
  try {
    cpuinfo = readFileSync('/proc/cpuinfo', 'utf8');
  } catch {
    return undefined;
  }
  const flags = new Set((/^flags\s*:(.*)$/m.exec(cpuinfo)?.[1] ?? '').trim().split(/\s+/));
  const skylakeX = ['avx512f', 'avx512cd', 'avx512bw', 'avx512dq', 'avx512vl'].every((f) => flags.has(f));
  return /AuthenticAMD/.test(cpuinfo) && skylakeX ? 'SkylakeX' : undefined;
}

function tryLoad(koffi: Koffi, path: string): Blas | null {
  let lib: KoffiLib;
  const hint = coretypeHint();
  try {
    if (hint) process.env.OPENBLAS_CORETYPE = hint;
    lib = koffi.load(path);
  } catch {
    return null;
  } finally {
    // Keep it out of child processes (and out of any later dlopen of a different BLAS).
    if (hint) delete process.env.OPENBLAS_CORETYPE;
  }
  try {
    const sig = (t: string, name: string) =>
      `void ${name}(int, int, int, int, int, int, ${t}, const ${t} *, int, const ${t} *, int, ${t}, ${t} *, int)`;
    const sgemm = lib.func(sig('float', 'cblas_sgemm')) as CblasGemm;
    const dgemm = lib.func(sig('double', 'cblas_dgemm')) as CblasGemm;
    let library = path;
    let setNumThreads: ((n: number) => void) | undefined;
    try {
      const getConfig = lib.func('const char *openblas_get_config()') as () => string;
      const getCore = lib.func('const char *openblas_get_corename()') as () => string;
      // The config string names the build target; the core name is the kernel set chosen at run time.
      library = `${path} (${getConfig().trim()}; core ${getCore()}${hint ? ` via OPENBLAS_CORETYPE=${hint}` : ''})`;
      setNumThreads = lib.func('void openblas_set_num_threads(int)') as (n: number) => void;
    } catch {
      // Not OpenBLAS (e.g. reference CBLAS): no threading control, still usable.
    }
    return { library, sgemm, dgemm, setNumThreads };
  } catch {
    return null; // library present but does not export CBLAS
  }
}

/**
 * C_i = op(A_i) op(B_i) through cblas_?gemm, one call per batch entry. Offsets become subarray views
 * because koffi passes a typed array as a pointer to its first viewed element.
 */
export function blasGemm(
  blas: Blas, f64: boolean, batch: number, m: number, n: number, k: number, transA: boolean, transB: boolean,
  a: FloatArray, aOffsets: ArrayLike<number>, b: FloatArray, bOffsets: ArrayLike<number>, c: FloatArray,
): void {
  const gemm = f64 ? blas.dgemm : blas.sgemm;
  const lda = transA ? m : k;
  const ldb = transB ? k : n;
  const ta = transA ? CBLAS_TRANS : CBLAS_NO_TRANS;
  const tb = transB ? CBLAS_TRANS : CBLAS_NO_TRANS;
  const aLen = m * k;
  const bLen = k * n;
  const cLen = m * n;
  for (let i = 0; i < batch; i++) {
    const ai = a.subarray(aOffsets[i], aOffsets[i] + aLen);
    const bi = b.subarray(bOffsets[i], bOffsets[i] + bLen);
    const ci = c.subarray(i * cLen, (i + 1) * cLen);
    // BLAS requires ld >= max(1, cols) even for empty operands.
    gemm(CBLAS_ROW_MAJOR, ta, tb, m, n, k, 1, ai, Math.max(1, lda), bi, Math.max(1, ldb), 0, ci, Math.max(1, n));
  }
}
