/**
 * Inference: a Session reads a document like an RNN. Tokens flow through every block with per-layer
 * KV caches (the last k-1 positions for SWA layers, everything for full attention); each time a
 * mini-batch of b positions is complete (and the token after it is known, so its loss is defined),
 * the fast weights take one inner step on it (SPEC §3). Decoding uses the same path, so generated
 * tokens update the fast weights every b tokens too.
 */
import { createHash } from 'node:crypto';
import {
  type Key, reservingKv, Tensor, concat, foldIn, keep, leaves, logSoftmax, randomKey, reshape, slice, sub, tensor, tidy,
  threefry2x32, add,
} from '../engine/index.js';
import { readSafetensors, writeSafetensors, type StoredTensor } from '../io/safetensors.js';
import { type ModelConfig, layerKinds } from './config.js';
import { learnMiniBatch, miniBatchStep, perSequence } from './ttt-e2e.js';
import { type FastWeights, type Params, embed, logits, range, runBlocks, suffixStart } from './transformer.js';
import { type MixerState, getMixer } from './mixers/index.js';
import { namedLeaves } from './reference.js';
import { DecodePlan, planSupports } from './decode-plan.js';

export interface SamplingOptions {
  /** 0 (default) = greedy. */
  temperature?: number;
  topK?: number;
  topP?: number;
  seed?: number;
}

/** Everything a session carries between calls (a decode plan takes it over while it runs). */
export interface SessionState {
  /** Positions read so far. */
  position: number;
  /** Per-layer mixer states: KV caches for attention, recurrent states for the baselines (null before the first token). */
  caches: (MixerState | null)[];
  /** Current fast weights (batch axis of 1). */
  fast: FastWeights;
  /** First position of the mini-batch not yet learned from. */
  chunkStart: number;
  /** Suffix-entry hidden states [1, n, D] and tokens of positions [chunkStart, position). */
  pendingX: Tensor | null;
  pendingTokens: number[];
  /** Suffix caches as they were at chunkStart (the inner step recomputes the mini-batch from them). */
  chunkCaches: (MixerState | null)[];
  /** Log-probabilities of the next token, from the last position read [V]. */
  nextLogProbs: Tensor | null;
}

/** A stable fingerprint of a model: config and every parameter value. */
export function modelHash(c: ModelConfig, params: Params): string {
  const h = createHash('sha256');
  h.update(JSON.stringify(c));
  for (const [name, t] of namedLeaves(params)) {
    h.update(name);
    const d = t.toTyped();
    h.update(new Uint8Array(d.buffer, d.byteOffset, d.byteLength));
  }
  return h.digest('hex').slice(0, 32);
}

/** Most tokens one forward pass of a prefill reads (bounds activation and logit memory). */
const MAX_GROUP = 2048;
/**
 * The same without scores (logits for the last position only): bigger groups fill a large GPU (an
 * attention launch over 2048 queries of 12 heads had 192 blocks for 132 SMs).
 */
const MAX_UNSCORED_GROUP = 16384;
/** Rows a prompt's full-attention caches get beyond it, so that the first decoded tokens do not reallocate them (and the shortest prompt that reserves). */
const RESERVE_SLACK = 1024;
/**
 * The fewest tokens a `decode` call generates through a launch plan: building one copies the caches
 * into rings and records a step, worth it only over several tokens.
 */
const PLAN_MIN_TOKENS = 8;

export class Session {
  private state: SessionState;
  private readonly lr: number;
  private hashCache: string | null = null;

  /**
   * Whether `decode` goes through a launch plan (src/model/decode-plan.ts: one recorded step per token)
   * where the model allows it; false reads each token like a prefill. Default true (TTT_LAUNCH_PLANS=0
   * turns it off); the same tokens and state either way.
   */
  launchPlans: boolean;

  constructor(readonly config: ModelConfig, readonly params: Params, opts: { ilrScale?: number; launchPlans?: boolean } = {}) {
    this.lr = config.innerLr * (opts.ilrScale ?? 1);
    this.launchPlans = opts.launchPlans ?? process.env.TTT_LAUNCH_PLANS !== '0';
    this.state = this.initialState();
  }

