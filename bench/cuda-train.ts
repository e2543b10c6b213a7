/**
 * GPU training throughput of the `small` (12 layers, d 512, vocabulary 50257, window 1024, mini-batch
 * 256) and `125m` (d 768, vocabulary 128256, window 8192, mini-batch 1024) presets: one full step =
 * value and gradient of the training objective plus an AdamW update, for full attention and SWA
 * (next-token loss) and TTT-E2E (the meta-learning outer loss: every inner step, and the
 * second-order backward through them), each in float32 and in bf16 compute with float32 parameters
 * (`computeDType: 'bfloat16'`). Reports ms/step, tokens/s, and model FLOP utilisation against the
 * measured bf16 GEMM peak (bench/results/cuda-gemm.json, else measured here).
 *
 * Model FLOPs per token (the usual "6N" count, which MFU is defined by): 6·(N_blocks + V·d) for the
 * GEMMs of forward and backward, including the tied output projection, plus attention
 * 12·L·d·w̄ (QKᵀ and PV, forward + backward) with w̄ the mean number of keys a query sees. For TTT-E2E
 * this is the same count as SWA: the inner loop's extra work (the suffix's inner gradients and the
 * second-order backward) is overhead by this definition, so its MFU is "useful" utilisation.
 * Usage: node dist/bench/cuda-train.js [T] [batch] [presets] [variants] [computes]
 *   (defaults T 2048, batch 1, small,125m, full,swa,e2e, fp32,bf16)
 * Writes bench/results/cuda-train-<presets joined by '-'>.json.
 */
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { cast, dispose, getBackend, keep, leaves, matmul, randint, randn, randomKey, setBackend, tidy, valueAndGrad } from '../src/index.js';
import type { CudaBackend } from '../src/backends/cuda/backend.js';
import { type ModelConfig, preset } from '../src/model/config.js';
import { type Params, initParams } from '../src/model/transformer.js';
import { outerLoss } from '../src/model/ttt-e2e.js';
import { AdamW } from '../src/train/adamw.js';
import { median, resultsPath } from './common.js';

function sync(): void {
  (getBackend() as unknown as CudaBackend).synchronize();
}

/** Mean keys per query of causal attention with window w over T tokens. */
function meanKeys(T: number, w: number): number {
  let s = 0;
  for (let i = 0; i < T; i++) s += Math.min(i + 1, w);
  return s / T;
}

function flopsPerToken(c: ModelConfig, params: Params, T: number): number {
  const blockParams = leaves(params.blocks).reduce((a, t) => a + t.size, 0) + leaves(params.fast).reduce((a, t) => a + t.size, 0);
  return 6 * (blockParams + c.vocabSize * c.dModel) + 12 * c.nLayers * c.dModel * meanKeys(T, c.window);
}

function measuredPeak(): { tflops: number; source: string } {
  const file = resultsPath('cuda-gemm.json');
  if (existsSync(file)) {
    const j = JSON.parse(readFileSync(file, 'utf8'));
    if (j.peakBf16Tflops && j.backend?.device === getBackend().info().device) return { tflops: j.peakBf16Tflops, source: 'bench/results/cuda-gemm.json' };
  }
  const n = 8192;
  const a = cast(randn(randomKey(1), [n, n]), 'bfloat16');
  const b = cast(randn(randomKey(2), [n, n]), 'bfloat16');
  const ts: number[] = [];
  for (let r = 0; r < 6; r++) {
    sync();
    const t0 = performance.now();
    for (let i = 0; i < 10; i++) tidy(() => void matmul(a, b));
    sync();
    if (r > 0) ts.push((performance.now() - t0) / 10 / 1e3);
  }
  dispose([a, b]);
  return { tflops: (2 * n ** 3) / median(ts) / 1e12, source: 'engine bf16 GEMM 8192^3, measured here' };
}

interface Row {
  preset: string;
  variant: string;
  compute: string;
  T: number;
  batch: number;
  msPerStep: number;
  tokensPerSec: number;
  flopsPerToken: number;
  tflops: number;
  mfu: number;
  peakMemoryGiB: number;
}

