/**
 * Packing shards into model inputs.
 *
 * Training (`Sampler`): think of a split as the cyclic stream BOS d0 BOS d1 BOS d2 ... (documents in shard order).
 * A sequence is seqLen+1 consecutive stream tokens from a start point: inputs are the first seqLen, targets the last
 * seqLen (shifted by one). Start points are the documents' BOS positions (and, with `starts: 'chunks'`, every
 * seqLen tokens inside long documents, so their later parts are trained on too). With `pack: 'concat'` (default) a
 * document shorter than the sequence is followed by the next ones, BOS-separated, and every target is scored (so the
 * model also learns to predict a document's end); with `pack: 'pad'` the sequence stops at the document's end,
 * the rest is BOS padding, and the mask is 0 on every target that is padding.
 * The order of start points is a seeded permutation per epoch, so sequence number i is a pure function of
 * (data, options, seed, i): `state()` is just that number, and `restore` resumes bit-exactly.
 *
 * Evaluation (`evalDocuments`): whole documents, BOS-prefixed, optionally cut to a context length (then only the
 * documents at least that long), for loss by token index.
 */
import { hash32, permutation } from './rng.js';
import type { ShardSplit, Shards, Split } from './shards.js';

export interface SamplerOptions {
  /** Tokens per sequence seen by the model (each sequence reads seqLen + 1 stream tokens). */
  seqLen: number;
  seed?: number;
  pack?: 'concat' | 'pad';
  starts?: 'documents' | 'chunks';
}

export interface SamplerState {
  version: 1;
  /** Sequences consumed so far. */
  position: number;
  seed: number;
  seqLen: number;
  pack: 'concat' | 'pad';
  starts: 'documents' | 'chunks';
  /** Fingerprint of the data the position refers to. */
  numStarts: number;
  streamLength: number;
}

export interface Batch {
  batchSize: number;
  seqLen: number;
  /** [batchSize * seqLen], row-major. */
  tokens: Int32Array;
  /** tokens shifted by one: targets[b, t] is the stream token after tokens[b, t]. */
  targets: Int32Array;
  /** 1 where the target is scored. */
  mask: Float32Array;
}

