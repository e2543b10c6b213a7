/**
 * The op set. Each op is defined once: shape/dtype rule, forward through the backend, and its
 * backward written in these same ops (so every backward can be differentiated again).
 */
import type { Backend, BinaryOp, CompareOp, ReduceOp, UnaryOp } from './backend.js';
import { type DType, hostArray, isFloat } from './dtype.js';
import {
  type Shape, broadcastShapes, broadcastStrides, fmt, normAxes, normAxis, shapesEqual, sizeOf, stridesOf,
} from './shape.js';
import { alias, backendKey, fromData, getBackend, isTracked, record, traceDepth } from './runtime.js';
import { TensorCache } from './cache.js';
import { Tensor, closeScope, openScope } from './tensor.js';

export type TensorLike = Tensor | number;

// ---- checks ------------------------------------------------------------------------------

function sameBackend(op: string, ts: Tensor[]): void {
  for (const t of ts) {
    if (t.backend !== ts[0].backend) {
      throw new Error(`${op}: tensors live on different backends (${ts.map((x) => x.backend.name).join(', ')})`);
    }
  }
}

function sameDType(op: string, ts: Tensor[]): DType {
  for (const t of ts) {
    if (t.dtype !== ts[0].dtype) {
      throw new Error(`${op}: dtype mismatch (${ts.map((x) => `${x.dtype}${fmt(x.shape)}`).join(' vs ')})`);
    }
  }
  return ts[0].dtype;
}

function requireFloat(op: string, t: Tensor): void {
  if (!isFloat(t.dtype)) throw new Error(`${op}: needs a floating-point tensor, got ${t.dtype}${fmt(t.shape)}`);
}

function lift(x: TensorLike, like: Tensor): Tensor {
  return x instanceof Tensor ? x : full([], x, like.dtype, like);
}

// ---- creation ----------------------------------------------------------------------------

function checkShape(op: string, shape: Shape): void {
  for (const d of shape) {
    if (!Number.isInteger(d) || d < 0) throw new Error(`${op}: invalid shape ${fmt(shape)}`);
  }
}

/** A tensor from flat row-major values (or a nested number array when `shape` is omitted). */
export function tensor(values: ArrayLike<number> | number | number[][] | number[][][], shape?: Shape, dtype: DType = 'float32'): Tensor {
  let flat: ArrayLike<number>;
  let inferred: number[];
  if (typeof values === 'number') {
    flat = [values];
    inferred = [];
  } else if (Array.isArray(values) && Array.isArray(values[0])) {
    inferred = [];
    let v: unknown = values;
    while (Array.isArray(v)) {
      inferred.push(v.length);
      v = v[0];
    }
    const ragged = (u: unknown, d: number): boolean =>
      d === inferred.length ? Array.isArray(u) : !Array.isArray(u) || u.length !== inferred[d] || u.some((w) => ragged(w, d + 1));
    if (ragged(values, 0)) throw new Error(`tensor: ragged nested arrays (the first entries give shape ${fmt(inferred)})`);
    flat = (values as unknown[]).flat(Infinity) as number[];
  } else {
    flat = values as ArrayLike<number>;
    inferred = [flat.length];
  }
  const s = shape ?? inferred;
  checkShape('tensor', s);
  if (sizeOf(s) !== flat.length) throw new Error(`tensor: ${flat.length} values do not fill shape ${fmt(s)}`);
  const host = hostArray(dtype, flat.length);
  for (let i = 0; i < flat.length; i++) host[i] = flat[i];
  const backend = getBackend();
  return fromData(backend.upload(host, dtype), s, dtype, backend);
}

export function full(shape: Shape, value: number, dtype: DType = 'float32', like?: Tensor): Tensor {
  checkShape('full', shape);
  const backend = like?.backend ?? getBackend();
  if (shape.length === 0) return scalarConstant(backend, value, dtype);
  return fromData(backend.fill(sizeOf(shape), dtype, value), shape, dtype, backend);
}

/**
 * Scalars (the JS numbers of `add(x, 1e-6)`, `mul(g, lr)`, ...) come from a small per-backend cache:
 * on a GPU each fresh one costs a fill launch, and a TTT-E2E step makes thousands.
 */
const scalarCache = new TensorCache(1024);

function scalarConstant(backend: Backend, value: number, dtype: DType): Tensor {
  const key = `${backendKey(backend)}/${dtype}/${Object.is(value, -0) ? '-0' : String(value)}`;
  return scalarCache.get(key, () => fromData(backend.fill(1, dtype, value), [], dtype, backend));
}

/** Frees the cached scalar constants (they are re-made on demand). */
export function clearScalarCache(): void {
  scalarCache.clear();
}

export const zeros = (shape: Shape, dtype: DType = 'float32'): Tensor => full(shape, 0, dtype);
export const ones = (shape: Shape, dtype: DType = 'float32'): Tensor => full(shape, 1, dtype);
export const zerosLike = (t: Tensor): Tensor => full(t.shape, 0, t.dtype, t);
export const onesLike = (t: Tensor): Tensor => full(t.shape, 1, t.dtype, t);
export const scalar = (value: number, dtype: DType = 'float32'): Tensor => full([], value, dtype);

/** [start, stop) with `step`, like numpy.arange. */
export function arange(start: number, stop?: number, step = 1, dtype: DType = 'int32'): Tensor {
  if (stop === undefined) [start, stop] = [0, start];
  if (step === 0) throw new Error('arange: step must be non-zero');
  const n = Math.max(0, Math.ceil((stop - start) / step));
  const host = hostArray(dtype, n);
  for (let i = 0; i < n; i++) host[i] = start + i * step;
  const backend = getBackend();
  return fromData(backend.upload(host, dtype), [n], dtype, backend);
}

// ---- elementwise unary ---------------------------------------------------------------------

