/**
 * RMSNorm over the last axis, x / √(mean(x²) + eps) · w: a fused op (one kernel forward, one pass
 * plus a column sum backward) and the composite definition it must agree with. As for attention,
 * the composite is the truth, and the op's backward falls back to it whenever that backward will
 * itself be differentiated (the TTT inner loop's gradient inside the outer one).
 */
import { recordFused } from './fused.js';
import { isFloat } from './dtype.js';
import { add, mean, mul, rsqrt, square } from './ops.js';
import { fromData, isTracked } from './runtime.js';
import { fmt } from './shape.js';
import type { Tensor } from './tensor.js';

/** The definition, from differentiable ops only. */
export function compositeRmsNorm(x: Tensor, w: Tensor, eps: number): Tensor {
  return mul(mul(x, rsqrt(add(mean(square(x), -1, true), eps))), w);
}

/** RMSNorm of x [..., D] with gain w [D]; same values as `compositeRmsNorm` up to rounding. */
export function fusedRmsNorm(x: Tensor, w: Tensor, eps: number): Tensor {
  const d = x.shape[x.rank - 1];
  if (x.rank < 1 || w.rank !== 1 || w.shape[0] !== d) throw new Error(`rmsNorm: expected x [..., D] and w [D], got x ${fmt(x.shape)}, w ${fmt(w.shape)}`);
  if (w.dtype !== x.dtype) throw new Error(`rmsNorm: dtype mismatch (x ${x.dtype}, w ${w.dtype})`);
  if (w.backend !== x.backend) throw new Error('rmsNorm: x and w live on different backends');
  if (!isFloat(x.dtype)) throw new Error(`rmsNorm: needs a floating-point tensor, got ${x.dtype}${fmt(x.shape)}`);
  if (!(eps >= 0)) throw new Error(`rmsNorm: eps must be >= 0, got ${eps}`);
  const { backend, dtype } = x;
  const rows = d === 0 ? 0 : x.size / d;
  const r = backend.rmsNormForward(x.data, w.data, rows, d, eps, dtype);
  const y = fromData(r.y, x.shape, dtype, backend);
  if (!isTracked(x) && !isTracked(w)) {
    backend.free(r.rstd, dtype, rows);
    return y;
  }
  const rstd = fromData(r.rstd, [rows], dtype, backend);
  recordFused('rmsNorm', [x, w], y, { composite: (a, b) => compositeRmsNorm(a, b, eps) }, (g, needs) => {
    // the gain's gradient (a column sum over every row) only where the trace wants it: the TTT inner
    // step differentiates through norms whose gains it does not update
    const grads = backend.rmsNormBackward(x.data, w.data, rstd.data, g.data, rows, d, dtype, needs[1]);
    return [grads.dx, grads.dw];
  }, [rstd]);
  return y;
}
