/**
 * AdamW, the outer optimiser of SPEC §4: β 0.9/0.95, eps 1e-8, bias correction, decoupled weight
 * decay on matrices only, and global-norm gradient clipping as a separate step. Parameters, grads
 * and optimiser state are pytrees of tensors; the learning rate comes with each step so that
 * schedules stay outside.
 */
import {
  type AdamWHyper, type Tensor, add, div, dispose, fusedAdamW, fusedAdamWAll, keep, leaves, mapLeaves, maximum, mul, scalar, sqrt, square, sub, sum,
  tidy, zerosLike,
} from '../engine/index.js';

export interface AdamWOptions {
  beta1?: number;
  beta2?: number;
  eps?: number;
  /** Decoupled weight decay (per unit of learning rate), on the tensors `decays` selects. */
  weightDecay?: number;
  /** Which parameters decay; default: matrices (rank >= 2), never norm gains or biases. */
  decays?: (t: Tensor, index: number) => boolean;
  /**
   * 'fused': one kernel per float32 / float64 parameter (`fusedAdamW`); 'fusedAll': every float32 / float64
   * parameter of a dtype in one launch (`fusedAdamWAll`; on the GPU not yet run on hardware, so not the
   * default); 'composite': the same update written in engine ops (about 15 kernels per parameter); 'auto'
   * (default): fused where the parameter's backend prefers fused ops (`Backend.preferFused`: the GPU). All
   * give the same bits; other dtypes always take the composite. Unset, `TTT_ADAMW_KERNEL` (any of these names)
   * chooses, else 'auto'.
   */
  kernel?: AdamWKernel;
}

export type AdamWKernel = 'auto' | 'fused' | 'fusedAll' | 'composite';
const KERNELS: readonly AdamWKernel[] = ['auto', 'fused', 'fusedAll', 'composite'];

/** The kernel TTT_ADAMW_KERNEL names (for benches and A/B runs), else 'auto'; a name not on the list throws. */
function envKernel(): AdamWKernel {
  const v = process.env.TTT_ADAMW_KERNEL;
  if (v === undefined || v === '') return 'auto';
  if (!(KERNELS as readonly string[]).includes(v)) throw new Error(`TTT_ADAMW_KERNEL: expected one of ${KERNELS.join(', ')}, got '${v}'`);
  return v as AdamWKernel;
}

/** What a checkpoint saves: first and second moments shaped like the params, and the step count. */
export interface AdamWState<T> {
  m: T;
  v: T;
  /** Number of updates applied so far (a scalar tensor, so the whole state is one pytree of tensors). */
  step: Tensor;
}

const DEFAULTS = { beta1: 0.9, beta2: 0.95, eps: 1e-8, weightDecay: 0.1 };
const isMatrix = (t: Tensor): boolean => t.rank >= 2;

/** Zero moments for `params`. The tensors are kept: they live until the caller disposes them. */
export function adamwInit<T>(params: T): AdamWState<T> {
  return tidy(() => ({
    m: mapLeaves(params, (p) => keep(zerosLike(p))),
    v: mapLeaves(params, (p) => keep(zerosLike(p))),
    step: keep(scalar(0)),
  }));
}

/**
 * One AdamW update. Pure: returns new params and state (kept tensors) and disposes nothing, so the
 * caller decides what to free (see `AdamW` for the usual owning loop).
 *   m ← β1 m + (1-β1) g;  v ← β2 v + (1-β2) g²;  m̂ = m/(1-β1^t);  v̂ = v/(1-β2^t)
 *   p ← p − lr·(m̂/(√v̂ + eps) + wd·p)      (wd only where `decays`)
 */
