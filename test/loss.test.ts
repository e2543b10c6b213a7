/**
 * The fused token NLL (logsumexp − logits[target] per row) against its composite definition:
 * values, the gradient through the backend's one-pass backward kernel, second order (the composite
 * fallback), finite differences, errors. Runs on the backend in use (TTT_DEVICE=cuda for the GPU).
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import * as T from '../src/index.js';
import { tokenNll } from '../src/nn/layers.js';
import { seededValues } from './helpers/check.js';
import { countingCalls, withOpPath } from './helpers/fused.js';
import { sizeOf } from '../src/engine/shape.js';

const R = (seed: number, shape: number[], dt: T.DType = 'float64', scale = 4) => T.tensor(seededValues(seed, sizeOf(shape), -scale, scale), shape, dt);
const targetsFor = (seed: number, shape: number[], V: number) =>
  T.tensor(seededValues(seed, sizeOf(shape), 0, V).map(Math.floor), shape, 'int32');
const relDiff = (a: number[], b: number[]) => a.reduce((m, v, i) => Math.max(m, Math.abs(v - b[i]) / Math.max(1, Math.abs(b[i]))), 0);

/**
 * [logits shape, targets shape]: 1-d and 2-d leads, a vocabulary of 1, long rows (a multiple of 8: the
 * GPU reads 16 bytes at a time; and not), no rows.
 */
const CASES: [number[], number[]][] = [[[3, 7], [3]], [[2, 4, 11], [2, 4]], [[5, 1], [5]], [[2, 3000], [2]], [[3, 2051], [3]], [[0, 5], [0]]];

