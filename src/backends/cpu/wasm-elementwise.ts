/**
 * WebAssembly SIMD kernels for the CPU backend (./wasm/elementwise-wat.mjs, built into
 * build/wasm/elementwise.wasm): float32 exp, sigmoid, silu, the softmax / logsumexp rows and the
 * probability blocks of the fused attention (./attention.ts); float32 and float64 binary arithmetic
 * (add sub mul div maximum minimum).
 *
 * The module runs on the backend's shared arena memory (./arena.ts), where the pool puts tensor
 * storage: on arena arrays the kernels work in place, with no copies. Arrays outside the arena (the
 * arena full or off, TTT_CPU_POOL=0, callers' own arrays) take a copy path for the transcendental
 * kernels (compute-bound: `Math.exp` costs ~7-9 ns an element in JS, these ~1-2 ns, the copies
 * ~0.07 ns) and the JS loop for binary ops (memory-bound: copies would eat the gain), except that a
 * small broadcast operand (a scalar, a bias row) is copied into scratch, which costs nothing.
 *
 * Float32 only for the transcendental kernels: float64 keeps Math.exp (the gradient checks need
 * double accuracy). The vectorised exp is within 2 ULP of the float32-rounded Math.exp; the binary
 * kernels are the same IEEE operation as the JS loop's, bit for bit (test/cpu-wasm-elementwise.test.ts).
 * Every entry point returns false when the wasm path is off or unavailable (build missing,
 * TTT_WASM_ELEMENTWISE=0), or the operands do not fit it, and the caller runs its JS loop.
 */
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { repoRoot } from '../../util/repo-root.js';
import { arena } from './arena.js';

export type WasmUnaryOp = 'exp' | 'sigmoid' | 'silu';
export type WasmBinaryOp = 'add' | 'sub' | 'mul' | 'div' | 'maximum' | 'minimum';

/**
 * Smallest element counts (row kernels: whole-call elements) at which the wasm path is taken; below,
 * the call (and, off the arena, the copies) cost more than they save. binary: measured by
 * bench/cpu-elementwise.ts through the backend: float32 add costs the same both ways near 256 elements
 * (~0.7 us a call), wasm is 1.4x faster at 512 and 2x at 1024.
 */
export const WASM_MIN = { unary: 64, rows: 64, band: 64, binary: 512 };

/** Elements staged per call off the arena: 64 KiB of float32, kept in L2. */
const CHUNK = 1 << 14;
/** A broadcast operand outside the arena is copied into scratch when it has at most this many elements. */
const SMALL_OPERAND = 4096;

type BinaryFn = (a: number, sa: number, b: number, sb: number, o: number, rows: number, n: number) => void;

interface Kernels {
  exp(src: number, dst: number, n: number, tmp: number): void;
  sigmoid(src: number, dst: number, n: number, tmp: number): void;
  silu(src: number, dst: number, n: number, tmp: number): void;
  rows(p: number, dst: number, rows: number, n: number, maxp: number, sump: number, softmax: number): void;
  band(p: number, batch: number, m: number, nk: number, segp: number, scale: number, aux: number, fwd: number): void;
  [binary: string]: unknown;
}

const WAT_OP: Record<WasmBinaryOp, string> = { add: 'add', sub: 'sub', mul: 'mul', div: 'div', maximum: 'max', minimum: 'min' };
type Mode = 'vv' | 'vs' | 'sv';
/** The binary kernels by op, then `${dtype}_${mode}`, looked up once (a computed export name per call cost ~0.1 us). */
let binaryFns: Record<WasmBinaryOp, Record<string, BinaryFn>> | undefined;

let mod: Kernels | null | undefined;
let loadError: string | undefined;
let enabled = process.env.TTT_WASM_ELEMENTWISE !== '0';

