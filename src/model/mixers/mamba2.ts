/**
 * Mamba-2 sequence mixer (SPEC §5 baseline), written from the equations of Dao & Gu 2024,
 * "Transformers are SSMs: Generalized Models and Efficient Algorithms Through Structured State Space
 * Duality" (arXiv:2405.21060), §6-7 (the SSD algorithm) and the Mamba-2 block of its Figure 6.
 *
 * The block, for h [B, T, D], d_inner E = expand·D, H = E/P heads of dim P, state size N:
 *   z = h W_z [E],  (x, B, C) = h W_xBC [E + 2N],  dt_raw = h W_dt [H]
 *   (x, B, C) = silu(causal depthwise conv_K(x, B, C) + b_conv)        (kernel K, over time)
 *   dt = softplus(dt_raw + dt_bias),  A = −exp(A_log)                   (one scalar per head)
 *   S_t = exp(dt_t·A)·S_{t−1} + dt_t · x_t B_tᵀ      (S [P, N] per head)
 *   y_t = S_t C_t + D_skip·x_t
 *   out = RMSNorm(y ⊙ silu(z)) W_out
 *
 * Training / prefill uses the chunked SSD form with chunk length Q (per chunk, per head, a = dt·A):
 *   L[i, j] = exp(a_{j+1} + … + a_i) for j ≤ i, else 0  — segsum by masked cumsum, no cancellation
 *   Y_diag  = ((C Bᵀ) ⊙ L) (dt·x)                            — the quadratic, attention-like form
 *   S_chunk = Σ_j exp(cs_Q − cs_j) (dt_j x_j) B_jᵀ            — each chunk's own state (cs = cumsum a)
 *   S_c     = exp(cs_Q)·S_{c−1} + S_chunk                      — recurrence over chunks, solved as
 *                                                                one matmul with the chunk-level L
 *   Y_off   = exp(cs_i) · C_i S_{c−1}                          — the carried state's contribution
 * all as batched matmuls over [B, H, chunks]. A single token (T = 1, decoding) takes the recurrent
 * step directly. The state is { ssm [B, H, P, N], conv [B, K−1, D] (the last K−1 mixer inputs h) },
 * so any split of a sequence into chunks gives the same outputs as one pass.
 *
 * Init as in the reference Mamba-2: dt_bias = softplus⁻¹(dt), dt log-uniform in [dtMin, dtMax]
 * (floored at 1e-4); A_log = log U[1, 16]; D_skip = 1; norm gain 1; conv weight and bias
 * U(±1/√K) (PyTorch's Conv1d default); projections N(0, initStd²).
 *
 * Simplifications vs the reference: one B/C group (shared by all heads); no biases in the
 * projections; dt is not clamped (dt_limit = (0, ∞), the reference default); no learnable initial
 * state; the gated norm is over the whole d_inner (ngroups = 1); separate matrices W_z, W_xBC, W_dt
 * instead of one fused in-projection (the same function).
 *
 * Implementation notes: the depthwise conv is folded into the xBC projection (it is linear in h:
 * conv_K(h W)_t = Σ_k h_{t−K+1+k} (W ⊙ w_k)), so it is one GEMM over the K stacked taps of h instead
 * of K shifted elementwise passes, and the conv state holds the last K−1 mixer inputs h [D] rather
 * than the reference's last K−1 conv inputs [E + 2N] (the same function, and a smaller state).
 * softplus is built from existing ops as relu(x) + log(1 + exp(−|x|)) (the engine has no softplus
 * or log1p op). The chunk recurrence is one matmul with the chunk-level decay matrix rather than a
 * loop over chunks: a loop's per-chunk slices cost O(chunks²) in the backward pass (every slice's
 * gradient is a full-size pad; it was the largest single cost of a first version's training
 * step). The matmul costs (T/Q)²·P·N per head, below the intra-chunk T·Q·P + 2·T·P·N while
 * T ≲ 12k at Q = 64, P = 32, N = 64; past that, a blocked scan over chunks would be the next step.
 */
