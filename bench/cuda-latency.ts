/**
 * Latency vs context length (SPEC 6.5, issue #6), batch 1, `125m` preset (vocabulary 128256, window
 * 8192, mini-batch 1024), bf16 compute: weights stored in bf16, fast weights (the TTT state) in float32.
 * For full attention, SWA and TTT-E2E:
 *   prefill: a Session reads the whole context (`prefill(tokens, { score: false })`: no per-token
 *     logits; for TTT-E2E every completed mini-batch takes its inner gradient step, which is the
 *     paper's prefill of TTT-E2E);
 *   decode: then generates DECODE tokens greedily; the time per token is their mean (for TTT-E2E an
 *     inner step falls every 1024 tokens, so within DECODE tokens at most one does; see `innerSteps`).
 * Weights are random (latency does not depend on them). A variant stops growing its context once one
 * prefill takes longer than MAX_PREFILL_S. Each variant first runs an unrecorded warm-up (kernel
 * compilation and loading). Writes bench/results/latency-<backend>.json.
 * Usage: node dist/bench/cuda-latency.js [contexts, comma-separated] [variants, comma-separated]
 */
import { writeFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { getBackend, randint, randomKey, setBackend, tidy } from '../src/index.js';
import { type Variant, preset } from '../src/model/config.js';
import { Session } from '../src/model/session.js';
import { bf16InferenceParams, resultsPath } from './common.js';

const DECODE = 64;
const MAX_PREFILL_S = 120;

function sync(): void {
  const be = getBackend() as unknown as { synchronize?: () => void };
  be.synchronize?.();
}

interface Row {
  variant: string;
  context: number;
  prefillS: number;
  prefillTokensPerS: number;
  decodeMsPerToken: number;
  innerStepsDuringDecode: number;
}

export async function main(): Promise<unknown> {
  try {
    setBackend(process.env.TTT_DEVICE ?? 'cuda');
  } catch (e) {
    console.log(`cuda-latency: skipped (${(e as Error).message.split('\n')[0].slice(0, 200)})`);
    return null;
  }
  const contexts = (process.argv[2] ?? '1024,2048,4096,8192,16384,32768,65536,131072').split(',').map(Number);
  const variants = (process.argv[3] ?? 'full,swa,e2e').split(',') as Variant[];
  const rows: Row[] = [];
  const file = resultsPath(`latency-${getBackend().name}.json`);
  const save = () => writeFileSync(file, JSON.stringify({ date: new Date().toISOString(), backend: getBackend().info(), preset: '125m', compute: 'bfloat16', decodeTokens: DECODE, rows }, null, 1));
  console.log(`latency vs context, 125m, batch 1, bf16 compute, ${getBackend().info().device ?? getBackend().name}`);
  console.log('variant  context   prefill s   prefill tok/s   decode ms/token');
  for (const variant of variants) {
    const c = preset('125m', variant, { computeDType: 'bfloat16' });
    const params = bf16InferenceParams(c);
    {
      // warm-up, not recorded: compiles and loads every kernel the variant uses (two mini-batches, so
      // TTT-E2E takes an inner step; then a few decoded tokens), which would otherwise land on the first row
      const warm = new Session(c, params);
      try {
        warm.prefill(tidy(() => randint(randomKey(1), [2 * c.miniBatch], 0, c.vocabSize).toArray()), { score: false });
        warm.decode(4);
        sync();
      } finally {
        warm.dispose();
      }
    }
    for (const context of contexts) {
      const tokens = tidy(() => randint(randomKey(context), [context], 0, c.vocabSize).toArray());
      const session = new Session(c, params);
      try {
        sync();
        const t0 = performance.now();
        session.prefill(tokens, { score: false });
        sync();
        const prefillS = (performance.now() - t0) / 1e3;
        const before = session.tokensRead;
        const t1 = performance.now();
        session.decode(DECODE);
        sync();
        const decodeMs = (performance.now() - t1) / DECODE;
        const b = c.miniBatch;
        const innerSteps = variant === 'e2e' ? Math.floor((before + DECODE) / b) - Math.floor(before / b) : 0;
        const row = { variant, context, prefillS, prefillTokensPerS: context / prefillS, decodeMsPerToken: decodeMs, innerStepsDuringDecode: innerSteps };
        rows.push(row);
        save(); // after every row, so a run cut short by a time limit keeps what it measured
        console.log(`${variant.padEnd(8)} ${String(context).padStart(7)} ${prefillS.toFixed(3).padStart(11)} ${row.prefillTokensPerS.toFixed(0).padStart(15)} ${decodeMs.toFixed(2).padStart(17)}`);
        if (prefillS > MAX_PREFILL_S) break;
      } catch (e) {
        console.log(`${variant.padEnd(8)} ${String(context).padStart(7)}   failed: ${(e as Error).message.split('\n')[0].slice(0, 160)}`);
        break;
      } finally {
        session.dispose();
      }
    }
  }
  save();
  console.log(`wrote ${file}`);
  return rows;
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) await main();