function load(): Kernels | null {
  if (mod !== undefined) return mod;
  mod = null;
  try {
    const root = repoRoot();
    if (!root) throw new Error('package.json not found above wasm-elementwise.ts');
    const file = join(root, 'build', 'wasm', 'elementwise.wasm');
    if (!existsSync(file)) throw new Error(`${file} is missing (run \`npm run build\`)`);
    const bytes = readFileSync(file);
    if (!WebAssembly.validate(bytes)) throw new Error(`${file} does not validate (no WebAssembly SIMD?)`);
    const inst = new WebAssembly.Instance(new WebAssembly.Module(bytes), { env: { memory: arena.memory } });
    mod = inst.exports as unknown as Kernels;
    const k = mod;
    binaryFns = Object.fromEntries(Object.entries(WAT_OP).map(([op, w]) => [op, Object.fromEntries(
      ['f32', 'f64'].flatMap((dt) => ['vv', 'vs', 'sv'].map((m) => [`${dt}_${m}`, k[`${w}_${dt}_${m}`] as BinaryFn])))]),
    ) as typeof binaryFns;
  } catch (e) {
    loadError = e instanceof Error ? e.message : String(e);
  }
  return mod;
}

/**
 * One scratch block, kept and grown as needed: staging off the arena, the unary tail, row maxima
 * and sums. Nothing re-enters these kernels, so one block serves every call.
 */
let scratchPtr = 0;
let scratchBytes = 0;
function scratch(bytes: number): number {
  if (bytes > scratchBytes) {
    if (scratchPtr) arena.release(scratchPtr);
    const want = Math.max(bytes, 2 * scratchBytes, 1 << 16);
    scratchPtr = arena.allocScratch(want);
    scratchBytes = scratchPtr > 0 ? want : 0;
    if (scratchPtr < 0) scratchPtr = 0;
  }
  return scratchPtr;
}

