/**
 * GPU: the cuda backend's fused attention (forward, and forward + backward) beside PyTorch on the same
 * shapes in the same run: `scaled_dot_product_attention(is_causal=True)` for full causal attention,
 * `flex_attention` (under torch.compile) with a causal or sliding-window block mask for both, and, for
 * windows at T <= 8192, SDPA with a dense boolean mask. heads 12 × batch, d 64, window 1024 and none;
 * float32 (TF32 off on both sides) and bfloat16 (ours: the tensor-core kernels on sm_80+, bf16
 * operands and fp32 accumulators, and the SIMT kernels beside them; torch: tensor cores). Times are device-synchronised medians; TFLOP/s count only the band: 4·d FLOPs per visible
 * (query, key) pair forward, 10·d backward (the usual FlashAttention-2 count of 2 and 5 matmuls; our
 * backward recomputes scores in both its dK/dV and dQ kernels, which is not counted).
 * The first-version row kernels are timed too where they are quick enough (T <= 8192, batch 1).
 *
 * Usage: node dist/bench/cuda-attention.js [--quick] [--no-torch] [--no-row]
 * Writes bench/results/cuda-attention.json. PyTorch failures (no torch, no flex_attention, a compile
 * error, out of memory) are recorded per path in the JSON instead of stopping the bench.
 */
import { spawnSync } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { type DType, type Tensor, cast, dispose, randn, randomKey, setBackend } from '../src/index.js';
import type { CudaBackend } from '../src/backends/cuda/backend.js';
import { attentionPlan } from '../src/backends/cuda/kernels/attention.js';
import { TORCH_MEDIAN_PY, resultsPath, syncedMedianMs } from './common.js';

export interface Shape {
  T: number;
  batch: number;
  heads: number;
  d: number;
  /** null: full causal. */
  window: number | null;
}

const HEADS = 12;
const D = 64;
function shapes(quick: boolean): Shape[] {
  const out: Shape[] = [];
  const grid: [number, number[]][] = quick ? [[2048, [1]], [8192, [1]]] : [[2048, [1, 4, 8]], [8192, [1, 4]], [32768, [1]]];
  for (const [T, batches] of grid) {
    for (const batch of batches) for (const window of [null, 1024]) out.push({ T, batch, heads: HEADS, d: D, window });
  }
  return out;
}

/** Visible (query, key) pairs of one head: sum over queries of min(i + 1, window). */
function bandPairs(T: number, window: number | null): number {
  const w = window ?? T;
  return w >= T ? (T * (T + 1)) / 2 : (w * (w + 1)) / 2 + (T - w) * w;
}
const fwdFlops = (s: Shape) => 4 * s.d * bandPairs(s.T, s.window) * s.batch * s.heads;
const bwdFlops = (s: Shape) => 10 * s.d * bandPairs(s.T, s.window) * s.batch * s.heads;

export interface Times {
  fwdMs: number;
  fwdBwdMs: number;
}

/** Our kernels through the backend directly (no autodiff bookkeeping): forward, and forward + backward. */
export function ours(b: CudaBackend, s: Shape, dtype: DType): Times {
  const n = s.batch * s.heads;
  const job = { batch: n, tq: s.T, tk: s.T, d: s.d, qStart: 0, kStart: 0, window: s.window ?? Infinity, scale: 1 / Math.sqrt(s.d) };
  const make = (seed: number): Tensor => {
    const x = randn(randomKey(seed), [n, s.T, s.d]);
    if (dtype === 'float32') return x;
    const y = cast(x, dtype);
    x.dispose();
    return y;
  };
  const [q, k, v, dout] = [make(1), make(2), make(3), make(4)];
  const fwd = () => {
    const r = b.attentionForward(q.data, k.data, v.data, job, dtype);
    b.free(r.out);
    b.free(r.lse);
  };
  const fwdBwd = () => {
    const r = b.attentionForward(q.data, k.data, v.data, job, dtype);
    const g = b.attentionBackward(q.data, k.data, v.data, r.out, r.lse, dout.data, job, dtype);
    for (const x of [r.out, r.lse, g.dq, g.dk, g.dv]) b.free(x);
  };
  // (the warm-up run also compiles and loads the kernels)
  const time = (fn: () => void, flops: number): number => syncedMedianMs(fn, Math.max(3, Math.min(15, Math.round(2e12 / flops))), () => b.synchronize());
  const out = { fwdMs: time(fwd, fwdFlops(s)), fwdBwdMs: time(fwdBwd, fwdFlops(s) + bwdFlops(s)) };
  dispose([q, k, v, dout]);
  return out;
}

