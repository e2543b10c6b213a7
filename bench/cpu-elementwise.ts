// Elementwise kernels on the CPU: binary arithmetic (float32 / float64, same shape and broadcasts) and
// float32 transcendental kernels, the JS loops vs the WebAssembly SIMD kernels
// (src/backends/cpu/wasm-elementwise.ts), median ns per element (and GB/s for binary ops: 3 arrays
// moved) at 64..1e6 elements, through the backend on pool storage (in the shared wasm arena, so the
// wasm kernels run in place); the fused attention op (its
// probability blocks); then the `mini` outer training step (swa and e2e) with the wasm kernels off and on. Not a test: it reports, it does not assert.
//   node --import tsx bench/cpu-elementwise.ts    -> table on stdout, bench/results/cpu-elementwise.json
import { writeFileSync } from 'node:fs';
import { availableParallelism, loadavg } from 'node:os';
import { fileURLToPath } from 'node:url';
import { attentionBackward, attentionForward } from '../src/backends/cpu/attention.js';
import { CpuBackend } from '../src/backends/cpu/backend.js';
import { pool } from '../src/backends/cpu/pool.js';
import { WASM_MIN, setWasmElementwise, wasmElementwiseInfo } from '../src/backends/cpu/wasm-elementwise.js';
import type { BinaryOp } from '../src/engine/backend.js';
import { randint, randomKey, tidy, valueAndGrad } from '../src/index.js';
import { preset } from '../src/model/config.js';
import { initParams } from '../src/model/transformer.js';
import { outerLoss } from '../src/model/ttt-e2e.js';
import { resultsPath, timeAlternating } from './common.js';



type Kernel = 'exp' | 'sigmoid' | 'silu' | 'softmax' | 'logsumexp';
interface BinaryRow {
  op: string; dtype: 'float32' | 'float64'; broadcast: string; size: number;
  jsNsPerElem: number; wasmNsPerElem: number; jsGBs: number; wasmGBs: number; speedup: number;
}
interface KernelRow { kernel: Kernel; size: number; jsNsPerElem: number; wasmNsPerElem: number; speedup: number }
interface AttentionRow { pass: 'forward' | 'forward+backward'; jsMs: number; wasmMs: number; speedup: number }
interface StepRow { variant: 'swa' | 'e2e'; jsMs: number; wasmMs: number; speedup: number }

/** With the size threshold lifted (WASM_MIN.binary = 0) so the small sizes show where wasm starts to pay. */
function binaryRows(quick: boolean): BinaryRow[] {
  const be = new CpuBackend();
  const threshold = WASM_MIN.binary;
  WASM_MIN.binary = 0;
  const rows: BinaryRow[] = [];
  const sizes = quick ? [256, 1e4, 1e6] : [64, 128, 256, 512, 1024, 4096, 1e4, 1e5, 1e6];
  const cases: Array<{ op: BinaryOp; dtype: 'float32' | 'float64'; broadcast: string; sizes: number[] }> = [
    { op: 'add', dtype: 'float32', broadcast: 'same shape', sizes },
    { op: 'mul', dtype: 'float32', broadcast: 'same shape', sizes: quick ? [1e5] : [1e3, 1e5, 1e6] },
    { op: 'div', dtype: 'float32', broadcast: 'same shape', sizes: quick ? [1e5] : [1e3, 1e5, 1e6] },
    { op: 'maximum', dtype: 'float32', broadcast: 'same shape', sizes: quick ? [1e5] : [1e3, 1e5, 1e6] },
    { op: 'add', dtype: 'float32', broadcast: 'scalar', sizes: quick ? [1e5] : [1e3, 1e5, 1e6] },
    { op: 'add', dtype: 'float32', broadcast: 'row [n,256]+[256]', sizes: quick ? [1 << 16] : [1 << 10, 1 << 16, 1 << 20] },
    { op: 'mul', dtype: 'float32', broadcast: 'column [n,256]*[n,1]', sizes: quick ? [1 << 16] : [1 << 10, 1 << 16, 1 << 20] },
    { op: 'add', dtype: 'float64', broadcast: 'same shape', sizes: quick ? [1e5] : [256, 1e3, 1e5, 1e6] },
  ];
  for (const c of cases) {
    for (const size of c.sizes) {
      const d = 256;
      const [sa, sb, shape, bLen] = c.broadcast === 'same shape' ? [[1], [1], [size], size]
        : c.broadcast === 'scalar' ? [[1], [0], [size], 1]
        : c.broadcast.startsWith('row') ? [[d, 1], [0, 1], [size / d, d], d]
        : [[d, 1], [1, 0], [size / d, d], size / d];
      const fill = (n: number) => {
        const t = be.fill(n, c.dtype, 0);
        for (let i = 0; i < n; i++) t[i] = Math.sin(i * 12.9898) * 8 + 9; // positive: no 0/0
        return t;
      };
      const a = fill(size);
      const b = fill(bLen);
      const inner = Math.max(1, Math.round(2e6 / size)); // ~2M elements per timed sample
      const repeat = (on: boolean) => () => {
        setWasmElementwise(on);
        for (let r = 0; r < inner; r++) be.free(be.binary(c.op, a, sa, b, sb, shape, c.dtype), c.dtype, size);
      };
      const [js, wasm] = timeAlternating([repeat(false), repeat(true)], 9, quick ? 0.2 : 0.6, 300).s;
      const jsNs = (js / inner / size) * 1e9;
      const wasmNs = (wasm / inner / size) * 1e9;
      const bytes = (c.dtype === 'float64' ? 8 : 4) * 3;
      rows.push({
        op: c.op, dtype: c.dtype, broadcast: c.broadcast, size, jsNsPerElem: jsNs, wasmNsPerElem: wasmNs,
        jsGBs: bytes / jsNs, wasmGBs: bytes / wasmNs, speedup: jsNs / wasmNs,
      });
      be.free(a, c.dtype, size);
      be.free(b, c.dtype, bLen);
    }
  }
  setWasmElementwise(true);
  WASM_MIN.binary = threshold;
  return rows;
}

