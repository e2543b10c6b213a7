/**
 * Gradients of every differentiable op against central finite differences in float64, second-order
 * Hessian-vector products (nested grad) against finite differences of the gradient, and a
 * third-order check on a composite.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import {
  type Shape, Tensor, abs, add, addcmul, broadcastTo, cast, concat, cos, cumsum, div, exp, expandDims, gather, grad, greater, log,
  getBackend, logSoftmax, logsumexp, matmul, max, maximum, mean, min, minimum, mT, mul, neg, pad, pow, reciprocal, reshape, rsqrt,
  scatterAdd, sigmoid, sign, silu, sin, slice, softmax, sqrt, square, squeeze, stack, sub, sum, sumSquares, takeAlongAxis, tanh, tensor,
  transpose, where,
} from '../src/index.js';
import { awayFromZero, checkGrad, checkHvp, directional, distinct, project, rn, ru } from './helpers/check.js';
import { sizeOf } from '../src/engine/shape.js';

type Op1 = (x: Tensor) => Tensor;

// ---- elementwise unary ---------------------------------------------------------------------------

/** Each op with inputs inside its smooth domain; `proj` gives the Hessian something to see for linear ops. */
const UNARY: { name: string; op: Op1; input: (seed: number, s: Shape) => Tensor; proj?: 'tanh' | 'square' }[] = [
  { name: 'neg', op: neg, input: (k, s) => rn(k, s), proj: 'tanh' },
  { name: 'exp', op: exp, input: (k, s) => rn(k, s) },
  { name: 'log', op: log, input: (k, s) => ru(k, s, 0.3, 3) },
  { name: 'sqrt', op: sqrt, input: (k, s) => ru(k, s, 0.3, 3) },
  { name: 'rsqrt', op: rsqrt, input: (k, s) => ru(k, s, 0.3, 3) },
  { name: 'tanh', op: tanh, input: (k, s) => rn(k, s) },
  { name: 'sigmoid', op: sigmoid, input: (k, s) => ru(k, s, -4, 4) },
  { name: 'silu', op: silu, input: (k, s) => ru(k, s, -4, 4) },
  { name: 'square', op: square, input: (k, s) => rn(k, s) },
  { name: 'abs', op: abs, input: (k, s) => awayFromZero(k, s), proj: 'tanh' },
  { name: 'cos', op: cos, input: (k, s) => ru(k, s, -3, 3) },
  { name: 'sin', op: sin, input: (k, s) => ru(k, s, -3, 3) },
  { name: 'reciprocal', op: reciprocal, input: (k, s) => awayFromZero(k, s, 0.4, 2) },
];

describe('unary: gradient and Hessian-vector product', () => {
  for (const u of UNARY) {
    test(u.name, () => {
      const x = u.input(10, [2, 3]);
      checkGrad(project(u.op, [x]), [x], { label: `${u.name} grad` });
      checkHvp(project(u.op, [x], 999, u.proj ?? 'linear'), [x], { label: `${u.name} hvp` });
      // through a composite so the incoming cotangent is not a constant
      const xs = u.input(11, [4]);
      const f = (t: Tensor) => sum(mul(u.op(mul(t, t.sum().tanh().add(1.5))), tensor([0.7, -1.1, 0.4, 1.3], [4], 'float64')));
      if (u.name !== 'log' && u.name !== 'sqrt' && u.name !== 'rsqrt') {
        checkGrad(f, [xs], { label: `${u.name} in a composite` });
        checkHvp(f, [xs], { label: `${u.name} hvp in a composite` });
      }
    });
  }

  test('sign has a zero gradient (and zero second derivative)', () => {
    const x = awayFromZero(12, [2, 3]);
    checkGrad(project(sign, [x]), [x], { allowZero: true, label: 'sign' });
    const g = grad((t: Tensor) => sum(mul(sign(t), t)))(x);
    assert.deepEqual(g.toArray(), sign(x).toArray(), 'd/dx sum(sign(x) * x) = sign(x)');
  });
});