export function adamwUpdate<T>(
  params: T, grads: T, state: AdamWState<T>, lr: number, opts: AdamWOptions = {},
): { params: T; state: AdamWState<T> } {
  const { beta1, beta2, eps, weightDecay } = { ...DEFAULTS, ...opts };
  const decays = opts.decays ?? isMatrix;
  const nParams = leaves(params).length;
  for (const [name, tree] of [['grads', grads], ['state.m', state.m], ['state.v', state.v]] as const) {
    const n = leaves(tree).length;
    if (n !== nParams) throw new Error(`adamw: ${name} has ${n} tensors, params have ${nParams}`);
  }
  // The step count is host-side arithmetic (powers of β); reading one scalar per step is cheap.
  const t = state.step.item() + 1;
  const c1 = 1 - beta1 ** t;
  const c2 = 1 - beta2 ** t;
  const h: AdamWHyper = {
    beta1, oneMinusBeta1: 1 - beta1, beta2, oneMinusBeta2: 1 - beta2, c1, c2, eps, lr, decay: false, shrink: 1 - lr * weightDecay,
  };
  const gL = leaves(grads);
  const mL = leaves(state.m);
  const vL = leaves(state.v);
  return tidy(() => {
    const pL = leaves(params);
    const floats = (p: Tensor) => p.dtype === 'float32' || p.dtype === 'float64';
    const decayOf = (p: Tensor, i: number) => decays(p, i) && weightDecay !== 0;
    // 'fusedAll': the float parameters of each dtype in one launch
    const kernel = opts.kernel ?? envKernel();
    const together = new Map<number, { p: Tensor; m: Tensor; v: Tensor }>();
    if (kernel === 'fusedAll') {
      for (const dtype of ['float32', 'float64'] as const) {
        const idx = pL.flatMap((p, i) => (p.dtype === dtype ? [i] : []));
        const rs = fusedAdamWAll(idx.map((i) => ({ p: pL[i], g: gL[i], m: mL[i], v: vL[i], decay: decayOf(pL[i], i) })), h);
        idx.forEach((i, j) => together.set(i, rs[j]));
      }
    }
    const out = pL.map((p, i) => {
      const hi = { ...h, decay: decayOf(p, i) };
      const fused = kernel === 'fused' || (kernel === 'auto' && p.backend.preferFused);
      const r = together.get(i) ?? (fused && floats(p) ? fusedAdamW(p, gL[i], mL[i], vL[i], hi) : compositeAdamW(p, gL[i], mL[i], vL[i], hi));
      return { p: keep(r.p), m: keep(r.m), v: keep(r.v) };
    });
    return {
      params: mapLeaves(params, (_, i) => out[i].p),
      state: { m: mapLeaves(state.m, (_, i) => out[i].m), v: mapLeaves(state.v, (_, i) => out[i].v), step: keep(scalar(t)) },
    };
  });
}

/** The update of one parameter in engine ops: the definition `fusedAdamW` matches. */
function compositeAdamW(p: Tensor, g: Tensor, m: Tensor, v: Tensor, h: AdamWHyper): { p: Tensor; m: Tensor; v: Tensor } {
  const m2 = add(mul(m, h.beta1), mul(g, h.oneMinusBeta1));
  const v2 = add(mul(v, h.beta2), mul(square(g), h.oneMinusBeta2));
  // eps is added to √v̂ (not √v), as in PyTorch and optax, so it means the same at every step.
  const update = div(div(m2, h.c1), add(sqrt(div(v2, h.c2)), h.eps));
  const shrunk = h.decay ? mul(p, h.shrink) : p;
  return { p: sub(shrunk, mul(update, h.lr)), m: m2, v: v2 };
}

/**
 * Scales `grads` so their global L2 norm is at most `maxNorm` (no change when already below).
 * Returns the new grads and the norm before clipping (a scalar tensor; `.item()` for logs). The
 * results are not kept: call inside a `tidy` that returns or keeps what it needs.
 */
export function clipGlobalNorm<T>(grads: T, maxNorm: number): { grads: T; norm: Tensor } {
  const ls = leaves(grads);
  if (ls.length === 0) return { grads, norm: scalar(0) };
  const norm = sqrt(ls.map((g) => sum(square(g))).reduce((a, b) => add(a, b)));
  if (!(maxNorm > 0)) return { grads: mapLeaves(grads, (g) => g), norm };
  // maxNorm / max(norm, maxNorm) is 1 below the threshold and never divides by zero.
  const scale = div(maxNorm, maximum(norm, maxNorm));
  return { grads: mapLeaves(grads, (g) => mul(g, scale)), norm };
}

/**
 * The owning form for a training loop: holds the state, and each `step` consumes the previous
 * params (disposes them) and returns the new ones, so the live tensor count stays flat.
 */
export class AdamW<T> {
  state: AdamWState<T>;
  constructor(params: T, readonly opts: AdamWOptions = {}, state?: AdamWState<T>) {
    this.state = state ?? adamwInit(params);
  }

  get stepCount(): number {
    return this.state.step.item();
  }

  /** New params after one update with learning rate `lr`. `params` is disposed; `grads` is not. */
  step(params: T, grads: T, lr: number): T {
    const r = adamwUpdate(params, grads, this.state, lr, this.opts);
    dispose(this.state);
    dispose(params);
    this.state = r.state;
    return r.params;
  }

  dispose(): void {
    dispose(this.state);
  }
}
