/**
 * Gated DeltaNet sequence mixer (SPEC §5 baseline).
 *
 * References:
 *  - S. Yang, J. Kautz, A. Hatamizadeh, "Gated Delta Networks: Improving Mamba2 with Delta Rule"
 *    (arXiv:2412.06464, ICLR 2025): the gated delta rule and the layer around it.
 *  - S. Yang, B. Wang, Y. Zhang, Y. Shen, Y. Kim, "Parallelizing Linear Transformers with the Delta
 *    Rule over Sequence Length" (arXiv:2406.06484, NeurIPS 2024): the chunkwise WY / UT-transform form.
 *
 * Per head (state S ∈ ℝ^{d_v×d_k}), for token t:
 *   q_t, k_t, v_t = silu(causalConv4(x W_q|k|v)),  q_t, k_t L2-normalised, q_t scaled by 1/√d_k
 *   α_t = exp(−exp(A_log) · softplus(x_t W_a + dt_bias)) ∈ (0, 1),   β_t = sigmoid(x_t W_b) ∈ (0, 1)
 *   S_t = α_t S_{t−1} (I − β_t k_t k_tᵀ) + β_t v_t k_tᵀ,              o_t = S_t q_t
 *   y_t = W_o · [RMSNorm_head(o_t) ⊙ silu(x_t W_g)]
 *
 * Chunkwise form (chunk length C, a power of two). Inside a chunk with starting state S₀, let
 * g_i = Σ_{j≤i} log α_j (cumulative log-decay from the chunk start) and γ_i = exp(g_i). Writing the
 * recurrence as S_t = α_t S_{t−1} + u_t k_tᵀ with u_t = β_t (v_t − α_t S_{t−1} k_t) gives the
 * triangular system (I + A) U_all = β⊙V − (β⊙γ⊙K) S₀ᵀ with A_ij = β_i (k_i·k_j) e^{g_i−g_j} (i > j).
 * With the UT transform 𝒯 = (I + A)⁻¹:
 *   W = 𝒯 (β⊙γ⊙K),  U = 𝒯 (β⊙V),  U_all = U − W S₀ᵀ                       (the WY representation)
 *   O = (γ⊙Q) S₀ᵀ + (QKᵀ ⊙ Γ) U_all,  Γ_ij = e^{g_i−g_j} for i ≥ j, 0 above  (intra-chunk term)
 *   S_C = γ_C S₀ + U_allᵀ (e^{g_C−g}⊙K)                                     (inter-chunk recurrence)
 * All chunks are processed at once by batched matmuls. The inter-chunk recurrence is affine,
 * S_{n+1} = S_n M_n + R_n with M_n = γ_C I − Wᵀ(e^{g_C−g}⊙K), R_n = Uᵀ(e^{g_C−g}⊙K), so instead of a
 * loop over the T/C chunks it is an inclusive scan (Hillis–Steele, ⌈log₂(T/C)⌉ levels of batched
 * [d,d_k]×[d_k,d_k] matmuls; shifts along the chunk axis are matmuls with a constant shift matrix).
 * Why not the plain loop: in this engine a slice's backward is a full-size pad, so slicing chunk n
 * out of a [.., N, ..] tensor N times costs O(N²) in the backward pass (measured: same speed as the
 * scan at N = 16, worse beyond). The outputs then come from the chunk-start states in one batched
 * matmul: O = (γ⊙Q − P W) S₀ᵀ + P U with P = QKᵀ ⊙ Γ.
 * 𝒯 is computed by blockwise doubling: with D the inverse of the block-diagonal part of I + A
 * (blocks of size s) and A_s the entries joining the two halves of each 2s-block,
 * (D⁻¹ + A_s)⁻¹ = D − D A_s D ([[D₀,0],[A₂₁,D₁]]⁻¹ = [[D₀⁻¹,0],[−D₁⁻¹A₂₁D₀⁻¹,D₁⁻¹]] for every
 * pair at once), log₂C levels of two batched [C,C] matmuls with constant masks. It never forms
 * powers of A (the Neumann product (I−A)(I+A²)(I+A⁴)… is exact but cancels catastrophically in
 * float32 when keys are correlated; a test checks float32 with identical keys). e^{g_i−g_j} is only
 * evaluated with a clamped exponent <= 0, so strong decay cannot overflow.
 * A T = 1 call (decoding) takes the recurrent step directly; any call continues from the state.
 *
 * State: S [B, H, d_v, d_k] and the conv inputs of the last (kernel − 1) positions.
 *
 * Options (`config.mixer`, validated; defaults in brackets): heads [nHeads], headDim = d_k
 * [dModel / heads], expandV = d_v / d_k [1], convSize [4], chunkSize [power of two near miniBatch,
 * clamped to 16..64], normEps [config.normEps], l2Eps [1e-6].
 *
 * Simplifications against the paper's reference implementation (flash-linear-attention):
 *  - d_v = d_k · expandV with expandV = 1 by default (the paper uses 2 at 1.3B with fewer heads);
 *  - the short convolutions have no bias; conv weights init U(−1/√K, 1/√K) (PyTorch's Conv1d
 *    default for depthwise), projections N(0, initStd²) like the rest of the model;
 *  - A ~ U(1, 16) (per head, then A_log = log A) and dt ~ logU(1e-3, 1e-1) with dt_bias = softplus⁻¹(dt),
 *    as in Mamba2 / the reference; the output-norm gain is shared by all heads (as the reference's
 *    FusedRMSNormGated) and no weight decay exclusions are encoded here;
 *  - softplus is built from existing ops: x for x > 20, else log(1 + eᵡ) (no log1p op in the engine);
 *  - no fused kernels: everything is composite engine ops (batched matmuls, elementwise, slices),
 *    so second-order autodiff works through it and the matmuls map to GEMMs on the GPU.
 */
