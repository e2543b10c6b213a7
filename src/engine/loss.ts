/**
 * Next-token negative log-likelihood from logits as one op: nll = logsumexp(logits) − logits[target]
 * per row, forward in one pass over each row (kept: the row's logsumexp), backward writing
 * dlogits = (softmax − onehot(target)) · g in one pass, so no other [rows, V] buffer is made: at a
 * 128256-token vocabulary each one is half a gigabyte per 1024 positions. As for RMSNorm, the
 * composite is the truth; a backward that will itself be differentiated is the op tokenNllGrad.
 */
import { vjp } from './autodiff.js';
import { recordFused } from './fused.js';
import { cast, expandDims, logsumexp, reshape, sub, takeAlongAxis } from './ops.js';
import { fromData, isTracked } from './runtime.js';
import { statDType } from './dtype.js';
import { fmt } from './shape.js';
import type { Tensor } from './tensor.js';

/**
 * The definition, from differentiable ops only: logits [..., V], targets int32 [...] → [...]. bfloat16
 * logits are widened to float32 first (a logsumexp in bf16 would lose the loss), so the NLL is float32.
 */
export function compositeTokenNll(logits: Tensor, targets: Tensor): Tensor {
  const x = logits.dtype === 'bfloat16' ? cast(logits, 'float32') : logits;
  const picked = reshape(takeAlongAxis(x, expandDims(targets, -1), -1), targets.shape);
  return sub(logsumexp(x, -1), picked);
}

/**
 * Same values as `compositeTokenNll` up to rounding; a target outside [0, V) throws (on a GPU at the next
 * sync). The NLL is float32 for float32 and bfloat16 logits (float64 for float64); the gradient comes back in
 * the logits' dtype.
 */
export function fusedTokenNll(logits: Tensor, targets: Tensor): Tensor {
  const V = logits.shape[logits.rank - 1];
  if (logits.rank !== targets.rank + 1 || targets.shape.some((d, i) => d !== logits.shape[i])) {
    throw new Error(`tokenNll: logits ${fmt(logits.shape)} should be targets ${fmt(targets.shape)} plus a vocabulary axis`);
  }
  if (targets.dtype !== 'int32') throw new Error(`tokenNll: targets must be int32, got ${targets.dtype}`);
  if (logits.dtype !== 'float32' && logits.dtype !== 'float64' && logits.dtype !== 'bfloat16') throw new Error(`tokenNll: logits must be floating point, got ${logits.dtype}`);
  if (targets.backend !== logits.backend) throw new Error('tokenNll: logits and targets live on different backends');
  if (V === 0 && targets.size > 0) throw new Error(`tokenNll: empty vocabulary axis in ${fmt(logits.shape)}`);
  const { backend, dtype } = logits;
  const rows = targets.size;
  const r = backend.tokenNllForward(logits.data, targets.data, rows, V, dtype);
  // the NLL and the row logsumexp in float32 (float64 for float64 logits): bf16 logits need no widened copy
  const lseDType = statDType(dtype);
  const nll = fromData(r.nll, targets.shape, lseDType, backend);
  if (!isTracked(logits)) {
    backend.free(r.lse, lseDType, rows);
    return nll;
  }
  const lse = fromData(r.lse, [rows], lseDType, backend);
  // differentiated, the backward is the op tokenNllGrad (its second order is one fused pass), not the composite's chain
  recordFused('tokenNll', [logits], nll, { backward: (g) => [tokenNllGrad(logits, targets, g, lse)] }, (g, _needs, into) => [
    backend.tokenNllBackward(logits.data, targets.data, lse.data, g.data, rows, V, dtype, into[0]?.data),
  ], [targets, lse]);
  return nll;
}

/**
 * The NLL's backward as an op of its own: dlogits = (softmax(logits) − onehot(target)) · g, given the
 * rows' logsumexp from the forward. A second-order trace (the TTT inner step inside the outer one)
 * differentiates it in one fused pass per row (a softmax Hessian-vector product) instead of through
 * the composite's chain of [rows, V] tensors; a third-order one through the composite.
 */
export function tokenNllGrad(logits: Tensor, targets: Tensor, g: Tensor, lse: Tensor): Tensor {
  const { backend, dtype } = logits;
  const V = logits.shape[logits.rank - 1];
  const rows = targets.size;
  const dlogits = fromData(backend.tokenNllBackward(logits.data, targets.data, lse.data, g.data, rows, V, dtype), logits.shape, dtype, backend);
  if (!isTracked(logits) && !isTracked(g)) return dlogits;
  const composite = (x: Tensor, gg: Tensor) => vjp((y: Tensor) => compositeTokenNll(y, targets), x)[1](gg)[0] as Tensor;
  recordFused('tokenNllGrad', [logits, g], dlogits, { composite }, (u, _needs, into) => {
    // the logits' cotangent added into their running one (the outer NLL's): one [rows, V] buffer per mini-batch, not two
    const r = backend.tokenNllGradBackward(logits.data, targets.data, lse.data, g.data, u.data, rows, V, dtype, into[0]?.data);
    return [r.dLogits, r.dG];
  }, [targets, lse]);
  return dlogits;
}
