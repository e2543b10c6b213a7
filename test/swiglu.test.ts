/**
 * The fused SwiGLU gate silu(a) · b against its composite definition: values, first-order
 * gradients through the backend's backward kernel, second order (where the op's backward falls back
 * to the composite), finite differences, bf16 where the backend has it, and errors. Runs on the
 * backend in use (TTT_DEVICE=cuda for the GPU).
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import * as T from '../src/index.js';
import { swiglu } from '../src/nn/layers.js';
import { seededValues } from './helpers/check.js';
import { countingCalls, withGradKernel as withFlag, withOpPath } from './helpers/fused.js';
import { sizeOf } from '../src/engine/shape.js';

const rand = (seed: number, n: number, lo = -4, hi = 4): number[] => seededValues(seed, n, lo, hi);
const R = (seed: number, shape: number[], dt: T.DType = 'float64') =>
  T.tensor(dt === 'bfloat16' ? T.roundToBfloat16(rand(seed, sizeOf(shape))) : rand(seed, sizeOf(shape)), shape, dt);
/** max |a − b| / max(1, |b|). */
const relDiff = (a: number[], b: number[]) => a.reduce((m, v, i) => Math.max(m, Math.abs(v - b[i]) / Math.max(1, Math.abs(b[i]))), 0);

