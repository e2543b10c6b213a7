/**
 * Layers as pure functions of (weights, inputs). Linear weights are [in, out] and applied as x @ W,
 * like the reference implementation.
 */
import {
  type AttentionOptions, type DType, type Tensor, add, cast, compositeAttention, concat, div, exp, TensorCache, compositeRmsNorm, compositeSwigluGate, compositeTokenNll, fusedRmsNorm, fusedTokenNll, fusedRope, fusedSwigluGate, backendKey, gather,
  greater, log, matmul, mean, mul, neg, reshape, scaledDotAttention, slice, stack, sub, tensor, transpose, where,
} from '../engine/index.js';

/**
 * `t` in `dtype` (a cast only when it differs). Weights meet activations through this: under mixed
 * precision the float32 weights are cast to the bf16 compute dtype where they are used, so their
 * gradients (through the cast) come back in float32.
 */
export function inDType(t: Tensor, dtype: DType): Tensor {
  return t.dtype === dtype ? t : cast(t, dtype);
}

/**
 * RMSNorm over the last axis: x / sqrt(mean(x²) + eps) * w: the fused op (unless
 * `setNormPath('composite')` or `TTT_NORM=composite`); its definition is `compositeRmsNorm`.
 */
export function rmsNorm(x: Tensor, w: Tensor, eps: number): Tensor {
  const wx = inDType(w, x.dtype);
  return normPath === 'fused' ? fusedRmsNorm(x, wx, eps) : compositeRmsNorm(x, wx, eps);
}

let normPath: 'fused' | 'composite' = process.env.TTT_NORM === 'composite' ? 'composite' : 'fused';
/** Which implementation `rmsNorm` uses (to compare them in a whole model: tests, benchmarks). */
export function setNormPath(path: 'fused' | 'composite'): 'fused' | 'composite' {
  const before = normPath;
  normPath = path;
  return before;
}

/**
 * softplus(x) = log(1 + eˣ), stable for large |x|: relu(x) + log(1 + e^(−|x|)), with relu and |x|
 * as `where`s on x > 0 so that both exponentials stay <= 1 and the gradient is σ(x) everywhere (0.5
 * at 0, where max/abs subgradients would give 1).
 */
export function softplus(x: Tensor): Tensor {
  const pos = greater(x, 0);
  return add(where(pos, x, 0), log(add(exp(where(pos, neg(x), x)), 1)));
}

/** SwiGLU MLP: W2 · (silu(W1 x) ⊙ W3 x). */
export interface MlpWeights {
  w1: Tensor;
  w2: Tensor;
  w3: Tensor;
}
export function swiglu(x: Tensor, p: MlpWeights): Tensor {
  const h1 = matmul(x, p.w1);
  const gate = useFused('swiglu', h1) ? fusedSwigluGate : compositeSwigluGate;
  return matmul(gate(h1, matmul(x, p.w3)), p.w2);
}

/**
 * How a layer picks between its fused op and its composite definition: 'auto' (the default) takes
 * the fused op where the tensors' backend prefers fused ops (`Backend.preferFused`: the GPU), else
 * the composite; 'fused' and 'composite' force one. Env at start: TTT_ROPE, TTT_SWIGLU, TTT_LOSS.
 */
export type OpPath = 'auto' | 'fused' | 'composite';
export type PathKind = 'rope' | 'swiglu' | 'loss';
const envPath = (name: string): OpPath => {
  const v = process.env[name];
  return v === 'fused' || v === 'composite' ? v : 'auto';
};
const opPaths: Record<PathKind, OpPath> = { rope: envPath('TTT_ROPE'), swiglu: envPath('TTT_SWIGLU'), loss: envPath('TTT_LOSS') };
function useFused(kind: PathKind, t: Tensor): boolean {
  const path = opPaths[kind];
  return path === 'auto' ? t.backend.preferFused : path === 'fused';
}
/** Sets how `rope`, `swiglu` or `tokenNll` picks its implementation (tests, benchmarks); returns the previous setting. */
export function setOpPath(kind: PathKind, path: OpPath): OpPath {
  const before = opPaths[kind];
  opPaths[kind] = path;
  return before;
}

