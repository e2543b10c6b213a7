/**
 * The CPU backend: typed-array storage recycled through a pool (./pool.ts), elementwise loops
 * generated once per op and array types (./elementwise.ts: one generator for every unary, binary,
 * compare and select kernel), and matrix products through ./gemm.ts (OpenBLAS when present, else
 * WebAssembly SIMD). Float32 exp / sigmoid / silu and softmax / logsumexp rows go through
 * WebAssembly SIMD kernels (./wasm-elementwise.ts) above a small size, when built.
 */
import { type AdamWEntry, type AdamWHyper, type AttentionJob, type Backend, type BinaryOp, type CompareOp, type MatmulJob, type PhaseTime, type ReduceOp, type RopeLayout, type UnaryOp, sumPhaseSpans } from '../../engine/backend.js';
import { type DType, type HostArray, statDType } from '../../engine/dtype.js';
import { coalesce, sizeOf } from '../../engine/shape.js';
import { attentionBackward, attentionForward } from './attention.js';
import { TYPE_TAG, makeFlatKernel, makeStridedKernel } from './elementwise.js';
import { gemm, gemmInfo } from './gemm.js';
import { pool } from './pool.js';
import {
  type WasmBinaryOp, type WasmUnaryOp, wasmBinary, wasmElementwiseInfo, wasmLogsumexpF32, wasmSoftmaxF32, wasmUnaryF32,
} from './wasm-elementwise.js';

type Arr = HostArray;
type FloatArr = Float32Array | Float64Array;

/** Row accumulator of reduce(), grown as needed and reused. */
let reduceAcc = new Float64Array(256);

const TYPED = { float32: Float32Array, bfloat16: Float32Array, float64: Float64Array, int32: Int32Array, bool: Uint8Array } as const;

const UNARY_EXPR: Record<UnaryOp, string> = {
  neg: '-x',
  exp: 'Math.exp(x)',
  log: 'Math.log(x)',
  sqrt: 'Math.sqrt(x)',
  rsqrt: '1 / Math.sqrt(x)',
  tanh: 'Math.tanh(x)',
  sigmoid: '1 / (1 + Math.exp(-x))',
  silu: 'x / (1 + Math.exp(-x))',
  square: 'x * x',
  abs: 'Math.abs(x)',
  cos: 'Math.cos(x)',
  sin: 'Math.sin(x)',
  sign: 'Math.sign(x)',
  reciprocal: '1 / x',
};
const BINARY_EXPR: Record<BinaryOp, string> = {
  add: 'x + y',
  sub: 'x - y',
  mul: 'x * y',
  div: 'x / y',
  pow: 'Math.pow(x, y)',
  maximum: 'Math.max(x, y)',
  minimum: 'Math.min(x, y)',
};
const INT_BINARY_EXPR: Partial<Record<BinaryOp, string>> = { mul: 'Math.imul(x, y)' };
const COMPARE_EXPR: Record<CompareOp, string> = {
  eq: 'x === y ? 1 : 0',
  ne: 'x !== y ? 1 : 0',
  lt: 'x < y ? 1 : 0',
  le: 'x <= y ? 1 : 0',
  gt: 'x > y ? 1 : 0',
  ge: 'x >= y ? 1 : 0',
};

const WASM_UNARY: ReadonlySet<UnaryOp> = new Set<UnaryOp>(['exp', 'sigmoid', 'silu']);
const WASM_BINARY: ReadonlySet<BinaryOp> = new Set<BinaryOp>(['add', 'sub', 'mul', 'div', 'maximum', 'minimum']);

const cache = new Map<string, unknown>();
function cached<T>(key: string, make: () => T): T {
  let k = cache.get(key) as T | undefined;
  if (!k) {
    k = make();
    cache.set(key, k);
  }
  return k;
}

/**
 * Runs the strided kernel of `op` over inputs broadcast to `shape` (strides already computed by the
 * engine); `types` tags the output and input array types, one kernel per combination.
 */
function runStrided(op: string, types: string, expr: string, out: Arr, shape: number[], inputs: Arr[], strides: number[][]): void {
  runCoalesced(op, types, expr, out, coalesce(shape, strides), inputs);
}

