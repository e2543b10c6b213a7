/**
 * Multi-head attention with QK-norm and RoPE (SPEC §1), causal, full or sliding-window. The state is
 * a KV cache: every earlier position for full attention, the last k-1 for a window of k, kept as rows
 * of preallocated storage (`appendKv`) so that reading one more token does not copy the cache.
 */
import { type KvRows, type Tensor, appendKv, dropOldestRows, kvRows, matmul, reshape } from '../../engine/index.js';
import { attend, inDType, mergeHeads, rmsNorm, rope, splitHeads } from '../../nn/layers.js';
import { type ModelConfig, headDim } from '../config.js';
import { type Mixer, type MixerState, checkConsecutive, registerMixer } from './registry.js';

export interface KvCache extends MixerState, KvRows {
  k: Tensor; // storage [B, H, capacity, D]; rows [first, first + count) are the cached positions
  v: Tensor;
  start: number; // absolute position of row `first`
}

/** A cache as rows of its storage (memories saved before `first`/`count` existed hold exactly their rows). */
function cachedRows(cache: KvCache | null): KvRows | null {
  if (!cache) return null;
  return { k: cache.k, v: cache.v, first: cache.first ?? 0, count: cache.count ?? cache.k.shape[2] };
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
      const cache = state as KvCache;
      const rows = cachedRows(cache)!;
      return { ...kvRows(rows), first: 0, count: rows.count, start: cache.start };
    },
    /** Attention over [cache; current] for the current positions. */
    forward(c, w, h, positions, state) {
      const cache = state as KvCache | null;
      const [B, T] = h.shape;
      const heads = (x: Tensor) => reshape(x, [B, T, c.nHeads, headDim(c)]);
      const lin = (x: Tensor, weight: Tensor) => matmul(x, inDType(weight, x.dtype));
      let q = heads(lin(h, w.wq));
      let k = heads(lin(h, w.wk));
      const v = splitHeads(lin(h, w.wv), c.nHeads);
      if (c.qkNorm) {
        q = rmsNorm(q, w.qNorm, c.normEps);
        k = rmsNorm(k, w.kNorm, c.normEps);
      }
      q = splitHeads(reshape(rope(q, positions, c.ropeTheta), [B, T, c.dModel]), c.nHeads);
      k = splitHeads(reshape(rope(k, positions, c.ropeTheta), [B, T, c.dModel]), c.nHeads);
      checkConsecutive('attention', positions);
      const start = cache ? cache.start : positions[0];
      const window = windowOf(c);
      const rows = appendKv(cachedRows(cache), k, v);
      const out = lin(mergeHeads(attend(q, rows.k, rows.v, { qStart: positions[0], kStart: start, window, keyRows: rows })), w.wo);
      // a window of k: later queries see only the last k-1 of these positions
      const kept = window === undefined ? rows : dropOldestRows(rows, window - 1);
      return { out, state: { ...kept, start: start + (kept.first - rows.first) } };
    },
  };
}

registerMixer('full', attentionMixer(() => undefined));
registerMixer('swa', attentionMixer((c) => c.window));