  private initialState(): SessionState {
    return {
      position: 0,
      caches: Array(this.config.nLayers).fill(null),
      fast: keepTree(tidy(() => perSequence(this.params.fast, 1))),
      chunkStart: 0,
      pendingX: null,
      pendingTokens: [],
      chunkCaches: Array(this.config.suffixLen).fill(null),
      nextLogProbs: null,
    };
  }

  /** Number of tokens read (prompt and generated). */
  get tokensRead(): number {
    return this.state.position;
  }

  get hash(): string {
    return (this.hashCache ??= modelHash(this.config, this.params));
  }

  /** Frees the session's device memory (caches, fast weights, pending states); it cannot be used afterwards. */
  dispose(): void {
    const empty = { ...this.state, caches: [], fast: [], pendingX: null, chunkCaches: [], nextLogProbs: null };
    releaseState(this.state, empty);
    this.state = empty;
    this.disposed = true;
  }
  private disposed = false;
  private checkLive(op: string): void {
    if (this.disposed) throw new Error(`${op}: the session was disposed`);
  }

  /** Forget the document: fast weights back to W_0, caches emptied. */
  reset(): void {
    this.checkLive('reset');
    const old = this.state;
    this.state = this.initialState();
    releaseState(old, this.state);
  }

  /**
   * Reads tokens. Returns the NLL of each token given everything before it (NaN for the first token
   * of the document, which has no context). With `score: false` only the distribution after the
   * last token is computed (no logits for the others) and the result is empty: the fast way to read
   * a long prompt. Long inputs go through in groups of at most MAX_GROUP tokens (MAX_UNSCORED_GROUP
   * without scores), so memory stays bounded whatever the length. The blocks before the TTT suffix
   * never change, so they read a whole group at once; the suffix reads it a mini-batch at a time,
   * taking an inner step at each mini-batch's end.
   */
  prefill(tokens: readonly number[], opts: { score?: boolean } = {}): number[] {
    this.checkLive('prefill');
    const score = opts.score ?? true;
    for (const t of tokens) {
      if (!Number.isInteger(t) || t < 0 || t >= this.config.vocabSize) throw new Error(`prefill: token ${t} outside the vocabulary [0, ${this.config.vocabSize})`);
    }
    // a prompt's full-attention caches are allocated for all of it (and some decoded tokens) at once;
    // reading a few tokens at a time keeps doubling them
    if (tokens.length < RESERVE_SLACK) return this.prefillGroups(tokens, score);
    return reservingKv(this.state.position + tokens.length + RESERVE_SLACK, () => this.prefillGroups(tokens, score));
  }

  private prefillGroups(tokens: readonly number[], score: boolean): number[] {
    const nll: number[] = [];
    const groupSize = score ? MAX_GROUP : MAX_UNSCORED_GROUP;
    const b = this.config.miniBatch;
    const ttt = this.config.suffixLen > 0;
    for (let g = 0; g < tokens.length; g += groupSize) {
      const group = tokens.slice(g, g + groupSize);
      const x = this.readPrefix(group);
      let i = 0;
      while (i < group.length) {
        const s = this.state;
        if (ttt && s.position === s.chunkStart + b) this.learn(group[i]);
        // the suffix reads up to the end of the current mini-batch in one forward pass
        const room = ttt ? this.state.chunkStart + b - this.state.position : group.length;
        const n = Math.max(1, Math.min(room, group.length - i));
        const next = g + i + n; // the token after these (maybe in the next group)
        const whole = ttt && n === b && this.state.position === this.state.chunkStart && next < tokens.length;
        const chunk = group.slice(i, i + n);
        // a whole mini-batch whose next token is known: one pass reads it and takes the inner step
        nll.push(...(whole ? this.readAndLearn(chunk, x, i, tokens[next], score) : this.readSuffix(chunk, x, i, score)));
        i += n;
      }
      if (this.state.pendingX !== x) x.dispose();
    }
    return nll;
  }

  /** The distribution over the next token, as log-probabilities (after at least one token). */
  nextLogProbs(): number[] {
    if (!this.state.nextLogProbs) throw new Error('nextLogProbs: the session has not read any token yet');
    return this.state.nextLogProbs.toArray();
  }

