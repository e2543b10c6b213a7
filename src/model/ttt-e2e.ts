/**
 * TTT-E2E (SPEC §2-4). The suffix blocks' prime MLPs are fast weights W. Reading a sequence in
 * mini-batches of b tokens, for i = 1..T/b:
 *   loss_i = CE(f(x_i; W_{i-1}))                       — reported before W learns from x_i
 *   g_i    = clip(∇_W loss_i(W_{i-1}), 1.0)
 *   W_i    = W_{i-1} − η · g_i
 * and the outer (training) loss is mean_i loss_i, differentiated through every inner step.
 */
import {
  type Tensor, addcmul, broadcastTo, checkpoint, concat, div, full, linearTokenNllSum, logSoftmax, maximum, mean, mul, phase, reshape, slice, sqrt, stack,
  stopGradient, sum, sumSquares, tensor, valueAndGrad,
} from '../engine/index.js';
import type { MlpWeights } from '../nn/layers.js';
import { fusedLoss, rmsNorm, tokenNll } from '../nn/layers.js';
import { type ModelConfig } from './config.js';
import type { MixerState } from './mixers/index.js';
import {
  type FastWeights, type Params, embed, outputLogits, range, runBlocks, suffixStart, widenLogits,
} from './transformer.js';

export interface InnerLoopOptions {
  /** Multiplier on the inner learning rate (the ilr warm-up of SPEC §3.4); default 1. */
  ilrScale?: number;
  /** Per-token loss mask [B, T] (float, 1 = counts). */
  mask?: Tensor;
  /** false: evaluate with W_0 throughout (no inner updates). Default true. */
  update?: boolean;
  /**
   * false: skip the SGD step on the last mini-batch. No loss or NLL depends on it (each mini-batch is scored
   * before its own step), only the final fast weights do, so the training objective and evaluation skip it:
   * one inner gradient fewer per sequence, and in training its recomputation in the backward pass too.
   * The result then has no `fast`. Default true.
   */
  finalUpdate?: boolean;
}

export interface InnerLoopResult {
  /** Per-token next-token NLL [B, T], each token scored before the update on its mini-batch. */
  tokenNll: Tensor;
  /** loss_i of each mini-batch (mean over its tokens and the batch). */
  losses: Tensor[];
  /** Final fast weights, one copy per sequence ([B, ...]); absent with `finalUpdate: false`. */
  fast?: FastWeights;
}

/** Mean over the time axis of nll [B, n] (masked), giving one loss per sequence [B]. */
function perSequenceLoss(nll: Tensor, mask?: Tensor): Tensor {
  if (!mask) return mean(nll, 1);
  return div(sum(mul(nll, mask), 1), maximum(sum(mask, 1), 1e-9));
}

/**
 * The inner step's factor −lr · clip(g) per sequence: its gradient scaled to global norm <= clip (over all
 * fast weights of that sequence), times −lr, as [batch, 1, 1] (or the scalar −lr without a clip). The update
 * W − lr·clip(g) is then one addcmul per fast weight: no scaled copy of the gradient.
 */
function stepFactor(g: FastWeights, clip: number, lr: number): Tensor | number {
  if (clip <= 0) return -lr;
  const sq = g.flatMap((m) => [m.w1, m.w2, m.w3].map((t) => sumSquares(t, [1, 2])));
  const norm = sqrt(sum(stack(sq), 0));
  return reshape(mul(div(clip, maximum(norm, clip)), -lr), [norm.shape[0], 1, 1]);
}

/** W_0 broadcast to one copy per sequence: every document starts from the meta-learned weights. */
export function perSequence(fast: MlpWeights[], batch: number): FastWeights {
  const b = (t: Tensor) => (t.rank === 3 ? t : broadcastTo(reshape(t, [1, ...t.shape]), [batch, ...t.shape]));
  return fast.map((m) => ({ w1: b(m.w1), w2: b(m.w2), w3: b(m.w3) }));
}

interface StepOut {
  loss: Tensor;
  nll: Tensor;
  fast: FastWeights;
  caches: (MixerState | null)[];
  /** With `wantLast`: log-probabilities [V] after the last position of the first sequence, under W_{i-1}. */
  last?: Tensor;
}

/**
 * One mini-batch of the inner loop: suffix forward on x_i (prefix output) with W_{i-1} and the window
 * caches, loss_i, then the SGD step on W. Pure in its tensor arguments so `checkpoint` can
 * recompute it in the backward pass.
 */
