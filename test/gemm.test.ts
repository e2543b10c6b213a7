import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { availableParallelism } from 'node:os';
import { fileURLToPath } from 'node:url';
import {
  gemm, gemmInfo, setGemmPath, setGemmThreads, type FloatArray, type GemmJob, type GemmPath,
} from '../src/backends/cpu/gemm.js';

const info = gemmInfo();
console.log(
  `gemm paths available: ${info.available.join(', ')}; wasm kernel: ${info.wasmKernel ?? 'none'}; ` +
  (info.blasLibrary ? `BLAS found: ${info.blasLibrary}` : 'BLAS not found (koffi or libopenblas missing, or TTT_NO_BLAS=1): blas path not tested'),
);
const PATHS: GemmPath[] = info.available;
const defaultThreads = info.threads;

type Ctor = Float32ArrayConstructor | Float64ArrayConstructor;
const DTYPES: Array<{ name: string; Ctor: Ctor; tol: number }> = [
  { name: 'f32', Ctor: Float32Array, tol: 1e-5 },
  { name: 'f64', Ctor: Float64Array, tol: 1e-12 },
];

/** Deterministic values in [-1, 1) so failures reproduce. */
function rng(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    return s / 2 ** 31 - 1;
  };
}

function randomArray(Ctor: Ctor, len: number, rand: () => number): FloatArray {
  const x = new Ctor(len);
  for (let i = 0; i < len; i++) x[i] = rand();
  return x;
}

/** Independent float64 reference, indexed straight from the layout definition. */
function reference(job: GemmJob): Float64Array {
  const { batch, m, n, k, transA, transB, a, b, aOffsets, bOffsets } = job;
  const out = new Float64Array(batch * m * n);
  for (let t = 0; t < batch; t++) {
    for (let i = 0; i < m; i++) {
      for (let j = 0; j < n; j++) {
        let s = 0;
        for (let p = 0; p < k; p++) {
          const av = a[aOffsets[t] + (transA ? p * m + i : i * k + p)];
          const bv = b[bOffsets[t] + (transB ? j * k + p : p * n + j)];
          s += av * bv;
        }
        out[(t * m + i) * n + j] = s;
      }
    }
  }
  return out;
}

function assertClose(got: FloatArray, want: Float64Array, tol: number, what: string): void {
  let err = 0;
  let norm = 0;
  for (let i = 0; i < want.length; i++) {
    const d = got[i] - want[i];
    err += d * d;
    norm += want[i] * want[i];
  }
  err = Math.sqrt(err);
  norm = Math.sqrt(norm);
  // NaN (e.g. an unwritten output slot) fails the comparison too.
  assert.ok(err <= tol * Math.max(norm, 1e-30), `${what}: ||C - ref|| = ${err}, ||ref|| = ${norm}`);
}

interface Case { m: number; n: number; k: number; transA: boolean; transB: boolean; batch?: number; aOffsets?: number[]; bOffsets?: number[] }

function runCase(Ctor: Ctor, tol: number, c: Case, seed: number, label: string): void {
  const rand = rng(seed);
  const batch = c.batch ?? 1;
  const aOffsets = c.aOffsets ?? Array.from({ length: batch }, (_, i) => i * c.m * c.k);
  const bOffsets = c.bOffsets ?? Array.from({ length: batch }, (_, i) => i * c.k * c.n);
  const aLen = Math.max(0, ...aOffsets.map((o) => o + c.m * c.k)) + 3;
  const bLen = Math.max(0, ...bOffsets.map((o) => o + c.k * c.n)) + 3;
  const job: GemmJob = {
    batch, m: c.m, n: c.n, k: c.k, transA: c.transA, transB: c.transB,
    a: randomArray(Ctor, aLen, rand), aOffsets,
    b: randomArray(Ctor, bLen, rand), bOffsets,
    c: new Ctor(batch * c.m * c.n).fill(Number.NaN), // must be overwritten, not accumulated
  };
  gemm(job);
  assertClose(job.c, reference(job), tol, `${label} ${JSON.stringify({ ...c, aOffsets: undefined, bOffsets: undefined })}`);
}

