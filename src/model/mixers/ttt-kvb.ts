/**
 * TTT-KVB sequence mixers `kvb-linear` and `kvb-mlp` (SPEC §5, Table 1 of §6.6): the TTT layers of
 * Sun et al. 2024, "Learning to (Learn at Test Time): RNNs with Expressive Hidden States"
 * (arXiv 2407.04620). Each head's hidden state is a small model f with fast weights W, trained online
 * on a key → value reconstruction loss with learned projections, by mini-batch gradient descent.
 *
 * Per head h (head dim d), for the input x_t of token t:
 *   q_t = θ_Q x_t, k_t = θ_K x_t, v_t = θ_V x_t                    (RoPE on q, k: see below)
 *   η_t = baseLr · sigmoid(θ_lr x_t + b_lr) / d                      (a learned inner lr per token and head)
 *   f(x; W) = x W1 + b1                                              (kvb-linear)
 *   f(x; W) = silu(x W1 + b1) W2 + b2, hidden 4d                     (kvb-mlp)
 *   ℓ_t(W) = ½ ‖LN(f(k_t; W)) + k_t − v_t‖²                          (LN: LayerNorm with learned γ, β per head)
 * Mini-batch gradient descent with inner mini-batch b (option `miniBatch`, default 16), mini-batches
 * counted from the start of the document: with W_s the weights at the start of token t's mini-batch,
 *   W_t = W_s − Σ_{j ≤ t, j in t's mini-batch} η_j ∇ℓ_j(W_s)          (every gradient taken at W_s)
 *   z_t = LN(f(q_t; W_t)) + q_t                                      (the causal mini-batch rule)
 * and the next mini-batch starts from W_s − Σ_{j in the mini-batch} η_j ∇ℓ_j(W_s).
 * The layer's output is θ_O (silu(θ_G x_t) ⊙ PostLN(concat_h z_t)).
 *
 * Dual form (used for both kinds; no explicit inner `grad`): for a layer Z = X W + b of the inner model
 * with key-path input rows X_j (computed with W_s) and back-propagated gradients G_j = ∂ℓ_j/∂Z_j, the
 * per-token weight gradient is X_jᵀ G_j and the bias gradient G_j, so for a query-path input row X̃_i
 *   X̃_i W_i + b_i = X̃_i W_c + b_c − Σ_{j ≤ i} (X̃_i · X_j + 1) η_j G_j
 * i.e. Z̃ = X̃ W_c + b_c − (tril(X̃ Xᵀ + 1)) (η ⊙ G) with matmuls over the whole segment, where W_c are
 * the weights before the segment (W_s minus what earlier tokens of the same mini-batch added). G
 * comes from the LayerNorm + ½‖·‖² backward by hand (G = rstd·(ĝ − mean ĝ − x̂·mean(ĝ x̂)),
 * ĝ = γ ⊙ (γ x̂ + β − (v − k))) and, for the MLP, G1 = (G2 W2ᵀ) ⊙ silu'(Z1). For kvb-mlp the dual
 * applies layer by layer (the query path runs X̃2 = silu(Z̃1) through the second layer's dual), which
 * is exact. The carried weights take the primal step W_c −= Xᵀ(η ⊙ G), b_c −= Σ_j η_j G_j once per
 * segment. Every step is built from engine ops, so outer gradients go through the inner updates.
 * Only the key path, the gradients and the weight steps are sequential (one loop step per segment);
 * the query path runs afterwards for all segments at once (batched along a mini-batch axis when the
 * chunk consists of whole mini-batches, as in training), so the loop stays short.
 *
 * State (per layer): the weights at the start of the current mini-batch (`s*`), the current weights
 * (`c*`: start minus the gradients of the tokens already read in it) and the position in the
 * mini-batch (`pos`), so a chunk boundary or a single decoded token continues exactly.
 *
 * Simplifications and choices (ours):
 * - silu instead of GELU in the inner MLP and in the output gate (no gelu op in the engine).
 * - η_t has no extra 1/(index in mini-batch) factor (the reference code's learnable "token_idx");
 *   the loss carries the ½ of the reference's gradient (LN(f) + k − v).
 * - RoPE on q and k with positions taken modulo b (the position within the inner mini-batch, as in the
 *   reference code), theta 10000 (options `rope`, `ropeTheta`). No short convolution before q/k (the
 *   reference uses it only with its Mamba backbone); q and k are separate projections.
 * - The post-norm is a LayerNorm over D with learned scale and bias, as in the reference.
 * - Fast weights are float in the model's dtype (no separate fp32 state).
 *
 * Mixer options (`c.mixer`, validated): miniBatch (16), baseLr (1 for linear, 0.1 for MLP, as in the
 * paper), hiddenMult (4, MLP only), rope (true), ropeTheta (10000), gate (true).
 */
