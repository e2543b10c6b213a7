// The shared wasm arena behind the CPU pool (src/backends/cpu/arena.ts) and the kernels that work in
// place on it: binary arithmetic in wasm vs the JS loop bit for bit, every broadcast fast path, the
// in-place transcendental kernels vs their copy path, the fallback to ordinary arrays when the arena
// is full or off, no leak over a repeated step, BLAS (koffi) on arena views, safetensors from arena storage.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { BinaryOp } from '../src/engine/backend.js';
import { coalesce } from '../src/engine/shape.js';
import { Arena, arena, sizeClass } from '../src/backends/cpu/arena.js';
import { CpuBackend } from '../src/backends/cpu/backend.js';
import { loadBlas } from '../src/backends/cpu/blas.js';
import { gemm, setGemmPath } from '../src/backends/cpu/gemm.js';
import { pool } from '../src/backends/cpu/pool.js';
import {
  type WasmBinaryOp, setWasmElementwise, wasmBinary, wasmElementwiseAvailable, wasmLogsumexpF32, wasmSoftmaxF32, wasmUnaryF32,
} from '../src/backends/cpu/wasm-elementwise.js';
import { readSafetensors, writeSafetensors } from '../src/io/safetensors.js';
import { add, exp, matmul, mul, randn, randomKey, softmax, sum, tidy, valueAndGrad } from '../src/index.js';

const root = fileURLToPath(new URL('..', import.meta.url));
const skip = !wasmElementwiseAvailable() && 'build/wasm/elementwise.wasm missing';

function rng(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    return s / 2 ** 31 - 1;
  };
}

type FA = Float32Array | Float64Array;
type FC = Float32ArrayConstructor | Float64ArrayConstructor;

/** An arena array of any length (the pool keeps small ones off the arena), freed by `done`. */
function arenaArray<C extends FC>(C: C, n: number, fill?: () => number): InstanceType<C> {
  const p = arena.allocScratch(Math.max(1, n) * C.BYTES_PER_ELEMENT);
  assert.ok(p > 0);
  const a = arena.view(C, p, n);
  if (fill) for (let i = 0; i < n; i++) a[i] = fill();
  return a;
}
const done = (...as: FA[]) => as.forEach((a) => assert.ok(arena.release(a.byteOffset)));

function sameBits(got: ArrayLike<number>, want: ArrayLike<number>, what: string): void {
  assert.equal(got.length, want.length, `${what}: length`);
  for (let i = 0; i < got.length; i++) {
    if (!Object.is(got[i], want[i]) && !(Number.isNaN(got[i]) && Number.isNaN(want[i]))) {
      assert.fail(`${what}: element ${i}: ${got[i]} vs ${want[i]}`);
    }
  }
}

/** [a shape, b shape] of every broadcast the wasm kernels take, at a given row length and count. */
function patterns(rows: number, n: number): Array<[string, number[], number[]]> {
  return [
    ['same shape', [rows, n], [rows, n]],
    ['scalar right', [rows, n], []],
    ['scalar left', [], [rows, n]],
    ['row broadcast', [rows, n], [n]],
    ['row broadcast, reversed', [n], [rows, n]],
    ['column broadcast', [rows, n], [rows, 1]],
    ['column broadcast, reversed', [rows, 1], [rows, n]],
  ];
}

/** Element strides of `s` broadcast to `out` (0 along broadcast axes), as the engine passes them. */
function bstrides(s: number[], out: number[]): number[] {
  const st = new Array<number>(out.length).fill(0);
  let acc = 1;
  for (let i = s.length - 1, j = out.length - 1; i >= 0; i--, j--) {
    st[j] = s[i] === 1 && out[j] !== 1 ? 0 : acc;
    acc *= s[i];
  }
  return st;
}

const OPS: WasmBinaryOp[] = ['add', 'sub', 'mul', 'div', 'maximum', 'minimum'];