const TRANSPOSES = [[false, false], [false, true], [true, false], [true, true]] as const;

// Shapes chosen around the kernel's structure: below/at/above the micro-tile (4x16 f32, 4x8 f64), the
// cache blocks (MC=64, KC=256, NC=2048 f32 / 1024 f64), primes, and sizes that still reach the wasm
// and BLAS kernels despite one dimension of 1.
const SHAPES: Array<[number, number, number]> = [
  [0, 5, 7], [5, 0, 7], [5, 7, 0], [1, 1, 1], [2, 3, 4],
  [1, 2000, 3], [3, 1, 700], [2, 3, 400], [5, 17, 31], [13, 31, 7],
  [17, 19, 23], [64, 16, 4], [65, 17, 5], [33, 47, 600], [3, 2100, 5],
  [67, 129, 93], [200, 9, 400],
];

for (const path of PATHS) {
  for (const { name, Ctor, tol } of DTYPES) {
    test(`gemm ${path} ${name}: shapes x transposes vs float64 reference`, () => {
      setGemmPath(path);
      let seed = 1;
      try {
        for (const [m, n, k] of SHAPES) {
          for (const [transA, transB] of TRANSPOSES) runCase(Ctor, tol, { m, n, k, transA, transB }, seed++, `${path} ${name}`);
        }
        runCase(Ctor, tol, { m: 256, n: 256, k: 256, transA: false, transB: false }, seed++, `${path} ${name}`);
        runCase(Ctor, tol, { m: 256, n: 256, k: 256, transA: true, transB: true }, seed++, `${path} ${name}`);
      } finally {
        setGemmPath('auto');
      }
    });

    test(`gemm ${path} ${name}: batches with arbitrary and broadcast offsets`, () => {
      setGemmPath(path);
      try {
        for (const [m, n, k] of [[3, 5, 2], [19, 33, 41], [40, 70, 90]] as const) {
          const [ta, tb] = m === 19 ? [true, false] : m === 40 ? [false, true] : [true, true];
          const mk = m * k;
          const kn = k * n;
          // A: entries out of order, with gaps, one reused; B: the same matrix for every entry.
          const aOffsets = [5, 5 + mk + 11, 5, 2 * mk + 40, 1];
          const bOffsets = [kn + 2, kn + 2, kn + 2, kn + 2, kn + 2];
          runCase(Ctor, tol, { m, n, k, transA: ta, transB: tb, batch: 5, aOffsets, bOffsets }, m, `${path} ${name} batch`);
        }
        runCase(Ctor, tol, { m: 4, n: 4, k: 4, transA: false, transB: false, batch: 0, aOffsets: [], bOffsets: [] }, 9, 'batch 0');
      } finally {
        setGemmPath('auto');
      }
    });
  }
}

test('wasm and js paths are available after build', () => {
  assert.ok(info.available.includes('js'));
  assert.ok(info.available.includes('wasm'), 'wasm kernel missing: run `npm run build`');
  assert.equal(info.wasmSimd, true);
  assert.equal(info.path, info.available[0]);
});

