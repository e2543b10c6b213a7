/**
 * Where the per-op time of the cuda backend goes, for launch-bound work (many tiny ops): a chain of
 * 1000 dependent elementwise ops on 16 floats, timed
 *   - through the engine (tensor + tensor, and tensor + JS number, which adds a fill per op),
 *   - through the backend directly (no engine: no autodiff bookkeeping, no Tensor objects),
 *   - as raw cuLaunchKernel calls of the same kernel with the same packed arguments (koffi + driver),
 *   - and through the engine with stand-in native libraries that do nothing (src/backends/cuda/stand-in.ts):
 *     our own host-side work alone. This row runs on any machine.
 * "submit" is the host time to queue the 1000 ops; "total" waits for the device too. When total
 * is well above submit, the GPU (kernel duration + gaps), not the host, sets the pace.
 * Writes bench/results/cuda-overhead.json (cuda-overhead-host.json when there is no GPU).
 */
import { writeFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { type Tensor, add, getBackend, randn, randomKey, registerBackend, setBackend, tidy } from '../src/index.js';
import { CudaBackend } from '../src/backends/cuda/backend.js';
import type { ArgPacker } from '../src/backends/cuda/ffi.js';
import { standInLibraries } from '../src/backends/cuda/stand-in.js';
import { machine, median, resultsPath } from './common.js';

const CHAIN = 1000;

interface Row {
  what: string;
  submitUs: number;
  totalUs: number;
}

function measure(what: string, chain: () => void, sync: () => void, reps = 15): Row {
  for (let i = 0; i < 3; i++) chain();
  sync();
  const submit: number[] = [];
  const total: number[] = [];
  for (let r = 0; r < reps; r++) {
    const t0 = performance.now();
    chain();
    const t1 = performance.now();
    sync();
    const t2 = performance.now();
    submit.push(((t1 - t0) * 1e3) / CHAIN);
    total.push(((t2 - t0) * 1e3) / CHAIN);
  }
  return { what, submitUs: median(submit), totalUs: median(total) };
}

function engineChains(label: string, sync: () => void): Row[] {
  const x: Tensor = randn(randomKey(3), [16]);
  const rows = [
    measure(`${label}: engine, add(tensor, tensor)`, () => tidy(() => {
      let y = x;
      for (let i = 0; i < CHAIN; i++) y = add(y, x);
      return y;
    }), sync),
    measure(`${label}: engine, add(tensor, number)`, () => tidy(() => {
      let y = x;
      for (let i = 0; i < CHAIN; i++) y = add(y, 1);
      return y;
    }), sync),
  ];
  x.dispose();
  return rows;
}

/** The private parts of the backend this bench reaches into for the raw-launch row. */
interface Internals {
  drv: { cuLaunchKernel: (...a: unknown[]) => number };
  args: ArgPacker;
  fn: (kind: string, dtype: string, name: string) => unknown;
}

function deviceRows(): Row[] {
  const be = getBackend() as unknown as CudaBackend;
  const sync = () => be.synchronize();
  const rows = engineChains('GPU', sync);
  // The backend alone: the same kernel the engine's add launches, buffers reused.
  const x = be.fill(16, 'float32', 1);
  rows.push(measure('GPU: backend.binary only', () => {
    let y = be.binary('add', x, [1], x, [1], [16], 'float32');
    for (let i = 1; i < CHAIN; i++) {
      const z = be.binary('add', y, [1], x, [1], [16], 'float32');
      be.free(y);
      y = z;
    }
    be.free(y);
  }, sync));
  // Raw launches: pack once, then only koffi + cuLaunchKernel per op.
  const inner = be as unknown as Internals;
  const out = be.fill(16, 'float32', 0);
  const f = inner.fn('elementwise', 'float32', 'unary_neg');
  const params = inner.args.reset().ptr(out.ptr).ptr(x.ptr).i64(16).params();
  rows.push(measure('GPU: raw cuLaunchKernel (koffi + driver)', () => {
    for (let i = 0; i < CHAIN; i++) inner.drv.cuLaunchKernel(f, 1, 1, 1, 256, 1, 1, 0, null, params, null);
  }, sync));
  be.free(x);
  be.free(out);
  return rows;
}

export async function main(): Promise<unknown> {
  const rows: Row[] = [];
  let device: Record<string, unknown> | null = null;
  try {
    setBackend('cuda');
    device = getBackend().info();
  } catch (e) {
    console.log(`cuda-overhead: no GPU rows (${(e as Error).message.split('\n')[0].slice(0, 160)})`);
  }
  if (device) rows.push(...deviceRows());
  process.env.TTT_CACHE_DIR ??= '/tmp/ttt-e2e-stand-in-cache';
  registerBackend('cuda-stand-in', () => new CudaBackend(0, standInLibraries()));
  setBackend('cuda-stand-in');
  rows.push(...engineChains('host only (stand-in libraries)', () => {}));
  console.log(`per-op time of a chain of ${CHAIN} ops on 16 floats, µs, medians`);
  console.log('what                                                   submit    total');
  for (const r of rows) console.log(`${r.what.padEnd(52)} ${r.submitUs.toFixed(2).padStart(8)} ${r.totalUs.toFixed(2).padStart(8)}`);
  // without a GPU only the host row exists: keep it apart from a GPU run's results
  const file = resultsPath(device ? 'cuda-overhead.json' : 'cuda-overhead-host.json');
  writeFileSync(file, JSON.stringify({ machine: machine(), device, chain: CHAIN, rows }, null, 1));
  console.log(`wrote ${file}`);
  return rows;
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) await main();
