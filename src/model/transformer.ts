/**
 * The backbone shared by every variant (SPEC §1): tied embeddings, sandwich RMSNorm, a sequence mixer
 * (attention with QK-norm and RoPE, full or sliding window — see mixers/), SwiGLU MLPs, and — in the last
 * `suffixLen` blocks of TTT models — the prime MLP between attention and the safe MLP (SPEC §2).
 */
import { type Key, type Tensor, add, foldIn, full, gather, matmul, ones, randomKey, truncatedNormal } from '../engine/index.js';
import { type MlpWeights, inDType, rmsNorm, swiglu } from '../nn/layers.js';
import { type ModelConfig, hasPrime, layerKinds } from './config.js';
import { type MixerState, getMixer } from './mixers/index.js';

export interface BlockParams {
  /** The sequence-mixing sub-layer (attention, or a baseline's mixer) and its norms; absent in attention-free models. */
  seqNorm?: Tensor;
  seqPostNorm?: Tensor;
  seq?: Record<string, Tensor>;
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

/** Reference-style init: weights ~ N(0, initStd²) truncated at 2σ, norm gains 1. Seeded. */
export function initParams(c: ModelConfig, key: Key = randomKey(0), dtype: Tensor['dtype'] = 'float32'): Params {
  const D = c.dModel;
  const w = (name: string, shape: number[], std = c.initStd) => truncatedNormal(foldIn(key, name), shape, std, dtype);
  const kinds = layerKinds(c);
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
        seqNorm: ones([D], dtype),
        seqPostNorm: ones([D], dtype),
        seq: getMixer(kinds[l]).init(c, l, {
          normal: (name, shape, std) => w(`blocks.${l}.seq.${name}`, shape, std),
          full: (shape, value) => full(shape, value, dtype),
          key: foldIn(key, `blocks.${l}.seq`),
        }),
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

/** Token embeddings, in the compute dtype (mixed precision starts here; see `computeDType`). */
export function embed(c: ModelConfig, params: Params, tokens: Tensor): Tensor {
  const x = gather(params.embed, tokens, 0);
  return c.computeDType ? inDType(x, c.computeDType) : x;
}

/**
 * Final norm and tied output projection in the compute dtype: logits = norm(h) @ Eᵀ. The losses take
 * these directly (the token NLL widens bf16 itself, and the fused one needs no float32 copy of them).
 */
export function outputLogits(c: ModelConfig, params: Params, h: Tensor): Tensor {
  return matmul(rmsNorm(h, params.finalNorm, c.normEps), params.embed, { transB: true });
}

/** The same logits in float32 or wider (for log-probabilities and sampling). */
export function logits(c: ModelConfig, params: Params, h: Tensor): Tensor {
  return widenLogits(params, outputLogits(c, params, h));
}

/** The dtype logits of `dtype` widen to: bf16 to the parameters' float dtype (float32 at least); others stay. */
function widened(params: Params, dtype: Tensor['dtype']): Tensor['dtype'] {
  return dtype === 'bfloat16' ? (params.embed.dtype === 'bfloat16' ? 'float32' : params.embed.dtype) : dtype;
}

/** The dtype of `logits` (and of log-probabilities made from them). */
export function logitsDType(c: ModelConfig, params: Params): Tensor['dtype'] {
  return widened(params, c.computeDType ?? params.embed.dtype);
}

/** bf16 logits in the parameters' float dtype (float32 at least); others as they are. */
export function widenLogits(params: Params, z: Tensor): Tensor {
  return inDType(z, widened(params, z.dtype));
}

const pre = (c: ModelConfig, x: Tensor, w: Tensor) => (c.preNorm ? rmsNorm(x, w, c.normEps) : x);
const post = (c: ModelConfig, x: Tensor, w: Tensor) => (c.postNorm ? rmsNorm(x, w, c.normEps) : x);

/**
 * One block: x += Post(Mix(Pre(x))); [x += Post'(MLP'(Pre'(x))) with fast weights]; x += Post(MLP(Pre(x))).
 * Mix is the layer's sequence mixer (attention for every variant of the paper's own model).
 */
export function block(
  c: ModelConfig, layer: number, p: BlockParams, x: Tensor, positions: number[], state: MixerState | null, fast?: MlpWeights,
): { x: Tensor; state: MixerState | null } {
  let next: MixerState | null = null;
  if (p.seq) {
    const m = getMixer(layerKinds(c)[layer]).forward(c, p.seq, pre(c, x, p.seqNorm!), positions, state);
    x = add(x, post(c, m.out, p.seqPostNorm!));
    next = m.state;
  }
  if (fast) {
    if (!p.primeNorm || !p.primePostNorm) throw new Error(`block ${layer}: fast weights given to a block without a prime MLP`);
    x = add(x, post(c, swiglu(pre(c, x, p.primeNorm), fast), p.primePostNorm));
  }
  x = add(x, post(c, swiglu(pre(c, x, p.mlpNorm), p.mlp), p.mlpPostNorm));
  return { x, state: next };
}

/** Index of the first suffix (prime-MLP) block. */
export const suffixStart = (c: ModelConfig): number => c.nLayers - c.suffixLen;

/**
 * Runs blocks [from, to) over `x` at `positions`, with per-layer mixer states (null = start of the
 * document) and the suffix blocks' fast weights. Returns the output and the updated states.
 */
export function runBlocks(
  c: ModelConfig, params: Params, from: number, to: number, x: Tensor, positions: number[],
  states: (MixerState | null)[], fast: FastWeights,
): { x: Tensor; states: (MixerState | null)[] } {
  const s = suffixStart(c);
  const out: (MixerState | null)[] = [];
  for (let l = from; l < to; l++) {
    const r = block(c, l, params.blocks[l], x, positions, states[l - from] ?? null, l >= s ? fast[l - s] : undefined);
    x = r.x;
    out.push(r.state);
  }
  return { x, states: out };
}

export const range = (start: number, n: number): number[] => Array.from({ length: n }, (_, i) => start + i);
