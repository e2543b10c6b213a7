/**
 * Training-step speed of every variant beside SWA of the same size (issue #7 asks the baselines to
 * train at a speed comparable to SWA), on the backend in use (`TTT_DEVICE=cuda` for the GPU). One
 * `valueAndGrad(outerLoss)` step of the `mini` preset at B 4, T 512, window 64, mini-batch 32; median of
 * several steps after a warm-up. Writes bench/results/variants-<backend>.json.
 */
import { writeFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { dispose, getBackend, randint, randomKey, tidy, valueAndGrad } from '../src/index.js';
import { type Variant, VARIANTS, preset } from '../src/model/config.js';
import { getMixer } from '../src/model/mixers/index.js';
import { type Params, initParams } from '../src/model/transformer.js';
import { outerLoss } from '../src/model/ttt-e2e.js';
import { resultsPath } from './common.js';

const B = 4;
const T = 512;
const REPS = 4;

function stepMs(variant: Variant): number {
  const c = preset('mini', variant, { window: 64, miniBatch: 32 });
  const params = initParams(c, randomKey(0));
  const tokens = randint(randomKey(1), [B, T], 0, c.vocabSize);
  const targets = randint(randomKey(2), [B, T], 0, c.vocabSize);
  const times: number[] = [];
  for (let i = 0; i <= REPS; i++) {
    const t0 = performance.now();
    tidy(() => {
      const [loss] = valueAndGrad((p: Params) => outerLoss(c, p, tokens, targets))(params);
      loss.item();
    });
    if (i > 0) times.push(performance.now() - t0);
  }
  dispose([params, tokens, targets]);
  times.sort((a, b) => a - b);
  return times[Math.floor(times.length / 2)];
}

export async function main(): Promise<unknown> {
  const available = VARIANTS.filter((v) => {
    try {
      getMixer(v === 'e2e' || v === 'naive' || v === 'hybrid' ? 'swa' : v);
      return true;
    } catch {
      return false;
    }
  });
  const rows = available.map((variant) => ({ variant, ms: stepMs(variant) }));
  const swa = rows.find((r) => r.variant === 'swa')!.ms;
  const table = rows.map((r) => ({ ...r, tokensPerSec: (B * T) / (r.ms / 1000), vsSwa: r.ms / swa }));
  console.log(`training step on ${getBackend().name}, preset mini, B ${B}, T ${T}, window 64, mini-batch 32 (median of ${REPS})`);
  console.log('variant          ms/step   tokens/s   time vs SWA');
  for (const r of table) console.log(`${r.variant.padEnd(15)} ${r.ms.toFixed(0).padStart(8)} ${r.tokensPerSec.toFixed(0).padStart(10)} ${r.vsSwa.toFixed(2).padStart(12)}x`);
  const out = resultsPath(`variants-${getBackend().name}.json`);
  writeFileSync(out, JSON.stringify({ date: new Date().toISOString(), backend: getBackend().info(), B, T, reps: REPS, rows: table }, null, 1));
  console.log(`wrote ${out}`);
  return table;
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) await main();
