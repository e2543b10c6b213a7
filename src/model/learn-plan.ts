/**
 * Prefill's inner steps through a launch plan (src/engine/launch-plan.ts). Reading a long context,
 * TTT-E2E takes one inner step per mini-batch of b tokens: the suffix blocks' forward, the gradient
 * of the mini-batch loss with respect to the fast weights, and the update (`miniBatchStep`). Each is a
 * few hundred kernels behind the engine's host logic (the tape, the backward), the same every time
 * once the window is full: then the step is recorded once and replayed per mini-batch.
 *
 * What changes between mini-batches lives on the device: the mini-batch's suffix-entry states, its
 * targets and its first position (written before each replay), RoPE rows gathered at that position,
 * and the state the step carries: fast weights and the window caches of the suffix layers (k − 1 rows
 * each), which the step itself overwrites with their next values. Attention only sees positions
 * relative to one another, and with full windows those offsets are the same at every mini-batch.
 */
import {
  type LaunchPlan, type Tensor, add, arange, copyInto, full, gather, keep, kvRows, launchPlan, leaves, reshape, slice, tidy, writeHost,
} from '../engine/index.js';
import { statDType } from '../engine/dtype.js';
import { ropeTablesUpTo } from '../nn/layers.js';
import { type ModelConfig, headDim, layerKinds } from './config.js';
import type { KvCache } from './mixers/attention.js';
import type { MixerState } from './mixers/index.js';
import { miniBatchStep } from './ttt-e2e.js';
import { type FastWeights, type Params, logitsDType, range, suffixStart } from './transformer.js';

/** The part of a session's state a learn plan takes over. */
export interface LearnState {
  position: number;
  chunkStart: number;
  caches: (MixerState | null)[];
  fast: FastWeights;
  nextLogProbs: Tensor | null;
}

/** Whether the next whole mini-batch of `state` can go through a learn plan: full windows in every suffix layer. */
export function learnPlanFits(c: ModelConfig, state: LearnState): boolean {
  const kinds = layerKinds(c);
  const ss = suffixStart(c);
  if (c.suffixLen === 0 || state.position !== state.chunkStart) return false;
  return range(ss, c.suffixLen).every((l) => {
    const cache = state.caches[l] as KvCache | null;
    return kinds[l] === 'swa' && cache !== null && (cache.count ?? cache.k.shape[2]) === c.window - 1;
  });
}

export class LearnPlan {
  position: number;
  private readonly x: Tensor;
  private readonly targets: Tensor;
  private readonly at: Tensor;
  private readonly offsets: Tensor;
  private readonly rope: { cos: Tensor; sin: Tensor };
  private readonly caches: { k: Tensor; v: Tensor }[];
  private readonly fast: FastWeights;
  private readonly nll: Tensor | null;
  private readonly last: Tensor;
  private plan: LaunchPlan | null = null;

  /** A plan continuing from `state` (which must fit), for a context of up to `capacity` positions. */
  constructor(
    private readonly c: ModelConfig, private readonly params: Params, private readonly lr: number, state: LearnState, private readonly score: boolean,
    capacity: number,
  ) {
    if (!learnPlanFits(c, state)) throw new Error('learn plan: the state does not fit (TTT suffix of sliding windows, full windows, at a mini-batch start)');
    this.position = state.position;
    const ss = suffixStart(c);
    const dtype = c.computeDType ?? params.embed.dtype;
    const b = c.miniBatch;
    const made = tidy(() => ({
      x: full([1, b, c.dModel], 0, dtype),
      targets: full([1, b], 0, 'int32'),
      at: full([1], 0, 'int32'),
      offsets: arange(0, b, 1, 'int32'),
      rope: ropeTablesUpTo(capacity, headDim(c), c.ropeTheta, dtype),
      // own copies: the plan writes its state in place
      caches: range(ss, c.suffixLen).map((l) => {
        const rows = kvRows(state.caches[l] as KvCache);
        return { k: copyOf(rows.k), v: copyOf(rows.v) };
      }),
      fast: state.fast.map((w) => ({ w1: copyOf(w.w1), w2: copyOf(w.w2), w3: copyOf(w.w3) })),
      nll: this.score ? full([1, b], 0, statDType(dtype)) : null,
      last: state.nextLogProbs ? copyOf(state.nextLogProbs) : full([c.vocabSize], 0, logitsDType(c, params)),
    }));
    for (const t of leaves(made as unknown)) keep(t);
    ({ x: this.x, targets: this.targets, at: this.at, offsets: this.offsets, rope: this.rope, caches: this.caches, fast: this.fast, nll: this.nll, last: this.last } = made);
  }

