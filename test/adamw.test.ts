import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import * as T from '../src/index.js';
import { countingCalls } from './helpers/fused.js';
import { AdamW, adamwInit, adamwUpdate, clipGlobalNorm } from '../src/train/adamw.js';
import { ilrMultiplier, lrAt } from '../src/train/schedule.js';

const close = (a: number[], b: number[], tol: number, what: string) => {
  assert.equal(a.length, b.length, `${what}: length`);
  a.forEach((v, i) => assert.ok(Math.abs(v - b[i]) <= tol * (1 + Math.abs(b[i])), `${what}[${i}]: ${v} vs ${b[i]}`));
};

/** AdamW by hand on plain numbers: the values PyTorch's AdamW would produce. */
function adamwByHand(p: number[], grads: number[][], lr: number[], wd: number, b1 = 0.9, b2 = 0.95, eps = 1e-8): number[] {
  const m = p.map(() => 0);
  const v = p.map(() => 0);
  let x = [...p];
  grads.forEach((g, k) => {
    const t = k + 1;
    x = x.map((xi, i) => {
      m[i] = b1 * m[i] + (1 - b1) * g[i];
      v[i] = b2 * v[i] + (1 - b2) * g[i] * g[i];
      const mh = m[i] / (1 - b1 ** t);
      const vh = v[i] / (1 - b2 ** t);
      return xi * (1 - lr[k] * wd) - (lr[k] * mh) / (Math.sqrt(vh) + eps);
    });
  });
  return x;
}