  /**
   * Generates n tokens (reading each as it goes, so fast weights keep learning every b tokens).
   * `onToken` streams them.
   */
  decode(n: number, sampling: SamplingOptions = {}, onToken?: (token: number) => void): number[] {
    this.checkLive('decode');
    if (!Number.isInteger(n) || n < 0) throw new Error(`decode: n must be a non-negative integer, got ${n}`);
    const out: number[] = [];
    let key: Key = randomKey(sampling.seed ?? 0);
    if (this.launchPlans && n >= PLAN_MIN_TOKENS && planSupports(this.config)) return this.decodeWithPlan(n, sampling, key, onToken);
    for (let i = 0; i < n; i++) {
      key = foldIn(key, this.state.position);
      if (!this.state.nextLogProbs) throw new Error('decode: the session has not read any token yet');
      const token = sample(this.state.nextLogProbs.toTyped(), sampling, key);
      this.prefill([token], { score: false });
      out.push(token);
      onToken?.(token);
    }
    return out;
  }

  /** `decode` through a launch plan: the same tokens and state, one recorded step per token. */
  private decodeWithPlan(n: number, sampling: SamplingOptions, key: Key, onToken?: (token: number) => void): number[] {
    if (!this.state.nextLogProbs) throw new Error('decode: the session has not read any token yet');
    const out: number[] = [];
    const plan = new DecodePlan(this.config, this.params, this.lr, this.state, n);
    // greedy: the plan's step picks the token on the device, and only that number comes back
    const greedy = !((sampling.temperature ?? 0) > 0);
    try {
      for (let i = 0; i < n; i++) {
        key = foldIn(key, plan.position);
        const token = i > 0 && greedy ? plan.greedyToken() : sample(i === 0 ? this.state.nextLogProbs.toTyped() : plan.logProbs(), sampling, key);
        plan.read(token);
        out.push(token);
        onToken?.(token);
      }
    } finally {
      // the state the tokens read so far left (also when a callback threw)
      this.commit({ ...this.state, ...plan.finish() });
    }
    return out;
  }

  /** One inner step on the completed mini-batch; `nextToken` is the target of its last position. */
  private learn(nextToken: number): void {
    const s = this.state;
    const c = this.config;
    const next = tidy(() => {
      const r = learnMiniBatch(c, this.params, s.fast, s.chunkCaches, s.pendingX!, s.pendingTokens, nextToken, s.chunkStart, this.lr);
      return { fast: r.fast, caches: r.caches };
    });
    this.commit({ ...s, ...this.learned(next.fast, next.caches, s.position) });
  }

  /** The state an inner step leaves: new fast weights and suffix caches, a new mini-batch starting at `chunkStart`. */
  private learned(fast: FastWeights, suffixCaches: (MixerState | null)[], chunkStart: number): Pick<SessionState, 'fast' | 'caches' | 'chunkStart' | 'pendingX' | 'pendingTokens' | 'chunkCaches'> {
    const prefixCaches = this.state.caches.slice(0, suffixStart(this.config));
    return { fast, caches: [...prefixCaches, ...suffixCaches], chunkStart, pendingX: null, pendingTokens: [], chunkCaches: suffixCaches };
  }

  /** NLL of the first of `tokens` under the distribution left by the last read (NaN without one, or without `score`). */
  private firstNll(tokens: number[], score: boolean): number {
    const p = this.state.nextLogProbs;
    return score && p ? -p.toTyped()[tokens[0]] : NaN;
  }

  /**
   * `readSuffix` of a whole mini-batch followed at once by `learn(nextToken)`, in one pass: the inner
   * step's forward under W_{i-1} is the reading pass (its NLLs, caches and last log-probabilities), so
   * the suffix is not run twice. The state after it is the one the two calls leave.
   */
  private readAndLearn(tokens: number[], x: Tensor, from: number, nextToken: number, score: boolean): number[] {
    const s = this.state;
    const c = this.config;
    const ss = suffixStart(c);
    const n = tokens.length;
    const firstNll = this.firstNll(tokens, score);
    const r = tidy(() => {
      const prefixX = slice(x, [0, from, 0], [1, from + n, c.dModel]);
      const targets = tensor([...tokens.slice(1), nextToken], [1, n], 'int32');
      const step = miniBatchStep(c, this.params, s.fast, s.caches.slice(ss), prefixX, targets, range(s.position, n), this.lr, undefined, true, true);
      return { nll: step.nll, fast: step.fast, caches: step.caches, last: step.last! };
    });
    const nll = score ? [firstNll, ...Array.from(r.nll.toTyped()).slice(0, n - 1)] : [];
    r.nll.dispose();
    const position = s.position + n;
    this.commit({ ...s, ...this.learned(r.fast, r.caches, position), position, nextLogProbs: r.last });
    return nll;
  }