function measure(presetName: string, variant: 'full' | 'swa' | 'e2e', bf16: boolean, T: number, batch: number, peak: number, steps = 5): Row {
  const c = preset(presetName, variant, bf16 ? { computeDType: 'bfloat16' } : {});
  let params = initParams(c, randomKey(0));
  const opt = new AdamW(params, { weightDecay: 0.1 });
  const tokens = keep(randint(randomKey(1), [batch, T], 0, c.vocabSize));
  const targets = keep(randint(randomKey(2), [batch, T], 0, c.vocabSize));
  const be = getBackend() as unknown as CudaBackend;
  be.resetPeakMemory();
  const times: number[] = [];
  for (let i = 0; i <= steps; i++) {
    sync();
    const t0 = performance.now();
    const grads = tidy(() => {
      const [loss, g] = valueAndGrad((p: Params) => outerLoss(c, p, tokens, targets))(params);
      loss.dispose();
      return g as Params;
    });
    params = opt.step(params, grads, 1e-4);
    dispose(grads);
    sync();
    if (i > 0) times.push(performance.now() - t0);
  }
  const fpt = flopsPerToken(c, params, T);
  const ms = median(times);
  const tps = (batch * T) / (ms / 1e3);
  const peakMemoryGiB = be.memoryStats().peak / 2 ** 30;
  dispose([params, tokens, targets]);
  opt.dispose();
  be.emptyCache();
  return { preset: presetName, variant, compute: bf16 ? 'bf16 (fp32 params)' : 'fp32', T, batch, msPerStep: ms, tokensPerSec: tps, flopsPerToken: fpt, tflops: (fpt * tps) / 1e12, mfu: (fpt * tps) / 1e12 / peak, peakMemoryGiB };
}

export async function main(): Promise<unknown> {
  try {
    setBackend('cuda');
  } catch (e) {
    console.log(`cuda-train: skipped (${(e as Error).message.split('\n')[0].slice(0, 200)})`);
    return null;
  }
  const T = Number(process.argv[2] ?? 2048);
  const batch = Number(process.argv[3] ?? 1);
  const presets = (process.argv[4] ?? 'small,125m').split(',');
  const variants = (process.argv[5] ?? 'full,swa,e2e').split(',') as ('full' | 'swa' | 'e2e')[];
  const computes = (process.argv[6] ?? 'fp32,bf16').split(',');
  const peak = measuredPeak();
  const rows: Row[] = [];
  for (const p of presets) {
    for (const variant of variants) {
      for (const bf16 of computes.map((x) => x === 'bf16')) {
        try {
          const r = measure(p, variant, bf16, T, batch, peak.tflops);
          rows.push(r);
          console.log(`measured ${r.preset} ${r.variant} ${r.compute}: ${r.msPerStep.toFixed(1)} ms/step`);
        } catch (e) {
          console.log(`${p} ${variant} ${bf16 ? 'bf16' : 'fp32'}: failed: ${(e as Error).message.split('\n')[0]}`);
        }
      }
    }
  }
  console.log(`training step (value+grad+AdamW), T ${T}, batch ${batch}, median of 5; MFU vs measured bf16 peak ${peak.tflops.toFixed(0)} TFLOP/s (${peak.source})`);
  console.log('preset variant  compute               ms/step   tokens/s   TFLOP/s    MFU   peak GiB');
  for (const r of rows) {
    console.log(`${r.preset.padEnd(6)} ${r.variant.padEnd(8)} ${r.compute.padEnd(20)} ${r.msPerStep.toFixed(1).padStart(8)} ${r.tokensPerSec.toFixed(0).padStart(10)} ${r.tflops.toFixed(1).padStart(9)} ${(r.mfu * 100).toFixed(1).padStart(5)}% ${r.peakMemoryGiB.toFixed(2).padStart(9)}`);
  }
  // one file per preset list, so the small and 125m runs do not overwrite each other
  const out = resultsPath(`cuda-train-${presets.join('-')}.json`);
  writeFileSync(out, JSON.stringify({ date: new Date().toISOString(), backend: getBackend().info(), peakBf16: peak, rows }, null, 1));
  console.log(`wrote ${out}`);
  return rows;
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) await main();
