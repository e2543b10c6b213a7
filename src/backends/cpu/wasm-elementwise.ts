/**
 * Float32 transcendental kernels in WebAssembly SIMD (./wasm/elementwise-wat.mjs, built into
 * build/wasm/elementwise.wasm): exp, sigmoid, silu, the softmax / logsumexp rows, and the
 * probability blocks of the fused attention (./attention.ts). `Math.exp` costs ~7-9 ns an element in
 * JS, these ~1-2 ns (bench/cpu-elementwise.ts); they are compute-bound, so copying into the module's
 * (private, growable) memory and back — ~0.07 ns an element for both copies — still pays above a
 * small size (WASM_MIN below). Zero-copy views of a shared memory were not worth their risk.
 *
 * Float32 only: float64 keeps Math.exp (the gradient checks need double accuracy). The vectorised
 * exp is within 2 ULP of the float32-rounded Math.exp (test/cpu-wasm-elementwise.test.ts).
 * Every entry point returns false when the wasm path is off or unavailable (build missing,
 * TTT_WASM_ELEMENTWISE=0), and the caller runs its JS loop.
 */
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { repoRoot } from '../../util/repo-root.js';

export type WasmUnaryOp = 'exp' | 'sigmoid' | 'silu';

/**
 * Smallest element counts (row kernels: whole-call elements) at which the wasm path is taken; below,
 * the call and copies cost more than they save.
 */
export const WASM_MIN = { unary: 64, rows: 64, band: 64 };

/** Elements staged per call: 64 KiB of float32, kept in L2. */
const CHUNK = 1 << 14;
const PAGE = 65536;

interface Kernels {
  exp(p: number, n: number): void;
  sigmoid(p: number, n: number): void;
  silu(p: number, n: number): void;
  rows(p: number, rows: number, n: number, maxp: number, sump: number, softmax: number): void;
  band(p: number, batch: number, m: number, nk: number, segp: number, scale: number, aux: number, fwd: number): void;
}

let mod: { k: Kernels; memory: WebAssembly.Memory } | null | undefined;
let loadError: string | undefined;
let enabled = process.env.TTT_WASM_ELEMENTWISE !== '0';
let f32 = new Float32Array(0);
let f64 = new Float64Array(0);
let i32 = new Int32Array(0);


function load(): typeof mod {
  if (mod !== undefined) return mod;
  mod = null;
  try {
    const root = repoRoot();
    if (!root) throw new Error('package.json not found above wasm-elementwise.ts');
    const file = join(root, 'build', 'wasm', 'elementwise.wasm');
    if (!existsSync(file)) throw new Error(`${file} is missing (run \`npm run build\`)`);
    const bytes = readFileSync(file);
    if (!WebAssembly.validate(bytes)) throw new Error(`${file} does not validate (no WebAssembly SIMD?)`);
    const memory = new WebAssembly.Memory({ initial: 4 });
    const inst = new WebAssembly.Instance(new WebAssembly.Module(bytes), { env: { memory } });
    mod = { k: inst.exports as unknown as Kernels, memory };
    refreshViews();
  } catch (e) {
    loadError = e instanceof Error ? e.message : String(e);
  }
  return mod;
}

function refreshViews(): void {
  f32 = new Float32Array(mod!.memory.buffer);
  f64 = new Float64Array(mod!.memory.buffer);
  i32 = new Int32Array(mod!.memory.buffer);
}

/** Ensures the memory holds `bytes`; the module is private, so growing detaches only our views. */
function reserve(bytes: number): void {
  const have = mod!.memory.buffer.byteLength;
  if (bytes > have) {
    mod!.memory.grow(Math.ceil((bytes - have) / PAGE));
    refreshViews();
  }
}

function active(): Kernels | null {
  return enabled ? (load()?.k ?? null) : null;
}

export function wasmElementwiseAvailable(): boolean {
  return load() !== null;
}

/** Turns the wasm path on or off at run time (tests, benchmarks); the default follows TTT_WASM_ELEMENTWISE. */
export function setWasmElementwise(on: boolean): void {
  enabled = on;
}

export function wasmElementwiseInfo(): { enabled: boolean; available: boolean; error?: string; minElements: typeof WASM_MIN } {
  const available = wasmElementwiseAvailable();
  const info: ReturnType<typeof wasmElementwiseInfo> = { enabled: enabled && available, available, minElements: WASM_MIN };
  if (!available && loadError) info.error = loadError;
  if (!enabled) info.error = 'disabled (TTT_WASM_ELEMENTWISE=0 or setWasmElementwise(false))';
  return info;
}

