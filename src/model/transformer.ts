/**
 * The backbone shared by every variant (SPEC §1): tied embeddings, sandwich RMSNorm, attention with
 * QK-norm and RoPE (full or sliding window, the mask as data), SwiGLU MLPs, and — in the last
 * `suffixLen` blocks of TTT models — the prime MLP between attention and the safe MLP (SPEC §2).
 */
import {
  type Key, type Tensor, add, concat, foldIn, gather, matmul, ones, randomKey, reshape, slice, truncatedNormal,
} from '../engine/index.js';
import { type MlpWeights, attend, mergeHeads, rmsNorm, rope, splitHeads, swiglu } from '../nn/layers.js';
import { type AttentionKind, type ModelConfig, hasPrime, headDim, layerKinds } from './config.js';

export interface AttentionWeights {
  wq: Tensor;
  wk: Tensor;
  wv: Tensor;
  wo: Tensor;
  qNorm: Tensor;
  kNorm: Tensor;
}

export interface BlockParams {
  /** Absent in attention-free models. */
  attnNorm?: Tensor;
  attnPostNorm?: Tensor;
  attn?: AttentionWeights;
  mlpNorm: Tensor;
  mlpPostNorm: Tensor;
  /** The safe MLP: trained by the outer loop only. */
  mlp: MlpWeights;
  /** Norms around the prime MLP (suffix blocks of TTT models); outer parameters. */
  primeNorm?: Tensor;
  primePostNorm?: Tensor;
}

export interface Params {
  embed: Tensor;
  blocks: BlockParams[];
  finalNorm: Tensor;
  /** W_0: the prime MLPs of the suffix blocks, the initial fast weights (meta-learned). */
  fast: MlpWeights[];
}

/** Fast weights of one suffix block; with a leading batch axis when each sequence has its own. */
export type FastWeights = MlpWeights[];

/** Keys/values of the positions a layer still needs to attend to (SWA keeps the last k-1). */
export interface KvCache {
  k: Tensor; // [B, H, len, D]
  v: Tensor;
  start: number; // absolute position of the first cached entry
}

/** Reference-style init: weights ~ N(0, initStd²) truncated at 2σ, norm gains 1. Seeded. */
export function initParams(c: ModelConfig, key: Key = randomKey(0), dtype: Tensor['dtype'] = 'float32'): Params {
  const D = c.dModel;
  const hd = headDim(c);
  const w = (name: string, shape: number[]) => truncatedNormal(foldIn(key, name), shape, c.initStd, dtype);
  const mlp = (name: string): MlpWeights => ({
    w1: w(`${name}.w1`, [D, c.ffnDim]),
    w2: w(`${name}.w2`, [c.ffnDim, D]),
    w3: w(`${name}.w3`, [D, c.ffnDim]),
  });
  const blocks: BlockParams[] = [];
  const fast: MlpWeights[] = [];
  for (let l = 0; l < c.nLayers; l++) {
    const b: BlockParams = {
      ...(c.attentionFree ? {} : {
        attnNorm: ones([D], dtype),
        attnPostNorm: ones([D], dtype),
        attn: {
          wq: w(`blocks.${l}.attn.wq`, [D, D]),
          wk: w(`blocks.${l}.attn.wk`, [D, D]),
          wv: w(`blocks.${l}.attn.wv`, [D, D]),
          wo: w(`blocks.${l}.attn.wo`, [D, D]),
          qNorm: ones([hd], dtype),
          kNorm: ones([hd], dtype),
        },
      }),
      mlpNorm: ones([D], dtype),
      mlpPostNorm: ones([D], dtype),
      mlp: mlp(`blocks.${l}.mlp`),
    };
    if (hasPrime(c, l)) {
      b.primeNorm = ones([D], dtype);
      b.primePostNorm = ones([D], dtype);
      fast.push(mlp(`fast.${fast.length}`));
    }
    blocks.push(b);
  }
  return { embed: w('embed', [c.vocabSize, D]), blocks, finalNorm: ones([D], dtype), fast };
}

export function embed(params: Params, tokens: Tensor): Tensor {
  return gather(params.embed, tokens, 0);
}

/** Final norm and tied output projection: logits = norm(h) @ Eᵀ. */
export function logits(c: ModelConfig, params: Params, h: Tensor): Tensor {
  return matmul(rmsNorm(h, params.finalNorm, c.normEps), params.embed, { transB: true });
}

