// fp32 matmul throughput of every available gemm path (single thread and all cores) beside numpy,
// measured in the same run. Not a test: it reports, it does not assert.
//   node --import tsx bench/cpu-matmul.ts        -> table on stdout, bench/results/cpu-matmul.json
import { spawnSync } from 'node:child_process';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { availableParallelism } from 'node:os';
import { fileURLToPath } from 'node:url';
import { gemm, gemmInfo, setGemmPath, setGemmThreads, type GemmJob, type GemmPath } from '../src/backends/cpu/gemm.js';
import { pool } from '../src/backends/cpu/pool.js';
import { repoRoot } from '../src/util/repo-root.js';
import { machine, median, resultsPath } from './common.js';

/** [m, k, n]: C[m,n] = A[m,k] @ B[k,n]. */
type Shape = [number, number, number];
const SHAPES: Array<{ name: string; shape: Shape }> = [
  { name: '128^3', shape: [128, 128, 128] },
  { name: '256^3', shape: [256, 256, 256] },
  { name: '512^3', shape: [512, 512, 512] },
  { name: '1024^3', shape: [1024, 1024, 1024] },
  { name: '2048x256 @ 256x1024', shape: [2048, 256, 1024] },
  { name: '1024x128 @ 128x512', shape: [1024, 128, 512] },
  { name: '512x512 @ 512x2048', shape: [512, 512, 2048] },
];
const MIN_REPS = 5;
const MAX_REPS = 50;
const MIN_SECONDS = 0.4;
/** The plain JS path is ~50x slower; cap its time per shape so the whole bench stays short. */
const JS_MAX_SECONDS = 3;

export interface Row {
  shape: string;
  m: number; k: number; n: number;
  path: GemmPath | 'numpy';
  threads: number;
  gflops: number;
  reps: number;
  ratioToNumpy?: number;
}


/**
 * Operands come from the CPU backend's array pool, as every CPU tensor's storage does: the pool
 * places them in the shared wasm arena, so the wasm path runs in place, as it does inside the engine
 * (plain Float32Arrays would add a staging copy per call that no tensor pays).
 */
function timeGemm([m, k, n]: Shape, maxSeconds: number): { gflops: number; reps: number } {
  const operand = (size: number, random: boolean) => {
    const x = pool.alloc('float32', size, true) as Float32Array;
    if (random) for (let i = 0; i < size; i++) x[i] = Math.random() - 0.5;
    return x;
  };
  const a = operand(m * k, true);
  const b = operand(k * n, true);
  const c = operand(m * n, false);
  const job: GemmJob = { batch: 1, m, n, k, transA: false, transB: false, a, aOffsets: [0], b, bOffsets: [0], c };
  gemm(job); // warm-up: tier-up of the wasm code, worker start, memory growth
  gemm(job);
  const times: number[] = [];
  const start = performance.now();
  while (times.length < MAX_REPS) {
    const t0 = performance.now();
    gemm(job);
    times.push((performance.now() - t0) / 1e3);
    const elapsed = (performance.now() - start) / 1e3;
    if (times.length >= MIN_REPS && elapsed >= MIN_SECONDS) break;
    if (times.length >= 3 && elapsed >= maxSeconds) break;
  }
  pool.release(a, 'float32', m * k);
  pool.release(b, 'float32', k * n);
  pool.release(c, 'float32', m * n);
  return { gflops: (2 * m * n * k) / median(times) / 1e9, reps: times.length };
}

export interface WasmPeak {
  /** Best of the chain counts: what a 128-bit wasm kernel could reach here at most. */
  gflops: number;
  /** 'relaxed_madd' (fused) where the engine runs relaxed SIMD, else 'mul+add'. */
  op: 'relaxed_madd' | 'mul+add';
  byAccumulators: Record<string, number>;
}

/**
 * Practical single-thread peak of 128-bit wasm f32x4 multiply-add on this machine: register-only loops
 * with 8-14 independent chains (build/wasm/fma-peak*.wasm, from src/backends/cpu/wasm/gemm-wat.mjs),
 * median of 7 runs of ~0.1 s each. Uses the same instruction the gemm path uses (gemmInfo's wasmKernel,
 * which also turns relaxed SIMD on where Node needs the flag).
 */