// ---- elementwise binary with broadcasting -------------------------------------------------------------

const BIN_SHAPES: [Shape, Shape][] = [
  [[2, 3], [2, 3]],
  [[3, 1], [1, 4]],
  [[2, 1, 3], [4, 1]],
  [[], [2, 3]],
  [[2, 3], [3]],
  [[1, 3], [2, 1, 1]],
];

type Op2 = (a: Tensor, b: Tensor) => Tensor;
const BINARY: { name: string; op: Op2; inputs: (seed: number, as: Shape, bs: Shape) => [Tensor, Tensor]; proj?: 'tanh' }[] = [
  { name: 'add', op: add, inputs: (k, as, bs) => [rn(k, as), rn(k + 1, bs)], proj: 'tanh' },
  { name: 'sub', op: sub, inputs: (k, as, bs) => [rn(k, as), rn(k + 1, bs)], proj: 'tanh' },
  { name: 'mul', op: mul, inputs: (k, as, bs) => [rn(k, as), rn(k + 1, bs)] },
  { name: 'div', op: div, inputs: (k, as, bs) => [rn(k, as), awayFromZero(k + 1, bs, 0.5, 2)] },
  { name: 'pow', op: pow, inputs: (k, as, bs) => [ru(k, as, 0.4, 2.5), ru(k + 1, bs, -1.5, 2.5)] },
  { name: 'maximum', op: maximum, inputs: splitDistinct, proj: 'tanh' },
  { name: 'minimum', op: minimum, inputs: splitDistinct, proj: 'tanh' },
];

/** Two operands whose values are all distinct (no ties between them after broadcasting). */
function splitDistinct(seed: number, as: Shape, bs: Shape): [Tensor, Tensor] {
  const na = sizeOf(as);
  const all = distinct(seed, [na + sizeOf(bs)]).toArray();
  return [tensor(all.slice(0, na), as, 'float64'), tensor(all.slice(na), bs, 'float64')];
}

describe('binary with broadcasting: gradient and Hessian-vector product', () => {
  for (const b of BINARY) {
    test(b.name, () => {
      BIN_SHAPES.forEach(([as, bs], c) => {
        const [x, y] = b.inputs(20 + 10 * c, as, bs);
        const label = `${b.name} ${JSON.stringify(as)} x ${JSON.stringify(bs)}`;
        checkGrad(project(b.op, [x, y]), [x, y], { label });
        checkHvp(project(b.op, [x, y], 999, b.proj ?? 'linear'), [x, y], { label: `${label} hvp` });
      });
    });
  }

  test('number operands', () => {
    const x = ru(30, [2, 3], 0.5, 2);
    for (const [name, op] of [
      ['x + 2', (t: Tensor) => add(t, 2)], ['2 - x', (t: Tensor) => sub(2, t)], ['3 / x', (t: Tensor) => div(3, t)],
      ['x ** 1.7', (t: Tensor) => pow(t, 1.7)], ['1.3 ** x', (t: Tensor) => pow(1.3, t)], ['maximum(x, 1.1)', (t: Tensor) => maximum(t, 1.13)],
    ] as [string, Op1][]) {
      checkGrad(project(op, [x]), [x], { label: name });
      checkHvp(project(op, [x], 999, 'tanh'), [x], { label: `${name} hvp` });
    }
  });

  test('addcmul (gradient to all three, broadcast; a factor per row)', () => {
    for (const [as, bs, cs] of [[[3, 4], [1, 4], [3, 1]], [[2, 3, 4], [2, 3, 4], [2, 1, 1]], [[], [2, 2], [2]]] as number[][][]) {
      const [a, b, c] = [rn(35, as), rn(36, bs), rn(37, cs)];
      checkGrad(project(addcmul, [a, b, c]), [a, b, c], { label: `addcmul ${JSON.stringify([as, bs, cs])}` });
      checkHvp(project(addcmul, [a, b, c], 999, 'tanh'), [a, b, c], { label: `addcmul ${JSON.stringify([as, bs, cs])} hvp` });
    }
  });

  test('where (gradient to both branches, broadcast)', () => {
    const cond = greater(tensor([0.5, -0.2, 1.1], [3, 1], 'float64'), 0);
    const a = rn(32, [1, 4]);
    const b = rn(33, [3, 4]);
    const f = (x: Tensor, y: Tensor) => where(cond, x, y);
    checkGrad(project(f, [a, b]), [a, b], { label: 'where' });
    checkHvp(project(f, [a, b], 999, 'tanh'), [a, b], { label: 'where hvp' });
    const s = rn(34, []);
    checkGrad(project((x: Tensor) => where(cond, x, 0), [s]), [s], { label: 'where scalar branch' });
  });
});