  /**
   * The blocks before the TTT suffix over `tokens` (all of them for models without one): advances
   * their caches and returns their output [1, n, D] for `readSuffix`.
   */
  private readPrefix(tokens: number[]): Tensor {
    const s = this.state;
    const c = this.config;
    const ss = suffixStart(c);
    const positions = range(s.position, tokens.length);
    let x = tidy(() => embed(c, this.params, tensor(tokens, [1, tokens.length], 'int32')));
    const states: (MixerState | null)[] = [];
    // a block at a time, so that one block's intermediates are freed (and their memory reused) before the next
    for (let l = 0; l < ss; l++) {
      const r = tidy(() => runBlocks(c, this.params, l, l + 1, x, positions, [s.caches[l]], []));
      x.dispose();
      x = r.x;
      states.push(r.states[0]);
    }
    this.commit({ ...s, caches: [...states, ...s.caches.slice(ss)] });
    return x;
  }

  /**
   * The suffix blocks and the output over `tokens` (all inside one mini-batch), whose prefix outputs
   * are rows [from, from + n) of `x`; returns their NLLs (`score`), or nothing, computing logits for
   * the last position only.
   */
  private readSuffix(tokens: number[], x: Tensor, from: number, score: boolean): number[] {
    const s = this.state;
    const c = this.config;
    const ss = suffixStart(c);
    const positions = range(s.position, tokens.length);
    const firstNll = this.firstNll(tokens, score);
    const n = tokens.length;
    const r = tidy(() => {
      const prefixX = slice(x, [0, from, 0], [1, from + n, c.dModel]);
      const suffix = runBlocks(c, this.params, ss, c.nLayers, prefixX, positions, s.caches.slice(ss), s.fast);
      const h = score ? suffix.x : slice(suffix.x, [0, n - 1, 0]);
      const logp = logSoftmax(reshape(logits(c, this.params, h), [h.shape[1], c.vocabSize]));
      const pendingX = c.suffixLen > 0 ? (s.pendingX ? concat([s.pendingX, prefixX], 1) : prefixX) : null;
      const last = reshape(slice(logp, [h.shape[1] - 1, 0]), [c.vocabSize]);
      return { logp, caches: suffix.states, pendingX, last };
    });
    let nll: number[] = [];
    if (score) {
      const lp = r.logp.toTyped();
      nll = [firstNll, ...tokens.slice(1).map((t, j) => -lp[j * c.vocabSize + t])];
    }
    r.logp.dispose();
    this.commit({
      ...s,
      position: s.position + tokens.length,
      caches: [...s.caches.slice(0, ss), ...r.caches],
      pendingX: r.pendingX,
      pendingTokens: c.suffixLen > 0 ? [...s.pendingTokens, ...tokens] : [],
      nextLogProbs: r.last,
    });
    return nll;
  }

  private commit(next: SessionState): void {
    const old = this.state;
    this.state = next;
    releaseState(old, next);
  }

  // ---- fast-weight memories -------------------------------------------------------------------

