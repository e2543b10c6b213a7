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
import { countingCalls, withOpPath } from './helpers/fused.js';
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

  test('second order (grad of grad) goes through the composite and agrees; finite differences', () => {
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
