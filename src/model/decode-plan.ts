/**
 * Decoding through a launch plan (src/engine/launch-plan.ts): the step that reads one token (every
 * block, the output layer and the log-softmax) is recorded once and replayed per token, so a token
 * costs one graph launch instead of a few hundred kernel launches behind the engine's host logic.
 *
 * What a replay cannot take from the host lives on the device: the token and its position (written
 * before each replay), KV caches as rings written at that position (mixers/attention.ts `KvRing`),
 * RoPE rows gathered at it, and, for TTT models, the suffix-entry states of the current mini-batch
 * (row = position mod b) and the fast weights. The inner step that ends each mini-batch runs as usual
 * between replays and writes the new fast weights into the plan's copies in place.
 *
 * Rings are sized so that nothing a later step or the inner step needs is overwritten: a window of k
 * keeps k + b rows (the inner step re-reads the mini-batch from the caches as they were at its start,
 * k − 1 positions before it), full attention every position the plan reaches.
 */
import {
  type LaunchPlan, type Tensor, arange, cast, copyInto, equal, full, keep, launchPlan, leaves, logSoftmax, max, min, reshape, slice, tensor, tidy, where,
  writeHost, writeRowsAt,
} from '../engine/index.js';
import { ropeRowsAt, ropeTablesUpTo } from '../nn/layers.js';
import { type ModelConfig, headDim, layerKinds } from './config.js';
import { type KvCache, type KvRing, kvRing, ringRows } from './mixers/attention.js';
import type { SessionState } from './session.js';
import { learnMiniBatch } from './ttt-e2e.js';
import { type FastWeights, type Params, embed, logits, logitsDType, range, runBlocks, suffixStart } from './transformer.js';

/** Whether a model decodes through a plan: attention layers only (the baselines' recurrent mixers do not). */
export function planSupports(c: ModelConfig): boolean {
  return !c.attentionFree && layerKinds(c).every((k) => k === 'full' || k === 'swa');
}

export class DecodePlan {
  position: number;
  private chunkStart: number;
  private pendingTokens: number[];
  /** First position each layer's ring holds (later ones drop out only for windows). */
  private readonly earliest: number[];
  private readonly token: Tensor;
  private readonly at: Tensor;
  /** RoPE tables of every position the plan reaches, and their rows at the current position (set by each step). */
  private readonly rope: { cos: Tensor; sin: Tensor };
  private readonly ropeRows: { cos: Tensor; sin: Tensor };
  private readonly keyPositions: Tensor[];
  private readonly rings: KvRing[];
  private readonly pending: Tensor | null;
  private readonly fast: FastWeights;
  private readonly out: Tensor;
  /** 0 .. V-1 (float32), and the step's greedy pick. */
  private readonly indices: Tensor;
  private readonly greedy: Tensor;
  private plan: LaunchPlan | null = null;
  private finished = false;

  /** A plan continuing from `state` that can read up to `tokens` more tokens. */
  constructor(
    private readonly c: ModelConfig, private readonly params: Params, private readonly lr: number, state: SessionState, tokens: number,
  ) {
    const dtype = c.computeDType ?? params.embed.dtype;
    const kinds = layerKinds(c);
    const ttt = c.suffixLen > 0;
    const capacity = state.position + tokens;
    this.position = state.position;
    this.chunkStart = state.chunkStart;
    this.pendingTokens = [...state.pendingTokens];
    const ss = suffixStart(c);
    // a suffix layer's ring also holds the caches as they were at the mini-batch's start (the inner
    // step reads those; the window may have slid past them since)
    const sources = kinds.map((_, l) => [...(ttt && l >= ss ? [state.chunkCaches[l - ss]] : []), state.caches[l]] as (KvCache | null)[]);
    this.earliest = sources.map((list) => Math.min(state.position, ...list.map((s) => s?.start ?? Infinity)));
    const made = tidy(() => {
      const token = full([1, 1], 0, 'int32');
      const at = full([1], 0, 'int32');
      const rope = ropeTablesUpTo(Math.max(capacity, 1), headDim(c), c.ropeTheta, dtype);
      const ropeRows = { cos: full([headDim(c) / 2], 0, dtype), sin: full([headDim(c) / 2], 0, dtype) };
      const keyPositions = new Map<string, Tensor>();
      const rings = kinds.map((kind, l) => {
        const suffix = l >= ss;
        const rows = kind === 'full' ? capacity : c.window + (ttt && suffix ? c.miniBatch : 0);
        return kvRing(c, kind, sources[l], rows, dtype, { position: at, rope: ropeRows, keyPositions });
      });
      let pending: Tensor | null = null;
      if (ttt) {
        pending = full([1, c.miniBatch, c.dModel], 0, dtype);
        if (state.pendingX) writeRowsAt(pending, state.pendingX, tensor([state.chunkStart], [1], 'int32'));
      }
      // own copies: the state's fast weights may be views of W_0, and the plan writes in place
      const fast = state.fast.map((w) => ({ w1: copyOf(w.w1), w2: copyOf(w.w2), w3: copyOf(w.w3) }));
      const out = full([c.vocabSize], 0, logitsDType(c, params));
      const indices = arange(0, c.vocabSize, 1, 'float32'); // exact: vocabularies stay far below 2^24
      const greedy = full([1], 0, 'int32');
      return { token, at, indices, greedy, rope, ropeRows, keyPositions: [...keyPositions.values()], rings, pending, fast, out };
    });
    for (const t of leaves(made as unknown)) keep(t);
    ({ token: this.token, at: this.at, indices: this.indices, greedy: this.greedy, rope: this.rope, ropeRows: this.ropeRows, keyPositions: this.keyPositions, rings: this.rings, pending: this.pending, fast: this.fast, out: this.out } = made);
  }

