/**
 * The SwiGLU gate silu(a) · b as one op (one kernel forward, one backward writing both cotangents)
 * and the composite definition it must agree with. As for RMSNorm and attention, the composite is
 * the truth, and the op's backward falls back to it whenever that backward will itself be
 * differentiated (the TTT inner loop's gradient inside the outer one).
 */
import { recordFused } from './fused.js';
import { mul, silu } from './ops.js';
import { fromData } from './runtime.js';
import { fmt, shapesEqual } from './shape.js';
import type { Tensor } from './tensor.js';

/** The definition, from differentiable ops only. */
export function compositeSwigluGate(a: Tensor, b: Tensor): Tensor {
  return mul(silu(a), b);
}

/** silu(a) · b for a and b of one shape; the same values as `compositeSwigluGate` up to rounding. */
export function fusedSwigluGate(a: Tensor, b: Tensor): Tensor {
  if (!shapesEqual(a.shape, b.shape)) throw new Error(`swigluGate: shapes ${fmt(a.shape)} and ${fmt(b.shape)} differ`);
  if (a.dtype !== b.dtype) throw new Error(`swigluGate: dtype mismatch (${a.dtype}, ${b.dtype})`);
  if (a.backend !== b.backend) throw new Error('swigluGate: a and b live on different backends');
  if (a.dtype !== 'float32' && a.dtype !== 'float64' && a.dtype !== 'bfloat16') throw new Error(`swigluGate: needs a floating-point tensor, got ${a.dtype}${fmt(a.shape)}`);
  const { backend, dtype, shape, size } = a;
  const y = fromData(backend.swigluForward(a.data, b.data, size, dtype), shape, dtype, backend);
  recordFused('swigluGate', [a, b], y, { composite: compositeSwigluGate }, (g) => {
    const grads = backend.swigluBackward(a.data, b.data, g.data, size, dtype);
    return [grads.da, grads.db];
  });
  return y;
}
