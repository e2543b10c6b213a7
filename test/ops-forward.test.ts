/**
 * Forward values of every op against independent float64 references written here with plain loops
 * over multi-indices (no engine op is used to compute an expected value).
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import {
  type DType, type Shape, Tensor, abs, add, addcmul, arange, broadcastTo, cast, concat, cos, cumsum, div, equal, exp, expandDims,
  foldIn, full, gather, grad, greater, greaterEqual, less, lessEqual, log, logSoftmax, logsumexp, matmul, max, maximum, mean, min,
  minimum, mT, mul, neg, notEqual, ones, pad, pow, randn, randomKey, reciprocal, reshape, rsqrt, scatterAdd, sigmoid, sign,
  silu, sin, slice, softmax, splitKey, sqrt, square, squeeze, stack, sub, sum, sumSquares, takeAlongAxis, tanh, tensor, threefry2x32,
  transpose, truncatedNormal, uniform, uniformHost, normalHost, where, zeros, zerosLike,
} from '../src/index.js';
import { assertClose, assertShape, forEachIndex, keyOf, ravel, rn, ru } from './helpers/check.js';
import { countingCalls } from './helpers/fused.js';
import { sizeOf } from '../src/engine/shape.js';

const FLOATS: DType[] = ['float32', 'float64'];
/** float32 results are float64 math rounded once (inputs are exact float32 values): ~6e-8 relative. */
const TOL: Record<string, { rtol: number; atol: number }> = {
  float32: { rtol: 1e-6, atol: 1e-30 },
  float64: { rtol: 1e-13, atol: 1e-300 },
  int32: { rtol: 0, atol: 0 },
  bool: { rtol: 0, atol: 0 },
};
const tol = (dtype: DType) => TOL[dtype];

// ---- independent references ----------------------------------------------------------------------

interface Ref {
  v: number[];
  shape: number[];
}

function refBroadcastShape(a: Shape, b: Shape): number[] {
  const n = Math.max(a.length, b.length);
  const out: number[] = [];
  for (let i = 0; i < n; i++) {
    const da = i - (n - a.length) >= 0 ? a[i - (n - a.length)] : 1;
    const db = i - (n - b.length) >= 0 ? b[i - (n - b.length)] : 1;
    if (da !== db && da !== 1 && db !== 1) throw new Error('reference: not broadcastable');
    out.push(da === 1 ? db : da);
  }
  return out;
}

/** Value of `x` (shape xs) read at output index `idx` under broadcasting. */
function readBroadcast(x: number[], xs: Shape, idx: number[]): number {
  const off = idx.length - xs.length;
  const own = xs.map((d, i) => (d === 1 ? 0 : idx[i + off]));
  return x[ravel(own, xs)];
}

function refElementwise(inputs: { v: number[]; shape: Shape }[], fn: (...xs: number[]) => number): Ref {
  let shape: number[] = [];
  for (const x of inputs) shape = refBroadcastShape(shape, x.shape);
  const v: number[] = [];
  forEachIndex(shape, (idx) => v.push(fn(...inputs.map((x) => readBroadcast(x.v, x.shape, idx)))));
  return { v, shape };
}

function normAx(axes: number | number[] | undefined, rank: number): number[] {
  if (axes === undefined) return [...Array(rank).keys()];
  return [...new Set((typeof axes === 'number' ? [axes] : axes).map((a) => (a < 0 ? a + rank : a)))];
}

/** Generic reduction: collects the values of each output cell, then folds them with `fold`. */
function refReduce(x: number[], shape: Shape, axes: number | number[] | undefined, keepdims: boolean, fold: (vals: number[]) => number): Ref {
  const ax = normAx(axes, shape.length);
  const kept = shape.map((d, i) => (ax.includes(i) ? 1 : d));
  const groups: number[][] = Array.from({ length: sizeOf(kept) }, () => []);
  forEachIndex(shape, (idx, flat) => {
    groups[ravel(idx.map((j, i) => (ax.includes(i) ? 0 : j)), kept)].push(x[flat]);
  });
  return { v: groups.map(fold), shape: keepdims ? kept : shape.filter((_, i) => !ax.includes(i)) };
}

const fSum = (vals: number[]) => vals.reduce((s, u) => s + u, 0);
const fMean = (vals: number[]) => fSum(vals) / vals.length;
const fMax = (vals: number[]) => vals.reduce((m, u) => (u > m ? u : m), -Infinity);
const fMin = (vals: number[]) => vals.reduce((m, u) => (u < m ? u : m), Infinity);
const fLse = (vals: number[]) => {
  const m = fMax(vals);
  return m + Math.log(vals.reduce((s, u) => s + Math.exp(u - m), 0));
};

/** Per-line map along `axis`: fn gets the line's values and returns the new line. */
function refAlongAxis(x: number[], shape: Shape, axis: number, fn: (line: number[]) => number[]): number[] {
  const a = axis < 0 ? axis + shape.length : axis;
  const out = new Array<number>(x.length);
  const lineShape = shape.map((d, i) => (i === a ? 1 : d));
  forEachIndex(lineShape, (base) => {
    const idxs = Array.from({ length: shape[a] }, (_, j) => ravel(base.map((b, i) => (i === a ? j : b)), shape));
    const res = fn(idxs.map((i) => x[i]));
    idxs.forEach((i, j) => (out[i] = res[j]));
  });
  return out;
}

const lineSoftmax = (l: number[]) => {
  const m = fMax(l);
  const e = l.map((u) => Math.exp(u - m));
  const s = fSum(e);
  return e.map((u) => u / s);
};
const lineLogSoftmax = (l: number[]) => {
  const lse = fLse(l);
  return l.map((u) => u - lse);
};
const lineCumsum = (reverse: boolean) => (l: number[]) => {
  const out = new Array<number>(l.length);
  let acc = 0;
  for (let s = 0; s < l.length; s++) {
    const j = reverse ? l.length - 1 - s : s;
    acc += l[j];
    out[j] = acc;
  }
  return out;
};

function refMatmul(a: number[], as: Shape, b: number[], bs: Shape, transA: boolean, transB: boolean): Ref {
  const [ar, ac] = as.slice(-2);
  const [br, bc] = bs.slice(-2);
  const m = transA ? ac : ar;
  const k = transA ? ar : ac;
  const n = transB ? br : bc;
  const aBatch = as.slice(0, -2);
  const bBatch = bs.slice(0, -2);
  const batch = refBroadcastShape(aBatch, bBatch);
  const shape = [...batch, m, n];
  const v: number[] = [];
  forEachIndex(shape, (idx) => {
    const bi = idx.slice(0, -2);
    const [i, j] = idx.slice(-2);
    const aOff = aBatch.map((d, t) => (d === 1 ? 0 : bi[t + bi.length - aBatch.length]));
    const bOff = bBatch.map((d, t) => (d === 1 ? 0 : bi[t + bi.length - bBatch.length]));
    let s = 0;
    for (let p = 0; p < k; p++) {
      const av = a[ravel([...aOff, ...(transA ? [p, i] : [i, p])], as)];
      const bv = b[ravel([...bOff, ...(transB ? [j, p] : [p, j])], bs)];
      s += av * bv;
    }
    v.push(s);
  });
  return { v, shape };
}