test('wasm binary kernels equal the JS loop bit for bit: every op, broadcast fast path, float32/float64, odd sizes', { skip }, () => {
  const be = new CpuBackend();
  const r = rng(11);
  const specials = [0, -0, NaN, Infinity, -Infinity, 1e-40, -3e38];
  const val = () => (r() < 0.05 ? specials[Math.floor(Math.abs(r()) * specials.length) % specials.length] : r() * 10);
  let wasmRuns = 0;
  for (const C of [Float32Array, Float64Array] as FC[]) {
    const dtype = C === Float32Array ? 'float32' : 'float64';
    for (const [rows, n] of [[1, 0], [1, 1], [1, 3], [1, 4], [1, 5], [1, 17], [2, 7], [3, 64], [5, 65], [7, 255], [1, 4099], [33, 31]]) {
      for (const [what, as, bs] of patterns(rows, n)) {
        const shape = [rows, n];
        const size = rows * n;
        const aLen = as.reduce((x, y) => x * y, 1);
        const bLen = bs.reduce((x, y) => x * y, 1);
        const a = arenaArray(C, aLen, val);
        const b = arenaArray(C, bLen, val);
        const sa = bstrides(as, shape);
        const sb = bstrides(bs, shape);
        for (const op of OPS) {
          setWasmElementwise(false);
          const want = be.binary(op as BinaryOp, a, sa, b, sb, shape, dtype) as FA;
          setWasmElementwise(true);
          const got = arenaArray(C, size);
          // Through the kernel's own entry (coalesced as the backend does), forced below the threshold.
          const c = coalesce(shape, [sa, sb]);
          const used = wasmBinary(op, C === Float64Array, a, b, got, c.shape, c.strides, true);
          if (size > 0) assert.ok(used, `${what} [${rows}, ${n}] ${op}: wasm path not taken`);
          wasmRuns += used ? 1 : 0;
          sameBits(got, want, `${dtype} ${op} ${what} [${rows}, ${n}]`);
          // And through the backend (wasm above the threshold, JS below): the same values either way.
          const viaBackend = be.binary(op as BinaryOp, a, sa, b, sb, shape, dtype) as FA;
          sameBits(viaBackend, want, `backend ${dtype} ${op} ${what} [${rows}, ${n}]`);
          be.free(want, dtype, size);
          be.free(viaBackend, dtype, size);
          done(got);
        }
        done(a, b);
      }
    }
  }
  assert.ok(wasmRuns > 500);
});

test('wasm binary: operands outside the arena (small: staged; large: JS loop) give the same values', { skip }, () => {
  const r = rng(5);
  const n = 5000;
  const a = arenaArray(Float32Array, n, r);
  const plainBig = Float32Array.from({ length: n }, r);
  const plainRow = Float32Array.from({ length: 50 }, r);
  const out = arenaArray(Float32Array, n);
  // A small broadcast operand off the arena is copied into scratch: wasm path.
  assert.ok(wasmBinary('mul', false, a, plainRow, out, [100, 50], [[50, 1], [0, 1]]));
  for (let i = 0; i < n; i++) assert.equal(out[i], Math.fround(a[i] * plainRow[i % 50]));
  // A large one is not: the caller's JS loop runs.
  assert.equal(wasmBinary('add', false, a, plainBig, out, [n], [[1], [1]]), false);
  // An output off the arena: JS loop.
  assert.equal(wasmBinary('add', false, a, a, new Float32Array(n), [n], [[1], [1]]), false);
  // Patterns beyond the fast paths (a transposed operand): JS loop.
  assert.equal(wasmBinary('add', false, a, a, out, [50, 100], [[1, 50], [100, 1]]), false);
  done(a, out);
});

test('transcendental kernels in place on arena arrays equal their copy path', { skip }, () => {
  const r = rng(8);
  for (const n of [1, 3, 4, 7, 8, 9, 63, 1000, 16385, 40001]) {
    const plain = Float32Array.from({ length: n }, () => r() * 30);
    const x = arenaArray(Float32Array, n);
    x.set(plain);
    for (const op of ['exp', 'sigmoid', 'silu'] as const) {
      const viaCopy = new Float32Array(n);
      assert.ok(wasmUnaryF32(op, plain, viaCopy, n, true));
      const out = arenaArray(Float32Array, n + 4);
      out.fill(7);
      assert.ok(wasmUnaryF32(op, x, out.subarray(0, n), n, true));
      sameBits(out.subarray(0, n), viaCopy, `${op} n=${n}`);
      for (let i = n; i < n + 4; i++) assert.equal(out[i], 7, `${op} n=${n} wrote past the end`);
      done(out);
    }
    // In place (out === x).
    const y = arenaArray(Float32Array, n);
    y.set(plain);
    const want = new Float32Array(n);
    wasmUnaryF32('exp', plain, want, n, true);
    wasmUnaryF32('exp', y, y, n, true);
    sameBits(y, want, `exp in place n=${n}`);
    done(x, y);
  }
  for (const [outer, n] of [[1, 1], [3, 3], [7, 5], [9, 257], [300, 17], [2, 20001]]) {
    const plain = Float32Array.from({ length: outer * n }, () => r() * 40);
    const x = arenaArray(Float32Array, outer * n);
    x.set(plain);
    const sm = new Float32Array(outer * n);
    const lse = new Float32Array(outer);
    assert.ok(wasmSoftmaxF32(plain, sm, outer, n, true));
    assert.ok(wasmLogsumexpF32(plain, lse, outer, n, true));
    const out = arenaArray(Float32Array, outer * n + 4);
    out.fill(7);
    assert.ok(wasmSoftmaxF32(x, out.subarray(0, outer * n), outer, n, true));
    sameBits(out.subarray(0, outer * n), sm, `softmax [${outer}, ${n}]`);
    for (let i = outer * n; i < outer * n + 4; i++) assert.equal(out[i], 7, 'softmax wrote past the end');
    const lse2 = new Float32Array(outer);
    assert.ok(wasmLogsumexpF32(x, lse2, outer, n, true));
    sameBits(lse2, lse, `logsumexp [${outer}, ${n}]`);
    sameBits(x, plain, 'logsumexp / softmax leave their input alone');
    done(x, out);
  }
});

