/**
 * softmaxGrad (softmax's backward) against its composite definition y ⊙ (g − Σ g ⊙ y), with the backend's row
 * kernels on and off (`Backend.softmaxGradKernel`): values, first order against finite differences, the backward
 * of the backward (the one-pass kernel that the composite attention's second order takes) against the composite's
 * vjp and finite differences, third order, and float32 / bfloat16 against float64. Runs on the backend in use
 * (TTT_DEVICE=cuda for the GPU), in float64 where the backend has it.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import * as T from '../src/index.js';
import { compositeSoftmaxGrad, softmaxGrad } from '../src/engine/ops.js';
import { compositeAttention } from '../src/engine/attention.js';
import { fromData } from '../src/engine/runtime.js';
import { sizeOf } from '../src/engine/shape.js';
import { checkGrad, checkHvp, project, seededValues } from './helpers/check.js';
import { countingCalls, withGradKernel } from './helpers/fused.js';

const dt: T.DType = 'float64';
const R = (seed: number, shape: number[], lo = -2, hi = 2) => T.tensor(seededValues(seed, sizeOf(shape), lo, hi), shape, dt);
/** A softmax output (rows that sum to 1) of the given shape. */
const P = (seed: number, shape: number[]) => T.softmax(R(seed, shape, -3, 3), -1);
const maxDiff = (a: T.Tensor, b: T.Tensor) => {
  const [x, y] = [a.toArray(), b.toArray()];
  assert.equal(x.length, y.length);
  return x.reduce((m, v, i) => Math.max(m, Math.abs(v - y[i])), 0);
};
const on = <R>(kernel: boolean, fn: () => R): R => withGradKernel('softmaxGradKernel', kernel, fn);
const shapes = [[5], [3, 7], [2, 4, 33], [1, 0, 6], [4, 1], [2, 3, 1024], [37, 16]];

