/**
 * CPU backend internals: the typed-array pool (reuse never corrupts live values, zero-filled where a
 * kernel needs zeros, TTT_CPU_POOL=0 turns it off) and the elementwise fast paths (same values as
 * the generic strided walker on every stride pattern, for float32, float64, int32 and bool inputs).
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import {
  add, concat, exp, full, getBackend, matmul, mul, pad, randn, randomKey, reshape, sum, tensor, tidy, transpose, zeros,
} from '../src/index.js';
import { ArrayPool, pool } from '../src/backends/cpu/pool.js';
import { makeStridedKernel, TYPE_TAG } from '../src/backends/cpu/elementwise.js';
import { coalesce, sizeOf, stridesOf } from '../src/engine/shape.js';
import type { DType, HostArray } from '../src/engine/dtype.js';

const root = fileURLToPath(new URL('..', import.meta.url));

function rng(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    return s / 2 ** 31 - 1;
  };
}

const CTOR = { float32: Float32Array, float64: Float64Array, int32: Int32Array, bool: Uint8Array } as const;
type TestDType = keyof typeof CTOR;

function randomArray(dtype: TestDType, n: number, r: () => number): HostArray {
  const a = new CTOR[dtype](n);
  for (let i = 0; i < n; i++) {
    if (dtype === 'int32') a[i] = Math.floor(r() * 1e6);
    else if (dtype === 'bool') a[i] = r() > 0 ? 1 : 0;
    else a[i] = r() * 3;
  }
  if (dtype !== 'int32' && dtype !== 'bool' && n > 3) {
    a[1] = NaN; // NaN and signed zero must come through every path the same way
    a[2] = -0;
  }
  return a;
}

function sameValues(a: HostArray, b: HostArray, what: string): void {
  assert.equal(a.length, b.length, `${what}: length`);
  for (let i = 0; i < a.length; i++) {
    if (!Object.is(a[i], b[i])) assert.fail(`${what}: element ${i}: ${a[i]} vs ${b[i]}`);
  }
}

const before = () => pool.stats();

describe('typed-array pool', () => {
  test('ArrayPool hands back freed arrays, zero-filled on request, and respects its caps', () => {
    const p = new ArrayPool(true, 1 << 20);
    const a = p.alloc('float32', 1000, false) as Float32Array;
    a.fill(7);
    p.release(a, 'float32', 1000);
    assert.equal(p.stats().heldArrays, 1);
    const b = p.alloc('float32', 1000, false);
    assert.equal(b, a, 'same array reused');
    assert.equal(b[999], 7, 'unzeroed reuse keeps stale values (kernels overwrite them)');
    p.release(b, 'float32', 1000);
    const c = p.alloc('float32', 1000, true);
    assert.equal(c, a);
    assert.ok(c.every((v) => v === 0), 'zeroed on request');
    // Other types and lengths never share a list.
    p.release(c, 'float32', 1000);
    assert.ok(!(p.alloc('int32', 1000, false) === c));
    assert.ok(!(p.alloc('float32', 999, false) === c));
    // bfloat16 travels as float32 on the CPU: same list.
    assert.equal(p.alloc('bfloat16', 1000, false), c);
    // Foreign arrays are not taken: wrong type or length, a view into a larger buffer.
    const big = new Float32Array(4000);
    p.release(big.subarray(0, 1000), 'float32', 1000);
    p.release(new Float64Array(1000), 'float32', 1000);
    p.release(new Float32Array(1001), 'float32', 1000);
    p.release(Buffer.alloc(1000), 'bool', 1000);
    assert.equal(p.stats().heldArrays, 0);
    assert.equal(p.stats().dropped, 4);
    // The byte cap.
    const capped = new ArrayPool(true, 8000);
    capped.release(new Float32Array(1500), 'float32', 1500);
    capped.release(new Float32Array(1500), 'float32', 1500);
    assert.equal(capped.stats().heldBytes, 6000);
    assert.equal(capped.stats().heldArrays, 1);
    capped.clear();
    assert.equal(capped.stats().heldBytes, 0);
  });

  test('a disabled pool allocates fresh zeroed arrays and keeps nothing', () => {
    const p = new ArrayPool(false, 1 << 20);
    const a = p.alloc('float64', 500, false) as Float64Array;
    a.fill(3);
    p.release(a, 'float64', 500);
    const b = p.alloc('float64', 500, false);
    assert.notEqual(b, a);
    assert.ok(b.every((v) => v === 0));
    assert.equal(p.stats().heldArrays, 0);
    assert.equal(p.stats().hits, 0);
  });

  test('reuse through the engine: live tensors keep their values, zeros stay zeros', { skip: !pool.enabled && 'TTT_CPU_POOL=0' }, () => {
    const s0 = before();
    const x = randn(randomKey(3), [32, 48]);
    const xv = x.toTyped();
    const view = reshape(x, [48, 32]); // shares x's storage
    for (let round = 0; round < 3; round++) {
      tidy(() => {
        // Garbage of x's size, freed at the end of the scope into the pool.
        for (let i = 0; i < 5; i++) add(mul(x, 1000 + i), 5);
      });
      // These take arrays the scope just freed: stale values must not show.
      const z = zeros([32, 48]);
      assert.ok(z.toTyped().every((v) => v === 0), 'zeros() from the pool');
      const f = full([32, 48], 2.5);
      assert.ok(f.toTyped().every((v) => v === 2.5), 'full() from the pool');
      const small = tensor(Array.from({ length: 32 * 47 }, (_, i) => i), [32, 47]);
      const padded = pad(small, [[0, 0], [1, 0]]);
      const pv = padded.toTyped();
      for (let r = 0; r < 32; r++) {
        assert.equal(pv[r * 48], 0, 'pad fills from zero');
        for (let c = 1; c < 48; c++) assert.equal(pv[r * 48 + c], r * 47 + c - 1);
      }
      const cat = concat([small, zeros([32, 1])], 1).toTyped();
      for (let r = 0; r < 32; r++) assert.equal(cat[r * 48 + 47], 0);
      for (const t of [z, f, small, padded]) t.dispose();
      sameValues(x.toTyped(), xv, 'live tensor after pool reuse');
      sameValues(view.toTyped(), xv, 'live reshaped view after pool reuse');
    }
    // The view outlives x: the storage is shared and refcounted, freed only with the last one.
    x.dispose();
    tidy(() => {
      for (let i = 0; i < 5; i++) exp(randn(randomKey(4 + i), [48, 32]));
    });
    const fresh = zeros([48, 32]);
    assert.ok(fresh.toTyped().every((v) => v === 0));
    sameValues(view.toTyped(), xv, 'view after its base was disposed');
    fresh.dispose();
    view.dispose();
    const s1 = before();
    assert.ok(s1.hits > s0.hits, 'the pool served allocations');
    assert.ok(s1.heldBytes <= s1.capBytes);
  });

  test('kernels that overwrite their output give the same results from stale arrays (float64)', { skip: !pool.enabled && 'TTT_CPU_POOL=0' }, () => {
    const run = () => tidy(() => {
      const a = randn(randomKey(9), [2, 24, 40], 'float64');
      const b = randn(randomKey(10), [2, 40, 24], 'float64');
      const y = add(matmul(a, b), transpose(sum(a, 2, true), [0, 2, 1]));
      return [y.toTyped(), exp(a).toTyped(), sum(a, 1).toTyped()];
    });
    const first = run();
    // Fill the pool with garbage of the same sizes, then run again.
    tidy(() => {
      for (let i = 0; i < 4; i++) {
        full([2, 24, 24], NaN, 'float64');
        full([2, 24, 40], NaN, 'float64');
        full([2, 40], NaN, 'float64');
        full([2, 24, 1], NaN, 'float64');
      }
    });
    const second = run();
    first.forEach((v, i) => sameValues(second[i], v, `result ${i}`));
  });

  test('info() reports pool stats; TTT_CPU_POOL=0 turns the pool off', () => {
    const info = getBackend().info() as { pool?: { enabled: boolean; hits: number } };
    assert.equal(typeof info.pool?.enabled, 'boolean');
    const script = `
      import { add, getBackend, randn, randomKey, tidy, zeros } from './src/index.ts';
      const x = randn(randomKey(0), [64, 64]);
      for (let i = 0; i < 3; i++) tidy(() => { add(x, 1); });
      if (!zeros([64, 64]).toTyped().every((v) => v === 0)) throw new Error('zeros');
      console.log(JSON.stringify(getBackend().info().pool));`;
    const r = spawnSync(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', script], {
      cwd: root, env: { ...process.env, TTT_CPU_POOL: '0' }, encoding: 'utf8',
    });
    assert.equal(r.status, 0, r.stderr);
    const stats = JSON.parse(r.stdout.trim().split('\n').pop()!);
    assert.equal(stats.enabled, false);
    assert.equal(stats.hits, 0);
    assert.equal(stats.heldArrays, 0);
  });
});

// ---- elementwise fast paths ---------------------------------------------------------------------

/** [name, shape, per-input shapes] broadcast cases covering every fast path and the generic one. */
const CASES: Array<[string, number[], number[][]]> = [
  ['same shape (1-D flat)', [4, 8, 20], [[4, 8, 20], [4, 8, 20], [4, 8, 20]]],
  ['scalar rhs', [4, 8, 20], [[4, 8, 20], [], [4, 8, 20]]],
  ['scalar lhs', [5, 33], [[], [5, 33], [1, 1]]],
  ['all scalars broadcast', [3, 7], [[1], [1, 1], []]],
  ['row broadcast', [6, 5, 16], [[6, 5, 16], [16], [5, 16]]],
  ['column broadcast', [6, 5, 16], [[6, 5, 16], [6, 5, 1], [6, 1, 1]]],
  ['mixed', [3, 4, 5, 6], [[3, 1, 5, 1], [4, 1, 6], [3, 4, 5, 6]]],
  ['single element', [], [[], [], []]],
  ['empty', [3, 0, 4], [[3, 0, 4], [4], [1]]],
];

