/**
 * Shared test utilities for the op suite: seeded inputs, a closeness assertion that names the worst
 * element, multi-index helpers for the plain-loop references, and first/second-order gradient
 * checkers against central finite differences (all in float64).
 */
import assert from 'node:assert/strict';
import {
  type DType, type Key, type Shape, Tensor, foldIn, grad, mul, randn, randomKey, sum, tanh, square, tensor, uniform,
} from '../../src/index.js';
import { sizeOf } from '../../src/engine/shape.js';

// ---- seeded inputs -----------------------------------------------------------------------------

/** A deterministic key for `seed` (and an optional purpose tag). */
export function keyOf(seed: number, tag?: string): Key {
  const k = randomKey(seed);
  return tag === undefined ? k : foldIn(k, tag);
}

/** Standard normal values of `shape` (float64 unless told otherwise). */
export function rn(seed: number, shape: Shape, dtype: DType = 'float64'): Tensor {
  return randn(keyOf(seed), shape, dtype);
}

/** Uniform values in [min, max) of `shape` (float64 unless told otherwise). */
export function ru(seed: number, shape: Shape, min = -1, max = 1, dtype: DType = 'float64'): Tensor {
  return uniform(keyOf(seed), shape, { min, max, dtype });
}

/** Values whose magnitude lies in [lo, hi) with a random sign: inputs away from the kink at 0. */
export function awayFromZero(seed: number, shape: Shape, lo = 0.3, hi = 1.5, dtype: DType = 'float64'): Tensor {
  const mag = uniform(keyOf(seed, 'mag'), shape, { min: lo, max: hi, dtype: 'float64' }).toArray();
  const sgn = uniform(keyOf(seed, 'sign'), shape, { min: 0, max: 1, dtype: 'float64' }).toArray();
  return tensor(mag.map((m, i) => (sgn[i] < 0.5 ? -m : m)), shape, dtype);
}

/** Distinct values (a shuffled arithmetic progression plus jitter): no ties for max/min/maximum. */
export function distinct(seed: number, shape: Shape, gap = 0.1, dtype: DType = 'float64'): Tensor {
  const n = sizeOf(shape);
  const u = uniform(keyOf(seed, 'perm'), [n], { dtype: 'float64' }).toArray();
  const order = [...Array(n).keys()].sort((a, b) => u[a] - u[b]);
  const out = new Array<number>(n);
  order.forEach((pos, rank) => (out[pos] = (rank - n / 2) * gap + 0.2 * gap * u[rank]));
  return tensor(out, shape, dtype);
}

// ---- multi-index helpers (for references written with plain loops) ----------------------------

/** Seeded host values (mulberry32), uniform in [lo, hi): the same numbers on every backend and run. */
export function seededValues(seed: number, n: number, lo: number, hi: number): number[] {
  let s = seed >>> 0;
  const out: number[] = [];
  for (let i = 0; i < n; i++) {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    out.push(lo + (hi - lo) * (((t ^ (t >>> 14)) >>> 0) / 4294967296));
  }
  return out;
}

/** Flat row-major offset → multi-index. */
export function unravel(flat: number, shape: Shape): number[] {
  const idx = new Array<number>(shape.length);
  for (let d = shape.length - 1; d >= 0; d--) {
    idx[d] = flat % shape[d];
    flat = Math.floor(flat / shape[d]);
  }
  return idx;
}

/** Multi-index → flat row-major offset. */
export function ravel(idx: readonly number[], shape: Shape): number {
  let off = 0;
  for (let d = 0; d < shape.length; d++) off = off * shape[d] + idx[d];
  return off;
}

/** Calls fn(multiIndex, flat) for every element of `shape` in row-major order. */
export function forEachIndex(shape: Shape, fn: (idx: number[], flat: number) => void): void {
  const n = sizeOf(shape);
  for (let i = 0; i < n; i++) fn(unravel(i, shape), i);
}

// ---- closeness ---------------------------------------------------------------------------------

export interface CloseOpts {
  rtol?: number;
  atol?: number;
  /** Shape used to print the worst element's multi-index (taken from `actual` when a tensor). */
  shape?: Shape;
  msg?: string;
}

function values(x: Tensor | ArrayLike<number>): number[] {
  return x instanceof Tensor ? x.toArray() : Array.from(x);
}

/**
 * |actual - expected| <= atol + rtol * |expected| elementwise (NaN matches NaN, ±Infinity must match
 * exactly). On failure the message names the worst element, its index and both values.
 */