function runCoalesced(op: string, types: string, expr: string, out: Arr, c: { shape: number[]; strides: number[][] }, inputs: Arr[]): void {
  const k = cached(`${op}/${types}`, () => makeStridedKernel(inputs.length, expr, `k_${op}`, types));
  if (inputs.length === 2) k(out, c.shape, c.strides, inputs[0], inputs[1]);
  else if (inputs.length === 3) k(out, c.shape, c.strides, inputs[0], inputs[1], inputs[2]);
  else k(out, c.shape, c.strides, inputs[0]);
}

function gemmJobFor(a: Arr, b: Arr, c: Arr, job: MatmulJob) {
  return { ...job, a: a as Float32Array | Float64Array, b: b as Float32Array | Float64Array, c: c as Float32Array | Float64Array };
}

/** logsumexp of x[base .. base + n) in double (max skipping NaN, then a sum of exp); an infinite max passes through. */
function rowLogsumexp(x: Arr, base: number, n: number): number {
  let m = -Infinity;
  for (let i = 0; i < n; i++) if (x[base + i] > m) m = x[base + i];
  if (m === -Infinity || m === Infinity) return m;
  let s = 0;
  for (let i = 0; i < n; i++) s += Math.exp(x[base + i] - m);
  return m + Math.log(s);
}

export class CpuBackend implements Backend {
  readonly name = 'cpu';
  // the fused loops below are scalar JS: 2-4x slower here than the composite ops (wasm SIMD, threads)
  readonly preferFused = false;

