/**
 * The SwiGLU gate silu(a) · b as one op (one kernel forward, one backward writing both cotangents)
 * and the composite definition it must agree with. As for RMSNorm and attention, the composite is
 * the truth. A backward that will itself be differentiated (the TTT inner loop's gradient inside the
 * outer one) is the op `swigluGateGrad` where the backend has its second-order kernel (one pass for
 * the Hessian-vector product), else the composite's vjp.
 */
import { vjp } from './autodiff.js';
import { recordFused } from './fused.js';
import { mul, silu, zerosLike } from './ops.js';
import { fromData, isTracked, record } from './runtime.js';
import { fmt, shapesEqual } from './shape.js';
import type { Tensor } from './tensor.js';

/** The definition, from differentiable ops only. */
export function compositeSwigluGate(a: Tensor, b: Tensor): Tensor {
  return mul(silu(a), b);
}

function checkGate(op: string, a: Tensor, b: Tensor): void {
  if (!shapesEqual(a.shape, b.shape)) throw new Error(`${op}: shapes ${fmt(a.shape)} and ${fmt(b.shape)} differ`);
  if (a.dtype !== b.dtype) throw new Error(`${op}: dtype mismatch (${a.dtype}, ${b.dtype})`);
  if (a.backend !== b.backend) throw new Error(`${op}: a and b live on different backends`);
  if (a.dtype !== 'float32' && a.dtype !== 'float64' && a.dtype !== 'bfloat16') throw new Error(`${op}: needs a floating-point tensor, got ${a.dtype}${fmt(a.shape)}`);
}

/** silu(a) · b for a and b of one shape; the same values as `compositeSwigluGate` up to rounding. */
export function fusedSwigluGate(a: Tensor, b: Tensor): Tensor {
  checkGate('swigluGate', a, b);
  const { backend, dtype, shape, size } = a;
  const y = fromData(backend.swigluForward(a.data, b.data, size, dtype), shape, dtype, backend);
  const differentiable = backend.swigluGradKernel ? { backward: (g: Tensor) => swigluGateGrad(a, b, g) } : { composite: compositeSwigluGate };
  recordFused('swigluGate', [a, b], y, differentiable, (g) => {
    const grads = backend.swigluBackward(a.data, b.data, g.data, size, dtype);
    return [grads.da, grads.db];
  });
  return y;
}

/**
 * The gate's backward for the cotangent g, [g·b·silu'(a), g·silu(a)], as an op of its own: what a
 * second-order trace records instead of the composite's chain of elementwise ops. Its backward is one
 * kernel pass (the cotangents of a, b and g); a third-order trace differentiates the composite's vjp.
 */
export function swigluGateGrad(a: Tensor, b: Tensor, g: Tensor): [Tensor, Tensor] {
  checkGate('swigluGateGrad', a, b);
  checkGate('swigluGateGrad', a, g);
  const { backend, dtype, shape, size } = a;
  const r = backend.swigluBackward(a.data, b.data, g.data, size, dtype);
  const da = fromData(r.da, shape, dtype, backend);
  const db = fromData(r.db, shape, dtype, backend);
  if (![a, b, g].some(isTracked)) return [da, db];
  record('swigluGateGrad', [a, b, g], [da, db], ([ca, cb], needs) => {
    // an output nothing downstream used has no cotangent: a zero one
    const [c0, c1] = [ca ?? zerosLike(da), cb ?? zerosLike(db)];
    if ([a, b, g, c0, c1, da, db].some(isTracked)) {
      return vjp((x: Tensor, y: Tensor, z: Tensor) => vjp(compositeSwigluGate, x, y)[1](z) as Tensor[], a, b, g)[1]([c0, c1]) as Tensor[];
    }
    const k = backend.swigluGradBackward(a.data, b.data, g.data, c0.data, c1.data, size, dtype);
    return [k.da, k.db, k.dg].map((data, i) => {
      if (needs[i]) return fromData(data, shape, dtype, backend);
      backend.free(data, dtype, size);
      return null;
    });
  });
  return [da, db];
}
