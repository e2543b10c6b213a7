/**
 * The attention-free toy of SPEC §6.7. Every sequence carries its own secret rule, a random
 * permutation π of an alphabet of n symbols, shown only through examples:
 *
 *     x1 y1 x2 y2 ... xP yP x(P+1)        with yk = n + π(xk) and random xk
 *
 * (x and y use disjoint token ranges, so a model without attention can still tell which kind of
 * position it is at). Only the positions whose target is a y are scored. A model that sees only the
 * current token cannot know π (best: log n); a model that remembers the pairs seen so far can. With
 * no attention the only memory is the fast weights of the inner loop, so the toy isolates what
 * meta-learning (TTT-E2E) adds over plain pre-training followed by the same inner loop (TTT-naive).
 */
import { writeFileSync } from 'node:fs';
import {
  type Key, type Tensor, dispose, foldIn, keep, liveTensorCount, mapLeaves, randomKey, tensor, tidy, uniformHost, valueAndGrad,
} from '../engine/index.js';
import { type ModelConfig, makeConfig } from '../model/config.js';
import { type Params, initParams } from '../model/transformer.js';
import { e2eOuterLoss, innerLoop, lmLoss } from '../model/ttt-e2e.js';
import { AdamW, clipGlobalNorm } from '../train/adamw.js';
import { ilrMultiplier, lrAt } from '../train/schedule.js';

// ---- the task --------------------------------------------------------------------------------------

export interface ToyBatch {
  /** Model inputs [B][2P]: x1 y1 ... xP yP. */
  tokens: number[][];
  /** Next tokens [B][2P]: y1 x2 ... yP x(P+1). */
  targets: number[][];
  /** 1 where the target is a y (even positions), else 0. */
  mask: number[][];
  /** Each sequence's permutation of 0..n-1. */
  perms: number[][];
  /** Each sequence's x1..xP (alphabet indices). */
  xs: number[][];
  alphabet: number;
}

/** `batch` sequences of `pairs` pairs over an alphabet of `alphabet` symbols, fully determined by `key`. */
export function makeToyBatch(key: Key, batch: number, pairs: number, alphabet: number): ToyBatch {
  const out: ToyBatch = { tokens: [], targets: [], mask: [], perms: [], xs: [], alphabet };
  for (let s = 0; s < batch; s++) {
    const u = uniformHost(foldIn(key, s), alphabet + pairs + 1);
    const perm = Array.from({ length: alphabet }, (_, i) => i);
    for (let i = alphabet - 1; i > 0; i--) {
      const j = Math.floor(u[i] * (i + 1));
      [perm[i], perm[j]] = [perm[j], perm[i]];
    }
    const xs = Array.from({ length: pairs + 1 }, (_, k) => Math.floor(u[alphabet + k] * alphabet));
    const seq: number[] = [];
    for (let k = 0; k < pairs; k++) seq.push(xs[k], alphabet + perm[xs[k]]);
    seq.push(xs[pairs]);
    out.tokens.push(seq.slice(0, -1));
    out.targets.push(seq.slice(1));
    out.mask.push(seq.slice(1).map((_, t) => (t % 2 === 0 ? 1 : 0)));
    out.perms.push(perm);
    out.xs.push(xs.slice(0, pairs));
  }
  return out;
}

/**
 * The exact Bayesian predictor of yk given what it may know, per pair [B][P]: NLL 0 when xk was
 * already seen with its y; otherwise π(xk) is uniform over the symbols not yet used as a y, so
 * log(n − #distinct x seen). `miniBatch` (in tokens) limits the knowledge to pairs of earlier
 * mini-batches: the best any model can do whose only memory is updated once per mini-batch.
 */
export function oracleNll(batch: ToyBatch, miniBatch?: number): number[][] {
  const n = batch.alphabet;
  return batch.xs.map((xs) => {
    const seen = new Set<number>();
    let known = 0; // pairs 0..known-1 are in `seen`
    return xs.map((x, k) => {
      const upTo = miniBatch ? Math.floor((2 * k) / miniBatch) * (miniBatch / 2) : k;
      for (; known < upTo; known++) seen.add(xs[known]);
      return seen.has(x) ? 0 : Math.log(n - seen.size);
    });
  });
}