function active(): Kernels | null {
  return enabled ? load() : null;
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

/** Byte address of `a` in the arena, or -1. */
const addr = (a: Float32Array | Float64Array | Int32Array): number => (arena.owns(a) ? a.byteOffset : -1);

/** out[i] = op(x[i]) for i < n, float32; false if the wasm path is not in use. */
export function wasmUnaryF32(op: WasmUnaryOp, x: Float32Array, out: Float32Array, n: number, force = false): boolean {
  if (!force && n < WASM_MIN.unary) return false;
  const k = active();
  if (!k) return false;
  const fn = k[op];
  const xp = addr(x);
  const op_ = addr(out);
  if (xp >= 0 && op_ >= 0) {
    const tmp = scratch(16);
    if (!tmp) return false;
    fn(xp, op_, n, tmp);
    return true;
  }
  const base = scratch((CHUNK + 4) * 4);
  if (!base) return false;
  const heap = arena.heap(Float32Array);
  const b = base >> 2;
  for (let i = 0; i < n; i += CHUNK) {
    const len = Math.min(CHUNK, n - i);
    heap.set(x.subarray(i, i + len), b);
    fn(base, base, len, base + CHUNK * 4);
    out.set(heap.subarray(b, b + len), i);
  }
  return true;
}

/**
 * Row kernels over `outer` rows of n: softmax into out (outer·n), or logsumexp into out (outer).
 * In place on arena arrays; otherwise rows are staged several at a time (a row longer than a chunk
 * gets a chunk of its own).
 */
function rows(x: Float32Array, out: Float32Array, outer: number, n: number, softmax: boolean, force: boolean): boolean {
  if (!force && outer * n < WASM_MIN.rows) return false;
  if (n === 0) return false;
  const k = active();
  if (!k) return false;
  const xp = addr(x);
  const direct = xp >= 0 && (!softmax || addr(out) >= 0);
  const per = direct ? outer : Math.max(1, Math.floor(CHUNK / n));
  const dataBytes = direct ? 0 : Math.ceil(((per * n + 4) * 4) / 8) * 8;
  const maxOff = dataBytes;
  const sumOff = maxOff + Math.ceil(per / 2) * 8; // 8-byte aligned for the f64 view
  const base = scratch(sumOff + per * 8);
  if (!base) return false;
  const f32 = arena.heap(Float32Array);
  const f64 = arena.heap(Float64Array);
  const mb = (base + maxOff) >> 2;
  const sb = (base + sumOff) >> 3;
  for (let r0 = 0; r0 < outer; r0 += per) {
    const nr = Math.min(per, outer - r0);
    if (direct) {
      k.rows(xp, softmax ? addr(out) : xp, nr, n, base + maxOff, base + sumOff, softmax ? 1 : 0);
    } else {
      f32.set(x.subarray(r0 * n, (r0 + nr) * n), base >> 2);
      k.rows(base, base, nr, n, base + maxOff, base + sumOff, softmax ? 1 : 0);
      if (softmax) out.set(f32.subarray(base >> 2, (base >> 2) + nr * n), r0 * n);
    }
    if (!softmax) {
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
  const sp = addr(s);
  const dataBytes = sp >= 0 ? 0 : Math.ceil(((total + 4) * 4) / 16) * 16;
  const segOff = dataBytes;
  const auxOff = segOff + Math.ceil((m * 8) / 16) * 16;
  const base = scratch(auxOff + batch * m * 16);
  if (!base) return false;
  const f32 = arena.heap(Float32Array);
  const f64 = arena.heap(Float64Array);
  const i32 = arena.heap(Int32Array);
  if (sp < 0) f32.set(s.subarray(0, total), base >> 2);
  i32.set(band.subarray(0, 2 * m), (base + segOff) >> 2);
  const ab = (base + auxOff) >> 3;
  if (!forward) for (let b = 0; b < batch; b++) for (let r = 0; r < m; r++) f64[ab + b * m + r] = lse[b * tq + i0 + r];
  k.band(sp >= 0 ? sp : base, batch, m, nk, base + segOff, scale, base + auxOff, forward ? 1 : 0);
  if (sp < 0) s.set(f32.subarray(base >> 2, (base >> 2) + total));
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

/**
 * out = a op b for float32 / float64 over a coalesced broadcast (`shape`, element `strides` of a and
 * b; out contiguous), when the pattern is one of the kernels' (rank <= 2, each operand contiguous or
 * broadcast along the last axis: same shape, scalar, row or column broadcast, or an outer-axis
 * broadcast of those) and out and the large operands are arena arrays. False: use the JS loop.
 */
export function wasmBinary(
  op: WasmBinaryOp, f64: boolean, a: Float32Array | Float64Array, b: Float32Array | Float64Array, out: Float32Array | Float64Array,
  shape: number[], strides: number[][], force = false,
): boolean {
  if (shape.length === 0) [shape, strides] = [[1], [[1], [1]]]; // one element each
  const r = shape.length;
  if (r > 2) return false;
  const size = r === 1 ? shape[0] : shape[0] * shape[1];
  if (!force && size < WASM_MIN.binary) return false;
  const k = active();
  if (!k) return false;
  const op_ = addr(out);
  if (op_ < 0) return false;
  const rows = r === 1 ? 1 : shape[0];
  const n = shape[r - 1];
  const ia = strides[0][r - 1];
  const ib = strides[1][r - 1];
  const oa = r === 1 ? 0 : strides[0][0];
  const ob = r === 1 ? 0 : strides[1][0];
  if ((ia !== 0 && ia !== 1) || (ib !== 0 && ib !== 1) || (ia === 0 && ib === 0)) return false;
  const mode: Mode = ia === 1 ? (ib === 1 ? 'vv' : 'vs') : 'sv';
  const S = f64 ? 8 : 4;
  // Elements each operand's pattern touches.
  const extent = (inner: number, outer: number) => (rows - 1) * outer + (n - 1) * inner + 1;
  let ap = addr(a);
  let bp = addr(b);
  if (ap < 0 || bp < 0) {
    const ea = extent(ia, oa);
    const eb = extent(ib, ob);
    if ((ap < 0 && ea > SMALL_OPERAND) || (bp < 0 && eb > SMALL_OPERAND)) return false;
    const aBytes = ap < 0 ? Math.ceil((ea * S) / 64) * 64 : 0;
    const base = scratch(aBytes + (bp < 0 ? eb * S : 0));
    if (!base) return false;
    const heap = f64 ? arena.heap(Float64Array) : arena.heap(Float32Array);
    if (ap < 0) {
      heap.set(a.subarray(0, ea), base / S);
      ap = base;
    }
    if (bp < 0) {
      heap.set(b.subarray(0, eb), (base + aBytes) / S);
      bp = base + aBytes;
    }
  }
  binaryFns![op][f64 ? (mode === 'vv' ? 'f64_vv' : mode === 'vs' ? 'f64_vs' : 'f64_sv') : mode === 'vv' ? 'f32_vv' : mode === 'vs' ? 'f32_vs' : 'f32_sv'](
    ap, oa * S, bp, ob * S, op_, rows, n);
  return true;
}
