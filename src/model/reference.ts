/**
 * Loading weights laid out as the public JAX reference stores them (test-time-training/e2e): linear
 * weights [in, out], per-block arrays stacked on a leading layer axis, prime MLPs on a leading
 * suffix axis. Our layout is the same per matrix, so the mapping is names and unstacking only.
 */
import { type DType, Tensor, tensor } from '../engine/index.js';
import { type ModelConfig, makeConfig } from './config.js';
import type { Params } from './transformer.js';

export interface RefArray {
  shape: number[];
  data: number[];
}

export interface RefModelConfig {
  vocab_size: number;
  hidden_size: number;
  intermediate_size: number;
  num_hidden_layers: number;
  num_attention_heads: number;
  mini_batch_size: number;
  sliding_window_size: number;
  rope_theta: number;
  rms_norm_eps: number;
  qk_norm: boolean;
  pre_norm: boolean;
  post_norm: boolean;
  suffix_len: number;
  prime: boolean;
  seq_modeling_block: string;
}

export interface RefInnerOptimizer {
  lr: number;
  clip_gradient: number;
  ilr_init: number;
  ilr_warmup_steps: number;
}

export function configFromReference(m: RefModelConfig, inner: RefInnerOptimizer): ModelConfig {
  const variant = m.prime ? 'e2e' : m.seq_modeling_block === 'SWA' ? 'swa' : 'full';
  return makeConfig({
    name: 'reference',
    variant,
    vocabSize: m.vocab_size,
    dModel: m.hidden_size,
    nLayers: m.num_hidden_layers,
    nHeads: m.num_attention_heads,
    ffnDim: m.intermediate_size,
    window: m.sliding_window_size,
    miniBatch: m.mini_batch_size,
    ropeTheta: m.rope_theta,
    normEps: m.rms_norm_eps,
    qkNorm: m.qk_norm,
    preNorm: m.pre_norm,
    postNorm: m.post_norm,
    suffixLen: m.prime ? m.suffix_len : 0,
    innerLr: inner.lr,
    innerClip: inner.clip_gradient,
    ilrInit: inner.ilr_init,
    ilrWarmupSteps: inner.ilr_warmup_steps,
  });
}

const BLOCK = '.language_model.model.h.blocks.';
const PRIME = '.language_model.model.h.prime_storage.';

/** Our parameter paths → the reference's array name and the index along its stacking axis. */
export function referenceNames(c: ModelConfig): Map<string, { name: string; index?: number }> {
  const map = new Map<string, { name: string; index?: number }>();
  map.set('embed', { name: '.language_model.model.wte.weight' });
  map.set('finalNorm', { name: '.language_model.model.ln_f.weight' });
  const perBlock: Record<string, string> = {
    seqNorm: 'seq_norm.weight',
    seqPostNorm: 'seq_post_norm.weight',
    'seq.wq': 'seq_modeling_block.wq.weight',
    'seq.wk': 'seq_modeling_block.wk.weight',
    'seq.wv': 'seq_modeling_block.wv.weight',
    'seq.wo': 'seq_modeling_block.wo.weight',
    'seq.qNorm': 'seq_modeling_block.q_norm.weight',
    'seq.kNorm': 'seq_modeling_block.k_norm.weight',
    mlpNorm: 'ffn_norm.weight',
    mlpPostNorm: 'ffn_post_norm.weight',
    'mlp.w1': 'feed_forward.w1.weight',
    'mlp.w2': 'feed_forward.w2.weight',
    'mlp.w3': 'feed_forward.w3.weight',
  };
  const s = c.nLayers - c.suffixLen;
  for (let l = 0; l < c.nLayers; l++) {
    for (const [ours, theirs] of Object.entries(perBlock)) map.set(`blocks.${l}.${ours}`, { name: BLOCK + theirs, index: l });
    if (l >= s) {
      map.set(`blocks.${l}.primeNorm`, { name: `${PRIME}ffn_prime_norm.weight`, index: l - s });
      map.set(`blocks.${l}.primePostNorm`, { name: `${PRIME}ffn_prime_post_norm.weight`, index: l - s });
    }
  }
  for (let j = 0; j < c.suffixLen; j++) {
    for (const w of ['w1', 'w2', 'w3']) map.set(`fast.${j}.${w}`, { name: `${PRIME}feed_forward_prime.${w}.weight`, index: j });
  }
  return map;
}

/** Flat values of one of our parameters taken from a reference array (unstacked). */
export function referenceSlice(arrays: Record<string, RefArray>, entry: { name: string; index?: number }): { shape: number[]; data: number[] } {
  const arr = arrays[entry.name];
  if (!arr) throw new Error(`reference weights: missing array '${entry.name}'`);
  if (entry.index === undefined) return arr;
  const shape = arr.shape.slice(1);
  const n = shape.reduce((a, b) => a * b, 1);
  return { shape, data: arr.data.slice(entry.index * n, (entry.index + 1) * n) };
}

/** Our Params from reference arrays. */
export function paramsFromReference(c: ModelConfig, arrays: Record<string, RefArray>, dtype: DType = 'float32'): Params {
  const names = referenceNames(c);
  const get = (path: string): Tensor => {
    const { shape, data } = referenceSlice(arrays, names.get(path)!);
    return tensor(data, shape, dtype);
  };
  const s = c.nLayers - c.suffixLen;
  return {
    embed: get('embed'),
    finalNorm: get('finalNorm'),
    blocks: Array.from({ length: c.nLayers }, (_, l) => ({
      seqNorm: get(`blocks.${l}.seqNorm`),
      seqPostNorm: get(`blocks.${l}.seqPostNorm`),
      seq: {
        wq: get(`blocks.${l}.seq.wq`),
        wk: get(`blocks.${l}.seq.wk`),
        wv: get(`blocks.${l}.seq.wv`),
        wo: get(`blocks.${l}.seq.wo`),
        qNorm: get(`blocks.${l}.seq.qNorm`),
        kNorm: get(`blocks.${l}.seq.kNorm`),
      },
      mlpNorm: get(`blocks.${l}.mlpNorm`),
      mlpPostNorm: get(`blocks.${l}.mlpPostNorm`),
      mlp: { w1: get(`blocks.${l}.mlp.w1`), w2: get(`blocks.${l}.mlp.w2`), w3: get(`blocks.${l}.mlp.w3`) },
      ...(l >= s ? { primeNorm: get(`blocks.${l}.primeNorm`), primePostNorm: get(`blocks.${l}.primePostNorm`) } : {}),
    })),
    fast: Array.from({ length: c.suffixLen }, (_, j) => ({
      w1: get(`fast.${j}.w1`),
      w2: get(`fast.${j}.w2`),
      w3: get(`fast.${j}.w3`),
    })),
  };
}

/** Named tensors of a params-shaped tree: 'blocks.0.seq.wq' → tensor. */
export function namedLeaves(tree: unknown, prefix = ''): Map<string, Tensor> {
  const out = new Map<string, Tensor>();
  const visit = (t: unknown, path: string): void => {
    if (t instanceof Tensor) {
      out.set(path, t);
    } else if (Array.isArray(t)) t.forEach((x, i) => visit(x, path ? `${path}.${i}` : `${i}`));
    else if (t && typeof t === 'object') for (const [k, v] of Object.entries(t)) visit(v, path ? `${path}.${k}` : k);
  };
  visit(tree, prefix);
  return out;
}
