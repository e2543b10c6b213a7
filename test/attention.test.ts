/**
 * The fused attention op against its composite definition: forward values (float64 and float32),
 * first-order gradients (against the composite and central differences), and higher orders, where
 * the op's backward must hand over to the composite so outer traces can differentiate it.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import {
  type AttentionOptions, type DType, type Tensor, add, biasedSoftmax, compositeAttention, grad, liveTensorCount, mul, scaledDotAttention,
  softmax, sum, tanh, tensor as tensorOf, tidy, valueAndGrad,
} from '../src/index.js';
import { assertClose, checkGrad, checkHvp, directional, project, rn } from './helpers/check.js';
import { spyBackend } from './helpers/fused.js';

interface Case {
  name: string;
  lead: number[];
  tq: number;
  tk: number;
  d: number;
  opts: AttentionOptions;
}

const CASES: Case[] = [
  { name: 'causal, no window', lead: [2, 3], tq: 7, tk: 7, d: 8, opts: { qStart: 0, kStart: 0 } },
  { name: 'window 1 (each query sees itself)', lead: [2, 3], tq: 7, tk: 7, d: 8, opts: { qStart: 0, kStart: 0, window: 1 } },
  { name: 'window smaller than Tq', lead: [2, 2], tq: 9, tk: 9, d: 4, opts: { qStart: 0, kStart: 0, window: 3 } },
  { name: 'window larger than Tq', lead: [1, 3], tq: 6, tk: 6, d: 8, opts: { qStart: 0, kStart: 0, window: 20 } },
  { name: 'KV cache (kStart < qStart), window', lead: [2, 2], tq: 5, tk: 9, d: 8, opts: { qStart: 14, kStart: 10, window: 4 } },
  { name: 'KV cache (kStart < qStart), no window', lead: [2, 2], tq: 5, tk: 9, d: 8, opts: { qStart: 14, kStart: 10 } },
  { name: 'decode (Tq = 1), window', lead: [3, 2], tq: 1, tk: 8, d: 8, opts: { qStart: 20, kStart: 13, window: 5 } },
  { name: 'decode (Tq = 1), no window', lead: [3, 2], tq: 1, tk: 8, d: 8, opts: { qStart: 20, kStart: 13 } },
  { name: 'keys only from the past (no self key)', lead: [2, 1], tq: 3, tk: 6, d: 4, opts: { qStart: 30, kStart: 24, window: 9 } },
  { name: 'rank 3, head dim 1', lead: [4], tq: 5, tk: 5, d: 1, opts: { qStart: 3, kStart: 3, window: 2 } },
];

function inputs(c: Case, seed: number, dtype: DType = 'float64'): [Tensor, Tensor, Tensor] {
  return [rn(seed, [...c.lead, c.tq, c.d], dtype), rn(seed + 1, [...c.lead, c.tk, c.d], dtype), rn(seed + 2, [...c.lead, c.tk, c.d], dtype)];
}

const fused = (c: Case) => (q: Tensor, k: Tensor, v: Tensor) => scaledDotAttention(q, k, v, c.opts);
const composite = (c: Case) => (q: Tensor, k: Tensor, v: Tensor) => compositeAttention(q, k, v, c.opts);

describe('scaledDotAttention forward = composite', () => {
  for (const c of CASES) {
    test(c.name, () => {
      const x64 = inputs(c, 1);
      assertClose(fused(c)(...x64), composite(c)(...x64), { rtol: 1e-12, atol: 1e-12, msg: 'float64' });
      const x32 = inputs(c, 1, 'float32');
      const y32 = fused(c)(...x32);
      assert.equal(y32.dtype, 'float32');
      assertClose(y32, composite(c)(...x32), { rtol: 1e-5, atol: 1e-5, msg: 'float32' });
      // float32 kernels accumulate in double: closer to the float64 truth than to float32 rounding
      assertClose(y32, composite(c)(...x64), { rtol: 1e-5, atol: 1e-5, msg: 'float32 vs float64' });
    });
  }

  test('large scores stay finite (per-row max subtraction)', () => {
    const c = CASES[0];
    const [q, k, v] = inputs(c, 5);
    const big = mul(q, 300);
    const y = fused(c)(big, k, v);
    assert.ok(y.toArray().every(Number.isFinite));
    assertClose(y, composite(c)(big, k, v), { rtol: 1e-9, atol: 1e-9 });
  });

  test('a query that sees no key is an error, as are mismatched shapes', () => {
    const q = rn(1, [1, 1, 3, 4]);
    const k = rn(2, [1, 1, 3, 4]);
    assert.throws(() => scaledDotAttention(q, k, k, { qStart: 0, kStart: 1 }), /some query sees no key/);
    assert.throws(() => scaledDotAttention(q, k, k, { qStart: 10, kStart: 0, window: 8 }), /some query sees no key/);
    assert.throws(() => scaledDotAttention(q, rn(3, [1, 1, 0, 4]), rn(3, [1, 1, 0, 4]), { qStart: 0, kStart: 0 }), /some query sees no key/);
    assert.throws(() => compositeAttention(q, k, k, { qStart: 0, kStart: 1 }), /some query sees no key/);
    assert.throws(() => scaledDotAttention(q, k, k, { qStart: 0, kStart: 0, window: 0 }), /window must be a positive integer/);
    assert.throws(() => scaledDotAttention(q, rn(4, [1, 2, 3, 4]), rn(4, [1, 2, 3, 4]), { qStart: 0, kStart: 0 }), /same leading axes/);
    assert.throws(() => scaledDotAttention(q, k, rn(5, [1, 1, 3, 5]), { qStart: 0, kStart: 0 }), /same leading axes/);
    assert.throws(() => scaledDotAttention(q, rn(6, [1, 1, 3, 4], 'float32'), k, { qStart: 0, kStart: 0 }), /dtype mismatch/);
  });
});

describe('grouped-query attention (k, v with fewer heads than q)', () => {
  /** [q lead, kv lead, tq, tk, opts]: 3 and 2 query heads per key/value head, one shared by all, windows, a cache. */
  const G: [number[], number[], number, number, AttentionOptions][] = [
    [[2, 6], [2, 2], 7, 7, { qStart: 0, kStart: 0 }],
    [[1, 4], [1, 2], 9, 9, { qStart: 0, kStart: 0, window: 3 }],
    [[3, 4], [3, 1], 5, 9, { qStart: 14, kStart: 10, window: 4 }],
    [[2, 3], [2, 3], 1, 8, { qStart: 20, kStart: 13 }],
  ];
  const gqa = (ql: number[], kl: number[], tq: number, tk: number, seed: number, dtype: DType = 'float64'): [Tensor, Tensor, Tensor] =>
    [rn(seed, [...ql, tq, 8], dtype), rn(seed + 1, [...kl, tk, 8], dtype), rn(seed + 2, [...kl, tk, 8], dtype)];

  test('forward and gradients equal the composite (which repeats each key/value head for its query heads)', () => {
    for (const [ql, kl, tq, tk, opts] of G) {
      const c = { name: '', lead: ql, tq, tk, d: 8, opts };
      const x = gqa(ql, kl, tq, tk, 3);
      assertClose(fused(c)(...x), composite(c)(...x), { rtol: 1e-12, atol: 1e-12, msg: `${ql}/${kl} forward` });
      const gf = grad(loss(fused(c), x), [0, 1, 2])(...x) as Tensor[];
      const gc = grad(loss(composite(c), x), [0, 1, 2])(...x) as Tensor[];
      gf.forEach((g, i) => {
        assert.deepEqual(g.shape, x[i].shape);
        assertClose(g, gc[i], { rtol: 1e-11, atol: 1e-11, msg: `${ql}/${kl} d${'qkv'[i]}` });
      });
    }
  });

  test('the composite equals plain attention on explicitly repeated heads; central differences; second order', () => {
    const [ql, kl, tq, tk, opts] = G[1];
    const c = { name: '', lead: ql, tq, tk, d: 8, opts };
    const [q, k, v] = gqa(ql, kl, tq, tk, 5);
    const rep = (t: Tensor) => tensorRepeatHeads(t, 2);
    assertClose(composite(c)(q, k, v), compositeAttention(q, rep(k), rep(v), opts), { rtol: 1e-14, atol: 1e-14 });
    const x = [q, k, v].map((t) => mul(t, 0.7));
    checkGrad(loss(fused(c), x), x, { label: 'gqa' });
    checkHvp(loss(fused(c), x), x, { label: 'gqa hvp' });
  });

  test('heads that do not divide are an error', () => {
    const q = rn(1, [1, 3, 4, 8]);
    const k = rn(2, [1, 2, 4, 8]);
    assert.throws(() => scaledDotAttention(q, k, k, { qStart: 0, kStart: 0 }), /k, v \[\.\.\., Hkv, Tk, D\] with the same leading axes except Hkv, a divisor of Hq/);
  });
});