// ---- experiment ------------------------------------------------------------------------------------

export interface ToyOptions {
  /** Outer training steps per trained model. */
  steps?: number;
  seed?: number;
  /** Symbols n (vocabulary 2n). */
  alphabet?: number;
  /** Pairs per sequence (sequence length 2·pairs). */
  pairs?: number;
  /** Sequences per training step. */
  batch?: number;
  dModel?: number;
  ffnDim?: number;
  nLayers?: number;
  /** Inner mini-batch in tokens (even, so pairs never straddle two mini-batches). */
  miniBatch?: number;
  innerLr?: number;
  innerClip?: number;
  /** Peak outer learning rate. */
  lr?: number;
  ilrInit?: number;
  evalSequences?: number;
  /** Inner-lr multipliers tried for TTT-naive at test time (it was never trained with one). */
  naiveLrScales?: number[];
  /** Progress lines (default: none). */
  log?: (line: string) => void;
}

export interface ToyModelResult {
  name: string;
  description: string;
  /** Mean masked NLL overall and by thirds of the sequence (in pairs). */
  overall: number;
  early: number;
  middle: number;
  late: number;
  /** Mean masked NLL of each inner mini-batch. */
  perMiniBatch: number[];
}

export interface ToyResults {
  options: Required<Omit<ToyOptions, 'log'>>;
  models: ToyModelResult[];
  /** Training loss (masked) every few steps, per trained model. */
  curves: Record<string, { step: number; loss: number }[]>;
  trainSeconds: Record<string, number>;
  wallSeconds: number;
}

const DEFAULTS: Required<Omit<ToyOptions, 'log'>> = {
  steps: 600,
  seed: 0,
  alphabet: 16,
  pairs: 48,
  batch: 16,
  dModel: 32,
  ffnDim: 64,
  nLayers: 4,
  miniBatch: 16,
  innerLr: 1,
  innerClip: 1,
  lr: 3e-3,
  ilrInit: 0.1,
  evalSequences: 64,
  naiveLrScales: [0.1, 1, 10, 100],
};

function toyConfig(o: typeof DEFAULTS, variant: 'e2e' | 'naive'): ModelConfig {
  return makeConfig({
    name: 'toy',
    variant,
    vocabSize: 2 * o.alphabet,
    dModel: o.dModel,
    nLayers: o.nLayers,
    nHeads: 1,
    ffnDim: o.ffnDim,
    window: o.miniBatch,
    miniBatch: o.miniBatch,
    attentionFree: true,
    suffixLen: 1,
    innerLr: o.innerLr,
    innerClip: o.innerClip,
  });
}

interface Tensors {
  tokens: Tensor;
  targets: Tensor;
  mask: Tensor;
}
function upload(b: ToyBatch): Tensors {
  const B = b.tokens.length;
  const T = b.tokens[0].length;
  return {
    tokens: tensor(b.tokens.flat(), [B, T], 'int32'),
    targets: tensor(b.targets.flat(), [B, T], 'int32'),
    mask: tensor(b.mask.flat(), [B, T], 'float32'),
  };
}

type Objective = (p: Params, d: Tensors, ilrScale: number) => Tensor;

