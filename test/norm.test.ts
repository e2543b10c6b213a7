/**
 * The fused RMSNorm op against its composite definition (which ops-grad checks against finite
 * differences): values, first-order gradients through the backend's backward kernel, and second
 * order (where the op's backward falls back to the composite). Runs on the backend in use
 * (TTT_DEVICE=cuda for the GPU), in float64 where the backend has it.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import * as T from '../src/index.js';
import { seededValues } from './helpers/check.js';
import { countingCalls, withGradKernel as withFlag } from './helpers/fused.js';
import { sizeOf } from '../src/engine/shape.js';
import { fromData } from '../src/engine/runtime.js';

const dt: T.DType = 'float64';
const tol = 1e-12;

/** Seeded host values in [lo, hi). */
const rand = (seed: number, n: number, lo = -2, hi = 2): number[] => seededValues(seed, n, lo, hi);
const R = (seed: number, shape: number[]) => T.tensor(rand(seed, sizeOf(shape)), shape, dt);
const maxDiff = (a: number[], b: number[]) => a.reduce((m, v, i) => Math.max(m, Math.abs(v - b[i])), 0);

describe('fused RMSNorm', () => {
  // (on the GPU, rows of 64 take the 16-byte-vector kernels, of 1024 doubles the element-wise ones; rows of 16
  // doubles (8 vectors) share a warp four to one, 37 of them leaving the last warp part-filled)
  const shapes = [[5], [3, 7], [2, 4, 33], [1, 0, 6], [4, 1], [3, 64], [2, 3, 1024], [37, 16]];

  test('values equal the composite definition', () => {
    T.tidy(() => {
      for (const shape of shapes) {
        const x = R(1, shape);
        const w = R(2, [shape[shape.length - 1]]);
        for (const eps of [1e-6, 0.5]) {
          assert.ok(maxDiff(T.fusedRmsNorm(x, w, eps).toArray(), T.compositeRmsNorm(x, w, eps).toArray()) < tol, `${shape} eps ${eps}`);
        }
      }
    });
  });

  test('gradients (the backward kernel) equal the composite gradients', () => {
    T.tidy(() => {
      for (const shape of shapes) {
        const x = R(3, shape);
        const w = R(4, [shape[shape.length - 1]]);
        const g = R(5, shape);
        const loss = (f: typeof T.fusedRmsNorm) => (a: T.Tensor, b: T.Tensor) => T.sum(T.mul(f(a, b, 1e-6), g));
        const { result: fused, calls } = countingCalls('rmsNormBackward', () => T.grad(loss(T.fusedRmsNorm), [0, 1])(x, w) as T.Tensor[]);
        assert.equal(calls, 1, 'first order runs the backend kernel');
        const comp = T.grad(loss(T.compositeRmsNorm), [0, 1])(x, w) as T.Tensor[];
        fused.forEach((t, i) => assert.ok(maxDiff(t.toArray(), comp[i].toArray()) < 1e-11, `${shape} grad ${i}: ${maxDiff(t.toArray(), comp[i].toArray())}`));
      }
    });
  });

  test('float32 and bfloat16 (where the backend has it): fused values and gradients within the dtype of the float64 composite, rows of whole 16-byte vectors and not', () => {
    const dtypes: T.DType[] = T.getBackend().name === 'cuda' ? ['float32', 'bfloat16'] : ['float32'];
    T.tidy(() => {
      for (const low of dtypes) {
        const tolLow = low === 'float32' ? 2e-5 : 3e-2;
        // (rows of 64 bf16 or 16 floats: 8 or 4 lanes a row, several rows a warp; 37 rows part-fill the last warp)
        for (const shape of [[5, 768], [3, 2048], [4, 33], [2, 12], [2, 1028], [37, 64], [37, 16], [9, 136]]) {
          const d = shape[shape.length - 1];
          // inputs exactly representable in the low dtype, so float64 sees the same numbers
          const [x, w, g] = [R(21, shape), R(22, [d]), R(23, shape)].map((t) => T.cast(T.cast(t, low), 'float64'));
          const loss = (f: typeof T.fusedRmsNorm) => (a: T.Tensor, b: T.Tensor, gg: T.Tensor) => T.sum(T.mul(f(a, b, 1e-6), gg));
          const want = [T.compositeRmsNorm(x, w, 1e-6), ...(T.grad(loss(T.compositeRmsNorm), [0, 1])(x, w, g) as T.Tensor[])];
          const [xl, wl, gl] = [x, w, g].map((t) => T.cast(t, low));
          const got = [T.fusedRmsNorm(xl, wl, 1e-6), ...(T.grad(loss(T.fusedRmsNorm), [0, 1])(xl, wl, gl) as T.Tensor[])];
          got.forEach((t, j) => {
            const a = T.cast(t, 'float64').toArray();
            const b = want[j].toArray();
            const scale = Math.max(1, ...b.map(Math.abs));
            const e = maxDiff(a, b) / scale;
            assert.ok(e < tolLow, `${low} ${shape} ${['y', 'dx', 'dw'][j]}: error ${e}`);
          });
        }
      }
    });
  });

  test('a gradient of x alone skips the gain\'s column sum (the backend returns no dw) and still equals the composite', () => {
    T.tidy(() => {
      const x = R(9, [5, 12]);
      const w = R(10, [12]);
      const g = R(11, [5, 12]);
      const loss = (f: typeof T.fusedRmsNorm) => (a: T.Tensor) => T.sum(T.mul(f(a, w, 1e-6), g));
      const be = T.getBackend();
      const original = be.rmsNormBackward.bind(be);
      const asked: boolean[] = [];
      be.rmsNormBackward = (...args: Parameters<typeof original>) => {
        asked.push(args[7]);
        const r = original(...args);
        assert.equal(r.dw === null, !args[7], 'dw exactly when asked for');
        return r;
      };
      let fused: T.Tensor;
      try {
        fused = T.grad(loss(T.fusedRmsNorm))(x) as T.Tensor;
      } finally {
        be.rmsNormBackward = original;
      }
      assert.deepEqual(asked, [false]);
      assert.ok(maxDiff(fused.toArray(), (T.grad(loss(T.compositeRmsNorm))(x) as T.Tensor).toArray()) < 1e-11);
    });
  });

  test('second order (grad of grad) agrees with the composite', () => {
    T.tidy(() => {
      const x = R(6, [3, 8]);
      const w = R(7, [8]);
      const v = R(8, [3, 8]);
      const hvp = (f: typeof T.fusedRmsNorm) =>
        T.grad((a: T.Tensor, b: T.Tensor) => T.sum(T.mul(T.grad((p: T.Tensor) => T.sum(T.square(f(p, b, 1e-6))))(a), v)), [0, 1])(x, w) as T.Tensor[];
      const fused = hvp(T.fusedRmsNorm);
      const comp = hvp(T.compositeRmsNorm);
      fused.forEach((t, i) => assert.ok(maxDiff(t.toArray(), comp[i].toArray()) < 1e-10, `hvp ${i}`));
    });
  });

  const withGradKernel = <R>(on: boolean, fn: () => R): R => withFlag('rmsNormGradKernel', on, fn);
  const gradShapes = [[5], [3, 7], [2, 4, 33], [1, 0, 6], [4, 1], [3, 64], [2, 3, 1024], [37, 16]];

  test('rmsNormGrad (the backward as an op) equals the composite vjp, and so does compositeRmsNormGrad', () => {
    T.tidy(() => {
      for (const shape of gradShapes) {
        const d = shape[shape.length - 1];
        const [x, w, g] = [R(31, shape), R(32, [d]), R(33, shape)];
        const want = (T.vjp((a: T.Tensor) => T.compositeRmsNorm(a, w, 1e-6), x)[1](g) as T.Tensor[])[0].toArray();
        const rstd = T.reshape(T.rsqrt(T.add(T.mean(T.square(x), -1, true), 1e-6)), [sizeOf(shape) / Math.max(d, 1)]);
        const got = T.rmsNormGrad(x, w, g, rstd, 1e-6).toArray();
        assert.ok(maxDiff(got, want) < 1e-11, `${shape} fused: ${maxDiff(got, want)}`);
        assert.ok(maxDiff(T.compositeRmsNormGrad(x, w, g, 1e-6).toArray(), want) < 1e-11, `${shape} composite`);
      }
    });
  });

  test('its backward (the second-order kernel) gives the cotangents of x, w and dy of the composite, the gain\'s only when asked', () => {
    T.tidy(() => {
      for (const shape of gradShapes) {
        const d = shape[shape.length - 1];
        const [x, w, g, c] = [R(41, shape), R(42, [d]), R(43, shape), R(44, shape)];
        const rstd = T.reshape(T.rsqrt(T.add(T.mean(T.square(x), -1, true), 0.5)), [sizeOf(shape) / Math.max(d, 1)]);
        const want = T.vjp((a: T.Tensor, b: T.Tensor, gg: T.Tensor) => T.compositeRmsNormGrad(a, b, gg, 0.5), x, w, g)[1](c) as T.Tensor[];
        for (const wantDw of [true, false]) {
          const be = T.getBackend();
          const r = be.rmsNormGradBackward(x.data, w.data, rstd.data, g.data, c.data, sizeOf(shape) / Math.max(d, 1), d, dt, wantDw);
          const got: (T.Tensor | null)[] = [r.dx, r.dw, r.dg].map((data, i) => (data === null ? null : fromData(data, [shape, [d], shape][i], dt, be)));
          assert.equal(got[1] === null, !wantDw, 'the gain\'s cotangent exactly when asked for');
          got.forEach((t, i) => {
            if (t === null) return;
            const e = maxDiff(t.toArray(), want[i].toArray());
            assert.ok(e < 1e-10 * Math.max(1, ...want[i].toArray().map(Math.abs)), `${shape} ${['dx', 'dw', 'dy'][i]}: ${e}`);
          });
        }
      }
    });
  });

  test('second order takes the one-pass kernel where the backend has it (else the composite), third order the composite; all agree', () => {
    T.tidy(() => {
      const x = R(6, [3, 8]);
      const w = R(7, [8]);
      const v = R(8, [3, 8]);
      const u = R(9, [3, 8]);
      const hvpOf = (f: typeof T.fusedRmsNorm) => (a: T.Tensor, b: T.Tensor) => T.sum(T.mul(T.grad((p: T.Tensor) => T.sum(T.square(f(p, b, 1e-6))))(a), v));
      const third = (f: typeof T.fusedRmsNorm) =>
        T.grad((a: T.Tensor, b: T.Tensor) => T.sum(T.mul((T.grad(hvpOf(f), [0, 1])(a, b) as T.Tensor[])[0], u)), [0, 1])(x, w) as T.Tensor[];
      const comp = { hvp: T.grad(hvpOf(T.compositeRmsNorm), [0, 1])(x, w) as T.Tensor[], third: third(T.compositeRmsNorm) };
      for (const on of [true, false]) {
        const { result: hvp, calls } = countingCalls('rmsNormGradBackward', () => withGradKernel(on, () => T.grad(hvpOf(T.fusedRmsNorm), [0, 1])(x, w) as T.Tensor[]));
        assert.equal(calls, on ? 1 : 0, `second order with rmsNormGradKernel ${on}`);
        hvp.forEach((t, i) => assert.ok(maxDiff(t.toArray(), comp.hvp[i].toArray()) < 1e-10, `kernel ${on}: hvp ${i}`));
        const t3 = withGradKernel(on, () => third(T.fusedRmsNorm));
        t3.forEach((t, i) => assert.ok(maxDiff(t.toArray(), comp.third[i].toArray()) < 1e-9, `kernel ${on}: third order ${i}`));
      }
    });
  });

  test('float32 (and bfloat16 where the backend has it): the second-order kernel within the dtype of the float64 composite', () => {
    const dtypes: T.DType[] = T.getBackend().name === 'cuda' ? ['float32', 'bfloat16'] : ['float32'];
    T.tidy(() => {
      for (const low of dtypes) {
        const tolLow = low === 'float32' ? 2e-5 : 3e-2;
        for (const shape of [[5, 768], [4, 33], [37, 16], [2, 1028]]) {
          const d = shape[shape.length - 1];
          const [x, w, g, c] = [R(51, shape), R(52, [d]), R(53, shape), R(54, shape)].map((t) => T.cast(T.cast(t, low), 'float64'));
          const want = T.vjp((a: T.Tensor, b: T.Tensor, gg: T.Tensor) => T.compositeRmsNormGrad(a, b, gg, 1e-6), x, w, g)[1](c) as T.Tensor[];
          const [xl, wl, gl, cl] = [x, w, g, c].map((t) => T.cast(t, low));
          const got = withGradKernel(true, () => T.vjp((a: T.Tensor, b: T.Tensor, gg: T.Tensor) => {
            const rstd = T.reshape(T.cast(T.rsqrt(T.add(T.mean(T.square(T.cast(T.stopGradient(a), 'float32')), -1, true), 1e-6)), low === 'bfloat16' ? 'float32' : low), [sizeOf(shape) / d]);
            return T.rmsNormGrad(a, b, gg, rstd, 1e-6);
          }, xl, wl, gl)[1](cl) as T.Tensor[]);
          got.forEach((t, j) => {
            const b = want[j].toArray();
            const e = maxDiff(T.cast(t, 'float64').toArray(), b) / Math.max(1, ...b.map(Math.abs));
            assert.ok(e < tolLow, `${low} ${shape} ${['dx', 'dw', 'dy'][j]}: error ${e}`);
          });
        }
      }
    });
  });

  test('bad shapes and dtypes name the op', () => {
    T.tidy(() => {
      assert.throws(() => T.fusedRmsNorm(R(1, [2, 3]), R(2, [4]), 1e-6), /rmsNorm: expected x \[\.\.\., D\] and w \[D\]/);
      assert.throws(() => T.fusedRmsNorm(R(1, [2, 3]), T.ones([3], 'float32'), 1e-6), /rmsNorm: dtype mismatch/);
      assert.throws(() => T.fusedRmsNorm(T.ones([2, 3], 'int32'), T.ones([3], 'int32'), 1e-6), /rmsNorm: needs a floating-point tensor/);
    });
  });
});