import { z } from 'zod';
import {
  type Tensor, add, broadcastTo, concat, matmul, mean, mul, reshape, rsqrt, sigmoid, silu, slice, square, stack, sub, sum,
  tensor, transpose,
} from '../../engine/index.js';
import { mergeHeads, rope } from '../../nn/layers.js';
import { type ModelConfig, headDim } from '../config.js';
import { type Mixer, type MixerState, checkConsecutive, parseMixerOptions, registerMixer } from './registry.js';

export type KvbKind = 'linear' | 'mlp';

const optionsSchema = z
  .object({
    /** Inner mini-batch size b: the fast weights step once every b tokens. */
    miniBatch: z.number().int().positive().default(16),
    /** Base inner learning rate (η = baseLr · sigmoid(·) / headDim); default 1 (linear) or 0.1 (MLP). */
    baseLr: z.number().nonnegative().optional(),
    /** Hidden width of the inner MLP in multiples of the head dim. */
    hiddenMult: z.number().int().positive().default(4),
    rope: z.boolean().default(true),
    ropeTheta: z.number().positive().default(10000),
    /** Output gate silu(θ_G x) ⊙ z. */
    gate: z.boolean().default(true),
  })
  .strict();

export interface KvbOptions {
  miniBatch: number;
  baseLr: number;
  hiddenMult: number;
  rope: boolean;
  ropeTheta: number;
  gate: boolean;
}

const optionCache = new WeakMap<object, Map<KvbKind, KvbOptions>>();

/** The validated mixer options of a config (errors name the field, like makeConfig's). */
export function kvbOptions(c: ModelConfig, kind: KvbKind): KvbOptions {
  let byKind = optionCache.get(c.mixer);
  const hit = byKind?.get(kind);
  if (hit) return hit;
  const data = parseMixerOptions(`kvb-${kind}`, optionsSchema, c);
  const o: KvbOptions = { ...data, baseLr: data.baseLr ?? (kind === 'linear' ? 1 : 0.1) };
  if (!byKind) optionCache.set(c.mixer, (byKind = new Map()));
  byKind.set(kind, o);
  return o;
}

/** One layer of the inner model per head: Z = X W + b, W [.., H, in, out], b [.., H, 1, out]. */
export interface InnerLayer {
  w: Tensor;
  b: Tensor;
}

/** What the scan carries: weights at the mini-batch's start, current weights, position in the mini-batch. */
export interface InnerState {
  start: InnerLayer[];
  cur: InnerLayer[];
  pos: number;
}

/** Inputs of the scan, per head: q, k, v [B, H, T, d], η [B, H, T, 1], inner LayerNorm γ, β [H, 1, d]. */
export interface ScanInputs {
  q: Tensor;
  k: Tensor;
  v: Tensor;
  eta: Tensor;
  lnW: Tensor;
  lnB: Tensor;
}

/** LayerNorm over the last axis without affine: x̂ and 1/σ. */
function normalize(x: Tensor, eps: number): { xhat: Tensor; rstd: Tensor } {
  const xc = sub(x, mean(x, -1, true));
  const rstd = rsqrt(add(mean(square(xc), -1, true), eps));
  return { xhat: mul(xc, rstd), rstd };
}