const TORCH = String.raw`
import json, sys, traceback
def say(x): print(json.dumps(x), flush=True)
try:
    import torch
    import torch.nn.functional as F
except Exception as e:
    say({"meta": {"error": "import torch: %s" % e}}); sys.exit(0)
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
flex = None; create_block_mask = None; flex_error = None
try:
    from torch.nn.attention.flex_attention import flex_attention, create_block_mask
    import torch._dynamo
    torch._dynamo.config.cache_size_limit = 256  # one compiled graph per shape, dtype, mask and grad mode
    if hasattr(torch._dynamo.config, "accumulated_cache_size_limit"): torch._dynamo.config.accumulated_cache_size_limit = 1024
    flex = torch.compile(flex_attention, dynamic=False)
except Exception as e:
    flex_error = "%s: %s" % (type(e).__name__, e)
say({"meta": {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(), "tf32": torch.backends.cuda.matmul.allow_tf32, "flexError": flex_error}})

${TORCH_MEDIAN_PY}

def mask_mod_for(W):
    if W is None:
        def m(b, h, qi, ki): return qi >= ki
    else:
        def m(b, h, qi, ki): return (qi >= ki) & (qi - ki < W)
    return m

for cfg in json.loads(sys.argv[1]):
    B, H, T, D, W = cfg["batch"], cfg["heads"], cfg["T"], cfg["d"], cfg["window"]
    res = {}
    for dtname in ["float32", "bfloat16"]:
        dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtname]
        reps = max(3, min(15, round((4e12 if dt == torch.bfloat16 else 1e12) / cfg["flops"])))
        try:
            q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=dt, requires_grad=True) for _ in range(3))
            do = torch.randn(B, H, T, D, device="cuda", dtype=dt)
        except Exception as e:
            res[dtname] = {"error": "%s: %s" % (type(e).__name__, str(e)[:300])}; continue
        paths = {}
        if W is None:
            paths["sdpa"] = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif T <= 8192:
            i = torch.arange(T, device="cuda")
            dense = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < W)
            paths["sdpa_dense_mask"] = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
        if flex is not None:
            try:
                bm = create_block_mask(mask_mod_for(W), None, None, T, T, device="cuda")
                paths["flex"] = lambda: flex(q, k, v, block_mask=bm)
            except Exception as e:
                res.setdefault(dtname, {})["flex"] = {"error": "%s: %s" % (type(e).__name__, str(e)[:300])}
        elif flex_error:
            res.setdefault(dtname, {})["flex"] = {"error": flex_error}
        for name, f in paths.items():
            try:
                with torch.no_grad():
                    fwd = bench(f, reps)
                def fb():
                    q.grad = None; k.grad = None; v.grad = None
                    f().backward(do)
                res.setdefault(dtname, {})[name] = {"fwdMs": fwd, "fwdBwdMs": bench(fb, reps)}
            except Exception as e:
                res.setdefault(dtname, {})[name] = {"error": "%s: %s" % (type(e).__name__, str(e).strip().splitlines()[-1][:300] if str(e).strip() else "")}
            torch.cuda.empty_cache()
        del q, k, v, do
        torch.cuda.empty_cache()
    say({"cfg": cfg, "torch": res})
`;

type TorchPaths = Record<string, { fwdMs?: number; fwdBwdMs?: number; error?: string }>;

function runTorch(list: Shape[]): { meta: Record<string, unknown>; results: Map<string, Record<string, TorchPaths>>; error?: string } {
  const cfgs = list.map((s) => ({ ...s, flops: fwdFlops(s) + bwdFlops(s) }));
  const py = spawnSync('python3', ['-c', TORCH, JSON.stringify(cfgs)], { encoding: 'utf8', timeout: 540_000, maxBuffer: 64 << 20 });
  const results = new Map<string, Record<string, TorchPaths>>();
  let meta: Record<string, unknown> = {};
  for (const line of (py.stdout ?? '').split('\n')) {
    if (!line.startsWith('{')) continue;
    try {
      const j = JSON.parse(line);
      if (j.meta) meta = j.meta;
      else if (j.cfg) results.set(key(j.cfg), j.torch);
    } catch {
      // a partial line from a killed process
    }
  }
  const error = py.error ? String(py.error.message) : py.status !== 0 ? (py.stderr || '').trim().split('\n').slice(-3).join(' | ') : undefined;
  return { meta, results, error };
}

const key = (s: { T: number; batch: number; heads: number; d: number; window: number | null }) => `${s.T}/${s.batch}/${s.heads}/${s.d}/${s.window ?? 'full'}`;

/** The fastest successful PyTorch path: [name, fwd+bwd ms, fwd ms]. */
function fastest(paths: TorchPaths | undefined): [string, number, number] | null {
  let best: [string, number, number] | null = null;
  for (const [name, r] of Object.entries(paths ?? {})) {
    if (r.fwdBwdMs !== undefined && (!best || r.fwdBwdMs < best[1])) best = [name, r.fwdBwdMs, r.fwdMs ?? NaN];
  }
  return best;
}