import { z as zod } from 'zod';
import {
  type Tensor, add, arange, concat, cumsum, exp, expandDims, full, greater, greaterEqual, matmul, mul,
  neg, pad, reshape, silu, slice, sub, tensor, transpose, uniformHost, foldIn, where,
} from '../../engine/index.js';
import { rmsNorm, softplus } from '../../nn/layers.js';
import type { ModelConfig } from '../config.js';
import { type MixerState, checkConsecutive, parseMixerOptions, registerMixer } from './registry.js';

const optionsSchema = zod
  .object({
    /** d_inner = expand · dModel. */
    expand: zod.number().int().positive().default(2),
    /** P: width of each SSM head (H = d_inner / P heads). */
    headDim: zod.number().int().positive().default(32),
    /** N: state size (width of B and C). */
    stateSize: zod.number().int().positive().default(64),
    /** K: depthwise causal conv width. */
    convKernel: zod.number().int().min(2).default(4),
    /** Q: SSD chunk length; default the config's miniBatch. */
    chunk: zod.number().int().positive().optional(),
    dtMin: zod.number().positive().default(1e-3),
    dtMax: zod.number().positive().default(0.1),
    dtFloor: zod.number().positive().default(1e-4),
    aMin: zod.number().positive().default(1),
    aMax: zod.number().positive().default(16),
  })
  .strict();

export type Mamba2Options = zod.output<typeof optionsSchema> & { chunk: number };

const parsed = new WeakMap<ModelConfig, Mamba2Options>();

/** The validated mamba2 options of a config (`c.mixer`), with defaults; errors name the field. */
export function mamba2Options(c: ModelConfig): Mamba2Options {
  const hit = parsed.get(c);
  if (hit) return hit;
  const data = parseMixerOptions('mamba2', optionsSchema, c);
  const o = { ...data, chunk: data.chunk ?? c.miniBatch };
  const E = o.expand * c.dModel;
  if (E % o.headDim !== 0) throw new Error(`model config: field 'mixer.headDim': ${o.headDim} does not divide d_inner ${E} (expand ${o.expand} × dModel ${c.dModel})`);
  if (o.dtMin > o.dtMax) throw new Error(`model config: field 'mixer.dtMin': ${o.dtMin} exceeds dtMax ${o.dtMax}`);
  if (o.aMin > o.aMax) throw new Error(`model config: field 'mixer.aMin': ${o.aMin} exceeds aMax ${o.aMax}`);
  parsed.set(c, o);
  return o;
}

export interface Mamba2State extends MixerState {
  /** SSM state per head [B, H, P, N]. */
  ssm: Tensor;
  /** The last K−1 inputs of the mixer (the conv's window before the projection) [B, K−1, D]. */
  conv: Tensor;
}


/**
 * exp(segsum(a)) for a [..., Q]: L[..., i, j] = exp(a_{j+1} + … + a_i) for j ≤ i, 0 above the
 * diagonal. Each sum is a cumsum of a masked copy (no difference of cumsums, so no cancellation).
 */
export function decayMatrix(a: Tensor): Tensor {
  const Q = a.shape[a.rank - 1];
  const i = reshape(arange(0, Q), [Q, 1]);
  const j = reshape(arange(0, Q), [1, Q]);
  const rows = where(greater(i, j), expandDims(a, -1), 0); // a_i at (i, j) for i > j
  const seg = cumsum(rows, -2); // Σ_{j<k≤i} a_k (0 on and above the diagonal)
  return where(greaterEqual(i, j), exp(seg), 0);
}

/**
 * SSD, chunked (Q) over T, for dtx = dt·x [B, T, H, P], a = dt·A [B, T, H], Bm, Cm [B, T, N] and the
 * entering state s0 [B, H, P, N] (null = zeros). Returns y [B, T, H, P] (without the D skip) and the
 * state after the last position. Layout [B, H, chunk, Q, ·]: every step is a batched matmul or an
 * elementwise op on contiguous blocks.
 */
