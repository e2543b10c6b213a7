/**
 * Where a training step's device memory goes, without a GPU: the CUDA backend runs over its stand-in
 * libraries (src/backends/cuda/stand-in.ts: every driver / cuBLAS call succeeds and does nothing), so
 * its caching allocator sees the same allocations in the same order as on a GPU. Reports the
 * allocator's peak over one step (value and gradient of the training objective plus AdamW) and, at
 * the moment of the peak, the live blocks grouped by the code that allocated them.
 *
 * Usage: node dist/bench/cuda-memory.js [variant e2e|swa|full] [T] [preset]   (default e2e 8192 125m)
 * Writes bench/results/cuda-memory-<preset>-<variant>.json. Host-bound: initialising `125m` takes ~10 s.
 */
import { writeFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { dispose, tidy, valueAndGrad } from '../src/index.js';
import type { DeviceBuffer } from '../src/backends/cuda/allocator.js';
import type { Params } from '../src/model/transformer.js';
import { outerLoss } from '../src/model/ttt-e2e.js';
import { AdamW } from '../src/train/adamw.js';
import { resultsPath, standInTrainingSetup } from './common.js';

/** The allocating call site: the first frames in src/model or src/nn, then the engine frames that allocated (op < caller < its caller). */
function site(): string {
  const frames = (new Error().stack ?? '').split('\n').slice(3).map((l) => l.trim().replace(/^at /, ''))
    .filter((l) => /src\//.test(l) && !/backends\/|engine\/(runtime|tensor|cache)\./.test(l))
    .map((l) => l.replace(/\(.*\/src\//, '(').replace(/:\d+\)$/, ')'));
  const model = frames.filter((f) => /\((model|nn)\//.test(f)).slice(0, 2);
  return [...model, ...frames.slice(0, 3).filter((f) => !model.includes(f))].join(' < ');
}

export async function main(): Promise<unknown> {
  const setup = standInTrainingSetup('stand-in');
  const { variant, T, presetName, be, c, tokens, targets } = setup;
  let params = setup.params;
  const opt = new AdamW(params, { weightDecay: 0.1 });

  const allocator = (be as unknown as { allocator: { alloc(n: number): DeviceBuffer; free(b: DeviceBuffer): void } }).allocator;
  const live = new Map<DeviceBuffer, string>();
  let inUse = 0;
  let peak = 0;
  let atPeak = new Map<DeviceBuffer, string>();
  const alloc = allocator.alloc.bind(allocator);
  const free = allocator.free.bind(allocator);
  allocator.alloc = (n) => {
    const b = alloc(n);
    if (b.bytes > 0) {
      live.set(b, site());
      inUse += b.bytes;
      if (inUse > peak) {
        peak = inUse;
        atPeak = new Map(live);
      }
    }
    return b;
  };
  allocator.free = (b) => {
    if (live.delete(b)) inUse -= b.bytes;
    free(b);
  };
  const before = be.memoryStats().inUse;
  be.resetPeakMemory();
  const grads = tidy(() => {
    const [loss, g] = valueAndGrad((p: Params) => outerLoss(c, p, tokens, targets))(params);
    loss.dispose();
    return g as Params;
  });
  params = opt.step(params, grads, 1e-4);
  dispose([grads, params, tokens, targets]);
  opt.dispose();
  allocator.alloc = alloc;
  allocator.free = free;

  const GiB = 2 ** 30;
  const groups = new Map<string, { blocks: number; bytes: number }>();
  for (const [b, where] of atPeak) {
    const g = groups.get(where) ?? { blocks: 0, bytes: 0 };
    g.blocks++;
    g.bytes += b.bytes;
    groups.set(where, g);
  }
  const top = [...groups.entries()].sort((a, b) => b[1].bytes - a[1].bytes).slice(0, 30).map(([where, g]) => ({ where, ...g, GiB: g.bytes / GiB }));
  const stepPeak = be.memoryStats().peak;
  console.log(`${presetName} ${variant} T ${T} (bf16 compute, stand-in libraries): allocator peak ${(stepPeak / GiB).toFixed(2)} GiB, ` +
    `of which ${(before / GiB).toFixed(2)} GiB held before the step (parameters, AdamW state, inputs)`);
  console.log('live at the peak, by allocating site:');
  for (const t of top) console.log(`${t.GiB.toFixed(3).padStart(7)} GiB ${String(t.blocks).padStart(5)} blocks  ${t.where}`);
  const out = resultsPath(`cuda-memory-${presetName}-${variant}.json`);
  writeFileSync(out, JSON.stringify({ date: new Date().toISOString(), preset: presetName, variant, T, peakGiB: stepPeak / GiB, beforeStepGiB: before / GiB, top }, null, 1));
  console.log(`wrote ${out}`);
  return { peakGiB: stepPeak / GiB };
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) await main();