test('size classes: 64-byte multiples, at most 12.5% rounding, blocks reused by class', () => {
  for (const b of [1, 63, 64, 65, 4096, 4097, 5000, 1 << 20, (1 << 20) + 1, 123456789]) {
    const c = sizeClass(b);
    assert.ok(c >= b && c % 64 === 0 && (b <= 4096 || c <= b * 1.125), `${b} -> ${c}`);
  }
  const ar = new Arena(true, 1 << 30);
  const p = ar.allocTensor(5000);
  assert.ok(p > 0 && p % 64 === 0);
  assert.ok(ar.release(p));
  assert.equal(ar.release(p), false, 'a double free is refused');
  assert.equal(ar.allocTensor(4900), p, 'same class: the freed block comes back');
  // Past the limit: -1 (the pool then makes an ordinary array), counted.
  ar.limitBytes = ar.stats().usedBytes;
  assert.equal(ar.allocTensor(1 << 20), -1);
  assert.equal(ar.stats().fallbacks, 1);
  assert.ok(ar.allocScratch(1 << 20) > 0, 'scratch may still grow');
  const off = new Arena(false, 0);
  assert.equal(off.allocTensor(1000), -1);
});

test('the pool puts storage in the arena and takes it back; live counts stay flat over a repeated step', { skip: !pool.enabled && 'TTT_CPU_POOL=0' }, () => {
  const x = randn(randomKey(1), [64, 96]);
  assert.ok(arena.owns(x.storage.data as Float32Array), 'tensor storage lives in the arena');
  const w = randn(randomKey(2), [96, 32]);
  const step = () => tidy(() => {
    const [l] = valueAndGrad((p: { w: typeof w }) => sum(softmax(add(matmul(exp(mul(x, 0.1)), p.w), 1), -1)))({ w });
    l.item();
  });
  for (let i = 0; i < 3; i++) step();
  const s0 = pool.stats();
  for (let i = 0; i < 10; i++) step();
  const s1 = pool.stats();
  assert.equal(s1.liveArena, s0.liveArena, 'live arena arrays');
  assert.equal(s1.arena.liveBlocks, s0.arena.liveBlocks, 'live arena blocks');
  assert.equal(s1.arena.usedBytes, s0.arena.usedBytes, 'the arena did not grow');
  x.dispose();
  w.dispose();
});