  info(): Record<string, unknown> {
    return { name: this.name, matmul: gemmInfo(), wasmElementwise: wasmElementwiseInfo(), pool: pool.stats() };
  }
  upload(values: HostArray, dtype: DType): Arr {
    const out = pool.alloc(dtype, values.length, false);
    out.set(values as ArrayLike<number>);
    return out;
  }
  download(data: unknown, dtype: DType, size: number): HostArray {
    // The caller owns the copy (it never comes back through free()); fresh, not from the pool.
    const out = new (TYPED[dtype])(size);
    out.set(data as ArrayLike<number>);
    return out;
  }
  free(data: unknown, dtype: DType, size: number): void {
    pool.release(data, dtype, size);
  }
  fill(size: number, dtype: DType, value: number): Arr {
    const zero = value === 0 && !Object.is(value, -0); // -0 is a value of its own (1 / -0 = -Infinity)
    const out = pool.alloc(dtype, size, zero);
    if (!zero) out.fill(value);
    return out;
  }
  empty(size: number, dtype: DType): Arr {
    return pool.alloc(dtype, size, false);
  }
  unary(op: UnaryOp, x: unknown, size: number, dtype: DType): Arr {
    const out = pool.alloc(dtype, size, false);
    if (dtype === 'float32' && WASM_UNARY.has(op) && wasmUnaryF32(op as WasmUnaryOp, x as Float32Array, out as Float32Array, size)) return out;
    const t = TYPE_TAG[dtype];
    cached(`u/${op}/${t}`, () => makeFlatKernel(UNARY_EXPR[op], `k_${op}`, t))(out, x as Arr);
    return out;
  }
  binary(op: BinaryOp, a: unknown, sa: number[], b: unknown, sb: number[], shape: number[], dtype: DType): Arr {
    const out = pool.alloc(dtype, sizeOf(shape), false);
    const intExpr = dtype === 'int32' ? INT_BINARY_EXPR[op] : undefined;
    const t = TYPE_TAG[dtype];
    const c = coalesce(shape, [sa, sb]);
    const float = dtype === 'float32' || dtype === 'float64';
    if (float && WASM_BINARY.has(op) && wasmBinary(op as WasmBinaryOp, dtype === 'float64', a as FloatArr, b as FloatArr, out as FloatArr, c.shape, c.strides)) {
      return out;
    }
    runCoalesced(`b_${op}${intExpr ? '_i' : ''}`, `${t}_${t}_${t}`, intExpr ?? BINARY_EXPR[op], out, c, [a as Arr, b as Arr]);
    return out;
  }
  compare(op: CompareOp, a: unknown, sa: number[], b: unknown, sb: number[], shape: number[], dtype: DType): Arr {
    const out = pool.alloc('bool', sizeOf(shape), false);
    const t = TYPE_TAG[dtype];
    runStrided(`c_${op}`, `u8_${t}_${t}`, COMPARE_EXPR[op], out, shape, [a as Arr, b as Arr], [sa, sb]);
    return out;
  }
  where(c: unknown, sc: number[], a: unknown, sa: number[], b: unknown, sb: number[], shape: number[], dtype: DType): Arr {
    const out = pool.alloc(dtype, sizeOf(shape), false);
    const t = TYPE_TAG[dtype];
    runStrided('where', `${t}_u8_${t}_${t}`, 'x ? y : z', out, shape, [c as Arr, a as Arr, b as Arr], [sc, sa, sb]);
    return out;
  }
  addcmul(a: unknown, sa: number[], b: unknown, sb: number[], c: unknown, sc: number[], shape: number[], dtype: DType): Arr {
    const out = pool.alloc(dtype, sizeOf(shape), false);
    const t = TYPE_TAG[dtype];
    runStrided('addcmul', `${t}_${t}_${t}_${t}`, 'x + y * z', out, shape, [a as Arr, b as Arr, c as Arr], [sa, sb, sc]);
    return out;
  }
  reduce(op: ReduceOp, xd: unknown, outer: number, n: number, inner: number, dtype: DType): Arr {
    const x = xd as Arr;
    const out = pool.alloc(dtype, outer * inner, false);
    const init = op === 'max' ? -Infinity : op === 'min' ? Infinity : 0;
    for (let o = 0; o < outer; o++) {
      const base = o * n * inner;
      if (inner === 1) {
        let acc = init;
        const end = base + n;
        if (op === 'sum') for (let i = base; i < end; i++) acc += x[i];
        else if (op === 'sumSquares') for (let i = base; i < end; i++) acc += x[i] * x[i];
        else if (op === 'max') for (let i = base; i < end; i++) acc = x[i] > acc || x[i] !== x[i] ? x[i] : acc;
        else for (let i = base; i < end; i++) acc = x[i] < acc || x[i] !== x[i] ? x[i] : acc;
        out[o] = acc;
        continue;
      }
      if (reduceAcc.length < inner) reduceAcc = new Float64Array(inner);
      const acc = reduceAcc.subarray(0, inner).fill(init);
      for (let r = 0; r < n; r++) {
        const row = base + r * inner;
        if (op === 'sum') for (let i = 0; i < inner; i++) acc[i] += x[row + i];
        else if (op === 'sumSquares') for (let i = 0; i < inner; i++) acc[i] += x[row + i] * x[row + i];
        else if (op === 'max') for (let i = 0; i < inner; i++) acc[i] = x[row + i] > acc[i] || x[row + i] !== x[row + i] ? x[row + i] : acc[i];
        else for (let i = 0; i < inner; i++) acc[i] = x[row + i] < acc[i] || x[row + i] !== x[row + i] ? x[row + i] : acc[i];
      }
      out.set(acc, o * inner);
    }
    return out;
  }
  softmax(xd: unknown, outer: number, n: number, dtype: DType, bias?: { data: unknown; rows: number }): Arr {
    if (bias) {
      // the biased rows first (one rounding to dtype, as an add), then the plain softmax of them
      const [x, b] = [xd as Arr, bias.data as Arr];
      const biased = pool.alloc(dtype, outer * n, false);
      for (let o = 0; o < outer; o++) {
        const [xo, bo] = [o * n, (o % bias.rows) * n];
        for (let i = 0; i < n; i++) biased[xo + i] = x[xo + i] + b[bo + i];
      }
      const out = this.softmax(biased, outer, n, dtype);
      pool.release(biased, dtype, outer * n);
      return out;
    }
    const x = xd as Arr;
    const out = pool.alloc(dtype, outer * n, false);
    if (dtype === 'float32' && wasmSoftmaxF32(x as Float32Array, out as Float32Array, outer, n)) return out;
    for (let o = 0; o < outer; o++) {
      const base = o * n;
      let m = -Infinity;
      for (let i = 0; i < n; i++) if (x[base + i] > m) m = x[base + i];
      if (m === -Infinity) m = 0;
      let s = 0;
      for (let i = 0; i < n; i++) {
        const e = Math.exp(x[base + i] - m);
        out[base + i] = e;
        s += e;
      }
      const inv = 1 / s;
      for (let i = 0; i < n; i++) out[base + i] *= inv;
    }
    return out;
  }
  logsumexp(xd: unknown, outer: number, n: number, dtype: DType): Arr {
    const x = xd as Arr;
    const out = pool.alloc(dtype, outer, false);
    if (dtype === 'float32' && wasmLogsumexpF32(x as Float32Array, out as Float32Array, outer, n)) return out;
    for (let o = 0; o < outer; o++) out[o] = rowLogsumexp(x, o * n, n);
    return out;
  }
  // Off by default here: the composite's ops run in WebAssembly SIMD across the pool and the TTT-E2E `mini` step
  // was 1.5-2% faster with them than with these scalar rows (three alternating runs); the tests turn it on.
  softmaxGradKernel = false;
  // Row sums in double, each output rounded once (see Backend.softmaxBackward / softmaxGradBackward).
  softmaxBackward(yd: unknown, gd: unknown, outer: number, n: number, dtype: DType): Arr {
    const [y, g] = [yd, gd] as Arr[];
    const dx = pool.alloc(dtype, outer * n, false);
    for (let o = 0; o < outer; o++) {
      const base = o * n;
      const end = base + n;
      let s = 0;
      for (let i = base; i < end; i++) s += y[i] * g[i];
      for (let i = base; i < end; i++) dx[i] = y[i] * (g[i] - s);
    }
    return dx;
  }
  softmaxGradBackward(yd: unknown, gd: unknown, ud: unknown, outer: number, n: number, dtype: DType): { dy: Arr; dg: Arr } {
    const [y, g, u] = [yd, gd, ud] as Arr[];
    const dy = pool.alloc(dtype, outer * n, false);
    const dg = pool.alloc(dtype, outer * n, false);
    for (let o = 0; o < outer; o++) {
      const base = o * n;
      const end = base + n;
      let s = 0;
      let r = 0;
      for (let i = base; i < end; i++) {
        s += y[i] * g[i];
        r += y[i] * u[i];
      }
      for (let i = base; i < end; i++) {
        dy[i] = u[i] * (g[i] - s) - r * g[i];
        dg[i] = y[i] * (u[i] - r);
      }
    }
    return { dy, dg };
  }
  cumsum(xd: unknown, outer: number, n: number, inner: number, reverse: boolean, dtype: DType): Arr {
    const x = xd as Arr;
    const out = pool.alloc(dtype, outer * n * inner, false);
    const acc = new Float64Array(inner);
    for (let o = 0; o < outer; o++) {
      acc.fill(0);
      for (let s = 0; s < n; s++) {
        const r = reverse ? n - 1 - s : s;
        const row = (o * n + r) * inner;
        for (let i = 0; i < inner; i++) out[row + i] = acc[i] += x[row + i];
      }
    }
    return out;
  }
  matmul(a: unknown, b: unknown, job: MatmulJob, dtype: DType, outDType: DType = dtype, accumulate?: unknown): Arr {
    // (bfloat16 is held as float32 here: a float32 product of bfloat16 operands is the same array)
    if (outDType !== dtype && !(dtype === 'bfloat16' && outDType === 'float32')) throw new Error(`cpu backend: matmul of ${dtype} cannot write ${outDType}`);
    const size = job.batch * job.m * job.n;
    const c = pool.alloc(dtype, size, false); // gemm overwrites all of c
    gemm(gemmJobFor(a as Arr, b as Arr, c, job));
    if (accumulate === undefined) return c;
    // our GEMMs have no β: the product, then added (the same values a β = 1 GEMM gives, up to its rounding order)
    this.addInto(accumulate, c, size);
    pool.release(c, dtype, size);
    return accumulate as Arr;
  }
  // (bfloat16 is held as float32 here, so a contribution of another float dtype is the same loop)
  addInto(dst: unknown, src: unknown, size: number): void {
    const [d, s] = [dst as Arr, src as Arr];
    for (let i = 0; i < size; i++) d[i] += s[i];
  }
  writeRowsAt(dst: unknown, src: unknown, at: unknown, outer: number, n: number, rows: number, rowLen: number): void {
    const [d, s] = [dst as Arr, src as Arr];
    const a = (at as Int32Array)[0];
    for (let o = 0; o < outer; o++) {
      for (let i = 0; i < n; i++) {
        const r = (((a + i) % rows) + rows) % rows;
        const from = (o * n + i) * rowLen;
        d.set(s.subarray(from, from + rowLen) as never, (o * rows + r) * rowLen);
      }
    }
  }