describe('fused SwiGLU gate', () => {
  const shapes = [[7], [3, 5], [2, 4, 33], [1, 0, 6]];

  test('values equal the composite definition (float64 1e-15, float32 1e-6, bfloat16 1e-2 where available)', () => {
    const dts: [T.DType, number][] = [['float64', 1e-15], ['float32', 1e-6]];
    if (T.getBackend().name !== 'cpu') dts.push(['bfloat16', 1e-2]);
    for (const [dt, tol] of dts) {
      T.tidy(() => {
        for (const shape of shapes) {
          const [a, b] = [R(1, shape, dt), R(2, shape, dt)];
          const e = relDiff(T.fusedSwigluGate(a, b).toArray(), T.compositeSwigluGate(a, b).toArray());
          assert.ok(e <= tol, `${dt} ${shape}: ${e}`);
        }
      });
    }
  });

  test('gradients (the backward kernel, once) equal the composite gradients', () => {
    T.tidy(() => {
      for (const shape of shapes) {
        const [a, b, g] = [R(3, shape), R(4, shape), R(5, shape)];
        const loss = (f: typeof T.fusedSwigluGate) => (x: T.Tensor, y: T.Tensor) => T.sum(T.mul(f(x, y), g));
        const { result: fused, calls } = countingCalls('swigluBackward', () => T.grad(loss(T.fusedSwigluGate), [0, 1])(a, b) as T.Tensor[]);
        assert.equal(calls, 1, 'first order runs the backend kernel');
        const comp = T.grad(loss(T.compositeSwigluGate), [0, 1])(a, b) as T.Tensor[];
        fused.forEach((t, i) => assert.ok(relDiff(t.toArray(), comp[i].toArray()) < 1e-14, `${shape} grad ${i}`));
      }
    });
  });

  test('second order (grad of grad) agrees with the composite; finite differences', () => {
    T.tidy(() => {
      const [a, b, v] = [R(6, [3, 8]), R(7, [3, 8]), R(8, [3, 8])];
      const inner = (f: typeof T.fusedSwigluGate) => (x: T.Tensor, y: T.Tensor) => T.sum(T.square(f(x, y)));
      const hvp = (f: typeof T.fusedSwigluGate) =>
        T.grad((x: T.Tensor, y: T.Tensor) => T.sum(T.mul(T.grad(inner(f), [0, 1])(x, y)[0] as T.Tensor, v)), [0, 1])(a, b) as T.Tensor[];
      const fused = hvp(T.fusedSwigluGate);
      const comp = hvp(T.compositeSwigluGate);
      fused.forEach((t, i) => assert.ok(relDiff(t.toArray(), comp[i].toArray()) < 1e-13, `hvp ${i}`));
      const h = 1e-6;
      const at = (s: number) => inner(T.fusedSwigluGate)(T.add(a, T.mul(v, s)), b).item();
      const dir = T.sum(T.mul(T.grad(inner(T.fusedSwigluGate), [0, 1])(a, b)[0] as T.Tensor, v)).item();
      assert.ok(Math.abs((at(h) - at(-h)) / (2 * h) - dir) < 1e-6 * (1 + Math.abs(dir)), 'directional derivative vs central difference');
    });
  });

  const withGradKernel = <R>(on: boolean, fn: () => R): R => withFlag('swigluGradKernel', on, fn);
  /** The gate's backward [da, db] from the composite's vjp. */
  const compositeGrad = (a: T.Tensor, b: T.Tensor, g: T.Tensor) => T.vjp(T.compositeSwigluGate, a, b)[1](g) as T.Tensor[];

  test('swigluGateGrad (the backward as an op) equals the composite vjp', () => {
    T.tidy(() => {
      for (const shape of shapes) {
        const [a, b, g] = [R(21, shape), R(22, shape), R(23, shape)];
        const got = T.swigluGateGrad(a, b, g);
        compositeGrad(a, b, g).forEach((t, i) => assert.ok(relDiff(got[i].toArray(), t.toArray()) < 1e-14, `${shape} ${['da', 'db'][i]}`));
      }
    });
  });

  test('its backward (the second-order kernel) gives the cotangents of a, b and g of the composite; an unused output counts as zero', () => {
    T.tidy(() => {
      for (const shape of shapes) {
        const [a, b, g, ca, cb] = [R(31, shape), R(32, shape), R(33, shape), R(34, shape), R(35, shape)];
        const want = T.vjp(compositeGrad, a, b, g)[1]([ca, cb]) as T.Tensor[];
        const got = withGradKernel(true, () => T.vjp((x: T.Tensor, y: T.Tensor, z: T.Tensor) => T.swigluGateGrad(x, y, z), a, b, g)[1]([ca, cb]) as T.Tensor[]);
        got.forEach((t, i) => assert.ok(relDiff(t.toArray(), want[i].toArray()) < 1e-13, `${shape} ${['da', 'db', 'dg'][i]}`));
        // only db used downstream
        const onlyDb = T.grad((x: T.Tensor, y: T.Tensor, z: T.Tensor) => T.sum(T.mul(T.swigluGateGrad(x, y, z)[1], cb)), [0, 1, 2])(a, b, g) as T.Tensor[];
        const wantDb = T.vjp(compositeGrad, a, b, g)[1]([T.zerosLike(ca), cb]) as T.Tensor[];
        onlyDb.forEach((t, i) => assert.ok(relDiff(t.toArray(), wantDb[i].toArray()) < 1e-13, `${shape} db only: ${i}`));
      }
    });
  });

  test('second order takes the one-pass kernel where the backend has it (else the composite), third order the composite; all agree', () => {
    T.tidy(() => {
      const [a, b, v, u] = [R(41, [3, 8]), R(42, [3, 8]), R(43, [3, 8]), R(44, [3, 8])];
      const hvpOf = (f: typeof T.fusedSwigluGate) => (x: T.Tensor, y: T.Tensor) => {
        const [ga, gb] = T.grad((p: T.Tensor, q: T.Tensor) => T.sum(T.square(f(p, q))), [0, 1])(x, y) as T.Tensor[];
        return T.add(T.sum(T.mul(ga, v)), T.sum(T.mul(gb, u)));
      };
      const third = (f: typeof T.fusedSwigluGate) =>
        T.grad((x: T.Tensor, y: T.Tensor) => T.sum(T.mul((T.grad(hvpOf(f), [0, 1])(x, y) as T.Tensor[])[0], u)), [0, 1])(a, b) as T.Tensor[];
      const comp = { hvp: T.grad(hvpOf(T.compositeSwigluGate), [0, 1])(a, b) as T.Tensor[], third: third(T.compositeSwigluGate) };
      for (const on of [true, false]) {
        const { result: hvp, calls } = countingCalls('swigluGradBackward', () => withGradKernel(on, () => T.grad(hvpOf(T.fusedSwigluGate), [0, 1])(a, b) as T.Tensor[]));
        assert.equal(calls, on ? 1 : 0, `second order with swigluGradKernel ${on}`);
        hvp.forEach((t, i) => assert.ok(relDiff(t.toArray(), comp.hvp[i].toArray()) < 1e-12, `kernel ${on}: hvp ${i}`));
        withGradKernel(on, () => third(T.fusedSwigluGate)).forEach((t, i) => assert.ok(relDiff(t.toArray(), comp.third[i].toArray()) < 1e-11, `kernel ${on}: third order ${i}`));
      }
    });
  });

  test('float32 (and bfloat16 where the backend has it): the second-order kernel within the dtype of the float64 composite', () => {
    const dts: [T.DType, number][] = [['float32', 1e-5]];
    if (T.getBackend().name !== 'cpu') dts.push(['bfloat16', 3e-2]);
    T.tidy(() => {
      for (const [low, tol] of dts) {
        const shape = [5, 333];
        const xs = [51, 52, 53, 54, 55].map((seed) => T.cast(R(seed, shape, low), 'float64'));
        const want = T.vjp(compositeGrad, xs[0], xs[1], xs[2])[1]([xs[3], xs[4]]) as T.Tensor[];
        const [a, b, g, ca, cb] = xs.map((t) => T.cast(t, low));
        const got = withGradKernel(true, () => T.vjp((x: T.Tensor, y: T.Tensor, z: T.Tensor) => T.swigluGateGrad(x, y, z), a, b, g)[1]([ca, cb]) as T.Tensor[]);
        got.forEach((t, i) => {
          const w = want[i].toArray();
          const scale = Math.max(1, ...w.map(Math.abs));
          const err = T.cast(t, 'float64').toArray().reduce((m, x, j) => Math.max(m, Math.abs(x - w[j]) / scale), 0);
          assert.ok(err < tol, `${low} ${['da', 'db', 'dg'][i]}: error ${err}`);
        });
      }
    });
  });

  test('the model path: swiglu() forced fused and forced composite agree', () => {
    T.tidy(() => {
      const x = R(9, [2, 5, 8], 'float32');
      const p = { w1: R(10, [8, 12], 'float32'), w3: R(11, [8, 12], 'float32'), w2: R(12, [12, 8], 'float32') };
      const run = (path: 'fused' | 'composite') => withOpPath('swiglu', path, () => swiglu(x, p).toArray());
      assert.ok(relDiff(run('fused'), run('composite')) < 1e-5);
    });
  });

  test('bad shapes and dtypes name the op', () => {
    T.tidy(() => {
      assert.throws(() => T.fusedSwigluGate(R(1, [2, 3]), R(2, [3, 2])), /swigluGate: shapes \[2,3\] and \[3,2\] differ/);
      assert.throws(() => T.fusedSwigluGate(R(1, [2]), R(2, [2], 'float32')), /swigluGate: dtype mismatch \(float64, float32\)/);
      assert.throws(() => T.fusedSwigluGate(T.ones([2], 'int32'), T.ones([2], 'int32')), /swigluGate: needs a floating-point tensor, got int32/);
    });
  });
});