type UnaryGrad = (g: Tensor, x: Tensor, y: Tensor) => Tensor | null;
const UNARY_GRADS: Record<UnaryOp, UnaryGrad> = {
  neg: (g) => neg(g),
  exp: (g, _x, y) => mul(g, y),
  log: (g, x) => div(g, x),
  sqrt: (g, _x, y) => div(mul(g, 0.5), y),
  rsqrt: (g, x, y) => mul(g, mul(div(y, x), -0.5)),
  tanh: (g, _x, y) => mul(g, sub(1, square(y))),
  sigmoid: (g, _x, y) => mul(g, mul(y, sub(1, y))),
  silu: (g, x) => {
    const s = sigmoid(x);
    return mul(g, mul(s, add(1, mul(x, sub(1, s)))));
  },
  square: (g, x) => mul(g, mul(x, 2)),
  abs: (g, x) => mul(g, sign(x)),
  cos: (g, x) => neg(mul(g, sin(x))),
  sin: (g, x) => mul(g, cos(x)),
  sign: () => null,
  reciprocal: (g, _x, y) => neg(mul(g, square(y))),
};
const INT_UNARY: ReadonlySet<UnaryOp> = new Set(['neg', 'abs', 'square', 'sign']);

function unary(op: UnaryOp, x: Tensor): Tensor {
  if (!INT_UNARY.has(op)) requireFloat(op, x);
  else if (x.dtype === 'bool') throw new Error(`${op}: not defined for bool tensors`);
  const y = fromData(x.backend.unary(op, x.data, x.size, x.dtype), x.shape, x.dtype, x.backend);
  record(op, [x], [y], ([g]) => [UNARY_GRADS[op](g!, x, y)]);
  return y;
}

export const neg = (x: Tensor): Tensor => unary('neg', x);
export const exp = (x: Tensor): Tensor => unary('exp', x);
/** NaN for x < 0 and -Infinity at 0, as in IEEE arithmetic. */
export const log = (x: Tensor): Tensor => unary('log', x);
/** NaN for x < 0. */
export const sqrt = (x: Tensor): Tensor => unary('sqrt', x);
/** Infinity at 0, NaN for x < 0. */
export const rsqrt = (x: Tensor): Tensor => unary('rsqrt', x);
export const tanh = (x: Tensor): Tensor => unary('tanh', x);
export const sigmoid = (x: Tensor): Tensor => unary('sigmoid', x);
export const silu = (x: Tensor): Tensor => unary('silu', x);
export const square = (x: Tensor): Tensor => unary('square', x);
export const abs = (x: Tensor): Tensor => unary('abs', x);
export const cos = (x: Tensor): Tensor => unary('cos', x);
export const sin = (x: Tensor): Tensor => unary('sin', x);
/** -1, 0 or 1; its gradient is zero. */
export const sign = (x: Tensor): Tensor => unary('sign', x);
export const reciprocal = (x: Tensor): Tensor => unary('reciprocal', x);

// ---- elementwise binary with broadcasting ---------------------------------------------------

/** Sum `g` down to `shape` (the inverse of broadcasting `shape` up to g's shape). */
export function sumToShape(g: Tensor, shape: Shape): Tensor {
  if (shapesEqual(g.shape, shape)) return g;
  const off = g.rank - shape.length;
  const axes: number[] = [];
  for (let i = 0; i < g.rank; i++) if (i < off || (shape[i - off] === 1 && g.shape[i] !== 1)) axes.push(i);
  return reshape(sum(g, axes, true), shape);
}

type BinaryGrad = (g: Tensor, a: Tensor, b: Tensor, y: Tensor, needs: boolean[]) => [Tensor | null, Tensor | null];
const BINARY_GRADS: Record<BinaryOp, BinaryGrad> = {
  add: (g) => [g, g],
  sub: (g, _a, _b, _y, n) => [g, n[1] ? neg(g) : null],
  mul: (g, a, b, _y, n) => [n[0] ? mul(g, b) : null, n[1] ? mul(g, a) : null],
  div: (g, _a, b, y, n) => [n[0] ? div(g, b) : null, n[1] ? neg(div(mul(g, y), b)) : null],
  pow: (g, a, b, y, n) => [n[0] ? mul(g, mul(b, pow(a, sub(b, 1)))) : null, n[1] ? mul(g, mul(log(a), y)) : null],
  maximum: (g, a, b, _y, n) => {
    const pick = greaterEqual(a, b);
    return [n[0] ? where(pick, g, 0) : null, n[1] ? where(pick, 0, g) : null];
  },
  minimum: (g, a, b, _y, n) => {
    const pick = lessEqual(a, b);
    return [n[0] ? where(pick, g, 0) : null, n[1] ? where(pick, 0, g) : null];
  },
};
const INT_BINARY: ReadonlySet<BinaryOp> = new Set(['add', 'sub', 'mul', 'maximum', 'minimum']);

/**
 * dst += src in place (one shape; src of dst's dtype or, for floats, another float dtype, converted as a cast
 * would), for tensors no trace follows: the backward walk's running cotangents. Returns dst.
 */
export function addInto(dst: Tensor, src: Tensor): Tensor {
  sameBackend('addInto', [dst, src]);
  if (dst.dtype !== src.dtype && !(isFloat(dst.dtype) && isFloat(src.dtype))) sameDType('addInto', [dst, src]);
  if (!shapesEqual(dst.shape, src.shape)) throw new Error(`addInto: shapes ${fmt(dst.shape)} and ${fmt(src.shape)} differ`);
  if (isTracked(dst) || isTracked(src)) throw new Error('addInto: a traced tensor cannot be added into in place');
  dst.backend.addInto(dst.data, src.data, dst.size, dst.dtype, src.dtype);
  return dst;
}

function binary(op: BinaryOp, xa: TensorLike, xb: TensorLike): Tensor {
  if (!(xa instanceof Tensor) && !(xb instanceof Tensor)) throw new Error(`${op}: needs at least one tensor`);
  const a = lift(xa, (xa instanceof Tensor ? xa : xb) as Tensor);
  const b = lift(xb, a);
  sameBackend(op, [a, b]);
  const dtype = sameDType(op, [a, b]);
  if (!INT_BINARY.has(op)) requireFloat(op, a);
  if (dtype === 'bool') throw new Error(`${op}: not defined for bool tensors`);
  const shape = broadcastShapes(op, a.shape, b.shape);
  const data = a.backend.binary(op, a.data, broadcastStrides(a.shape, shape), b.data, broadcastStrides(b.shape, shape), shape, dtype);
  const y = fromData(data, shape, dtype, a.backend);
  record(op, [a, b], [y], ([g], needs) => {
    const [ga, gb] = BINARY_GRADS[op](g!, a, b, y, needs);
    return [ga && needs[0] ? sumToShape(ga, a.shape) : null, gb && needs[1] ? sumToShape(gb, b.shape) : null];
  });
  return y;
}