/** t [B, H, T, D] with each head repeated `n` times in place (head h → heads h·n .. h·n + n − 1), from plain arrays. */
function tensorRepeatHeads(t: Tensor, n: number): Tensor {
  const [B, H, T, D] = t.shape;
  const a = t.toArray();
  const out: number[] = [];
  for (let b = 0; b < B; b++) for (let h = 0; h < H; h++) for (let r = 0; r < n; r++) out.push(...a.slice(((b * H + h) * T) * D, ((b * H + h + 1) * T) * D));
  return tensorOf(out, [B, H * n, T, D], t.dtype);
}

/** f(q, k, v) = sum(tanh(attn(q, k, v)) * R): a non-constant cotangent reaches the op. */
function loss(op: (q: Tensor, k: Tensor, v: Tensor) => Tensor, x: Tensor[], seed = 77) {
  return project(op, x, seed, 'tanh');
}

describe('scaledDotAttention gradients', () => {
  for (const c of CASES) {
    test(`${c.name}: fused backward = composite backward`, () => {
      for (const dtype of ['float64', 'float32'] as const) {
        const x = inputs(c, 11, dtype);
        const gf = grad(loss(fused(c), x), [0, 1, 2])(...x) as Tensor[];
        const gc = grad(loss(composite(c), x), [0, 1, 2])(...x) as Tensor[];
        const tol = dtype === 'float64' ? 1e-11 : 2e-5;
        gf.forEach((g, i) => assertClose(g, gc[i], { rtol: tol, atol: tol, msg: `${dtype} d${'qkv'[i]}` }));
      }
    });
  }

  for (const c of [CASES[2], CASES[4], CASES[6]]) {
    test(`${c.name}: central differences`, () => {
      const x = inputs(c, 21).map((t) => mul(t, 0.7));
      checkGrad(loss(fused(c), x), x, { label: c.name });
    });
  }

  test('only the requested cotangents are returned', () => {
    const c = CASES[4];
    const [q, k, v] = inputs(c, 31);
    const gv = grad((vv: Tensor) => sum(fused(c)(q, k, vv)))(v);
    const gvc = grad((vv: Tensor) => sum(composite(c)(q, k, vv)))(v);
    assertClose(gv, gvc, { rtol: 1e-12, atol: 1e-12 });
  });

  test('no tensors outlive a tidy gradient step', () => {
    const c = CASES[0];
    const x = inputs(c, 41);
    const f = loss(fused(c), x);
    const before = liveTensorCount();
    tidy(() => {
      valueAndGrad(f, { argnums: [0, 1, 2] })(...x);
    });
    assert.equal(liveTensorCount(), before);
  });
});

