/**
 * Where a training step's time goes, by phase of the method rather than by kernel: the prefix blocks, each
 * mini-batch's forward and inner gradient, and in the backward the recomputation of each mini-batch, the walk through
 * it (the second order) and the rest (the prefix's backward). Runs with phase timing on (`setPhaseTiming`): on a GPU
 * the backend records an event on its stream at each phase boundary, with no synchronisation in between, so the step
 * runs at its normal speed; on the CPU the marks are wall-clock times. Median over the timed steps after a warm-up.
 *
 * Usage: node dist/bench/phases.js [variant] [T] [preset] [fp32|bf16] [steps]   (defaults e2e 2048 mini fp32 3;
 *        on a GPU: TTT_DEVICE=cuda node dist/bench/phases.js e2e 8192 125m bf16)
 * Writes bench/results/phases-<backend>-<preset>-<variant>.json.
 */
import { writeFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { type PhaseTime, dispose, getBackend, randint, randomKey, setPhaseTiming, tidy, valueAndGrad } from '../src/index.js';
import { type Variant, preset } from '../src/model/config.js';
import { type Params, initParams } from '../src/model/transformer.js';
import { outerLoss } from '../src/model/ttt-e2e.js';
import { median, resultsPath } from './common.js';

export async function main(): Promise<unknown> {
  const [variant = 'e2e', T = '2048', presetName = 'mini', compute = 'fp32', steps = '3'] = process.argv.slice(2);
  const be = getBackend();
  if (!be.markPhase || !be.phaseReport) throw new Error(`phases: the ${be.name} backend has no phase timing`);
  const c = preset(presetName, variant as Variant, compute === 'bf16' ? { computeDType: 'bfloat16' } : {});
  const params = initParams(c, randomKey(0));
  const tokens = randint(randomKey(1), [1, Number(T)], 0, c.vocabSize);
  const targets = randint(randomKey(2), [1, Number(T)], 0, c.vocabSize);
  const step = () => tidy(() => void valueAndGrad((p: Params) => outerLoss(c, p, tokens, targets))(params)[0].item());
  step(); // warm-up: kernels compiled, caches filled
  const before = setPhaseTiming(true);
  const runs: { wallMs: number; phases: PhaseTime[] }[] = [];
  try {
    for (let i = 0; i < Number(steps); i++) {
      be.phaseReport(); // drop marks left from before
      const t0 = performance.now();
      step(); // (item() waits for the device)
      runs.push({ wallMs: performance.now() - t0, phases: be.phaseReport() });
    }
  } finally {
    setPhaseTiming(before);
  }
  const names = [...new Set(runs.flatMap((r) => r.phases.map((p) => p.phase)))];
  const rows = names.map((phase) => {
    const per = runs.map((r) => r.phases.find((p) => p.phase === phase) ?? { phase, ms: 0, spans: 0 });
    return { phase, ms: median(per.map((p) => p.ms)), spans: median(per.map((p) => p.spans)) };
  }).sort((a, b) => b.ms - a.ms);
  const total = rows.reduce((s, r) => s + r.ms, 0);
  const wall = median(runs.map((r) => r.wallMs));
  console.log(`${presetName} ${variant} T ${T} (${compute}) on ${be.name}: one valueAndGrad(outerLoss) step, median of ${steps}; ${wall.toFixed(1)} ms wall, ${total.toFixed(1)} ms between the first and last marks`);
  console.log('| phase | ms per step | share | spans |');
  console.log('|---|---|---|---|');
  for (const r of rows) console.log(`| ${r.phase} | ${r.ms.toFixed(1)} | ${((100 * r.ms) / total).toFixed(1)}% | ${r.spans} |`);
  const out = resultsPath(`phases-${be.name}-${presetName}-${variant}.json`);
  writeFileSync(out, JSON.stringify({ date: new Date().toISOString(), backend: be.info(), preset: presetName, variant, T: Number(T), compute, wallMs: wall, rows, runs }, null, 1));
  console.log(`wrote ${out}`);
  dispose([params, tokens, targets]);
  return rows;
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) await main();
