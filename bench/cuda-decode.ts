/**
 * Where a decoded token's time goes (issue #6: decode latency), `125m` preset, batch 1, bf16 compute,
 * random weights. For each variant and context: a Session prefills the context, then a decode plan
 * (src/model/decode-plan.ts) reads tokens, and the bench times, as medians over REPS tokens:
 *   token:   one greedy token as `Session.decode` takes it (inputs written, graph replayed, the step's
 *            pick read back);
 *   replay:  the recorded graph alone, REPS replays queued back to back then one sync, per replay
 *            (the GPU's time for a step, launch cost hidden behind it);
 *   eager:   the same step run op by op (what the plan records; the engine's host logic per op);
 *   readback + pick: what sampling adds: the 128256 log-probs copied to the host and a pick over them.
 * With `--profile`, the eager step once more under TTT_CUDA_PROFILE (every op synchronised and timed):
 * the top ops of one token. Writes bench/results/cuda-decode.json.
 * Usage: node dist/bench/cuda-decode.js [contexts] [variants] [--profile]
 */
import { writeFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { type LaunchPlan, getBackend, randint, randomKey, setBackend, tidy } from '../src/index.js';
import type { CudaBackend } from '../src/backends/cuda/backend.js';
import { type Variant, preset } from '../src/model/config.js';
import { DecodePlan } from '../src/model/decode-plan.js';
import { Session, type SessionState, sample } from '../src/model/session.js';
import { bf16InferenceParams, resultsPath } from './common.js';

const REPS = 40;

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];

export async function main(): Promise<unknown> {
  const profile = process.argv.includes('--profile');
  // profiled, the step runs op by op (a recording is refused under the profiler's syncs)
  if (profile) Object.assign(process.env, { TTT_CUDA_PROFILE: '1', TTT_LAUNCH_PLANS: 'eager' });
  const presetName = process.env.TTT_DECODE_PRESET ?? '125m'; // another preset for a quick run on the CPU
  let be: CudaBackend;
  try {
    be = setBackend(process.env.TTT_DEVICE ?? 'cuda') as unknown as CudaBackend;
  } catch (e) {
    console.log(`cuda-decode: skipped (${(e as Error).message.split('\n')[0].slice(0, 200)})`);
    return null;
  }
  const args = process.argv.slice(2).filter((a) => !a.startsWith('--'));
  const contexts = (args[0] ?? '8192,131072').split(',').map(Number);
  const variants = (args[1] ?? 'full,swa,e2e').split(',') as Variant[];
  const sync = () => be.synchronize?.();
  const rows: Record<string, unknown>[] = [];
  console.log(`decode breakdown, ${presetName}, batch 1, bf16 compute, ${getBackend().info().device ?? getBackend().name}${profile ? ' (profiled: eager step only)' : ''}`);
  console.log('variant  context   token ms   replay ms   eager ms   readback+pick ms');
  for (const variant of variants) {
    const c = preset(presetName, variant, { computeDType: 'bfloat16' });
    const params = bf16InferenceParams(c);
    for (const context of contexts) {
      const session = new Session(c, params);
      session.prefill(tidy(() => randint(randomKey(context), [context], 0, c.vocabSize).toArray()), { score: false });
      const state = (session as unknown as { state: SessionState }).state;
      const plan = new DecodePlan(c, params, c.innerLr, state, 4 * REPS + 8);
      // the plan's recording, reached for timing its replays alone
      const recorded = () => (plan as unknown as { plan: LaunchPlan }).plan;
      plan.read(sample(state.nextLogProbs!.toTyped(), {}, randomKey(0))); // builds the plan: one step run, one recorded
      sync();
      const row: Record<string, unknown> = { variant, context, recorded: recorded()?.recorded ?? false };
      if (profile) {
        be.resetProfile?.();
        recorded()!.replay();
        sync();
        const report = be.profileReport?.() ?? [];
        row.profile = report.slice(0, 30);
        console.log(`${variant} ${context}: ${report.reduce((a, r) => a + r.calls, 0)} ops, ${report.reduce((a, r) => a + r.ms, 0).toFixed(2)} ms in ops`);
        for (const r of report.slice(0, 15)) console.log(`  ${r.ms.toFixed(3).padStart(8)} ms ${String(r.calls).padStart(5)}  ${r.what}`);
      } else {
        const token: number[] = [];
        let next = plan.greedyToken();
        for (let i = 0; i < REPS; i++) {
          sync();
          const t0 = performance.now();
          plan.read(next);
          next = plan.greedyToken(); // waits for the step
          token.push(performance.now() - t0);
        }
        sync();
        const t1 = performance.now();
        for (let i = 0; i < REPS; i++) recorded()!.replay();
        sync();
        const replay = (performance.now() - t1) / REPS;
        const readback: number[] = [];
        for (let i = 0; i < REPS; i++) {
          const t0 = performance.now();
          sample(plan.logProbs(), {}, randomKey(0));
          readback.push(performance.now() - t0);
        }
        row.tokenMs = median(token);
        row.replayMs = replay;
        row.readbackPickMs = median(readback);
        console.log(`${variant.padEnd(8)} ${String(context).padStart(7)} ${median(token).toFixed(2).padStart(10)} ${replay.toFixed(3).padStart(11)} ${'-'.padStart(10)} ${median(readback).toFixed(3).padStart(18)}`);
      }
      plan.finish();
      session.dispose();
      rows.push(row);
    }
    // the same step op by op: a plan that does not record (each replay runs the step)
    if (!profile) {
      process.env.TTT_LAUNCH_PLANS = 'eager';
      const context = contexts[0];
      const session = new Session(c, params);
      session.prefill(tidy(() => randint(randomKey(context), [context], 0, c.vocabSize).toArray()), { score: false });
      const state = (session as unknown as { state: SessionState }).state;
      const plan = new DecodePlan(c, params, c.innerLr, state, 2 * REPS + 8);
      plan.read(1);
      const eager: number[] = [];
      for (let i = 0; i < REPS; i++) {
        sync();
        const t0 = performance.now();
        (plan as unknown as { plan: LaunchPlan }).plan.replay();
        sync();
        eager.push(performance.now() - t0);
      }
      plan.finish();
      session.dispose();
      delete process.env.TTT_LAUNCH_PLANS;
      rows.push({ variant, context, eagerMs: median(eager) });
      console.log(`${variant.padEnd(8)} ${String(context).padStart(7)} ${'-'.padStart(10)} ${'-'.padStart(11)} ${median(eager).toFixed(2).padStart(10)}`);
    }
  }
  const file = resultsPath(profile ? 'cuda-decode-profile.json' : 'cuda-decode.json');
  writeFileSync(file, JSON.stringify({ date: new Date().toISOString(), backend: be.info(), preset: presetName, compute: 'bfloat16', reps: REPS, rows }, null, 1));
  console.log(`wrote ${file}`);
  return rows;
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) await main();
