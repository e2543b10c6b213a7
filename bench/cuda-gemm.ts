/**
 * GPU: fp32 GEMM through the engine (cuBLAS via koffi) beside PyTorch's torch.matmul on the same shapes in
 * the same run, and the per-op overhead of a chain of 1000 small elementwise ops (launch-bound).
 * Needs the cuda backend (TTT_DEVICE=cuda is set by this bench) and python3 with torch for the comparison.
 * Writes bench/results/cuda-gemm.json. TF32 is off on both sides (plain fp32).
 */
import { spawnSync } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { type Tensor, add, dispose, getBackend, matmul, randn, randomKey, setBackend, tidy } from '../src/index.js';
import { median, resultsPath } from './common.js';

type Shape = [number, number, number]; // m, k, n
const SHAPES: Shape[] = [[1024, 1024, 1024], [2048, 2048, 2048], [4096, 4096, 4096], [8192, 8192, 8192],
  [8192, 768, 2048], [8192, 2048, 768], [8192, 768, 768]];

function sync(): void {
  (getBackend() as unknown as { synchronize(): void }).synchronize();
}

function engineGemm([m, k, n]: Shape): number {
  const a = randn(randomKey(1), [m, k]);
  const b = randn(randomKey(2), [k, n]);
  const once = () => tidy(() => void matmul(a, b));
  once();
  sync();
  const reps = Math.max(3, Math.min(50, Math.round(2e11 / (2 * m * n * k))));
  const times: number[] = [];
  for (let r = 0; r < 5; r++) {
    const t0 = performance.now();
    for (let i = 0; i < reps; i++) once();
    sync();
    times.push((performance.now() - t0) / 1000 / reps);
  }
  dispose([a, b]);
  return (2 * m * n * k) / median(times) / 1e12;
}

const TORCH = `
import json, sys, torch
torch.backends.cuda.matmul.allow_tf32 = False
out = []
for m, k, n in json.loads(sys.argv[1]):
    a = torch.randn(m, k, device='cuda'); b = torch.randn(k, n, device='cuda')
    torch.matmul(a, b); torch.cuda.synchronize()
    reps = max(3, min(50, round(2e11 / (2 * m * n * k))))
    ts = []
    for _ in range(5):
        s = torch.cuda.Event(enable_timing=True); e = torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(reps): torch.matmul(a, b)
        e.record(); torch.cuda.synchronize()
        ts.append(s.elapsed_time(e) / 1000 / reps)
    ts.sort()
    out.append(2 * m * n * k / ts[2] / 1e12)
print(json.dumps({"tflops": out, "torch": torch.__version__, "gpu": torch.cuda.get_device_name()}))
`;

/** Seconds per op of a chain of 1000 dependent adds on a 16-element tensor, device-synchronised. */
function perOpOverhead(): number {
  let x: Tensor = randn(randomKey(3), [16]);
  const times: number[] = [];
  for (let r = 0; r < 5; r++) {
    sync();
    const t0 = performance.now();
    tidy(() => {
      let y = x;
      for (let i = 0; i < 1000; i++) y = add(y, 1);
      return y;
    });
    sync();
    times.push((performance.now() - t0) / 1000 / 1000);
  }
  x.dispose();
  return median(times);
}

export async function main(): Promise<unknown> {
  try {
    setBackend('cuda');
  } catch (e) {
    console.log(`cuda-gemm: skipped (${(e as Error).message.split('\n')[0].slice(0, 200)})`);
    return null;
  }
  const ours = SHAPES.map(engineGemm);
  const py = spawnSync('python3', ['-c', TORCH, JSON.stringify(SHAPES)], { encoding: 'utf8', timeout: 300_000 });
  const torch = py.status === 0 ? JSON.parse(py.stdout.trim().split('\n').pop()!) : { error: (py.stderr || '').trim().split('\n').pop() };
  const overheadUs = perOpOverhead() * 1e6;
  const rows = SHAPES.map((s, i) => ({ shape: `${s[0]}x${s[1]} @ ${s[1]}x${s[2]}`, oursTflops: ours[i], torchTflops: torch.tflops?.[i], ratio: torch.tflops ? ours[i] / torch.tflops[i] : undefined }));
  console.log(`fp32 GEMM (TF32 off), TFLOP/s, medians; ${torch.gpu ?? 'GPU'}, torch ${torch.torch ?? torch.error}`);
  console.log('shape                      ours    torch   ours/torch');
  for (const r of rows) console.log(`${r.shape.padEnd(24)} ${r.oursTflops.toFixed(1).padStart(6)} ${(r.torchTflops?.toFixed(1) ?? '-').padStart(8)} ${(r.ratio ? `${(r.ratio * 100).toFixed(0)}%` : '-').padStart(11)}`);
  console.log(`per-op overhead (chain of 1000 adds on 16 floats): ${overheadUs.toFixed(1)} µs per op`);
  const out = resultsPath('cuda-gemm.json');
  writeFileSync(out, JSON.stringify({ date: new Date().toISOString(), backend: getBackend().info(), torch, rows, perOpOverheadUs: overheadUs }, null, 1));
  console.log(`wrote ${out}`);
  return rows;
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) await main();