/** Lower-triangular (with diagonal) ones [n, n] (made per call: a cached tensor would outlive `tidy`). */
function tril(n: number, dtype: Tensor['dtype']): Tensor {
  const v = new Float64Array(n * n);
  for (let i = 0; i < n; i++) for (let j = 0; j <= i; j++) v[i * n + j] = 1;
  return tensor(v, [n, n], dtype);
}

const range = (n: number): number[] => Array.from({ length: n }, (_, i) => i);

/** Segments [lo, hi) of a chunk of T tokens that starts `pos` tokens into a mini-batch of b. */
function segments(T: number, pos: number, b: number): [number, number][] {
  const out: [number, number][] = [];
  let lo = 0;
  let room = b - pos;
  while (lo < T) {
    const hi = Math.min(T, lo + room);
    out.push([lo, hi]);
    lo = hi;
    room = b;
  }
  return out;
}

/**
 * Cuts x along axis 2 into the given consecutive segments by halving: a slice's backward pads its
 * gradient to the sliced tensor's size, so cutting n segments straight out of x would cost n
 * full-size pads and adds in the backward pass; halving costs O(log n) full sizes.
 */
function splitSegments(x: Tensor, segs: readonly [number, number][]): Tensor[] {
  if (segs.length === 1) return [x];
  const mid = segs.length >> 1;
  const base = segs[0][0];
  const at = segs[mid][0] - base;
  const end = segs[segs.length - 1][1] - base;
  const shape = x.shape;
  const left = slice(x, [0, 0, 0, 0], [shape[0], shape[1], at, shape[3]]);
  const right = slice(x, [0, 0, at, 0], [shape[0], shape[1], end, shape[3]]);
  return [...splitSegments(left, segs.slice(0, mid)), ...splitSegments(right, segs.slice(mid))];
}

/**
 * Query path of the dual form for one segment, or for N segments at once along an extra batch axis:
 * Z̃ = X̃ W_c + b_c − tril(X̃ Xᵀ + 1)(η ⊙ G), layer by layer (X̃ ← silu(Z̃) between MLP layers).
 * xq [.., n, d]; xs, es: the key-path inputs and η-weighted gradients of each layer; cur: the weights
 * before the segment. Returns the last layer's Z̃ (before the inner LayerNorm).
 */
function queryPath(xq: Tensor, xs: Tensor[], es: Tensor[], cur: InnerLayer[]): Tensor {
  const mask = tril(xq.shape[xq.rank - 2], xq.dtype);
  let x = xq;
  let z = xq;
  cur.forEach((w, l) => {
    const att = mul(add(matmul(x, xs[l], { transB: true }), 1), mask);
    z = sub(add(matmul(x, w.w), w.b), matmul(att, es[l]));
    if (l < cur.length - 1) x = silu(z);
  });
  return z;
}

/**
 * The TTT scan of one layer (all heads): outputs z = LN(f(q_t; W_t)) + q_t [B, H, T, d] and the state
 * after the chunk. The loop over segments (a mini-batch, or its part inside this chunk) is only what
 * is sequential: the key path at the mini-batch's start weights, the gradients and the primal step
 * on the carried weights. The query path (dual form) then runs once over all segments.
 */