/**
 * Rotary position embedding on [..., T, H, D] with interleaved pairs (x[2i], x[2i+1]) rotated by
 * angle pos · theta^(-2i/D), as the reference does: the fused op or the composite definition below
 * (`setOpPath('rope', ...)`), which agree bit for bit.
 */
export function rope(x: Tensor, positions: readonly number[], theta: number, layout: 'same' | 'split' = 'same'): Tensor {
  const D = x.shape[x.rank - 1];
  const T = x.shape[x.rank - 3];
  if (positions.length !== T) throw new Error(`rope: ${positions.length} positions for ${T} tokens`);
  return ropeWith(x, ropeTables(positions, D, theta, x.dtype), layout);
}

/**
 * RoPE with tables made elsewhere: cos and sin [T·D/2] for x [..., T, H, D]'s positions (a launch
 * plan's rows, gathered at a position held on the device by `ropeRowsAt`).
 */
export function ropeWith(x: Tensor, tables: { cos: Tensor; sin: Tensor }, layout: 'same' | 'split' = 'same'): Tensor {
  if (useFused('rope', x)) return fusedRope(x, tables.cos, tables.sin, false, layout);
  const y = compositeRope(x, tables.cos, tables.sin);
  return layout === 'same' ? y : headsFirst(y);
}

/** [..., T, H, D] → [..., H, T, D]. */
function headsFirst(x: Tensor): Tensor {
  const r = x.rank;
  return transpose(x, [...Array(r - 3).keys(), r - 2, r - 3, r - 1]);
}

/**
 * The rows [1 · D/2] of `tables` (positions [0, capacity), `ropeTablesUpTo`) at the position held on
 * the device in `position` (int32 [1]): gathered where the op runs, so a launch plan recorded once
 * rotates by the right angles at every replay.
 */
export function ropeRowsAt(tables: { cos: Tensor; sin: Tensor }, position: Tensor, D: number): { cos: Tensor; sin: Tensor } {
  const half = D / 2;
  const row = (t: Tensor) => reshape(gather(reshape(t, [t.size / half, half]), position, 0), [half]);
  return { cos: row(tables.cos), sin: row(tables.sin) };
}

/**
 * RoPE tables [capacity · D/2] of positions [0, capacity), for `ropeRowsAt`. A few positions past the
 * shared whole-range table (a decode plan's tokens after a long prompt) are computed on their own and
 * appended, instead of doubling that table (at 128 K, half a second of host time).
 */
export function ropeTablesUpTo(capacity: number, D: number, theta: number, dtype: DType): { cos: Tensor; sin: Tensor } {
  const have = ropeHost.get(`${D}/${theta}`)?.capacity ?? 0;
  const extra = capacity - have;
  if (have === 0 || extra <= 0 || extra > ROPE_APPEND_MAX) return ropeTables(Array.from({ length: capacity }, (_, i) => i), D, theta, dtype);
  const freq = ropeAngles(D, theta);
  const shared = ropeTables(Array.from({ length: have }, (_, i) => i), D, theta, dtype);
  const own = (f: (angle: number) => number) => tensor(ropeValues(f, freq, extra, (t) => have + t), [extra * (D / 2)], dtype);
  return { cos: concat([shared.cos, own(Math.cos)], 0), sin: concat([shared.sin, own(Math.sin)], 0) };
}
/** The most positions `ropeTablesUpTo` appends to the shared table rather than growing it. */
const ROPE_APPEND_MAX = 8192;

