import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import * as T from '../src/index.js';
import type { Tensor } from '../src/index.js';
import { record } from '../src/engine/runtime.js';

const f64 = (values: number[], shape: number[]) => T.tensor(values, shape, 'float64');
const close = (a: number[], b: number[], rtol: number, what = '') => {
  let num = 0;
  let den = 0;
  a.forEach((v, i) => {
    num += (v - b[i]) ** 2;
    den += b[i] ** 2;
  });
  const rel = Math.sqrt(num) / Math.max(Math.sqrt(den), 1e-300);
  assert.ok(rel < rtol, `${what} relative error ${rel.toExponential(2)} >= ${rtol}: ${a.slice(0, 6)} vs ${b.slice(0, 6)}`);
};

/** Central finite differences of scalar f w.r.t. every element of x. */
function fdGrad(f: (x: Tensor) => Tensor, x: Tensor, eps = 1e-6): number[] {
  const base = x.toArray();
  return base.map((_, i) => {
    const at = (d: number) => {
      const v = [...base];
      v[i] += d;
      return T.tidy(() => f(f64(v, [...x.shape])).item());
    };
    return (at(eps) - at(-eps)) / (2 * eps);
  });
}

describe('transforms', () => {
  test('grad, argnums and pytrees', () => {
    const x = f64([1, 2], [2]);
    const y = f64([3, 4], [2]);
    const f = (p: { a: Tensor; b: Tensor[] }, s: Tensor) => T.sum(T.mul(T.mul(p.a, p.b[0]), s));
    const g = T.grad(f)({ a: x, b: [y] }, x);
    assert.deepEqual(g.a.toArray(), [3, 8]); // b * s
    assert.deepEqual(g.b[0].toArray(), [1, 4]); // a * s
    const [gp, gs] = T.grad(f, [0, 1])({ a: x, b: [y] }, y);
    assert.deepEqual(gp.a.toArray(), [9, 16]);
    assert.deepEqual(gs.toArray(), [3, 8]);
  });

  test('valueAndGrad with aux', () => {
    const x = f64([1, 2, 3], [3]);
    const [[value, aux], g] = T.valueAndGrad((v: Tensor) => {
      const sq = T.square(v);
      return [T.sum(sq), { sq }];
    }, { hasAux: true })(x);
    assert.equal(value.item(), 14);
    assert.deepEqual(aux.sq.toArray(), [1, 4, 9]);
    assert.deepEqual(g.toArray(), [2, 4, 6]);
  });

  test('a gradient does not depend on variables the function ignores', () => {
    const x = f64([1, 2], [2]);
    const g = T.grad((_a: Tensor, b: Tensor) => T.sum(b), 0)(x, x);
    assert.deepEqual(g.toArray(), [0, 0]);
  });

  test('vjp with a non-scalar output, pullback called twice', () => {
    const A = f64([1, 2, 3, 4, 5, 6], [2, 3]);
    const x = f64([1, -1, 2], [3, 1]);
    const [out, pull] = T.vjp((a: Tensor, v: Tensor) => T.matmul(a, v), A, x);
    assert.deepEqual(out.toArray(), [5, 11]);
    const [ga, gx] = pull(f64([1, 10], [2, 1]));
    assert.deepEqual(ga.toArray(), [1, -1, 2, 10, -10, 20]);
    assert.deepEqual(gx.toArray(), [41, 52, 63]);
    const [, gx2] = pull(f64([1, 0], [2, 1]));
    assert.deepEqual(gx2.toArray(), [1, 2, 3]);
  });

  test('stopGradient blocks the gradient but keeps the value', () => {
    const x = f64([2, 3], [2]);
    const g = T.grad((v: Tensor) => T.sum(T.mul(v, T.stopGradient(v))))(x);
    assert.deepEqual(g.toArray(), [2, 3]);
  });

  test('Hessian-vector product and third derivative of a scalar function', () => {
    const f = (x: Tensor) => T.sum(T.mul(T.exp(x), T.sin(x)));
    const x = f64([0.3, -0.7, 1.1], [3]);
    const v = f64([1, 2, -1], [3]);
    const hvp = T.grad((p: Tensor) => T.sum(T.mul(T.grad(f)(p), v)))(x);
    // f'' of e^x sin x is 2 e^x cos x (diagonal Hessian)
    close(hvp.toArray(), [0.3, -0.7, 1.1].map((t, i) => 2 * Math.exp(t) * Math.cos(t) * [1, 2, -1][i]), 1e-12, 'hvp');
    const third = T.grad((p: Tensor) => T.sum(T.grad((q: Tensor) => T.sum(T.grad(f)(q)))(p)))(x);
    close(third.toArray(), [0.3, -0.7, 1.1].map((t) => 2 * Math.exp(t) * (Math.cos(t) - Math.sin(t))), 1e-12, 'third');
  });

  test('no perturbation confusion: d/dx [x * d/dy (x*y)] = 2x', () => {
    const x = f64([3], []);
    const g = T.grad((a: Tensor) => T.mul(a, T.grad((b: Tensor) => T.mul(a, b))(f64([5], []))))(x);
    assert.equal(g.item(), 6);
  });

  test('checkpoint gives the same value and gradient, and refuses closures over traced tensors', () => {
    const W = T.randn(T.randomKey(1), [4, 4], 'float64');
    const x = T.randn(T.randomKey(2), [3, 4], 'float64');
    const block = (w: Tensor, h: Tensor) => T.tanh(T.matmul(h, w));
    const plain = (w: Tensor) => T.sum(T.square(block(w, block(w, x))));
    const ck = T.checkpoint(block);
    const withCk = (w: Tensor) => T.sum(T.square(ck(w, ck(w, x))));
    assert.equal(withCk(W).item(), plain(W).item());
    close(T.grad(withCk)(W).toArray(), T.grad(plain)(W).toArray(), 1e-14, 'checkpoint grad');
    const v = T.randn(T.randomKey(3), [4, 4], 'float64');
    const hvp = (f: (w: Tensor) => Tensor) => T.grad((w: Tensor) => T.sum(T.mul(T.grad(f)(w), v)))(W).toArray();
    close(hvp(withCk), hvp(plain), 1e-12, 'checkpoint hvp');
    // closing over a constant is fine
    const overConstant = T.checkpoint((h: Tensor) => T.matmul(h, x, { transB: true }));
    const w0 = T.randn(T.randomKey(4), [2, 4], 'float64');
    close(T.grad((w: Tensor) => T.sum(overConstant(T.tanh(w))))(w0).toArray(),
      T.grad((w: Tensor) => T.sum(T.matmul(T.tanh(w), x, { transB: true })))(w0).toArray(), 1e-14, 'constant closure');
    const leaky = (w: Tensor) => T.sum(T.checkpoint((h: Tensor) => T.mul(h, w))(T.tanh(w)));
    assert.throws(() => T.grad(leaky)(T.ones([3, 4], 'float64')), /closes over/);
  });

  test('checkpoint: inputs its outputs do not reach and outputs the loss ignores carry no zero tensors', () => {
    const W = T.randn(T.randomKey(5), [4, 4], 'float64');
    const unused = T.randn(T.randomKey(6), [4, 4], 'float64');
    const x = T.randn(T.randomKey(7), [3, 4], 'float64');
    // two outputs, the second ignored; `u` reaches only the ignored one, `spare` reaches nothing
    const ck = T.checkpoint((w: Tensor, u: Tensor, spare: Tensor) => [T.tanh(T.matmul(x, w)), T.matmul(x, u), T.mul(spare, 0)]);
    const f = (w: Tensor, u: Tensor) => T.sum(T.square(ck(w, u, T.ones([2], 'float64'))[0]));
    const [gw, gu] = T.grad(f, [0, 1])(W, unused) as Tensor[];
    close(gw.toArray(), T.grad((w: Tensor) => T.sum(T.square(T.tanh(T.matmul(x, w)))))(W).toArray(), 1e-14, 'gradient of the used input');
    assert.deepEqual(gu.toArray(), new Array(16).fill(0), 'an input reaching only an ignored output gets zeros at the end');
    const live = T.liveTensorCount();
    // count zero fills during the gradient: only the final zeros for `unused` (the transform's own)
    const backend = T.getBackend();
    const fill = backend.fill.bind(backend);
    let zeroFills = 0;
    (backend as { fill: typeof fill }).fill = (size, dtype, value) => {
      if (value === 0) zeroFills++;
      return fill(size, dtype, value);
    };
    try {
      T.tidy(() => void T.grad(f, [0, 1])(W, unused));
    } finally {
      (backend as { fill: typeof fill }).fill = fill;
    }
    assert.ok(zeroFills <= 1, `${zeroFills} zero tensors were made`);
    assert.equal(T.liveTensorCount(), live, 'no tensor leaks from the null cotangents');
  });
});