const pre = (c: ModelConfig, x: Tensor, w: Tensor) => (c.preNorm ? rmsNorm(x, w, c.normEps) : x);
const post = (c: ModelConfig, x: Tensor, w: Tensor) => (c.postNorm ? rmsNorm(x, w, c.normEps) : x);

/**
 * Attention over [cache; current] for the current positions. Returns the output and the cache the
 * next positions need.
 */
function attention(
  c: ModelConfig, kind: AttentionKind, w: AttentionWeights, h: Tensor, positions: number[], cache: KvCache | null,
): { out: Tensor; cache: KvCache } {
  const [B, T] = h.shape;
  const hd = headDim(c);
  const heads = (x: Tensor) => reshape(x, [B, T, c.nHeads, hd]);
  let q = heads(matmul(h, w.wq));
  let k = heads(matmul(h, w.wk));
  const v = splitHeads(matmul(h, w.wv), c.nHeads);
  if (c.qkNorm) {
    q = rmsNorm(q, w.qNorm, c.normEps);
    k = rmsNorm(k, w.kNorm, c.normEps);
  }
  q = splitHeads(reshape(rope(q, positions, c.ropeTheta), [B, T, c.dModel]), c.nHeads);
  k = splitHeads(reshape(rope(k, positions, c.ropeTheta), [B, T, c.dModel]), c.nHeads);
  const kAll = cache ? concat([cache.k, k], 2) : k;
  const vAll = cache ? concat([cache.v, v], 2) : v;
  const start = cache ? cache.start : positions[0];
  const window = kind === 'swa' ? c.window : undefined;
  // The op takes positions as starts: queries, like cached keys, must be consecutive.
  if (positions.some((p, i) => p !== positions[0] + i)) throw new Error(`attention: positions must be consecutive, got ${positions.slice(0, 8).join(',')}…`);
  const out = matmul(mergeHeads(attend(q, kAll, vAll, { qStart: positions[0], kStart: start, window })), w.wo);
  return { out, cache: trimCache({ k: kAll, v: vAll, start }, window) };
}

/** Drop cached positions no future query can see (SWA: keep the last window-1). */
function trimCache(cache: KvCache, window: number | undefined): KvCache {
  const len = cache.k.shape[2];
  if (window === undefined || len <= window - 1) return cache;
  const drop = len - (window - 1);
  return {
    k: slice(cache.k, [0, 0, drop]),
    v: slice(cache.v, [0, 0, drop]),
    start: cache.start + drop,
  };
}

/**
 * One block: x += Post(Attn(Pre(x))); [x += Post'(MLP'(Pre'(x))) with fast weights]; x += Post(MLP(Pre(x))).
 */
export function block(
  c: ModelConfig, layer: number, p: BlockParams, x: Tensor, positions: number[], cache: KvCache | null, fast?: MlpWeights,
): { x: Tensor; cache: KvCache | null } {
  let kv: KvCache | null = null;
  if (p.attn) {
    const a = attention(c, layerKinds(c)[layer], p.attn, pre(c, x, p.attnNorm!), positions, cache);
    x = add(x, post(c, a.out, p.attnPostNorm!));
    kv = a.cache;
  }
  if (fast) {
    if (!p.primeNorm || !p.primePostNorm) throw new Error(`block ${layer}: fast weights given to a block without a prime MLP`);
    x = add(x, post(c, swiglu(pre(c, x, p.primeNorm), fast), p.primePostNorm));
  }
  x = add(x, post(c, swiglu(pre(c, x, p.mlpNorm), p.mlp), p.mlpPostNorm));
  return { x, cache: kv };
}

/** Index of the first suffix (prime-MLP) block. */
export const suffixStart = (c: ModelConfig): number => c.nLayers - c.suffixLen;

/**
 * Runs blocks [from, to) over `x` at `positions`, with per-layer caches (null = none yet) and the
 * suffix blocks' fast weights. Returns the output and the updated caches.
 */
export function runBlocks(
  c: ModelConfig, params: Params, from: number, to: number, x: Tensor, positions: number[],
  caches: (KvCache | null)[], fast: FastWeights,
): { x: Tensor; caches: (KvCache | null)[] } {
  const s = suffixStart(c);
  const out: (KvCache | null)[] = [];
  for (let l = from; l < to; l++) {
    const r = block(c, l, params.blocks[l], x, positions, caches[l - from] ?? null, l >= s ? fast[l - s] : undefined);
    x = r.x;
    out.push(r.cache);
  }
  return { x, caches: out };
}

export const range = (start: number, n: number): number[] => Array.from({ length: n }, (_, i) => start + i);
