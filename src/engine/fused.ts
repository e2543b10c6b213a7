/**
 * The shared backward of the fused ops (attention, RMSNorm, the SwiGLU gate, the token NLL): the
 * backend's backward kernel, unless that backward will itself be differentiated (an input, the
 * output or the cotangent is traced by an outer grad, as in the TTT inner loop inside the outer
 * one). Then the cotangents come from ops an outer trace can record instead: the vjp of the op's
 * composite definition (the same values), or a backward the op names for that case.
 */
import { vjp } from './autodiff.js';
import type { BackendData } from './backend.js';
import { fromData, isTracked, record } from './runtime.js';
import type { Tensor } from './tensor.js';

/**
 * How the backward is recorded when it will itself be differentiated: through the vjp of the op's
 * composite definition, or (where that chain is costly, as for the token NLL) through a backward
 * written in ops an outer trace differentiates more cheaply.
 */
export type DifferentiableBackward =
  | { composite: (...xs: Tensor[]) => Tensor }
  | { backward: (g: Tensor, needs: boolean[]) => (Tensor | null)[] };

/**
 * Records the fused op `name` (inputs → y). `kernel(g, needs, into)` returns one cotangent buffer per input (in
 * that input's shape, dtype and backend), or null for an input the trace does not need (`needs[i]`
 * false) where the kernel can skip that work; buffers for unneeded inputs are freed. A kernel may add an
 * input's cotangent into `into[i]` (its running cotangent, where the backward walk gives one) and return that
 * tensor's buffer. `saved`: tensors the kernel reads besides the inputs (kept alive like them).
 */
export function recordFused(
  name: string, inputs: Tensor[], y: Tensor, differentiable: DifferentiableBackward,
  kernel: (g: Tensor, needs: boolean[], into: (Tensor | null)[]) => (BackendData | null)[], saved: Tensor[] = [],
): void {
  record(name, inputs, [y], ([g], needs, into = []) => {
    if (inputs.some(isTracked) || isTracked(y) || isTracked(g!)) {
      const cts = 'backward' in differentiable ? differentiable.backward(g!, needs) : (vjp(differentiable.composite, ...inputs)[1](g!) as Tensor[]);
      return cts.map((c, i) => (needs[i] ? c : null));
    }
    return kernel(g!, needs, into).map((data, i) => {
      const like = inputs[i];
      // a kernel that added into the input's running cotangent hands back its buffer
      if (needs[i] && into[i] && data === into[i]!.data) return into[i];
      if (needs[i]) {
        if (data === null) throw new Error(`${name}: the backward kernel skipped a cotangent the trace needs (input ${i})`);
        return fromData(data, like.shape, like.dtype, like.backend);
      }
      if (data !== null) like.backend.free(data, like.dtype, like.size);
      return null;
    });
  }, saved);
}