  copy(src: unknown, srcOffset: number, ss: number[], dst: unknown, dstOffset: number, ds: number[], shape: number[]): void {
    const s = src as Arr;
    const d = dst as Arr;
    const c = coalesce(shape, [ss, ds]);
    if (sizeOf(shape) === 0) return;
    const r = c.shape.length;
    if (r === 0) {
      d[dstOffset] = s[srcOffset];
      return;
    }
    const n = c.shape[r - 1];
    const [s0, d0] = [c.strides[0][r - 1], c.strides[1][r - 1]];
    const rows = sizeOf(c.shape.slice(0, -1));
    const idx = new Array<number>(r - 1).fill(0);
    let bs = srcOffset;
    let bd = dstOffset;
    for (let row = 0; row < rows; row++) {
      if (s0 === 1 && d0 === 1) {
        // A subarray view per row costs more than a short loop.
        if (n >= 64) d.set(s.subarray(bs, bs + n) as never, bd);
        else for (let j = 0; j < n; j++) d[bd + j] = s[bs + j];
      } else if (s0 === 0 && d0 === 1) {
        d.fill(s[bs], bd, bd + n); // a broadcast row: one value (same dtype, so the same bits)
      } else {
        for (let j = 0, ps = bs, pd = bd; j < n; j++, ps += s0, pd += d0) d[pd] = s[ps];
      }
      for (let k = r - 2; k >= 0; k--) {
        bs += c.strides[0][k];
        bd += c.strides[1][k];
        if (++idx[k] < c.shape[k]) break;
        bs -= c.strides[0][k] * c.shape[k];
        bd -= c.strides[1][k] * c.shape[k];
        idx[k] = 0;
      }
    }
  }
  gather(xd: unknown, idxd: unknown, outer: number, n: number, inner: number, count: number, dtype: DType): Arr {
    const x = xd as Arr;
    const idx = idxd as Int32Array;
    checkRange('gather', idx, n);
    const out = pool.alloc(dtype, outer * count * inner, false);
    for (let o = 0; o < outer; o++) {
      for (let j = 0; j < count; j++) {
        const from = (o * n + idx[j]) * inner;
        out.set(x.subarray(from, from + inner) as never, (o * count + j) * inner);
      }
    }
    return out;
  }
  scatterAdd(based: unknown, idxd: unknown, upd: unknown, outer: number, n: number, inner: number, count: number, dtype: DType, inPlace = false): Arr {
    const idx = idxd as Int32Array;
    const u = upd as Arr;
    checkRange('scatterAdd', idx, n);
    const out = inPlace ? (based as Arr) : this.upload(based as Arr, dtype);
    for (let o = 0; o < outer; o++) {
      for (let j = 0; j < count; j++) {
        const to = (o * n + idx[j]) * inner;
        const from = (o * count + j) * inner;
        for (let i = 0; i < inner; i++) out[to + i] += u[from + i];
      }
    }
    return out;
  }
  cast(xd: unknown, size: number, _from: DType, to: DType): Arr {
    const x = xd as Arr;
    const out = pool.alloc(to, size, false);
    if (to === 'bool') for (let i = 0; i < size; i++) out[i] = x[i] !== 0 ? 1 : 0;
    else if (to === 'int32') for (let i = 0; i < size; i++) out[i] = Math.trunc(x[i]);
    else out.set(x as ArrayLike<number>);
    return out;
  }
  attentionForward(q: unknown, k: unknown, v: unknown, job: AttentionJob, dtype: DType): { out: Arr; lse: Arr } {
    return attentionForward(q, k, v, job, dtype);
  }
  attentionBackward(
    q: unknown, k: unknown, v: unknown, out: unknown, lse: unknown, dout: unknown, job: AttentionJob, dtype: DType,
  ): { dq: Arr; dk: Arr; dv: Arr } {
    return attentionBackward(q, k, v, out, lse, dout, job, dtype);
  }
  tokenNllForward(xd: unknown, td: unknown, rows: number, V: number, dtype: DType): { nll: Arr; lse: Arr } {
    const [x, t] = [xd, td] as Arr[];
    const nll = pool.alloc(statDType(dtype), rows, false);
    const lse = pool.alloc(statDType(dtype), rows, false);
    for (let r = 0; r < rows; r++) {
      const target = t[r];
      if (!(target >= 0 && target < V)) throw new Error(`tokenNll: index ${target} out of range [0, ${V})`);
      const l = rowLogsumexp(x, r * V, V);
      lse[r] = l;
      nll[r] = l - x[r * V + target];
    }
    return { nll, lse };
  }
  tokenNllBackward(xd: unknown, td: unknown, ld: unknown, gd: unknown, rows: number, V: number, dtype: DType, accumulate?: unknown): Arr {
    const [x, t, lse, g] = [xd, td, ld, gd] as Arr[];
    const dx = (accumulate as Arr | undefined) ?? pool.alloc(dtype, rows * V, false);
    const into = accumulate !== undefined;
    for (let r = 0; r < rows; r++) {
      const base = r * V;
      const [l, gr, target] = [lse[r], g[r], t[r]];
      for (let i = 0; i < V; i++) {
        const d = (Math.exp(x[base + i] - l) - (i === target ? 1 : 0)) * gr;
        dx[base + i] = into ? dx[base + i] + d : d;
      }
    }
    return dx;
  }
  tokenNllGradBackward(xd: unknown, td: unknown, ld: unknown, gd: unknown, ud: unknown, rows: number, V: number, dtype: DType, accumulate?: unknown): { dLogits: Arr; dG: Arr } {
    const [x, t, lse, g, u] = [xd, td, ld, gd, ud] as Arr[];
    const dLogits = (accumulate as Arr | undefined) ?? pool.alloc(dtype, rows * V, false);
    const into = accumulate !== undefined;
    const dG = pool.alloc(statDType(dtype), rows, false);
    for (let r = 0; r < rows; r++) {
      const base = r * V;
      const l = lse[r];
      let s = 0;
      for (let i = 0; i < V; i++) s += Math.exp(x[base + i] - l) * u[base + i];
      const gr = g[r];
      for (let i = 0; i < V; i++) {
        const d = gr * Math.exp(x[base + i] - l) * (u[base + i] - s);
        dLogits[base + i] = into ? dLogits[base + i] + d : d;
      }
      dG[r] = s - u[base + t[r]];
    }
    return { dLogits, dG };
  }
  // In double, rounded once per output, like the CPU's other fused kernels.
  swigluForward(ad: unknown, bd: unknown, size: number, dtype: DType): Arr {
    const [a, b] = [ad, bd] as Arr[];
    const y = pool.alloc(dtype, size, false);
    for (let i = 0; i < size; i++) y[i] = (a[i] / (1 + Math.exp(-a[i]))) * b[i];
    return y;
  }
  swigluBackward(ad: unknown, bd: unknown, gd: unknown, size: number, dtype: DType): { da: Arr; db: Arr } {
    const [a, b, g] = [ad, bd, gd] as Arr[];
    const da = pool.alloc(dtype, size, false);
    const db = pool.alloc(dtype, size, false);
    for (let i = 0; i < size; i++) {
      const s = 1 / (1 + Math.exp(-a[i]));
      da[i] = g[i] * b[i] * s * (1 + a[i] * (1 - s));
      db[i] = g[i] * a[i] * s;
    }
    return { da, db };
  }
  swigluGradKernel = true;
  swigluGradBackward(ad: unknown, bd: unknown, gd: unknown, cad: unknown, cbd: unknown, size: number, dtype: DType): { da: Arr; db: Arr; dg: Arr } {
    const [a, b, g, ca, cb] = [ad, bd, gd, cad, cbd] as Arr[];
    const [da, db, dg] = [0, 1, 2].map(() => pool.alloc(dtype, size, false));
    for (let i = 0; i < size; i++) {
      const x = a[i];
      const s = 1 / (1 + Math.exp(-x));
      const s0 = x * s;
      const s1 = s * (1 + x * (1 - s));
      const s2 = s * (1 - s) * (2 + x * (1 - 2 * s));
      da[i] = ca[i] * g[i] * b[i] * s2 + cb[i] * g[i] * s1;
      db[i] = ca[i] * g[i] * s1;
      dg[i] = ca[i] * b[i] * s1 + cb[i] * s0;
    }
    return { da, db, dg };
  }
  rope(xd: unknown, cd: unknown, sd: unknown, outer: number, T: number, H: number, D: number, inverse: boolean, dtype: DType, layout: RopeLayout = 'same'): Arr {
    if (dtype !== 'float32' && dtype !== 'float64') throw new Error(`cpu backend: rope needs float32 or float64, got ${dtype}`);
    const [x, cos, sin] = [xd, cd, sd] as Arr[];
    const out = pool.alloc(dtype, outer * T * H * D, false);
    const r = dtype === 'float32' ? Math.fround : (v: number) => v;
    const half = D / 2;
    for (let o = 0; o < outer; o++) {
      for (let t = 0; t < T; t++) {
        for (let h = 0; h < H; h++) {
          const tokenMajor = ((o * T + t) * H + h) * D;
          const headMajor = ((o * H + h) * T + t) * D;
          const from = layout === 'merge' ? headMajor : tokenMajor;
          const to = layout === 'split' ? headMajor : tokenMajor;
          for (let i = 0; i < half; i++) {
            const e = x[from + 2 * i];
            const d = x[from + 2 * i + 1];
            const c = cos[t * half + i];
            const s = sin[t * half + i];
            // forward: (e c − d s, e s + d c); inverse: (e c + d s, d c − e s)
            out[to + 2 * i] = inverse ? r(r(e * c) + r(d * s)) : r(r(e * c) - r(d * s));
            out[to + 2 * i + 1] = inverse ? r(r(d * c) - r(e * s)) : r(r(e * s) + r(d * c));
          }
        }
      }
    }
    return out;
  }
  adamw(pd: unknown, gd: unknown, md: unknown, vd: unknown, size: number, h: AdamWHyper, dtype: DType): { p: Arr; m: Arr; v: Arr } {
    if (dtype !== 'float32' && dtype !== 'float64') throw new Error(`cpu backend: adamw needs float32 or float64, got ${dtype}`);
    const [p, g, m, v] = [pd, gd, md, vd] as Arr[];
    const po = pool.alloc(dtype, size, false);
    const mo = pool.alloc(dtype, size, false);
    const vo = pool.alloc(dtype, size, false);
    // float32: every operation rounded to single (a double result of single inputs rounds to the
    // correctly rounded single result for + − × ÷ √), as the composite's kernels do
    const r = dtype === 'float32' ? Math.fround : (x: number) => x;
    const [b1, ob1, b2, ob2, c1, c2, eps, lr, shrink] = [h.beta1, h.oneMinusBeta1, h.beta2, h.oneMinusBeta2, h.c1, h.c2, h.eps, h.lr, h.shrink].map(r);
    for (let i = 0; i < size; i++) {
      const gi = g[i];
      const mi = r(r(m[i] * b1) + r(gi * ob1));
      const vi = r(r(v[i] * b2) + r(r(gi * gi) * ob2));
      const update = r(r(mi / c1) / r(r(Math.sqrt(r(vi / c2))) + eps));
      const shrunk = h.decay ? r(p[i] * shrink) : p[i];
      po[i] = r(shrunk - r(update * lr));
      mo[i] = mi;
      vo[i] = vi;
    }
    return { p: po, m: mo, v: vo };
  }
  // the CPU's ops run as they are called: a phase's time is the wall time between its marks
  private phaseMarks: { name: string; at: number }[] = [];
  markPhase(name: string): void {
    this.phaseMarks.push({ name, at: performance.now() });
  }
  phaseReport(): PhaseTime[] {
    const marks = this.phaseMarks;
    this.phaseMarks = [];
    return sumPhaseSpans(marks.map((m) => m.name), marks.slice(1).map((m, i) => m.at - marks[i].at));
  }
  adamwAll(params: AdamWEntry[], h: AdamWHyper, dtype: DType): { p: Arr; m: Arr; v: Arr }[] {
    return params.map((e) => this.adamw(e.p, e.g, e.m, e.v, e.size, { ...h, decay: e.decay }, dtype));
  }
  // Sums in double, rounded once, like the CPU's reductions.
  rmsNormForward(xd: unknown, wd: unknown, rows: number, d: number, eps: number, dtype: DType): { y: Arr; rstd: Arr } {
    const x = xd as Arr;
    const w = wd as Arr;
    const y = pool.alloc(dtype, rows * d, false);
    const rstd = pool.alloc(dtype, rows, false);
    for (let r = 0; r < rows; r++) {
      const o = r * d;
      let ss = 0;
      for (let c = 0; c < d; c++) ss += x[o + c] * x[o + c];
      const k = 1 / Math.sqrt(ss / d + eps);
      rstd[r] = k;
      for (let c = 0; c < d; c++) y[o + c] = x[o + c] * k * w[c];
    }
    return { y, rstd };
  }
  rmsNormBackward(xd: unknown, wd: unknown, rstdd: unknown, dyd: unknown, rows: number, d: number, dtype: DType, wantDw: boolean): { dx: Arr; dw: Arr | null } {
    const [x, w, rstd, dy] = [xd, wd, rstdd, dyd] as Arr[];
    const dx = pool.alloc(dtype, rows * d, false);
    const dwSum = new Float64Array(d);
    for (let r = 0; r < rows; r++) {
      const o = r * d;
      const k = rstd[r];
      let s = 0;
      for (let c = 0; c < d; c++) s += dy[o + c] * w[c] * x[o + c];
      const k3 = (k * k * k * s) / d;
      for (let c = 0; c < d; c++) {
        dx[o + c] = k * dy[o + c] * w[c] - x[o + c] * k3;
        if (wantDw) dwSum[c] += dy[o + c] * x[o + c] * k;
      }
    }
    return { dx, dw: wantDw ? fromSums(dwSum, dtype) : null };
  }
  rmsNormGradKernel = true;
  // Row sums in double, each output rounded once (see Backend.rmsNormGradBackward for the formulas).
  rmsNormGradBackward(
    xd: unknown, wd: unknown, rstdd: unknown, dyd: unknown, cd: unknown, rows: number, d: number, dtype: DType, wantDw: boolean,
  ): { dx: Arr; dw: Arr | null; dg: Arr } {
    const [x, w, rstd, dy, c] = [xd, wd, rstdd, dyd, cd] as Arr[];
    const dx = pool.alloc(dtype, rows * d, false);
    const dg = pool.alloc(dtype, rows * d, false);
    const dwSum = new Float64Array(d);
    for (let r = 0; r < rows; r++) {
      const o = r * d;
      const k = rstd[r];
      let s = 0;
      let a1 = 0;
      let a2 = 0;
      for (let j = 0; j < d; j++) {
        const u = dy[o + j] * w[j];
        s += u * x[o + j];
        a1 += c[o + j] * u;
        a2 += c[o + j] * x[o + j];
      }
      s /= d;
      const k3 = k * k * k;
      const hx = (k3 * a2) / d; // h = k·c − x·hx; also the coefficient of u in dx'
      const cx = (3 * k3 * k * k * s * a2 - k3 * a1) / d; // the coefficient of x in dx'
      for (let j = 0; j < d; j++) {
        const xj = x[o + j];
        const h = k * c[o + j] - xj * hx;
        dg[o + j] = w[j] * h;
        if (wantDw) dwSum[j] += dy[o + j] * h;
        dx[o + j] = -k3 * s * c[o + j] - hx * dy[o + j] * w[j] + xj * cx;
      }
    }
    return { dx, dg, dw: wantDw ? fromSums(dwSum, dtype) : null };
  }
}

/** Sums kept in double (a gain's column sums), as an array of `dtype`. */
function fromSums(sums: Float64Array, dtype: DType): Arr {
  const out = pool.alloc(dtype, sums.length, false);
  out.set(sums);
  return out;
}

function checkRange(op: string, idx: Int32Array, n: number): void {
  for (let i = 0; i < idx.length; i++) {
    if (idx[i] < 0 || idx[i] >= n) throw new Error(`${op}: index ${idx[i]} out of range [0, ${n})`);
  }
}