function broadcastStrides(from: number[], to: number[]): number[] {
  const st = stridesOf(from);
  return to.map((_, i) => {
    const j = i - (to.length - from.length);
    return j < 0 || from[j] === 1 ? 0 : st[j];
  });
}

/** Strided (transposed) versions: inputs read through a permuted layout. */
function permutedStrides(shape: number[]): number[] {
  const st = stridesOf([...shape].reverse()).reverse(); // column-major
  return st;
}

const EXPRS: Array<[string, number, string, (t: TestDType) => boolean]> = [
  ['add', 2, 'x + y', () => true],
  ['mul', 2, 'x * y', (t) => t !== 'int32'],
  ['imul', 2, 'Math.imul(x, y)', (t) => t === 'int32'],
  ['max', 2, 'Math.max(x, y)', () => true],
  ['lt', 2, 'x < y ? 1 : 0', () => true],
  ['where', 3, 'x ? y : z', () => true],
];

describe('elementwise fast paths match the generic strided loop', () => {
  for (const dtype of ['float32', 'float64', 'int32'] as const) {
    for (const [op, arity, expr, applies] of EXPRS) {
      if (!applies(dtype)) continue;
      test(`${op} ${dtype}`, () => {
        const outType: TestDType = op === 'lt' ? 'bool' : dtype;
        const inTypes: TestDType[] = op === 'where' ? ['bool', dtype, dtype] : [dtype, dtype];
        const types = [outType, ...inTypes].map((t) => TYPE_TAG[t as DType]).join('_');
        const fast = makeStridedKernel(arity, expr, `t_${op}`, types, true);
        const slow = makeStridedKernel(arity, expr, `t_${op}`, types, false);
        const r = rng(arity * 100 + dtype.length);
        for (const [name, shape, inShapes] of CASES) {
          for (const layout of ['contiguous', 'permuted'] as const) {
            const shapes = inShapes.slice(0, arity);
            const inputs = shapes.map((s, i) => randomArray(inTypes[i], Math.max(1, sizeOf(s)), r));
            const strides = shapes.map((s, i) =>
              layout === 'permuted' && i === 0 && s.length === shape.length && sizeOf(s) === sizeOf(shape) ? permutedStrides(shape) : broadcastStrides(s, shape));
            const c = coalesce(shape, strides);
            const n = sizeOf(shape);
            const a = new CTOR[outType](n);
            const b = new CTOR[outType](n);
            fast(a, c.shape, c.strides, inputs[0], inputs[1], inputs[2]);
            slow(b, c.shape, c.strides, inputs[0], inputs[1], inputs[2]);
            sameValues(a, b, `${op} ${dtype} ${name} ${layout}`);
          }
        }
      });
    }
  }

  test('backend.binary on every pattern equals an independent loop (float32, float64, int32)', () => {
    const be = getBackend();
    for (const dtype of ['float32', 'float64', 'int32'] as const) {
      const r = rng(77);
      for (const [name, shape, inShapes] of CASES) {
        const [sa, sb] = inShapes;
        const a = randomArray(dtype, Math.max(1, sizeOf(sa)), r);
        const b = randomArray(dtype, Math.max(1, sizeOf(sb)), r);
        const stA = broadcastStrides(sa, shape);
        const stB = broadcastStrides(sb, shape);
        for (const op of ['add', 'sub', 'mul', 'maximum'] as const) {
          const got = be.binary(op, be.upload(a, dtype), stA, be.upload(b, dtype), stB, shape, dtype) as HostArray;
          const want = new CTOR[dtype](sizeOf(shape));
          const idx = new Array<number>(shape.length).fill(0);
          for (let i = 0; i < want.length; i++) {
            let pa = 0;
            let pb = 0;
            for (let d = 0; d < shape.length; d++) {
              pa += idx[d] * stA[d];
              pb += idx[d] * stB[d];
            }
            const x = a[pa];
            const y = b[pb];
            want[i] = op === 'add' ? x + y : op === 'sub' ? x - y : op === 'mul' ? (dtype === 'int32' ? Math.imul(x, y) : x * y) : Math.max(x, y);
            for (let d = shape.length - 1; d >= 0; d--) {
              if (++idx[d] < shape[d]) break;
              idx[d] = 0;
            }
          }
          sameValues(got, want, `${op} ${dtype} ${name}`);
          be.free(got, dtype, got.length);
        }
      }
    }
  });
});
