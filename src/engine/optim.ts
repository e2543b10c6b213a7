/**
 * Optimiser updates as single kernels. Not differentiable: an update consumes gradients, it is never
 * inside the function being differentiated, so the op refuses tracked inputs rather than recording.
 */
import type { AdamWHyper } from './backend.js';
import { fromData, isTracked } from './runtime.js';
import { fmt, shapesEqual } from './shape.js';
import type { Tensor } from './tensor.js';

/**
 * One AdamW step of one float32 / float64 parameter in one pass over p, g, m, v (the backend's
 * `adamw`); the same values, bit for bit, as the composite update in src/train/adamw.ts.
 */
export function fusedAdamW(p: Tensor, g: Tensor, m: Tensor, v: Tensor, h: AdamWHyper): { p: Tensor; m: Tensor; v: Tensor } {
  checkAdamW(p, g, m, v);
  const { backend, dtype, shape } = p;
  const r = backend.adamw(p.data, g.data, m.data, v.data, p.size, h, dtype);
  return { p: fromData(r.p, shape, dtype, backend), m: fromData(r.m, shape, dtype, backend), v: fromData(r.v, shape, dtype, backend) };
}

/** One parameter of `fusedAdamWAll`, with whether it takes weight decay. */
export interface AdamWParam {
  p: Tensor;
  g: Tensor;
  m: Tensor;
  v: Tensor;
  decay: boolean;
}

/**
 * `fusedAdamW` of every parameter in `params` (one dtype and backend) in one launch where the backend can (the
 * GPU: a table of the parameters' arrays, one kernel); the same bits as one `fusedAdamW` each. `h.decay` is ignored:
 * each parameter says its own.
 */
export function fusedAdamWAll(params: AdamWParam[], h: AdamWHyper): { p: Tensor; m: Tensor; v: Tensor }[] {
  if (params.length === 0) return [];
  const first = params[0].p;
  for (const e of params) {
    checkAdamW(e.p, e.g, e.m, e.v);
    if (e.p.dtype !== first.dtype) throw new Error(`adamw: one launch takes one dtype, got ${first.dtype} and ${e.p.dtype}`);
    if (e.p.backend !== first.backend) throw new Error('adamw: the parameters live on different backends');
  }
  const { backend, dtype } = first;
  const entries = params.map((e) => ({ p: e.p.data, g: e.g.data, m: e.m.data, v: e.v.data, size: e.p.size, decay: e.decay }));
  return backend.adamwAll(entries, h, dtype).map((r, i) => {
    const shape = params[i].p.shape;
    return { p: fromData(r.p, shape, dtype, backend), m: fromData(r.m, shape, dtype, backend), v: fromData(r.v, shape, dtype, backend) };
  });
}

function checkAdamW(p: Tensor, g: Tensor, m: Tensor, v: Tensor): void {
  const named = [['grad', g], ['m', m], ['v', v]] as const;
  for (const [name, t] of named) {
    if (!shapesEqual(t.shape, p.shape)) throw new Error(`adamw: ${name} ${fmt(t.shape)} does not match param ${fmt(p.shape)}`);
    if (t.dtype !== p.dtype) throw new Error(`adamw: ${name} is ${t.dtype}, param is ${p.dtype}`);
    if (t.backend !== p.backend) throw new Error(`adamw: ${name} and the param live on different backends`);
  }
  if (p.dtype !== 'float32' && p.dtype !== 'float64') throw new Error(`adamw: the fused update needs float32 or float64 parameters, got ${p.dtype}`);
  if ([p, g, m, v].some(isTracked)) throw new Error('adamw: the update is not differentiable (an input is being traced by grad/vjp)');
}