describe('softmaxGrad (softmax\'s backward)', () => {
  test('one backend pass where the backend has the kernel; the same values as the composite', () => {
    T.tidy(() => {
      for (const shape of shapes) {
        const [y, g] = [P(1, shape), R(2, shape)];
        const want = compositeSoftmaxGrad(y, g);
        const { result, calls } = countingCalls('softmaxBackward', () => on(true, () => softmaxGrad(y, g)));
        assert.equal(calls, 1, `${shape}: one kernel call`);
        assert.ok(maxDiff(result, want) < 1e-14, `${shape}: ${maxDiff(result, want)}`);
        const off = countingCalls('softmaxBackward', () => on(false, () => softmaxGrad(y, g)));
        assert.equal(off.calls, 0, 'off: the composite');
        assert.ok(maxDiff(off.result, want) === 0, `${shape}: off is the composite`);
      }
    });
  });

  test('softmax\'s gradient through the kernel matches finite differences (rows of 2, 7 and 33; an axis that is not last)', () => {
    T.tidy(() => on(true, () => {
      for (const [shape, axis] of [[[3, 7], -1], [[2, 33], -1], [[4, 2], -1], [[3, 4, 5], 1]] as [number[], number][]) {
        const x = R(3, shape);
        checkGrad(project((a) => T.softmax(a, axis), [x], 5, 'square'), [x], { label: `softmax ${shape} axis ${axis}` });
      }
    }));
  });

  test('its backward (the second-order kernel) gives the cotangents of y and g of the composite\'s vjp', () => {
    T.tidy(() => {
      for (const shape of shapes) {
        const [y, g, u] = [P(11, shape), R(12, shape), R(13, shape)];
        const want = T.vjp(compositeSoftmaxGrad, y, g)[1](u) as T.Tensor[];
        const n = shape[shape.length - 1];
        const be = T.getBackend();
        const k = be.softmaxGradBackward(y.data, g.data, u.data, n === 0 ? 0 : sizeOf(shape) / n, n, dt);
        [k.dy, k.dg].forEach((data, i) => {
          const got = fromData(data, shape, dt, be);
          const e = maxDiff(got, want[i]);
          assert.ok(e < 1e-13 * Math.max(1, ...want[i].toArray().map(Math.abs)), `${shape} ${['dy', 'dg'][i]}: ${e}`);
        });
      }
    });
  });

  test('second order (through the op) takes that kernel once and matches finite differences; the composite agrees', () => {
    T.tidy(() => {
      const x = R(21, [3, 9]);
      const f = project((a) => T.softmax(a, -1), [x], 7, 'tanh');
      on(true, () => checkHvp(f, [x], { label: 'softmax hvp, kernel on', rtol: 1e-6 }));
      const v = R(22, [3, 9]);
      const hvp = () => T.grad((a: T.Tensor) => T.sum(T.mul(T.grad(f)(a) as T.Tensor, v)))(x) as T.Tensor;
      const { result: withKernel, calls } = countingCalls('softmaxGradBackward', () => on(true, hvp));
      assert.equal(calls, 1, 'the second-order kernel, once');
      const composite = on(false, hvp);
      assert.ok(maxDiff(withKernel, composite) < 1e-13, `hvp: kernel vs composite ${maxDiff(withKernel, composite)}`);
    });
  });

  test('third order (the op\'s backward written in ops) agrees with the composite', () => {
    T.tidy(() => {
      const x = R(31, [2, 6]);
      const [v, w] = [R(32, [2, 6]), R(33, [2, 6])];
      const f = project((a) => T.softmax(a, -1), [x], 9, 'tanh');
      const hvp = (a: T.Tensor) => T.sum(T.mul(T.grad((b: T.Tensor) => T.sum(T.mul(T.grad(f)(b) as T.Tensor, v)))(a) as T.Tensor, w));
      const third = (kernel: boolean) => on(kernel, () => T.grad(hvp)(x) as T.Tensor);
      const [withKernel, composite] = [third(true), third(false)];
      assert.ok(maxDiff(withKernel, composite) < 1e-12, `third order: kernel vs composite ${maxDiff(withKernel, composite)}`);
      on(true, () => checkGrad(hvp, [x], { label: 'third order vs finite differences of the second', rtol: 1e-5 }));
    });
  });

  test('float32 (and bfloat16 where the backend has it): both kernels within the dtype of the float64 composite', () => {
    const dtypes: T.DType[] = T.getBackend().name === 'cuda' ? ['float32', 'bfloat16'] : ['float32'];
    T.tidy(() => {
      for (const low of dtypes) {
        const tol = low === 'float32' ? 1e-6 : 2e-2;
        for (const shape of [[12, 9215], [5, 33], [3, 1]]) {
          const [y, g, u] = [P(41, shape), R(42, shape), R(43, shape)].map((t) => T.cast(T.cast(t, low), 'float64'));
          const want = [compositeSoftmaxGrad(y, g), ...(T.vjp(compositeSoftmaxGrad, y, g)[1](u) as T.Tensor[])];
          const [yl, gl, ul] = [y, g, u].map((t) => T.cast(t, low));
          const got = on(true, () => {
            const [out, back] = T.vjp(softmaxGrad, yl, gl);
            return [out as T.Tensor, ...(back(ul) as T.Tensor[])];
          });
          got.forEach((t, j) => {
            const b = want[j].toArray();
            const e = maxDiff(T.cast(t, 'float64'), want[j]) / Math.max(1, ...b.map(Math.abs));
            assert.ok(e < tol, `${low} ${shape} ${['dx', 'dy', 'dg'][j]}: error ${e}`);
          });
        }
      }
    });
  });

  test('a TTT-style meta-gradient through the composite attention is the same with the kernels on and off', () => {
    T.tidy(() => {
      const [q, k, v] = [R(51, [2, 6, 4]), R(52, [2, 6, 4]), R(53, [2, 6, 4])];
      const wv = R(54, [4, 4], -0.5, 0.5);
      // an inner gradient step on a weight through attention, then a loss of the stepped weight: second order
      // (the weight acts on the queries, so the inner gradient runs through softmax's backward)
      const inner = (w: T.Tensor) => T.sum(T.square(compositeAttention(T.matmul(q, w), k, v, { qStart: 0, kStart: 0, window: 4 })));
      const outer = (w: T.Tensor) => {
        const stepped = T.sub(w, T.mul(T.grad(inner)(w) as T.Tensor, 0.1));
        return T.sum(T.tanh(compositeAttention(T.matmul(q, stepped), k, v, { qStart: 0, kStart: 0 })));
      };
      const { result: withKernel, calls } = countingCalls('softmaxGradBackward', () => on(true, () => T.valueAndGrad(outer)(wv)));
      assert.equal(calls, 1, 'the outer backward runs the second-order kernel for the inner step\'s softmax backward');
      const composite = on(false, () => T.valueAndGrad(outer)(wv));
      assert.ok(Math.abs(withKernel[0].item() - composite[0].item()) < 1e-13, 'loss');
      assert.ok(maxDiff(withKernel[1], composite[1]) < 1e-12, `meta-gradient: ${maxDiff(withKernel[1], composite[1])}`);
    });
  });
});
