/**
 * Key/value caches that grow by appending. Tensors are immutable values, so a cache built by
 * `concat([cache, new])` copies its whole history at every step: at 128 K positions that copy, not
 * the attention, was most of a decode step. A `KvRows` is instead a view, rows [first, first + count)
 * along axis -2 of storage tensors k and v whose capacity runs ahead of the rows in use.
 *
 * Appending writes the new rows in place only when the view ends where its storage was last written
 * (its frontier): rows an older view can see are never overwritten, so views stay valid values (a
 * session's snapshot at the start of a mini-batch, a branch taken from it). Any other append copies
 * into fresh storage with room to grow (twice the rows), and dropping the oldest rows (a sliding
 * window) only moves `first`, so the copies amortise to O(1) per appended row.
 *
 * Under an autodiff transform appending is the plain differentiable concat (no storage is shared,
 * nothing is written in place), with one exception: a single transform and a cache it does not track
 * (the TTT inner step over a session's cache, a constant). Then rows are appended in place as usual, and
 * tracked new rows ride along as `fresh`: attention differentiates through those rows alone (dK and dV
 * of the new rows only) instead of through a copy of the cache. With an outer transform active as well
 * (training's checkpointed mini-batches: the cache is untracked in a checkpoint's first pass and tracked
 * in its recomputation) it stays the concat, so both passes take the same path.
 */
import { stopGradient } from './autodiff.js';
import { concat, slice } from './ops.js';
import { fromData, isTracked, traceDepth } from './runtime.js';
import { fmt, sizeOf, stridesOf } from './shape.js';
import type { Tensor } from './tensor.js';

export interface KvRows {
  /** Storage [..., capacity, D]; only rows [first, first + count) of axis -2 are keys. */
  readonly k: Tensor;
  readonly v: Tensor;
  readonly first: number;
  readonly count: number;
}

/** What `appendKv` returns: the view, and the appended rows when gradients reach the keys through them alone. */
export interface AppendedKvRows extends KvRows {
  /**
   * Set when the appended rows are tracked but the cache before them is not: the last
   * fresh.k.shape[-2] rows of the view hold the values of these tensors, through which gradients reach
   * them; the rows before are constants.
   */
  readonly fresh?: { readonly k: Tensor; readonly v: Tensor };
}

/** Per storage tensor k: the end of the rows written into it (appends in place continue from here). */
const frontier = new WeakMap<Tensor, number>();

/** The smallest storage worth allocating, in rows. */
const MIN_CAPACITY = 64;

/** Rows the growing stores make room for at once while `reservingKv` runs (0: double as they go). */
let reserveRows = 0;

/**
 * Runs fn with a hint that the caches it appends to grow to `rows` rows: a store that grows without
 * bound (`appendKv(..., { unbounded: true })`, full attention's) and must reallocate allocates that many
 * rows once, instead of doubling towards it (a 128 K prefill in 16 K groups otherwise allocates 32 K, 96 K
 * and 224 K rows of every layer's keys and values, and copies the rows each time).
 */
export function reservingKv<T>(rows: number, fn: () => T): T {
  const before = reserveRows;
  reserveRows = rows;
  try {
    return fn();
  } finally {
    reserveRows = before;
  }
}

/** `rows` as contiguous tensors [..., count, D] (copies unless the view is the whole storage). */
export function kvRows(rows: KvRows): { k: Tensor; v: Tensor } {
  const cap = rows.k.shape[rows.k.rank - 2];
  if (rows.first === 0 && rows.count === cap) return { k: rows.k, v: rows.v };
  const lo = [...rows.k.shape.slice(0, -2).map(() => 0), rows.first, 0];
  const hi = [...rows.k.shape.slice(0, -2), rows.first + rows.count, rows.k.shape[rows.k.rank - 1]];
  return { k: slice(rows.k, lo, hi), v: slice(rows.v, lo, hi) };
}

/** Keeps only the newest `keep` rows (no copy); the result is a plain view (an appended view's `fresh` is left behind). */
export function dropOldestRows(rows: KvRows, keep: number): KvRows {
  const drop = Math.max(0, rows.count - keep);
  return { k: rows.k, v: rows.v, first: rows.first + drop, count: rows.count - drop };
}

/**
 * rows followed by k, v ([..., n, D], the same leading axes and D). `unbounded`: the cache keeps every
 * row (full attention), so a store that must grow makes room for `reservingKv`'s rows where one is set.
 */