import { z } from 'zod';
import {
  type Tensor, add, concat, cumsum, exp, expandDims, matmul, minimum, mul, neg, pad, reshape, rsqrt,
  sigmoid, silu, slice, sub, sum, tensor, transpose, uniformHost, foldIn, zeros,
} from '../../engine/index.js';
import { rmsNorm, softplus } from '../../nn/layers.js';
import type { ModelConfig } from '../config.js';
import { type Mixer, type MixerState, checkConsecutive, parseMixerOptions, registerMixer } from './registry.js';

// ---- options ---------------------------------------------------------------------------------

const isPow2 = (n: number) => Number.isInteger(n) && n > 0 && (n & (n - 1)) === 0;

const optionsSchema = z
  .object({
    heads: z.number().int().positive().optional(),
    headDim: z.number().int().positive().optional(),
    expandV: z.number().positive().default(1),
    convSize: z.number().int().positive().default(4),
    chunkSize: z.number().int().positive().refine(isPow2, 'must be a power of two').optional(),
    normEps: z.number().positive().optional(),
    l2Eps: z.number().positive().default(1e-6),
  })
  .strict();

export interface GatedDeltaNetOptions {
  heads: number;
  dk: number;
  dv: number;
  convSize: number;
  chunkSize: number;
  normEps: number;
  l2Eps: number;
}

const optionsCache = new WeakMap<object, WeakMap<ModelConfig, GatedDeltaNetOptions>>();

/** The mixer's options from `c.mixer`, validated, with defaults filled in. Errors name the field. */
export function gatedDeltaNetOptions(c: ModelConfig): GatedDeltaNetOptions {
  let byConfig = optionsCache.get(c.mixer);
  const hit = byConfig?.get(c);
  if (hit) return hit;
  const o = parseMixerOptions('gated-deltanet', optionsSchema, c);
  const heads = o.heads ?? c.nHeads;
  const dk = o.headDim ?? c.dModel / heads;
  if (!Number.isInteger(dk)) throw new Error(`model config: field 'mixer.heads': ${heads} heads do not divide dModel ${c.dModel} (gated-deltanet; set mixer.headDim)`);
  const dv = dk * o.expandV;
  if (!Number.isInteger(dv)) throw new Error(`model config: field 'mixer.expandV': d_v = ${dk}·${o.expandV} is not an integer (gated-deltanet)`);
  let chunkSize = o.chunkSize;
  if (chunkSize === undefined) {
    chunkSize = 1;
    while (chunkSize * 2 <= c.miniBatch) chunkSize *= 2;
    chunkSize = Math.min(64, Math.max(16, chunkSize));
  }
  const r: GatedDeltaNetOptions = { heads, dk, dv, convSize: o.convSize, chunkSize, normEps: o.normEps ?? c.normEps, l2Eps: o.l2Eps };
  if (!byConfig) optionsCache.set(c.mixer, (byConfig = new WeakMap()));
  byConfig.set(c, r);
  return r;
}