function measureWasmPeak(): WasmPeak | { error: string } {
  const relaxed = gemmInfo().wasmKernel === 'relaxed-simd';
  const file = `${repoRoot() ?? '.'}/build/wasm/${relaxed ? 'fma-peak-relaxed.wasm' : 'fma-peak.wasm'}`;
  if (!existsSync(file)) return { error: `${file} missing (run \`npm run build\`)` };
  const ex = new WebAssembly.Instance(new WebAssembly.Module(readFileSync(file))).exports as Record<string, (n: number) => number>;
  const byAccumulators: Record<string, number> = {};
  for (const name of Object.keys(ex).filter((k) => k.startsWith('peak_'))) {
    const acc = Number(name.slice(5));
    const flopsPerIter = acc * 8; // 4 lanes x (multiply + add)
    const iters = Math.round(5e9 / 60 / flopsPerIter); // ~0.1 s at 50 GFLOP/s
    ex[name](iters); // tier-up
    const ts: number[] = [];
    for (let r = 0; r < 7; r++) {
      const t0 = performance.now();
      ex[name](iters);
      ts.push((performance.now() - t0) / 1e3);
    }
    byAccumulators[acc] = (iters * flopsPerIter) / median(ts) / 1e9;
  }
  return { gflops: Math.max(...Object.values(byAccumulators)), op: relaxed ? 'relaxed_madd' : 'mul+add', byAccumulators };
}

const NUMPY_SCRIPT = `
import json, sys, time
import numpy as np
shapes = json.loads(sys.argv[1]); min_reps, max_reps, min_s = ${MIN_REPS}, ${MAX_REPS}, ${MIN_SECONDS}
out = []
for m, k, n in shapes:
    a = np.random.rand(m, k).astype(np.float32) - 0.5
    b = np.random.rand(k, n).astype(np.float32) - 0.5
    c = np.empty((m, n), np.float32)
    np.matmul(a, b, out=c); np.matmul(a, b, out=c)
    ts = []; start = time.perf_counter()
    while len(ts) < max_reps:
        t0 = time.perf_counter(); np.matmul(a, b, out=c); ts.append(time.perf_counter() - t0)
        if len(ts) >= min_reps and time.perf_counter() - start >= min_s: break
    ts.sort(); med = ts[len(ts)//2] if len(ts) % 2 else (ts[len(ts)//2-1] + ts[len(ts)//2]) / 2
    out.append({"gflops": 2*m*n*k/med/1e9, "reps": len(ts)})
info = {"numpy": np.__version__}
try:
    cfg = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
    info["blas"] = {key: cfg.get(key) for key in ("name", "version", "openblas configuration")}
except Exception as e:
    info["blas"] = "unknown (%s)" % e
try:
    import threadpoolctl
    info["threadpoolctl"] = threadpoolctl.threadpool_info()
except ImportError:
    pass
print(json.dumps({"results": out, "info": info}))
`;

function runNumpy(shapes: Shape[], threads: 1 | 'all'): { results: Array<{ gflops: number; reps: number }>; info: unknown } | { error: string } {
  const env = { ...process.env };
  // Let numpy's bundled OpenBLAS pick its own kernel and cache sizes, as a user would get it.
  for (const key of OPENBLAS_OVERRIDES) delete env[key];
  delete env.OPENBLAS_NUM_THREADS;
  delete env.OMP_NUM_THREADS;
  if (threads === 1) {
    env.OPENBLAS_NUM_THREADS = '1';
    env.OMP_NUM_THREADS = '1';
  }
  const r = spawnSync('python3', ['-c', NUMPY_SCRIPT, JSON.stringify(shapes)], { env, encoding: 'utf8', timeout: 300_000 });
  if (r.status !== 0) return { error: (r.error?.message ?? r.stderr ?? '').trim().split('\n').slice(-1)[0] || `exit ${r.status}` };
  return JSON.parse(r.stdout);
}


/** Environment overrides for OpenBLAS that would make the comparison unfair in either direction. */
const OPENBLAS_OVERRIDES = ['OPENBLAS_CORETYPE', 'OPENBLAS_L2_SIZE'];