function train(
  o: typeof DEFAULTS, c: ModelConfig, objective: Objective, key: Key, useIlr: boolean, log: (s: string) => void, name: string,
): { params: Params; curve: { step: number; loss: number }[]; seconds: number } {
  const t0 = performance.now();
  let params = tidy(() => mapLeaves(initParams(c, foldIn(key, 'init')), (t) => keep(t)));
  const opt = new AdamW(params, { weightDecay: 0.1 });
  const sched = { peak: o.lr, warmupSteps: Math.max(1, Math.round(o.steps / 10)), totalSteps: o.steps, floor: 1e-5, kind: 'cosine' as const };
  const curve: { step: number; loss: number }[] = [];
  const every = Math.max(1, Math.floor(o.steps / 20));
  let running = 0;
  let count = 0;
  const live0 = liveTensorCount();
  for (let step = 0; step < o.steps; step++) {
    const batch = makeToyBatch(foldIn(key, `train.${step}`), o.batch, o.pairs, o.alphabet);
    const ilr = useIlr ? ilrMultiplier(step, o.ilrInit, Math.round(o.steps / 10)) : 1;
    const loss = tidy(() => {
      const d = upload(batch);
      const [l, g] = valueAndGrad((p: Params) => objective(p, d, ilr))(params);
      params = opt.step(params, clipGlobalNorm(g, 1).grads, lrAt(step, sched));
      return l.item();
    });
    running += loss;
    count++;
    if ((step + 1) % every === 0 || step === o.steps - 1) {
      curve.push({ step: step + 1, loss: running / count });
      log(`  ${name} step ${step + 1}/${o.steps}  masked loss ${(running / count).toFixed(4)}  (${((performance.now() - t0) / 1000).toFixed(0)} s, live tensors ${liveTensorCount() - live0})`);
      running = 0;
      count = 0;
    }
  }
  opt.dispose();
  return { params, curve, seconds: (performance.now() - t0) / 1000 };
}

/** Per-pair NLL [N][P] of a model on the evaluation batches (inner loop with or without updates). */
function evaluate(c: ModelConfig, params: Params, batches: ToyBatch[], update: boolean, ilrScale = 1): number[][] {
  const rows: number[][] = [];
  for (const b of batches) {
    const nll = tidy(() => {
      const d = upload(b);
      return innerLoop(c, params, d.tokens, d.targets, { mask: d.mask, update, ilrScale, finalUpdate: false }).tokenNll.toArray();
    });
    const T = b.tokens[0].length;
    for (let s = 0; s < b.tokens.length; s++) rows.push(Array.from({ length: T / 2 }, (_, k) => nll[s * T + 2 * k]));
  }
  return rows;
}

function summarise(name: string, description: string, rows: number[][], miniBatch: number): ToyModelResult {
  const P = rows[0].length;
  const meanOver = (lo: number, hi: number) => {
    let s = 0;
    for (const r of rows) for (let k = lo; k < hi; k++) s += r[k];
    return s / (rows.length * (hi - lo));
  };
  const third = Math.round(P / 3);
  const pairsPerMb = miniBatch / 2;
  return {
    name,
    description,
    overall: meanOver(0, P),
    early: meanOver(0, third),
    middle: meanOver(third, P - third),
    late: meanOver(P - third, P),
    perMiniBatch: Array.from({ length: Math.ceil(P / pairsPerMb) }, (_, i) => meanOver(i * pairsPerMb, Math.min(P, (i + 1) * pairsPerMb))),
  };
}

