/**
 * GPU: GEMM through the engine (cuBLAS via koffi) beside PyTorch's torch.matmul on the same shapes in
 * the same run, in float32 (TF32 off on both sides) and bfloat16 (tensor cores, fp32 accumulation).
 * The largest bf16 rate measured here is the "measured bf16 peak" that MFU figures divide by.
 * Per-op overhead lives in bench/cuda-overhead.ts.
 * Needs the cuda backend and python3 with torch for the comparison. Writes bench/results/cuda-gemm.json.
 */
import { spawnSync } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { type DType, cast, dispose, getBackend, matmul, randn, randomKey, setBackend, tidy } from '../src/index.js';
import { median, resultsPath } from './common.js';

type Shape = [number, number, number]; // m, k, n
const SHAPES: Shape[] = [[1024, 1024, 1024], [2048, 2048, 2048], [4096, 4096, 4096], [8192, 8192, 8192],
  [8192, 768, 2048], [8192, 2048, 768], [8192, 768, 768]];

function sync(): void {
  (getBackend() as unknown as { synchronize(): void }).synchronize();
}

function engineGemm([m, k, n]: Shape, dtype: DType): number {
  const a = cast(randn(randomKey(1), [m, k]), dtype);
  const b = cast(randn(randomKey(2), [k, n]), dtype);
  const once = () => tidy(() => void matmul(a, b));
  once();
  sync();
  const reps = Math.max(3, Math.min(50, Math.round((dtype === 'bfloat16' ? 2e12 : 2e11) / (2 * m * n * k))));
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
dtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16}[sys.argv[2]]
out = []
for m, k, n in json.loads(sys.argv[1]):
    a = torch.randn(m, k, device='cuda').to(dtype); b = torch.randn(k, n, device='cuda').to(dtype)
    torch.matmul(a, b); torch.cuda.synchronize()
    reps = max(3, min(50, round((2e12 if dtype == torch.bfloat16 else 2e11) / (2 * m * n * k))))
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

export async function main(): Promise<unknown> {
  try {
    setBackend('cuda');
  } catch (e) {
    console.log(`cuda-gemm: skipped (${(e as Error).message.split('\n')[0].slice(0, 200)})`);
    return null;
  }
  const rows: Record<string, unknown>[] = [];
  const torchInfo: Record<string, unknown> = {};
  for (const dtype of ['float32', 'bfloat16'] as DType[]) {
    const ours = SHAPES.map((s) => engineGemm(s, dtype));
    const py = spawnSync('python3', ['-c', TORCH, JSON.stringify(SHAPES), dtype], { encoding: 'utf8', timeout: 300_000 });
    const torch = py.status === 0 ? JSON.parse(py.stdout.trim().split('\n').pop()!) : { error: (py.stderr || '').trim().split('\n').pop() };
    Object.assign(torchInfo, { torch: torch.torch, gpu: torch.gpu, error: torch.error });
    console.log(`\n${dtype} GEMM${dtype === 'float32' ? ' (TF32 off)' : ' (tensor cores, fp32 accumulation)'}, TFLOP/s, medians; ${torch.gpu ?? 'GPU'}, torch ${torch.torch ?? torch.error}`);
    console.log('shape                      ours    torch   ours/torch');
    SHAPES.forEach((s, i) => {
      const r = { dtype, shape: `${s[0]}x${s[1]} @ ${s[1]}x${s[2]}`, oursTflops: ours[i], torchTflops: torch.tflops?.[i] as number | undefined, ratio: torch.tflops ? ours[i] / torch.tflops[i] : undefined };
      rows.push(r);
      console.log(`${r.shape.padEnd(24)} ${r.oursTflops.toFixed(1).padStart(6)} ${(r.torchTflops?.toFixed(1) ?? '-').padStart(8)} ${(r.ratio ? `${(r.ratio * 100).toFixed(0)}%` : '-').padStart(11)}`);
    });
  }
  const bf16 = rows.filter((r) => r.dtype === 'bfloat16');
  const peakBf16Tflops = Math.max(...bf16.map((r) => Math.max(r.oursTflops as number, (r.torchTflops as number | undefined) ?? 0)));
  console.log(`measured bf16 peak (largest rate above): ${peakBf16Tflops.toFixed(0)} TFLOP/s`);
  const out = resultsPath('cuda-gemm.json');
  writeFileSync(out, JSON.stringify({ date: new Date().toISOString(), backend: getBackend().info(), torch: torchInfo, rows, peakBf16Tflops }, null, 1));
  console.log(`wrote ${out}`);
  return rows;
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) await main();