export function assertClose(actual: Tensor | ArrayLike<number>, expected: Tensor | ArrayLike<number>, opts: CloseOpts = {}): void {
  const { rtol = 1e-12, atol = 1e-12, msg = '' } = opts;
  const shape = opts.shape ?? (actual instanceof Tensor ? actual.shape : expected instanceof Tensor ? expected.shape : undefined);
  if (actual instanceof Tensor && expected instanceof Tensor) {
    assert.deepEqual([...actual.shape], [...expected.shape], `${msg} shape ${fmt(actual.shape)} vs expected ${fmt(expected.shape)}`);
  }
  const a = values(actual);
  const e = values(expected);
  assert.equal(a.length, e.length, `${msg} length ${a.length} vs expected ${e.length}`);
  let worst = -1;
  let worstRatio = 0;
  for (let i = 0; i < a.length; i++) {
    let ratio: number;
    if (Number.isNaN(e[i]) || Number.isNaN(a[i])) ratio = Number.isNaN(e[i]) && Number.isNaN(a[i]) ? 0 : Infinity;
    else if (!Number.isFinite(e[i]) || !Number.isFinite(a[i])) ratio = a[i] === e[i] ? 0 : Infinity;
    else ratio = Math.abs(a[i] - e[i]) / (atol + rtol * Math.abs(e[i]));
    if (ratio > worstRatio || (ratio === Infinity && worst < 0)) {
      worstRatio = ratio;
      worst = i;
    }
  }
  if (worstRatio > 1) {
    const where = shape && sizeOf(shape) === a.length ? `index [${unravel(worst, shape).join(',')}]` : `flat index ${worst}`;
    assert.fail(
      `${msg ? msg + ': ' : ''}not close at ${where}: got ${a[worst]}, expected ${e[worst]} ` +
        `(|diff| ${Math.abs(a[worst] - e[worst]).toExponential(3)}, allowed ${(atol + rtol * Math.abs(e[worst])).toExponential(3)}; ` +
        `${a.length} elements, rtol ${rtol}, atol ${atol})`,
    );
  }
}

export function assertShape(t: Tensor, shape: Shape, msg = ''): void {
  assert.deepEqual([...t.shape], [...shape], `${msg} shape ${fmt(t.shape)}, expected ${fmt(shape)}`);
}

function fmt(shape: Shape): string {
  return `[${shape.join(',')}]`;
}

// ---- projections: non-scalar op → scalar test function ----------------------------------------

export type Projection = 'linear' | 'square' | 'tanh';

/**
 * f(...xs) = sum(p(op(...xs)) * R) with a fixed random R shaped like op's output (so every output
 * element matters), p = identity, square or tanh. `square`/`tanh` give a non-trivial Hessian to ops
 * that are linear in their inputs. The op runs once up front to learn its output shape.
 */
export function project(op: (...xs: Tensor[]) => Tensor, inputs: Tensor[], seed = 999, kind: Projection = 'linear'): (...xs: Tensor[]) => Tensor {
  const y = op(...inputs);
  const R = tensor(uniform(keyOf(seed, 'R'), y.shape, { min: 0.5, max: 1.5, dtype: 'float64' }).toArray().map((v, i) => (i % 2 ? -v : v)), y.shape, y.dtype);
  return (...xs: Tensor[]) => {
    const out = op(...xs);
    const p = kind === 'linear' ? out : kind === 'square' ? square(out) : tanh(out);
    return sum(mul(p, R));
  };
}

// ---- finite differences ------------------------------------------------------------------------

type ScalarFn = (...xs: Tensor[]) => Tensor;

function allGrads(f: ScalarFn, inputs: Tensor[]): Tensor[] {
  const argnums = inputs.map((_, i) => i);
  const g = grad(f, { argnums })(...inputs);
  return inputs.length === 1 && g instanceof Tensor ? [g] : (g as Tensor[]);
}

function norm(v: ArrayLike<number>): number {
  let s = 0;
  for (let i = 0; i < v.length; i++) s += v[i] * v[i];
  return Math.sqrt(s);
}

function diffNorm(a: ArrayLike<number>, b: ArrayLike<number>): number {
  let s = 0;
  for (let i = 0; i < a.length; i++) s += (a[i] - b[i]) ** 2;
  return Math.sqrt(s);
}

function worstElement(a: ArrayLike<number>, b: ArrayLike<number>, shape: Shape): string {
  let w = 0;
  for (let i = 1; i < a.length; i++) if (Math.abs(a[i] - b[i]) > Math.abs(a[w] - b[w])) w = i;
  return a.length ? `worst at [${unravel(w, shape).join(',')}]: analytic ${a[w]}, numeric ${b[w]}` : 'empty';
}

export interface GradOpts {
  eps?: number;
  rtol?: number;
  /** Floor of ||fd|| in the relative error. */
  tiny?: number;
  /** Allow an identically zero numeric gradient for some input (otherwise that is an error: a check that cannot fail). */
  allowZero?: boolean;
  label?: string;
}

function perturbed(inputs: Tensor[], hosts: number[][], which: number, j: number, delta: number): Tensor[] {
  return inputs.map((t, i) => {
    if (i !== which) return t;
    const h = hosts[i].slice();
    h[j] += delta;
    return tensor(h, t.shape, t.dtype);
  });
}