export function miniBatchStep(
  c: ModelConfig, params: Params, fast: FastWeights, caches: (MixerState | null)[], x: Tensor, targets: Tensor,
  positions: number[], lr: number, mask?: Tensor, update = true, wantLast = false,
): StepOut {
  const s = suffixStart(c);
  type Aux = { nll: Tensor; perSeq: Tensor; caches: (MixerState | null)[]; last?: Tensor };
  const lossOf = (w: FastWeights): [Tensor, Aux] => phase('forward', () => {
    const r = runBlocks(c, params, s, c.nLayers, x, positions, caches, w);
    const z = outputLogits(c, params, r.x);
    const nll = tokenNll(z, targets);
    const perSeq = perSequenceLoss(nll, mask);
    const [, n, V] = z.shape;
    const last = wantLast ? stopGradient(logSoftmax(reshape(widenLogits(params, slice(z, [0, n - 1, 0], [1, n, V])), [V]))) : undefined;
    // Summing over sequences keeps each sequence's gradient its own (W has a batch axis).
    return [sum(perSeq), { nll, perSeq, caches: r.states, last }];
  });
  if (!update || lr === 0) {
    const [, aux] = lossOf(fast);
    return { loss: mean(aux.perSeq), nll: aux.nll, fast, caches: aux.caches, last: aux.last };
  }
  const [[, aux], grads] = valueAndGrad(lossOf, { hasAux: true })(fast);
  let g = grads as FastWeights;
  let factor = stepFactor(g, c.innerClip, lr);
  if (c.firstOrder) [g, factor] = [stopGradient(g), typeof factor === 'number' ? factor : stopGradient(factor)];
  const next = fast.map((w, j) => ({ w1: addcmul(w.w1, g[j].w1, factor), w2: addcmul(w.w2, g[j].w2, factor), w3: addcmul(w.w3, g[j].w3, factor) }));
  return { loss: mean(aux.perSeq), nll: aux.nll, fast: next, caches: aux.caches, last: aux.last };
}

/**
 * The inner step that ends a mini-batch read a token at a time (a session's, or a decode plan's):
 * `tokens` at positions from `start`, whose suffix-entry states are x [1, n, D], with `next` the
 * token after them (the last target).
 */
export function learnMiniBatch(
  c: ModelConfig, params: Params, fast: FastWeights, caches: (MixerState | null)[], x: Tensor, tokens: number[], next: number, start: number, lr: number,
): StepOut {
  const targets = tensor([...tokens.slice(1), next], [1, tokens.length], 'int32');
  return miniBatchStep(c, params, fast, caches, x, targets, range(start, tokens.length), lr);
}

/**
 * The inner loop over a whole sequence (SPEC §3): prefix blocks once over all T tokens, then the
 * suffix mini-batch by mini-batch with fast-weight updates. Plain models (no suffix) take the same
 * path with nothing to update, so every variant reports per-token NLL the same way.
 */
export function innerLoop(
  c: ModelConfig, params: Params, tokens: Tensor, targets: Tensor, opts: InnerLoopOptions = {},
): InnerLoopResult {
  const [B, T] = tokens.shape;
  const b = c.miniBatch;
  const s = suffixStart(c);
  const prefix = phase('prefix', () => runBlocks(c, params, 0, s, embed(c, params, tokens), range(0, T), [], []));
  const chunks = range(0, Math.ceil(T / b)).map((i) => [i * b, Math.min(T, (i + 1) * b)] as const);
  const cut = (t: Tensor | undefined, lo: number, hi: number) => t && slice(t, [0, lo], [B, hi]);
  if (c.suffixLen === 0) {
    const nll = phase('output', () => outputNll(c, params, prefix.x, targets));
    const losses = chunks.map(([lo, hi]) => mean(perSequenceLoss(cut(nll, lo, hi)!, cut(opts.mask, lo, hi))));
    return { tokenNll: nll, losses, fast: [] };
  }
  const lr = c.innerLr * (opts.ilrScale ?? 1);
  const update = opts.update ?? true;
  // Checkpointed per mini-batch: the backward pass recomputes one mini-batch at a time, so memory
  // grows with b, not with T.
  const step = checkpoint((p: Params, w: FastWeights, kv: (MixerState | null)[], x: Tensor, y: Tensor, m: Tensor | undefined, lo: number, hi: number, learn: boolean) =>
    miniBatchStep(c, p, w, kv, x, y, range(lo, hi - lo), lr, m, learn));
  const finalUpdate = opts.finalUpdate ?? true;
  let fast = perSequence(params.fast, B);
  let caches: (MixerState | null)[] = [];
  const losses: Tensor[] = [];
  const nlls: Tensor[] = [];
  chunks.forEach(([lo, hi], i) => {
    const learn = update && (finalUpdate || i < chunks.length - 1);
    const r = phase('mini-batch', () => step(params, fast, caches, cut(prefix.x, lo, hi)!, cut(targets, lo, hi)!, cut(opts.mask, lo, hi), lo, hi, learn));
    losses.push(r.loss);
    nlls.push(r.nll);
    fast = r.fast;
    caches = r.caches;
  });
  return { tokenNll: concat(nlls, 1), losses, ...(finalUpdate ? { fast } : {}) };
}