test('fallback: a tiny arena, no arena, no pool, no wasm all give the same numbers', () => {
  const script = `
    import { add, sub, div, maximum, exp, sigmoid, silu, softmax, logsumexp, matmul, mul, randn, randomKey, sum, valueAndGrad, tensor } from './src/index.ts';
    import { pool } from './src/backends/cpu/pool.ts';
    import { setGemmPath } from './src/backends/cpu/gemm.ts';
    import { createHash } from 'node:crypto';
    setGemmPath('wasm');
    const h = createHash('sha256');
    const put = (t) => h.update(Buffer.from(new Float64Array(t.toArray()).buffer));
    for (const dtype of ['float32', 'float64']) {
      const x = randn(randomKey(1), [300, 70], dtype), y = randn(randomKey(2), [300, 70], dtype);
      const row = randn(randomKey(3), [70], dtype), col = randn(randomKey(4), [300, 1], dtype);
      put(add(x, y)); put(sub(x, row)); put(div(row, add(maximum(x, 0.5), 2))); put(mul(col, x)); put(sub(2, x));
      put(exp(x)); put(sigmoid(x)); put(silu(x)); put(softmax(x, -1)); put(logsumexp(x, -1)); put(matmul(x, y, { transB: true }));
      const [l, g] = valueAndGrad((a) => sum(mul(softmax(matmul(a, y, { transB: true }), -1), 3)))(x);
      put(l); put(g);
    }
    console.log(JSON.stringify({ hash: h.digest('hex'), pool: pool.stats() }));`;
  const run = (env: Record<string, string>) => {
    const r = spawnSync(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', script], {
      cwd: root, env: { ...process.env, ...env }, encoding: 'utf8',
    });
    assert.equal(r.status, 0, r.stderr);
    return JSON.parse(r.stdout.trim().split('\n').pop()!) as { hash: string; pool: { liveArena: number; arena: { fallbacks: number; enabled: boolean } } };
  };
  const base = run({});
  const tiny = run({ TTT_CPU_ARENA_MB: '0.25' });
  assert.ok(tiny.pool.arena.fallbacks > 0, 'the tiny arena ran out');
  assert.equal(tiny.hash, base.hash, 'tiny arena');
  const none = run({ TTT_CPU_ARENA_MB: '0' });
  assert.equal(none.pool.arena.enabled, false);
  assert.equal(none.pool.liveArena, 0);
  assert.equal(none.hash, base.hash, 'no arena');
  assert.equal(run({ TTT_CPU_POOL: '0' }).hash, base.hash, 'no pool');
  if (!skip) {
    // Without the wasm kernels the transcendental ops differ in the last bits; binary ops must not.
    const noWasm = run({ TTT_WASM_ELEMENTWISE: '0', TTT_CPU_ARENA_MB: '0.25' });
    assert.equal(run({ TTT_WASM_ELEMENTWISE: '0' }).hash, noWasm.hash, 'JS path, arena or not');
  }
});

test('BLAS through koffi accepts arena (SharedArrayBuffer) views', { skip: !loadBlas() && 'no CBLAS library' }, () => {
  const r = rng(4);
  const [m, k, n] = [37, 29, 41];
  const a = arenaArray(Float32Array, m * k, r);
  const b = arenaArray(Float32Array, k * n, r);
  const c = arenaArray(Float32Array, m * n);
  const want = new Float32Array(m * n);
  setGemmPath('js');
  gemm({ batch: 1, m, n, k, transA: false, transB: false, a, aOffsets: [0], b, bOffsets: [0], c: want });
  setGemmPath('blas');
  gemm({ batch: 1, m, n, k, transA: false, transB: false, a, aOffsets: [0], b, bOffsets: [0], c });
  setGemmPath('auto');
  for (let i = 0; i < m * n; i++) assert.ok(Math.abs(c[i] - want[i]) < 1e-4, `${i}: ${c[i]} vs ${want[i]}`);
  done(a, b, c);
});

test('wasm gemm in place on arena operands equals the staged path; float64 too', () => {
  const r = rng(6);
  for (const C of [Float32Array, Float64Array] as FC[]) {
    const [batch, m, k, n] = [3, 70, 45, 130];
    const plainA = new C(batch * m * k).map(() => r());
    const plainB = new C(k * n).map(() => r());
    const a = arenaArray(C, batch * m * k);
    a.set(plainA);
    const b = arenaArray(C, k * n);
    b.set(plainB);
    const job = (a: FA, b: FA, c: FA) => ({ batch, m, n, k, transA: false, transB: true, a, aOffsets: [0, m * k, 2 * m * k], b, bOffsets: [0, 0, 0], c });
    setGemmPath('wasm');
    const staged = new C(batch * m * n);
    gemm({ ...job(plainA, plainB, staged), transB: false });
    const inPlace = arenaArray(C, batch * m * n);
    gemm({ ...job(a, b, inPlace), transB: false });
    const mixed = new C(batch * m * n);
    gemm({ ...job(a, plainB, mixed), transB: false });
    setGemmPath('auto');
    sameBits(inPlace, staged, `${C.name} in place`);
    sameBits(mixed, staged, `${C.name} mixed`);
    done(a, b, inPlace);
  }
});

test('safetensors and Buffer views of arena storage', () => {
  const dir = mkdtempSync(join(tmpdir(), 'ttt-arena-'));
  try {
    const x = randn(randomKey(9), [40, 30], 'float64');
    const data = x.storage.data as Float64Array;
    if (pool.enabled) assert.ok(arena.owns(data));
    const bytes = Buffer.from(data.buffer, data.byteOffset, data.byteLength);
    assert.equal(bytes.length, 40 * 30 * 8);
    assert.equal(new Float64Array(Uint8Array.from(bytes).buffer)[5], data[5]);
    const file = join(dir, 't.safetensors');
    writeSafetensors(file, new Map([['x', { dtype: 'float64', shape: [40, 30], data }]]));
    const back = readSafetensors(file).tensors.get('x')!;
    sameBits(back.data as Float64Array, data, 'round trip');
    x.dispose();
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