/** RoPE in engine ops, from cos/sin tables [T·D/2]: the definition `fusedRope` matches. */
export function compositeRope(x: Tensor, cosTable: Tensor, sinTable: Tensor): Tensor {
  const D = x.shape[x.rank - 1];
  const T = x.shape[x.rank - 3];
  const half = D / 2;
  const cos = reshape(cosTable, [T, 1, half]);
  const sin = reshape(sinTable, [T, 1, half]);
  const pairs = reshape(x, [...x.shape.slice(0, -1), half, 2]);
  const even = reshape(slice(pairs, [...Array(x.rank).fill(0), 0], [...pairs.shape.slice(0, -1), 1]), [...x.shape.slice(0, -1), half]);
  const odd = reshape(slice(pairs, [...Array(x.rank).fill(0), 1], [...pairs.shape.slice(0, -1), 2]), [...x.shape.slice(0, -1), half]);
  const rotEven = sub(mul(even, cos), mul(odd, sin));
  const rotOdd = add(mul(even, sin), mul(odd, cos));
  return reshape(stack([rotEven, rotOdd], -1), x.shape);
}

/**
 * RoPE's cos/sin tables (flat [T·D/2], angles in float64 on the host). For consecutive positions a
 * call's rows are a device-side slice of one table per (backend, dtype, D, theta) covering positions
 * [0, capacity), grown by doubling (only new rows are computed on the host); the slices are cached per
 * (first position, count), since every layer of a step uses the same. Computing each chunk's table on
 * the host was most of a training step's host time, and later most of a long prefill's.
 */
const ropeCache = new TensorCache(512);
/** The whole-range tables on their backends (one per key and capacity; older capacities age out). */
const ropeFull = new TensorCache(8);
/** Host values of the whole-range tables, per key: cos and sin of positions [0, capacity). */
const ropeHost = new Map<string, { capacity: number; cos: Float64Array; sin: Float64Array }>();
/** The smallest whole-range table, in positions. */
const ROPE_MIN_CAPACITY = 4096;
/** The fewest positions of a request that grows the whole-range table (smaller ones past its end are computed alone). */
const ROPE_GROW_MIN = 64;

/** theta^(−2i/D) for i < D/2, per (D, theta). */
const ropeFreqs = new Map<string, Float64Array>();
function ropeAngles(D: number, theta: number): Float64Array {
  const key = `${D}/${theta}`;
  let f = ropeFreqs.get(key);
  if (!f) ropeFreqs.set(key, (f = Float64Array.from({ length: D / 2 }, (_, i) => Math.pow(theta, (-2 * i) / D))));
  return f;
}

/** f(position · freq[i]) for T positions (position of row t: `at(t)`), flat [T · D/2], in float64. */
function ropeValues(f: (angle: number) => number, freq: Float64Array, T: number, at: (t: number) => number): Float64Array {
  const half = freq.length;
  const values = new Float64Array(T * half);
  for (let t = 0; t < T; t++) {
    const p = at(t);
    for (let i = 0; i < half; i++) values[t * half + i] = f(p * freq[i]);
  }
  return values;
}

export function ropeTables(positions: readonly number[], D: number, theta: number, dtype: DType): { cos: Tensor; sin: Tensor } {
  const T = positions.length;
  const half = D / 2;
  const freq = ropeAngles(D, theta);
  const first = positions[0] ?? 0;
  const base = `${backendKey()}/${dtype}/${D}/${theta}`;
  const hostKey = `${D}/${theta}`;
  let host = ropeHost.get(hostKey);
  // A few positions past the table's end (decoding after a long prompt) are computed directly:
  // growing the table there would compute every position up to twice the end at once.
  const beyond = (host?.capacity ?? 0) < first + T && T < ROPE_GROW_MIN;
  if (!positions.every((p, i) => p === first + i) || first < 0 || beyond) {
    const table = (f: (angle: number) => number) => tensor(ropeValues(f, freq, T, (t) => positions[t]), [T * half], dtype);
    if (!beyond) return { cos: table(Math.cos), sin: table(Math.sin) };
    return { cos: ropeCache.get(`${base}/${first}/${T}/cos`, () => table(Math.cos)), sin: ropeCache.get(`${base}/${first}/${T}/sin`, () => table(Math.sin)) };
  }
  if (!host || host.capacity < first + T) {
    let capacity = Math.max(ROPE_MIN_CAPACITY, host?.capacity ?? 0);
    while (capacity < first + T) capacity *= 2;
    const next = { capacity, cos: new Float64Array(capacity * half), sin: new Float64Array(capacity * half) };
    const done = host?.capacity ?? 0;
    if (host) {
      next.cos.set(host.cos);
      next.sin.set(host.sin);
    }
    next.cos.set(ropeValues(Math.cos, freq, capacity - done, (t) => done + t), done * half);
    next.sin.set(ropeValues(Math.sin, freq, capacity - done, (t) => done + t), done * half);
    ropeHost.set(hostKey, (host = next));
  }
  const { capacity } = host;
  const rows = (kind: 'cos' | 'sin') => () => {
    const full = ropeFull.get(`${base}/${capacity}/${kind}`, () => tensor(host![kind], [capacity * half], dtype));
    const part = slice(full, [first * half], [(first + T) * half]);
    if (part !== full) full.dispose();
    return part;
  };
  return { cos: ropeCache.get(`${base}/${first}/${T}/cos`, rows('cos')), sin: ropeCache.get(`${base}/${first}/${T}/sin`, rows('sin')) };
}