export async function main(): Promise<unknown> {
  const argv = process.argv.slice(2);
  let b: CudaBackend;
  try {
    b = setBackend('cuda') as CudaBackend;
  } catch (e) {
    console.log(`cuda-attention: skipped (${(e as Error).message.split('\n')[0].slice(0, 200)})`);
    return null;
  }
  const list = shapes(argv.includes('--quick'));
  const rows: Record<string, unknown>[] = [];
  for (const s of list) {
    const row: Record<string, unknown> = { ...s, fwdGflop: fwdFlops(s) / 1e9, bwdGflop: bwdFlops(s) / 1e9 };
    for (const dt of ['float32', 'bfloat16'] as DType[]) {
      const t = ours(b, s, dt);
      row[dt] = { ...t, fwdTflops: fwdFlops(s) / t.fwdMs / 1e9, fwdBwdTflops: (fwdFlops(s) + bwdFlops(s)) / t.fwdBwdMs / 1e9 };
      console.log(`ours ${dt.padEnd(8)} T ${s.T} ${s.batch}x${s.heads} ${s.window ?? 'full'}: fwd ${t.fwdMs.toFixed(2)} ms, fwd+bwd ${t.fwdBwdMs.toFixed(2)} ms`);
    }
    if (b.attentionTensorCores) {
      // the SIMT bf16 kernels beside the tensor-core ones (what bf16 ran on before)
      b.attentionTensorCores = false;
      try {
        row.bfloat16Simt = ours(b, s, 'bfloat16');
      } finally {
        b.attentionTensorCores = true;
      }
    }
    if (!argv.includes('--no-row') && s.T <= 8192 && s.batch === 1) {
      b.attentionKernels = 'row';
      try {
        row.rowKernelsFloat32 = ours(b, s, 'float32');
      } finally {
        b.attentionKernels = 'fused';
      }
    }
    rows.push(row);
  }
  const torch = argv.includes('--no-torch') ? { meta: { skipped: '--no-torch' }, results: new Map<string, Record<string, TorchPaths>>(), error: undefined } : runTorch(list);
  for (const row of rows) row.torch = torch.results.get(key(row as unknown as Shape)) ?? null;

  const tf = (ms: number | undefined, flops: number) => (ms && Number.isFinite(ms) ? (flops / ms / 1e9).toFixed(1) : '-');
  const f = (x: number | undefined) => (x !== undefined && Number.isFinite(x) ? x.toFixed(2) : '-');
  console.log(`\nattention fwd+bwd, heads ${HEADS}, d ${D}; ms (median) and TFLOP/s of the band; ${String(torch.meta.gpu ?? 'GPU')}, torch ${String(torch.meta.torch ?? torch.meta.error ?? torch.error ?? '-')}, torch TF32 ${String(torch.meta.tf32 ?? '-')}`);
  console.log('T      BxH   window | dtype    ours ms  TFLOP/s | torch best (path)          ms  TFLOP/s | ours speed vs torch');
  for (const row of rows) {
    const s = row as unknown as Shape;
    const flops = fwdFlops(s) + bwdFlops(s);
    for (const dt of ['float32', 'bfloat16']) {
      const o = row[dt] as Times;
      const best = fastest((row.torch as Record<string, TorchPaths> | null)?.[dt]);
      (row[dt] as Record<string, unknown>).vsFastestTorch = best ? best[1] / o.fwdBwdMs : null;
      console.log(
        `${String(s.T).padEnd(6)} ${`${s.batch}x${s.heads}`.padEnd(5)} ${String(s.window ?? 'full').padEnd(6)} | ${dt.padEnd(8)} ${f(o.fwdBwdMs).padStart(8)} ${tf(o.fwdBwdMs, flops).padStart(8)} | ` +
          `${(best ? best[0] : 'n/a').padEnd(16)} ${f(best?.[1]).padStart(10)} ${tf(best?.[1], flops).padStart(8)} | ${best ? `${((best[1] / o.fwdBwdMs) * 100).toFixed(0)}%` : '-'}`,
      );
    }
    const simt = row.bfloat16Simt as Times | undefined;
    if (simt) console.log(`${''.padEnd(21)}| bf16 SIMT kernels: fwd+bwd ${f(simt.fwdBwdMs)} ms, tensor cores are ${(simt.fwdBwdMs / (row.bfloat16 as Times).fwdBwdMs).toFixed(1)}x faster`);
    const rk = row.rowKernelsFloat32 as Times | undefined;
    if (rk) console.log(`${''.padEnd(21)}| row kernels (first version) float32: fwd+bwd ${f(rk.fwdBwdMs)} ms, fused is ${(rk.fwdBwdMs / (row.float32 as Times).fwdBwdMs).toFixed(1)}x faster`);
  }
  const plans = Object.fromEntries((['fwd', 'dq', 'dkv'] as const).map((k) => [k, attentionPlan('float32', k, D)]));
  const plansBf16 = Object.fromEntries((['fwd', 'dq', 'dkv'] as const).map((k) => [k, attentionPlan('bfloat16', k, D, b.attentionTensorCores)]));
  const out = resultsPath('cuda-attention.json');
  writeFileSync(out, JSON.stringify({ date: new Date().toISOString(), backend: b.info(), plansFloat32D64: plans, plansBfloat16D64: plansBf16, torch: { ...torch.meta, error: torch.error }, rows }, null, 1));
  console.log(`wrote ${out}`);
  return rows;
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) await main();