// ---- state -------------------------------------------------------------------------------------

export interface GatedDeltaState extends MixerState {
  /** S [B, H, d_v, d_k]. */
  S: Tensor;
  /** Inputs of the last (convSize − 1) positions to each short convolution [B, convSize − 1, channels]. */
  convQ: Tensor;
  convK: Tensor;
  convV: Tensor;
}

// ---- helpers -----------------------------------------------------------------------------------

/** x / sqrt(Σx² + eps) over the last axis. */
function l2Normalize(x: Tensor, eps: number): Tensor {
  return mul(x, rsqrt(add(sum(mul(x, x), -1, true), eps)));
}

/**
 * Causal depthwise convolution of x [B, T, C] with w [K, C] (tap K−1 is the current position),
 * continuing from `prev` [B, K−1, C] (the inputs before x; zeros at a document start).
 * Returns y [B, T, C] and the last K−1 inputs for the next call.
 */
function causalConv(x: Tensor, w: Tensor, prev: Tensor | null): { y: Tensor; next: Tensor } {
  const [B, T, C] = x.shape;
  const K = w.shape[0];
  if (K === 1) return { y: mul(x, reshape(w, [C])), next: slice(x, [0, T, 0]) };
  const xp = prev ? concat([prev, x], 1) : pad(x, [[0, 0], [K - 1, 0], [0, 0]]);
  let y: Tensor | null = null;
  for (let i = 0; i < K; i++) {
    const term = mul(slice(xp, [0, i, 0], [B, i + T, C]), reshape(slice(w, [i, 0], [i + 1, C]), [C]));
    y = y ? add(y, term) : term;
  }
  return { y: y!, next: slice(xp, [0, T, 0]) };
}

/** A constant [n, m] matrix with 1 where on(i, j) (built per call: no module-level tensors to leak or outlive a backend). */
function constMatrix(n: number, m: number, dtype: Tensor['dtype'], on: (i: number, j: number) => boolean): Tensor {
  const v = new Float64Array(n * m);
  for (let i = 0; i < n; i++) for (let j = 0; j < m; j++) if (on(i, j)) v[i * m + j] = 1;
  return tensor(v, [n, m], dtype);
}

/**
 * 𝒯 = (I + tril₋₁(A))⁻¹ for A [..., C, C] (C a power of two; entries on and above the diagonal are ignored), by blockwise
 * doubling: with D the inverse of the block-diagonal part (blocks of size s) and A_s the entries of A
 * that join the two halves of each 2s-block, (D⁻¹ + A_s)⁻¹ = D − D A_s D is the inverse with blocks
 * of size 2s. log₂C levels of two batched [C,C] matmuls; full-size masks instead of block slices,
 * so the backward pass has no scatter (pad) of block slices either.
 */
export function utTransform(A: Tensor): Tensor {
  const C = A.shape[A.rank - 1];
  const half = (s: number) => constMatrix(C, C, A.dtype, (i, j) => Math.floor(i / (2 * s)) === Math.floor(j / (2 * s)) && Math.floor(i / s) % 2 === 1 && Math.floor(j / s) % 2 === 0);
  const eye = constMatrix(C, C, A.dtype, (i, j) => i === j);
  let D = C > 1 ? sub(eye, mul(A, half(1))) : add(mul(A, 0), eye);
  for (let s = 2; s < C; s *= 2) D = sub(D, matmul(D, matmul(mul(A, half(s)), D)));
  return D;
}

/**
 * The gated delta rule over a sequence, chunkwise. q, k [B, H, T, d_k] (q already scaled, both
 * normalised), v [B, H, T, d_v], g = log α and beta [B, H, T], S0 [B, H, d_v, d_k] or null.
 * Returns o [B, H, T, d_v] and the final state.
 */