// ---- reductions ----------------------------------------------------------------------------------------

const AXES: (number | number[] | undefined)[] = [undefined, 0, -1, 1, [0, 2], [1, 2], [2, 0]];

describe('reductions: gradient and Hessian-vector product', () => {
  const REDS: { name: string; op: (x: Tensor, ax: number | number[] | undefined, k: boolean) => Tensor; input: (k: number) => Tensor; proj?: 'tanh' }[] = [
    { name: 'sum', op: (x, ax, k) => sum(x, ax, k), input: (k) => rn(k, [2, 3, 4]), proj: 'tanh' },
    // (quadratic already: a linear projection has a Hessian, where tanh of a sum of 24 squares saturates)
    { name: 'sumSquares', op: (x, ax, k) => sumSquares(x, ax, k), input: (k) => rn(k, [2, 3, 4]) },
    { name: 'mean', op: (x, ax, k) => mean(x, ax, k), input: (k) => rn(k, [2, 3, 4]), proj: 'tanh' },
    { name: 'max', op: (x, ax, k) => max(x, ax, k), input: (k) => distinct(k, [2, 3, 4]), proj: 'tanh' },
    { name: 'min', op: (x, ax, k) => min(x, ax, k), input: (k) => distinct(k, [2, 3, 4]), proj: 'tanh' },
    { name: 'logsumexp', op: (x, ax, k) => logsumexp(x, ax ?? [0, 1, 2], k), input: (k) => rn(k, [2, 3, 4]) },
  ];
  for (const r of REDS) {
    test(r.name, () => {
      AXES.forEach((axes, c) => {
        for (const keepdims of [false, true]) {
          const x = r.input(40 + c);
          const op = (t: Tensor) => r.op(t, axes, keepdims);
          const label = `${r.name} axes ${JSON.stringify(axes)} keepdims ${keepdims}`;
          checkGrad(project(op, [x]), [x], { label });
          if (keepdims || c % 2 === 0) checkHvp(project(op, [x], 999, r.proj ?? 'linear'), [x], { label: `${label} hvp`, directions: 1 });
        }
      });
    });
  }

  test('max/min: ties share the gradient equally', () => {
    const x = tensor([1, 3, 3, 0, 2, 2, 2, -1], [2, 4], 'float64');
    assert.deepEqual(grad((t: Tensor) => sum(max(t, -1)))(x).toArray(), [0, 0.5, 0.5, 0, 1 / 3, 1 / 3, 1 / 3, 0]);
    assert.deepEqual(grad((t: Tensor) => sum(min(t, -1)))(x).toArray(), [0, 0, 0, 1, 0, 0, 0, 1]);
    const y = tensor([2, 5, 5, 5, 1, 5], [2, 3], 'float64');
    assert.deepEqual(grad((t: Tensor) => sum(max(t)))(y).toArray(), [0, 0.25, 0.25, 0.25, 0, 0.25]);
  });
});

