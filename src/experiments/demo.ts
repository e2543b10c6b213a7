/**
 * `ttt demo`, the main job: TTT-E2E, TTT-naive, SWA and full attention, the same `mini` backbone and
 * the same token budget, trained on long synthetic documents whose facts recur far beyond the
 * attention window, then compared by loss vs context length and loss by token index.
 */
import { existsSync, rmSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { dispose, randomKey, tidy, valueAndGrad } from '../engine/index.js';
import { loadShards, makeSampler, prepareData } from '../data/index.js';
import { type Variant, VARIANTS } from '../model/config.js';
import { initParams } from '../model/transformer.js';
import { outerLoss } from '../model/ttt-e2e.js';
import { tensor } from '../engine/index.js';
import { evaluateRun, trainCommand, writeEvalOutputs } from '../cli/commands.js';
import { modelConfigFor, parseTrainOptions, readRunConfig } from '../train/trainer.js';

export interface DemoOptions {
  minutes: number;
  /** 'synthetic' (built in code), or real text installed on this machine: 'kjv' or 'web' (docs/data.md). */
  corpus?: string;
  steps?: number;
  variants: string;
  out: string;
  seed: number;
  fresh?: boolean;
}

/** The demo's fixed shape: small enough for 2 CPU cores, long enough that the window matters. */
export const DEMO = {
  model: 'mini',
  seqLen: 512,
  batch: 4,
  lr: 3e-3,
  /** Model overrides: window 64 and mini-batch 32 (window >= mini-batch), inner lr 1, as SPEC. */
  overrides: { window: 64, miniBatch: 32 },
  contexts: [256, 512, 1024, 2048],
  docLength: [2048, 3072] as [number, number],
  docs: 200,
  evalDocs: 12,
};

const log = (m: string) => process.stderr.write(`${m}\n`);

/** Seconds per training step of each variant, measured on two steps after a warm-up step. */
function secondsPerStep(variant: Variant, dataDir: string): number {
  const shards = loadShards(dataDir);
  const o = parseTrainOptions({ name: 'calibration', variant, model: DEMO.model, data: dataDir, seqLen: DEMO.seqLen, batch: DEMO.batch, steps: 1, modelOverrides: DEMO.overrides });
  const c = modelConfigFor(o, shards.tokenizer.vocabSize);
  const params = initParams(c, randomKey(0));
  const sampler = makeSampler(shards, 'train', { seqLen: DEMO.seqLen, seed: 0 });
  const times: number[] = [];
  for (let i = 0; i < 3; i++) {
    const b = sampler.next(DEMO.batch);
    const t0 = performance.now();
    tidy(() => {
      const [l] = valueAndGrad((p: typeof params) => outerLoss(c, p, tensor(b.tokens, [DEMO.batch, DEMO.seqLen], 'int32'), tensor(b.targets, [DEMO.batch, DEMO.seqLen], 'int32'), { mask: tensor(b.mask, [DEMO.batch, DEMO.seqLen]) }))(params);
      l.item();
    });
    times.push((performance.now() - t0) / 1000);
  }
  dispose(params);
  return Math.min(times[1], times[2]);
}

export async function runDemo(o: DemoOptions): Promise<void> {
  const variants = o.variants.split(',').map((v) => v.trim());
  for (const v of variants) if (!(VARIANTS as readonly string[]).includes(v)) throw new Error(`--variants: unknown variant '${v}' (known: ${VARIANTS.join(', ')})`);
  if (o.fresh && existsSync(o.out)) rmSync(o.out, { recursive: true, force: true });
  const corpus = o.corpus ?? 'synthetic';
  const dataDir = join(o.out, 'data');
  if (!existsSync(join(dataDir, 'manifest.json'))) {
    log(`building the ${corpus} corpus in ${dataDir}`);
    prepareData({ source: corpus, out: dataDir, tokenizer: 'byte', valFraction: 0.05, testFraction: 0.1, seed: o.seed, synthetic: { seed: o.seed, numDocs: DEMO.docs, length: DEMO.docLength } });
  }
  // Books are few and long: start training sequences inside them too, not only at their first tokens.
  const starts = corpus === 'synthetic' ? 'documents' : 'chunks';
  const runsDir = join(o.out, 'runs');
  // A demo run before this one (finished or cut off): keep its steps and checkpoint spacing, so the
  // runs resume (or, when done, are only evaluated) instead of being re-calibrated to other options.
  const previous = variants.map((v) => join(runsDir, v, 'config.json')).find((f) => existsSync(f));
  const saved = previous ? readRunConfig(dirname(previous)).train : undefined;
  let steps = o.steps ?? saved?.steps;
  if (saved) log(`resuming the demo in ${o.out} (${saved.steps} steps per model; --fresh starts over)`);
  if (!steps) {
    const per = variants.map((v) => secondsPerStep(v as Variant, dataDir));
    steps = Math.max(10, Math.floor((o.minutes * 60 * 0.85) / per.reduce((a, b) => a + b, 0)));
    log(`calibration: ${variants.map((v, i) => `${v} ${per[i].toFixed(2)} s/step`).join(', ')} → ${steps} steps each (${steps * DEMO.batch * DEMO.seqLen} tokens per model) for ~${o.minutes} min`);
  }
  const runDirs: string[] = [];
  for (const variant of variants) {
    const name = `${variant}`;
    const runDir = join(runsDir, name);
    const exists = existsSync(join(runDir, 'config.json'));
    await trainCommand({
      name, variant, model: DEMO.model, data: dataDir, seqLen: DEMO.seqLen, batch: DEMO.batch, steps, lr: DEMO.lr,
      modelOverrides: DEMO.overrides, runsDir, seed: o.seed, checkpointEvery: saved?.checkpointEvery ?? Math.max(1, Math.floor(steps / 4)), starts,
    }, exists);
    runDirs.push(runDir);
  }
  log('evaluating on held-out documents');
  const reports = runDirs.map((r) => evaluateRun(r, dataDir, DEMO.contexts, { split: 'test', maxDocs: DEMO.evalDocs }));
  const text = await writeEvalOutputs(reports, o.out);
  console.log(text);
  console.log(`\nresults: ${join(o.out, 'results.json')}, plots: ${join(o.out, 'loss-vs-context.svg')}, ${join(o.out, 'loss-by-token-index.svg')}`);
}