  /**
   * Saves what the session learned from its document: fast-weight deltas W - W_0, the attention
   * caches and the pending mini-batch, with the model's hash and the number of tokens read.
   */
  saveMemory(path: string): void {
    const s = this.state;
    const tensors = new Map<string, StoredTensor>();
    const put = (name: string, t: Tensor) => tensors.set(name, { dtype: t.dtype, shape: [...t.shape], data: t.toTyped() });
    tidy(() => {
      s.fast.forEach((w, j) => {
        for (const k of ['w1', 'w2', 'w3'] as const) put(`fast_delta.${j}.${k}`, sub(w[k], reshape(this.params.fast[j][k], w[k].shape)));
      });
    });
    // Mixer states (without spare storage): tensors as tensors, plain numbers (cache positions) in the metadata.
    const numbers: Record<string, number> = {};
    const kinds = layerKinds(this.config);
    const putStates = (prefix: string, states: (MixerState | null)[], firstLayer: number) => states.forEach((st, l) => {
      if (!st) return;
      const mixer = getMixer(kinds[firstLayer + l]);
      for (const [k, v] of Object.entries(mixer.compact?.(st) ?? st)) {
        if (typeof v === 'number') numbers[`${prefix}.${l}.${k}`] = v;
        else put(`${prefix}.${l}.${k}`, v);
      }
    });
    tidy(() => {
      putStates('state', s.caches, 0);
      putStates('chunk_state', s.chunkCaches, suffixStart(this.config));
    });
    if (s.pendingX) put('pending_x', s.pendingX);
    if (s.nextLogProbs) put('next_log_probs', s.nextLogProbs);
    writeSafetensors(path, tensors, {
      format: 'ttt-e2e-memory/1',
      model_hash: this.hash,
      tokens_read: String(s.position),
      chunk_start: String(s.chunkStart),
      pending_tokens: JSON.stringify(s.pendingTokens),
      state_numbers: JSON.stringify(numbers),
    });
  }

  /** Continues from a saved memory; refuses one made by a different model. */
  loadMemory(path: string): void {
    const { tensors, metadata } = readSafetensors(path);
    if (metadata.format !== 'ttt-e2e-memory/1') throw new Error(`${path} is not a ttt-e2e memory (format '${metadata.format ?? 'missing'}')`);
    if (metadata.model_hash !== this.hash) {
      throw new Error(`${path} was made by a different model (hash ${metadata.model_hash}, this model is ${this.hash})`);
    }
    const dt = this.params.embed.dtype;
    const get = (name: string): Tensor => {
      const t = tensors.get(name);
      if (!t) throw new Error(`${path}: missing tensor ${name}`);
      return tensor(t.data, t.shape, t.dtype === 'float64' || t.dtype === 'float32' ? dt : t.dtype);
    };
    const numbers = JSON.parse(metadata.state_numbers ?? '{}') as Record<string, number>;
    const stateOf = (prefix: string): MixerState | null => {
      const st: Record<string, Tensor | number> = {};
      for (const name of tensors.keys()) if (name.startsWith(`${prefix}.`)) st[name.slice(prefix.length + 1)] = get(name);
      for (const [name, v] of Object.entries(numbers)) if (name.startsWith(`${prefix}.`)) st[name.slice(prefix.length + 1)] = v;
      return Object.keys(st).length ? st : null;
    };
    const c = this.config;
    const next: SessionState = tidy(() => ({
      position: Number(metadata.tokens_read),
      caches: range(0, c.nLayers).map((l) => stateOf(`state.${l}`)),
      fast: this.params.fast.map((w0, j) => {
        const f = (k: 'w1' | 'w2' | 'w3') => add(reshape(w0[k], [1, ...w0[k].shape]), get(`fast_delta.${j}.${k}`));
        return { w1: f('w1'), w2: f('w2'), w3: f('w3') };
      }),
      chunkStart: Number(metadata.chunk_start),
      pendingX: tensors.has('pending_x') ? get('pending_x') : null,
      pendingTokens: JSON.parse(metadata.pending_tokens) as number[],
      chunkCaches: range(0, c.suffixLen).map((j) => stateOf(`chunk_state.${j}`)),
      nextLogProbs: tensors.has('next_log_probs') ? get('next_log_probs') : null,
    }));
    this.commit(next);
  }
}

function keepTree<T>(tree: T): T {
  for (const t of leaves(tree)) keep(t);
  return tree;
}

/** Keeps the new state's tensors and disposes the old state's tensors that are no longer used. */
function releaseState(old: SessionState, next: SessionState): void {
  const live = new Set(leaves(next as unknown));
  for (const t of live) keep(t);
  for (const t of leaves(old as unknown)) if (!live.has(t)) t.dispose();
}

