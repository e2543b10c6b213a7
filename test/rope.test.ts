/**
 * The fused RoPE op against its composite definition (src/nn/layers.ts `compositeRope`, whose parts
 * ops-grad checks against finite differences): values bit for bit in float32 and float64 (and
 * bfloat16 where the backend has it), first- and second-order gradients (the op's backward is the
 * op itself, rotating the other way), finite differences in float64, and errors. Runs on the backend
 * in use (TTT_DEVICE=cuda for the GPU).
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import * as T from '../src/index.js';
import { compositeRope, rope, ropeTables } from '../src/nn/layers.js';
import { seededValues } from './helpers/check.js';
import { countingCalls, withOpPath } from './helpers/fused.js';
import { sizeOf } from '../src/engine/shape.js';

const rand = (seed: number, n: number, lo = -2, hi = 2): number[] => seededValues(seed, n, lo, hi);
const R = (seed: number, shape: number[], dt: T.DType) => T.tensor(dt === 'bfloat16' ? T.roundToBfloat16(rand(seed, sizeOf(shape))) : rand(seed, sizeOf(shape)), shape, dt);
const maxDiff = (a: number[], b: number[]) => a.reduce((m, v, i) => Math.max(m, Math.abs(v - b[i])), 0);
const hasBf16 = T.getBackend().name !== 'cpu';
const positions = (start: number, n: number) => Array.from({ length: n }, (_, i) => start + i);

/** [..., T, H, D] shapes and the first position: several lead dims, odd T and H, D 2..64. */
const CASES: [number[], number][] = [
  [[1, 1, 2], 0],
  [[2, 5, 3, 8], 7],
  [[3, 4, 16], 100],
  [[1, 2, 9, 2, 64], 4090],
];

