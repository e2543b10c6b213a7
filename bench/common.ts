/** What every benchmark shares: where results go, timing, and the machine they were measured on. */
import { mkdirSync, readFileSync } from 'node:fs';
import { availableParallelism } from 'node:os';
import { join } from 'node:path';
import { type Tensor, cast, dispose, keep, mapLeaves, randint, randomKey, registerBackend, setBackend, tidy } from '../src/index.js';
import { CudaBackend } from '../src/backends/cuda/backend.js';
import { type StandInCalls, standInLibraries } from '../src/backends/cuda/stand-in.js';
import { type ModelConfig, type Variant, preset } from '../src/model/config.js';
import { type Params, initParams } from '../src/model/transformer.js';
import { repoRoot } from '../src/util/repo-root.js';

/** bench/results/<file> of the repository, whether a bench runs from bench/ (tsx) or dist/bench/ (built). */
export function resultsPath(file: string): string {
  const out = join(repoRoot() ?? '.', 'bench', 'results');
  mkdirSync(out, { recursive: true });
  return join(out, file);
}

export const median = (xs: number[]): number => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[s.length >> 1] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
};

/** Median ms of `reps` runs of fn, each followed by sync() (a device's queue drained), after one warm-up run. */
export function syncedMedianMs(fn: () => void, reps: number, sync: () => void): number {
  fn();
  sync();
  const ts: number[] = [];
  for (let r = 0; r < reps; r++) {
    const t0 = performance.now();
    fn();
    sync();
    ts.push(performance.now() - t0);
  }
  return median(ts);
}

/**
 * Median seconds of each fn, alternating them run by run (after one warm-up each) so that load
 * from elsewhere on the machine falls on all alike; at least `minReps` rounds and `minSeconds`.
 */
export function timeAlternating(fns: Array<() => void>, minReps: number, minSeconds: number, maxReps = 30): { s: number[]; reps: number } {
  for (const fn of fns) fn();
  const ts: number[][] = fns.map(() => []);
  const start = performance.now();
  let reps = 0;
  while (reps < maxReps) {
    fns.forEach((fn, i) => {
      const t0 = performance.now();
      fn();
      ts[i].push((performance.now() - t0) / 1e3);
    });
    reps++;
    if (reps >= minReps && (performance.now() - start) / 1e3 >= minSeconds) break;
  }
  return { s: ts.map(median), reps };
}

export function machine() {
  let cpuModel = 'unknown';
  try {
    cpuModel = /^model name\s*:\s*(.*)$/m.exec(readFileSync('/proc/cpuinfo', 'utf8'))?.[1] ?? cpuModel;
  } catch {
    // not Linux
  }
  return { cpuModel, cores: availableParallelism(), node: process.version, platform: `${process.platform}-${process.arch}`, date: new Date().toISOString() };
}

/**
 * Random parameters for an inference bench: the weights stored in bf16, the fast weights (the TTT
 * state, which the inner steps update) kept in float32.
 */
export function bf16InferenceParams(c: ModelConfig, seed = 0): Params {
  const p0 = initParams(c, randomKey(seed));
  const params = { ...mapLeaves({ ...p0, fast: [] }, (t) => keep(tidy(() => cast(t, 'bfloat16')))), fast: p0.fast } as Params;
  dispose({ ...p0, fast: [] });
  return params;
}

/** Python (inside the benches' PyTorch scripts): bench(fn, reps), the median of reps CUDA-event timings after two warm-up calls, in ms. */
export const TORCH_MEDIAN_PY = String.raw`def bench(fn, reps):
    for _ in range(2): fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        s = torch.cuda.Event(enable_timing=True); e = torch.cuda.Event(enable_timing=True)
        s.record(); fn(); e.record(); torch.cuda.synchronize()
        ts.append(s.elapsed_time(e))
    ts.sort()
    return ts[len(ts) // 2]`;

/**
 * What the stand-in benches (cuda-memory, cuda-launches) share: their positional arguments `[variant] [T] [preset]`
 * (default e2e 8192 125m; only when run directly, since `npm run bench -- NAME` passes the bench's name), the CUDA
 * backend over the stand-in libraries set as the backend in use, and a training step's inputs (bf16 compute, T
 * random tokens and targets, random float32 parameters).
 */
export function standInTrainingSetup(name: string): {
  variant: Variant; T: number; presetName: string; be: CudaBackend; calls: StandInCalls; c: ModelConfig; params: Params; tokens: Tensor; targets: Tensor;
} {
  const args = process.argv[2] && /^(e2e|naive|swa|full|hybrid)$/.test(process.argv[2]) ? process.argv.slice(2) : [];
  const variant = (args[0] ?? 'e2e') as Variant;
  const T = Number(args[1] ?? 8192);
  const presetName = args[2] ?? '125m';
  process.env.TTT_CACHE_DIR ??= '/tmp/ttt-stand-in-cache';
  const libs = standInLibraries();
  const be = new CudaBackend(0, libs);
  registerBackend(name, () => be);
  setBackend(name);
  const c = preset(presetName, variant, { computeDType: 'bfloat16' });
  const params = initParams(c, randomKey(0));
  const tokens = keep(randint(randomKey(1), [1, T], 0, c.vocabSize));
  const targets = keep(randint(randomKey(2), [1, T], 0, c.vocabSize));
  return { variant, T, presetName, be, calls: libs.calls, c, params, tokens, targets };
}