/**
 * Picks a token from log-probabilities: greedy (the first maximum), or a draw from softmax(logProbs /
 * temperature), restricted to the topK most likely tokens (renormalised) and then to the fewest of
 * those, most likely first, whose probability reaches topP (renormalised). Without topK and topP the
 * draw walks the vocabulary in index order; with them, in order of probability (ties: lower index
 * first). Only as many candidates as the filters need are ranked: a full sort of a 128 K vocabulary
 * per token cost tens of milliseconds.
 */
export function sample(logProbs: ArrayLike<number>, opts: SamplingOptions, key: Key): number {
  const { temperature = 0, topK, topP } = opts;
  if (temperature < 0) throw new Error(`sampling: temperature must be >= 0, got ${temperature}`);
  if (topK !== undefined && (!Number.isInteger(topK) || topK < 1)) throw new Error(`sampling: topK must be a positive integer, got ${topK}`);
  if (topP !== undefined && !(topP > 0 && topP <= 1)) throw new Error(`sampling: topP must be in (0, 1], got ${topP}`);
  const V = logProbs.length;
  if (temperature === 0) {
    let best = 0;
    for (let i = 1; i < V; i++) if (logProbs[i] > logProbs[best]) best = i;
    return best;
  }
  let top = -Infinity;
  for (let i = 0; i < V; i++) if (logProbs[i] > top) top = logProbs[i];
  const weight = (i: number) => Math.exp((logProbs[i] - top) / temperature);
  let candidates: number[] | null = null; // null: every index, in order
  if (topK !== undefined || topP !== undefined) {
    // the normaliser of the set topP is measured against: the top k, or the whole vocabulary
    let total = 0;
    let ranked: number[];
    if (topK !== undefined) {
      ranked = topIndices(logProbs, Math.min(topK, V));
      for (const i of ranked) total += weight(i);
    } else {
      for (let i = 0; i < V; i++) total += weight(i);
      ranked = [];
    }
    if (topP === undefined) {
      candidates = ranked;
    } else {
      // grow the ranked prefix until its mass reaches topP (within the top k, when given)
      for (let want = Math.min(64, V); ; want = Math.min(2 * want, V)) {
        if (topK === undefined) ranked = topIndices(logProbs, want);
        let acc = 0;
        const cut = ranked.findIndex((i) => (acc += weight(i) / total) >= topP);
        if (cut >= 0 || topK !== undefined || want === V) {
          candidates = ranked.slice(0, cut >= 0 ? cut + 1 : ranked.length);
          break;
        }
      }
    }
  }
  const chosen = candidates;
  const n = chosen ? chosen.length : V;
  const at = (j: number) => (chosen ? chosen[j] : j);
  let mass = 0;
  for (let j = 0; j < n; j++) mass += weight(at(j));
  const u = (threefry2x32(key, 0, 0)[0] / 2 ** 32) * mass;
  let acc = 0;
  for (let j = 0; j < n; j++) {
    acc += weight(at(j));
    if (u < acc) return at(j);
  }
  return at(n - 1);
}

/** The k indices of the largest values, largest first (ties: lower index first), by a bounded min-heap. */
function topIndices(values: ArrayLike<number>, k: number): number[] {
  const above = (a: number, b: number) => values[a] > values[b] || (values[a] === values[b] && a < b);
  const heap: number[] = []; // heap[0]: the lowest-ranked kept index
  const down = (at: number) => {
    for (;;) {
      const l = 2 * at + 1;
      const r = l + 1;
      let low = at;
      if (l < heap.length && above(heap[low], heap[l])) low = l;
      if (r < heap.length && above(heap[low], heap[r])) low = r;
      if (low === at) return;
      [heap[at], heap[low]] = [heap[low], heap[at]];
      at = low;
    }
  };
  for (let i = 0; i < values.length; i++) {
    if (Number.isNaN(values[i])) continue;
    if (heap.length < k) {
      heap.push(i);
      for (let at = heap.length - 1; at > 0; ) {
        const parent = (at - 1) >> 1;
        if (!above(heap[parent], heap[at])) break;
        [heap[at], heap[parent]] = [heap[parent], heap[at]];
        at = parent;
      }
    } else if (k > 0 && above(i, heap[0])) {
      heap[0] = i;
      down(0);
    }
  }
  return heap.sort((a, b) => (above(a, b) ? -1 : 1));
}
