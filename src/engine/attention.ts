/**
 * Causal (optionally sliding-window) scaled dot-product attention: a fused op whose backend kernels
 * visit only the visible band of keys, and the composite definition it must agree with. The
 * composite is the truth (DESIGN.md): it defines the semantics, the tests compare against it, and
 * the op's backward falls back to it whenever that backward will itself be differentiated.
 */
import { recordFused } from './fused.js';
import type { AttentionJob } from './backend.js';
import { isFloat } from './dtype.js';
import { biasedSoftmax, broadcastTo, concat, div, matmul, reshape, tensor } from './ops.js';
import { TensorCache } from './cache.js';
import { kvRows } from './kv-store.js';
import { backendKey, fromData, isTracked } from './runtime.js';
import { fmt, sizeOf } from './shape.js';
import type { Tensor } from './tensor.js';

export interface AttentionOptions {
  /** Absolute position of query row 0 (row i is at qStart + i). */
  qStart: number;
  /** Absolute position of key row 0. */
  kStart: number;
  /** Sliding window: a query sees keys less than `window` positions back. Undefined: plain causal. */
  window?: number;
  /**
   * The keys and values are rows [first, first + count) of axis -2 of k and v (a cache's storage,
   * `appendKv`); kStart is the position of row `first`. Default: every row. With `fresh` (an append of
   * tracked rows to an untracked cache, see KvRows), the last rows hold fresh.k and fresh.v, and
   * gradients reach the keys and values through those alone.
   */
  keyRows?: { first: number; count: number; fresh?: { k: Tensor; v: Tensor } };
  /**
   * Positions held on the device, for a step replayed at every position (src/engine/launch-plan.ts):
   * `keys` int32 [Tk] is each key row's absolute position (negative: an empty row) and `query` int32 [1]
   * that of query row 0; they replace kStart + j and qStart + i, so keys may sit in any order (a ring
   * buffer). Forward only (fused op, nothing tracked); the host cannot check that every query sees a key.
   */
  positions?: { keys: Tensor; query: Tensor };
}

/** Whether a query at absolute position `qPos` sees the key at `kPos`. */
export function isVisible(qPos: number, kPos: number, window: number | undefined): boolean {
  return kPos <= qPos && (window === undefined || qPos - kPos < window);
}

/**
 * Validates shapes and positions and describes the problem for the kernels. Throws when some query
 * would see no key: a softmax over nothing has no meaning, and the composite would silently spread
 * the weight over invisible keys instead.
 */
function attentionJob(op: string, q: Tensor, k: Tensor, v: Tensor, opts: AttentionOptions): AttentionJob {
  const { qStart, kStart, window } = opts;
  for (const t of [q, k, v]) {
    if (t.backend !== q.backend) throw new Error(`${op}: q, k and v live on different backends`);
    if (t.dtype !== q.dtype) throw new Error(`${op}: dtype mismatch (q ${q.dtype}, k ${k.dtype}, v ${v.dtype})`);
  }
  if (!isFloat(q.dtype)) throw new Error(`${op}: needs floating-point tensors, got ${q.dtype}`);
  if (q.rank < 2) throw new Error(`${op}: q needs rank >= 2 ([..., Tq, D]), got ${fmt(q.shape)}`);
  const lead = q.shape.slice(0, -2);
  const [tq, d] = q.shape.slice(-2);
  const stored = k.shape[k.rank - 2];
  const rows = opts.keyRows ?? { first: 0, count: stored };
  if (!Number.isInteger(rows.first) || !Number.isInteger(rows.count) || rows.first < 0 || rows.count < 0 || rows.first + rows.count > stored) {
    throw new Error(`${op}: keyRows ${rows.first}+${rows.count} do not fit in the ${stored} rows of k ${fmt(k.shape)}`);
  }
  const tk = rows.count;
  // Grouped-query attention: the last leading axis (heads) of k and v may divide q's.
  const heads = q.rank - 3;
  const groups = heads >= 0 && k.rank === q.rank && k.shape[heads] > 0 ? q.shape[heads] / k.shape[heads] : 1;
  const sameExceptHeads = k.rank === q.rank && k.shape.every((s, i) => i === k.rank - 2 || i === heads || s === q.shape[i]);
  if (!sameExceptHeads || !Number.isInteger(groups) || groups < 1 || fmt(v.shape) !== fmt(k.shape)) {
    throw new Error(
      `${op}: expected q [..., Hq, Tq, D] and k, v [..., Hkv, Tk, D] with the same leading axes except Hkv, a divisor of Hq, ` +
        `got q ${fmt(q.shape)}, k ${fmt(k.shape)}, v ${fmt(v.shape)}`,
    );
  }
  if (!Number.isInteger(qStart) || !Number.isInteger(kStart)) throw new Error(`${op}: qStart and kStart must be integers, got ${qStart} and ${kStart}`);
  if (window !== undefined && !(Number.isInteger(window) && window >= 1)) throw new Error(`${op}: window must be a positive integer, got ${window}`);
  if (opts.positions) {
    const { keys, query } = opts.positions;
    if (opts.keyRows) throw new Error(`${op}: positions and keyRows cannot be combined`);
    if (keys.dtype !== 'int32' || keys.size !== tk || query.dtype !== 'int32' || query.size !== 1 || keys.backend !== q.backend || query.backend !== q.backend) {
      throw new Error(`${op}: positions must be int32 [${tk}] (one per key row) and int32 [1] on q's backend, got ${keys.dtype}${fmt(keys.shape)} and ${query.dtype}${fmt(query.shape)}`);
    }
  } else if (tq > 0) {
    // Visibility only shrinks at the ends: the first query is the one that can precede every key,
    // the last the one whose window can have slid past every key.
    const first = qStart;
    const last = qStart + tq - 1;
    if (tk === 0 || first < kStart || (window !== undefined && last - (kStart + tk - 1) >= window)) {
      throw new Error(
        `${op}: some query sees no key (queries at positions ${first}..${last}, keys at ${kStart}..${kStart + tk - 1}, ` +
          `window ${window ?? 'none'}); every query needs at least one visible key`,
      );
    }
  }
  const job: AttentionJob = { batch: sizeOf(lead), groups, tq, tk, d, qStart, kStart, window: window ?? Infinity, scale: 1 / Math.sqrt(d) };
  if (opts.positions) return { ...job, keyPositions: opts.positions.keys.data, queryPosition: opts.positions.query.data };
  return rows.count === stored ? job : { ...job, kvOffset: rows.first * d, kvStride: stored * d };
}

