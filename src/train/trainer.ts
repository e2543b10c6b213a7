/**
 * The outer training loop (SPEC §4): AdamW with warm-up + decay, global-norm clipping, gradient
 * accumulation and the inner-lr warm-up of SPEC §3.4. A run lives in runs/<name>/: config.json,
 * log.jsonl, checkpoint.safetensors (atomic; params + AdamW state + data position), and resumes
 * bit-exactly from its last checkpoint.
 */
import { appendFileSync, existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { z } from 'zod';
import {
  type Tensor, add, dispose, keep, mapLeaves, randomKey, tensor, tidy, valueAndGrad, zipMap, mul,
} from '../engine/index.js';
import { type ModelConfig, type ModelConfigInput, VARIANTS, preset } from '../model/config.js';
import { type Params, initParams } from '../model/transformer.js';
import { innerLoop, outerLoss } from '../model/ttt-e2e.js';
import { AdamW, clipGlobalNorm } from './adamw.js';
import { loadCheckpoint, saveCheckpoint } from './checkpoint.js';
import { ilrMultiplier, lrAt } from './schedule.js';

/** One batch of training sequences, flattened row-major [batch, seqLen]. */
export interface Batch {
  tokens: Int32Array;
  targets: Int32Array;
  mask: Float32Array;
}

/** Where training batches come from; its state is saved in checkpoints so resuming is exact. */
export interface BatchSource {
  next(batch: number): Batch;
  state(): unknown;
  restore(state: unknown): void;
}

export const trainSchema = z
  .object({
    name: z.string().regex(/^[\w.-]+$/, 'letters, digits, _ . - only'),
    model: z.string().default('mini'),
    variant: z.enum(VARIANTS),
    /** Any model config field (window, miniBatch, innerLr, suffixLen, ...). */
    modelOverrides: z.record(z.unknown()).default({}),
    data: z.string(),
    seqLen: z.number().int().min(2),
    batch: z.number().int().positive(),
    gradAccum: z.number().int().positive().default(1),
    steps: z.number().int().positive(),
    lr: z.number().positive().default(3e-3),
    warmupFrac: z.number().min(0).max(1).default(0.1),
    minLr: z.number().nonnegative().default(1e-5),
    schedule: z.enum(['cosine', 'linear']).default('cosine'),
    weightDecay: z.number().nonnegative().default(0.1),
    clip: z.number().nonnegative().default(1.0),
    /** Inner-lr warm-up over this share of the steps (SPEC §3.4: 10%); multiplier from the model's ilrInit. */
    ilrWarmupFrac: z.number().min(0).max(1).default(0.1),
    evalEvery: z.number().int().nonnegative().default(0),
    evalBatches: z.number().int().positive().default(2),
    checkpointEvery: z.number().int().positive().default(25),
    seed: z.number().int().default(0),
    /** Where training sequences start: document starts only, or also every seqLen tokens inside long documents (books). */
    starts: z.enum(['documents', 'chunks']).default('documents'),
    runsDir: z.string().default('runs'),
  })
  .strict();

export type TrainOptions = z.output<typeof trainSchema>;

export function parseTrainOptions(input: unknown): TrainOptions {
  const r = trainSchema.safeParse(input);
  if (!r.success) {
    const issue = r.error.issues[0];
    throw new Error(`train config: field '${issue.path.join('.')}': ${issue.message}`);
  }
  return r.data;
}

export function modelConfigFor(o: TrainOptions, vocabSize: number): ModelConfig {
  return preset(o.model, o.variant, { vocabSize, ...(o.modelOverrides as Partial<ModelConfigInput>) });
}

export interface LogRecord {
  step: number;
  loss: number;
  lr: number;
  gradNorm: number;
  tokensPerSec: number;
  elapsedSec: number;
  valLoss?: number;
}

export interface TrainHooks {
  /** Called after every step (progress bars, tests). */
  onStep?: (r: LogRecord, total: number) => void;
  /** Set to true (e.g. by a SIGINT handler) to stop after the current step with a checkpoint. */
  shouldStop?: () => boolean;
}

export interface RunFiles {
  dir: string;
  config: string;
  log: string;
  checkpoint: string;
}

export function runFiles(runsDir: string, name: string): RunFiles {
  const dir = join(runsDir, name);
  return { dir, config: join(dir, 'config.json'), log: join(dir, 'log.jsonl'), checkpoint: join(dir, 'checkpoint.safetensors') };
}

/** What config.json holds: the training options plus what the data fixed (tokenizer, vocab). */
export interface RunConfig {
  train: TrainOptions;
  tokenizer: string;
  vocabSize: number;
  model: ModelConfig;
}

export function readRunConfig(runDir: string): RunConfig {
  const path = join(runDir, 'config.json');
  if (!existsSync(path)) throw new Error(`${runDir} is not a training run (no config.json)`);
  try {
    return JSON.parse(readFileSync(path, 'utf8')) as RunConfig;
  } catch {
    throw new Error(`${path} is not valid JSON`);
  }
}

function objective(c: ModelConfig, p: Params, b: Batch, B: number, T: number, ilrScale: number): Tensor {
  const tokens = tensor(b.tokens, [B, T], 'int32');
  const targets = tensor(b.targets, [B, T], 'int32');
  const mask = tensor(b.mask, [B, T], p.embed.dtype);
  return outerLoss(c, p, tokens, targets, { mask, ilrScale });
}

/** Mean masked token NLL at test time (the inner loop runs for TTT models). */
export function evalLoss(c: ModelConfig, params: Params, batches: Batch[], T: number): number {
  let num = 0;
  let den = 0;
  for (const b of batches) {
    const B = b.tokens.length / T;
    tidy(() => {
      const mask = tensor(b.mask, [B, T], params.embed.dtype);
      const nll = innerLoop(c, params, tensor(b.tokens, [B, T], 'int32'), tensor(b.targets, [B, T], 'int32'), { mask, finalUpdate: false }).tokenNll;
      num += mul(nll, mask).sum().item();
      den += b.mask.reduce((a, v) => a + v, 0);
    });
  }
  return num / Math.max(den, 1);
}

/**
 * Trains (or resumes) a run. `source` yields training batches; `valBatches` are fixed validation
 * batches. Returns the final params (kept; the caller disposes them).
 */
export async function train(
  o: TrainOptions, data: { source: BatchSource; valBatches: Batch[]; tokenizer: string; vocabSize: number },
  opts: { resume?: boolean } & TrainHooks = {},
): Promise<{ params: Params; config: ModelConfig; stoppedEarly: boolean; lastStep: number }> {
  const files = runFiles(o.runsDir, o.name);
  const c = modelConfigFor(o, data.vocabSize);
  const runConfig: RunConfig = { train: o, tokenizer: data.tokenizer, vocabSize: data.vocabSize, model: c };
  let step = 0;
  let params = mapLeaves(initParams(c, randomKey(o.seed)), keep);
  let opt = new AdamW(params, { weightDecay: o.weightDecay });
  if (opts.resume) {
    const saved = readRunConfig(files.dir);
    const a = JSON.stringify({ ...saved.train, steps: 0 });
    const b = JSON.stringify({ ...o, steps: 0 });
    if (a !== b) throw new Error(`--resume: the options differ from ${files.config} (only --steps may change); saved: ${a}`);
    if (!existsSync(files.checkpoint)) throw new Error(`--resume: ${files.checkpoint} does not exist`);
    const ck = loadCheckpoint(files.checkpoint, params);
    dispose(params);
    opt.dispose();
    params = ck.params;
    opt = new AdamW(params, { weightDecay: o.weightDecay }, ck.opt);
    step = Number(ck.meta.step);
    data.source.restore(ck.meta.sampler);
    writeFileSync(files.config, JSON.stringify({ ...runConfig }, null, 2));
  } else {
    if (existsSync(files.config)) throw new Error(`run ${files.dir} already exists: pass --resume to continue it, or choose another --name`);
    mkdirSync(files.dir, { recursive: true });
    writeFileSync(files.config, JSON.stringify(runConfig, null, 2));
  }
  const B = o.batch;
  const T = o.seqLen;
  const warmup = Math.round(o.warmupFrac * o.steps);
  const ilrWarmup = Math.round(o.ilrWarmupFrac * o.steps);
  const save = (atStep: number) =>
    saveCheckpoint(files.checkpoint, { params, opt: opt.state, meta: { step: atStep, sampler: data.source.state(), train: o } });
  const t0 = performance.now();
  let stoppedEarly = false;
  while (step < o.steps) {
    const lr = lrAt(step, { peak: o.lr, warmupSteps: warmup, totalSteps: o.steps, floor: o.minLr, kind: o.schedule });
    const ilrScale = ilrMultiplier(step, c.ilrInit, ilrWarmup);
    const stepStart = performance.now();
    const { loss, gradNorm, grads } = tidy(() => {
      let total = 0;
      let acc: Params | null = null;
      for (let micro = 0; micro < o.gradAccum; micro++) {
        const b = data.source.next(B);
        const [l, g] = valueAndGrad((p: Params) => objective(c, p, b, B, T, ilrScale))(params);
        total += l.item();
        acc = acc ? zipMap([acc, g as Params], ([x, y]) => add(x, y)) : (g as Params);
      }
      const mean = o.gradAccum > 1 ? mapLeaves(acc!, (g) => mul(g, 1 / o.gradAccum)) : acc!;
      const clipped = clipGlobalNorm(mean, o.clip);
      return { loss: total / o.gradAccum, gradNorm: clipped.norm.item(), grads: mapLeaves(clipped.grads, keep) };
    });
    params = opt.step(params, grads, lr);
    dispose(grads);
    step++;
    const elapsed = (performance.now() - t0) / 1000;
    const rec: LogRecord = {
      step, loss, lr, gradNorm, tokensPerSec: (B * T * o.gradAccum) / ((performance.now() - stepStart) / 1000), elapsedSec: elapsed,
    };
    if (o.evalEvery > 0 && (step % o.evalEvery === 0 || step === o.steps)) rec.valLoss = evalLoss(c, params, data.valBatches.slice(0, o.evalBatches), T);
    appendFileSync(files.log, `${JSON.stringify(rec)}\n`);
    opts.onStep?.(rec, o.steps);
    // Let the event loop run (signal handlers such as Ctrl-C, progress output) between steps.
    await new Promise((r) => setImmediate(r));
    const stop = opts.shouldStop?.() ?? false;
    if (step % o.checkpointEvery === 0 || step === o.steps || stop) save(step);
    if (stop && step < o.steps) {
      stoppedEarly = true;
      break;
    }
  }
  opt.dispose();
  return { params, config: c, stoppedEarly, lastStep: step };
}

/** Loads the latest checkpoint of a run for evaluation or generation. */
export function loadRun(runDir: string): { run: RunConfig; params: Params } {
  const run = readRunConfig(runDir);
  const ckPath = join(runDir, 'checkpoint.safetensors');
  if (!existsSync(ckPath)) throw new Error(`${runDir} has no checkpoint yet (${ckPath})`);
  const template = initParams(run.model, randomKey(0));
  const ck = loadCheckpoint(ckPath, template);
  dispose(template);
  dispose(ck.opt);
  return { run, params: ck.params };
}