export const add = (a: TensorLike, b: TensorLike): Tensor => binary('add', a, b);
export const sub = (a: TensorLike, b: TensorLike): Tensor => binary('sub', a, b);
export const mul = (a: TensorLike, b: TensorLike): Tensor => binary('mul', a, b);
/** x/0 is ±Infinity (NaN for 0/0), as in IEEE arithmetic. */
export const div = (a: TensorLike, b: TensorLike): Tensor => binary('div', a, b);
/** NaN for a negative base with a non-integer exponent; the exponent's gradient needs a > 0. */
export const pow = (a: TensorLike, b: TensorLike): Tensor => binary('pow', a, b);
/** Ties send the whole gradient to `a`. */
export const maximum = (a: TensorLike, b: TensorLike): Tensor => binary('maximum', a, b);
export const minimum = (a: TensorLike, b: TensorLike): Tensor => binary('minimum', a, b);

// ---- comparisons and where ---------------------------------------------------------------------

function compare(op: CompareOp, xa: TensorLike, xb: TensorLike): Tensor {
  const a = lift(xa, (xa instanceof Tensor ? xa : xb) as Tensor);
  const b = lift(xb, a);
  sameBackend(op, [a, b]);
  const dtype = sameDType(op, [a, b]);
  const shape = broadcastShapes(op, a.shape, b.shape);
  const data = a.backend.compare(op, a.data, broadcastStrides(a.shape, shape), b.data, broadcastStrides(b.shape, shape), shape, dtype);
  return fromData(data, shape, 'bool', a.backend);
}
export const equal = (a: TensorLike, b: TensorLike): Tensor => compare('eq', a, b);
export const notEqual = (a: TensorLike, b: TensorLike): Tensor => compare('ne', a, b);
export const less = (a: TensorLike, b: TensorLike): Tensor => compare('lt', a, b);
export const lessEqual = (a: TensorLike, b: TensorLike): Tensor => compare('le', a, b);
export const greater = (a: TensorLike, b: TensorLike): Tensor => compare('gt', a, b);
export const greaterEqual = (a: TensorLike, b: TensorLike): Tensor => compare('ge', a, b);

/** Elementwise `cond ? a : b` with broadcasting of all three. */
export function where(cond: Tensor, xa: TensorLike, xb: TensorLike): Tensor {
  if (cond.dtype !== 'bool') throw new Error(`where: condition must be bool, got ${cond.dtype}${fmt(cond.shape)}`);
  const ref = xa instanceof Tensor ? xa : xb instanceof Tensor ? xb : null;
  const a = ref ? lift(xa, ref) : full([], xa as number, 'float32', cond);
  const b = lift(xb, a);
  sameBackend('where', [cond, a, b]);
  const dtype = sameDType('where', [a, b]);
  const shape = broadcastShapes('where', broadcastShapes('where', cond.shape, a.shape), b.shape);
  const data = a.backend.where(
    cond.data, broadcastStrides(cond.shape, shape), a.data, broadcastStrides(a.shape, shape),
    b.data, broadcastStrides(b.shape, shape), shape, dtype,
  );
  const y = fromData(data, shape, dtype, a.backend);
  record('where', [a, b], [y], ([g], needs) => [
    needs[0] ? sumToShape(where(cond, g!, 0), a.shape) : null,
    needs[1] ? sumToShape(where(cond, 0, g!), b.shape) : null,
  ], [cond]);
  return y;
}

/**
 * a + b·c with NumPy broadcasting, as one op (one pass, one rounding): the TTT inner step's update
 * W − lr·clip·∇W with a factor per sequence, which as mul then sub wrote and read a fast-weight-sized temporary.
 */
export function addcmul(a: Tensor, b: TensorLike, c: TensorLike): Tensor {
  const bt = lift(b, a);
  const ct = lift(c, a);
  sameBackend('addcmul', [a, bt, ct]);
  const dtype = sameDType('addcmul', [a, bt, ct]);
  requireFloat('addcmul', a);
  const shape = broadcastShapes('addcmul', broadcastShapes('addcmul', a.shape, bt.shape), ct.shape);
  const data = a.backend.addcmul(
    a.data, broadcastStrides(a.shape, shape), bt.data, broadcastStrides(bt.shape, shape), ct.data, broadcastStrides(ct.shape, shape), shape, dtype,
  );
  const y = fromData(data, shape, dtype, a.backend);
  record('addcmul', [a, bt, ct], [y], ([g], needs) => [
    needs[0] ? sumToShape(g!, a.shape) : null,
    needs[1] ? sumToShape(mul(g!, ct), bt.shape) : null,
    needs[2] ? sumToShape(mul(g!, bt), ct.shape) : null,
  ]);
  return y;
}

// ---- reductions ------------------------------------------------------------------------------

/** Shape of a reduction with keepdims. */
function keptShape(shape: Shape, axes: number[]): number[] {
  return shape.map((d, i) => (axes.includes(i) ? 1 : d));
}

/**
 * Brings `axes` together as the middle of a contiguous [outer, n, inner] view, transposing first
 * when they are not already adjacent.
 */
function asOuterNInner(x: Tensor, axes: number[]): { t: Tensor; outer: number; n: number; inner: number } {
  const adjacent = axes.every((a, i) => i === 0 || a === axes[i - 1] + 1);
  let t = x;
  let ax = axes;
  if (!adjacent) {
    const rest = [...Array(x.rank).keys()].filter((i) => !axes.includes(i));
    t = transpose(x, [...rest, ...axes]);
    ax = axes.map((_, i) => rest.length + i);
  }
  const first = ax[0] ?? t.rank;
  const last = ax.length ? ax[ax.length - 1] : t.rank - 1;
  return {
    t,
    outer: sizeOf(t.shape.slice(0, first)),
    n: sizeOf(t.shape.slice(first, last + 1)),
    inner: sizeOf(t.shape.slice(last + 1)),
  };
}

