/**
 * GPU: the bfloat16 attention forward alone, on the shapes the `125m` latency and training runs give it
 * (12 heads, d 64, batch 1): full causal at 8 K / 32 K / 128 K, a window of 8192 at 32 K, and a TTT-E2E
 * inner step's (1024 queries after 8192 cached keys, window 8192). Ours with the Hopper warpgroup-MMA
 * kernel (attention-wgmma.ts, sm_90) and with the mma.sync one, beside PyTorch's SDPA forward (cuDNN
 * and FlashAttention-2 backends, causal shapes only) in the same run. Device-synchronised medians;
 * TFLOP/s count 4·d FLOPs per visible (query, key) pair.
 *
 * Usage: node dist/bench/cuda-attention-fwd.js [--no-torch]   → bench/results/cuda-attention-fwd.json
 */
import { spawnSync } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { type Tensor, cast, dispose, randn, randomKey, setBackend } from '../src/index.js';
import type { CudaBackend } from '../src/backends/cuda/backend.js';
import { TORCH_MEDIAN_PY, resultsPath, syncedMedianMs } from './common.js';

interface Shape {
  name: string;
  heads: number;
  tq: number;
  tk: number;
  qStart: number;
  window: number | null;
}

const D = 64;
const SHAPES: Shape[] = [
  { name: 'full causal 8K', heads: 12, tq: 8192, tk: 8192, qStart: 0, window: null },
  { name: 'full causal 32K', heads: 12, tq: 32768, tk: 32768, qStart: 0, window: null },
  { name: 'full causal 128K', heads: 12, tq: 131072, tk: 131072, qStart: 0, window: null },
  { name: 'window 8192, T 32K', heads: 12, tq: 32768, tk: 32768, qStart: 0, window: 8192 },
  { name: 'TTT inner step: 1024 after 8192', heads: 12, tq: 1024, tk: 9216, qStart: 8192, window: 8192 },
];

/** Visible (query, key) pairs of one head. */
function pairs(s: Shape): number {
  let n = 0;
  const w = s.window ?? Infinity;
  for (let i = 0; i < s.tq; i++) n += Math.min(s.qStart + i + 1, w);
  return n;
}
const flops = (s: Shape) => 4 * D * pairs(s) * s.heads;

function ours(b: CudaBackend, s: Shape): number {
  const job = { batch: s.heads, tq: s.tq, tk: s.tk, d: D, qStart: s.qStart, kStart: 0, window: s.window ?? Infinity, scale: 1 / Math.sqrt(D) };
  const make = (seed: number, rows: number): Tensor => {
    const x = randn(randomKey(seed), [s.heads, rows, D]);
    const y = cast(x, 'bfloat16');
    x.dispose();
    return y;
  };
  const [q, k, v] = [make(1, s.tq), make(2, s.tk), make(3, s.tk)];
  const fwd = () => {
    const r = b.attentionForward(q.data, k.data, v.data, job, 'bfloat16');
    b.free(r.out);
    b.free(r.lse);
  };
  const ms = syncedMedianMs(fwd, Math.max(5, Math.min(30, Math.round(4e12 / flops(s)))), () => b.synchronize());
  dispose([q, k, v]);
  return ms;
}

const TORCH = String.raw`
import json, sys
def say(x): print(json.dumps(x), flush=True)
try:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel, SDPBackend
except Exception as e:
    say({"meta": {"error": "import torch: %s" % e}}); sys.exit(0)
say({"meta": {"torch": torch.__version__, "gpu": torch.cuda.get_device_name()}})
${TORCH_MEDIAN_PY}
for cfg in json.loads(sys.argv[1]):
    H, T, reps = cfg["heads"], cfg["tq"], cfg["reps"]
    q, k, v = (torch.randn(1, H, T, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    res = {}
    for name, be in [("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash2", SDPBackend.FLASH_ATTENTION)]:
        try:
            with torch.no_grad(), sdpa_kernel(be):
                res[name] = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), reps)
        except Exception as e:
            res[name] = "%s: %s" % (type(e).__name__, str(e).strip().splitlines()[-1][:200] if str(e).strip() else "")
    del q, k, v
    torch.cuda.empty_cache()
    say({"name": cfg["name"], "torch": res})
`;