function refTranspose(x: number[], shape: Shape, perm: number[]): Ref {
  const outShape = perm.map((p) => shape[p]);
  const v: number[] = [];
  forEachIndex(outShape, (idx) => {
    const src = new Array<number>(shape.length);
    perm.forEach((p, i) => (src[p] = idx[i]));
    v.push(x[ravel(src, shape)]);
  });
  return { v, shape: outShape };
}

function refGather(x: number[], xs: Shape, ind: number[], is: Shape, axis: number): Ref {
  const a = axis < 0 ? axis + xs.length : axis;
  const shape = [...xs.slice(0, a), ...is, ...xs.slice(a + 1)];
  const v: number[] = [];
  forEachIndex(shape, (idx) => {
    const iIdx = idx.slice(a, a + is.length);
    const src = [...idx.slice(0, a), ind[ravel(iIdx, is)], ...idx.slice(a + is.length)];
    v.push(x[ravel(src, xs)]);
  });
  return { v, shape };
}

function refScatterAdd(base: number[], bs: Shape, ind: number[], is: Shape, upd: number[], axis: number): number[] {
  const a = axis < 0 ? axis + bs.length : axis;
  const us = [...bs.slice(0, a), ...is, ...bs.slice(a + 1)];
  const out = base.slice();
  forEachIndex(us, (idx, flat) => {
    const dst = [...idx.slice(0, a), ind[ravel(idx.slice(a, a + is.length), is)], ...idx.slice(a + is.length)];
    out[ravel(dst, bs)] += upd[flat];
  });
  return out;
}

const vals = (t: Tensor) => t.toArray();
function check(t: Tensor, ref: Ref, dtype: DType, msg: string, t2?: { rtol: number; atol: number }): void {
  assertShape(t, ref.shape, msg);
  assert.equal(t.dtype, dtype, `${msg}: dtype`);
  assertClose(t, ref.v, { ...(t2 ?? tol(dtype)), msg });
}

/** Host reference rounding for a float dtype. */
const roundTo = (dtype: DType) => (x: number) => (dtype === 'float32' ? Math.fround(x) : x);

// ---- creation --------------------------------------------------------------------------------------