/**
 * Rows [first, first + count) of k and v as contiguous tensors (after the shape checks); with `fresh`,
 * the stored rows before it followed by the fresh tensors themselves (so gradients reach them).
 */
function keysOf(q: Tensor, k: Tensor, v: Tensor, opts: AttentionOptions, op: string): [Tensor, Tensor] {
  attentionJob(op, q, k, v, opts);
  const { first, count, fresh } = opts.keyRows!;
  if (!fresh) {
    const r = kvRows({ k, v, first, count });
    return [r.k, r.v];
  }
  const n = fresh.k.shape[fresh.k.rank - 2];
  if (n === count) return [fresh.k, fresh.v];
  const held = kvRows({ k, v, first, count: count - n });
  const axis = k.rank - 2;
  return [concat([held.k, fresh.k], axis), concat([held.v, fresh.v], axis)];
}

/**
 * The band as data: an additive bias [Tq, Tk] of 0 (visible) or -1e9 (hidden). It depends only on
 * the shape, the offset qStart − kStart and the window, so it is built once per such geometry (the
 * TTT inner loop differentiates through the composite at every mini-batch with the same geometry)
 * and handed out as an alias of a bounded cache's entry.
 */
export function attentionBandBias(tq: number, tk: number, opts: AttentionOptions, dtype: Tensor['dtype']): Tensor {
  const key = `${backendKey()}/${dtype}/${tq}/${tk}/${opts.qStart - opts.kStart}/${opts.window ?? 'all'}`;
  return biasCache.get(key, () => {
    const values = new Float64Array(tq * tk);
    for (let i = 0; i < tq; i++) {
      for (let j = 0; j < tk; j++) values[i * tk + j] = isVisible(opts.qStart + i, opts.kStart + j, opts.window) ? 0 : -1e9;
    }
    return tensor(values, [tq, tk], dtype);
  });
}

/** Band biases kept: a few geometries per model (they can be large: Tq × Tk each). */
const biasCache = new TensorCache(8);

/** Frees the cached band biases. */
export function clearBandBiasCache(): void {
  biasCache.clear();
}

/**
 * The definition: softmax(q kᵀ / √D + bias) v over dense [Tq, Tk] scores, from differentiable ops
 * only (so it can be differentiated to any order).
 */
export function compositeAttention(q: Tensor, k: Tensor, v: Tensor, opts: AttentionOptions): Tensor {
  if (opts.positions) throw new Error('compositeAttention: positions held on the device are for the fused forward only');
  if (opts.keyRows) return compositeAttention(q, ...keysOf(q, k, v, opts, 'compositeAttention'), { ...opts, keyRows: undefined });
  const job = attentionJob('compositeAttention', q, k, v, opts);
  const groups = job.groups ?? 1;
  if (groups > 1) {
    // each key/value head serves `groups` consecutive query heads: repeat it (its gradient sums them)
    const repeat = (t: Tensor) => {
      const s = t.shape;
      const h = s.length - 3;
      const spread = broadcastTo(reshape(t, [...s.slice(0, h + 1), 1, ...s.slice(h + 1)]), [...s.slice(0, h + 1), groups, ...s.slice(h + 1)]);
      return reshape(spread, [...s.slice(0, h), s[h] * groups, ...s.slice(h + 1)]);
    };
    k = repeat(k);
    v = repeat(v);
  }
  // q scaled before the product: a [Tq, D] op instead of a third [Tq, Tk] tensor (and its cotangent) on the tape
  // of a second-order trace, where this composite is what the fused op's backward falls back to
  // and the band bias inside the softmax op: no masked copy of the scores on that tape either
  const scores = matmul(div(q, Math.sqrt(job.d)), k, { transB: true });
  return matmul(biasedSoftmax(scores, attentionBandBias(job.tq, job.tk, opts, q.dtype)), v);
}

