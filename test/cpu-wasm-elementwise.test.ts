import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { attentionBackward, attentionForward } from '../src/backends/cpu/attention.js';
import { CpuBackend } from '../src/backends/cpu/backend.js';
import {
  WASM_MIN, setWasmElementwise, wasmElementwiseAvailable, wasmElementwiseInfo, wasmLogsumexpF32, wasmSoftmaxF32, wasmUnaryF32,
} from '../src/backends/cpu/wasm-elementwise.js';

const available = wasmElementwiseAvailable();
if (!available) console.log(`wasm elementwise kernels unavailable (${wasmElementwiseInfo().error}): wasm tests skipped`);
const skip = !available && 'build/wasm/elementwise.wasm missing';

/** Deterministic values in [-1, 1). */
function rng(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    return s / 2 ** 31 - 1;
  };
}

/** Distance in float32 units in the last place (same-sign values; ±0 and equal NaN/Inf count 0). */
function ulps(a: number, b: number): number {
  if (Number.isNaN(a) || Number.isNaN(b)) return Number.isNaN(a) && Number.isNaN(b) ? 0 : Infinity;
  if (a === b) return 0;
  const buf = new Float32Array([a, b]);
  const i = new Int32Array(buf.buffer);
  const key = (v: number) => (v < 0 ? -0x80000000 - v : v); // monotone across the sign boundary
  return Math.abs(key(i[0]) - key(i[1]));
}

function maxUlps(got: Float32Array, want: ArrayLike<number>): { max: number; at: number } {
  let max = 0;
  let at = -1;
  for (let i = 0; i < got.length; i++) {
    const d = ulps(got[i], Math.fround(want[i]));
    if (d > max) [max, at] = [d, i];
  }
  return { max, at };
}

const JS: Record<'exp' | 'sigmoid' | 'silu', (x: number) => number> = {
  exp: Math.exp,
  sigmoid: (x) => 1 / (1 + Math.exp(-x)),
  silu: (x) => x / (1 + Math.exp(-x)),
};

test('wasm exp: within 2 ULP of Math.exp over a dense sweep of the whole float32 range', { skip }, () => {
  // 8M points from -110 to 90: subnormal results, underflow to 0 and overflow to +Inf included.
  const N = 1 << 23;
  const x = new Float32Array(N);
  for (let i = 0; i < N; i++) x[i] = -110 + (200 * i) / N;
  const out = new Float32Array(N);
  assert.ok(wasmUnaryF32('exp', x, out, N));
  const r = maxUlps(out, Array.from(x, Math.exp));
  assert.ok(r.max <= 2, `max ${r.max} ULP at x=${x[r.at]}`);
  // Every float32 bit pattern in [-2, 2] around the reduction boundaries, densely: 4M values.
  const y = new Float32Array(1 << 22);
  const r2 = rng(7);
  for (let i = 0; i < y.length; i++) y[i] = r2() * 2;
  const out2 = new Float32Array(y.length);
  wasmUnaryF32('exp', y, out2, y.length);
  const q = maxUlps(out2, Array.from(y, Math.exp));
  assert.ok(q.max <= 2, `max ${q.max} ULP at x=${y[q.at]}`);
});

test('wasm exp: edge cases', { skip }, () => {
  const xs = [NaN, Infinity, -Infinity, 0, -0, 1e-30, -1e-30, 1, -1, 88.72, 88.7228, 88.73, 89, 1e30, -87.33, -87.34, -100, -103.9, -104, -150, -1e30,
    Math.fround(Math.LN2 * 0.5), -Math.fround(Math.LN2 * 0.5), 3.4e38, -3.4e38, 1.4e-45];
  const x = Float32Array.from(xs);
  const out = new Float32Array(x.length);
  assert.ok(wasmUnaryF32('exp', x, out, x.length, true));
  for (let i = 0; i < x.length; i++) {
    const want = Math.fround(Math.exp(x[i]));
    assert.ok(ulps(out[i], want) <= 2, `exp(${x[i]}) = ${out[i]}, want ${want}`);
  }
  assert.ok(Number.isNaN(out[0]));
  assert.equal(out[1], Infinity);
  assert.equal(out[2], 0);
  assert.equal(out[3], 1);
});

for (const op of ['exp', 'sigmoid', 'silu'] as const) {
  test(`wasm ${op} matches the JS kernel (random float32, odd lengths, below/above the threshold)`, { skip }, () => {
    const be = new CpuBackend();
    const r = rng(op.length);
    for (const n of [1, 3, 5, 63, 64, 65, 127, 1001, 16383, 16384, 16385, 70001]) {
      const x = new Float32Array(n);
      for (let i = 0; i < n; i++) x[i] = r() * 30;
      const want = Array.from(x, JS[op]);
      const got = new Float32Array(n);
      assert.ok(wasmUnaryF32(op, x, got, n, true));
      const e = maxUlps(got, want);
      assert.ok(e.max <= 4, `${op} n=${n}: ${e.max} ULP at x=${x[e.at]}`);
      // Through the backend (wasm above WASM_MIN.unary, JS below).
      const viaBackend = be.unary(op, x, n, 'float32') as Float32Array;
      const b = maxUlps(viaBackend, want);
      assert.ok(b.max <= 4, `backend ${op} n=${n}: ${b.max} ULP`);
    }
    // Specials agree with the JS expressions.
    const sp = Float32Array.from([NaN, Infinity, -Infinity, 0, -0, 100, -100, 1e30, -1e30]);
    const got = new Float32Array(sp.length);
    wasmUnaryF32(op, sp, got, sp.length, true);
    for (let i = 0; i < sp.length; i++) {
      const want = Math.fround(JS[op](sp[i]));
      assert.ok(Object.is(got[i], want) || ulps(got[i], want) <= 2 || (got[i] === 0 && want === 0), `${op}(${sp[i]}) = ${got[i]}, want ${want}`);
    }
  });
}