describe('biasedSoftmax (the composite attention\'s masked softmax)', () => {
  test('a bias repeating over x\'s rows goes into the softmax kernel (no biased copy): [n], [Tq, n], x\'s shape; others broadcast first; the same values', () => {
    tidy(() => {
      const x = rn(15, [2, 3, 7]);
      for (const shape of [[7], [3, 7], [2, 3, 7], [1, 7], [3, 1]]) {
        const bias = rn(16, shape);
        const { result, calls } = spyBackend('softmax', () => biasedSoftmax(x, bias));
        assertClose(result, softmax(add(x, bias), -1), { msg: `bias ${shape}` });
        const withBias = calls.flatMap((a) => (a[4] ? [(a[4] as { rows: number }).rows] : []));
        const kernel = shape.length === 1 || shape[0] !== 1 && shape[shape.length - 1] === 7;
        assert.deepEqual(withBias, kernel ? [shape.slice(0, -1).reduce((a, b) => a * b, 1)] : [], `bias ${shape}: ${kernel ? 'in the kernel' : 'added first'}`);
      }
    });
  });

  test('equals softmax(x + bias): values, gradients and Hessian-vector products; a trace holds no biased copy of x', () => {
    tidy(() => {
      const x = rn(5, [2, 3, 7]);
      const bias = tensorOf([0, -1e9, 0.5, 0, -2, 0, -1e9], [7], 'float64');
      const w = rn(6, [2, 3, 7]);
      assertClose(biasedSoftmax(x, bias), softmax(add(x, bias), -1), { msg: 'values' });
      const f = (sm: (t: Tensor) => Tensor) => (t: Tensor) => sum(mul(tanh(sm(t)), w));
      const biased = f((t) => biasedSoftmax(t, bias));
      assertClose(grad(biased)(x), grad(f((t) => softmax(add(t, bias), -1)))(x), { msg: 'gradient' });
      checkGrad(biased, [x], { label: 'biasedSoftmax' });
      checkHvp(biased, [x], { label: 'biasedSoftmax' });
      // inside a trace, the composite form keeps more [.., n] tensors alive (x + bias, and its view for the softmax)
      const liveAtEnd = (sm: (t: Tensor) => Tensor) => {
        let n = 0;
        grad((t: Tensor) => {
          const out = sum(mul(sm(t), w));
          n = liveTensorCount();
          return out;
        })(x);
        return n;
      };
      const [one, composite] = [liveAtEnd((t) => biasedSoftmax(t, bias)), liveAtEnd((t) => softmax(add(t, bias), -1))];
      assert.ok(one < composite, `live tensors at the end of the forward: ${one} with biasedSoftmax, ${composite} with softmax(x + bias)`);
    });
  });
});

