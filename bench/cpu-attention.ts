// Fused (banded) vs composite (dense scores + bias) attention on the CPU: the op alone, forward and
// forward+backward, and one outer training step of the mini models with either path in the model.
// Not a test: it reports, it does not assert.
//   node --import tsx bench/cpu-attention.ts    -> table on stdout, bench/results/cpu-attention.json
import { writeFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import {
  type AttentionOptions, type Tensor, compositeAttention, foldIn, getBackend, mul, randint, randn, randomKey, scaledDotAttention, sum, tidy,
  valueAndGrad,
} from '../src/index.js';
import { preset } from '../src/model/config.js';
import { initParams, type Params } from '../src/model/transformer.js';
import { outerLoss } from '../src/model/ttt-e2e.js';
import { setAttentionPath } from '../src/nn/layers.js';
import { machine, resultsPath, timeAlternating } from './common.js';



interface OpRow {
  shape: string;
  window: number | 'none';
  fusedFwdMs: number;
  compositeFwdMs: number;
  fusedFwdBwdMs: number;
  compositeFwdBwdMs: number;
  speedupFwdBwd: number;
  reps: number;
}

const OP_SHAPES: Array<{ B: number; H: number; T: number; D: number; window?: number }> = [
  { B: 4, H: 4, T: 512, D: 32, window: 64 },
  { B: 4, H: 4, T: 512, D: 32 },
  { B: 4, H: 4, T: 2048, D: 32, window: 256 },
];

function benchOp(s: (typeof OP_SHAPES)[number]): OpRow {
  const shape = [s.B, s.H, s.T, s.D];
  const [q, k, v, r] = ['q', 'k', 'v', 'r'].map((n) => randn(foldIn(randomKey(1), n), shape, 'float32'));
  const opts: AttentionOptions = { qStart: 0, kStart: 0, window: s.window };
  const fused = (a: Tensor, b: Tensor, c: Tensor) => scaledDotAttention(a, b, c, opts);
  const composite = (a: Tensor, b: Tensor, c: Tensor) => compositeAttention(a, b, c, opts);
  const fwd = (op: typeof fused) => () => tidy(() => void op(q, k, v));
  const fwdBwd = (op: typeof fused) => {
    // A random projection, so the cotangent reaching attention is not a constant.
    const step = valueAndGrad((a: Tensor, b: Tensor, c: Tensor) => sum(mul(op(a, b, c), r)), { argnums: [0, 1, 2] });
    return () => tidy(() => void step(q, k, v));
  };
  const [minReps, minSec] = s.T > 1024 ? [3, 2] : [7, 2];
  const f = timeAlternating([fwd(fused), fwd(composite)], minReps, minSec);
  const fb = timeAlternating([fwdBwd(fused), fwdBwd(composite)], minReps, minSec);
  return {
    shape: `B${s.B} H${s.H} T${s.T} D${s.D}`,
    window: s.window ?? 'none',
    fusedFwdMs: f.s[0] * 1e3,
    compositeFwdMs: f.s[1] * 1e3,
    fusedFwdBwdMs: fb.s[0] * 1e3,
    compositeFwdBwdMs: fb.s[1] * 1e3,
    speedupFwdBwd: fb.s[1] / fb.s[0],
    reps: Math.min(f.reps, fb.reps),
  };
}

interface ModelRow {
  model: string;
  B: number;
  T: number;
  compositeMs: number;
  fusedMs: number;
  speedup: number;
  reps: number;
}

function benchModel(variant: 'swa' | 'e2e', B: number, T: number): ModelRow {
  const c = preset('mini', variant);
  const params = initParams(c, randomKey(0));
  const tokens = randint(randomKey(2), [B, T], 0, c.vocabSize);
  const targets = randint(randomKey(3), [B, T], 0, c.vocabSize);
  const step = valueAndGrad((p: Params) => outerLoss(c, p, tokens, targets));
  const run = (path: 'fused' | 'composite') => () => {
    setAttentionPath(path);
    tidy(() => void step(params));
  };
  const reps = variant === 'e2e' ? 4 : 6;
  const t = timeAlternating([run('composite'), run('fused')], reps, 0, reps);
  setAttentionPath('fused');
  return { model: `mini/${variant}`, B, T, compositeMs: t.s[0] * 1e3, fusedMs: t.s[1] * 1e3, speedup: t.s[0] / t.s[1], reps };
}

function table(header: string[], rows: string[][]): void {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)));
  const fmt = (cells: string[]) => cells.map((c, i) => (i === 0 ? c.padEnd(widths[i]) : c.padStart(widths[i]))).join('  ');
  console.log(fmt(header));
  console.log(widths.map((w) => '-'.repeat(w)).join('  '));
  for (const r of rows) console.log(fmt(r));
}


export async function main(): Promise<{ ops: OpRow[]; models: ModelRow[] }> {
  const ops = OP_SHAPES.map(benchOp);
  console.log('attention op, float32 (ms, median):');
  table(
    ['shape', 'window', 'fused fwd', 'composite fwd', 'fused fwd+bwd', 'composite fwd+bwd', 'speed-up fwd+bwd'],
    ops.map((r) => [r.shape, String(r.window), r.fusedFwdMs.toFixed(1), r.compositeFwdMs.toFixed(1), r.fusedFwdBwdMs.toFixed(1),
      r.compositeFwdBwdMs.toFixed(1), `${r.speedupFwdBwd.toFixed(2)}x`]),
  );
  const models = [benchModel('swa', 4, 512), benchModel('e2e', 4, 512)];
  console.log('\nvalueAndGrad(outerLoss), float32 (ms, median): before = composite attention, after = fused');
  table(
    ['model', 'B', 'T', 'before', 'after', 'speed-up'],
    models.map((r) => [r.model, String(r.B), String(r.T), r.compositeMs.toFixed(0), r.fusedMs.toFixed(0), `${r.speedup.toFixed(2)}x`]),
  );
  const result = {
    machine: machine(),
    backend: getBackend().info(),
    method: 'float32; each figure is the median over repeated runs after one warm-up, every run inside tidy(); ' +
      'fused and composite runs alternate; fwd+bwd = valueAndGrad of sum(attention(q, k, v) * R) w.r.t. q, k, v; model rows time one valueAndGrad(outerLoss) step ' +
      'of preset(mini, variant) from initParams, with layers.attend switched between the composite and the fused op',
    ops,
    models,
  };
  const out = resultsPath('cpu-attention.json');
  writeFileSync(out, JSON.stringify(result, null, 2) + '\n');
  console.log(`wrote ${out}`);
  return { ops, models };
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) await main();