export function kvbScan(kind: KvbKind, b: number, inp: ScanInputs, state: InnerState, eps: number): { z: Tensor; state: InnerState } {
  const [B, H, T, d] = inp.q.shape;
  const L = state.cur.length;
  if ((kind === 'linear') !== (L === 1)) throw new Error(`kvbScan: ${kind} inner model with ${L} layers`);
  // Loop invariants of the LayerNorm-ℓ2 backward: ĝ = γ ⊙ (γ x̂ + β − (v − k)) = γ² x̂ + γ (β + k − v).
  const g2 = square(inp.lnW);
  const gOff = mul(inp.lnW, add(inp.lnB, sub(inp.k, inp.v))); // [B, H, T, d]
  let { start, cur, pos } = state;
  const segs = segments(T, pos, b);
  // The key-path inputs of the loop, packed along the last axis and cut into segments.
  const packed = splitSegments(concat([inp.k, gOff, inp.eta], 3), segs);
  const seen: { xs: Tensor[]; es: Tensor[]; cur: InnerLayer[] }[] = [];
  segs.forEach(([lo, hi], si) => {
    const n = hi - lo;
    const piece = (from: number, to: number) => slice(packed[si], [0, 0, 0, from], [B, H, n, to]);
    const k = piece(0, d);
    const off = piece(d, 2 * d);
    const eta = piece(2 * d, 2 * d + 1);
    // Key path at the mini-batch's start weights: activations X_l and pre-activations Z_l.
    const xs: Tensor[] = [k];
    const zk: Tensor[] = [];
    const sig: Tensor[] = [];
    for (let l = 0; l < L; l++) {
      zk.push(add(matmul(xs[l], start[l].w), start[l].b));
      if (l < L - 1) {
        sig.push(sigmoid(zk[l]));
        xs.push(mul(zk[l], sig[l]));
      }
    }
    // ∂ℓ_j/∂Z_j by hand: LayerNorm + ½‖·‖², then back through the MLP at the start weights.
    const { xhat, rstd } = normalize(zk[L - 1], eps);
    const gh = add(mul(xhat, g2), off);
    const gs: Tensor[] = new Array(L);
    gs[L - 1] = mul(rstd, sub(sub(gh, mean(gh, -1, true)), mul(xhat, mean(mul(gh, xhat), -1, true))));
    for (let l = L - 1; l > 0; l--) {
      const s = sig[l - 1];
      const dsilu = mul(s, add(mul(zk[l - 1], sub(1, s)), 1)); // silu'(z) = σ(z)(1 + z(1 − σ(z)))
      gs[l - 1] = mul(matmul(gs[l], start[l].w, { transB: true }), dsilu);
    }
    const es = gs.map((g) => mul(g, eta)); // η_j G_j
    seen.push({ xs, es, cur });
    // Primal step on the carried weights.
    cur = cur.map((w, l) => ({ w: sub(w.w, matmul(xs[l], es[l], { transA: true })), b: sub(w.b, sum(es[l], 2, true)) }));
    pos += n;
    if (pos === b) {
      start = cur;
      pos = 0;
    }
  });
  let zq: Tensor;
  if (segs.length > 1 && segs.every(([lo, hi]) => hi - lo === b)) {
    // Whole mini-batches: one batched query path with the mini-batches on axis 2.
    const N = segs.length;
    const along = (f: (x: (typeof seen)[number]) => Tensor) => stack(seen.map(f), 2);
    const z5 = queryPath(
      reshape(inp.q, [B, H, N, b, d]),
      range(L).map((l) => along((x) => x.xs[l])),
      range(L).map((l) => along((x) => x.es[l])),
      range(L).map((l) => ({ w: along((x) => x.cur[l].w), b: along((x) => x.cur[l].b) })),
    );
    zq = reshape(z5, [B, H, T, d]);
  } else {
    const qs = splitSegments(inp.q, segs);
    const zs = seen.map((x, si) => queryPath(qs[si], x.xs, x.es, x.cur));
    zq = zs.length === 1 ? zs[0] : concat(zs, 2);
  }
  const { xhat } = normalize(zq, eps);
  const z = add(add(mul(xhat, inp.lnW), inp.lnB), inp.q);
  return { z, state: { start, cur, pos } };
}

/** LayerNorm over the last axis with scale and bias. */
function layerNorm(x: Tensor, w: Tensor, b: Tensor, eps: number): Tensor {
  return add(mul(normalize(x, eps).xhat, w), b);
}

const innerDims = (c: ModelConfig, kind: KvbKind): number[] => {
  const d = headDim(c);
  return kind === 'linear' ? [d, d] : [d, kvbOptions(c, kind).hiddenMult * d, d];
};

function stateToRecord(s: InnerState): MixerState {
  const r: Record<string, Tensor | number> = { pos: s.pos };
  s.start.forEach((l, i) => Object.assign(r, { [`sw${i}`]: l.w, [`sb${i}`]: l.b }));
  s.cur.forEach((l, i) => Object.assign(r, { [`cw${i}`]: l.w, [`cb${i}`]: l.b }));
  return r;
}