describe('fused token NLL', () => {
  test('values equal the composite definition (float64, float32)', () => {
    for (const [dt, tol] of [['float64', 1e-14], ['float32', 2e-6]] as [T.DType, number][]) {
      T.tidy(() => {
        for (const [ls, ts] of CASES) {
          const logits = R(1, ls, dt);
          const targets = targetsFor(2, ts, ls[ls.length - 1]);
          const e = relDiff(T.fusedTokenNll(logits, targets).toArray(), T.compositeTokenNll(logits, targets).toArray());
          assert.ok(e <= tol, `${dt} ${ls}: ${e}`);
        }
        // large logits: no overflow, still exact
        const big = T.add(R(3, [2, 9], dt), 500);
        const tg = targetsFor(4, [2], 9);
        assert.ok(relDiff(T.fusedTokenNll(big, tg).toArray(), T.compositeTokenNll(big, tg).toArray()) <= tol * 10);
      });
    }
  });

  test('gradient through the backward kernel (one call) equals the composite gradient', () => {
    T.tidy(() => {
      for (const [ls, ts] of CASES) {
        const logits = R(5, ls);
        const targets = targetsFor(6, ts, ls[ls.length - 1]);
        const w = R(7, ts);
        const loss = (f: typeof T.fusedTokenNll) => (x: T.Tensor) => T.sum(T.mul(f(x, targets), w));
        const { result: fused, calls } = countingCalls('tokenNllBackward', () => T.grad(loss(T.fusedTokenNll))(logits) as T.Tensor);
        assert.equal(calls, 1, 'first order runs the backend kernel');
        const comp = T.grad(loss(T.compositeTokenNll))(logits) as T.Tensor;
        assert.ok(relDiff(fused.toArray(), comp.toArray()) < 1e-14, `${ls}: ${relDiff(fused.toArray(), comp.toArray())}`);
      }
    });
  });

  test('second order: one fused softmax Hessian-vector pass (tokenNllGrad), agreeing with the composite; third order; finite differences', () => {
    T.tidy(() => {
      const logits = R(8, [4, 6]);
      const targets = targetsFor(9, [4], 6);
      const v = R(10, [4, 6]);
      const inner = (f: typeof T.fusedTokenNll) => (x: T.Tensor) => T.sum(T.square(f(x, targets)));
      const hvp = (f: typeof T.fusedTokenNll) => T.grad((x: T.Tensor) => T.sum(T.mul(T.grad(inner(f))(x) as T.Tensor, v)))(logits) as T.Tensor;
      const { result: fused, calls } = countingCalls('tokenNllGradBackward', () => hvp(T.fusedTokenNll));
      assert.equal(calls, 1, 'the second order runs the Hessian-vector kernel once');
      assert.ok(relDiff(fused.toArray(), hvp(T.compositeTokenNll).toArray()) < 1e-13, 'Hessian-vector product');
      // both cotangents of tokenNllGrad (logits and g), against the composite's
      for (const [ls, ts] of CASES) {
        const x = R(14, ls);
        const tg = targetsFor(15, ts, ls[ls.length - 1]);
        const g0 = R(16, ts);
        const u = R(17, ls);
        const lse = T.logsumexp(x, -1);
        const viaOp = (a: T.Tensor, b: T.Tensor) => T.sum(T.mul(T.tokenNllGrad(a, tg, b, T.reshape(lse, [sizeOf(ts)])), u));
        const viaComposite = (a: T.Tensor, b: T.Tensor) =>
          T.sum(T.mul(T.vjp((y: T.Tensor) => T.compositeTokenNll(y, tg), a)[1](b)[0] as T.Tensor, u));
        const got = T.grad(viaOp, [0, 1])(x, g0) as T.Tensor[];
        const want = T.grad(viaComposite, [0, 1])(x, g0) as T.Tensor[];
        assert.ok(relDiff(got[0].toArray(), want[0].toArray()) < 1e-13, `${ls}: d logits ${relDiff(got[0].toArray(), want[0].toArray())}`);
        assert.ok(relDiff(got[1].toArray(), want[1].toArray()) < 1e-13, `${ls}: d g ${relDiff(got[1].toArray(), want[1].toArray())}`);
      }
      // third order: a directional derivative of the Hessian-vector product, through the composite fallback
      const third = (f: typeof T.fusedTokenNll) => T.sum(T.mul(T.grad((x: T.Tensor) => T.sum(T.mul(hvpAt(f, x), v)))(logits) as T.Tensor, v)).item();
      const hvpAt = (f: typeof T.fusedTokenNll, at: T.Tensor) => T.grad((x: T.Tensor) => T.sum(T.mul(T.grad(inner(f))(x) as T.Tensor, v)))(at) as T.Tensor;
      assert.ok(Math.abs(third(T.fusedTokenNll) - third(T.compositeTokenNll)) < 1e-11 * (1 + Math.abs(third(T.compositeTokenNll))), 'third order');
      const h = 1e-6;
      const at = (s: number) => inner(T.fusedTokenNll)(T.add(logits, T.mul(v, s))).item();
      const dir = T.sum(T.mul(T.grad(inner(T.fusedTokenNll))(logits) as T.Tensor, v)).item();
      assert.ok(Math.abs((at(h) - at(-h)) / (2 * h) - dir) < 1e-6 * (1 + Math.abs(dir)), 'directional derivative vs central difference');
    });
  });

  test('bfloat16 logits (GPU), rows of 300 and 2048: float32 NLL equal to the composite on the widened logits; the gradient in bf16; second order', { skip: T.getBackend().name === 'cpu' && 'bfloat16 compute is for the GPU' }, () => {
    // 300: element loads; 2048: 16-byte loads on the GPU
    for (const V of [300, 2048]) T.tidy(() => {
      const logits = T.cast(R(21, [6, V], 'float32'), 'bfloat16');
      const targets = targetsFor(22, [6], V);
      const nll = T.fusedTokenNll(logits, targets);
      assert.equal(nll.dtype, 'float32');
      const want = T.compositeTokenNll(T.cast(logits, 'float32'), targets);
      assert.ok(relDiff(nll.toArray(), want.toArray()) < 1e-6, `nll ${relDiff(nll.toArray(), want.toArray())}`);
      const w = R(23, [6], 'float32');
      const f = (fn: typeof T.fusedTokenNll) => (x: T.Tensor) => T.sum(T.mul(fn(x, targets), w));
      const g = T.grad(f(T.fusedTokenNll))(logits) as T.Tensor;
      assert.equal(g.dtype, 'bfloat16');
      const gw = T.grad((x: T.Tensor) => T.sum(T.mul(T.compositeTokenNll(x, targets), w)))(T.cast(logits, 'float32')) as T.Tensor;
      const scaled = (a: number[], b: number[]) => a.reduce((m, x, i) => Math.max(m, Math.abs(x - b[i])), 0) / b.reduce((m, x) => Math.max(m, Math.abs(x)), 0);
      assert.ok(scaled(g.toArray(), gw.toArray()) < 1e-2, `gradient ${scaled(g.toArray(), gw.toArray())}`);
      const v = R(24, [6, V], 'float32');
      const hvp = (fn: typeof T.fusedTokenNll, x0: T.Tensor) =>
        T.grad((x: T.Tensor) => T.sum(T.mul(T.cast(T.grad(f(fn))(x) as T.Tensor, 'float32'), v)))(x0) as T.Tensor;
      const got = hvp(T.fusedTokenNll, logits).toArray();
      const ref = hvp(T.compositeTokenNll, T.cast(logits, 'float32')).toArray();
      assert.ok(scaled(got, ref) < 2e-2, `Hessian-vector product ${scaled(got, ref)}`);
    });
  });

  test('the model path: tokenNll() forced fused and forced composite agree', () => {
    T.tidy(() => {
      const logits = R(11, [3, 5, 17], 'float32');
      const targets = targetsFor(12, [3, 5], 17);
      const run = (path: 'fused' | 'composite') => withOpPath('loss', path, () => tokenNll(logits, targets).toArray());
      assert.ok(relDiff(run('fused'), run('composite')) < 2e-6);
    });
  });

  test('errors: targets out of range, wrong dtype, shapes that do not line up', () => {
    T.tidy(() => {
      const logits = R(13, [2, 7]);
      assert.throws(() => T.fusedTokenNll(logits, T.tensor([1, 7], [2], 'int32')).toArray(), /tokenNll: index 7 out of range \[0, 7\)/);
      assert.throws(() => T.fusedTokenNll(logits, T.tensor([-1, 0], [2], 'int32')).toArray(), /tokenNll: index -1 out of range \[0, 7\)/);
      assert.throws(() => T.fusedTokenNll(logits, T.tensor([1, 2], [2], 'float64')), /tokenNll: targets must be int32, got float64/);
      assert.throws(() => T.fusedTokenNll(logits, T.tensor([1, 2, 3], [3], 'int32')), /tokenNll: logits \[2,7\] should be targets \[3\] plus a vocabulary axis/);
      assert.throws(() => T.fusedTokenNll(T.ones([2, 7], 'int32'), T.tensor([1, 2], [2], 'int32')), /tokenNll: logits must be floating point, got int32/);
    });
  });
});