describe('creation', () => {
  test('tensor from nested arrays, flat values with a shape, and a scalar', () => {
    const t2 = tensor([[1, 2, 3], [4, 5, 6]]);
    assertShape(t2, [2, 3]);
    assert.equal(t2.dtype, 'float32');
    assert.deepEqual(vals(t2), [1, 2, 3, 4, 5, 6]);
    const t3 = tensor([[[1, 2], [3, 4]], [[5, 6], [7, 8]], [[9, 10], [11, 12]]], undefined, 'float64');
    assertShape(t3, [3, 2, 2]);
    assert.equal(t3.dtype, 'float64');
    assert.deepEqual(vals(t3), [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
    const t1 = tensor([0.1, -2.5, 3], undefined, 'float64');
    assertShape(t1, [3]);
    assert.deepEqual(vals(t1), [0.1, -2.5, 3]);
    assert.deepEqual(vals(tensor([0.1, 0.2], [2])), [Math.fround(0.1), Math.fround(0.2)]);
    const flat = tensor([1, 2, 3, 4, 5, 6], [3, 1, 2], 'int32');
    assertShape(flat, [3, 1, 2]);
    assert.equal(flat.dtype, 'int32');
    assert.deepEqual(vals(flat), [1, 2, 3, 4, 5, 6]);
    const s = tensor(7.5, [], 'float64');
    assertShape(s, []);
    assert.equal(s.item(), 7.5);
    assertShape(tensor([], [0, 4]), [0, 4]);
    assert.deepEqual(vals(tensor([1, 0, 1], [3], 'bool')), [1, 0, 1]);
  });

  test('zeros, ones, full, zerosLike', () => {
    for (const dtype of ['float32', 'float64', 'int32', 'bool'] as DType[]) {
      const z = zeros([2, 3], dtype);
      assertShape(z, [2, 3]);
      assert.equal(z.dtype, dtype);
      assert.deepEqual(vals(z), [0, 0, 0, 0, 0, 0]);
      const o = ones([3], dtype);
      assert.equal(o.dtype, dtype);
      assert.deepEqual(vals(o), [1, 1, 1]);
    }
    assert.deepEqual(vals(full([2, 2], -1.25, 'float64')), [-1.25, -1.25, -1.25, -1.25]);
    assert.deepEqual(vals(full([2], 0.1)), [Math.fround(0.1), Math.fround(0.1)]);
    assert.deepEqual(vals(full([3], 7, 'int32')), [7, 7, 7]);
    const sc = full([], 3, 'float64');
    assertShape(sc, []);
    assert.equal(sc.item(), 3);
    assertShape(full([0, 5], 1), [0, 5]);
    assert.equal(full([0, 5], 1).size, 0);
    const src = rn(1, [2, 1, 3], 'float64');
    const zl = zerosLike(src);
    assertShape(zl, [2, 1, 3]);
    assert.equal(zl.dtype, 'float64');
    assert.deepEqual(vals(zl), [0, 0, 0, 0, 0, 0]);
    assert.equal(zerosLike(arange(4)).dtype, 'int32');
  });

  test('arange', () => {
    const a = arange(5);
    assert.equal(a.dtype, 'int32');
    assertShape(a, [5]);
    assert.deepEqual(vals(a), [0, 1, 2, 3, 4]);
    assert.deepEqual(vals(arange(2, 10, 3)), [2, 5, 8]);
    assert.deepEqual(vals(arange(5, 0, -2)), [5, 3, 1]);
    assert.deepEqual(vals(arange(3, 3)), []);
    assert.deepEqual(vals(arange(4, 1)), []);
    const f = arange(0, 1, 0.25, 'float64');
    assert.equal(f.dtype, 'float64');
    assert.deepEqual(vals(f), [0, 0.25, 0.5, 0.75]);
    assert.deepEqual(vals(arange(-1, 1.1, 0.5, 'float64')), [-1, -0.5, 0, 0.5, 1]);
  });
});

// ---- elementwise unary -------------------------------------------------------------------------------

const UNARY: { name: string; op: (x: Tensor) => Tensor; ref: (x: number) => number; lo: number; hi: number }[] = [
  { name: 'neg', op: neg, ref: (x) => -x, lo: -3, hi: 3 },
  { name: 'exp', op: exp, ref: Math.exp, lo: -4, hi: 4 },
  { name: 'log', op: log, ref: Math.log, lo: 0.01, hi: 5 },
  { name: 'sqrt', op: sqrt, ref: Math.sqrt, lo: 0, hi: 5 },
  { name: 'rsqrt', op: rsqrt, ref: (x) => 1 / Math.sqrt(x), lo: 0.01, hi: 5 },
  { name: 'tanh', op: tanh, ref: Math.tanh, lo: -4, hi: 4 },
  { name: 'sigmoid', op: sigmoid, ref: (x) => 1 / (1 + Math.exp(-x)), lo: -8, hi: 8 },
  { name: 'silu', op: silu, ref: (x) => x / (1 + Math.exp(-x)), lo: -8, hi: 8 },
  { name: 'square', op: square, ref: (x) => x * x, lo: -3, hi: 3 },
  { name: 'abs', op: abs, ref: Math.abs, lo: -3, hi: 3 },
  { name: 'cos', op: cos, ref: Math.cos, lo: -6, hi: 6 },
  { name: 'sin', op: sin, ref: Math.sin, lo: -6, hi: 6 },
  { name: 'sign', op: sign, ref: (x) => (x > 0 ? 1 : x < 0 ? -1 : 0), lo: -3, hi: 3 },
  { name: 'reciprocal', op: reciprocal, ref: (x) => 1 / x, lo: 0.1, hi: 4 },
];

describe('unary', () => {
  for (const u of UNARY) {
    for (const dtype of FLOATS) {
      test(`${u.name} ${dtype}`, () => {
        const x = ru(11, [3, 4, 2], u.lo, u.hi, dtype);
        const xv = vals(x);
        check(u.op(x), { v: xv.map(u.ref), shape: [3, 4, 2] }, dtype, u.name);
        // negative side for odd ops, a scalar, and an empty tensor
        const s = tensor(u.lo + 0.37 * (u.hi - u.lo), [], dtype);
        check(u.op(s), { v: [u.ref(s.item())], shape: [] }, dtype, `${u.name} scalar`);
        check(u.op(zeros([0, 3], dtype)), { v: [], shape: [0, 3] }, dtype, `${u.name} empty`);
      });
    }
  }

  test('sign of zero, and IEEE edge values', () => {
    assert.deepEqual(vals(sign(tensor([-2, 0, 3], [3], 'float64'))).map((v) => v + 0), [-1, 0, 1]);
    const lg = vals(log(tensor([0, -1, 1], [3], 'float64')));
    assert.equal(lg[0], -Infinity);
    assert.ok(Number.isNaN(lg[1]));
    assert.equal(lg[2], 0);
    assert.ok(Number.isNaN(vals(sqrt(tensor([-1], [1], 'float64')))[0]));
    assert.equal(vals(rsqrt(tensor([0], [1], 'float64')))[0], Infinity);
    assert.deepEqual(vals(sigmoid(tensor([-800, 800], [2], 'float64'))), [0, 1]);
  });

  test('int32 unary: neg, abs, square, sign', () => {
    const x = tensor([-3, -1, 0, 2, 5, -7], [2, 3], 'int32');
    const xv = vals(x);
    const cases: [(t: Tensor) => Tensor, (v: number) => number][] = [
      [neg, (v) => 0 - v], [abs, Math.abs], [square, (v) => v * v], [sign, (v) => (v > 0 ? 1 : v < 0 ? -1 : 0)],
    ];
    for (const [op, ref] of cases) {
      const y = op(x);
      assert.equal(y.dtype, 'int32');
      assert.deepEqual(vals(y), xv.map(ref));
    }
  });
});

// ---- elementwise binary with broadcasting ------------------------------------------------------------

const BINARY: { name: string; op: (a: Tensor, b: Tensor) => Tensor; ref: (a: number, b: number) => number; aLo?: number; bLo?: number }[] = [
  { name: 'add', op: add, ref: (a, b) => a + b },
  { name: 'sub', op: sub, ref: (a, b) => a - b },
  { name: 'mul', op: mul, ref: (a, b) => a * b },
  { name: 'div', op: div, ref: (a, b) => a / b, bLo: 0.2 },
  { name: 'pow', op: pow, ref: (a, b) => a ** b, aLo: 0.1 },
  { name: 'maximum', op: maximum, ref: (a, b) => (a > b ? a : b) },
  { name: 'minimum', op: minimum, ref: (a, b) => (a < b ? a : b) },
];

/** [a shape, b shape, expected result shape]. */
const BCAST: [Shape, Shape, Shape][] = [
  [[2, 3], [2, 3], [2, 3]],
  [[], [2, 3], [2, 3]],
  [[2, 3], [], [2, 3]],
  [[3, 1], [1, 4], [3, 4]],
  [[2, 1, 3], [4, 1], [2, 4, 3]],
  [[4], [2, 3, 4], [2, 3, 4]],
  [[2, 3, 4], [3, 1], [2, 3, 4]],
  [[1, 1], [1], [1, 1]],
  [[1], [3, 1, 2], [3, 1, 2]],
  [[2, 1, 1, 5], [3, 1, 5], [2, 3, 1, 5]],
  [[0, 3], [3], [0, 3]],
  [[2, 0, 3], [1, 3], [2, 0, 3]],
  [[0], [1], [0]],
];

/** Random values in ±[lo, 2] when lo > 0 (a sign flip for half), else in [-2, 2]. */
function operand(seed: number, shape: Shape, dtype: DType, lo?: number, positive = false): Tensor {
  if (lo === undefined) return ru(seed, shape, -2, 2, dtype);
  const m = vals(ru(seed, shape, lo, 2, 'float64'));
  return tensor(m.map((v, i) => (positive || i % 2 ? v : -v)), shape, dtype);
}

describe('binary with broadcasting', () => {
  for (const bop of BINARY) {
    for (const dtype of FLOATS) {
      test(`${bop.name} ${dtype}`, () => {
        BCAST.forEach(([as, bs, outShape], c) => {
          const a = operand(100 + c, as, dtype, bop.aLo, bop.name === 'pow');
          const b = operand(200 + c, bs, dtype, bop.bLo);
          const ref = refElementwise([{ v: vals(a), shape: as }, { v: vals(b), shape: bs }], bop.ref);
          assert.deepEqual(ref.shape, [...outShape]);
          check(bop.op(a, b), ref, dtype, `${bop.name} ${JSON.stringify(as)} x ${JSON.stringify(bs)}`);
        });
      });
    }
  }

  test('number operands are lifted to the tensor dtype', () => {
    const x = ru(5, [2, 3], 0.5, 2, 'float64');
    const xv = vals(x);
    check(add(x, 2), { v: xv.map((v) => v + 2), shape: [2, 3] }, 'float64', 'x + 2');
    check(sub(2, x), { v: xv.map((v) => 2 - v), shape: [2, 3] }, 'float64', '2 - x');
    check(div(1, x), { v: xv.map((v) => 1 / v), shape: [2, 3] }, 'float64', '1 / x');
    check(pow(x, 0.5), { v: xv.map((v) => v ** 0.5), shape: [2, 3] }, 'float64', 'x ** 0.5');
    check(pow(2, x), { v: xv.map((v) => 2 ** v), shape: [2, 3] }, 'float64', '2 ** x');
    check(maximum(x, 1), { v: xv.map((v) => (v > 1 ? v : 1)), shape: [2, 3] }, 'float64', 'maximum(x, 1)');
    const f = ru(5, [3], 0.5, 2, 'float32');
    check(mul(f, 0.1), { v: vals(f).map((v) => Math.fround(0.1) * v), shape: [3] }, 'float32', 'f32 x 0.1');
  });

  test('int32: add, sub, mul (wrapping), maximum, minimum', () => {
    const a = tensor([3, -4, 7, 2147483647, -2, 65536], [2, 3], 'int32');
    const b = tensor([5, -6, 65536], [3], 'int32');
    const av = vals(a);
    const bv = vals(b);
    const cases: [string, (x: Tensor, y: Tensor) => Tensor, (x: number, y: number) => number][] = [
      ['add', add, (x, y) => (x + y) | 0],
      ['sub', sub, (x, y) => (x - y) | 0],
      ['mul', mul, (x, y) => Math.imul(x, y)],
      ['maximum', maximum, (x, y) => Math.max(x, y)],
      ['minimum', minimum, (x, y) => Math.min(x, y)],
    ];
    for (const [name, op, ref] of cases) {
      const y = op(a, b);
      assert.equal(y.dtype, 'int32', name);
      const expected = refElementwise([{ v: av, shape: [2, 3] }, { v: bv, shape: [3] }], ref);
      assert.deepEqual(vals(y), expected.v, name);
    }
    assert.deepEqual(vals(mul(tensor([3, -4], [2], 'int32'), 3)), [9, -12]);
  });
});

// ---- comparisons and where -------------------------------------------------------------------------

describe('comparisons and where', () => {
  const CMP: [string, (a: Tensor, b: Tensor | number) => Tensor, (a: number, b: number) => boolean][] = [
    ['equal', equal, (a, b) => a === b],
    ['notEqual', notEqual, (a, b) => a !== b],
    ['less', less, (a, b) => a < b],
    ['lessEqual', lessEqual, (a, b) => a <= b],
    ['greater', greater, (a, b) => a > b],
    ['greaterEqual', greaterEqual, (a, b) => a >= b],
  ];
  for (const [name, op, pred] of CMP) {
    test(name, () => {
      for (const dtype of ['float32', 'float64', 'int32'] as DType[]) {
        // small integers so that ties occur
        const shapes: [Shape, Shape][] = [[[3, 1], [1, 4]], [[2, 1, 3], [4, 1]], [[], [5]], [[2, 3], [2, 3]], [[0, 2], [2]]];
        shapes.forEach(([as, bs], c) => {
          const a = tensor(vals(ru(300 + c, as, -2, 2, 'float64')).map(Math.round), as, dtype);
          const b = tensor(vals(ru(400 + c, bs, -2, 2, 'float64')).map(Math.round), bs, dtype);
          const ref = refElementwise([{ v: vals(a), shape: as }, { v: vals(b), shape: bs }], (x, y) => (pred(x, y) ? 1 : 0));
          const y = op(a, b);
          assert.equal(y.dtype, 'bool');
          assertShape(y, ref.shape, `${name} ${dtype}`);
          assert.deepEqual(vals(y), ref.v, `${name} ${dtype} ${JSON.stringify(as)} vs ${JSON.stringify(bs)}`);
        });
      }
      const x = tensor([0.5, 1, 1.5], [3], 'float64');
      assert.deepEqual(vals(op(x, 1)), [0.5, 1, 1.5].map((v) => (pred(v, 1) ? 1 : 0)), `${name} with a number`);
    });
  }

  test('addcmul a + b·c broadcasts all three operands (with the row-factor case: [B, r, k] + [B, r, k]·[B, 1, 1])', () => {
    const cases: [Shape, Shape, Shape][] = [
      [[3, 1], [1, 4], []],
      [[2, 1, 3], [4, 1], [3]],
      [[2, 3], [2, 3], [2, 3]],
      [[2, 5, 16], [2, 5, 16], [2, 1, 1]],
      [[1, 4, 8], [1, 4, 8], [1, 1, 1]],
      [[3, 2, 7], [3, 2, 7], [3, 1, 1]],
      [[2, 16], [2, 16], [2, 1]],
      [[0, 3], [3], [1]],
    ];
    cases.forEach(([as, bs, cs], c) => {
      for (const dtype of FLOATS) {
        const [a, b, cc] = [ru(610 + c, as, -2, 2, dtype), ru(620 + c, bs, -2, 2, dtype), ru(630 + c, cs, -2, 2, dtype)];
        const ref = refElementwise([{ v: vals(a), shape: as }, { v: vals(b), shape: bs }, { v: vals(cc), shape: cs }], (x, y, z) => x + y * z);
        check(addcmul(a, b, cc), ref, dtype, `addcmul ${JSON.stringify([as, bs, cs])}`);
      }
    });
  });

  test('where broadcasts all three operands', () => {
    const cases: [Shape, Shape, Shape][] = [
      [[3, 1], [1, 4], []],
      [[2, 1, 3], [4, 1], [3]],
      [[4], [2, 3, 1], [3, 4]],
      [[2, 3], [2, 3], [2, 3]],
      [[], [2, 2], [2, 1]],
      [[0, 3], [3], [1]],
    ];
    cases.forEach(([cs, as, bs], c) => {
      for (const dtype of FLOATS) {
        const cond = greater(ru(500 + c, cs, -1, 1, 'float64'), 0);
        const a = ru(600 + c, as, -2, 2, dtype);
        const b = ru(700 + c, bs, -2, 2, dtype);
        const ref = refElementwise(
          [{ v: vals(cond), shape: cs }, { v: vals(a), shape: as }, { v: vals(b), shape: bs }],
          (k, x, y) => (k ? x : y),
        );
        check(where(cond, a, b), ref, dtype, `where ${JSON.stringify([cs, as, bs])}`);
      }
    });
    const cond = tensor([1, 0, 1], [3], 'bool');
    const x = tensor([1, 2, 3], [3], 'float64');
    assert.deepEqual(vals(where(cond, x, 0)), [1, 0, 3]);
    assert.deepEqual(vals(addcmul(x, 2, tensor([1, 0, -1], [3], 'float64'))), [3, 2, 1], 'addcmul with a number');
    assert.deepEqual(vals(where(cond, -1, x)), [-1, 2, -1]);
    const n = where(cond, 1.5, 2);
    assert.equal(n.dtype, 'float32');
    assert.deepEqual(vals(n), [1.5, 2, 1.5]);
    assert.deepEqual(vals(where(cond, tensor([4, 5, 6], [3], 'int32'), tensor([-1], [1], 'int32'))), [4, -1, 6]);
  });
});

// ---- reductions -----------------------------------------------------------------------------------

const RED_AXES: (number | number[] | undefined)[] = [undefined, 0, 1, 3, -1, -2, [0, 2], [1, 3], [3, 0], [0, 1, 2, 3], [-1, -3], [], [1, -3], [0, 1, 3]];

describe('reductions', () => {
  const REDS: [string, (x: Tensor, ax: number | number[] | undefined, k: boolean) => Tensor, (v: number[]) => number][] = [
    ['sum', (x, ax, k) => sum(x, ax, k), fSum],
    ['sumSquares', (x, ax, k) => sumSquares(x, ax, k), (v) => fSum(v.map((e) => e * e))],
    ['mean', (x, ax, k) => mean(x, ax, k), fMean],
    ['max', (x, ax, k) => max(x, ax, k), fMax],
    ['min', (x, ax, k) => min(x, ax, k), fMin],
    // logsumexp's default axis is -1, so "all axes" is spelled out
    ['logsumexp', (x, ax, k) => logsumexp(x, ax ?? [0, 1, 2, 3], k), fLse],
  ];
  for (const [name, op, fold] of REDS) {
    for (const dtype of FLOATS) {
      test(`${name} ${dtype}`, () => {
        const shape = [2, 3, 4, 5];
        const x = rn(800, shape, dtype);
        const xv = vals(x);
        for (const axes of RED_AXES) {
          for (const keepdims of [false, true]) {
            const ref = refReduce(xv, shape, axes, keepdims, fold);
            check(op(x, axes, keepdims), ref, dtype, `${name} axes ${JSON.stringify(axes)} keepdims ${keepdims}`);
          }
        }
      });
    }
  }

  test('logsumexp defaults to the last axis and is stable for large inputs', () => {
    const x = tensor([1000, 1001, 999, -1000, -1001, -999], [2, 3], 'float64');
    const ref = refReduce(vals(x), [2, 3], -1, false, fLse);
    check(logsumexp(x), ref, 'float64', 'logsumexp large');
  });

  test('NaN propagates through max, min, maximum, minimum (as in NumPy)', () => {
    const x = tensor([1, NaN, 2, 3, 4, NaN, 0, 1, 2], [3, 3], 'float64');
    for (const [op, fold] of [[max, fMax], [min, fMin]] as const) {
      for (const axes of [0, 1, undefined] as (number | undefined)[]) {
        const nanFold = (v: number[]) => (v.some(Number.isNaN) ? NaN : fold(v));
        check(op(x, axes), refReduce(vals(x), [3, 3], axes, false, nanFold), 'float64', `NaN ${op.name} axes ${axes}`);
      }
    }
    const a = tensor([NaN, 1, 2], [3], 'float64');
    const b = tensor([1, NaN, 1], [3], 'float64');
    assertClose(maximum(a, b), [NaN, NaN, 2]);
    assertClose(minimum(a, b), [NaN, NaN, 1]);
  });

  test('sum over a size-0 axis is 0; reductions of scalars', () => {
    const z = zeros([2, 0, 3], 'float64');
    check(sum(z, 1), { v: [0, 0, 0, 0, 0, 0], shape: [2, 3] }, 'float64', 'sum over empty axis');
    check(sum(z), { v: [0], shape: [] }, 'float64', 'sum of empty');
    check(sum(z, 2), { v: [], shape: [2, 0] }, 'float64', 'sum of empty keeping the empty axis');
    check(sumSquares(z, 1), { v: [0, 0, 0, 0, 0, 0], shape: [2, 3] }, 'float64', 'sumSquares over empty axis');
    const s = tensor(2.5, [], 'float64');
    check(sum(s), { v: [2.5], shape: [] }, 'float64', 'sum scalar');
    check(max(s), { v: [2.5], shape: [] }, 'float64', 'max scalar');
  });

  test('over axes of size 1: a view of the input (no backend pass), the same values and gradient; sumSquares still squares', () => {
    const shape = [1, 3, 1, 4];
    const x = rn(801, shape, 'float64');
    const xv = vals(x);
    for (const [name, op, fold] of REDS.filter(([n]) => ['sum', 'mean', 'max', 'min'].includes(n))) {
      for (const axes of [0, 2, [0, 2]] as (number | number[])[]) {
        for (const keepdims of [false, true]) {
          const { result: y, calls } = countingCalls('reduce', () => op(x, axes, keepdims));
          assert.equal(calls, 0, `${name} over ${JSON.stringify(axes)}: no reduction kernel`);
          check(y, refReduce(xv, shape, axes, keepdims, fold), 'float64', `${name} axes ${JSON.stringify(axes)} keepdims ${keepdims}`);
          const w = rn(802, y.shape, 'float64');
          const g = grad((a: Tensor) => sum(mul(op(a, axes, keepdims), w)))(x) as Tensor;
          assert.deepEqual(vals(g), vals(w), `${name}: the gradient is the cotangent, reshaped`);
          y.dispose();
          assert.deepEqual(vals(x), xv, 'disposing the view leaves the input');
        }
      }
    }
    const { calls } = countingCalls('reduce', () => sumSquares(x, 0));
    assert.equal(calls, 1);
    check(sumSquares(x, [0, 2]), refReduce(xv, shape, [0, 2], false, (v) => fSum(v.map((e) => e * e))), 'float64', 'sumSquares over size-1 axes');
  });

  test('int32 sum, max, min, sumSquares', () => {
    const x = tensor([3, -1, 4, 1, -5, 9, 2, -6, 5, 3, 5, -8], [3, 4], 'int32');
    const xv = vals(x);
    for (const axes of [undefined, 0, 1, [0, 1]] as (number | number[] | undefined)[]) {
      for (const [op, fold] of [[sum, fSum], [max, fMax], [min, fMin], [sumSquares, (v: number[]) => fSum(v.map((e) => e * e))]] as const) {
        const y = op(x, axes);
        assert.equal(y.dtype, 'int32');
        const ref = refReduce(xv, [3, 4], axes, false, fold);
        assertShape(y, ref.shape);
        assert.deepEqual(vals(y), ref.v);
      }
    }
  });
});

describe('softmax, logSoftmax, cumsum', () => {
  for (const dtype of FLOATS) {
    test(`softmax and logSoftmax over each axis (${dtype})`, () => {
      const shape = [2, 3, 4];
      const x = rn(900, shape, dtype);
      const xv = vals(x).map((v) => v * 3);
      const x3 = tensor(xv, shape, dtype);
      for (const axis of [0, 1, 2, -1, -2]) {
        check(softmax(x3, axis), { v: refAlongAxis(vals(x3), shape, axis, lineSoftmax), shape }, dtype, `softmax axis ${axis}`);
        check(logSoftmax(x3, axis), { v: refAlongAxis(vals(x3), shape, axis, lineLogSoftmax), shape }, dtype, `logSoftmax axis ${axis}`,
          dtype === 'float32' ? { rtol: 1e-6, atol: 1e-6 } : undefined);
      }
      // default axis is the last; large magnitudes must not overflow
      const big = tensor([1000, 0, -1000, 500, 501, 502], [2, 3], dtype);
      check(softmax(big), { v: refAlongAxis(vals(big), [2, 3], -1, lineSoftmax), shape: [2, 3] }, dtype, 'softmax large', { rtol: 1e-6, atol: 1e-300 });
      // x - logsumexp(x) cancels: in float32 the error is a few ulps of |x| ~ 500 (ulp 3e-5)
      check(logSoftmax(big), { v: refAlongAxis(vals(big), [2, 3], -1, lineLogSoftmax), shape: [2, 3] }, dtype, 'logSoftmax large',
        dtype === 'float32' ? { rtol: 1e-6, atol: 1e-4 } : { rtol: 1e-12, atol: 1e-12 });
    });

    test(`cumsum forward and reverse over each axis (${dtype})`, () => {
      const shape = [3, 4, 2];
      const x = rn(950, shape, dtype);
      for (const axis of [0, 1, 2, -1, -3]) {
        for (const reverse of [false, true]) {
          const ref = refAlongAxis(vals(x), shape, axis, lineCumsum(reverse)).map(roundTo(dtype));
          check(cumsum(x, axis, reverse), { v: ref, shape }, dtype, `cumsum axis ${axis} reverse ${reverse}`);
        }
      }
    });
  }

  test('cumsum on int32', () => {
    const x = tensor([1, 2, 3, 4, 5, 6, -7, 8, 9, 10, 11, 12], [3, 4], 'int32');
    for (const axis of [0, 1]) {
      for (const reverse of [false, true]) {
        const y = cumsum(x, axis, reverse);
        assert.equal(y.dtype, 'int32');
        assert.deepEqual(vals(y), refAlongAxis(vals(x), [3, 4], axis, lineCumsum(reverse)), `axis ${axis} reverse ${reverse}`);
      }
    }
  });
});

// ---- matmul ------------------------------------------------------------------------------------------

describe('matmul', () => {
  /** [stored a shape (no transpose), b shape (no transpose)] in the logical m×k, k×n form. */
  const CASES: [Shape, Shape][] = [
    [[3, 4], [4, 5]],
    [[2, 1, 3, 4], [5, 4, 6]],
    [[2, 3, 4], [4, 5]],
    [[3, 4], [2, 4, 5]],
    [[1, 3, 4], [2, 4, 2]],
    [[2, 2, 1, 3], [2, 1, 3, 4]],
    [[1, 7], [7, 1]],
    [[5, 1], [1, 3]],
    [[2, 3, 0], [0, 4]],
    [[0, 4], [4, 3]],
  ];
  const storedShape = (s: Shape, trans: boolean) => (trans ? [...s.slice(0, -2), s[s.length - 1], s[s.length - 2]] : [...s]);
  for (const dtype of FLOATS) {
    test(`all transpose flags with broadcast batch dims (${dtype})`, () => {
      CASES.forEach(([al, bl], c) => {
        for (const transA of [false, true]) {
          for (const transB of [false, true]) {
            const as = storedShape(al, transA);
            const bs = storedShape(bl, transB);
            const a = rn(1000 + c, as, dtype);
            const b = rn(1100 + c, bs, dtype);
            const ref = refMatmul(vals(a), as, vals(b), bs, transA, transB);
            check(matmul(a, b, { transA, transB }), ref, dtype, `matmul ${JSON.stringify(as)}${transA ? 'ᵀ' : ''} @ ${JSON.stringify(bs)}${transB ? 'ᵀ' : ''}`,
              dtype === 'float32' ? { rtol: 1e-5, atol: 1e-5 } : { rtol: 1e-12, atol: 1e-12 });
          }
        }
      });
    });
  }

  test('a larger product (exercises the blocked kernels)', () => {
    for (const dtype of FLOATS) {
      const a = rn(1200, [2, 37, 65], dtype);
      const b = rn(1201, [65, 29], dtype);
      const ref = refMatmul(vals(a), [2, 37, 65], vals(b), [65, 29], false, false);
      check(matmul(a, b), ref, dtype, 'matmul 37x65x29', dtype === 'float32' ? { rtol: 1e-5, atol: 2e-5 } : { rtol: 1e-12, atol: 1e-12 });
      const refT = refMatmul(vals(b), [65, 29], vals(a), [2, 37, 65], true, true);
      check(matmul(b, a, { transA: true, transB: true }), refT, dtype, 'matmul bᵀ aᵀ', dtype === 'float32' ? { rtol: 1e-5, atol: 2e-5 } : { rtol: 1e-12, atol: 1e-12 });
    }
  });
});

// ---- shape ops ------------------------------------------------------------------------------------------

describe('shape ops', () => {
  const shape = [2, 3, 4];
  const x = rn(1300, shape, 'float64');
  const xv = vals(x);

  test('reshape (with -1), expandDims, squeeze', () => {
    for (const [target, expected] of [
      [[4, -1], [4, 6]], [[-1], [24]], [[2, 12], [2, 12]], [[3, -1, 2], [3, 4, 2]], [[1, 24, 1], [1, 24, 1]], [[2, 3, 4], [2, 3, 4]],
    ] as [number[], number[]][]) {
      const y = reshape(x, target);
      assertShape(y, expected, `reshape to ${JSON.stringify(target)}`);
      assert.deepEqual(vals(y), xv);
    }
    assertShape(reshape(tensor([5], [1], 'float64'), []), []);
    assertShape(reshape(tensor(5, [], 'float64'), [1, 1]), [1, 1]);
    assertShape(reshape(zeros([0, 3]), [-1, 3]), [0, 3]);
    assertShape(reshape(zeros([0, 3]), [3, 0, 2]), [3, 0, 2]);
    for (const [axis, expected] of [[0, [1, 2, 3, 4]], [1, [2, 1, 3, 4]], [3, [2, 3, 4, 1]], [-1, [2, 3, 4, 1]], [-2, [2, 3, 1, 4]]] as [number, number[]][]) {
      const y = expandDims(x, axis);
      assertShape(y, expected, `expandDims ${axis}`);
      assert.deepEqual(vals(y), xv);
    }
    const w = reshape(x, [1, 2, 1, 3, 4, 1]);
    assertShape(squeeze(w), [2, 3, 4]);
    assertShape(squeeze(w, 0), [2, 1, 3, 4, 1]);
    assertShape(squeeze(w, [2, -1]), [1, 2, 3, 4]);
    assert.deepEqual(vals(squeeze(w, [0, 2])), xv);
  });

  test('transpose (several perms) and mT', () => {
    for (const perm of [[0, 1, 2], [1, 0, 2], [2, 0, 1], [0, 2, 1], [2, 1, 0], [1, 2, 0]]) {
      check(transpose(x, perm), refTranspose(xv, shape, perm), 'float64', `transpose ${perm}`);
    }
    check(transpose(x), refTranspose(xv, shape, [2, 1, 0]), 'float64', 'transpose default');
    const x4 = rn(1301, [2, 3, 1, 4], 'float32');
    check(transpose(x4, [3, 1, 0, 2]), refTranspose(vals(x4), [2, 3, 1, 4], [3, 1, 0, 2]), 'float32', 'transpose 4d');
    check(mT(x), refTranspose(xv, shape, [0, 2, 1]), 'float64', 'mT 3d');
    const m = rn(1302, [3, 5], 'float64');
    check(mT(m), refTranspose(vals(m), [3, 5], [1, 0]), 'float64', 'mT 2d');
    const i = tensor([1, 2, 3, 4, 5, 6], [2, 3], 'int32');
    assert.deepEqual(vals(transpose(i)), [1, 4, 2, 5, 3, 6]);
    // moving only size-1 axes keeps the memory order: the result shares x's storage (no copy)
    const step = rn(1303, [2, 1, 3, 4], 'float64');
    const moved = transpose(step, [0, 2, 1, 3]);
    check(moved, refTranspose(vals(step), [2, 1, 3, 4], [0, 2, 1, 3]), 'float64', 'transpose of a size-1 axis');
    assert.equal(moved.storage, step.storage, 'a size-1 axis moved: an alias of the same storage');
    assert.notEqual(transpose(step, [2, 1, 0, 3]).storage, step.storage, 'a real permutation copies');
  });

  test('broadcastTo', () => {
    for (const [from, to] of [[[3, 1], [2, 3, 4]], [[], [2, 2]], [[4], [3, 4]], [[1, 3, 1], [2, 3, 5]], [[2, 3], [2, 3]], [[1], [0]]] as [number[], number[]][]) {
      const t = rn(1310, from, 'float64');
      const tv = vals(t);
      const ref: number[] = [];
      forEachIndex(to, (idx) => ref.push(readBroadcast(tv, from, idx)));
      check(broadcastTo(t, to), { v: ref, shape: to }, 'float64', `broadcastTo ${JSON.stringify(from)} to ${JSON.stringify(to)}`);
    }
  });

  /** Reference slice: begin/end already normalised. */
  function refSlice(v: number[], s: Shape, lo: number[], hi: number[]): Ref {
    const out = lo.map((b, i) => hi[i] - b);
    const r: number[] = [];
    forEachIndex(out, (idx) => r.push(v[ravel(idx.map((j, i) => j + lo[i]), s)]));
    return { v: r, shape: out };
  }

  test('slice: partial, negative bounds, missing axes, empty', () => {
    const s = [4, 5, 6];
    const t = rn(1320, s, 'float64');
    const tv = vals(t);
    const cases: [number[], (number | undefined)[] | undefined, number[], number[]][] = [
      [[1, -3], [3, -1], [1, 2, 0], [3, 4, 6]],
      [[0, 0, 2], [undefined, 5, 6], [0, 0, 2], [4, 5, 6]],
      [[-2], undefined, [2, 0, 0], [4, 5, 6]],
      [[1, 1, 1], [2, 2, 2], [1, 1, 1], [2, 2, 2]],
      [[2, 3], [2, 5], [2, 3, 0], [2, 5, 6]],
      [[0, 0, -6], [4, 5, -1], [0, 0, 0], [4, 5, 5]],
      [[], undefined, [0, 0, 0], [4, 5, 6]],
    ];
    for (const [begin, end, lo, hi] of cases) {
      check(slice(t, begin, end), refSlice(tv, s, lo, hi), 'float64', `slice ${JSON.stringify(begin)} ${JSON.stringify(end)}`);
    }
  });

  test('pad', () => {
    const cases: [Shape, [number, number][], number][] = [
      [[2, 3], [[1, 0], [2, 1]], 0],
      [[2, 3], [[0, 2], [0, 0]], -1.5],
      [[2, 1, 3], [[1, 1], [0, 2], [3, 0]], 7],
      [[0, 2], [[1, 1], [1, 0]], 2],
    ];
    for (const [s, widths, value] of cases) {
      const t = rn(1330, s, 'float64');
      const tv = vals(t);
      const out = s.map((d, i) => d + widths[i][0] + widths[i][1]);
      const ref: number[] = [];
      forEachIndex(out, (idx) => {
        const src = idx.map((j, i) => j - widths[i][0]);
        ref.push(src.every((j, i) => j >= 0 && j < s[i]) ? tv[ravel(src, s)] : value);
      });
      check(pad(t, widths, value), { v: ref, shape: out }, 'float64', `pad ${JSON.stringify(widths)}`);
    }
  });

  test('concat of 3 tensors along each axis, and stack', () => {
    const base = [2, 3, 4];
    for (const axis of [0, 1, 2, -1]) {
      const a = axis < 0 ? axis + 3 : axis;
      const sizes = [1, 3, 2];
      const parts = sizes.map((n, p) => rn(1340 + p, base.map((d, i) => (i === a ? n : d)), 'float64'));
      const outShape = base.map((d, i) => (i === a ? 6 : d));
      const ref: number[] = [];
      forEachIndex(outShape, (idx) => {
        let j = idx[a];
        let p = 0;
        while (j >= sizes[p]) j -= sizes[p++];
        const src = idx.map((v, i) => (i === a ? j : v));
        ref.push(vals(parts[p])[ravel(src, parts[p].shape)]);
      });
      check(concat(parts, axis), { v: ref, shape: outShape }, 'float64', `concat axis ${axis}`);
    }
    const ints = concat([tensor([1, 2], [2], 'int32'), tensor([3], [1], 'int32'), tensor([], [0], 'int32')]);
    assert.equal(ints.dtype, 'int32');
    assert.deepEqual(vals(ints), [1, 2, 3]);
    const parts = [0, 1, 2].map((p) => rn(1350 + p, [2, 3], 'float64'));
    for (const axis of [0, 1, 2, -1]) {
      const a = axis < 0 ? axis + 3 : axis;
      const outShape = [2, 3];
      outShape.splice(a, 0, 3);
      const ref: number[] = [];
      forEachIndex(outShape, (idx) => {
        const p = idx[a];
        ref.push(vals(parts[p])[ravel(idx.filter((_, i) => i !== a), [2, 3])]);
      });
      check(stack(parts, axis), { v: ref, shape: outShape }, 'float64', `stack axis ${axis}`);
    }
  });
});

// ---- gather / scatter ------------------------------------------------------------------------------

describe('gather, scatterAdd, takeAlongAxis', () => {
  const xs = [3, 4, 5];
  const x = rn(1400, xs, 'float64');
  const xv = vals(x);

  test('gather along each axis with a multi-dim index tensor (repeats included)', () => {
    for (const axis of [0, 1, 2, -1]) {
      const n = xs[axis < 0 ? axis + 3 : axis];
      const iv = [0, n - 1, 1, 0, n - 1, 2 % n];
      const ind = tensor(iv, [2, 3], 'int32');
      check(gather(x, ind, axis), refGather(xv, xs, iv, [2, 3], axis), 'float64', `gather axis ${axis}`);
    }
    // 1-d index (embedding lookup), a scalar index, an empty index
    const emb = gather(x, tensor([2, 0, 2], [3], 'int32'));
    check(emb, refGather(xv, xs, [2, 0, 2], [3], 0), 'float64', 'gather rows');
    check(gather(x, tensor([3], [], 'int32'), 1), refGather(xv, xs, [3], [], 1), 'float64', 'gather scalar index');
    check(gather(x, tensor([], [0], 'int32'), 2), refGather(xv, xs, [], [0], 2), 'float64', 'gather empty index');
    const f32 = rn(1401, [4, 3], 'float32');
    check(gather(f32, tensor([3, 3, 1], [3], 'int32')), refGather(vals(f32), [4, 3], [3, 3, 1], [3], 0), 'float32', 'gather f32');
  });

  test('scatterAdd along each axis with repeated indices', () => {
    for (const axis of [0, 1, 2, -1]) {
      const a = axis < 0 ? axis + 3 : axis;
      const n = xs[a];
      const iv = [1, 0, 1, n - 1, 1, 0];
      const is = [3, 2];
      const us = [...xs.slice(0, a), ...is, ...xs.slice(a + 1)];
      const upd = rn(1410 + a, us, 'float64');
      const ref = refScatterAdd(xv, xs, iv, is, vals(upd), axis);
      check(scatterAdd(x, tensor(iv, is, 'int32'), upd, axis), { v: ref, shape: xs }, 'float64', `scatterAdd axis ${axis}`);
    }
    // all updates into one row
    const base = zeros([3, 2], 'float64');
    const y = scatterAdd(base, tensor([1, 1, 1, 1], [4], 'int32'), tensor([1, 2, 3, 4, 5, 6, 7, 8], [4, 2], 'float64'));
    assert.deepEqual(vals(y), [0, 0, 16, 20, 0, 0]);
    assert.deepEqual(vals(base), [0, 0, 0, 0, 0, 0], 'scatterAdd must not modify its base');
  });

  test('takeAlongAxis along each axis', () => {
    for (const axis of [0, 1, 2, -1, -3]) {
      const a = axis < 0 ? axis + 3 : axis;
      const n = xs[a];
      const m = 2 + a;
      const is = xs.map((d, i) => (i === a ? m : d));
      const iv = vals(ru(1420 + a, is, 0, n, 'float64')).map(Math.floor);
      const ind = tensor(iv, is, 'int32');
      const ref: number[] = [];
      forEachIndex(is, (idx, flat) => ref.push(xv[ravel(idx.map((j, i) => (i === a ? iv[flat] : j)), xs)]));
      check(takeAlongAxis(x, ind, axis), { v: ref, shape: is }, 'float64', `takeAlongAxis axis ${axis}`);
    }
  });
});

// ---- cast ----------------------------------------------------------------------------------------------

describe('cast', () => {
  test('between float32, float64, int32 and bool', () => {
    const raw = [-2.7, -1.5, -0.4, 0, 0.3, 1.5, 2.9, 1e-9, 123456.789, -0];
    const f64 = tensor(raw, [2, 5], 'float64');
    const f32 = cast(f64, 'float32');
    assert.equal(f32.dtype, 'float32');
    assertShape(f32, [2, 5]);
    assert.deepEqual(vals(f32), raw.map(Math.fround));
    const back = cast(f32, 'float64');
    assert.equal(back.dtype, 'float64');
    assert.deepEqual(vals(back), raw.map(Math.fround));
    assert.deepEqual(vals(cast(f64, 'int32')), raw.map((v) => Math.trunc(v) + 0));
    assert.deepEqual(vals(cast(f32, 'int32')), raw.map((v) => Math.trunc(Math.fround(v)) + 0));
    assert.deepEqual(vals(cast(f64, 'bool')), raw.map((v) => (v !== 0 ? 1 : 0)));
    const i = tensor([-3, 0, 5, 16777217], [4], 'int32');
    assert.deepEqual(vals(cast(i, 'float64')), [-3, 0, 5, 16777217]);
    assert.deepEqual(vals(cast(i, 'float32')), [-3, 0, 5, Math.fround(16777217)]);
    assert.deepEqual(vals(cast(i, 'bool')), [1, 0, 1, 1]);
    const b = tensor([1, 0, 1], [3], 'bool');
    for (const dt of ['float32', 'float64', 'int32'] as DType[]) {
      const c = cast(b, dt);
      assert.equal(c.dtype, dt);
      assert.deepEqual(vals(c), [1, 0, 1]);
    }
    assert.equal(cast(f64, 'float64'), f64, 'cast to the same dtype is the identity');
  });
});

// ---- PRNG ---------------------------------------------------------------------------------------------

describe('PRNG', () => {
  test('threefry2x32 known-answer vectors (Random123 / JAX)', () => {
    const hex = (p: [number, number]) => p.map((v) => '0x' + (v >>> 0).toString(16).padStart(8, '0'));
    assert.deepEqual(hex(threefry2x32([0, 0], 0, 0)), ['0x6b200159', '0x99ba4efe']);
    assert.deepEqual(hex(threefry2x32([0xffffffff, 0xffffffff], 0xffffffff, 0xffffffff)), ['0x1cb996fc', '0xbb002be7']);
    assert.deepEqual(hex(threefry2x32([0x13198a2e, 0x03707344], 0x243f6a88, 0x85a308d3)), ['0xc4923a9c', '0x483df7a0']);
  });

  test('same key gives the same numbers; different keys and splits differ', () => {
    const k = randomKey(123);
    assert.deepEqual(vals(randn(k, [50], 'float64')), vals(randn(randomKey(123), [50], 'float64')));
    assert.deepEqual(vals(uniform(k, [50])), vals(uniform(k, [50])));
    const others = [randomKey(124), ...splitKey(k, 3), foldIn(k, 'a'), foldIn(k, 'b'), foldIn(k, 1)];
    const seqs = [k, ...others].map((key) => vals(randn(key, [16], 'float64')).join(','));
    assert.equal(new Set(seqs).size, seqs.length, 'every key should give its own sequence');
    const [s0, s1] = splitKey(k);
    assert.notDeepEqual([...s0], [...s1]);
    assert.deepEqual(splitKey(k, 4).slice(0, 2), splitKey(k, 2), 'splitting is deterministic');
    // float32 draws are the float64 draws rounded
    assert.deepEqual(vals(randn(k, [20], 'float32')), vals(randn(k, [20], 'float64')).map(Math.fround));
    // a prefix of a longer draw need not match, but the shape must not change the values of the same size
    assert.deepEqual(vals(randn(k, [4, 5], 'float64')), vals(randn(k, [20], 'float64')));
  });

  test('the fast host generators equal their definitions word for word', () => {
    for (const seed of [0, 1, 99, 2 ** 40 + 7]) {
      const key = foldIn(randomKey(seed), 'w');
      // uniformHost: pair (i, i+1) is threefry2x32(key, i, 0x5eed) / 2^32
      const n = 8195;
      const u = uniformHost(key, n);
      for (let i = 0; i < n; i++) {
        const pair = threefry2x32(key, i - (i % 2), 0x5eed);
        assert.equal(u[i], pair[i % 2] / 2 ** 32, `uniform ${seed} ${i}`);
      }
      // normalHost: Box-Muller on those pairs
      const z = normalHost(key, 7);
      for (let i = 0; i < 6; i += 2) {
        const r = Math.sqrt(-2 * Math.log(1 - u[i]));
        assert.equal(z[i], r * Math.cos(2 * Math.PI * u[i + 1]));
        assert.equal(z[i + 1], r * Math.sin(2 * Math.PI * u[i + 1]));
      }
      // truncatedNormal (lazily generated): the first accepted values of round 0's whole draw
      const m = 20000;
      const whole = normalHost(foldIn(key, 0), 2 * m);
      const want: number[] = [];
      for (let i = 0; i < whole.length && want.length < m; i++) if (Math.abs(whole[i]) <= 2) want.push(whole[i] * 0.5);
      assert.deepEqual(vals(truncatedNormal(key, [m], 0.5, 'float64')), want);
    }
  });

  test('randn has mean ~0 and std ~1; uniform stays in range', () => {
    const n = 100000;
    const z = vals(randn(keyOf(77), [n], 'float64'));
    const m = fSum(z) / n;
    const sd = Math.sqrt(z.reduce((s, v) => s + (v - m) ** 2, 0) / n);
    assert.ok(Math.abs(m) < 0.015, `randn mean ${m}`);
    assert.ok(Math.abs(sd - 1) < 0.015, `randn std ${sd}`);
    const within1 = z.filter((v) => Math.abs(v) < 1).length / n;
    assert.ok(Math.abs(within1 - 0.6827) < 0.01, `randn P(|z|<1) = ${within1}`);
    const u = vals(uniform(keyOf(78), [n], { min: -2, max: 3, dtype: 'float64' }));
    assert.ok(u.every((v) => v >= -2 && v < 3), 'uniform out of [-2, 3)');
    const um = fSum(u) / n;
    assert.ok(Math.abs(um - 0.5) < 0.03, `uniform mean ${um}`);
    const uv = u.reduce((s, v) => s + (v - um) ** 2, 0) / n;
    assert.ok(Math.abs(uv - 25 / 12) < 0.05, `uniform variance ${uv}`);
    const below = u.filter((v) => v < 0.5).length / n;
    assert.ok(Math.abs(below - 0.5) < 0.01, `uniform median split ${below}`);
    const u01 = vals(uniform(keyOf(79), [1000]));
    assert.ok(u01.every((v) => v >= 0 && v < 1));
  });
});