describe('softmax, logSoftmax, cumsum', () => {
  for (const axis of [0, 1, 2, -1]) {
    test(`softmax / logSoftmax axis ${axis}`, () => {
      const x = rn(50 + axis, [2, 3, 4]);
      checkGrad(project((t) => softmax(t, axis), [x]), [x], { label: 'softmax' });
      checkHvp(project((t) => softmax(t, axis), [x]), [x], { label: 'softmax hvp' });
      checkGrad(project((t) => logSoftmax(t, axis), [x]), [x], { label: 'logSoftmax' });
      checkHvp(project((t) => logSoftmax(t, axis), [x]), [x], { label: 'logSoftmax hvp' });
    });
    test(`cumsum axis ${axis}`, () => {
      const x = rn(60 + axis, [2, 3, 4]);
      for (const reverse of [false, true]) {
        checkGrad(project((t) => cumsum(t, axis, reverse), [x]), [x], { label: `cumsum reverse ${reverse}` });
        checkHvp(project((t) => cumsum(t, axis, reverse), [x], 999, 'tanh'), [x], { label: `cumsum reverse ${reverse} hvp`, directions: 1 });
      }
    });
  }
});

// ---- matmul ------------------------------------------------------------------------------------------

describe('matmul: every transpose combination, broadcast batch dims', () => {
  const stored = (s: Shape, t: boolean) => (t ? [...s.slice(0, -2), s[s.length - 1], s[s.length - 2]] : [...s]);
  const CASES: [Shape, Shape][] = [
    [[3, 4], [4, 2]],
    [[2, 1, 3, 4], [5, 4, 2]],
    [[3, 4], [2, 4, 2]],
    [[2, 3, 1], [1, 2]],
  ];
  for (const transA of [false, true]) {
    for (const transB of [false, true]) {
      test(`transA ${transA} transB ${transB}`, () => {
        CASES.forEach(([al, bl], c) => {
          const a = rn(70 + c, stored(al, transA));
          const b = rn(80 + c, stored(bl, transB));
          const op = (x: Tensor, y: Tensor) => matmul(x, y, { transA, transB });
          const label = `matmul ${JSON.stringify(a.shape)} ${JSON.stringify(b.shape)} ${transA} ${transB}`;
          checkGrad(project(op, [a, b]), [a, b], { label });
          checkHvp(project(op, [a, b]), [a, b], { label: `${label} hvp (bilinear cross terms)` });
          // one argument only: linear in a, so the Hessian needs a nonlinear projection
          checkHvp(project((x: Tensor) => op(x, b), [a], 998, 'square'), [a], { label: `${label} hvp in a`, directions: 1 });
          checkHvp(project((y: Tensor) => op(a, y), [b], 997, 'tanh'), [b], { label: `${label} hvp in b`, directions: 1 });
        });
      });
    }
  }
  test('mixed bfloat16 x float32 (either side) and a float32 product: the explicit-cast composite\'s values and first and second order, gradients in each operand\'s dtype', () => {
    // (the CPU holds bfloat16 in float32 arrays unrounded, so there mixed and composite agree to float32 rounding;
    // on the GPU (npm run test:cuda) the composite rounds the weights' gradient to bfloat16 before its cast, the
    // mixed product does not: they agree to bfloat16 rounding, measured against the largest entry)
    const tol = getBackend().name === 'cpu' ? 1e-5 : 2e-2;
    const x = cast(rn(91, [2, 3, 4]), 'bfloat16');
    const w = cast(rn(92, [4, 5]), 'float32');
    const g = cast(rn(93, [2, 3, 5]), 'float32');
    const v = cast(rn(94, [4, 5]), 'float32');
    const close = (a: Tensor, b: Tensor, what: string) => {
      const [p, q] = [a.toArray(), b.toArray()];
      const scale = Math.max(1, ...q.map(Math.abs));
      p.forEach((e, i) => assert.ok(Math.abs(e - q[i]) <= tol * scale, `${what} [${i}]: ${e} vs ${q[i]}`));
    };
    for (const wide of [false, true]) {
      for (const transB of [false, true]) {
        const wt = transB ? transpose(w) : w;
        const f = (mixed: boolean) => (a: Tensor, b: Tensor) => {
          const y = mixed ? matmul(a, b, { transB, outDType: wide ? 'float32' : undefined }) : cast(matmul(a, cast(b, 'bfloat16'), { transB }), wide ? 'float32' : 'bfloat16');
          return sum(mul(tanh(cast(y, 'float32')), g));
        };
        const [dxM, dwM] = grad(f(true), [0, 1])(x, wt) as Tensor[];
        const [dxC, dwC] = grad(f(false), [0, 1])(x, wt) as Tensor[];
        assert.deepEqual([dxM.dtype, dwM.dtype], ['bfloat16', 'float32']);
        close(dxM, dxC, `dx wide ${wide} transB ${transB}`);
        close(dwM, dwC, `dw wide ${wide} transB ${transB}`);
        const vt = transB ? transpose(v) : v;
        const hvp = (mixed: boolean) => grad((b: Tensor) => sum(mul(grad((bb: Tensor) => f(mixed)(x, bb))(b) as Tensor, vt)))(wt) as Tensor;
        close(hvp(true), hvp(false), `hvp wide ${wide} transB ${transB}`);
      }
    }
    // the float32 operand on the left
    const dl = grad((a: Tensor) => sum(cast(matmul(a, cast(rn(95, [5, 2]), 'bfloat16')), 'float32')))(cast(rn(96, [3, 5]), 'float32')) as Tensor;
    assert.equal(dl.dtype, 'float32');
  });

  test('same tensor on both sides (x xᵀ)', () => {
    const x = rn(90, [2, 3, 4]);
    const op = (t: Tensor) => matmul(t, t, { transB: true });
    checkGrad(project(op, [x]), [x], { label: 'x xᵀ' });
    checkHvp(project(op, [x]), [x], { label: 'x xᵀ hvp' });
  });
});