export function appendKv(rows: KvRows | null, k: Tensor, v: Tensor, opts: { unbounded?: boolean } = {}): AppendedKvRows {
  const r = k.rank;
  if (r < 2 || v.rank !== r || fmt(v.shape) !== fmt(k.shape) || v.dtype !== k.dtype) {
    throw new Error(`appendKv: k and v must have the same shape [..., n, D] and dtype, got k ${fmt(k.shape)} ${k.dtype}, v ${fmt(v.shape)} ${v.dtype}`);
  }
  const n = k.shape[r - 2];
  if (rows) {
    const s = rows.k.shape;
    if (s.length !== r || s.some((d, i) => i !== r - 2 && d !== k.shape[i]) || rows.k.dtype !== k.dtype) {
      throw new Error(`appendKv: new rows ${fmt(k.shape)} ${k.dtype} do not match the cache's storage ${fmt(s)} ${rows.k.dtype}`);
    }
  }
  if (traceDepth() > 0) {
    if (!rows) return { k, v, first: 0, count: n };
    if (traceDepth() > 1 || isTracked(rows.k) || isTracked(rows.v)) {
      const prev = kvRows(rows);
      return { k: concat([prev.k, k], r - 2), v: concat([prev.v, v], r - 2), first: 0, count: rows.count + n };
    }
    // one transform and a constant cache: in place (the TTT inner step's suffix blocks; the first of
    // them appends untracked rows too, since its keys come before any fast weight)
    if (isTracked(k) || isTracked(v)) return { ...storeRows(rows, stopGradient(k), stopGradient(v), opts.unbounded), fresh: { k, v } };
  }
  return storeRows(rows, k, v, opts.unbounded);
}

/** The untracked append: in place at the storage's frontier, else into fresh storage. */
function storeRows(rows: KvRows | null, k: Tensor, v: Tensor, unbounded = false): KvRows {
  const r = k.rank;
  const n = k.shape[r - 2];
  if (rows) {
    const end = rows.first + rows.count;
    if (frontier.get(rows.k) === end && end + n <= rows.k.shape[r - 2]) {
      writeRows(rows.k, end, k);
      writeRows(rows.v, end, v);
      frontier.set(rows.k, end + n);
      return { k: rows.k, v: rows.v, first: rows.first, count: rows.count + n };
    }
  }
  const count = (rows?.count ?? 0) + n;
  const capacity = Math.max(unbounded && reserveRows >= count ? reserveRows : 2 * count, MIN_CAPACITY);
  const shape = [...k.shape.slice(0, -2), capacity, k.shape[r - 1]];
  const store = (src: Tensor | undefined, add: Tensor): Tensor => {
    const t = fromData(add.backend.empty(sizeOf(shape), add.dtype), shape, add.dtype, add.backend);
    if (rows && src) copyRows(src, rows.first, rows.count, t, 0);
    writeRows(t, rows?.count ?? 0, add);
    return t;
  };
  const next = { k: store(rows?.k, k), v: store(rows?.v, v), first: 0, count };
  frontier.set(next.k, count);
  return next;
}

/** src ([..., n, D], any layout the engine made contiguous) into rows [at, at + n) of dst. */
function writeRows(dst: Tensor, at: number, src: Tensor): void {
  copyRows(src, 0, src.shape[src.rank - 2], dst, at);
}

function copyRows(src: Tensor, from: number, n: number, dst: Tensor, at: number): void {
  const r = src.rank;
  const rowLen = src.shape[r - 1];
  const shape = [...src.shape.slice(0, -2), n, rowLen];
  dst.backend.copy(src.data, from * rowLen, stridesOf(src.shape), dst.data, at * rowLen, stridesOf(dst.shape), shape, dst.dtype);
}

/**
 * In place: rows i of `rows` [..., n, D] into rows (at[0] + i) mod R of `store` [..., R, D] (the same
 * leading axes and D, the same dtype), with `at` an int32 [1] tensor read where the copy runs: a ring
 * buffer written at a position held on the device, so a recorded launch plan (src/engine/launch-plan.ts)
 * writes at the current position on every replay. Not differentiable (a store, like appendKv's).
 */
export function writeRowsAt(store: Tensor, rows: Tensor, at: Tensor): void {
  const r = store.rank;
  const bad = r < 2 || rows.rank !== r || rows.dtype !== store.dtype || rows.backend !== store.backend || store.shape.some((d, i) => i !== r - 2 && d !== rows.shape[i]);
  if (bad) throw new Error(`writeRowsAt: rows ${fmt(rows.shape)} ${rows.dtype} do not fit the store ${fmt(store.shape)} ${store.dtype} ([..., n, D] into [..., R, D])`);
  if (at.dtype !== 'int32' || at.size !== 1 || at.backend !== store.backend) throw new Error(`writeRowsAt: the position must be one int32 on the store's backend, got ${at.dtype}${fmt(at.shape)}`);
  if (isTracked(store) || isTracked(rows)) throw new Error('writeRowsAt: writes in place and cannot be differentiated');
  const R = store.shape[r - 2];
  const n = rows.shape[r - 2];
  if (n > R) throw new Error(`writeRowsAt: ${n} rows do not fit a ring of ${R}`);
  const D = store.shape[r - 1];
  const outer = R === 0 || D === 0 ? 0 : store.size / (R * D);
  if (outer * n * D === 0) return;
  store.backend.writeRowsAt(store.data, rows.data, at.data, outer, n, R, D, store.dtype);
}