/** Mean of the mini-batch losses: TTT-E2E's outer objective (meta-learning through the inner steps). */
export function e2eOuterLoss(c: ModelConfig, params: Params, tokens: Tensor, targets: Tensor, opts: InnerLoopOptions = {}): Tensor {
  const { losses } = innerLoop(c, params, tokens, targets, { finalUpdate: false, ...opts });
  return div(losses.reduce((a, l) => a.add(l)), losses.length);
}

/**
 * Plain next-token loss of the whole sequence with the fast weights frozen at W_0: the training
 * objective of full/SWA/hybrid models and of TTT-naive (which then runs the inner loop at test time).
 */
export function lmLoss(c: ModelConfig, params: Params, tokens: Tensor, targets: Tensor, mask?: Tensor): Tensor {
  const [B, T] = tokens.shape;
  const h = runBlocks(c, params, 0, c.nLayers, embed(c, params, tokens), range(0, T), [], params.fast).x;
  if (!fusedLoss(h) || !fusedOutputLoss) return mean(perSequenceLoss(outputNll(c, params, h, targets), mask));
  // the same mean of per-sequence means as per-token weights, for the output layer's loss that takes its own gradients
  const weights = mask ? div(mask, mul(maximum(sum(mask, 1, true), 1e-9), B)) : full([B, T], 1 / (B * T), h.dtype === 'float64' ? 'float64' : 'float32');
  return phase('output', () => linearTokenNllSum(rmsNorm(h, params.finalNorm, c.normEps), params.embed, targets, stopGradient(weights), outputRows));
}

/**
 * Whether the plain loss takes the output layer as one op with its gradients from the forward (`linearTokenNllSum`,
 * where the loss is fused: the GPU by default) rather than `outputNll`'s checkpointed pieces, which recompute the
 * logits in the backward. `TTT_FUSED_OUTPUT_LOSS=0` turns it off at start (A/B runs).
 */
let fusedOutputLoss = process.env.TTT_FUSED_OUTPUT_LOSS !== '0';

/** Sets whether the plain loss uses `linearTokenNllSum` where the loss is fused; returns the previous setting. */
export function setFusedOutputLoss(on: boolean): boolean {
  const before = fusedOutputLoss;
  fusedOutputLoss = on;
  return before;
}

/**
 * Positions (rows of all sequences together) whose logits one piece of `outputNll` holds at a time;
 * 0 = the whole batch at once. `TTT_OUTPUT_ROWS` sets it at start.
 */
let outputRows = process.env.TTT_OUTPUT_ROWS !== undefined ? Number(process.env.TTT_OUTPUT_ROWS) : 2048;

/**
 * Sets how many positions' logits the loss holds at a time (0: all; default 2048) and returns the
 * previous setting. Pieces trade time for memory: on an H100, the `125m` SWA step at T 8 K took 100 ms
 * at 11.4 GiB in pieces of 2048 and 85 ms at 19.3 GiB in one pass.
 */
export function setOutputRows(rows: number): number {
  if (!Number.isInteger(rows) || rows < 0) throw new Error(`setOutputRows: expected a whole number >= 0, got ${rows}`);
  const before = outputRows;
  outputRows = rows;
  return before;
}

/**
 * Per-token NLL [B, T] of the output layer over hidden states h [B, T, D], in pieces of about
 * `setOutputRows` positions, each checkpointed: the backward recomputes one piece's logits at a time.
 * At a 128256-token vocabulary the logits of 8192 positions, their float32 copy and their gradient
 * were 12 GB of a 19 GB training step; one extra output GEMM in the backward is the price.
 */
export function outputNll(c: ModelConfig, params: Params, h: Tensor, targets: Tensor): Tensor {
  const [B, T, D] = h.shape;
  const per = Math.max(1, Math.floor(outputRows / B));
  if (outputRows === 0 || T <= per) return tokenNll(outputLogits(c, params, h), targets);
  const piece = checkpoint((head: Pick<Params, 'embed' | 'finalNorm'>, hp: Tensor, tp: Tensor) => tokenNll(outputLogits(c, head as Params, hp), tp));
  const head = { embed: params.embed, finalNorm: params.finalNorm };
  const nlls: Tensor[] = [];
  for (let lo = 0; lo < T; lo += per) {
    const hi = Math.min(T, lo + per);
    nlls.push(piece(head, slice(h, [0, lo, 0], [B, hi, D]), slice(targets, [0, lo], [B, hi])));
  }
  return concat(nlls, 1);
}

/** The training objective of a variant: meta-learning for e2e, plain LM loss for the others. */
export function outerLoss(c: ModelConfig, params: Params, tokens: Tensor, targets: Tensor, opts: InnerLoopOptions = {}): Tensor {
  return c.variant === 'e2e' ? e2eOuterLoss(c, params, tokens, targets, opts) : lmLoss(c, params, tokens, targets, opts.mask);
}