/** out[i] = op(x[i]) for i < n, float32; false if the wasm path is not in use. */
export function wasmUnaryF32(op: WasmUnaryOp, x: Float32Array, out: Float32Array, n: number, force = false): boolean {
  if (!force && n < WASM_MIN.unary) return false;
  const k = active();
  if (!k) return false;
  reserve((CHUNK + 8) * 4); // the unary kernels run over whole pairs of vectors
  const fn = k[op];
  for (let i = 0; i < n; i += CHUNK) {
    const len = Math.min(CHUNK, n - i);
    f32.set(x.subarray(i, i + len));
    fn(0, len);
    out.set(f32.subarray(0, len), i);
  }
  return true;
}

/**
 * Row kernels over `outer` rows of n: softmax into out (outer·n), or logsumexp into out (outer).
 * Rows are staged several at a time (a row longer than a chunk gets a chunk of its own).
 */
function rows(x: Float32Array, out: Float32Array, outer: number, n: number, softmax: boolean, force: boolean): boolean {
  if (!force && outer * n < WASM_MIN.rows) return false;
  if (n === 0) return false;
  const k = active();
  if (!k) return false;
  const per = Math.max(1, Math.floor(CHUNK / n));
  const dataBytes = (per * n + 4) * 4;
  const maxOff = Math.ceil(dataBytes / 8) * 8;
  const sumOff = maxOff + Math.ceil(per / 2) * 8; // 8-byte aligned for the f64 view
  reserve(sumOff + per * 8);
  for (let r0 = 0; r0 < outer; r0 += per) {
    const nr = Math.min(per, outer - r0);
    f32.set(x.subarray(r0 * n, (r0 + nr) * n));
    k.rows(0, nr, n, maxOff, sumOff, softmax ? 1 : 0);
    if (softmax) {
      out.set(f32.subarray(0, nr * n), r0 * n);
    } else {
      const mb = maxOff >> 2;
      const sb = sumOff >> 3;
      for (let r = 0; r < nr; r++) {
        const m = f32[mb + r];
        out[r0 + r] = m === -Infinity || m === Infinity ? m : m + Math.log(f64[sb + r]);
      }
    }
  }
  return true;
}

export function wasmSoftmaxF32(x: Float32Array, out: Float32Array, outer: number, n: number, force = false): boolean {
  return rows(x, out, outer, n, true, force);
}

export function wasmLogsumexpF32(x: Float32Array, out: Float32Array, outer: number, n: number, force = false): boolean {
  return rows(x, out, outer, n, false, force);
}

/**
 * Attention probabilities of one block of raw scores s ([batch, m, nk], in place), float32: within row
 * r's band [band[2r], band[2r+1]], forward: exp(s·scale − mx) / Σ with lse[b·tq + i0 + r] = mx + log Σ
 * written; backward: exp(s·scale − lse[b·tq + i0 + r]). Lanes outside the bands are left untouched.
 */
export function wasmBandProbabilitiesF32(
  s: Float32Array, batch: number, m: number, nk: number, band: Int32Array, scale: number, lse: Float32Array, tq: number, i0: number,
  forward: boolean, force = false,
): boolean {
  const total = batch * m * nk;
  if (!force && total < WASM_MIN.band) return false;
  const k = active();
  if (!k) return false;
  const segOff = Math.ceil(((total + 4) * 4) / 16) * 16;
  const auxOff = segOff + Math.ceil((m * 8) / 16) * 16;
  reserve(auxOff + batch * m * 16);
  f32.set(s.subarray(0, total));
  i32.set(band.subarray(0, 2 * m), segOff >> 2);
  const ab = auxOff >> 3;
  if (!forward) for (let b = 0; b < batch; b++) for (let r = 0; r < m; r++) f64[ab + b * m + r] = lse[b * tq + i0 + r];
  k.band(0, batch, m, nk, segOff, scale, auxOff, forward ? 1 : 0);
  s.set(f32.subarray(0, total));
  if (forward) {
    for (let b = 0; b < batch; b++) {
      for (let r = 0; r < m; r++) {
        const row = b * m + r;
        lse[b * tq + i0 + r] = f64[ab + 2 * row] + Math.log(f64[ab + 2 * row + 1]);
      }
    }
  }
  return true;
}
