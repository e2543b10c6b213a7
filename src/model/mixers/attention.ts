/**
 * Multi-head attention with QK-norm and RoPE (SPEC §1), causal, full or sliding-window. The state is
 * a KV cache: every earlier position for full attention, the last k-1 for a window of k.
 */
import { type Tensor, concat, matmul, reshape, slice } from '../../engine/index.js';
import { attend, inDType, mergeHeads, rmsNorm, rope, splitHeads } from '../../nn/layers.js';
import { type ModelConfig, headDim } from '../config.js';
import { type Mixer, type MixerState, checkConsecutive, registerMixer } from './registry.js';

export interface KvCache extends MixerState {
  k: Tensor; // [B, H, len, D]
  v: Tensor;
  start: number; // absolute position of the first cached entry
}

/** Drop cached positions no future query can see (SWA: keep the last window-1). */
function trimCache(cache: KvCache, window: number | undefined): KvCache {
  const len = cache.k.shape[2];
  if (window === undefined || len <= window - 1) return cache;
  const drop = len - (window - 1);
  return { k: slice(cache.k, [0, 0, drop]), v: slice(cache.v, [0, 0, drop]), start: cache.start + drop };
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
      const kAll = cache ? concat([cache.k, k], 2) : k;
      const vAll = cache ? concat([cache.v, v], 2) : v;
      const start = cache ? cache.start : positions[0];
      const window = windowOf(c);
      checkConsecutive('attention', positions);
      const out = lin(mergeHeads(attend(q, kAll, vAll, { qStart: positions[0], kStart: start, window })), w.wo);
      return { out, state: trimCache({ k: kAll, v: vAll, start }, window) };
    },
  };
}

registerMixer('full', attentionMixer(() => undefined));
registerMixer('swa', attentionMixer((c) => c.window));