describe('fused RoPE', () => {
  test('values equal the composite definition bit for bit', () => {
    for (const dt of ['float32', 'float64', ...(hasBf16 ? ['bfloat16'] : [])] as T.DType[]) {
      T.tidy(() => {
        for (const [shape, start] of CASES) {
          const x = R(1, shape, dt);
          const { cos, sin } = ropeTables(positions(start, shape[shape.length - 3]), shape[shape.length - 1], 500000, dt);
          const fused = T.fusedRope(x, cos, sin).toArray();
          const comp = compositeRope(x, cos, sin).toArray();
          fused.forEach((v, i) => assert.ok(Object.is(v, comp[i]), `${dt} ${shape} [${i}]: fused ${v} vs composite ${comp[i]}`));
          // the inverse rotation undoes the forward (up to rounding)
          const back = T.fusedRope(T.fusedRope(x, cos, sin), cos, sin, true).toArray();
          const tol = dt === 'float64' ? 1e-14 : dt === 'float32' ? 1e-5 : 3e-2;
          assert.ok(maxDiff(back, x.toArray()) < tol * 4, `${dt} ${shape}: inverse(forward(x)) differs from x by ${maxDiff(back, x.toArray())}`);
        }
      });
    }
  });

  test('first and second order gradients equal the composite (float64), and finite differences', () => {
    T.tidy(() => {
      const [shape, start] = CASES[1];
      const x = R(2, shape, 'float64');
      const g = R(3, shape, 'float64');
      const v = R(4, shape, 'float64');
      const { cos, sin } = ropeTables(positions(start, shape[1]), shape[3], 500000, 'float64');
      type F = (x: T.Tensor, c: T.Tensor, s: T.Tensor) => T.Tensor;
      // a nonlinear loss, so the Hessian-vector product is not zero
      const loss = (f: F) => (a: T.Tensor) => T.sum(T.mul(T.tanh(f(a, cos, sin)), g));
      const fusedF: F = (a, c, s) => T.fusedRope(a, c, s);
      const g1 = (T.grad(loss(fusedF))(x) as T.Tensor).toArray();
      const c1 = (T.grad(loss(compositeRope))(x) as T.Tensor).toArray();
      assert.ok(maxDiff(g1, c1) < 1e-13, `grad: ${maxDiff(g1, c1)}`);
      const hvp = (f: F) => T.grad((a: T.Tensor) => T.sum(T.mul(T.grad(loss(f))(a) as T.Tensor, v)))(x) as T.Tensor;
      assert.ok(maxDiff(hvp(fusedF).toArray(), hvp(compositeRope).toArray()) < 1e-12, 'Hessian-vector product');
      // central differences of the loss along v
      const h = 1e-6;
      const at = (s: number) => loss(fusedF)(T.add(x, T.mul(v, s))).item();
      const fd = (at(h) - at(-h)) / (2 * h);
      const dir = g1.reduce((acc, gi, i) => acc + gi * v.toArray()[i], 0);
      assert.ok(Math.abs(fd - dir) < 1e-7 * (1 + Math.abs(dir)), `directional derivative ${dir} vs finite difference ${fd}`);
    });
  });

  test('the model path: rope() forced fused and forced composite agree bit for bit; auto follows the backend', () => {
    T.tidy(() => {
      const x = R(5, [2, 6, 4, 16], 'float32');
      const pos = positions(3, 6);
      const run = (path: 'auto' | 'fused' | 'composite') => countingCalls('rope', () => withOpPath('rope', path, () => rope(x, pos, 10000).toArray()));
      const fused = run('fused');
      assert.equal(fused.calls, 1, 'forced fused runs the kernel');
      const comp = run('composite');
      assert.equal(comp.calls, 0, 'forced composite does not');
      fused.result.forEach((v, i) => assert.ok(Object.is(v, comp.result[i]), `[${i}]`));
      assert.equal(run('auto').calls, T.getBackend().preferFused ? 1 : 0, `auto on ${T.getBackend().name}`);
    });
  });

  test('split and merge layouts: the rotation and the heads transpose in one op, bit for bit; gradients through them', () => {
    const headsFirst = (t: T.Tensor) => T.transpose(t, [...Array(t.rank - 3).keys(), t.rank - 2, t.rank - 3, t.rank - 1]);
    for (const dt of ['float32', 'float64', ...(hasBf16 ? ['bfloat16'] : [])] as T.DType[]) {
      T.tidy(() => {
        for (const [shape, start] of CASES) {
          const x = R(11, shape, dt);
          const { cos, sin } = ropeTables(positions(start, shape[shape.length - 3]), shape[shape.length - 1], 500000, dt);
          for (const inverse of [false, true]) {
            const split = T.fusedRope(x, cos, sin, inverse, 'split');
            const want = headsFirst(T.fusedRope(x, cos, sin, inverse));
            assert.deepEqual(split.shape, want.shape);
            const [a, b] = [split.toArray(), want.toArray()];
            a.forEach((v, i) => assert.ok(Object.is(v, b[i]), `${dt} ${shape} split inverse ${inverse} [${i}]`));
            // merge reads the heads-first layout and writes token-major: the transpose back
            const merged = T.fusedRope(headsFirst(x), cos, sin, inverse, 'merge').toArray();
            const direct = T.fusedRope(x, cos, sin, inverse).toArray();
            merged.forEach((v, i) => assert.ok(Object.is(v, direct[i]), `${dt} ${shape} merge inverse ${inverse} [${i}]`));
          }
          // rope(..., 'split') on the model's path, fused or composite, gives the same
          const pos = positions(start, shape[shape.length - 3]);
          for (const path of ['fused', 'composite'] as const) {
            const y = withOpPath('rope', path, () => rope(x, pos, 500000, 'split').toArray());
            const ref = headsFirst(compositeRope(x, cos, sin)).toArray();
            y.forEach((v, i) => assert.ok(Object.is(v, ref[i]), `${dt} ${shape} rope() ${path} split [${i}]`));
          }
        }
      });
    }
    T.tidy(() => {
      const [shape, start] = CASES[1];
      const x = R(12, shape, 'float64');
      const { cos, sin } = ropeTables(positions(start, shape[1]), shape[3], 500000, 'float64');
      const g = R(13, [2, 3, 5, 8], 'float64');
      const v = R(14, shape, 'float64');
      const loss = (split: boolean) => (a: T.Tensor) => T.sum(T.mul(T.tanh(split ? T.fusedRope(a, cos, sin, false, 'split') : headsFirst(compositeRope(a, cos, sin))), g));
      const [g1, c1] = [T.grad(loss(true))(x) as T.Tensor, T.grad(loss(false))(x) as T.Tensor];
      assert.ok(maxDiff(g1.toArray(), c1.toArray()) < 1e-13, 'split: grad');
      const hvp = (split: boolean) => T.grad((a: T.Tensor) => T.sum(T.mul(T.grad(loss(split))(a) as T.Tensor, v)))(x) as T.Tensor;
      assert.ok(maxDiff(hvp(true).toArray(), hvp(false).toArray()) < 1e-12, 'split: Hessian-vector product');
      const h = 1e-6;
      const at = (e: number) => loss(true)(T.add(x, T.mul(v, e))).item();
      const dir = g1.toArray().reduce((acc, gi, i) => acc + gi * v.toArray()[i], 0);
      assert.ok(Math.abs((at(h) - at(-h)) / (2 * h) - dir) < 1e-7 * (1 + Math.abs(dir)), 'split: finite difference');
    });
  });

  test('bad shapes, tables and dtypes name the op', () => {
    T.tidy(() => {
      const x = R(6, [2, 3, 8], 'float32');
      const { cos, sin } = ropeTables(positions(0, 2), 8, 10000, 'float32');
      assert.throws(() => T.fusedRope(R(6, [3, 8], 'float32'), cos, sin), /rope: expected x \[\.\.\., T, H, D\], got \[3,8\]/);
      assert.throws(() => T.fusedRope(R(6, [2, 3, 7], 'float32'), cos, sin), /rope: head dim 7 of \[2,3,7\] is odd/);
      assert.throws(() => T.fusedRope(R(6, [4, 3, 8], 'float32'), cos, sin), /rope: cos table \[8\] should hold T·D\/2 = 16 values/);
      assert.throws(() => T.fusedRope(x, T.cast(cos, 'float64'), sin), /rope: cos table is float64, x is float32/);
      assert.throws(() => T.fusedRope(T.tensor([1, 2, 3, 4], [1, 2, 2], 'int32'), T.tensor([1], [1], 'int32'), T.tensor([1], [1], 'int32')), /rope: needs a floating-point tensor, got int32/);
      assert.throws(() => T.grad((c: T.Tensor) => T.sum(T.fusedRope(x, c, sin)))(cos), /rope: the cos\/sin tables are constants/);
    });
  });
});