/**
 * Causal attention with scale 1/√D, q [..., Tq, D] and k, v [..., Tk, D] → [..., Tq, D] (k and v may
 * have fewer heads than q: grouped-query attention, query head h reads key/value head ⌊h / groups⌋); query i is
 * at position qStart + i and sees key j (at kStart + j) iff that key is not in its future and, with
 * a window, fewer than `window` positions back. Same values as `compositeAttention`, but the kernels
 * only touch the visible band and keep no [Tq, Tk] tensor.
 */
export function scaledDotAttention(q: Tensor, k: Tensor, v: Tensor, opts: AttentionOptions): Tensor {
  const fresh = opts.keyRows?.fresh;
  const tracked = isTracked(q) || isTracked(k) || isTracked(v) || (fresh !== undefined && (isTracked(fresh.k) || isTracked(fresh.v)));
  if (opts.positions && tracked) throw new Error('scaledDotAttention: positions held on the device are forward only (nothing may be differentiated)');
  if (fresh && tracked && !isTracked(k) && !isTracked(v)) return attentionOverFresh(q, k, v, fresh, opts);
  if (opts.keyRows && tracked) {
    // the backward takes contiguous keys: differentiate through a copy of the rows
    return scaledDotAttention(q, ...keysOf(q, k, v, opts, 'scaledDotAttention'), { ...opts, keyRows: undefined });
  }
  const job = attentionJob('scaledDotAttention', q, k, v, opts);
  const { dtype, backend } = q;
  const r = backend.attentionForward(q.data, k.data, v.data, job, dtype);
  const y = fromData(r.out, q.shape, dtype, backend);
  if (!tracked) {
    backend.free(r.lse, dtype, job.batch * job.tq);
    return y;
  }
  const lse = fromData(r.lse, [job.batch, job.tq], dtype, backend);
  recordFused('scaledDotAttention', [q, k, v], y, { composite: (a, b, c) => compositeAttention(a, b, c, opts) }, (g) => {
    const d = backend.attentionBackward(q.data, k.data, v.data, y.data, lse.data, g.data, job, dtype);
    return [d.dq, d.dk, d.dv];
  }, [lse]);
  return y;
}

/**
 * Attention over stored rows whose last rows are the tracked `fresh` keys and values (the rows before
 * are constants): a fused op of q, fresh.k and fresh.v. The forward reads the store where it is; the
 * backward takes dQ over every visible key and dK, dV for the fresh rows alone (`gradKeysFrom`), so
 * the TTT inner step never copies the cache or differentiates through it.
 */
function attentionOverFresh(q: Tensor, k: Tensor, v: Tensor, fresh: { k: Tensor; v: Tensor }, opts: AttentionOptions): Tensor {
  const job = attentionJob('scaledDotAttention', q, k, v, opts);
  const n = fresh.k.shape[fresh.k.rank - 2];
  const rows = opts.keyRows!;
  const stored = fmt([...k.shape.slice(0, -2), n, k.shape[k.rank - 1]]);
  if (fmt(fresh.k.shape) !== stored || fmt(fresh.v.shape) !== stored || fresh.k.dtype !== k.dtype || fresh.v.dtype !== k.dtype || n > rows.count) {
    throw new Error(`scaledDotAttention: fresh rows k ${fmt(fresh.k.shape)}, v ${fmt(fresh.v.shape)} do not end the ${rows.count} key rows of ${fmt(k.shape)}`);
  }
  const { dtype, backend } = q;
  const r = backend.attentionForward(q.data, k.data, v.data, job, dtype);
  const y = fromData(r.out, q.shape, dtype, backend);
  const lse = fromData(r.lse, [job.batch, job.tq], dtype, backend);
  // the definition, as a function of the op's inputs: the stored rows before them are constants
  const over = (b: Tensor, c: Tensor): AttentionOptions => ({ ...opts, keyRows: { first: rows.first, count: rows.count, fresh: { k: b, v: c } } });
  const composite = (a: Tensor, b: Tensor, c: Tensor) => compositeAttention(a, ...keysOf(a, k, v, over(b, c), 'compositeAttention'), { ...opts, keyRows: undefined });
  recordFused('scaledDotAttention', [q, fresh.k, fresh.v], y, { composite }, (g) => {
    const d = backend.attentionBackward(q.data, k.data, v.data, y.data, lse.data, g.data, { ...job, gradKeysFrom: job.tk - n }, dtype);
    return [d.dq, d.dk, d.dv];
  }, [lse, k, v]);
  return y;
}