function reduce(op: ReduceOp, x: Tensor, axisArg: number | readonly number[] | undefined, keepdims: boolean): Tensor {
  if (x.dtype === 'bool') throw new Error(`${op}: not defined for bool tensors (cast first)`);
  const axes = normAxes(op, axisArg, x.rank);
  const kept = keptShape(x.shape, axes);
  const outShape = keepdims ? kept : x.shape.filter((_, i) => !axes.includes(i));
  const additive = op === 'sum' || op === 'sumSquares';
  if (!additive && axes.some((a) => x.shape[a] === 0)) throw new Error(`${op}: cannot reduce over an empty axis of ${fmt(x.shape)}`);
  if (op !== 'sumSquares' && axes.every((a) => x.shape[a] === 1)) {
    // over axes of size 1 a reduction changes only the shape: a view, not a pass over the data (a matmul's
    // vjp sums its broadcast batch axis of 1 this way: the tied embedding's [V, D] gradient every mini-batch)
    const y = alias(x, outShape);
    record(op, [x], [y], ([g]) => [reshape(g!, x.shape)]);
    return y;
  }
  const { t, outer, n, inner } = asOuterNInner(x, axes);
  const y = fromData(x.backend.reduce(op, t.data, outer, n, inner, x.dtype), outShape, x.dtype, x.backend);
  record(op, [x], [y], ([g]) => {
    const gk = reshape(g!, kept);
    if (op === 'sum') return [broadcastTo(gk, x.shape)];
    if (op === 'sumSquares') return [mul(gk, mul(x, 2))];
    const hit = cast(equal(x, reshape(y, kept)), x.dtype);
    return [div(mul(hit, gk), sum(hit, axes, true))];
  });
  return y;
}

export const sum = (x: Tensor, axes?: number | readonly number[], keepdims = false): Tensor => reduce('sum', x, axes, keepdims);
/** Σ x² over `axes` in one pass (no x² tensor): the squared norms of the TTT inner step's gradient clip. */
export const sumSquares = (x: Tensor, axes?: number | readonly number[], keepdims = false): Tensor => reduce('sumSquares', x, axes, keepdims);
/** Ties share the gradient equally. */
export const max = (x: Tensor, axes?: number | readonly number[], keepdims = false): Tensor => reduce('max', x, axes, keepdims);
export const min = (x: Tensor, axes?: number | readonly number[], keepdims = false): Tensor => reduce('min', x, axes, keepdims);
export function mean(x: Tensor, axes?: number | readonly number[], keepdims = false): Tensor {
  requireFloat('mean', x);
  const count = sizeOf(normAxes('mean', axes, x.rank).map((a) => x.shape[a]));
  return div(sum(x, axes, keepdims), count);
}

/** Moves `axis` last and flattens the rest: the [outer, n] layout of the last-axis kernels. */
function lastAxisView(op: string, x: Tensor, axis: number): { t: Tensor; restore: (y: Tensor) => Tensor } {
  const a = normAxis(op, axis, x.rank);
  if (a === x.rank - 1) return { t: x, restore: (y) => y };
  const perm = [...Array(x.rank).keys()].filter((i) => i !== a).concat([a]);
  const inv = invertPerm(perm);
  return { t: transpose(x, perm), restore: (y) => transpose(y, inv) };
}

/** Numerically stable log(sum(exp(x))) over `axes`. */
export function logsumexp(x: Tensor, axes: number | readonly number[] = -1, keepdims = false): Tensor {
  requireFloat('logsumexp', x);
  const ax = normAxes('logsumexp', axes, x.rank);
  const kept = keptShape(x.shape, ax);
  const outShape = keepdims ? kept : x.shape.filter((_, i) => !ax.includes(i));
  const rest = [...Array(x.rank).keys()].filter((i) => !ax.includes(i));
  const isTail = ax.every((a, i) => a === rest.length + i);
  const t = isTail ? x : transpose(x, [...rest, ...ax]);
  const n = sizeOf(ax.map((a) => x.shape[a]));
  if (n === 0) throw new Error(`logsumexp: cannot reduce over an empty axis of ${fmt(x.shape)}`);
  const y = fromData(x.backend.logsumexp(t.data, x.size / n, n, x.dtype), outShape, x.dtype, x.backend);
  record('logsumexp', [x], [y], ([g]) => [mul(reshape(g!, kept), exp(sub(x, reshape(y, kept))))]);
  return y;
}

export function softmax(x: Tensor, axis = -1): Tensor {
  requireFloat('softmax', x);
  const { t, restore } = lastAxisView('softmax', x, axis);
  const n = t.shape[t.rank - 1];
  const yt = fromData(x.backend.softmax(t.data, n === 0 ? 0 : t.size / n, n, x.dtype), t.shape, x.dtype, x.backend);
  record('softmax', [t], [yt], ([g]) => [softmaxGrad(yt, g!)]);
  return restore(yt);
}

/** softmaxGrad's definition from differentiable ops: y ⊙ (g − Σ g ⊙ y) over the last axis. */
export function compositeSoftmaxGrad(y: Tensor, g: Tensor): Tensor {
  return mul(y, sub(g, sum(mul(g, y), -1, true)));
}

/**
 * The cotangent of softmax's input (last axis) from its output y and output cotangent g: y ⊙ (g − Σ g ⊙ y).
 * Where the backend has the kernels (`Backend.softmaxGradKernel`) it is one row pass, and in a second-order
 * trace one recorded op whose backward is one pass as well (dy = u ⊙ (g − s) − r·g, dg = softmaxGrad(y, u)
 * for the cotangent u, s = Σ y ⊙ g, r = Σ y ⊙ u): the composite attention's [heads, Tq, Tk] chain of
 * products, sums, broadcasts and their cotangents in the TTT outer step becomes two passes. A third-order
 * trace differentiates that backward written in ops.
 */