// ---- shape ops ----------------------------------------------------------------------------------------

describe('shape ops: gradient and Hessian-vector product', () => {
  const SHAPE_OPS: { name: string; shape: Shape; op: Op1 }[] = [
    { name: 'reshape', shape: [2, 3, 4], op: (t) => reshape(t, [4, -1]) },
    { name: 'reshape to scalar', shape: [1, 1], op: (t) => reshape(t, []) },
    { name: 'expandDims', shape: [2, 3], op: (t) => expandDims(t, 1) },
    { name: 'squeeze', shape: [2, 1, 3, 1], op: (t) => squeeze(t) },
    { name: 'squeeze axis', shape: [2, 1, 3, 1], op: (t) => squeeze(t, -1) },
    { name: 'transpose default', shape: [2, 3, 4], op: (t) => transpose(t) },
    { name: 'transpose [1,2,0]', shape: [2, 3, 4], op: (t) => transpose(t, [1, 2, 0]) },
    { name: 'transpose [0,2,1]', shape: [2, 3, 4], op: (t) => transpose(t, [0, 2, 1]) },
    { name: 'mT', shape: [2, 3, 4], op: mT },
    { name: 'broadcastTo [3,1]→[2,3,4]', shape: [3, 1], op: (t) => broadcastTo(t, [2, 3, 4]) },
    { name: 'broadcastTo []→[2,2]', shape: [], op: (t) => broadcastTo(t, [2, 2]) },
    { name: 'slice', shape: [4, 5, 3], op: (t) => slice(t, [1, -3], [3, -1]) },
    { name: 'slice partial', shape: [4, 5, 3], op: (t) => slice(t, [0, 0, 1]) },
    { name: 'pad', shape: [2, 3], op: (t) => pad(t, [[1, 0], [2, 1]], 0.5) },
    { name: 'pad 3d', shape: [2, 1, 2], op: (t) => pad(t, [[0, 1], [1, 1], [0, 2]]) },
  ];
  for (const s of SHAPE_OPS) {
    test(s.name, () => {
      const x = rn(100, s.shape);
      checkGrad(project(s.op, [x]), [x], { label: s.name });
      checkHvp(project(s.op, [x], 999, 'tanh'), [x], { label: `${s.name} hvp`, directions: 1 });
    });
  }

  for (const axis of [0, 1, -1]) {
    test(`concat of 3 tensors, axis ${axis}`, () => {
      const a = axis < 0 ? 2 : axis;
      const xs = [1, 3, 2].map((n, i) => rn(110 + i, [2, 3, 2].map((d, j) => (j === a ? n : d))));
      const op = (p: Tensor, q: Tensor, r: Tensor) => concat([p, q, r], axis);
      checkGrad(project(op, xs), xs, { label: 'concat' });
      checkHvp(project(op, xs, 999, 'tanh'), xs, { label: 'concat hvp', directions: 1 });
    });
    test(`stack of 3 tensors, axis ${axis}`, () => {
      const xs = [0, 1, 2].map((i) => rn(120 + i, [2, 3]));
      const op = (p: Tensor, q: Tensor, r: Tensor) => stack([p, q, r], axis);
      checkGrad(project(op, xs), xs, { label: 'stack' });
      checkHvp(project(op, xs, 999, 'tanh'), xs, { label: 'stack hvp', directions: 1 });
    });
  }
  test('concat with the same tensor twice', () => {
    const x = rn(130, [2, 2]);
    checkGrad(project((t) => concat([t, mul(t, 2), t], 1), [x]), [x], { label: 'concat repeated' });
  });
});