describe('meta-learning smoke test (gradient through inner SGD steps)', () => {
  const key = T.randomKey(7);
  const [k1, k2, k3, k4, k5, k6] = T.splitKey(key, 6);
  const W1 = T.mul(T.randn(k1, [4, 8], 'float64'), 0.5);
  const W2 = T.mul(T.randn(k2, [8, 3], 'float64'), 0.5);
  const xa = T.randn(k3, [5, 4], 'float64');
  const ya = T.randn(k4, [5, 3], 'float64');
  const xb = T.randn(k5, [6, 4], 'float64');
  const yb = T.randn(k6, [6, 3], 'float64');
  type P = { w1: Tensor; w2: Tensor };
  const mlp = (p: P, x: Tensor) => T.matmul(T.tanh(T.matmul(x, p.w1)), p.w2);
  const mse = (p: P, x: Tensor, y: Tensor) => T.mean(T.square(T.sub(mlp(p, x), y)));
  const lr = 0.3;
  const sgdStep = (p: P, x: Tensor, y: Tensor): P => {
    const g = T.grad(mse)(p, x, y);
    return { w1: T.sub(p.w1, T.mul(g.w1, lr)), w2: T.sub(p.w2, T.mul(g.w2, lr)) };
  };
  const outer = (useCheckpoint: boolean) => (p: P) => {
    const step = useCheckpoint ? T.checkpoint(sgdStep) : sgdStep;
    const p2 = step(step(p, xa, ya), xa, ya);
    return mse(p2, xb, yb);
  };

  for (const useCheckpoint of [false, true]) {
    test(`d(outer)/d(initial weights) matches finite differences${useCheckpoint ? ' with checkpoint' : ''}`, () => {
      const f = outer(useCheckpoint);
      const g = T.grad(f)({ w1: W1, w2: W2 });
      const fd1 = fdGrad((w) => f({ w1: w, w2: W2 }), W1);
      const fd2 = fdGrad((w) => f({ w1: W1, w2: w }), W2);
      close(g.w1.toArray(), fd1, 1e-6, 'w1');
      close(g.w2.toArray(), fd2, 1e-6, 'w2');
      // The second-order terms matter: a first-order (stop-gradient) meta-gradient differs.
      const firstOrder = (p: P) => {
        const stepFO = (q: P): P => {
          const gq = T.stopGradient(T.grad(mse)(q, xa, ya));
          return { w1: T.sub(q.w1, T.mul(gq.w1, lr)), w2: T.sub(q.w2, T.mul(gq.w2, lr)) };
        };
        return mse(stepFO(stepFO(p)), xb, yb);
      };
      const gFO = T.grad(firstOrder)({ w1: W1, w2: W2 });
      const diff = gFO.w1.toArray().reduce((acc: number, v: number, i: number) => acc + Math.abs(v - fd1[i]), 0);
      assert.ok(diff > 1e-4, `first-order meta-gradient should differ from the true one (diff ${diff})`);
    });
  }
});