export function softmaxGrad(y: Tensor, g: Tensor): Tensor {
  const { backend, dtype } = y;
  if (!backend.softmaxGradKernel || !shapesEqual(y.shape, g.shape) || g.dtype !== dtype || y.rank === 0) return compositeSoftmaxGrad(y, g);
  const n = y.shape[y.rank - 1];
  const outer = n === 0 ? 0 : y.size / n;
  const dx = fromData(backend.softmaxBackward(y.data, g.data, outer, n, dtype), y.shape, dtype, backend);
  if (!isTracked(y) && !isTracked(g)) return dx;
  record('softmaxGrad', [y, g], [dx], ([u], needs) => {
    if (isTracked(y) || isTracked(g) || isTracked(u!)) {
      const dy = needs[0] ? sub(mul(u!, sub(g, sum(mul(y, g), -1, true))), mul(sum(mul(y, u!), -1, true), g)) : null;
      return [dy, needs[1] ? softmaxGrad(y, u!) : null];
    }
    const k = backend.softmaxGradBackward(y.data, g.data, u!.data, outer, n, dtype);
    return [k.dy, k.dg].map((data, i) => {
      if (needs[i]) return fromData(data, y.shape, dtype, backend);
      backend.free(data, dtype, y.size);
      return null;
    });
  });
  return dx;
}

/**
 * softmax(x + bias) over the last axis, with bias a constant (never differentiated) that broadcasts to x,
 * recorded as one op of x: a trace holds x and the probabilities, not a biased copy of x as well (the
 * composite attention's masked scores, [heads, Tq, Tk] per layer in a second-order trace). Same
 * values and the same backward as softmax(add(x, bias)).
 */
export function biasedSoftmax(x: Tensor, bias: Tensor): Tensor {
  requireFloat('biasedSoftmax', x);
  const n = x.shape[x.rank - 1];
  const lead = bias.shape.slice(0, bias.rank - 1);
  // a bias that repeats whole over x's rows (the attention band: [Tq, Tk] under [heads, Tq, Tk]) goes into the kernel
  const trailing = x.rank >= bias.rank && bias.rank >= 1 && bias.shape.every((d, i) => d === x.shape[x.rank - bias.rank + i]);
  if (trailing && n > 0 && bias.dtype === x.dtype && bias.backend === x.backend && sizeOf(lead) > 0 && !isTracked(bias)) {
    const p = fromData(x.backend.softmax(x.data, x.size / n, n, x.dtype, { data: bias.data, rows: sizeOf(lead) }), x.shape, x.dtype, x.backend);
    record('softmax', [x], [p], ([g]) => [softmaxGrad(p, g!)]);
    return p;
  }
  // the biased scores on an untracked alias of x, freed once the probabilities exist
  const xc = alias(x);
  const scope = openScope();
  let y: Tensor | undefined;
  try {
    y = softmax(add(xc, bias), -1);
  } finally {
    closeScope(scope, new Set(y ? [y] : []), traceDepth());
    xc.dispose();
  }
  if (!shapesEqual(y.shape, x.shape)) throw new Error(`biasedSoftmax: bias ${fmt(bias.shape)} does not broadcast to x ${fmt(x.shape)} without growing it`);
  const p = y; // (narrowed, for the closure)
  record('softmax', [x], [p], ([g]) => [softmaxGrad(p, g!)]);
  return p;
}

export function logSoftmax(x: Tensor, axis = -1): Tensor {
  return sub(x, logsumexp(x, axis, true));
}

/** Inclusive cumulative sum along `axis` (reverse: from the end). */
export function cumsum(x: Tensor, axis = -1, reverse = false): Tensor {
  if (x.dtype === 'bool') throw new Error('cumsum: not defined for bool tensors');
  const a = normAxis('cumsum', axis, x.rank);
  const outer = sizeOf(x.shape.slice(0, a));
  const inner = sizeOf(x.shape.slice(a + 1));
  const y = fromData(x.backend.cumsum(x.data, outer, x.shape[a], inner, reverse, x.dtype), x.shape, x.dtype, x.backend);
  record('cumsum', [x], [y], ([g]) => [cumsum(g!, a, !reverse)]);
  return y;
}

// ---- matmul ------------------------------------------------------------------------------------

export interface MatmulOptions {
  transA?: boolean;
  transB?: boolean;
  /**
   * The product's dtype: by default the compute dtype (see `matmul`); float32 from bfloat16 operands (the
   * GEMM accumulates in float32 either way, so this skips a rounding and a cast).
   */
  outDType?: DType;
  /**
   * Adds the product into this tensor in place (a GEMM with β = 1) and returns it: the backward's running
   * cotangent of a weight. It must have the product's shape and dtype, and no trace may follow it or the operands.
   */
  into?: Tensor;
}

/**
 * Mixed precision: a bfloat16 operand with a float32 one (float32 weights in a bfloat16 model) computes
 * in bfloat16. Any other pair of different dtypes is an error.
 */
function computeDType(a: Tensor, b: Tensor): DType {
  if (a.dtype === b.dtype) return a.dtype;
  const pair = new Set([a.dtype, b.dtype]);
  if (pair.has('bfloat16') && pair.has('float32')) return 'bfloat16';
  throw new Error(`matmul: dtype mismatch (${a.dtype}${fmt(a.shape)} vs ${b.dtype}${fmt(b.shape)}): only bfloat16 with float32 mixes`);
}

/**
 * x in dtype for a mixed matmul's GEMM and its backward. Where a trace follows x it is the recorded cast, so that
 * an outer trace can differentiate that backward through it; else a plain cast kernel.
 */
function lowered(x: Tensor, dtype: DType): Tensor {
  if (x.dtype === dtype) return x;
  return isTracked(x) ? cast(x, dtype) : fromData(x.backend.cast(x.data, x.size, x.dtype, dtype), x.shape, dtype, x.backend);
}