describe('AdamW', () => {
  const W = [0.5, -1.0, 2.0, 0.25, -0.75, 1.5];
  const b = [0.1, -0.2, 0.3];
  const gW = [[0.3, -0.1, 0.05, 2.0, -0.4, 0.0], [-0.2, 0.2, 0.1, 1.0, 0.3, -0.5], [0.1, 0.0, -0.3, -1.0, 0.2, 0.7]];
  const gb = [[1.0, -0.5, 0.01], [0.4, 0.4, -0.2], [-0.3, 0.1, 0.6]];
  const make = () => ({ w: T.tensor(W, [2, 3], 'float64'), b: T.tensor(b, [3], 'float64') });
  const gradsAt = (k: number) => ({ w: T.tensor(gW[k], [2, 3], 'float64'), b: T.tensor(gb[k], [3], 'float64') });

  test('one step matches a hand computation; weight decay only on the matrix', () => {
    T.tidy(() => {
      const params = make();
      const r = adamwUpdate(params, gradsAt(0), adamwInit(params), 0.01, { weightDecay: 0.1 });
      close(r.params.w.toArray(), adamwByHand(W, [gW[0]], [0.01], 0.1), 1e-12, 'matrix');
      close(r.params.b.toArray(), adamwByHand(b, [gb[0]], [0.01], 0), 1e-12, 'vector (no decay)');
      // The first bias-corrected step moves each coordinate by about lr·sign(g) (plus decay).
      assert.ok(Math.abs(r.params.b.toArray()[0] - (0.1 - 0.01)) < 1e-6);
      assert.equal(r.state.step.item(), 1);
      T.dispose(r);
    });
  });

  test('bias correction over 3 steps with a changing learning rate', () => {
    T.tidy(() => {
      const lrs = [0.01, 0.02, 0.005];
      let params = make();
      let state = adamwInit(params);
      for (let k = 0; k < 3; k++) {
        const r = adamwUpdate(params, gradsAt(k), state, lrs[k]);
        T.dispose(state);
        params = r.params;
        state = r.state;
      }
      close(params.w.toArray(), adamwByHand(W, gW, lrs, 0.1), 1e-12, 'matrix');
      close(params.b.toArray(), adamwByHand(b, gb, lrs, 0), 1e-12, 'vector');
      // The moments are the plain exponential averages (without correction), as a checkpoint stores them.
      const m0 = 0.9 * (0.9 * 0.1 * gb[0][0] + 0.1 * gb[1][0]) + 0.1 * gb[2][0];
      close([state.m.b.toArray()[0]], [m0], 1e-12, 'm');
      assert.equal(state.step.item(), 3);
      T.dispose([params, state]);
    });
  });

  test('clipGlobalNorm scales above the threshold and leaves small gradients alone', () => {
    T.tidy(() => {
      const g = { a: T.tensor([3, 0], [2]), b: [T.tensor([[0, 4]], [1, 2])] };
      const big = clipGlobalNorm(g, 1);
      close([big.norm.item()], [5], 1e-6, 'norm');
      close([...big.grads.a.toArray(), ...big.grads.b[0].toArray()], [0.6, 0, 0, 0.8], 1e-6, 'clipped');
      const small = clipGlobalNorm(g, 10);
      close([...small.grads.a.toArray(), ...small.grads.b[0].toArray()], [3, 0, 0, 4], 1e-6, 'unclipped');
      const zero = clipGlobalNorm({ z: T.zeros([3]) }, 1);
      assert.deepEqual(zero.grads.z.toArray(), [0, 0, 0]);
      assert.equal(zero.norm.item(), 0);
    });
  });

  test('50 steps reduce a least-squares loss, with a flat live tensor count', () => {
    const key = T.randomKey(3);
    const X = T.keep(T.randn(T.foldIn(key, 'x'), [32, 4]));
    const wTrue = T.keep(T.tensor([1, -2, 0.5, 3], [4, 1]));
    const y = T.keep(T.matmul(X, wTrue));
    const loss = (p: { w: T.Tensor; b: T.Tensor }) => T.mean(T.square(T.sub(T.add(T.matmul(X, p.w), p.b), y)));
    let params = T.tidy(() => ({ w: T.keep(T.zeros([4, 1])), b: T.keep(T.zeros([1])) }));
    const opt = new AdamW(params, { weightDecay: 0.01 });
    const losses: number[] = [];
    const live: number[] = [];
    for (let step = 0; step < 50; step++) {
      losses.push(T.tidy(() => {
        const [l, g] = T.valueAndGrad(loss)(params);
        params = opt.step(params, clipGlobalNorm(g, 1).grads, 0.1);
        return l.item();
      }));
      live.push(T.liveTensorCount());
    }
    assert.ok(losses[49] < 0.05 * losses[0], `loss ${losses[0]} -> ${losses[49]}`);
    assert.equal(opt.stepCount, 50);
    assert.ok(live.slice(1).every((n) => n === live[1]), `live tensors vary: ${[...new Set(live)]}`);
    opt.dispose();
    T.dispose([params, X, wTrue, y]);
  });

  test('the fused kernels (one per parameter, all in one launch) give the composite update bit for bit (float32, float64; decay on and off; 5 steps)', () => {
    for (const dtype of ['float32', 'float64'] as const) {
      T.tidy(() => {
        // values across many magnitudes, zeros and a gradient sign flip, so every rounding step shows
        const vals = (seed: number, n: number) => Array.from({ length: n }, (_, i) => Math.sin(seed * 7.1 + i * 1.3) * 10 ** ((i % 9) - 4) * (i % 11 === 0 ? 0 : 1));
        const mk = () => ({ w: T.tensor(vals(1, 60), [6, 10], dtype), g: T.tensor(vals(2, 10), [10], dtype) });
        const gradsAt = (k: number) => ({ w: T.tensor(vals(10 + k, 60), [6, 10], dtype), g: T.tensor(vals(20 + k, 10), [10], dtype) });
        const run = (kernel: 'fused' | 'fusedAll' | 'composite') => {
          const opt = new AdamW(mk(), { weightDecay: 0.1, kernel });
          let params = mk();
          for (let k = 0; k < 5; k++) params = opt.step(params, gradsAt(k), 0.01 * (k + 1));
          const out = { w: params.w.toArray(), g: params.g.toArray(), m: opt.state.m.w.toArray(), v: opt.state.v.g.toArray() };
          opt.dispose();
          return out;
        };
        const composite = run('composite');
        for (const kernel of ['fused', 'fusedAll'] as const) {
          const fused = run(kernel);
          for (const key of ['w', 'g', 'm', 'v'] as const) {
            fused[key].forEach((x, i) => assert.ok(Object.is(x, composite[key][i]), `${dtype} ${kernel} ${key}[${i}]: ${x} vs composite ${composite[key][i]}`));
          }
        }
      });
    }
  });

  test('fusedAdamW: clear errors for mismatched inputs, integer params, and a traced input', () => {
    T.tidy(() => {
      const h = { beta1: 0.9, oneMinusBeta1: 0.1, beta2: 0.95, oneMinusBeta2: 0.05, c1: 0.1, c2: 0.05, eps: 1e-8, lr: 0.01, decay: true, shrink: 0.999 };
      const p = T.tensor([1, 2, 3], [3]);
      const z = T.zeros([3]);
      assert.throws(() => T.fusedAdamW(p, T.zeros([4]), z, z, h), /adamw: grad \[4\] does not match param \[3\]/);
      assert.throws(() => T.fusedAdamW(p, z, T.zeros([3], 'float64'), z, h), /adamw: m is float64, param is float32/);
      assert.throws(() => T.fusedAdamW(T.tensor([1, 2, 3], [3], 'int32'), T.zeros([3], 'int32'), T.zeros([3], 'int32'), T.zeros([3], 'int32'), h), /needs float32 or float64 parameters, got int32/);
      assert.throws(() => T.grad((x: T.Tensor) => T.sum(T.fusedAdamW(x, z, z, z, h).p))(p), /adamw: the update is not differentiable/);
      const r = T.fusedAdamW(p, T.tensor([0.5, -0.5, 0], [3]), z, z, h);
      assert.deepEqual(r.m.toArray(), [0.05, -0.05, 0].map(Math.fround));
      // all in one launch: the same checks per parameter, and one dtype
      const z64 = T.zeros([3], 'float64');
      assert.throws(() => T.fusedAdamWAll([{ p, g: T.zeros([4]), m: z, v: z, decay: true }], h), /adamw: grad \[4\] does not match param \[3\]/);
      assert.throws(() => T.fusedAdamWAll([{ p, g: z, m: z, v: z, decay: true }, { p: T.zeros([3], 'float64'), g: z64, m: z64, v: z64, decay: false }], h), /one launch takes one dtype, got float32 and float64/);
      assert.deepEqual(T.fusedAdamWAll([], h), []);
    });
  });

  test('TTT_ADAMW_KERNEL chooses the kernel when the options do not; a name not on the list throws', () => {
    const before = process.env.TTT_ADAMW_KERNEL;
    try {
      T.tidy(() => {
        const params = { w: T.ones([4, 3]), g: T.ones([3]) };
        const grads = { w: T.ones([4, 3]), g: T.ones([3]) };
        const launches = (env: string | undefined, kernel?: 'composite') => {
          if (env === undefined) delete process.env.TTT_ADAMW_KERNEL;
          else process.env.TTT_ADAMW_KERNEL = env;
          return ['adamw', 'adamwAll'].map((m) => countingCalls(m, () => adamwUpdate(params, grads, adamwInit(params), 0.1, kernel ? { kernel } : {})).calls);
        };
        assert.equal(launches('fusedAll')[1], 1, 'every parameter in one adamwAll call (which the CPU serves one adamw each)');
        assert.deepEqual(launches('fused'), [2, 0], 'one adamw call per parameter');
        assert.deepEqual(launches('fusedAll', 'composite'), [0, 0], 'the options win over the environment');
        assert.deepEqual(launches(undefined), [0, 0], 'auto: composite on the CPU (preferFused false)');
        assert.throws(() => launches('fast'), /TTT_ADAMW_KERNEL: expected one of auto, fused, fusedAll, composite, got 'fast'/);
      });
    } finally {
      if (before === undefined) delete process.env.TTT_ADAMW_KERNEL;
      else process.env.TTT_ADAMW_KERNEL = before;
    }
  });

  test('rejects grads that do not match the params', () => {
    T.tidy(() => {
      const params = make();
      assert.throws(() => adamwUpdate(params, { w: params.w } as typeof params, adamwInit(params), 0.1), /grads has 1 tensors, params have 2/);
    });
  });
});