export function ssdChunked(dtx: Tensor, a: Tensor, Bm: Tensor, Cm: Tensor, s0: Tensor | null, Q: number): { y: Tensor; state: Tensor } {
  const [B, T, H, P] = dtx.shape;
  const N = Bm.shape[2];
  const nc = Math.ceil(T / Q);
  const extra = nc * Q - T;
  // Padding with dt = 0 and zero inputs: decay 1 and nothing added, so the final state is exact.
  const padT = (t: Tensor) => (extra ? pad(t, t.shape.map((_, d) => (d === 1 ? [0, extra] : [0, 0]) as [number, number])) : t);
  const X = reshape(transpose(padT(dtx), [0, 2, 1, 3]), [B, H, nc, Q, P]);
  const A = reshape(transpose(padT(a), [0, 2, 1]), [B, H, nc, Q]);
  const Bc = reshape(padT(Bm), [B, 1, nc, Q, N]); // one group: shared by the heads
  const Cc = reshape(padT(Cm), [B, 1, nc, Q, N]);
  const cs = cumsum(A, -1); // [B, H, c, Q]
  // 1. Within each chunk: the quadratic form ((C Bᵀ) ⊙ L) X.
  const G = matmul(Cc, Bc, { transB: true }); // [B, 1, c, Q, Q]
  const yDiag = matmul(mul(G, decayMatrix(A)), X); // [B, H, c, Q, P]
  // 2. Each chunk's own final state (from zero): Σ_j exp(cs_Q − cs_j) X_jᵀ B_j.
  const last = slice(cs, [0, 0, 0, Q - 1]); // [B, H, c, 1]
  const own = matmul(mul(X, expandDims(exp(sub(last, cs)), -1)), Bc, { transA: true }); // [B, H, c, P, N]
  // 3. The recurrence S_c = exp(Σ_chunk a)·S_{c−1} + own_c, solved at once as a matmul with the
  //    chunk-level decay matrix (segsum over the chunk totals, s0 as chunk −1): no per-chunk slices,
  //    so the backward pass stays one matmul too.
  const s0f = s0 ? reshape(s0, [B, H, 1, P * N]) : full([B, H, 1, P * N], 0, dtx.dtype, dtx);
  const states = concat([s0f, reshape(own, [B, H, nc, P * N])], 2); // [B, H, c+1, P·N]
  const chunkA = pad(reshape(last, [B, H, nc]), [[0, 0], [0, 0], [1, 0]]); // [B, H, c+1]
  const after = matmul(decayMatrix(chunkA), states); // state after chunk c−1, i.e. entering chunk c
  const enter = reshape(slice(after, [0, 0, 0], [B, H, nc]), [B, H, nc, P, N]);
  const state = reshape(slice(after, [0, 0, nc]), [B, H, P, N]);
  // 4. The entering state's contribution: exp(cs_i) · C_i S_enter.
  const yOff = mul(matmul(Cc, enter, { transB: true }), expandDims(exp(cs), -1)); // [B, H, c, Q, P]
  let y = transpose(reshape(add(yDiag, yOff), [B, H, nc * Q, P]), [0, 2, 1, 3]); // [B, T', H, P]
  if (extra) y = slice(y, [0, 0], [B, T]);
  return { y, state };
}

/** One recurrent step (T = 1): S = exp(dt·A)·S + (dt·x) Bᵀ, y = S C. */
function ssdStep(dtx: Tensor, a: Tensor, Bm: Tensor, Cm: Tensor, s0: Tensor | null): { y: Tensor; state: Tensor } {
  const [B, , H, P] = dtx.shape;
  const N = Bm.shape[2];
  const inject = matmul(reshape(dtx, [B, H, P, 1]), reshape(Bm, [B, 1, 1, N])); // [B, H, P, N]
  const s = s0 ? add(mul(s0, reshape(exp(a), [B, H, 1, 1])), inject) : inject;
  const y = matmul(s, reshape(Cm, [B, 1, N, 1])); // [B, H, P, 1]
  return { y: reshape(y, [B, 1, H, P]), state: s };
}

const range = (n: number): number[] => Array.from({ length: n }, (_, i) => i);