  /** The log-probabilities of the next token, after the last `read` (a copy of 128 K values on the host at 125m). */
  logProbs(): Float32Array | Float64Array {
    return this.out.toTyped() as Float32Array | Float64Array;
  }

  /** The most likely next token after the last `read` (the step computes it: one number comes back). */
  greedyToken(): number {
    return this.greedy.toTyped()[0];
  }

  /**
   * Reads `token` at the current position: first the inner step if a mini-batch is complete (its last
   * target is this token), then the recorded step.
   */
  read(token: number): void {
    if (this.finished) throw new Error('decode plan: read after finish()');
    const c = this.c;
    if (!Number.isInteger(token) || token < 0 || token >= c.vocabSize) throw new Error(`decode: token ${token} outside the vocabulary [0, ${c.vocabSize})`);
    if (c.suffixLen > 0 && this.position === this.chunkStart + c.miniBatch) this.learn(token);
    writeHost(this.token, [token]);
    writeHost(this.at, [this.position]);
    if (this.plan) this.plan.replay();
    else this.plan = launchPlan(() => this.step()); // runs the step once, then records it
    this.position++;
    if (c.suffixLen > 0) this.pendingTokens.push(token);
  }

  /** The recorded step: one token through every block and the output layer. */
  private step(): void {
    const c = this.c;
    const ss = suffixStart(c);
    const rows = ropeRowsAt(this.rope, this.at, headDim(c));
    copyInto(this.ropeRows.cos, rows.cos);
    copyInto(this.ropeRows.sin, rows.sin);
    const x = embed(c, this.params, this.token);
    const prefix = runBlocks(c, this.params, 0, ss, x, [0], this.rings.slice(0, ss), []);
    if (this.pending) writeRowsAt(this.pending, prefix.x, this.at);
    const h = runBlocks(c, this.params, ss, c.nLayers, prefix.x, [0], this.rings.slice(ss), this.fast).x;
    const logProbs = logSoftmax(reshape(logits(c, this.params, h), [c.vocabSize]));
    copyInto(this.out, logProbs);
    // the greedy pick, as `sample` makes it on the host: the first index of the maximum
    const best = min(where(equal(logProbs, max(logProbs)), this.indices, c.vocabSize));
    copyInto(this.greedy, reshape(cast(best, 'int32'), [1]));
  }

  /** The inner step on the completed mini-batch, as the session's `learn` takes it; new fast weights in place. */
  private learn(nextToken: number): void {
    const c = this.c;
    const ss = suffixStart(c);
    tidy(() => {
      const caches = range(ss, c.suffixLen).map((l) => this.cacheOf(l, this.chunkStart));
      const r = learnMiniBatch(c, this.params, this.fast, caches, this.pending!, this.pendingTokens, nextToken, this.chunkStart, this.lr);
      r.fast.forEach((w, j) => {
        copyInto(this.fast[j].w1, w.w1);
        copyInto(this.fast[j].w2, w.w2);
        copyInto(this.fast[j].w3, w.w3);
      });
    });
    this.chunkStart = this.position;
    this.pendingTokens = [];
  }

  /** Layer l's ordinary cache as it was when `upTo` positions had been read (what the generic path carries). */
  private cacheOf(l: number, upTo: number): KvCache | null {
    const window = layerKinds(this.c)[l] === 'swa' ? this.c.window : undefined;
    const from = window === undefined ? this.earliest[l] : Math.max(this.earliest[l], upTo - (window - 1));
    return ringRows(this.rings[l], from, upTo);
  }

  /** The session state the plan leaves (ordinary caches again), and frees everything else the plan holds. */
  finish(): Omit<SessionState, 'nextLogProbs'> & { nextLogProbs: Tensor } {
    if (this.finished) throw new Error('decode plan: finish() called twice');
    this.finished = true;
    const c = this.c;
    const ss = suffixStart(c);
    const ttt = c.suffixLen > 0;
    const state = tidy(() => ({
      caches: range(0, c.nLayers).map((l) => this.cacheOf(l, this.position)),
      chunkCaches: ttt ? range(ss, c.suffixLen).map((l) => this.cacheOf(l, this.chunkStart)) : [],
      pendingX: this.pending && this.position > this.chunkStart ? slice(this.pending, [0, 0, 0], [1, this.position - this.chunkStart, c.dModel]) : null,
    }));
    this.plan?.dispose();
    const owned = [this.token, this.at, this.indices, this.greedy, this.rope.cos, this.rope.sin, this.ropeRows.cos, this.ropeRows.sin, ...this.keyPositions, ...this.rings.flatMap((r) => [r.k, r.v])];
    for (const t of owned) t.dispose();
    if (state.pendingX !== this.pending) this.pending?.dispose(); // (a whole mini-batch's slice is the buffer itself)
    return {
      ...state, position: this.position, chunkStart: this.chunkStart, pendingTokens: this.pendingTokens, fast: this.fast, nextLogProbs: this.out,
    };
  }
}

function copyOf(t: Tensor): Tensor {
  const out = full(t.shape, 0, t.dtype);
  copyInto(out, t);
  return out;
}