  /** Log-probabilities of the next token after the last mini-batch read. */
  get lastLogProbs(): Tensor {
    return this.last;
  }

  /**
   * Reads one whole mini-batch: `tokens` (b of them, starting at the plan's position) whose suffix-entry
   * states are rows [from, from + b) of `x`, followed by `nextToken`; learns from it. Returns the
   * tokens' NLLs (under the weights before the step) when the plan scores, else nothing.
   */
  read(tokens: number[], x: Tensor, from: number, nextToken: number): Float32Array | Float64Array | null {
    const c = this.c;
    const b = c.miniBatch;
    if (tokens.length !== b) throw new Error(`learn plan: reads whole mini-batches of ${b} tokens, got ${tokens.length}`);
    tidy(() => copyInto(this.x, slice(x, [0, from, 0], [1, from + b, c.dModel])));
    writeHost(this.targets, [...tokens.slice(1), nextToken]);
    writeHost(this.at, [this.position]);
    if (this.plan) this.plan.replay();
    else this.plan = launchPlan(() => this.step(this.position)); // runs the step once, then records it
    this.position += b;
    return this.nll ? (this.nll.toTyped() as Float32Array | Float64Array) : null;
  }

  /** The recorded step; `position` (the first run's) only fixes offsets that every replay shares. */
  private step(position: number): void {
    const c = this.c;
    const b = c.miniBatch;
    const half = headDim(c) / 2;
    const rows = add(this.at, this.offsets);
    const table = (t: Tensor) => reshape(gather(reshape(t, [t.size / half, half]), rows, 0), [b * half]);
    const [cos, sin] = [table(this.rope.cos), table(this.rope.sin)];
    const k1 = c.window - 1;
    const caches: KvCache[] = this.caches.map((w) => ({ k: w.k, v: w.v, first: 0, count: k1, start: position - k1, ropeCos: cos, ropeSin: sin }));
    const r = miniBatchStep(c, this.params, this.fast, caches, this.x, this.targets, range(position, b), this.lr, undefined, true, true);
    r.fast.forEach((w, j) => {
      copyInto(this.fast[j].w1, w.w1);
      copyInto(this.fast[j].w2, w.w2);
      copyInto(this.fast[j].w3, w.w3);
    });
    r.caches.forEach((s, j) => {
      const next = kvRows(s as KvCache);
      copyInto(this.caches[j].k, next.k);
      copyInto(this.caches[j].v, next.v);
    });
    if (this.nll) copyInto(this.nll, r.nll);
    copyInto(this.last, r.last!);
  }

  /**
   * The state the plan leaves (its caches and fast weights as new tensors, which the session owns),
   * and frees the plan.
   */
  finish(): { position: number; suffixCaches: KvCache[]; fast: FastWeights; nextLogProbs: Tensor } {
    const start = this.position - (this.c.window - 1);
    const suffixCaches = this.caches.map((w) => ({ k: w.k, v: w.v, first: 0, count: this.c.window - 1, start }));
    this.plan?.dispose();
    for (const t of [this.x, this.targets, this.at, this.offsets, this.rope.cos, this.rope.sin, this.nll]) t?.dispose();
    return { position: this.position, suffixCaches, fast: this.fast, nextLogProbs: this.last };
  }
}

function copyOf(t: Tensor): Tensor {
  const out = full(t.shape, 0, t.dtype);
  copyInto(out, t);
  return out;
}

