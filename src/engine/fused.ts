/**
 * The shared backward of the fused ops (attention, RMSNorm, the SwiGLU gate, the token NLL): the
 * backend's backward kernel, unless that backward will itself be differentiated (an input, the
 * output or the cotangent is traced by an outer grad, as in the TTT inner loop inside the outer
 * one). Then the cotangents come from the op's composite definition instead: the same values, built
 * from ops an outer trace can record.
 */
import { vjp } from './autodiff.js';
import type { BackendData } from './backend.js';
import { fromData, isTracked, record } from './runtime.js';
import type { Tensor } from './tensor.js';

/**
 * Records the fused op `name` (inputs → y). `kernel(g)` returns one cotangent buffer per input (in
 * that input's shape, dtype and backend); the ones the trace does not need are freed. `saved`: tensors
 * the kernel reads besides the inputs (kept alive like them). `differentiable(g)`, where given, is the
 * backward to record when it will be differentiated, in place of the composite's: ops an outer trace
 * differentiates more cheaply (the token NLL's backward is an op with its own fused second order).
 */
export function recordFused(
  name: string, inputs: Tensor[], y: Tensor, composite: (...xs: Tensor[]) => Tensor, kernel: (g: Tensor) => BackendData[], saved: Tensor[] = [],
  differentiable?: (g: Tensor) => Tensor[],
): void {
  record(name, inputs, [y], ([g], needs) => {
    if (inputs.some(isTracked) || isTracked(y) || isTracked(g!)) {
      if (differentiable) return differentiable(g!).map((c, i) => (needs[i] ? c : null));
      const [, pullback] = vjp(composite, ...inputs);
      const cts = pullback(g!) as Tensor[];
      return cts.map((c, i) => (needs[i] ? c : null));
    }
    return kernel(g!).map((data, i) => {
      const like = inputs[i];
      if (needs[i]) return fromData(data, like.shape, like.dtype, like.backend);
      like.backend.free(data, like.dtype, like.size);
      return null;
    });
  }, saved);
}
