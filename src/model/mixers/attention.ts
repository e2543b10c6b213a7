/**
 * Multi-head attention with QK-norm and RoPE (SPEC §1), causal, full or sliding-window. The state is
 * a KV cache: every earlier position for full attention, the last k-1 for a window of k, kept as rows
 * of preallocated storage (`appendKv`) so that reading one more token does not copy the cache.
 *
 * A launch plan (src/model/decode-plan.ts) carries a `KvRing` instead: fixed storage written at the
 * position held on the device, so one recorded decode step serves every position.
 */
import {
  type KvRows, type Tensor, appendKv, dropOldestRows, full, gather, kvRows, matmul, reshape, scaledDotAttention, tensor, writeRowsAt,
} from '../../engine/index.js';
import { attend, mergeHeads, rmsNorm, rope, ropeWith, splitHeads } from '../../nn/layers.js';
import { type ModelConfig, headDim } from '../config.js';
import { type Mixer, type MixerState, checkConsecutive, registerMixer } from './registry.js';

export interface KvCache extends MixerState, KvRows {
  k: Tensor; // storage [B, H, capacity, D]; rows [first, first + count) are the cached positions
  v: Tensor;
  start: number; // absolute position of row `first`
}

/**
 * A launch plan's cache: position p lives in row p mod R of k and v [1, H, R, D], and keyPositions
 * (int32 [R], -1 while empty) says which position each row holds, so attention needs no order. The
 * token read is at `position` (int32 [1], on the device), with RoPE rows `ropeCos`/`ropeSin` [D/2]
 * for it; these are the plan's, shared by every layer. Rings of one kind and size hold the same
 * positions and share keyPositions: the first of them (`writesPositions` 1) writes it.
 */
export interface KvRing extends MixerState {
  ring: 1;
  k: Tensor;
  v: Tensor;
  keyPositions: Tensor;
  writesPositions: 0 | 1;
  position: Tensor;
  ropeCos: Tensor;
  ropeSin: Tensor;
}

/** What every ring of a plan shares: the position, its RoPE rows, and key positions per (kind, size). */
export interface RingShared {
  position: Tensor;
  rope: { cos: Tensor; sin: Tensor };
  keyPositions: Map<string, Tensor>;
}

export function isRing(state: MixerState | null): state is KvRing {
  return state !== null && state.ring === 1;
}

/** A cache as rows of its storage (memories saved before `first`/`count` existed hold exactly their rows). */
function cachedRows(cache: KvCache | null): KvRows | null {
  if (!cache) return null;
  return { k: cache.k, v: cache.v, first: cache.first ?? 0, count: cache.count ?? cache.k.shape[2] };
}

/**
 * A ring of `rows` rows holding the positions of `caches` (written in order, so where two hold the
 * same position the later wins; each keeps its newest `rows`).
 */
export function kvRing(c: ModelConfig, kind: string, caches: (KvCache | null)[], rows: number, dtype: Tensor['dtype'], shared: RingShared): KvRing {
  const shape = [1, c.nHeads, rows, headDim(c)];
  const group = `${kind}/${rows}`;
  const first = !shared.keyPositions.has(group);
  if (first) shared.keyPositions.set(group, full([rows], -1, 'int32'));
  const ring: KvRing = {
    ring: 1, k: full(shape, 0, dtype), v: full(shape, 0, dtype), keyPositions: shared.keyPositions.get(group)!, writesPositions: first ? 1 : 0,
    position: shared.position, ropeCos: shared.rope.cos, ropeSin: shared.rope.sin,
  };
  for (const cache of caches) {
    const held = cachedRows(cache);
    if (!cache || !held || held.count === 0) continue;
    const keep = dropOldestRows(held, rows);
    const { k, v } = kvRows(keep);
    const start = cache.start + (keep.first - held.first);
    const at = tensor([start], [1], 'int32');
    writeRowsAt(ring.k, k, at);
    writeRowsAt(ring.v, v, at);
    if (first) writeRowsAt(reshape(ring.keyPositions, [rows, 1]), tensor(Array.from({ length: keep.count }, (_, i) => start + i), [keep.count, 1], 'int32'), at);
  }
  return ring;
}