/** Frees the cached RoPE tables (tests that count live tensors, or to return device memory). */
export function clearRopeCache(): void {
  ropeCache.clear();
  ropeFull.clear();
  ropeHost.clear();
}

/**
 * Multi-head causal attention: q [B,H,Tq,D], k and v [B,H,Tk,D] → [B,H,Tq,D], query i at position
 * qStart + i, key j at kStart + j, optionally limited to a sliding window. The fused op (unless
 * `setAttentionPath('composite')`); its definition is `attendComposite`.
 */
export function attend(q: Tensor, k: Tensor, v: Tensor, opts: AttentionOptions): Tensor {
  return attentionPath === 'fused' ? scaledDotAttention(q, k, v, opts) : compositeAttention(q, k, v, opts);
}

/**
 * Which implementation `attend` uses: the fused op (default) or the composite, to measure one
 * against the other in a whole model (benchmarks, `TTT_ATTENTION=composite`). Same values either way.
 */
let attentionPath: 'fused' | 'composite' = process.env.TTT_ATTENTION === 'composite' ? 'composite' : 'fused';
export function setAttentionPath(path: 'fused' | 'composite'): void {
  attentionPath = path;
}

/** The same attention through dense [Tq, Tk] scores and a bias (the definition the fused op is tested against). */
export function attendComposite(q: Tensor, k: Tensor, v: Tensor, opts: AttentionOptions): Tensor {
  return compositeAttention(q, k, v, opts);
}

/** [B,T,H·D] → [B,H,T,D] and back. */
export function splitHeads(x: Tensor, heads: number): Tensor {
  const [B, T, C] = x.shape;
  return transpose(reshape(x, [B, T, heads, C / heads]), [0, 2, 1, 3]);
}
export function mergeHeads(x: Tensor): Tensor {
  const [B, H, T, D] = x.shape;
  return reshape(transpose(x, [0, 2, 1, 3]), [B, T, H * D]);
}

/** Per-token next-token negative log-likelihood: logsumexp(logits) - logits[target]. logits [..., V], targets int32 [...]. */
export function tokenNll(logits: Tensor, targets: Tensor): Tensor {
  return useFused('loss', logits) ? fusedTokenNll(logits, targets) : compositeTokenNll(logits, targets);
}

/** Whether the loss takes its fused ops for tensors like t (the token NLL, the output layer's loss with its gradients). */
export function fusedLoss(t: Tensor): boolean {
  return useFused('loss', t);
}

/** Mean of `values` where `mask` is 1 (mask float, same shape), or plain mean without a mask. */
export function maskedMean(values: Tensor, mask?: Tensor): Tensor {
  if (!mask) return mean(values);
  return div(mul(values, mask).sum(), add(mask.sum(), 1e-30));
}

export { concat };