function kernelRows(quick: boolean): KernelRow[] {
  const be = new CpuBackend();
  const rows: KernelRow[] = [];
  const sizes = quick ? [1e3, 1e5] : [1e3, 1e4, 1e5, 1e6];
  for (const kernel of ['exp', 'sigmoid', 'silu', 'softmax', 'logsumexp'] as Kernel[]) {
    for (const size of sizes) {
      const x = new Float32Array(size);
      for (let i = 0; i < size; i++) x[i] = Math.sin(i * 12.9898) * 8;
      const rowLen = 256; // softmax / logsumexp over rows of a vocabulary-like width
      const call = () => {
        let out: unknown;
        if (kernel === 'softmax') out = be.softmax(x, Math.floor(size / rowLen), rowLen, 'float32');
        else if (kernel === 'logsumexp') out = be.logsumexp(x, Math.floor(size / rowLen), rowLen, 'float32');
        else out = be.unary(kernel, x, size, 'float32');
        be.free(out, 'float32', kernel === 'logsumexp' ? Math.floor(size / rowLen) : kernel === 'softmax' ? Math.floor(size / rowLen) * rowLen : size);
      };
      const inner = Math.max(1, Math.round(2e5 / size)); // ~0.2M elements per timed sample
      const repeat = (on: boolean) => () => {
        setWasmElementwise(on);
        for (let r = 0; r < inner; r++) call();
      };
      const [js, wasm] = timeAlternating([repeat(false), repeat(true)], 7, quick ? 0.3 : 1, 200).s;
      const n = kernel === 'softmax' || kernel === 'logsumexp' ? Math.floor(size / rowLen) * rowLen : size;
      const jsNs = (js / inner / n) * 1e9;
      const wasmNs = (wasm / inner / n) * 1e9;
      rows.push({ kernel, size: n, jsNsPerElem: jsNs, wasmNsPerElem: wasmNs, speedup: jsNs / wasmNs });
    }
  }
  setWasmElementwise(true);
  return rows;
}

/** The fused attention op at the mini model's shape (16 heads·batch, 512 rows, d 32, window 64). */
function attentionRows(quick: boolean): AttentionRow[] {
  const job = { batch: 16, tq: 512, tk: 512, d: 32, qStart: 0, kStart: 0, window: 64, scale: 1 / Math.sqrt(32) };
  const mk = (n: number) => Float32Array.from({ length: n }, (_, i) => Math.sin(i * 0.7) * 2);
  const [q, k, v, dO] = [mk(16 * 512 * 32), mk(16 * 512 * 32), mk(16 * 512 * 32), mk(16 * 512 * 32)];
  const rows: AttentionRow[] = [];
  for (const pass of ['forward', 'forward+backward'] as const) {
    const run = (on: boolean) => () => {
      setWasmElementwise(on);
      const f = attentionForward(q, k, v, job, 'float32');
      if (pass === 'forward+backward') {
        const b = attentionBackward(q, k, v, f.out, f.lse, dO, job, 'float32');
        for (const a of [b.dq, b.dk, b.dv]) pool.release(a, 'float32', a.length);
      }
      pool.release(f.out, 'float32', f.out.length);
      pool.release(f.lse, 'float32', f.lse.length);
    };
    const [js, wasm] = timeAlternating([run(false), run(true)], 5, quick ? 0.5 : 2, 200).s;
    rows.push({ pass, jsMs: js * 1e3, wasmMs: wasm * 1e3, speedup: js / wasm });
  }
  setWasmElementwise(true);
  return rows;
}