// ---- gather / scatter --------------------------------------------------------------------------------

describe('gather, scatterAdd, takeAlongAxis', () => {
  const xs = [3, 4, 2];
  for (const axis of [0, 1, 2, -1]) {
    test(`gather axis ${axis} (repeated indices)`, () => {
      const n = xs[axis < 0 ? axis + 3 : axis];
      const ind = tensor([0, n - 1, 1, 0, n - 1, 1 % n], [2, 3], 'int32');
      const x = rn(140, xs);
      const op = (t: Tensor) => gather(t, ind, axis);
      checkGrad(project(op, [x]), [x], { label: 'gather' });
      checkHvp(project(op, [x], 999, 'tanh'), [x], { label: 'gather hvp' });
    });
    test(`scatterAdd axis ${axis} (repeated indices), w.r.t. base and updates`, () => {
      const a = axis < 0 ? axis + 3 : axis;
      const n = xs[a];
      const is = [2, 2];
      const ind = tensor([1, 0, 1, n - 1], is, 'int32');
      const base = rn(150, xs);
      const upd = rn(151, [...xs.slice(0, a), ...is, ...xs.slice(a + 1)]);
      const op = (b: Tensor, u: Tensor) => scatterAdd(b, ind, u, axis);
      checkGrad(project(op, [base, upd]), [base, upd], { label: 'scatterAdd' });
      checkHvp(project(op, [base, upd], 999, 'tanh'), [base, upd], { label: 'scatterAdd hvp' });
    });
    test(`takeAlongAxis axis ${axis}`, () => {
      const a = axis < 0 ? axis + 3 : axis;
      const n = xs[a];
      const is = xs.map((d, i) => (i === a ? 3 : d));
      const ind = tensor(ru(160 + a, is, 0, n).toArray().map(Math.floor), is, 'int32');
      const x = rn(161, xs);
      const op = (t: Tensor) => takeAlongAxis(t, ind, axis);
      checkGrad(project(op, [x]), [x], { label: 'takeAlongAxis' });
      checkHvp(project(op, [x], 999, 'tanh'), [x], { label: 'takeAlongAxis hvp', directions: 1 });
    });
  }
});

// ---- cast ----------------------------------------------------------------------------------------------