function runTorch(list: Shape[]): { meta: Record<string, unknown>; results: Map<string, Record<string, number | string>> } {
  const cfgs = list.map((s) => ({ name: s.name, heads: s.heads, tq: s.tq, reps: Math.max(5, Math.min(30, Math.round(4e12 / flops(s)))) }));
  const py = spawnSync('python3', ['-c', TORCH, JSON.stringify(cfgs)], { encoding: 'utf8', timeout: 300_000, maxBuffer: 16 << 20 });
  const results = new Map<string, Record<string, number | string>>();
  let meta: Record<string, unknown> = {};
  for (const line of (py.stdout ?? '').split('\n')) {
    if (!line.startsWith('{')) continue;
    const j = JSON.parse(line);
    if (j.meta) meta = j.meta;
    else results.set(j.name, j.torch);
  }
  if (py.status !== 0) meta.exit = (py.stderr || String(py.error ?? '')).trim().split('\n').slice(-2).join(' | ');
  return { meta, results };
}

export async function main(): Promise<unknown> {
  let b: CudaBackend;
  try {
    b = setBackend('cuda') as unknown as CudaBackend;
  } catch (e) {
    console.log(`cuda-attention-fwd: skipped (${(e as Error).message.split('\n')[0].slice(0, 200)})`);
    return null;
  }
  const wgmmaAvailable = b.attentionWgmma;
  const rows: Record<string, unknown>[] = [];
  for (const s of SHAPES) {
    const row: Record<string, unknown> = { ...s, d: D, gflop: flops(s) / 1e9 };
    for (const wg of wgmmaAvailable ? [true, false] : [false]) {
      b.attentionWgmma = wg;
      row[wg ? 'wgmmaMs' : 'mmaMs'] = ours(b, s);
      console.log(`  ${s.name}, ${wg ? 'wgmma' : 'mma.sync'}: ${(row[wg ? 'wgmmaMs' : 'mmaMs'] as number).toFixed(2)} ms`);
    }
    b.attentionWgmma = wgmmaAvailable;
    rows.push(row);
  }
  const causal = SHAPES.filter((s) => s.window === null && s.qStart === 0);
  const torch = process.argv.includes('--no-torch') ? null : runTorch(causal);
  const tf = (ms: unknown, s: Shape) => (typeof ms === 'number' ? ((flops(s) / ms / 1e9).toFixed(0)) : '-');
  const f = (ms: unknown) => (typeof ms === 'number' ? ms.toFixed(2) : '-');
  console.log(`\nbf16 attention forward, 12 heads, d ${D}, batch 1; ms (median) and TFLOP/s of the band; ${b.info().device}${torch ? `, torch ${String(torch.meta.torch ?? torch.meta.error ?? '-')}` : ''}`);
  console.log('shape                              | ours wgmma        | ours mma.sync     | wgmma/mma | torch cuDNN       | torch flash2      | ours vs cuDNN');
  for (let i = 0; i < SHAPES.length; i++) {
    const s = SHAPES[i];
    const row = rows[i];
    const t = torch?.results.get(s.name);
    if (t) row.torch = t;
    const best = (row.wgmmaMs ?? row.mmaMs) as number;
    const cudnn = t?.cudnn;
    if (typeof cudnn === 'number') row.vsCudnn = best / cudnn;
    const cell = (ms: unknown) => `${f(ms).padStart(8)} ${tf(ms, s).padStart(5)} TF`.padEnd(17);
    console.log(
      `${s.name.padEnd(34)} | ${cell(row.wgmmaMs)} | ${cell(row.mmaMs)} | ${typeof row.wgmmaMs === 'number' ? `${((row.mmaMs as number) / row.wgmmaMs).toFixed(2)}x`.padStart(9) : '        -'} | ${cell(cudnn)} | ${cell(t?.flash2)} | ${typeof cudnn === 'number' ? `${(best / cudnn).toFixed(2)}x` : '-'}`,
    );
  }
  const file = resultsPath('cuda-attention-fwd.json');
  const out = { date: new Date().toISOString(), device: b.info().device, wgmma: wgmmaAvailable, torch: torch?.meta ?? null, rows };
  writeFileSync(file, JSON.stringify(out, null, 1));
  console.log(`wrote ${file}`);
  return out;
}

if (process.argv[1] === fileURLToPath(import.meta.url)) await main();
