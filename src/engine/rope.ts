/**
 * Rotary position embedding as one op: x [..., T, H, D] with interleaved pairs (x[2i], x[2i+1])
 * rotated by per-(position, pair) angles whose cos and sin come as tables [T, D/2] (constants:
 * src/nn/layers.ts builds and caches them). The rotation is linear in x and its transpose is the
 * rotation by the opposite angle, so the backward is this same op with `inverse` flipped, which
 * makes the op differentiable to any order without a composite fallback.
 */
import type { RopeLayout } from './backend.js';
import { fromData, isTracked, record } from './runtime.js';
import { fmt } from './shape.js';
import type { Tensor } from './tensor.js';

/**
 * Forward (inverse false): y[2i] = x[2i]·cos − x[2i+1]·sin, y[2i+1] = x[2i]·sin + x[2i+1]·cos, each
 * product and sum rounded to the dtype in that order, so it equals the composite `rope` of
 * src/nn/layers.ts bit for bit. Inverse: the rotation by −angle (the forward's transpose).
 *
 * `layout` moves the heads axis in the same pass: 'split' takes x [..., T, H, D] to y [..., H, T, D]
 * (attention's layout: no separate transposing copy), 'merge' takes x [..., H, T, D] back to
 * [..., T, H, D]. The rotation acts per (token, head) row, so split's transpose is merge with the
 * inverse rotation, and the backward stays this op.
 */
export function fusedRope(x: Tensor, cos: Tensor, sin: Tensor, inverse = false, layout: RopeLayout = 'same'): Tensor {
  if (x.rank < 3) throw new Error(`rope: expected x [..., T, H, D], got ${fmt(x.shape)}`);
  const lead = x.shape.slice(0, -3);
  const [a, b, D] = x.shape.slice(-3);
  // T and H of the input's layout: [.., H, T, D] when merging
  const [T, H] = layout === 'merge' ? [b, a] : [a, b];
  if (D % 2 !== 0) throw new Error(`rope: head dim ${D} of ${fmt(x.shape)} is odd`);
  for (const [name, t] of [['cos', cos], ['sin', sin]] as const) {
    if (t.size !== T * (D / 2)) throw new Error(`rope: ${name} table ${fmt(t.shape)} should hold T·D/2 = ${T * (D / 2)} values for x ${fmt(x.shape)}`);
    if (t.dtype !== x.dtype) throw new Error(`rope: ${name} table is ${t.dtype}, x is ${x.dtype}`);
    if (t.backend !== x.backend) throw new Error(`rope: the ${name} table and x live on different backends`);
    if (isTracked(t)) throw new Error('rope: the cos/sin tables are constants and cannot be differentiated');
  }
  if (x.dtype !== 'float32' && x.dtype !== 'float64' && x.dtype !== 'bfloat16') throw new Error(`rope: needs a floating-point tensor, got ${x.dtype}${fmt(x.shape)}`);
  const { backend, dtype } = x;
  const outer = T * H === 0 || D === 0 ? 0 : x.size / (T * H * D);
  const shape = layout === 'same' ? x.shape : [...lead, b, a, D];
  const y = fromData(backend.rope(x.data, cos.data, sin.data, outer, T, H, D, inverse, dtype, layout), shape, dtype, backend);
  const back: RopeLayout = layout === 'split' ? 'merge' : layout === 'merge' ? 'split' : 'same';
  record('rope', [x], [y], ([g]) => [fusedRope(g!, cos, sin, !inverse, back)], [cos, sin]);
  return y;
}