function stepRows(quick: boolean): StepRow[] {
  const rows: StepRow[] = [];
  for (const variant of ['swa', 'e2e'] as const) {
    const c = preset('mini', variant, { window: 64, miniBatch: 32 });
    const params = initParams(c, randomKey(0));
    const toks = randint(randomKey(1), [4, 512], 0, 256);
    const tg = randint(randomKey(2), [4, 512], 0, 256);
    const step = (on: boolean) => () => {
      setWasmElementwise(on);
      tidy(() => {
        const [l] = valueAndGrad((p: typeof params) => outerLoss(c, p, toks, tg))(params);
        l.item();
      });
    };
    const [js, wasm] = timeAlternating([step(false), step(true)], quick ? 2 : 8, 0, quick ? 2 : 8).s;
    rows.push({ variant, jsMs: js * 1e3, wasmMs: wasm * 1e3, speedup: js / wasm });
  }
  setWasmElementwise(true);
  return rows;
}

export async function main(): Promise<unknown> {
  const quick = process.argv.includes('--quick');
  const info = wasmElementwiseInfo();
  if (!info.available) {
    console.log(`wasm elementwise kernels unavailable (${info.error}); nothing to compare`);
    return { info };
  }
  const load0 = loadavg()[0];
  const binary = binaryRows(quick);
  console.log('binary op  dtype    broadcast               elements   JS ns/elem  wasm ns/elem   JS GB/s  wasm GB/s  speedup');
  for (const r of binary) {
    console.log(`${r.op.padEnd(10)} ${r.dtype.padEnd(8)} ${r.broadcast.padEnd(22)} ${String(r.size).padStart(9)} ${r.jsNsPerElem.toFixed(3).padStart(12)} ${r.wasmNsPerElem.toFixed(3).padStart(13)} ${r.jsGBs.toFixed(1).padStart(9)} ${r.wasmGBs.toFixed(1).padStart(10)} ${r.speedup.toFixed(2).padStart(8)}x`);
  }
  console.log('');
  const kernels = kernelRows(quick);
  console.log('kernel      elements    JS ns/elem  wasm ns/elem  speedup');
  for (const r of kernels) {
    console.log(`${r.kernel.padEnd(10)} ${String(r.size).padStart(9)} ${r.jsNsPerElem.toFixed(2).padStart(12)} ${r.wasmNsPerElem.toFixed(2).padStart(13)} ${r.speedup.toFixed(2).padStart(8)}x`);
  }
  const attention = attentionRows(quick);
  console.log('\nfused attention, float32, [16 x 512 x 32], window 64, median ms');
  console.log('pass               JS exp   wasm exp   speedup');
  for (const r of attention) console.log(`${r.pass.padEnd(17)} ${r.jsMs.toFixed(1).padStart(7)} ${r.wasmMs.toFixed(1).padStart(10)} ${r.speedup.toFixed(2).padStart(8)}x`);
  const steps = process.argv.includes('--no-steps') ? [] : stepRows(quick);
  if (steps.length) {
    console.log('\nmini outer step (4 x 512, window 64, miniBatch 32), median ms');
    console.log('variant   JS exp    wasm exp   speedup');
    for (const r of steps) console.log(`${r.variant.padEnd(8)} ${r.jsMs.toFixed(0).padStart(7)} ${r.wasmMs.toFixed(0).padStart(10)} ${r.speedup.toFixed(2).padStart(8)}x`);
  }
  const result = {
    date: new Date().toISOString(),
    node: process.version,
    cpus: availableParallelism(),
    loadavgBefore: load0,
    loadavgAfter: loadavg()[0],
    wasm: info,
    poolAfter: pool.stats(),
    binary,
    kernels,
    attention,
    steps,
  };
  const file = resultsPath('cpu-elementwise.json');
  writeFileSync(file, JSON.stringify(result, null, 2) + '\n');
  console.log(`\nwrote ${file}`);
  return result;
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) await main();
