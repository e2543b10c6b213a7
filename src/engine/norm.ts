/**
 * RMSNorm over the last axis, x / √(mean(x²) + eps) · w: a fused op (one kernel forward, one pass
 * plus a column sum backward) and the composite definition it must agree with. As for attention,
 * the composite is the truth. A backward that will itself be differentiated (the TTT inner loop's
 * gradient inside the outer one) is the op `rmsNormGrad` where the backend has its second-order
 * kernel (one pass for the Hessian-vector product, as for the token NLL), else the composite's vjp.
 */
import { recordFused } from './fused.js';
import { isFloat } from './dtype.js';
import { add, mean, mul, reshape, rsqrt, square, sub, sum } from './ops.js';
import { fromData, isTracked } from './runtime.js';
import { fmt } from './shape.js';
import type { Tensor } from './tensor.js';

/** The definition, from differentiable ops only. */
export function compositeRmsNorm(x: Tensor, w: Tensor, eps: number): Tensor {
  return mul(mul(x, rsqrt(add(mean(square(x), -1, true), eps))), w);
}

/** rstd = 1/√(mean(x²) + eps) per row, [..., 1], from differentiable ops. */
const compositeRstd = (x: Tensor, eps: number) => rsqrt(add(mean(square(x), -1, true), eps));

/**
 * The backward's dx from differentiable ops: with u = g·w, r = rstd and s = mean(u·x) per row,
 * dx = r·u − x·(s·r³) (the vjp of `compositeRmsNorm` in x, written out).
 */
export function compositeRmsNormGrad(x: Tensor, w: Tensor, g: Tensor, eps: number): Tensor {
  const r = compositeRstd(x, eps);
  const u = mul(g, w);
  const s = mean(mul(u, x), -1, true);
  return sub(mul(u, r), mul(x, mul(s, mul(r, mul(r, r)))));
}

/** The gain's cotangent Σ_rows g · x · rstd, from differentiable ops. */
function compositeRmsNormDw(x: Tensor, g: Tensor, eps: number): Tensor {
  const d = x.shape[x.rank - 1];
  return reshape(sum(reshape(mul(g, mul(x, compositeRstd(x, eps))), [-1, d]), 0), [d]);
}

function checkNorm(x: Tensor, w: Tensor, eps: number): void {
  const d = x.shape[x.rank - 1];
  if (x.rank < 1 || w.rank !== 1 || w.shape[0] !== d) throw new Error(`rmsNorm: expected x [..., D] and w [D], got x ${fmt(x.shape)}, w ${fmt(w.shape)}`);
  if (w.dtype !== x.dtype) throw new Error(`rmsNorm: dtype mismatch (x ${x.dtype}, w ${w.dtype})`);
  if (w.backend !== x.backend) throw new Error('rmsNorm: x and w live on different backends');
  if (!isFloat(x.dtype)) throw new Error(`rmsNorm: needs a floating-point tensor, got ${x.dtype}${fmt(x.shape)}`);
  if (!(eps >= 0)) throw new Error(`rmsNorm: eps must be >= 0, got ${eps}`);
}

/** RMSNorm of x [..., D] with gain w [D]; same values as `compositeRmsNorm` up to rounding. */
export function fusedRmsNorm(x: Tensor, w: Tensor, eps: number): Tensor {
  checkNorm(x, w, eps);
  const d = x.shape[x.rank - 1];
  const { backend, dtype } = x;
  const rows = d === 0 ? 0 : x.size / d;
  const r = backend.rmsNormForward(x.data, w.data, rows, d, eps, dtype);
  const y = fromData(r.y, x.shape, dtype, backend);
  if (!isTracked(x) && !isTracked(w)) {
    backend.free(r.rstd, dtype, rows);
    return y;
  }
  const rstd = fromData(r.rstd, [rows], dtype, backend);
  const differentiable = backend.rmsNormGradKernel
    ? { backward: (g: Tensor, needs: boolean[]) => [rmsNormGrad(x, w, g, rstd, eps), needs[1] ? compositeRmsNormDw(x, g, eps) : null] }
    : { composite: (a: Tensor, b: Tensor) => compositeRmsNorm(a, b, eps) };
  recordFused('rmsNorm', [x, w], y, differentiable, (g, needs) => {
    // the gain's gradient (a column sum over every row) only where the trace wants it: the TTT inner
    // step differentiates through norms whose gains it does not update
    const grads = backend.rmsNormBackward(x.data, w.data, rstd.data, g.data, rows, d, dtype, needs[1]);
    return [grads.dx, grads.dw];
  }, [rstd]);
  return y;
}

/**
 * RMSNorm's dx for the cotangent g, as an op of its own (`rstd`: the forward's, [rows]): what a
 * second-order trace records instead of the composite's chain of row ops. Its backward is one
 * kernel pass (the Hessian-vector product: cotangents of x, w and g, the gain's as a column sum);
 * a third-order trace differentiates `compositeRmsNormGrad`.
 */
export function rmsNormGrad(x: Tensor, w: Tensor, g: Tensor, rstd: Tensor, eps: number): Tensor {
  checkNorm(x, w, eps);
  if (fmt(g.shape) !== fmt(x.shape) || g.dtype !== x.dtype || g.backend !== x.backend) {
    throw new Error(`rmsNormGrad: the cotangent ${g.dtype}${fmt(g.shape)} does not match x ${x.dtype}${fmt(x.shape)}`);
  }
  const d = x.shape[x.rank - 1];
  const { backend, dtype } = x;
  const rows = d === 0 ? 0 : x.size / d;
  const dx = fromData(backend.rmsNormBackward(x.data, w.data, rstd.data, g.data, rows, d, dtype, false).dx, x.shape, dtype, backend);
  if (!isTracked(x) && !isTracked(w) && !isTracked(g)) return dx;
  recordFused('rmsNormGrad', [x, w, g], dx, { composite: (a, b, c) => compositeRmsNormGrad(a, b, c, eps) }, (c, needs) => {
    const r = backend.rmsNormGradBackward(x.data, w.data, rstd.data, g.data, c.data, rows, d, dtype, needs[1]);
    return [r.dx, r.dw, r.dg];
  }, [rstd]);
  return dx;
}
