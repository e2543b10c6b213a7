/**
 * Next-token negative log-likelihood from logits as one op: nll = logsumexp(logits) − logits[target]
 * per row, forward in one pass over each row (kept: the row's logsumexp), backward writing
 * dlogits = (softmax − onehot(target)) · g in one pass, so no other [rows, V] buffer is made: at a
 * 128256-token vocabulary each one is half a gigabyte per 1024 positions. As for RMSNorm, the
 * composite is the truth; a backward that will itself be differentiated is the op tokenNllGrad.
 */
import { stopGradient, tidy, vjp } from './autodiff.js';
import { recordFused } from './fused.js';
import { add, cast, concat, expandDims, logsumexp, matmul, mul, reshape, slice, sub, sum, takeAlongAxis, zeros } from './ops.js';
import { activeMask, fromData, isTracked, record } from './runtime.js';
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

/** linearTokenNllSum's definition: Σ weights ⊙ tokenNll(x Wᵀ), from differentiable ops (the fused NLL's own fallbacks). */
export function compositeLinearTokenNllSum(x: Tensor, w: Tensor, targets: Tensor, weights: Tensor): Tensor {
  const nll = fusedTokenNll(matmul(x, w, { transB: true }), targets);
  return sum(mul(nll, cast(weights, nll.dtype)));
}

/**
 * The output layer's training loss Σ weights ⊙ tokenNll(x Wᵀ) (x [..., D], W [V, D], targets int32 and weights of
 * x's leading shape) as one op whose forward also takes its gradients: the loss is a scalar, so its cotangent only
 * scales them. In pieces of `rowsPerPiece` rows (0: all at once): the piece's logits, their NLL and logsumexp, then
 * dlogits = (softmax − onehot) · weight, dx = dlogits W and dW += dlogitsᵀ x (a GEMM with β = 1); each piece's logits
 * are freed before the next. The backward multiplies the kept dx and dW by the cotangent. So no [rows, V] buffer
 * outlives its piece and the backward recomputes no logits (a checkpointed output layer's does). Where a trace
 * outside the one differentiating the loss follows x or W (its backward will be differentiated), the op is its
 * composite definition instead; untraced, it computes the loss alone.
 */
export function linearTokenNllSum(x: Tensor, w: Tensor, targets: Tensor, weights: Tensor, rowsPerPiece = 0): Tensor {
  const D = x.shape[x.rank - 1];
  if (w.rank !== 2 || w.shape[1] !== D) throw new Error(`linearTokenNllSum: W ${fmt(w.shape)} should be [V, ${D}] for x ${fmt(x.shape)}`);
  const lead = x.shape.slice(0, -1);
  if (fmt(targets.shape) !== fmt(lead) || fmt(weights.shape) !== fmt(lead)) {
    throw new Error(`linearTokenNllSum: targets ${fmt(targets.shape)} and weights ${fmt(weights.shape)} should be x's leading shape ${fmt(lead)}`);
  }
  if (!Number.isInteger(rowsPerPiece) || rowsPerPiece < 0) throw new Error(`linearTokenNllSum: rowsPerPiece must be a whole number >= 0, got ${rowsPerPiece}`);
  const deps = (x.deps | w.deps) & activeMask();
  // traced by more than one trace: the backward will be differentiated, so the definition (any order)
  if ((deps & (deps - 1)) !== 0 || isTracked(weights)) return compositeLinearTokenNllSum(x, w, targets, weights);
  const wantGrads = deps !== 0;
  const rows = x.size / D;
  const V = w.shape[0];
  const per = rowsPerPiece === 0 ? Math.max(rows, 1) : rowsPerPiece;
  const { backend } = x;
  const [xs, ws] = [reshape(stopGradient(x), [rows, D]), stopGradient(w)];
  const [ts, wts] = [reshape(targets, [rows]), reshape(stopGradient(weights), [rows])];
  let loss: Tensor | null = null;
  let dw: Tensor | null = null;
  const dxs: Tensor[] = [];
  for (let lo = 0; lo < rows; lo += per) {
    const hi = Math.min(rows, lo + per);
    // one piece: its logits and dlogits are freed when it ends (only the loss, dx and dW carry over)
    const piece = tidy(() => {
      const [xp, tp] = [slice(xs, [lo, 0], [hi, D]), slice(ts, [lo], [hi])];
      const z = matmul(xp, ws, { transB: true });
      const stat = statDType(z.dtype);
      const wp = cast(slice(wts, [lo], [hi]), stat);
      const r = backend.tokenNllForward(z.data, tp.data, hi - lo, V, z.dtype);
      const nll = fromData(r.nll, [hi - lo], stat, backend);
      const lse = fromData(r.lse, [hi - lo], stat, backend);
      const part = loss ? add(loss, sum(mul(nll, wp))) : sum(mul(nll, wp));
      if (!wantGrads) return { part, dx: null, dw: null };
      // dlogits with each row's weight as its cotangent, then the two products
      const d = fromData(backend.tokenNllBackward(z.data, tp.data, lse.data, wp.data, hi - lo, V, z.dtype), [hi - lo, V], z.dtype, backend);
      const dxp = matmul(d, ws, { outDType: x.dtype });
      const dwAll = dw ? matmul(d, xp, { transA: true, outDType: w.dtype, into: dw }) : matmul(d, xp, { transA: true, outDType: w.dtype });
      return { part, dx: dxp, dw: dwAll };
    });
    loss?.dispose();
    loss = piece.part;
    if (piece.dx) dxs.push(piece.dx);
    dw = piece.dw;
  }
  const y = loss ?? zeros([], statDType(x.dtype));
  if (!wantGrads || !dw) return y;
  const dx = reshape(concat(dxs, 0), x.shape);
  for (const t of dxs) if (t !== dx) t.dispose();
  const dW: Tensor = dw;
  record('linearTokenNllSum', [x, w], [y], ([g], needs) => {
    if (isTracked(x) || isTracked(w) || isTracked(g!)) {
      return vjp((a: Tensor, b: Tensor) => compositeLinearTokenNllSum(a, b, targets, weights), x, w)[1](g!) as Tensor[];
    }
    // the kept gradients scaled by the cotangent (in float32 at least, then in the operand's dtype)
    const scaled = (t: Tensor) => (t.dtype === 'bfloat16' ? cast(mul(cast(t, 'float32'), cast(g!, 'float32')), t.dtype) : mul(t, cast(g!, t.dtype)));
    return [needs[0] ? scaled(dx) : null, needs[1] ? scaled(dW) : null];
  }, [dx, dW, targets, weights]);
  return y;
}