test('wasm path with 1 and 2 threads', () => {
  setGemmPath('wasm');
  try {
    for (const threads of [1, 2]) {
      setGemmThreads(threads);
      assert.equal(gemmInfo().threads, threads);
      for (const { name, Ctor, tol } of DTYPES) {
        const label = `wasm ${name} ${threads} threads`;
        // Big enough to be split (>= 2^22 multiply-adds): along n, along m (n is one tile wide), and
        // across batch entries.
        runCase(Ctor, tol, { m: 256, n: 256, k: 256, transA: false, transB: true }, 11, label);
        runCase(Ctor, tol, { m: 167, n: 229, k: 193, transA: true, transB: false }, 12, label);
        runCase(Ctor, tol, { m: 1000, n: 9, k: 500, transA: false, transB: false }, 13, label);
        runCase(Ctor, tol, { m: 601, n: 7, k: 1000, transA: true, transB: true }, 14, label);
        runCase(Ctor, tol, { m: 96, n: 128, k: 64, transA: false, transB: false, batch: 7,
          aOffsets: [0, 0, 96 * 64, 0, 96 * 64, 0, 0], bOffsets: [0, 128 * 64, 0, 128 * 64, 0, 0, 0] }, 15, label);
      }
      // Repeated calls reuse the pool and the staged memory.
      for (let r = 0; r < 10; r++) runCase(Float32Array, 1e-5, { m: 170, n: 170, k: 170, transA: false, transB: false }, 100 + r, 'repeat');
    }
  } finally {
    setGemmThreads(defaultThreads);
    setGemmPath('auto');
  }
});

test('k = 0 gives zeros; empty outputs are left alone', () => {
  for (const path of PATHS) {
    setGemmPath(path);
    const c = new Float32Array(6).fill(7);
    gemm({ batch: 2, m: 1, n: 3, k: 0, transA: false, transB: false, a: new Float32Array(0), aOffsets: [0, 0], b: new Float32Array(0), bOffsets: [0, 0], c });
    assert.deepEqual([...c], [0, 0, 0, 0, 0, 0]);
    const d = new Float64Array(2).fill(7);
    gemm({ batch: 2, m: 0, n: 3, k: 4, transA: false, transB: false, a: new Float64Array(0), aOffsets: [0, 0], b: new Float64Array(12), bOffsets: [0, 0], c: d });
    assert.deepEqual([...d], [7, 7]);
  }
  setGemmPath('auto');
});

test('bad jobs and unavailable paths throw', () => {
  const base = { batch: 1, m: 2, n: 2, k: 2, transA: false, transB: false, aOffsets: [0], bOffsets: [0] };
  assert.throws(() => gemm({ ...base, a: new Float32Array(4), b: new Float64Array(4), c: new Float32Array(4) }), TypeError);
  assert.throws(() => gemm({ ...base, a: new Float32Array(3), b: new Float32Array(4), c: new Float32Array(4) }), RangeError);
  assert.throws(() => gemm({ ...base, a: new Float32Array(4), b: new Float32Array(4), c: new Float32Array(3) }), RangeError);
  assert.throws(() => setGemmThreads(0), RangeError);
  assert.throws(() => setGemmPath('gpu' as GemmPath), /not available/);
  if (!info.available.includes('blas')) assert.throws(() => setGemmPath('blas'), /blas.*not available/);
  assert.ok(defaultThreads >= 1 && defaultThreads <= Math.max(availableParallelism(), Number(process.env.TTT_THREADS ?? 1)));
});

// The default run uses the relaxed-SIMD kernel where the runtime allows it; run the whole file again
// on the baseline SIMD128 build (and without BLAS) so both wasm builds stay covered.
test('baseline simd128 kernel (child process)', { skip: info.wasmKernel !== 'relaxed-simd' || process.env.TTT_GEMM_TEST_CHILD === '1' }, () => {
  const env: NodeJS.ProcessEnv = { ...process.env, TTT_WASM_RELAXED: '0', TTT_NO_BLAS: '1', TTT_GEMM_TEST_CHILD: '1' };
  delete env.NODE_TEST_CONTEXT; // otherwise the child talks the runner's internal protocol, not TAP
  const execArgv = process.execArgv.filter((a) => !a.startsWith('--test'));
  const r = spawnSync(process.execPath, [...execArgv, fileURLToPath(import.meta.url)], { env, encoding: 'utf8' });
  assert.equal(r.status, 0, `child run failed:\n${r.stdout}\n${r.stderr}`);
  assert.match(r.stdout, /wasm kernel: simd128/);
});