function upperBound(xs: Float64Array, x: number): number {
  let lo = 0;
  let hi = xs.length;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if (xs[mid] <= x) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

export class Sampler {
  readonly seqLen: number;
  readonly seed: number;
  readonly pack: 'concat' | 'pad';
  readonly startsMode: 'documents' | 'chunks';
  /** Stream position of each document's BOS; documents of length 0 are left out of the stream. */
  private readonly docBos: Float64Array;
  private readonly docStart: Float64Array;
  private readonly docLength: Float64Array;
  private readonly startPoints: Float64Array;
  readonly streamLength: number;
  private position = 0;
  private cachedEpoch = -1;
  private cachedPerm: Uint32Array = new Uint32Array(0);

  constructor(
    private readonly split: ShardSplit,
    readonly bos: number,
    opts: SamplerOptions,
  ) {
    if (!(Number.isInteger(opts.seqLen) && opts.seqLen >= 1)) throw new Error(`sampler: seqLen must be a positive integer, got ${opts.seqLen}`);
    this.seqLen = opts.seqLen;
    this.seed = opts.seed ?? 0;
    this.pack = opts.pack ?? 'concat';
    this.startsMode = opts.starts ?? 'documents';
    const docs = split.documents.filter((d) => d.length > 0);
    if (docs.length === 0) throw new Error(`sampler: split ${split.split} has no tokens`);
    this.docBos = new Float64Array(docs.length);
    this.docStart = new Float64Array(docs.length);
    this.docLength = new Float64Array(docs.length);
    const starts: number[] = [];
    let p = 0;
    docs.forEach((d, i) => {
      this.docBos[i] = p;
      this.docStart[i] = d.start;
      this.docLength[i] = d.length;
      starts.push(p);
      if (this.startsMode === 'chunks') for (let s = p + this.seqLen; s < p + d.length; s += this.seqLen) starts.push(s);
      p += d.length + 1;
    });
    this.streamLength = p;
    this.startPoints = Float64Array.from(starts);
  }

  /** Number of start points: sequences per epoch. */
  get epochLength(): number {
    return this.startPoints.length;
  }

  private startOf(index: number): number {
    const n = this.startPoints.length;
    const epoch = Math.floor(index / n);
    if (epoch !== this.cachedEpoch) {
      this.cachedPerm = permutation(n, hash32('sampler', this.seed, epoch));
      this.cachedEpoch = epoch;
    }
    return this.startPoints[this.cachedPerm[index - epoch * n]];
  }

  /** Writes sequence number `index` into row `row` of the arrays (each of length >= (row+1) * seqLen). */
  fillSequence(index: number, tokens: Int32Array, targets: Int32Array, mask: Float32Array, row = 0): void {
    const T = this.seqLen;
    const base = row * T;
    const data = this.split.tokens;
    let pos = this.startOf(index);
    let doc = upperBound(this.docBos, pos) - 1;
    let real = T + 1; // stream tokens before padding starts (pad mode)
    for (let j = 0; j <= T; j++) {
      let tok: number;
      if (j >= real) tok = this.bos;
      else {
        const off = pos - this.docBos[doc];
        tok = off === 0 ? this.bos : data[this.docStart[doc] + off - 1];
        pos++;
        if (off === this.docLength[doc]) {
          if (this.pack === 'pad') real = j + 1;
          doc++;
          if (doc === this.docBos.length) {
            doc = 0;
            pos = 0;
          }
        }
      }
      if (j < T) tokens[base + j] = tok;
      if (j > 0) {
        targets[base + j - 1] = tok;
        mask[base + j - 1] = j < real ? 1 : 0;
      }
    }
  }

  next(batchSize: number): Batch {
    const T = this.seqLen;
    const tokens = new Int32Array(batchSize * T);
    const targets = new Int32Array(batchSize * T);
    const mask = new Float32Array(batchSize * T);
    for (let b = 0; b < batchSize; b++) this.fillSequence(this.position++, tokens, targets, mask, b);
    return { batchSize, seqLen: T, tokens, targets, mask };
  }

  state(): SamplerState {
    return {
      version: 1,
      position: this.position,
      seed: this.seed,
      seqLen: this.seqLen,
      pack: this.pack,
      starts: this.startsMode,
      numStarts: this.startPoints.length,
      streamLength: this.streamLength,
    };
  }

  /** Resumes from a saved state; throws if the state was saved with other options or other data. */
  restore(state: SamplerState): void {
    const mine = this.state();
    for (const k of ['version', 'seed', 'seqLen', 'pack', 'starts', 'numStarts', 'streamLength'] as const) {
      if (state[k] !== mine[k]) throw new Error(`sampler: cannot restore a state saved with ${k}=${state[k]} into a sampler with ${k}=${mine[k]}`);
    }
    if (!(Number.isInteger(state.position) && state.position >= 0)) throw new Error(`sampler: bad position ${state.position}`);
    this.position = state.position;
  }
}

/** A training sampler over one split of loaded shards. */
export function makeSampler(shards: Shards, split: Split, opts: SamplerOptions): Sampler {
  return new Sampler(shards.splits[split], shards.manifest.tokenizer.bos, opts);
}

export interface EvalDocument {
  id: string;
  title: string;
  /** Index of the document in its split. */
  index: number;
  /** [BOS, d0, ..., d(n-2)]: n = contextLen, or the document's length when no contextLen is given. */
  inputs: Int32Array;
  /** [d0, ..., d(n-1)]: targets[i] is the document's token i, so loss by index i is loss at document position i. */
  targets: Int32Array;
  /** 1 where the target is a synthetic fact (predictable from earlier context); only when the shards have masks. */
  factMask?: Float32Array;
}

export interface EvalOptions {
  /** Cut documents to this many tokens and skip the shorter ones. */
  contextLen?: number;
  maxDocuments?: number;
}

/** Whole documents of a split, in shard order, for loss-by-token-index evaluation. */
export function* evalDocuments(split: ShardSplit, bos: number, opts: EvalOptions = {}): Generator<EvalDocument> {
  let yielded = 0;
  for (let i = 0; i < split.documents.length; i++) {
    if (opts.maxDocuments !== undefined && yielded >= opts.maxDocuments) return;
    const d = split.documents[i];
    const n = opts.contextLen ?? d.length;
    if (n < 1 || d.length < n) continue;
    const inputs = new Int32Array(n);
    const targets = new Int32Array(n);
    inputs[0] = bos;
    for (let k = 0; k < n; k++) {
      const t = split.tokens[d.start + k];
      targets[k] = t;
      if (k + 1 < n) inputs[k + 1] = t;
    }
    const doc: EvalDocument = { id: d.id, title: d.title, index: i, inputs, targets };
    if (split.factMask) doc.factMask = Float32Array.from(split.factMask.subarray(d.start, d.start + n));
    yielded++;
    yield doc;
  }
}

/** Number of documents `evalDocuments` would yield with this context length. */
export function countEvalDocuments(split: ShardSplit, contextLen?: number): number {
  return split.documents.filter((d) => d.length >= Math.max(1, contextLen ?? 1)).length;
}