function jsSoftmax(x: Float32Array, outer: number, n: number): Float64Array {
  const out = new Float64Array(outer * n);
  for (let o = 0; o < outer; o++) {
    let m = -Infinity;
    for (let i = 0; i < n; i++) m = Math.max(m, x[o * n + i]);
    let s = 0;
    for (let i = 0; i < n; i++) s += Math.exp(x[o * n + i] - m);
    for (let i = 0; i < n; i++) out[o * n + i] = Math.exp(x[o * n + i] - m) / s;
  }
  return out;
}

test('wasm softmax / logsumexp rows match double-precision references; rows sum to 1', { skip }, () => {
  const be = new CpuBackend();
  const r = rng(3);
  for (const [outer, n] of [[1, 1], [3, 3], [7, 5], [5, 64], [9, 257], [2, 20001], [300, 17], [4, 70001]]) {
    const x = new Float32Array(outer * n);
    for (let i = 0; i < x.length; i++) x[i] = r() * 40;
    const want = jsSoftmax(x, outer, n);
    const got = new Float32Array(outer * n);
    assert.ok(wasmSoftmaxF32(x, got, outer, n, true));
    const e = maxUlps(got, want);
    assert.ok(e.max <= 4, `softmax [${outer}, ${n}]: ${e.max} ULP`);
    for (let o = 0; o < outer; o++) {
      let s = 0;
      for (let i = 0; i < n; i++) s += got[o * n + i];
      assert.ok(Math.abs(s - 1) < 1e-5, `row ${o} sums to ${s}`);
    }
    // The backend (wasm or JS by size) agrees with the forced wasm result within a few ULP.
    const viaBackend = be.softmax(x, outer, n, 'float32') as Float32Array;
    assert.ok(maxUlps(viaBackend, want).max <= 4);
    const lse = new Float32Array(outer);
    assert.ok(wasmLogsumexpF32(x, lse, outer, n, true));
    const lseBackend = be.logsumexp(x, outer, n, 'float32') as Float32Array;
    for (let o = 0; o < outer; o++) {
      let m = -Infinity;
      for (let i = 0; i < n; i++) m = Math.max(m, x[o * n + i]);
      let s = 0;
      for (let i = 0; i < n; i++) s += Math.exp(x[o * n + i] - m);
      const w = m + Math.log(s);
      assert.ok(ulps(lse[o], w) <= 2, `lse row ${o}: ${lse[o]} vs ${w}`);
      assert.ok(ulps(lseBackend[o], w) <= 2);
    }
  }
});

test('wasm softmax / logsumexp: special rows behave as the JS kernels', { skip }, () => {
  const be = new CpuBackend();
  const rows = [
    [-Infinity, -Infinity, -Infinity],
    [1, NaN, 2],
    [Infinity, 1, 2],
    [-Infinity, 0, -Infinity],
    [1e30, -1e30, 0],
  ];
  const n = 3;
  const x = Float32Array.from(rows.flat());
  const outer = rows.length;
  const got = new Float32Array(outer * n);
  wasmSoftmaxF32(x, got, outer, n, true);
  setWasmElementwise(false);
  const js = be.softmax(x, outer, n, 'float32') as Float32Array;
  const jsLse = be.logsumexp(x, outer, n, 'float32') as Float32Array;
  setWasmElementwise(true);
  for (let i = 0; i < got.length; i++) assert.ok(Object.is(got[i], js[i]) || ulps(got[i], js[i]) <= 2, `softmax ${i}: ${got[i]} vs ${js[i]}`);
  const lse = new Float32Array(outer);
  wasmLogsumexpF32(x, lse, outer, n, true);
  for (let i = 0; i < outer; i++) assert.ok(Object.is(lse[i], jsLse[i]) || ulps(lse[i], jsLse[i]) <= 2, `lse ${i}: ${lse[i]} vs ${jsLse[i]}`);
});

