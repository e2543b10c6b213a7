/**
 * Where the time of a training step goes on the GPU: one step of the `small` preset (value and
 * gradient of the training objective), SWA and TTT-E2E, with the cuda backend's profiler on
 * (TTT_CUDA_PROFILE: every kernel and GEMM synchronised and timed, so the step runs slower than in
 * bench/cuda-train.ts; the shares are what matter). Prints the top kernels and writes
 * bench/results/cuda-profile.json.
 * Usage: node dist/bench/cuda-profile.js [T] [fp32|bf16]   (defaults 2048, fp32)
 *        node dist/bench/cuda-profile.js prefill [T]   (a Session's prefill instead, see profilePrefill)
 */
import { writeFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { dispose, randint, randomKey, setBackend, tidy, valueAndGrad } from '../src/index.js';
import type { CudaBackend } from '../src/backends/cuda/backend.js';
import { preset } from '../src/model/config.js';
import { Session } from '../src/model/session.js';
import { type Params, initParams } from '../src/model/transformer.js';
import { outerLoss } from '../src/model/ttt-e2e.js';
import { bf16InferenceParams, resultsPath } from './common.js';

export async function main(): Promise<unknown> {
  process.env.TTT_CUDA_PROFILE = '1';
  let be: CudaBackend;
  try {
    be = setBackend('cuda') as unknown as CudaBackend;
  } catch (e) {
    console.log(`cuda-profile: skipped (${(e as Error).message.split('\n')[0].slice(0, 200)})`);
    return null;
  }
  if (process.argv[2] === 'prefill') return profilePrefill(be, Number(process.argv[3] ?? 16384));
  const T = Number(process.argv[2] ?? 2048);
  const bf16 = process.argv[3] === 'bf16';
  const out: Record<string, unknown> = {};
  for (const variant of ['swa', 'e2e'] as const) {
    const c = preset('small', variant, bf16 ? { computeDType: 'bfloat16' } : {});
    const params = initParams(c, randomKey(0));
    const tokens = randint(randomKey(1), [1, T], 0, c.vocabSize);
    const targets = randint(randomKey(2), [1, T], 0, c.vocabSize);
    const step = () => tidy(() => void valueAndGrad((p: Params) => outerLoss(c, p, tokens, targets))(params)[0].item());
    step(); // compile kernels, warm the allocator
    be.resetProfile();
    const t0 = performance.now();
    step();
    const wall = performance.now() - t0;
    out[variant] = { T, compute: bf16 ? 'bfloat16' : 'float32', ...printReport(be, `${variant} (${bf16 ? 'bf16 compute' : 'fp32'}), T ${T}`, wall) };
    dispose([params, tokens, targets]);
  }
  const file = resultsPath(`cuda-profile${bf16 ? '-bf16' : ''}.json`);
  writeFileSync(file, JSON.stringify({ date: new Date().toISOString(), device: be.info().device, ...out }, null, 1));
  console.log(`wrote ${file}`);
  return out;
}

function printReport(be: CudaBackend, title: string, wall: number): { wallMs: number; opsMs: number; report: ReturnType<CudaBackend['profileReport']> } {
  const report = be.profileReport();
  const total = report.reduce((a, r) => a + r.ms, 0);
  console.log(`\n${title}: ${report.reduce((a, r) => a + r.calls, 0)} ops, ${total.toFixed(1)} ms in ops, ${wall.toFixed(1)} ms wall (profiled)`);
  console.log('share     ms   calls  op');
  for (const r of report.slice(0, 25)) console.log(`${((100 * r.ms) / total).toFixed(1).padStart(5)}% ${r.ms.toFixed(1).padStart(7)} ${String(r.calls).padStart(6)}  ${r.what}`);
  return { wallMs: wall, opsMs: total, report };
}

/**
 * `prefill [T]`: where a Session's prefill of T tokens goes (`125m`, bf16 compute, as in
 * bench/cuda-latency.ts), full attention and TTT-E2E. Writes bench/results/cuda-profile-prefill.json.
 */
function profilePrefill(be: CudaBackend, T: number): unknown {
  const out: Record<string, unknown> = {};
  for (const variant of ['full', 'e2e'] as const) {
    const c = preset('125m', variant, { computeDType: 'bfloat16' });
    const params = bf16InferenceParams(c);
    const tokens = tidy(() => randint(randomKey(1), [T], 0, c.vocabSize).toArray());
    const warm = new Session(c, params);
    warm.prefill(tokens.slice(0, 2 * c.miniBatch), { score: false });
    warm.dispose();
    be.synchronize();
    be.resetProfile();
    const session = new Session(c, params);
    const t0 = performance.now();
    session.prefill(tokens, { score: false });
    be.synchronize();
    const wall = performance.now() - t0;
    session.dispose();
    out[variant] = { T, preset: '125m', compute: 'bfloat16', ...printReport(be, `prefill ${variant}, 125m bf16, T ${T}`, wall) };
    dispose(params);
  }
  const file = resultsPath('cuda-profile-prefill.json');
  writeFileSync(file, JSON.stringify({ date: new Date().toISOString(), device: be.info().device, ...out }, null, 1));
  console.log(`wrote ${file}`);
  return out;
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) await main();