describe('schedules', () => {
  const s = { peak: 1e-3, warmupSteps: 10, totalSteps: 100, floor: 1e-5 };
  test('warm-up then cosine or linear decay to the floor', () => {
    for (const kind of ['cosine', 'linear'] as const) {
      const at = (step: number) => lrAt(step, { ...s, kind });
      assert.ok(Math.abs(at(0) - 1e-4) < 1e-15, `${kind} step 0`);
      assert.ok(Math.abs(at(4) - 5e-4) < 1e-15);
      assert.equal(at(10), 1e-3);
      assert.ok(Math.abs(at(100) - 1e-5) < 1e-15, `${kind} end`);
      assert.ok(Math.abs(at(1000) - 1e-5) < 1e-15, `${kind} after the end`);
      const mid = (1e-3 + 1e-5) / 2;
      assert.ok(Math.abs(at(55) - mid) < 1e-12, `${kind} halfway ${at(55)}`);
      for (let k = 10; k < 100; k++) assert.ok(at(k + 1) <= at(k));
    }
    assert.ok(lrAt(30, { ...s, kind: 'cosine' }) > lrAt(30, { ...s, kind: 'linear' }));
  });

  test('inner-lr multiplier goes linearly from ilrInit to 1', () => {
    assert.equal(ilrMultiplier(0, 0.1, 480), 0.1);
    assert.ok(Math.abs(ilrMultiplier(240, 0.1, 480) - 0.55) < 1e-12);
    assert.equal(ilrMultiplier(480, 0.1, 480), 1);
    assert.equal(ilrMultiplier(5000, 0.1, 480), 1);
    assert.equal(ilrMultiplier(0, 0.1, 0), 1);
  });
});
