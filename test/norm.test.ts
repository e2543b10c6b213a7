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
import { countingCalls } from './helpers/fused.js';
import { sizeOf } from '../src/engine/shape.js';

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

  test('second order (grad of grad) goes through the composite and agrees', () => {
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

  test('bad shapes and dtypes name the op', () => {
    T.tidy(() => {
      assert.throws(() => T.fusedRmsNorm(R(1, [2, 3]), R(2, [4]), 1e-6), /rmsNorm: expected x \[\.\.\., D\] and w \[D\]/);
      assert.throws(() => T.fusedRmsNorm(R(1, [2, 3]), T.ones([3], 'float32'), 1e-6), /rmsNorm: dtype mismatch/);
      assert.throws(() => T.fusedRmsNorm(T.ones([2, 3], 'int32'), T.ones([3], 'int32'), 1e-6), /rmsNorm: needs a floating-point tensor/);
    });
  });
});
