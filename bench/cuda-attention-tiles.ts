/**
 * GPU, tuning aid: the tensor-core (bf16) attention kernels under several tile shapes, each in its own
 * process (the tiles and FM_OPTIONS are compiled into the module), timed on the shapes of bench/cuda-attention.ts and
 * checked against the SIMT kernels on a ragged banded case. What it found is what FM_TILES holds.
 *
 * Usage: node dist/bench/cuda-attention-tiles.js ['[{"fwd":{"64":[128,64]}}, ...]']
 * (default: a sweep around the current tiles for d 64). Writes bench/results/cuda-attention-tiles.json.
 */
import { spawnSync } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { type Tensor, cast, dispose, randn, randomKey, setBackend } from '../src/index.js';
import type { CudaBackend } from '../src/backends/cuda/backend.js';
import { FM_OPTIONS, FM_TILES } from '../src/backends/cuda/kernels/attention-mma.js';
import { attentionPlan } from '../src/backends/cuda/kernels/attention.js';
import { type Shape, type Times, ours } from './cuda-attention.js';
import { resultsPath } from './common.js';

/** Tile changes per kernel and head dim, and FM_OPTIONS changes. */
type Tiles = Partial<Record<'fwd' | 'dq' | 'dkv', Record<string, [number, number]>>> & { pipeline?: boolean };

const SHAPES: Shape[] = [
  { T: 2048, batch: 4, heads: 12, d: 64, window: null },
  { T: 8192, batch: 1, heads: 12, d: 64, window: null },
  { T: 8192, batch: 1, heads: 12, d: 64, window: 1024 },
];

const SWEEP: Tiles[] = [
  {},
  { pipeline: false },
  { fwd: { 64: [64, 64] } },
  { fwd: { 64: [128, 128] } },
  { dq: { 64: [64, 64] } },
  { dq: { 64: [128, 64] } },
  { dkv: { 64: [64, 64] } },
  { dkv: { 64: [64, 128] } },
];

/** Largest |a − b| over max |b| of out, dq, dk, dv: tensor cores under these tiles vs the SIMT kernels. */
function checkVsSimt(b: CudaBackend): number {
  const job = { batch: 3, tq: 1000, tk: 1000, d: 64, qStart: 0, kStart: 0, window: 300, scale: 0.125 };
  const mk = (seed: number): Tensor => {
    const x = randn(randomKey(seed), [job.batch, job.tq, job.d]);
    const y = cast(x, 'bfloat16');
    x.dispose();
    return y;
  };
  const [q, k, v, dout] = [mk(1), mk(2), mk(3), mk(4)];
  const run = (tc: boolean): Float32Array[] => {
    b.attentionTensorCores = tc;
    const r = b.attentionForward(q.data, k.data, v.data, job, 'bfloat16');
    const g = b.attentionBackward(q.data, k.data, v.data, r.out, r.lse, dout.data, job, 'bfloat16');
    const n = job.batch * job.tq * job.d;
    const outs = [r.out, g.dq, g.dk, g.dv].map((x) => b.download(x, 'bfloat16', n) as Float32Array);
    for (const x of [r.out, r.lse, g.dq, g.dk, g.dv]) b.free(x);
    return outs;
  };
  const simt = run(false);
  const tc = run(true);
  dispose([q, k, v, dout]);
  let worst = 0;
  simt.forEach((want, w) => {
    let scale = 0;
    let err = 0;
    for (let i = 0; i < want.length; i++) {
      scale = Math.max(scale, Math.abs(want[i]));
      err = Math.max(err, Math.abs(tc[w][i] - want[i]));
    }
    worst = Math.max(worst, Number.isFinite(err) ? err / scale : Infinity);
  });
  return worst;
}

function child(tiles: Tiles): void {
  const { pipeline, ...byKernel } = tiles;
  if (pipeline !== undefined) FM_OPTIONS.pipeline = pipeline;
  for (const [kernel, byDim] of Object.entries(byKernel)) Object.assign(FM_TILES[kernel as keyof typeof FM_TILES], byDim);
  const b = setBackend('cuda') as CudaBackend;
  if (!b.attentionTensorCores) throw new Error('no tensor-core attention on this device');
  const errVsSimt = checkVsSimt(b);
  const rows = SHAPES.map((s) => ({ ...s, ...ours(b, s, 'bfloat16') }));
  const kernels = (['fwd', 'dq', 'dkv'] as const).map((kind) => {
    const p = attentionPlan('bfloat16', kind, 64, true)!;
    return { name: p.name, shared: p.shared, ...b.kernelResources('attention', 'bfloat16', p.name, p.threads, p.shared) };
  });
  console.log(JSON.stringify({ tiles: FM_TILES, options: FM_OPTIONS, errVsSimt, kernels, rows }));
}

export async function main(): Promise<unknown> {
  const sweep: Tiles[] = process.argv[2] ? JSON.parse(process.argv[2]) : SWEEP;
  const results: unknown[] = [];
  for (const tiles of sweep) {
    const r = spawnSync(process.execPath, [fileURLToPath(import.meta.url), '--child', JSON.stringify(tiles)], { encoding: 'utf8' });
    const line = r.stdout.trim().split('\n').pop() ?? '';
    if (r.status !== 0 || !line.startsWith('{')) {
      const error = (r.stderr || r.stdout).trim().split('\n').slice(-4).join(' | ');
      console.log(`${JSON.stringify(tiles)}: failed: ${error}`);
      results.push({ change: tiles, error });
      continue;
    }
    const res = JSON.parse(line) as { errVsSimt: number; rows: Array<Shape & Times>; kernels: Array<{ name: string; regs: number; localBytes: number; blocksPerSm: number }> };
    const cells = res.rows.map((x) => `T${x.T} ${x.batch}x${x.heads} ${x.window ?? 'full'}: ${x.fwdMs.toFixed(3)} / ${x.fwdBwdMs.toFixed(3)} ms`).join(' | ');
    console.log(`${JSON.stringify(tiles).padEnd(28)} err vs SIMT ${res.errVsSimt.toExponential(1)} | fwd / fwd+bwd ${cells}`);
    console.log(`${''.padEnd(28)} ${res.kernels.map((k) => `${k.name}: ${k.regs} regs, ${k.localBytes} B local, ${k.blocksPerSm} blocks/SM`).join(' | ')}`);
    results.push({ change: tiles, ...res });
  }
  const out = resultsPath('cuda-attention-tiles.json');
  writeFileSync(out, JSON.stringify({ date: new Date().toISOString(), results }, null, 1));
  console.log(`wrote ${out}`);
  return results;
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) {
  if (process.argv[2] === '--child') child(JSON.parse(process.argv[3]) as Tiles);
  else await main();
}