/** The ordinary cache of positions [from, to) of a ring (null when empty); they must still be in it. */
export function ringRows(ring: KvRing, from: number, to: number): KvCache | null {
  if (to <= from) return null;
  const R = ring.k.shape[2];
  if (to - from > R) throw new Error(`ringRows: ${to - from} positions asked of a ring of ${R}`);
  const rows = tensor(Array.from({ length: to - from }, (_, i) => (from + i) % R), [to - from], 'int32');
  return { k: gather(ring.k, rows, 2), v: gather(ring.v, rows, 2), first: 0, count: to - from, start: from };
}

function attentionMixer(windowOf: (c: ModelConfig) => number | undefined): Mixer {
  return {
    init(c, _layer, init) {
      const D = c.dModel;
      return {
        wq: init.normal('wq', [D, D]),
        wk: init.normal('wk', [D, D]),
        wv: init.normal('wv', [D, D]),
        wo: init.normal('wo', [D, D]),
        qNorm: init.full([headDim(c)], 1),
        kNorm: init.full([headDim(c)], 1),
      };
    },
    /** The cache without spare capacity (what a saved memory holds). */
    compact(state) {
      if (isRing(state)) throw new Error('attention: a launch plan\'s ring is not a saved state');
      const cache = state as KvCache;
      const rows = cachedRows(cache)!;
      return { ...kvRows(rows), first: 0, count: rows.count, start: cache.start };
    },
    /** Attention over [cache; current] for the current positions. */
    forward(c, w, h, positions, state) {
      const [B, T] = h.shape;
      const heads = (x: Tensor) => reshape(x, [B, T, c.nHeads, headDim(c)]);
      // (float32 weights in a bfloat16 model: matmul computes in bfloat16 and hands back float32 gradients)
      let q = heads(matmul(h, w.wq));
      let k = heads(matmul(h, w.wk));
      const v = splitHeads(matmul(h, w.wv), c.nHeads);
      if (c.qkNorm) {
        q = rmsNorm(q, w.qNorm, c.normEps);
        k = rmsNorm(k, w.kNorm, c.normEps);
      }
      const window = windowOf(c);
      // rotated and split into heads [B, H, T, hd] in one op (no transposing copy)
      const rotate = (x: Tensor) => (isRing(state) ? ropeWith(x, { cos: state.ropeCos, sin: state.ropeSin }, 'split') : rope(x, positions, c.ropeTheta, 'split'));
      q = rotate(q);
      k = rotate(k);
      if (isRing(state)) {
        // one token at the device-held position: written into the ring, then attended with the
        // visibility rule applied to the rows' stored positions
        const R = state.k.shape[2];
        writeRowsAt(state.k, k, state.position);
        writeRowsAt(state.v, v, state.position);
        if (state.writesPositions) writeRowsAt(reshape(state.keyPositions, [R, 1]), reshape(state.position, [1, 1]), state.position);
        const o = scaledDotAttention(q, state.k, state.v, { qStart: 0, kStart: 0, window, positions: { keys: state.keyPositions, query: state.position } });
        return { out: matmul(mergeHeads(o), w.wo), state };
      }
      const cache = state as KvCache | null;
      checkConsecutive('attention', positions);
      const start = cache ? cache.start : positions[0];
      const rows = appendKv(cachedRows(cache), k, v, { unbounded: window === undefined });
      const out = matmul(mergeHeads(attend(q, rows.k, rows.v, { qStart: positions[0], kStart: start, window, keyRows: rows })), w.wo);
      // a window of k: later queries see only the last k-1 of these positions (a plain view: no `fresh`)
      const kept = dropOldestRows(rows, window === undefined ? Infinity : window - 1);
      return { out, state: { ...kept, start: start + (kept.first - rows.first) } };
    },
  };
}

registerMixer('full', attentionMixer(() => undefined));
registerMixer('swa', attentionMixer((c) => c.window));