function stateFromRecord(r: MixerState, layers: number): InnerState {
  const get = (name: string) => {
    const t = r[name];
    if (typeof t !== 'object') throw new Error(`ttt-kvb: state lacks '${name}'`);
    return t;
  };
  return {
    start: range(layers).map((i) => ({ w: get(`sw${i}`), b: get(`sb${i}`) })),
    cur: range(layers).map((i) => ({ w: get(`cw${i}`), b: get(`cb${i}`) })),
    pos: r.pos as number,
  };
}

function kvbMixer(kind: KvbKind): Mixer {
  return {
    init(c, _layer, init) {
      kvbOptions(c, kind); // validate early
      const D = c.dModel;
      const H = c.nHeads;
      const d = headDim(c);
      const dims = innerDims(c, kind);
      const p: Record<string, Tensor> = {
        wq: init.normal('wq', [D, D]),
        wk: init.normal('wk', [D, D]),
        wv: init.normal('wv', [D, D]),
        wo: init.normal('wo', [D, D]),
        wlr: init.normal('wlr', [D, H]),
        blr: init.full([H], 0),
        lnW: init.full([H, 1, d], 1),
        lnB: init.full([H, 1, d], 0),
        postW: init.full([D], 1),
        postB: init.full([D], 0),
      };
      if (kvbOptions(c, kind).gate) p.wg = init.normal('wg', [D, D]);
      for (let l = 0; l + 1 < dims.length; l++) {
        p[`fw${l}`] = init.normal(`fw${l}`, [H, dims[l], dims[l + 1]]);
        p[`fb${l}`] = init.full([H, 1, dims[l + 1]], 0);
      }
      return p;
    },
    forward(c, p, h, positions, prev) {
      checkConsecutive(`kvb-${kind}`, positions);
      const o = kvbOptions(c, kind);
      const [B, T] = h.shape;
      const H = c.nHeads;
      const d = headDim(c);
      const L = innerDims(c, kind).length - 1;
      let st: InnerState;
      if (prev) st = stateFromRecord(prev, L);
      else {
        const w0 = Array.from({ length: L }, (_, l) => ({
          w: broadcastTo(reshape(p[`fw${l}`], [1, ...p[`fw${l}`].shape]), [B, ...p[`fw${l}`].shape]),
          b: broadcastTo(reshape(p[`fb${l}`], [1, ...p[`fb${l}`].shape]), [B, ...p[`fb${l}`].shape]),
        }));
        st = { start: w0, cur: w0, pos: 0 };
      }
      const heads = (x: Tensor) => reshape(x, [B, T, H, d]);
      const toBHTd = (x: Tensor) => transpose(x, [0, 2, 1, 3]);
      let q = heads(matmul(h, p.wq));
      let k = heads(matmul(h, p.wk));
      if (o.rope) {
        const inMb = positions.map((_, i) => (st.pos + i) % o.miniBatch);
        q = rope(q, inMb, o.ropeTheta);
        k = rope(k, inMb, o.ropeTheta);
      }
      const v = heads(matmul(h, p.wv));
      const eta = reshape(transpose(mul(sigmoid(add(matmul(h, p.wlr), p.blr)), o.baseLr / d), [0, 2, 1]), [B, H, T, 1]);
      const r = kvbScan(kind, o.miniBatch, { q: toBHTd(q), k: toBHTd(k), v: toBHTd(v), eta, lnW: p.lnW, lnB: p.lnB }, st, c.normEps);
      let y = layerNorm(mergeHeads(r.z), p.postW, p.postB, c.normEps);
      if (o.gate) y = mul(y, silu(matmul(h, p.wg)));
      return { out: matmul(y, p.wo), state: stateToRecord(r.state) };
    },
  };
}

registerMixer('kvb-linear', kvbMixer('linear'));
registerMixer('kvb-mlp', kvbMixer('mlp'));