function batchOffsets(batchShape: number[], own: Shape, matSize: number): Int32Array {
  const strides = broadcastStrides(own, batchShape);
  const count = sizeOf(batchShape);
  const out = new Int32Array(count);
  const idx = new Array<number>(batchShape.length).fill(0);
  for (let i = 0; i < count; i++) {
    let off = 0;
    for (let d = 0; d < idx.length; d++) off += idx[d] * strides[d];
    out[i] = off * matSize;
    for (let d = idx.length - 1; d >= 0; d--) {
      if (++idx[d] < batchShape[d]) break;
      idx[d] = 0;
    }
  }
  return out;
}

/**
 * Batched matrix product op(a) @ op(b) over the last two axes, broadcasting the leading (batch)
 * axes. Transposes are flags to the kernel, never copies.
 */
export function matmul(a: Tensor, b: Tensor, opts: MatmulOptions = {}): Tensor {
  const transA = !!opts.transA;
  const transB = !!opts.transB;
  sameBackend('matmul', [a, b]);
  const dtype = computeDType(a, b);
  const outDType = opts.outDType ?? dtype;
  if (outDType !== dtype && !(dtype === 'bfloat16' && outDType === 'float32')) {
    throw new Error(`matmul: outDType ${outDType} from ${dtype} operands (only float32 from bfloat16)`);
  }
  requireFloat('matmul', a);
  if (a.rank < 2 || b.rank < 2) throw new Error(`matmul: operands need rank >= 2, got ${fmt(a.shape)} and ${fmt(b.shape)}`);
  const [ar, ac] = a.shape.slice(-2);
  const [br, bc] = b.shape.slice(-2);
  const [m, k] = transA ? [ac, ar] : [ar, ac];
  const [k2, n] = transB ? [bc, br] : [br, bc];
  if (k !== k2) {
    throw new Error(`matmul: inner dimensions differ: ${fmt(a.shape)}${transA ? 'ᵀ' : ''} @ ${fmt(b.shape)}${transB ? 'ᵀ' : ''} (${k} vs ${k2})`);
  }
  const batchShape = broadcastShapes('matmul', a.shape.slice(0, -2), b.shape.slice(0, -2));
  const job = {
    batch: sizeOf(batchShape), m, n, k, transA, transB,
    aOffsets: batchOffsets(batchShape, a.shape.slice(0, -2), ar * ac),
    bOffsets: batchOffsets(batchShape, b.shape.slice(0, -2), br * bc),
  };
  // a float32 operand of a bfloat16 product is cast for the GEMM; its gradient comes back in float32 from the GEMM itself
  const [al, bl] = [lowered(a, dtype), lowered(b, dtype)];
  const into = opts.into;
  if (into) {
    if (!shapesEqual(into.shape, [...batchShape, m, n]) || into.dtype !== outDType || into.backend !== a.backend) {
      throw new Error(`matmul: into is ${into.dtype}${fmt(into.shape)}, the product ${outDType}${fmt([...batchShape, m, n])}`);
    }
    if ([a, b, into].some(isTracked)) throw new Error('matmul: a product added into a tensor in place cannot be traced');
    a.backend.matmul(al.data, bl.data, job, dtype, outDType, into.data);
    for (const [l, x] of [[al, a], [bl, b]]) if (l !== x) l.dispose();
    return into;
  }
  const y = fromData(a.backend.matmul(al.data, bl.data, job, dtype, outDType), [...batchShape, m, n], outDType, a.backend);
  record('matmul', [a, b], [y], ([g], needs, acc) => {
    // an operand's running cotangent takes the GEMM's product in place where the product has as many elements (no
    // batch sum: at most axes of 1 more, as a [1, T, D] activation times a [V, D] weight), viewed in its shape
    const intoFor = (i: number, x: Tensor): Tensor | undefined => {
      const t = acc?.[i];
      return t && t.dtype === x.dtype && sizeOf(batchShape) === sizeOf(x.shape.slice(0, -2)) ? t : undefined;
    };
    const product = (i: number, x: Tensor, run: (into: Tensor | undefined) => Tensor): Tensor => {
      const t = intoFor(i, x);
      if (!t) return sumToShape(run(undefined), x.shape);
      const view = alias(t, [...batchShape, ...x.shape.slice(-2)]);
      run(view);
      view.dispose();
      return t;
    };
    let ga: Tensor | null = null;
    let gb: Tensor | null = null;
    if (needs[0]) {
      ga = product(0, a, (into) => {
        const o = { outDType: a.dtype, into };
        return transA ? matmul(bl, g!, { transA: transB, transB: true, ...o }) : matmul(g!, bl, { transB: !transB, ...o });
      });
    }
    if (needs[1]) {
      gb = product(1, b, (into) => {
        const o = { outDType: b.dtype, into };
        return transB ? matmul(g!, al, { transA: true, transB: transA, ...o }) : matmul(al, g!, { transA: !transA, ...o });
      });
    }
    return [ga, gb];
  }, [al, bl].filter((t, i) => t !== [a, b][i]));
  return y;
}

// ---- shape ops -----------------------------------------------------------------------------------

/** Same values, new shape (one entry may be -1). Shares memory with x. */
export function reshape(x: Tensor, shape: Shape): Tensor {
  const s = [...shape];
  const hole = s.indexOf(-1);
  if (hole >= 0) {
    const known = sizeOf(s.filter((_, i) => i !== hole));
    if (known === 0) throw new Error(`reshape: -1 is ambiguous when the other dimensions of ${fmt(shape)} have no elements`);
    s[hole] = x.size / known;
  }
  if (!Number.isInteger(s[hole] ?? 0) || sizeOf(s) !== x.size || s.some((d) => d < 0 || !Number.isInteger(d))) {
    throw new Error(`reshape: cannot reshape ${fmt(x.shape)} (${x.size} elements) to ${fmt(shape)}`);
  }
  if (shapesEqual(s, x.shape)) return x;
  const y = alias(x, s);
  record('reshape', [x], [y], ([g]) => [reshape(g!, x.shape)]);
  return y;
}

export const expandDims = (x: Tensor, axis: number): Tensor => {
  const a = normAxis('expandDims', axis, x.rank + 1);
  return reshape(x, [...x.shape.slice(0, a), 1, ...x.shape.slice(a)]);
};