test('wasm path: thresholds, float64 untouched, setWasmElementwise(false) falls back to JS', () => {
  const be = new CpuBackend();
  const x = new Float32Array(WASM_MIN.unary - 1).fill(1);
  assert.equal(wasmUnaryF32('exp', x, new Float32Array(x.length), x.length), false, 'below the threshold stays JS');
  setWasmElementwise(false);
  try {
    const big = new Float32Array(1000).fill(0.5);
    assert.equal(wasmUnaryF32('exp', big, new Float32Array(1000), 1000), false);
    assert.equal(wasmElementwiseInfo().enabled, false);
    const out = be.unary('exp', big, 1000, 'float32') as Float32Array;
    assert.equal(out[999], Math.fround(Math.exp(0.5)));
  } finally {
    setWasmElementwise(true);
  }
  // float64 always takes Math.exp.
  const d = Float64Array.from({ length: 1000 }, (_, i) => i / 100 - 5);
  const e = be.unary('exp', d, d.length, 'float64') as Float64Array;
  for (let i = 0; i < d.length; i++) assert.equal(e[i], Math.exp(d[i]));
  assert.ok('wasmElementwise' in be.info());
});

test('TTT_WASM_ELEMENTWISE=0 disables the wasm kernels (fresh process)', () => {
  const mod = fileURLToPath(new URL('../src/backends/cpu/wasm-elementwise.ts', import.meta.url));
  const script = `import('${mod}').then((m) => { const x = new Float32Array(1000).fill(1); ` +
    `console.log(JSON.stringify({ used: m.wasmUnaryF32('exp', x, new Float32Array(1000), 1000), info: m.wasmElementwiseInfo() })); });`;
  const r = spawnSync(process.execPath, ['--import', 'tsx', '-e', script], { env: { ...process.env, TTT_WASM_ELEMENTWISE: '0' }, encoding: 'utf8' });
  assert.equal(r.status, 0, r.stderr);
  const res = JSON.parse(r.stdout.trim().split('\n').pop()!);
  assert.equal(res.used, false);
  assert.equal(res.info.enabled, false);
  assert.match(res.info.error, /disabled/);
});

test('attention probabilities: the wasm band kernel matches the JS path (float32) and float64', { skip }, () => {
  const r = rng(11);
  for (const job of [
    { batch: 3, tq: 70, tk: 70, d: 8, qStart: 0, kStart: 0, window: 13, scale: 0.35 },
    { batch: 2, tq: 37, tk: 101, d: 5, qStart: 64, kStart: 0, window: 64, scale: 1 / Math.sqrt(5) },
    { batch: 1, tq: 9, tk: 9, d: 3, qStart: 0, kStart: 0, window: 100, scale: 2.5 },
  ]) {
    const { batch, tq, tk, d } = job;
    const mk = (n: number) => Float64Array.from({ length: n }, () => r() * 3);
    const [q, k, v, dO] = [mk(batch * tq * d), mk(batch * tk * d), mk(batch * tk * d), mk(batch * tq * d)];
    const f32 = (a: Float64Array) => Float32Array.from(a);
    const ref = attentionForward(q, k, v, job, 'float64');
    const refB = attentionBackward(q, k, v, ref.out, ref.lse, dO, job, 'float64');
    const run = (on: boolean) => {
      setWasmElementwise(on);
      try {
        const fw = attentionForward(f32(q), f32(k), f32(v), job, 'float32');
        const bw = attentionBackward(f32(q), f32(k), f32(v), fw.out, fw.lse, f32(dO), job, 'float32');
        return { ...fw, ...bw };
      } finally {
        setWasmElementwise(true);
      }
    };
    const js = run(false);
    const wa = run(true);
    const close = (name: string, a: ArrayLike<number>, b: ArrayLike<number>, tol: number) => {
      // Max difference relative to the largest magnitude (dq/dk are sums with cancellation).
      let worst = 0;
      let scale = 0;
      for (let i = 0; i < a.length; i++) {
        worst = Math.max(worst, Math.abs(a[i] - b[i]));
        scale = Math.max(scale, Math.abs(b[i]));
      }
      assert.ok(worst <= tol * scale, `${name}: ${worst / scale}`);
    };
    for (const key of ['out', 'lse', 'dq', 'dk', 'dv'] as const) {
      close(`wasm vs js ${key}`, wa[key], js[key], 1e-5);
      // No further from float64 than the JS float32 path is (plus slack for a few ULP).
      const want = (key === 'out' || key === 'lse' ? ref : refB)[key as never] as ArrayLike<number>;
      const err = (a: ArrayLike<number>) => {
        let w = 0;
        for (let i = 0; i < a.length; i++) w = Math.max(w, Math.abs(a[i] - want[i]) / (Math.abs(want[i]) + 1e-3));
        return w;
      };
      const [ew, ej] = [err(wa[key]), err(js[key])];
      assert.ok(ew < 1.5 * ej + 1e-6, `${key}: wasm ${ew} vs js ${ej} from float64`);
    }
  }
});

test('wasm sigmoid / silu: within 4 ULP of the double-precision JS expressions over [-120, 120]', { skip }, () => {
  const N = 1 << 21;
  const x = new Float32Array(N);
  for (let i = 0; i < N; i++) x[i] = -120 + (240 * i) / N;
  for (const op of ['sigmoid', 'silu'] as const) {
    const out = new Float32Array(N);
    assert.ok(wasmUnaryF32(op, x, out, N));
    const r = maxUlps(out, Array.from(x, JS[op]));
    assert.ok(r.max <= 4, `${op}: max ${r.max} ULP at x=${x[r.at]}`);
  }
});