export function gatedDeltaChunked(
  q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, S0: Tensor | null, chunk: number,
): { o: Tensor; S: Tensor } {
  const [B, H, T, dk] = k.shape;
  const dv = v.shape[3];
  const dt = q.dtype;
  let C = 1;
  while (C < Math.min(T, chunk)) C *= 2;
  const N = Math.ceil(T / C);
  const Tp = N * C;
  // Padding positions are identity steps: α = 1 (g = 0), β = 0, k = 0.
  const padT = (x: Tensor) => (Tp === T ? x : pad(x, x.shape.map((_, a) => (a === 2 ? [0, Tp - T] : [0, 0]) as [number, number])));
  const qc = reshape(padT(q), [B, H, N, C, dk]);
  const kc = reshape(padT(k), [B, H, N, C, dk]);
  const vc = reshape(padT(v), [B, H, N, C, dv]);
  const bc = expandDims(reshape(padT(beta), [B, H, N, C]), -1); // [B,H,N,C,1]
  const gc = cumsum(reshape(padT(g), [B, H, N, C]), -1); // cumulative log-decay inside each chunk
  const gLast = slice(gc, [0, 0, 0, C - 1]); // [B,H,N,1]
  const kb = mul(kc, bc);
  // e^{g_i − g_j} on and below the diagonal (the exponent is <= 0 there; clamped above, then masked).
  const decay = mul(exp(minimum(sub(expandDims(gc, -1), expandDims(gc, -2)), 0)), constMatrix(C, C, dt, (i, j) => j <= i));
  // A_ij = β_i (k_i·k_j) e^{g_i−g_j}; its diagonal is left in: utTransform reads only entries below it.
  const Tinv = utTransform(mul(matmul(kb, kc, { transB: true }), decay)); // [B,H,N,C,C]
  const gamma = expandDims(exp(gc), -1); // [B,H,N,C,1]
  const W = matmul(Tinv, mul(kb, gamma)); // [B,H,N,C,dk]
  const U = matmul(Tinv, mul(vc, bc)); // [B,H,N,C,dv]
  const P = mul(matmul(qc, kc, { transB: true }), decay); // intra-chunk term [B,H,N,C,C]
  const kd = mul(kc, expandDims(exp(sub(gLast, gc)), -1)); // e^{g_C − g_j} k_j
  // Chunk transitions S_{n+1} = S_n M_n + R_n, then an inclusive scan over chunks (Hillis–Steele:
  // log₂N levels of batched matmuls; shifts along the chunk axis are matmuls with a constant shift
  // matrix, so neither direction slices per chunk).
  let M = sub(mul(expandDims(exp(gLast), -1), constMatrix(dk, dk, dt, (i, j) => i === j)), matmul(W, kd, { transA: true })); // [B,H,N,dk,dk]
  let R = matmul(U, kd, { transA: true }); // [B,H,N,dv,dk]
  const eyeRows = (d: number) => constMatrix(N, dk * dk, dt, (n, e) => n < d && Math.floor(e / dk) === e % dk); // identity for n < d
  const shift = (d: number) => constMatrix(N, N, dt, (n, m) => m === n - d);
  const shifted = (x: Tensor, d: number, fillIdentity: boolean) => {
    const flat = matmul(shift(d), reshape(x, [B, H, N, x.shape[3] * dk]));
    return reshape(fillIdentity ? add(flat, eyeRows(d)) : flat, x.shape);
  };
  for (let d = 1; d < N; d *= 2) {
    const Rs = shifted(R, d, false);
    const nextM = 2 * d < N || S0 ? matmul(shifted(M, d, true), M) : M; // the last level's M is only needed with S0
    R = add(matmul(Rs, M), R);
    M = nextM;
  }
  // State at the start of each chunk (exclusive scan) and after the last one.
  let starts = N > 1 ? shifted(R, 1, false) : zeros([B, H, 1, dv, dk], dt);
  const last = (x: Tensor) => reshape(slice(x, [0, 0, N - 1]), [B, H, x.shape[3], dk]);
  let S = last(R);
  if (S0) {
    const S0b = expandDims(S0, 2);
    starts = add(starts, matmul(S0b, N > 1 ? shifted(M, 1, true) : constMatrix(dk, dk, dt, (i, j) => i === j)));
    S = add(S, matmul(S0, last(M)));
  }
  const Qeff = sub(mul(qc, gamma), matmul(P, W));
  const o = add(matmul(P, U), matmul(Qeff, starts, { transB: true })); // [B,H,N,C,dv]
  const out = reshape(o, [B, H, Tp, dv]);
  return { o: Tp === T ? out : slice(out, [0, 0, 0, 0], [B, H, T, dv]), S };
}