export function squeeze(x: Tensor, axes?: number | number[]): Tensor {
  const ax = axes === undefined ? x.shape.flatMap((d, i) => (d === 1 ? [i] : [])) : normAxes('squeeze', axes, x.rank);
  for (const a of ax) if (x.shape[a] !== 1) throw new Error(`squeeze: axis ${a} of ${fmt(x.shape)} is not 1`);
  return reshape(x, x.shape.filter((_, i) => !ax.includes(i)));
}

function invertPerm(perm: number[]): number[] {
  const inv = new Array<number>(perm.length);
  perm.forEach((p, i) => (inv[p] = i));
  return inv;
}

/** Materialise `shape` read from x at `offset` with element strides `strides`. */
function gatherStrided(x: Tensor, shape: number[], offset: number, strides: number[]): Tensor {
  const data = x.backend.empty(sizeOf(shape), x.dtype); // the copy writes every element
  x.backend.copy(x.data, offset, strides, data, 0, stridesOf(shape), shape, x.dtype);
  return fromData(data, shape, x.dtype, x.backend);
}

export function transpose(x: Tensor, perm?: number[]): Tensor {
  const p = perm ?? [...Array(x.rank).keys()].reverse();
  if (p.length !== x.rank || [...p].sort((u, v) => u - v).some((v, i) => v !== i)) {
    throw new Error(`transpose: ${JSON.stringify(p)} is not a permutation of the axes of ${fmt(x.shape)}`);
  }
  if (p.every((v, i) => v === i)) return x;
  const moved = p.filter((i) => x.shape[i] !== 1);
  // axes of size 1 carry no order: when the others keep theirs, the memory order is the same (a
  // decode step's [B, 1, H, D] -> [B, H, 1, D])
  if (moved.every((v, i) => i === 0 || moved[i - 1] < v)) return reshape(x, p.map((i) => x.shape[i]));
  const st = stridesOf(x.shape);
  const y = gatherStrided(x, p.map((i) => x.shape[i]), 0, p.map((i) => st[i]));
  record('transpose', [x], [y], ([g]) => [transpose(g!, invertPerm(p))]);
  return y;
}

/** Swap the last two axes. */
export const mT = (x: Tensor): Tensor => {
  if (x.rank < 2) throw new Error(`mT: needs rank >= 2, got ${fmt(x.shape)}`);
  return transpose(x, [...Array(x.rank - 2).keys(), x.rank - 1, x.rank - 2]);
};

export function broadcastTo(x: Tensor, shape: Shape): Tensor {
  const s = broadcastShapes('broadcastTo', x.shape, shape);
  if (!shapesEqual(s, shape)) throw new Error(`broadcastTo: cannot broadcast ${fmt(x.shape)} to ${fmt(shape)}`);
  if (shapesEqual(x.shape, shape)) return x;
  const y = gatherStrided(x, s, 0, broadcastStrides(x.shape, s));
  record('broadcastTo', [x], [y], ([g]) => [sumToShape(g!, x.shape)]);
  return y;
}

/** x[begin:end] per axis (step 1); missing trailing axes are taken whole; negative bounds count from the end. */
export function slice(x: Tensor, begin: readonly number[], end?: readonly (number | undefined)[]): Tensor {
  if (begin.length > x.rank) throw new Error(`slice: ${begin.length} bounds for rank ${x.rank} tensor ${fmt(x.shape)}`);
  const lo: number[] = [];
  const hi: number[] = [];
  for (let i = 0; i < x.rank; i++) {
    const d = x.shape[i];
    let b = begin[i] ?? 0;
    let e = end?.[i] ?? d;
    if (b < 0) b += d;
    if (e < 0) e += d;
    if (!Number.isInteger(b) || !Number.isInteger(e) || b < 0 || e > d || b > e) {
      throw new Error(`slice: bounds [${begin[i]}, ${end?.[i] ?? d}) out of range for axis ${i} of ${fmt(x.shape)}`);
    }
    lo.push(b);
    hi.push(e);
  }
  const shape = lo.map((b, i) => hi[i] - b);
  if (shapesEqual(shape, x.shape)) return x;
  const st = stridesOf(x.shape);
  const y = gatherStrided(x, shape, lo.reduce((acc, b, i) => acc + b * st[i], 0), st);
  record('slice', [x], [y], ([g]) => [pad(g!, lo.map((b, i) => [b, x.shape[i] - hi[i]] as [number, number]))]);
  return y;
}

/** Pad each axis with `widths[i] = [before, after]` copies of `value`. */
export function pad(x: Tensor, widths: readonly (readonly [number, number])[], value = 0): Tensor {
  if (widths.length !== x.rank) throw new Error(`pad: ${widths.length} widths for rank ${x.rank} tensor ${fmt(x.shape)}`);
  for (const [b, a] of widths) if (!Number.isInteger(b) || !Number.isInteger(a) || b < 0 || a < 0) throw new Error(`pad: invalid widths ${JSON.stringify(widths)}`);
  const shape = x.shape.map((d, i) => d + widths[i][0] + widths[i][1]);
  const data = x.backend.fill(sizeOf(shape), x.dtype, value);
  const st = stridesOf(shape);
  x.backend.copy(x.data, 0, stridesOf(x.shape), data, widths.reduce((acc, [b], i) => acc + b * st[i], 0), st, [...x.shape], x.dtype);
  const y = fromData(data, shape, x.dtype, x.backend);
  record('pad', [x], [y], ([g]) => [slice(g!, widths.map(([b]) => b), widths.map(([b], i) => b + x.shape[i]))]);
  return y;
}