registerMixer('mamba2', {
  init(c, _layer, init) {
    const o = mamba2Options(c);
    const D = c.dModel;
    const E = o.expand * D;
    const N = o.stateSize;
    const H = E / o.headDim;
    const K = o.convKernel;
    const ch = E + 2 * N;
    const wz = init.normal('wz', [D, E]);
    const dtype = wz.dtype;
    const host = (name: string, n: number, f: (u: number) => number) => Array.from(uniformHost(foldIn(init.key, name), n), f);
    const bound = 1 / Math.sqrt(K);
    const lo = Math.log(o.dtMin);
    const hi = Math.log(o.dtMax);
    const dtBias = host('dtBias', H, (u) => {
      const dt = Math.max(Math.exp(lo + u * (hi - lo)), o.dtFloor);
      return dt + Math.log(-Math.expm1(-dt)); // softplus⁻¹(dt)
    });
    return {
      wz,
      wxbc: init.normal('wxbc', [D, ch]),
      wdt: init.normal('wdt', [D, H]),
      convW: tensor(host('convW', K * ch, (u) => (2 * u - 1) * bound), [K, ch], dtype),
      convB: tensor(host('convB', ch, (u) => (2 * u - 1) * bound), [ch], dtype),
      dtBias: tensor(dtBias, [H], dtype),
      aLog: tensor(host('aLog', H, (u) => Math.log(o.aMin + u * (o.aMax - o.aMin))), [H], dtype),
      dSkip: init.full([H], 1),
      norm: init.full([E], 1),
      wout: init.normal('wout', [E, D]),
    };
  },

  forward(c, p, h, positions, state) {
    checkConsecutive('mamba2', positions);
    const o = mamba2Options(c);
    const st = state as Mamba2State | null;
    const [B, T] = h.shape;
    const E = o.expand * c.dModel;
    const N = o.stateSize;
    const P = o.headDim;
    const H = E / P;
    const K = o.convKernel;
    const ch = E + 2 * N;
    const z = matmul(h, p.wz); // [B, T, E]
    const dtRaw = matmul(h, p.wdt); // [B, T, H]
    // Causal depthwise conv over (x, B, C) = h W_xBC, continuing from the previous inputs. The conv
    // is linear in h, so it folds into the projection: conv_K(h W)_t = Σ_k h_{t−K+1+k} (W ⊙ w_k), one
    // GEMM of [h_{t−K+1} … h_t] with the K scaled copies of W, instead of K shifted elementwise passes.
    const hpad = concat([st ? st.conv : full([B, K - 1, c.dModel], 0, h.dtype, h), h], 1); // [B, T+K−1, D]
    const taps = concat(range(K).map((k) => slice(hpad, [0, k], [B, k + T])), -1); // [B, T, K·D]
    const wFolded = reshape(mul(reshape(p.wxbc, [1, c.dModel, ch]), reshape(p.convW, [K, 1, ch])), [K * c.dModel, ch]);
    const xbc = silu(add(matmul(taps, wFolded), p.convB)); // [B, T, E + 2N]
    const convState = slice(hpad, [0, T]);
    const x = reshape(slice(xbc, [0, 0, 0], [B, T, E]), [B, T, H, P]);
    const Bm = slice(xbc, [0, 0, E], [B, T, E + N]);
    const Cm = slice(xbc, [0, 0, E + N], [B, T, ch]);
    // Discretisation: dt per head and position, A = −exp(A_log).
    const dt = softplus(add(dtRaw, p.dtBias)); // [B, T, H]
    const a = mul(dt, neg(exp(p.aLog))); // dt·A [B, T, H]
    const dtx = mul(x, expandDims(dt, -1)); // [B, T, H, P]
    const ssm = T === 1 ? ssdStep(dtx, a, Bm, Cm, st?.ssm ?? null) : ssdChunked(dtx, a, Bm, Cm, st?.ssm ?? null, o.chunk);
    const y = reshape(add(ssm.y, mul(x, reshape(p.dSkip, [H, 1]))), [B, T, E]);
    const out = matmul(rmsNorm(mul(y, silu(z)), p.norm, c.normEps), p.wout);
    const next: Mamba2State = { ssm: ssm.state, conv: convState };
    return { out, state: next };
  },
});