export async function main(): Promise<{ rows: Row[] }> {
  // numpy's OpenBLAS runs without these (below); our BLAS path gets the same treatment. This only
  // works because gemm.ts loads the library lazily, i.e. on the gemmInfo() call just after.
  const removedEnv: Record<string, string> = {};
  for (const key of OPENBLAS_OVERRIDES) {
    if (process.env[key] !== undefined) removedEnv[key] = process.env[key]!;
    delete process.env[key];
  }
  const info = gemmInfo();
  const allCores = availableParallelism();
  const threadCounts = allCores > 1 ? [1, allCores] : [1];
  const shapes = SHAPES.map((s) => s.shape);
  const rows: Row[] = [];

  const peak = measureWasmPeak();
  const numpy: Record<number, ReturnType<typeof runNumpy>> = {};
  for (const t of threadCounts) numpy[t] = runNumpy(shapes, t === 1 ? 1 : 'all');

  for (const path of info.available) {
    setGemmPath(path);
    // The JS path is single-threaded, so an all-cores row would only repeat it.
    for (const threads of path === 'js' ? [1] : threadCounts) {
      setGemmThreads(threads);
      for (const { name, shape } of SHAPES) {
        const { gflops, reps } = timeGemm(shape, path === 'js' ? JS_MAX_SECONDS : Infinity);
        rows.push({ shape: name, m: shape[0], k: shape[1], n: shape[2], path, threads, gflops, reps });
      }
    }
  }
  setGemmPath('auto');
  setGemmThreads(info.threads);

  for (const t of threadCounts) {
    const np = numpy[t];
    if ('error' in np) continue;
    SHAPES.forEach(({ name, shape }, i) =>
      rows.push({ shape: name, m: shape[0], k: shape[1], n: shape[2], path: 'numpy', threads: t, ...np.results[i] }));
  }
  for (const row of rows) {
    const ref = rows.find((r) => r.path === 'numpy' && r.shape === row.shape && r.threads === row.threads);
    if (ref && row.path !== 'numpy') row.ratioToNumpy = row.gflops / ref.gflops;
  }

  printTable(rows);
  const targets = summarizeTargets(rows);
  if ('error' in peak) {
    targets.push(`wasm f32x4 peak not measured: ${peak.error}`);
  } else {
    const counts = Object.entries(peak.byAccumulators).map(([a, g]) => `${a}: ${g.toFixed(1)}`).join(', ');
    targets.push(`wasm f32x4 ${peak.op} peak, 1 thread, no memory traffic: ${peak.gflops.toFixed(1)} GFLOP/s (by chains ${counts})`);
    for (const shape of ['512^3', '1024^3']) {
      const r = rows.find((x) => x.path === 'wasm' && x.threads === 1 && x.shape === shape);
      if (r) targets.push(`wasm 1-thread ${shape}: ${r.gflops.toFixed(1)} GFLOP/s = ${(100 * r.gflops / peak.gflops).toFixed(0)}% of that peak`);
    }
  }
  for (const line of targets) console.log(line);

  const numpyInfo = Object.values(numpy).find((r) => !('error' in r)) as { info: unknown } | undefined;
  const result = {
    machine: machine(),
    gemm: { ...info, available: info.available },
    numpy: numpyInfo?.info ?? { error: Object.values(numpy).map((r) => ('error' in r ? r.error : '')).join('; ') },
    removedEnv,
    wasmPeakGflops: 'error' in peak ? null : peak.gflops,
    wasmPeak: peak,
    method: `fp32, row-major, no transposes; operands from the CPU backend's array pool (tensor storage, in the wasm arena); median of ${MIN_REPS}-${MAX_REPS} reps (>= ${MIN_SECONDS}s) after 2 warm-up calls; ` +
      'numpy runs in a child python3 with OPENBLAS_NUM_THREADS=OMP_NUM_THREADS=1 for 1 thread and unset for all cores; ' +
      `${OPENBLAS_OVERRIDES.join(' and ')} are unset for numpy and for our BLAS path (removedEnv lists what this run had)`,
    rows,
    targets,
  };
  const out = resultsPath('cpu-matmul.json');
  writeFileSync(out, JSON.stringify(result, null, 2) + '\n');
  console.log(`wrote ${out}`);
  return { rows };
}

function printTable(rows: Row[]): void {
  const header = ['shape (MxK @ KxN)', 'path', 'threads', 'GFLOP/s', 'vs numpy'];
  const body = rows.map((r) => [r.shape, r.path, String(r.threads), r.gflops.toFixed(1), r.ratioToNumpy === undefined ? '' : `${(100 * r.ratioToNumpy).toFixed(0)}%`]);
  const widths = header.map((h, i) => Math.max(h.length, ...body.map((r) => r[i].length)));
  const fmt = (cells: string[]) => cells.map((c, i) => (i === 0 ? c.padEnd(widths[i]) : c.padStart(widths[i]))).join('  ');
  console.log(fmt(header));
  console.log(widths.map((w) => '-'.repeat(w)).join('  '));
  const sorted = [...rows].sort((a, b) => SHAPES.findIndex((s) => s.name === a.shape) - SHAPES.findIndex((s) => s.name === b.shape) || a.threads - b.threads);
  for (const r of sorted) console.log(fmt(body[rows.indexOf(r)]));
}

/** The targets, single-thread fp32 at 512 and 1024: wasm >= 25% of numpy, BLAS >= 90%. */
function summarizeTargets(rows: Row[]): string[] {
  const lines: string[] = [];
  for (const [path, target] of [['wasm', 0.25], ['blas', 0.9]] as const) {
    for (const shape of ['512^3', '1024^3']) {
      const r = rows.find((x) => x.path === path && x.threads === 1 && x.shape === shape);
      if (!r || r.ratioToNumpy === undefined) continue;
      const ok = r.ratioToNumpy >= target ? 'met' : 'NOT met';
      lines.push(`target ${path} 1-thread ${shape}: ${(100 * r.ratioToNumpy).toFixed(0)}% of numpy (target ${100 * target}%): ${ok}`);
    }
  }
  return lines;
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) {
  await main();
}