/** One token of the gated delta rule: q, k [B,H,1,d_k], v [B,H,1,d_v], g, beta [B,H,1], S [B,H,d_v,d_k] or null. */
export function gatedDeltaStep(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, S: Tensor | null): { o: Tensor; S: Tensor } {
  const b = expandDims(beta, -1); // [B,H,1,1]
  let next: Tensor;
  if (S) {
    const a = expandDims(exp(g), -1);
    const kS = matmul(k, S, { transB: true }); // (S k)ᵀ [B,H,1,dv]
    const u = mul(b, sub(v, mul(a, kS))); // β (v − α S k)
    next = add(mul(a, S), matmul(u, k, { transA: true })); // α S + u kᵀ
  } else {
    next = matmul(mul(b, v), k, { transA: true });
  }
  return { o: matmul(q, next, { transB: true }), S: next };
}

// ---- the mixer ------------------------------------------------------------------------------

const gatedDeltaNet: Mixer = {
  init(c, _layer, init) {
    const o = gatedDeltaNetOptions(c);
    const D = c.dModel;
    const { heads: H, dk, dv, convSize: K } = o;
    const dtype = init.full([1], 0).dtype;
    const host = (name: string, n: number) => uniformHost(foldIn(init.key, name), n);
    const conv = (name: string, ch: number) => {
      const u = host(name, K * ch);
      const bound = 1 / Math.sqrt(K);
      return tensor(u.map((x) => (2 * x - 1) * bound), [K, ch], dtype);
    };
    const aLog = host('aLog', H).map((u) => Math.log(1 + 15 * u));
    const dtBias = host('dt', H).map((u) => {
      const dt = Math.max(1e-4, Math.exp(Math.log(1e-3) + u * (Math.log(1e-1) - Math.log(1e-3))));
      return dt + Math.log(-Math.expm1(-dt)); // softplus⁻¹(dt)
    });
    return {
      wq: init.normal('wq', [D, H * dk]),
      wk: init.normal('wk', [D, H * dk]),
      wv: init.normal('wv', [D, H * dv]),
      wa: init.normal('wa', [D, H]),
      wb: init.normal('wb', [D, H]),
      wg: init.normal('wg', [D, H * dv]),
      wo: init.normal('wo', [H * dv, D]),
      convQ: conv('convQ', H * dk),
      convK: conv('convK', H * dk),
      convV: conv('convV', H * dv),
      aLog: tensor(aLog, [H], dtype),
      dtBias: tensor(dtBias, [H], dtype),
      oNorm: init.full([dv], 1),
    };
  },

  forward(c, p, h, positions, state) {
    checkConsecutive('gated-deltanet', positions);
    const o = gatedDeltaNetOptions(c);
    const { heads: H, dk, dv } = o;
    const [B, T] = h.shape;
    if (positions.length !== T) throw new Error(`gated-deltanet: ${positions.length} positions for ${T} tokens`);
    const st = state as GatedDeltaState | null;
    const cq = causalConv(matmul(h, p.wq), p.convQ, st?.convQ ?? null);
    const ck = causalConv(matmul(h, p.wk), p.convK, st?.convK ?? null);
    const cv = causalConv(matmul(h, p.wv), p.convV, st?.convV ?? null);
    const heads = (x: Tensor, d: number) => transpose(reshape(x, [B, T, H, d]), [0, 2, 1, 3]); // [B,H,T,d]
    const q = mul(l2Normalize(heads(silu(cq.y), dk), o.l2Eps), 1 / Math.sqrt(dk));
    const k = l2Normalize(heads(silu(ck.y), dk), o.l2Eps);
    const v = heads(silu(cv.y), dv);
    const perHead = (x: Tensor) => transpose(x, [0, 2, 1]); // [B,T,H] → [B,H,T]
    const g = perHead(mul(neg(exp(p.aLog)), softplus(add(matmul(h, p.wa), p.dtBias)))); // log α
    const beta = perHead(sigmoid(matmul(h, p.wb)));
    const r = T === 1 ? gatedDeltaStep(q, k, v, g, beta, st?.S ?? null) : gatedDeltaChunked(q, k, v, g, beta, st?.S ?? null, o.chunkSize);
    const y = rmsNorm(transpose(r.o, [0, 2, 1, 3]), p.oNorm, o.normEps); // [B,T,H,dv]
    const gate = silu(reshape(matmul(h, p.wg), [B, T, H, dv]));
    const out = matmul(reshape(mul(y, gate), [B, T, H * dv]), p.wo);
    const next: GatedDeltaState = { S: r.S, convQ: cq.next, convK: ck.next, convV: cv.next };
    return { out, state: next };
  },
};

registerMixer('gated-deltanet', gatedDeltaNet);
