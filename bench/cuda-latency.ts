/**
 * Latency vs context length (SPEC 6.5, issue #6), batch 1, `125m` preset (vocabulary 128256, window
 * 8192, mini-batch 1024), bf16 compute: weights stored in bf16, fast weights (the TTT state) in float32.
 * For full attention, SWA and TTT-E2E:
 *   prefill: a Session reads the whole context (`prefill(tokens, { score: false })`: no per-token
 *     logits; for TTT-E2E every completed mini-batch takes its inner gradient step, which is the
 *     paper's prefill of TTT-E2E);
 *   decode: then generates DECODE tokens greedily through a launch plan (one recorded CUDA graph per
 *     token, src/model/decode-plan.ts). Reported: the median time between consecutive tokens (steady
 *     state), the time to the first token (building the plan: caches copied into rings, one step run
 *     and one recorded), and the mean over all DECODE tokens including that. Then DECODE more tokens
 *     without a plan (each token read like a prefill: the path before plans), median between tokens.
 *     For TTT-E2E an inner step falls every 1024 tokens, so within DECODE tokens at most one does;
 *     see `innerSteps`.
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

type Memory = { inUse: number; cached: number; peak: number; driverAllocs: number; driverFrees: number; driverMs: number };
/** The device allocator's counters (the cuda backend), or null. */
function memory(): Memory | null {
  const be = getBackend() as unknown as { memoryStats?: () => Memory };
  return be.memoryStats?.() ?? null;
}
function resetPeak(): void {
  (getBackend() as unknown as { resetPeakMemory?: () => void }).resetPeakMemory?.();
}

interface Row {
  variant: string;
  context: number;
  prefillS: number;
  prefillTokensPerS: number;
  /** Median time between consecutive tokens decoded through the launch plan. */
  decodeMsPerToken: number;
  /** Time to the first planned token (building the plan) and the mean over all DECODE planned tokens. */
  decodeFirstTokenMs: number;
  decodeMeanMs: number;
  /** Median time between consecutive tokens without a plan. */
  decodeNoPlanMsPerToken: number;
  innerStepsDuringDecode: number;
  /** The allocator during the prefill (cuda): peak bytes in use, bytes cached after it, driver allocations and frees it made. */
  prefillMemory?: { peakGiB: number; cachedGiB: number; driverAllocs: number; driverFrees: number; driverMs: number };
}

/** Decodes n tokens; returns the time to the first token, the median gap between tokens and the mean. */
function timedDecode(session: Session, n: number): { firstMs: number; medianMs: number; meanMs: number } {
  const stamps: number[] = [];
  sync();
  const t0 = performance.now();
  session.decode(n, {}, () => stamps.push(performance.now()));
  sync();
  const total = performance.now() - t0;
  const gaps = stamps.slice(1).map((t, i) => t - stamps[i]).sort((a, b) => a - b);
  return { firstMs: stamps[0] - t0, medianMs: gaps[Math.floor(gaps.length / 2)], meanMs: total / n };
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
  console.log('variant  context   prefill s   prefill tok/s   decode ms/token   first token ms   mean ms   no plan ms/token');
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
        warm.decode(8); // through a launch plan: records a graph once
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
        resetPeak();
        const m0 = memory();
        const t0 = performance.now();
        session.prefill(tokens, { score: false });
        sync();
        const prefillS = (performance.now() - t0) / 1e3;
        const m1 = memory();
        const GiB = 2 ** 30;
        const prefillMemory = m0 && m1 ? { peakGiB: m1.peak / GiB, cachedGiB: m1.cached / GiB, driverAllocs: m1.driverAllocs - m0.driverAllocs, driverFrees: m1.driverFrees - m0.driverFrees, driverMs: m1.driverMs - m0.driverMs } : undefined;
        const before = session.tokensRead;
        const planned = timedDecode(session, DECODE);
        session.launchPlans = false;
        const plain = timedDecode(session, DECODE);
        const b = c.miniBatch;
        const innerSteps = variant === 'e2e' ? Math.floor((before + DECODE) / b) - Math.floor(before / b) : 0;
        const row: Row = {
          variant, context, prefillS, prefillTokensPerS: context / prefillS, decodeMsPerToken: planned.medianMs, decodeFirstTokenMs: planned.firstMs,
          decodeMeanMs: planned.meanMs, decodeNoPlanMsPerToken: plain.medianMs, innerStepsDuringDecode: innerSteps, prefillMemory,
        };
        rows.push(row);
        save(); // after every row, so a run cut short by a time limit keeps what it measured
        const f = (v: number, d: number, w: number) => v.toFixed(d).padStart(w);
        console.log(
          `${variant.padEnd(8)} ${String(context).padStart(7)} ${f(prefillS, 3, 11)} ${f(row.prefillTokensPerS, 0, 15)} ${f(planned.medianMs, 2, 17)} ${f(planned.firstMs, 1, 16)} ${f(planned.meanMs, 2, 9)} ${f(plain.medianMs, 2, 18)}` +
            (prefillMemory ? `   (prefill: peak ${prefillMemory.peakGiB.toFixed(1)} GiB, ${prefillMemory.driverAllocs} driver allocs, ${prefillMemory.driverFrees} frees, ${prefillMemory.driverMs.toFixed(0)} ms in them)` : ''),
        );
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