export function concat(xs: readonly Tensor[], axis = 0): Tensor {
  if (xs.length === 0) throw new Error('concat: needs at least one tensor');
  sameBackend('concat', [...xs]);
  const dtype = sameDType('concat', [...xs]);
  const a = normAxis('concat', axis, xs[0].rank);
  for (const t of xs) {
    if (t.rank !== xs[0].rank || t.shape.some((d, i) => i !== a && d !== xs[0].shape[i])) {
      throw new Error(`concat: shapes ${xs.map((u) => fmt(u.shape)).join(', ')} differ outside axis ${a}`);
    }
  }
  if (xs.length === 1) return xs[0];
  const shape = [...xs[0].shape];
  shape[a] = xs.reduce((acc, t) => acc + t.shape[a], 0);
  const backend = xs[0].backend;
  const data = backend.empty(sizeOf(shape), dtype); // the inputs' copies tile the whole output
  const st = stridesOf(shape);
  const starts: number[] = [];
  let at = 0;
  for (const t of xs) {
    starts.push(at);
    backend.copy(t.data, 0, stridesOf(t.shape), data, at * st[a], st, [...t.shape], dtype);
    at += t.shape[a];
  }
  const y = fromData(data, shape, dtype, backend);
  record('concat', [...xs], [y], ([g], needs) =>
    xs.map((t, i) => {
      if (!needs[i]) return null;
      const b = new Array<number>(t.rank).fill(0);
      b[a] = starts[i];
      const e = [...t.shape];
      e[a] = starts[i] + t.shape[a];
      return slice(g!, b, e);
    }),
  );
  return y;
}

export const stack = (xs: readonly Tensor[], axis = 0): Tensor => {
  if (xs.length === 0) throw new Error('stack: needs at least one tensor');
  const a = normAxis('stack', axis, xs[0].rank + 1);
  return concat(xs.map((t) => expandDims(t, a)), a);
};

// ---- gather / scatter ----------------------------------------------------------------------

function checkIndices(op: string, indices: Tensor): void {
  if (indices.dtype !== 'int32') throw new Error(`${op}: indices must be int32, got ${indices.dtype}${fmt(indices.shape)}`);
}

/**
 * numpy.take: picks entries of x along `axis` (embedding lookup). Result shape:
 * x.shape[:axis] + indices.shape + x.shape[axis+1:]. An index outside [0, n) throws.
 */
export function gather(x: Tensor, indices: Tensor, axis = 0): Tensor {
  checkIndices('gather', indices);
  sameBackend('gather', [x, indices]);
  const a = normAxis('gather', axis, x.rank);
  const outer = sizeOf(x.shape.slice(0, a));
  const inner = sizeOf(x.shape.slice(a + 1));
  const shape = [...x.shape.slice(0, a), ...indices.shape, ...x.shape.slice(a + 1)];
  const data = x.backend.gather(x.data, indices.data, outer, x.shape[a], inner, indices.size, x.dtype);
  const y = fromData(data, shape, x.dtype, x.backend);
  record('gather', [x], [y], ([g], _needs, into) => {
    // into x's running cotangent in place (a tied embedding's), else into zeros
    if (!into?.[0] || g!.dtype !== x.dtype) return [scatterAdd(zerosLike(x), indices, g!, a)];
    x.backend.scatterAdd(into[0].data, indices.data, g!.data, outer, x.shape[a], inner, indices.size, x.dtype, true);
    return [into[0]];
  }, [indices]);
  return y;
}

/** base + (updates added into the rows `indices` along `axis`); the gradient of gather. */
export function scatterAdd(base: Tensor, indices: Tensor, updates: Tensor, axis = 0): Tensor {
  checkIndices('scatterAdd', indices);
  sameBackend('scatterAdd', [base, indices, updates]);
  const dtype = sameDType('scatterAdd', [base, updates]);
  const a = normAxis('scatterAdd', axis, base.rank);
  const expect = [...base.shape.slice(0, a), ...indices.shape, ...base.shape.slice(a + 1)];
  if (!shapesEqual(expect, updates.shape)) {
    throw new Error(`scatterAdd: updates ${fmt(updates.shape)} should be ${fmt(expect)} for base ${fmt(base.shape)} and indices ${fmt(indices.shape)}`);
  }
  const outer = sizeOf(base.shape.slice(0, a));
  const inner = sizeOf(base.shape.slice(a + 1));
  const data = base.backend.scatterAdd(base.data, indices.data, updates.data, outer, base.shape[a], inner, indices.size, dtype);
  const y = fromData(data, base.shape, dtype, base.backend);
  record('scatterAdd', [base, updates], [y], ([g], needs) => [needs[0] ? g : null, needs[1] ? gather(g!, indices, a) : null], [indices]);
  return y;
}

/** numpy.take_along_axis for the last axis: out[..., j] = x[..., indices[..., j]]. */
export function takeAlongAxis(x: Tensor, indices: Tensor, axis = -1): Tensor {
  checkIndices('takeAlongAxis', indices);
  const { t, restore } = lastAxisView('takeAlongAxis', x, axis);
  const it = lastAxisView('takeAlongAxis', indices, axis).t;
  const n = t.shape[t.rank - 1];
  const rows = t.size / Math.max(n, 1);
  if (!shapesEqual(t.shape.slice(0, -1), it.shape.slice(0, -1))) {
    throw new Error(`takeAlongAxis: indices ${fmt(indices.shape)} do not match ${fmt(x.shape)} outside axis ${axis}`);
  }
  const m = it.shape[it.rank - 1];
  const rowBase = reshape(mul(arange(rows), n), [...it.shape.slice(0, -1), 1]);
  const idxHost = it.toTyped() as Int32Array;
  for (let i = 0; i < idxHost.length; i++) {
    if (idxHost[i] < 0 || idxHost[i] >= n) throw new Error(`takeAlongAxis: index ${idxHost[i]} out of range [0, ${n})`);
  }
  const flatIdx = add(broadcastTo(rowBase, it.shape), it);
  const out = reshape(gather(reshape(t, [-1]), reshape(flatIdx, [-1]), 0), [...it.shape.slice(0, -1), m]);
  return restore(out);
}

// ---- dtype -----------------------------------------------------------------------------------

export function cast(x: Tensor, dtype: DType): Tensor {
  if (x.dtype === dtype) return x;
  const y = fromData(x.backend.cast(x.data, x.size, x.dtype, dtype), x.shape, dtype, x.backend);
  // (a running cotangent of x takes the cast-back contribution in place: no x-sized copy of it)
  if (isFloat(x.dtype) && isFloat(dtype)) record('cast', [x], [y], ([g], _needs, into) => [into?.[0] ? addInto(into[0], g!) : cast(g!, x.dtype)]);
  return y;
}