describe('cast', () => {
  test('float64 → float32 → float64: the gradient passes through (loose: float32 resolution)', () => {
    const x = rn(170, [2, 3]);
    const op = (t: Tensor) => cast(cast(t, 'float32'), 'float64');
    const g = grad(project(op, [x]))(x);
    assert.equal(g.dtype, 'float64');
    // eps large against float32 rounding (~6e-8): the numeric derivative is good to ~1e-5 relative
    checkGrad(project(op, [x]), [x], { eps: 1e-2, rtol: 1e-4, label: 'cast round trip' });
    // a nonlinear function on the far side of the float32 hop
    checkGrad((t: Tensor) => sum(tanh(op(t))), [x], { eps: 1e-2, rtol: 1e-3, label: 'tanh of cast round trip' });
  });
  test('a float32 gradient comes back as float32', () => {
    const x = rn(171, [3], 'float32');
    const g = grad((t: Tensor) => sum(square(cast(t, 'float64'))))(x);
    assert.equal(g.dtype, 'float32');
    assert.deepEqual(g.toArray(), x.toArray().map((v) => Math.fround(2 * v)));
  });
});

// ---- composites: second and third order ------------------------------------------------------------

function rmsNorm(x: Tensor, w: Tensor): Tensor {
  return mul(mul(x, rsqrt(add(mean(square(x), -1, true), 1e-5))), w);
}

function attention(q: Tensor, k: Tensor, v: Tensor): Tensor {
  const T = q.shape[q.rank - 2];
  const d = q.shape[q.rank - 1];
  const maskVals: number[] = [];
  for (let i = 0; i < T; i++) for (let j = 0; j < T; j++) maskVals.push(j <= i ? 0 : -1e9);
  const mask = tensor(maskVals, [T, T], 'float64');
  const scores = add(div(matmul(q, k, { transB: true }), Math.sqrt(d)), mask);
  return matmul(softmax(scores, -1), v);
}

describe('composites', () => {
  test('RMSNorm: gradient and HVP', () => {
    const x = rn(180, [3, 4]);
    const w = ru(181, [4], 0.5, 1.5);
    checkGrad(project(rmsNorm, [x, w]), [x, w], { label: 'rmsnorm' });
    checkHvp(project(rmsNorm, [x, w]), [x, w], { label: 'rmsnorm hvp', directions: 3 });
  });

  test('tiny causal attention: gradient and HVP', () => {
    const q = rn(190, [2, 3, 2]);
    const k = rn(191, [2, 3, 2]);
    const v = rn(192, [2, 3, 2]);
    checkGrad(project(attention, [q, k, v]), [q, k, v], { label: 'attention' });
    checkHvp(project(attention, [q, k, v]), [q, k, v], { label: 'attention hvp', directions: 3 });
  });

  test('third order: HVP of a directional derivative (grad nested three deep) on RMSNorm and attention', () => {
    const x = rn(200, [2, 3]);
    const w = ru(201, [3], 0.5, 1.5);
    const f = project(rmsNorm, [x, w]);
    // d(x) = <∇f(x), u>; checkHvp(d) compares grad(grad(grad f)) with FD of grad(grad f)
    const u = [rn(202, [2, 3]), rn(203, [3])];
    checkHvp(directional(f, u), [x, w], { label: 'rmsnorm third order', rtol: 1e-5 });
    const q = rn(210, [3, 2]);
    const k = rn(211, [3, 2]);
    const v = rn(212, [3, 2]);
    const g = project(attention, [q, k, v]);
    checkHvp(directional(g, [rn(213, [3, 2]), rn(214, [3, 2]), rn(215, [3, 2])]), [q, k, v], { label: 'attention third order', rtol: 1e-5 });
  });

  test('third order against the closed form: d³/dx³ sum(x⁴ ⋅ c) = 24 x c', () => {
    const x = rn(220, [5]);
    const c = rn(221, [5]);
    const f = (t: Tensor) => sum(mul(square(square(t)), c));
    const d1 = (t: Tensor) => sum(grad(f)(t));
    const d2 = (t: Tensor) => sum(grad(d1)(t));
    const g3 = grad(d2)(x).toArray();
    const xv = x.toArray();
    const cv = c.toArray();
    g3.forEach((gv: number, i: number) => assert.ok(Math.abs(gv - 24 * xv[i] * cv[i]) < 1e-10 * (1 + Math.abs(gv)), `element ${i}: ${gv} vs ${24 * xv[i] * cv[i]}`));
  });
});