/**
 * Compares grad(f, all argnums) with central differences (f(x + eps e_j) - f(x - eps e_j)) / 2eps,
 * per input: ||g - fd|| / max(||fd||, tiny) < rtol. Inputs must be float64.
 */
export function checkGrad(f: ScalarFn, inputs: Tensor[], opts: GradOpts = {}): void {
  const { eps = 1e-6, rtol = 1e-6, tiny = 1e-10, allowZero = false, label = '' } = opts;
  for (const t of inputs) assert.equal(t.dtype, 'float64', `${label}: checkGrad needs float64 inputs`);
  const analytic = allGrads(f, inputs);
  assert.equal(analytic.length, inputs.length, `${label}: grad returned ${analytic.length} gradients for ${inputs.length} inputs`);
  const hosts = inputs.map((t) => t.toArray());
  inputs.forEach((x, i) => {
    assertShape(analytic[i], x.shape, `${label} grad ${i}`);
    const g = analytic[i].toArray();
    const fd = new Array<number>(x.size);
    for (let j = 0; j < x.size; j++) {
      const fp = f(...perturbed(inputs, hosts, i, j, eps)).item();
      const fm = f(...perturbed(inputs, hosts, i, j, -eps)).item();
      fd[j] = (fp - fm) / (2 * eps);
    }
    const nfd = norm(fd);
    if (!allowZero && x.size > 0) assert.ok(nfd > 1e-8, `${label}: numeric gradient of input ${i} is ~0 (${nfd}); the check could not fail`);
    const rel = diffNorm(g, fd) / Math.max(nfd, tiny);
    assert.ok(
      rel < rtol,
      `${label}: gradient of input ${i} ${fmt(x.shape)} off by relative ${rel.toExponential(3)} (rtol ${rtol}); ${worstElement(g, fd, x.shape)}`,
    );
  });
}

export interface HvpOpts extends GradOpts {
  /** Number of random directions. */
  directions?: number;
  seed?: number;
}

/** Scalar x ↦ Σ_i sum(grad(f)(x)_i * v_i): its gradient is the Hessian-vector product H v. */
export function directional(f: ScalarFn, vs: Tensor[]): ScalarFn {
  return (...xs: Tensor[]) => {
    const gs = allGrads(f, xs);
    let acc = sum(mul(gs[0], vs[0]));
    for (let i = 1; i < gs.length; i++) acc = acc.add(sum(mul(gs[i], vs[i])));
    return acc;
  };
}

/**
 * Second order: for random directions v, compares grad(x ↦ Σ sum(grad(f)(x) * v)) (a nested grad)
 * with the central difference of the first-order gradient (g(x + eps v) - g(x - eps v)) / 2eps.
 */
export function checkHvp(f: ScalarFn, inputs: Tensor[], opts: HvpOpts = {}): void {
  const { eps = 1e-5, rtol = 1e-6, tiny = 1e-10, allowZero = false, label = '', directions = 2, seed = 4242 } = opts;
  for (const t of inputs) assert.equal(t.dtype, 'float64', `${label}: checkHvp needs float64 inputs`);
  const hosts = inputs.map((t) => t.toArray());
  for (let d = 0; d < directions; d++) {
    const vs = inputs.map((t, i) => randn(keyOf(seed + 7919 * d, `v${i}`), t.shape, 'float64'));
    const vh = vs.map((v) => v.toArray());
    const hv = allGrads(directional(f, vs), inputs);
    const shift = (s: number) => inputs.map((t, i) => tensor(hosts[i].map((x, j) => x + s * vh[i][j]), t.shape, 'float64'));
    const gp = allGrads(f, shift(eps));
    const gm = allGrads(f, shift(-eps));
    const fd = inputs.map((_, i) => {
      const p = gp[i].toArray();
      const m = gm[i].toArray();
      return p.map((x, j) => (x - m[j]) / (2 * eps));
    });
    const nfd = norm(fd.flat());
    if (!allowZero) assert.ok(nfd > 1e-8, `${label}: numeric Hessian-vector product is ~0 (${nfd}); the check could not fail`);
    inputs.forEach((x, i) => {
      assertShape(hv[i], x.shape, `${label} hvp ${i}`);
      const h = hv[i].toArray();
      // Relative to this input's own numeric HVP, floored by a fraction of the whole one (an input the
      // function is linear in may have a zero block).
      const rel = diffNorm(h, fd[i]) / Math.max(norm(fd[i]), 1e-3 * nfd, tiny);
      assert.ok(
        rel < rtol,
        `${label}: Hessian-vector product (direction ${d}) for input ${i} ${fmt(x.shape)} off by relative ${rel.toExponential(3)} ` +
          `(rtol ${rtol}); ${worstElement(h, fd[i], x.shape)}`,
      );
    });
  }
}