export function runToy(opts: ToyOptions = {}): ToyResults {
  const t0 = performance.now();
  const o: typeof DEFAULTS = { ...DEFAULTS, ...Object.fromEntries(Object.entries(opts).filter(([k, v]) => v !== undefined && k !== 'log')) };
  if (o.miniBatch % 2 !== 0) throw new Error(`toy: miniBatch must be even (pairs must not straddle mini-batches), got ${o.miniBatch}`);
  const log = opts.log ?? (() => {});
  const key = randomKey(o.seed);
  const evalBatches: ToyBatch[] = [];
  for (let i = 0; i * o.batch < o.evalSequences; i++) {
    evalBatches.push(makeToyBatch(foldIn(key, `eval.${i}`), Math.min(o.batch, o.evalSequences - i * o.batch), o.pairs, o.alphabet));
  }

  const e2eCfg = toyConfig(o, 'e2e');
  const naiveCfg = toyConfig(o, 'naive');
  log(`training TTT-E2E (meta-learned through the inner loop), ${o.steps} steps`);
  const e2e = train(o, e2eCfg, (p, d, ilr) => e2eOuterLoss(e2eCfg, p, d.tokens, d.targets, { mask: d.mask, ilrScale: ilr }), foldIn(key, 'e2e'), true, log, 'e2e');
  log(`training TTT-naive (plain next-token loss, fast weights frozen), ${o.steps} steps`);
  const naive = train(o, naiveCfg, (p, d) => lmLoss(naiveCfg, p, d.tokens, d.targets, d.mask), foldIn(key, 'naive'), false, log, 'naive');

  log('evaluating');
  const mb = o.miniBatch;
  const models: ToyModelResult[] = [];
  models.push(summarise('TTT-E2E', `meta-learned, inner lr ${o.innerLr}`, evaluate(e2eCfg, e2e.params, evalBatches, true), mb));
  const naiveRuns = o.naiveLrScales.map((s) => ({ s, rows: evaluate(naiveCfg, naive.params, evalBatches, true, s) }));
  const at1 = naiveRuns.find((r) => r.s === 1) ?? naiveRuns[0];
  models.push(summarise('TTT-naive', `pre-trained, same inner loop, inner lr ${o.innerLr * at1.s}`, at1.rows, mb));
  const best = naiveRuns.map((r) => ({ ...r, m: summarise('', '', r.rows, mb).overall })).sort((a, b) => a.m - b.m)[0];
  models.push(summarise('TTT-naive best lr', `inner lr ${o.innerLr * best.s}, best of ${o.naiveLrScales.map((s) => o.innerLr * s).join('/')} chosen on the test set`, best.rows, mb));
  models.push(summarise('no update', 'TTT-naive weights, inner loop off (no memory)', evaluate(naiveCfg, naive.params, evalBatches, false), mb));
  models.push(summarise('E2E W0, no update', 'TTT-E2E weights, inner loop off', evaluate(e2eCfg, e2e.params, evalBatches, false), mb));
  models.push(summarise('oracle (mini-batch)', 'Bayes-optimal knowing only pairs of earlier mini-batches', evalBatches.flatMap((b) => oracleNll(b, mb)), mb));
  models.push(summarise('oracle (token)', 'Bayes-optimal knowing every earlier pair', evalBatches.flatMap((b) => oracleNll(b)), mb));
  dispose(e2e.params);
  dispose(naive.params);
  return {
    options: o,
    models,
    curves: { e2e: e2e.curve, naive: naive.curve },
    trainSeconds: { e2e: e2e.seconds, naive: naive.seconds },
    wallSeconds: (performance.now() - t0) / 1000,
  };
}

export function formatToyTable(r: ToyResults): string {
  const o = r.options;
  const P = o.pairs;
  const third = Math.round(P / 3);
  const head = ['model', `early (1-${third})`, `middle (${third + 1}-${P - third})`, `late (${P - third + 1}-${P})`, 'overall'];
  const rows = r.models.map((m) => [m.name, ...[m.early, m.middle, m.late, m.overall].map((v) => v.toFixed(3))]);
  const w = head.map((h, i) => Math.max(h.length, ...rows.map((row) => row[i].length)));
  const line = (cells: string[]) => cells.map((c, i) => (i === 0 ? c.padEnd(w[i]) : c.padStart(w[i]))).join('  ');
  return [
    `toy (SPEC 6.7): masked NLL of y given x (nats), by pair index; alphabet ${o.alphabet} (log ${o.alphabet} = ${Math.log(o.alphabet).toFixed(3)}), ${P} pairs, ` +
      `mini-batch ${o.miniBatch} tokens, ${o.nLayers} MLP-only blocks d ${o.dModel} ffn ${o.ffnDim}, ${o.steps} steps x ${o.batch} seqs, ${o.evalSequences} eval seqs`,
    line(head),
    ...rows.map(line),
    ...r.models.map((m) => `  ${m.name}: ${m.description}`),
    `wall ${r.wallSeconds.toFixed(0)} s (train: e2e ${r.trainSeconds.e2e.toFixed(0)} s, naive ${r.trainSeconds.naive.toFixed(0)} s)`,
  ].join('\n');
}

/** `ttt experiment toy`: progress on stderr, the table on stdout, JSON on request. */
export async function runToyCli(opts: { steps?: number; seed: number; json?: string }): Promise<void> {
  const r = runToy({ steps: opts.steps, seed: opts.seed, log: (s) => process.stderr.write(s + '\n') });
  console.log(formatToyTable(r));
  if (opts.json) writeFileSync(opts.json, JSON.stringify(r, null, 2) + '\n');
}