describe('memory', () => {
  test('a repeated training-like step (forward, nested grad, update) keeps the live tensor count flat', () => {
    const key = T.randomKey(3);
    let p = { w: T.keep(T.randn(key, [6, 6])), b: T.keep(T.zeros([6])) };
    const x = T.keep(T.randn(T.foldIn(key, 1), [4, 6]));
    const inner = (q: typeof p) => T.mean(T.square(T.add(T.matmul(x, q.w), q.b)));
    const outerLoss = (q: typeof p) => {
      const g = T.grad(inner)(q);
      return inner({ w: T.sub(q.w, T.mul(g.w, 0.1)), b: T.sub(q.b, T.mul(g.b, 0.1)) });
    };
    const step = T.checkpoint((q: typeof p) => outerLoss(q));
    const counts: number[] = [];
    for (let i = 0; i < 6; i++) {
      const next = T.tidy(() => {
        const [loss, g] = T.valueAndGrad((q: typeof p) => step(q))(p);
        loss.item();
        return { w: T.sub(p.w, T.mul(g.w, 0.05)), b: T.sub(p.b, T.mul(g.b, 0.05)) };
      });
      T.dispose(p);
      p = next;
      counts.push(T.liveTensorCount());
    }
    assert.ok(counts.every((c) => c === counts[0]), `live tensor counts drift: ${counts}`);
  });

  test('the backward pass frees as it goes: a visited node\'s outputs after its vjp (aux exempt), a contribution summed into a cotangent at once', () => {
    const x = f64([0.3, -0.7, 1.1], [3]);
    // pass(v, onVjp) = v as its own node, whose vjp calls onVjp, then hands on a fresh copy of g
    const handed: Tensor[] = [];
    const pass = (v: Tensor, onVjp: () => void = () => {}): Tensor => {
      const y = T.stopGradient(v);
      record('pass', [v], [y], ([g]) => {
        onVjp();
        const c = T.mul(g!, 1);
        handed.push(c);
        return [c];
      });
      return y;
    };
    const want = [0.3, -0.7, 1.1].map((t) => 2 * Math.tanh(t) * (1 - Math.tanh(t) ** 2) * 2);
    // `mid` is produced after the first pass: the walk visits its node first, so when the first pass's
    // vjp runs, mid has been disposed; returned as aux, it stays
    for (const asAux of [false, true]) {
      let mid: Tensor | null = null;
      let midFreed: boolean | null = null;
      let consumedFreed: boolean[] = [];
      const f = (v: Tensor): [Tensor, Tensor[]] => {
        const a = pass(v, () => {
          midFreed = mid!.isDisposed;
          consumedFreed = handed.map((c) => c.isDisposed);
        });
        mid = T.tanh(a);
        // mid reaches the loss through two passes: their contributions are summed into mid's cotangent
        const loss = T.add(T.sum(T.square(pass(mid))), T.sum(T.square(pass(mid))));
        return [loss, asAux ? [mid] : []];
      };
      handed.length = 0;
      const [[, aux], g] = T.valueAndGrad(f, { hasAux: true })(x);
      close((g as Tensor).toArray(), want, 1e-12, 'grad');
      assert.equal(midFreed, !asAux, asAux ? 'aux is the caller\'s' : 'mid was freed once its node was visited');
      if (asAux) assert.equal((aux as Tensor[])[0].isDisposed, false);
      // the two passes' contributions to mid's cotangent: both dead by the time the first pass's vjp runs
      assert.deepEqual(consumedFreed.slice(0, 2), [true, true], 'summed contributions are freed at once');
    }
  });

  test('tidy disposes intermediates but keeps results and kept tensors', () => {
    const before = T.liveTensorCount();
    const kept = T.tidy(() => {
      const a = T.ones([3]);
      T.keep(T.zeros([2]));
      return T.add(T.exp(a), 1);
    });
    assert.equal(T.liveTensorCount(), before + 2);
    kept.dispose();
    assert.throws(() => kept.toArray(), /after dispose/);
  });

  test('tidy inside a traced function keeps what the backward pass needs', () => {
    const x = f64([0.5, 1.5], [2]);
    const g = T.grad((v: Tensor) => {
      const h = T.tidy(() => T.exp(T.sin(v)));
      return T.sum(T.mul(h, h));
    })(x);
    close(g.toArray(), [0.5, 1.5].map((t) => 2 * Math.exp(2 * Math.sin(t)) * Math.cos(t)), 1e-12, 'grad');
  });
});