describe('scaledDotAttention higher orders (backward through the composite)', () => {
  for (const c of [CASES[2], CASES[4], CASES[6], CASES[1]]) {
    test(`${c.name}: Hessian-vector product = composite's, and = finite differences`, () => {
      const x = inputs(c, 51).map((t) => mul(t, 0.7));
      const vs = inputs(c, 61);
      const hf = grad(directional(loss(fused(c), x), vs), [0, 1, 2])(...x) as Tensor[];
      const hc = grad(directional(loss(composite(c), x), vs), [0, 1, 2])(...x) as Tensor[];
      hf.forEach((h, i) => assertClose(h, hc[i], { rtol: 1e-10, atol: 1e-10, msg: `H v, block ${'qkv'[i]}` }));
      checkHvp(loss(fused(c), x), x, { label: c.name });
    });
  }

  test('an outer trace through the cotangent alone (q, k, v constant for it)', () => {
    const c = CASES[4];
    const [q, k, v] = inputs(c, 71);
    const w0 = rn(72, [...c.lead, c.tq, c.d]);
    // d/dw of <grad_q sum(attn(q,k,v) * w), u>: only the cotangent w is tracked by the outer trace
    const u = rn(73, [...c.lead, c.tq, c.d]);
    const outer = (op: (a: Tensor, b: Tensor, cc: Tensor) => Tensor) => (w: Tensor) =>
      sum(mul(grad((qq: Tensor) => sum(mul(tanh(op(qq, k, v)), w)))(q), u));
    assertClose(grad(outer(fused(c)))(w0), grad(outer(composite(c)))(w0), { rtol: 1e-10, atol: 1e-10 });
  });

  test('third order on a tiny case', () => {
    const c: Case = { name: 'tiny', lead: [1, 2], tq: 3, tk: 4, d: 2, opts: { qStart: 5, kStart: 3, window: 3 } };
    const x = inputs(c, 81).map((t) => mul(t, 0.8));
    const v1 = inputs(c, 82);
    const v2 = inputs(c, 83);
    const third = (op: (a: Tensor, b: Tensor, cc: Tensor) => Tensor) => {
      const f = loss(op, x);
      return grad(directional(directional(f, v1), v2), [0, 1, 2])(...x) as Tensor[];
    };
    const tf = third(fused(c));
    const tc = third(composite(c));
    tf.forEach((t, i) => assertClose(t, tc[i], { rtol: 1e-9, atol: 1e-10, msg: `third order, block ${'qkv'[i]}` }));
    assert.ok(tf.some((t) => t.toArray().some((z) => Math.abs(z) > 1e-3)), 'third derivative is not trivially zero');
  });
});
