/**
 * How many kernels a training step launches, by kernel, and what the step costs the host — without a GPU: the
 * CUDA backend runs over its stand-in libraries (src/backends/cuda/stand-in.ts), so it issues the same launches
 * in the same order as on a GPU, and the host time is our own work per step (engine, autodiff, argument
 * packing) without the driver's; the bytes of new buffers a step asks the allocator for (a floor on the memory traffic
 * that writing them costs). Steps with the second-order kernels (RMSNorm, SwiGLU gate, softmax's backward) off and on.
 *
 * Usage: node dist/bench/cuda-launches.js [variant e2e|swa|full] [T] [preset]   (default e2e 8192 125m)
 * Writes bench/results/cuda-launches-<preset>-<variant>.json.
 */
import { writeFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { dispose, tidy, valueAndGrad } from '../src/index.js';
import type { Params } from '../src/model/transformer.js';
import { outerLoss } from '../src/model/ttt-e2e.js';
import { median, resultsPath, standInTrainingSetup } from './common.js';

export async function main(): Promise<unknown> {
  const { variant, T, presetName, be, calls, c, params, tokens, targets } = standInTrainingSetup('stand-in-launches');
  const byKernel = new Map<string, number>();
  const launch = (be as unknown as { launch: (...a: unknown[]) => void }).launch.bind(be);
  (be as unknown as { launch: (...a: unknown[]) => void }).launch = (...a: unknown[]) => {
    const name = String(a[5]);
    byKernel.set(name, (byKernel.get(name) ?? 0) + 1);
    launch(...a);
  };
  const allocator = (be as unknown as { allocator: { alloc(n: number): unknown } }).allocator;
  const alloc = allocator.alloc.bind(allocator);
  let allocated = 0;
  allocator.alloc = (n: number) => ((allocated += n), alloc(n));
  const gemms = () => [...calls.counts].filter(([k]) => /^cublas.*Gemm/.test(k)).reduce((s, [, n]) => s + n, 0);
  const step = () => tidy(() => {
    const [l, g] = valueAndGrad((p: Params) => outerLoss(c, p, tokens, targets))(params);
    dispose([l, g]);
  });
  const rows = [];
  for (const gradKernels of [false, true]) {
    be.rmsNormGradKernel = gradKernels;
    be.swigluGradKernel = gradKernels;
    be.softmaxGradKernel = gradKernels;
    step(); // warm-up: JIT, kernel handles, cached band biases
    byKernel.clear();
    const g0 = gemms();
    allocated = 0;
    const times: number[] = [];
    for (let i = 0; i < 3; i++) {
      const t0 = performance.now();
      step();
      times.push(performance.now() - t0);
    }
    const kernels = [...byKernel.entries()].map(([name, n]) => ({ name, launches: n / 3 })).sort((a, b) => b.launches - a.launches);
    const launches = kernels.reduce((s, k) => s + k.launches, 0);
    rows.push({ gradKernels, launches, gemms: (gemms() - g0) / 3, newBufferGB: allocated / 3 / 1e9, hostMs: median(times), kernels });
  }
  console.log(`${presetName} ${variant} T ${T}, bf16 compute, one valueAndGrad(outerLoss) step over the stand-in libraries (median of 3 after a warm-up):`);
  console.log('| second-order kernels (RMSNorm, SwiGLU, softmax) | kernel launches | cuBLAS GEMMs | GB of new buffers | host ms per step |');
  console.log('|---|---|---|---|---|');
  for (const r of rows) console.log(`| ${r.gradKernels ? 'on' : 'off'} | ${r.launches} | ${r.gemms} | ${r.newBufferGB.toFixed(1)} | ${r.hostMs.toFixed(0)} |`);
  for (const r of rows) console.log(`top kernels (${r.gradKernels ? 'on' : 'off'}): ${r.kernels.slice(0, 8).map((k) => `${k.name} ${k.launches}`).join(', ')}`);
  const out = resultsPath(`cuda-launches-${presetName}-${variant}.json`);
  writeFileSync(out, JSON.stringify({ date: new Date().toISOString(), preset: presetName, variant, T, rows }, null, 1));
  console.log(`wrote ${out}`);
  return rows;
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) await main();
