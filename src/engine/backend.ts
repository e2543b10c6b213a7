import type { DType, HostArray } from './dtype.js';

/** A backend's handle to device (or host) memory. The engine never looks inside. */
export type BackendData = unknown;

export type UnaryOp =
  | 'neg' | 'exp' | 'log' | 'sqrt' | 'rsqrt' | 'tanh' | 'sigmoid' | 'silu'
  | 'square' | 'abs' | 'cos' | 'sin' | 'sign' | 'reciprocal';
export type BinaryOp = 'add' | 'sub' | 'mul' | 'div' | 'pow' | 'maximum' | 'minimum';
export type CompareOp = 'eq' | 'ne' | 'lt' | 'le' | 'gt' | 'ge';
/** sumSquares: Σ x², accumulated as sum is (the square taken in the accumulation type). */
export type ReduceOp = 'sum' | 'max' | 'min' | 'sumSquares';
/** Where RoPE's heads axis goes: kept ([.., T, H, D] to the same), split off ([.., T, H, D] → [.., H, T, D]) or merged back. */
export type RopeLayout = 'same' | 'split' | 'merge';

/** A batched product C_i = op(A_i) op(B_i); offsets are element offsets of each batch entry. */
export interface MatmulJob {
  batch: number;
  m: number;
  n: number;
  k: number;
  transA: boolean;
  transB: boolean;
  aOffsets: Int32Array;
  bOffsets: Int32Array;
}

/**
 * Banded causal attention over `batch` independent [T, D] problems (all contiguous, D fastest).
 * Query row i sits at absolute position qStart + i, key row j at kStart + j; a query at p sees the
 * key at s iff s <= p and p - s < window (window = Infinity: plain causal). The engine has checked
 * that every query sees at least one key.
 */
export interface AttentionJob {
  /** Query batch entries (all leading axes of q flattened, heads innermost). */
  batch: number;
  /**
   * Query heads per key/value head (grouped-query attention; default 1): query entry n reads key/value
   * entry ⌊n / groups⌋, and k, v hold batch / groups entries.
   */
  groups?: number;
  tq: number;
  tk: number;
  d: number;
  qStart: number;
  kStart: number;
  window: number;
  scale: number;
  /**
   * Where the keys and values sit in k and v when those are rows of a larger store (a preallocated KV
   * cache): key row j of key/value entry e is at element kvOffset + e·kvStride + j·d. Default 0 and
   * tk·d (contiguous). dK and dV are always contiguous.
   */
  kvOffset?: number;
  kvStride?: number;
  /**
   * Backward only: dK and dV are taken for key rows [gradKeysFrom, tk) alone (the rows before are
   * constants: a KV cache read by the TTT inner step) and hold tk − gradKeysFrom rows per key/value
   * entry. Default 0. dQ still sums over every visible key.
   */
  gradKeysFrom?: number;
  /**
   * Forward only: positions read where the kernel runs (a launch plan replays one step at every
   * position). keyPositions int32 [tk] gives each key row's absolute position (negative: an empty
   * row, never visible) and queryPosition int32 [1] that of query row 0, replacing kStart + j and
   * qStart + i in the visibility rule; keys may then sit in any order (a ring buffer).
   */
  keyPositions?: BackendData;
  queryPosition?: BackendData;
}

/** Device work recorded once and replayed (a CUDA graph). */
export interface CapturedWork {
  /** Queues the recorded work again, reading and writing the same memory. */
  replay(): void;
  /** Frees the recording and the memory its intermediates used. */
  dispose(): void;
}

/**
 * Kernels only: shapes are already checked and broadcast by the engine, and every gradient is
 * written in ops above this line. Outputs are new contiguous buffers unless a method says otherwise.
 * Strided inputs use element strides (0 = broadcast).
 */
export interface Backend {
  readonly name: string;
  /**
   * Whether layers should take the fused elementwise ops (RoPE, the SwiGLU gate, the token NLL, AdamW)
   * by default: true where each kernel launch is the cost (a GPU), false where the composite ops are
   * themselves fast (the CPU's run in WebAssembly SIMD across threads, and beat its scalar fused loops).
   */
  readonly preferFused: boolean;
  info(): Record<string, unknown>;
  upload(values: HostArray, dtype: DType): BackendData;
  /** Copy to the host. Synchronous: a device backend waits for its queue here. */
  download(data: BackendData, dtype: DType, size: number): HostArray;
  free(data: BackendData, dtype: DType, size: number): void;
  fill(size: number, dtype: DType, value: number): BackendData;
  /** Storage of `size` elements with unspecified contents, for a caller that overwrites all of them. */
  empty(size: number, dtype: DType): BackendData;
  unary(op: UnaryOp, x: BackendData, size: number, dtype: DType): BackendData;
  binary(op: BinaryOp, a: BackendData, aStrides: number[], b: BackendData, bStrides: number[], shape: number[], dtype: DType): BackendData;
  /** Result dtype is `bool`; `dtype` is the inputs'. */
  compare(op: CompareOp, a: BackendData, aStrides: number[], b: BackendData, bStrides: number[], shape: number[], dtype: DType): BackendData;
  where(cond: BackendData, cStrides: number[], a: BackendData, aStrides: number[], b: BackendData, bStrides: number[], shape: number[], dtype: DType): BackendData;
  /** a + b·c over inputs broadcast to `shape` (float dtypes; one rounding, in the backend's math type). */
  addcmul(a: BackendData, aStrides: number[], b: BackendData, bStrides: number[], c: BackendData, cStrides: number[], shape: number[], dtype: DType): BackendData;
  /** Reduce the middle axis of a contiguous [outer, n, inner] array to [outer, inner]. */
  reduce(op: ReduceOp, x: BackendData, outer: number, n: number, inner: number, dtype: DType): BackendData;
  /**
   * Softmax / logsumexp over the last axis of a contiguous [outer, n] array. softmax's `bias` ([rows, n] of dtype,
   * rows dividing outer) is added first, row o taking bias row o mod rows, the sum rounded to dtype as an add would.
   */
  softmax(x: BackendData, outer: number, n: number, dtype: DType, bias?: { data: BackendData; rows: number }): BackendData;
  logsumexp(x: BackendData, outer: number, n: number, dtype: DType): BackendData;
  /**
   * Whether softmax's backward is the two row kernels below: dx = y ⊙ (g − Σ g ⊙ y) in one pass, and in a
   * second-order trace that backward as one op (engine `softmaxGrad`, the composite attention's largest
   * chain) whose own backward is one pass too. Else the engine composes it from elementwise ops and a sum.
   */
  readonly softmaxGradKernel: boolean;
  /** Over `outer` rows of n: dx = y ⊙ (g − s) with s = Σ y ⊙ g per row (y: softmax's output, g: its cotangent). */
  softmaxBackward(y: BackendData, g: BackendData, outer: number, n: number, dtype: DType): BackendData;
  /**
   * The backward of that backward, given u (the cotangent of dx): with s = Σ y ⊙ g and r = Σ y ⊙ u per row,
   *   dy = u ⊙ (g − s) − r · g,   dg = y ⊙ (u − r).
   */
  softmaxGradBackward(y: BackendData, g: BackendData, u: BackendData, outer: number, n: number, dtype: DType): { dy: BackendData; dg: BackendData };
  /** Inclusive cumulative sum along the middle axis of [outer, n, inner]. */
  cumsum(x: BackendData, outer: number, n: number, inner: number, reverse: boolean, dtype: DType): BackendData;
  /**
   * The product of `dtype` operands, written in `outDType` (default dtype; float32 from bfloat16 where the backend has
   * bfloat16). With `accumulate` (contiguous [batch, m, n] of outDType), the product is added into that buffer in
   * place (a GEMM with β = 1), which is returned: the backward adds a weight's gradient into its running cotangent so.
   */
  matmul(a: BackendData, b: BackendData, job: MatmulJob, dtype: DType, outDType?: DType, accumulate?: BackendData): BackendData;
  /**
   * dst += src over `size` elements of `dtype`, in place (the backward's running cotangents); src may be of another
   * float dtype (`srcDType`: a bfloat16 contribution to a float32 cotangent), widened or rounded as a cast would.
   */
  addInto(dst: BackendData, src: BackendData, size: number, dtype: DType, srcDType?: DType): void;
  /** Strided copy of `shape` elements from src into an existing dst. */
  copy(src: BackendData, srcOffset: number, srcStrides: number[], dst: BackendData, dstOffset: number, dstStrides: number[], shape: number[], dtype: DType): void;
  /**
   * In place: row i of src [outer, n, rowLen] into row (at[0] + i) mod `rows` of dst [outer, rows, rowLen];
   * `at` is int32 [1], read where the copy runs (so a replayed launch plan writes where the position is then).
   */
  writeRowsAt(dst: BackendData, src: BackendData, at: BackendData, outer: number, n: number, rows: number, rowLen: number, dtype: DType): void;
  /**
   * Records the device work `fn` queues without running it, for replay; absent where ops run as they
   * are called (the CPU). While recording, nothing may be read back to the host, and memory freed by
   * `fn` stays with the recording (its kernels write there on every replay).
   */
  captureWork?(fn: () => void): CapturedWork;
  /** x: [outer, n, inner], indices: int32 [count] in [0, n) → [outer, count, inner]. Throws on an index out of range. */
  gather(x: BackendData, indices: BackendData, outer: number, n: number, inner: number, count: number, dtype: DType): BackendData;
  /**
   * Returns base + scatter of updates ([outer, count, inner]) into rows `indices` of [outer, n, inner]; with
   * `inPlace`, added into base itself (a running cotangent), which is returned.
   */
  scatterAdd(base: BackendData, indices: BackendData, updates: BackendData, outer: number, n: number, inner: number, count: number, dtype: DType, inPlace?: boolean): BackendData;
  cast(x: BackendData, size: number, from: DType, to: DType): BackendData;
  /**
   * softmax(q kᵀ · scale, masked to the band) v, visiting only the band. Also returns the per-row
   * logsumexp of the scaled scores ([batch, tq]), which the backward uses to recompute probabilities.
   */
  attentionForward(q: BackendData, k: BackendData, v: BackendData, job: AttentionJob, dtype: DType): { out: BackendData; lse: BackendData };
  /** Cotangents of q, k, v given the forward's out and lse and the output cotangent dout. */
  attentionBackward(
    q: BackendData, k: BackendData, v: BackendData, out: BackendData, lse: BackendData, dout: BackendData, job: AttentionJob, dtype: DType,
  ): { dq: BackendData; dk: BackendData; dv: BackendData };
  /**
   * RMSNorm of `rows` contiguous rows of d: y = x · rstd · w with rstd = 1/√(mean(x²) + eps) per row
   * (w of length d). Also returns rstd ([rows]; float32 for bfloat16 tensors), which the backward reuses.
   */
  rmsNormForward(x: BackendData, w: BackendData, rows: number, d: number, eps: number, dtype: DType): { y: BackendData; rstd: BackendData };
  /** Cotangents of x ([rows, d]) and w ([d], summed over rows in a fixed order; null unless wantDw) given dy. */
  rmsNormBackward(
    x: BackendData, w: BackendData, rstd: BackendData, dy: BackendData, rows: number, d: number, dtype: DType, wantDw: boolean,
  ): { dx: BackendData; dw: BackendData | null };
  /**
   * Whether `rmsNormGradBackward` may be used: a second-order trace then records RMSNorm's backward as one
   * op (engine `rmsNormGrad`) instead of the composite's chain of row ops.
   */
  readonly rmsNormGradKernel: boolean;
  /**
   * The backward of RMSNorm's backward: with dx = r·u − x·r³·s (u = dy·w, r = rstd, s = mean(u·x) per row)
   * and c the cotangent of dx, per row A1 = c·u, A2 = c·x and h = r·c − x·r³·A2/d give
   *   d(dy) = w·h,   dw = Σ_rows dy·h (fixed order; null unless wantDw),
   *   dx' = −r³·s·c − r³·A2/d·u + x·(3·r⁵·s·A2 − r³·A1)/d.
   */
  rmsNormGradBackward(
    x: BackendData, w: BackendData, rstd: BackendData, dy: BackendData, c: BackendData, rows: number, d: number, dtype: DType, wantDw: boolean,
  ): { dx: BackendData; dw: BackendData | null; dg: BackendData };
  /**
   * Per row of logits [rows, V] with an int32 target: nll = logsumexp − logits[target], and the
   * logsumexp for the backward, both float32 for float32 and bfloat16 logits (float64 for float64). A
   * target outside [0, V) throws, at once or (on a device) at the next sync. The g and dG of the
   * backward kernels below are in that dtype too.
   */
  tokenNllForward(logits: BackendData, targets: BackendData, rows: number, V: number, dtype: DType): { nll: BackendData; lse: BackendData };
  /**
   * dlogits = (exp(logits − lse) − onehot(target)) · g[row], in the logits' dtype; with `accumulate` ([rows, V]
   * of that dtype) added into it in place and returned (the logits' running cotangent), as in tokenNllGradBackward.
   */
  tokenNllBackward(logits: BackendData, targets: BackendData, lse: BackendData, g: BackendData, rows: number, V: number, dtype: DType, accumulate?: BackendData): BackendData;
  /**
   * The second order of the token NLL: the cotangents of dlogits = (p − onehot) · g (p = exp(logits − lse),
   * lse a function of logits) given its cotangent u: dLogits = g · p ⊙ (u − s) and dG = s − u[target] per
   * row, with s = Σ p ⊙ u (a softmax Hessian-vector product), in the logits' dtype.
   */
  tokenNllGradBackward(
    logits: BackendData, targets: BackendData, lse: BackendData, g: BackendData, u: BackendData, rows: number, V: number, dtype: DType, accumulate?: BackendData,
  ): { dLogits: BackendData; dG: BackendData };
  /** The SwiGLU gate y = silu(a) · b over `size` elements (silu(a) = a / (1 + e^−a)). */
  swigluForward(a: BackendData, b: BackendData, size: number, dtype: DType): BackendData;
  /** Its cotangents: da = g · b · σ(a)(1 + a(1 − σ(a))), db = g · silu(a). */
  swigluBackward(a: BackendData, b: BackendData, g: BackendData, size: number, dtype: DType): { da: BackendData; db: BackendData };
  /** Whether `swigluGradBackward` may be used (a second-order trace then records the gate's backward as one op, `swigluGateGrad`). */
  readonly swigluGradKernel: boolean;
  /**
   * The backward of the gate's backward (da = g·b·s1, db = g·s0 with s0 = silu(a), s1 = silu'(a), s2 = silu''(a)),
   * given cotangents ca, cb of da, db: da' = ca·g·b·s2 + cb·g·s1, db' = ca·g·s1, dg = ca·b·s1 + cb·s0.
   */
  swigluGradBackward(
    a: BackendData, b: BackendData, g: BackendData, ca: BackendData, cb: BackendData, size: number, dtype: DType,
  ): { da: BackendData; db: BackendData; dg: BackendData };
  /**
   * RoPE over x [outer, T, H, D] (pairs (2i, 2i+1) of the last axis) with tables cos, sin [T, D/2]:
   * see `fusedRope` (src/engine/rope.ts) for the formula and its rounding order. `layout`: 'same' keeps
   * [outer, T, H, D]; 'split' reads [outer, T, H, D] and writes [outer, H, T, D]; 'merge' reads [outer, H, T, D]
   * and writes [outer, T, H, D] (T and H name the token and head axes in every layout).
   */
  rope(x: BackendData, cos: BackendData, sin: BackendData, outer: number, T: number, H: number, D: number, inverse: boolean, dtype: DType, layout?: RopeLayout): BackendData;
  /**
   * One AdamW step over `size` elements of a float32 or float64 parameter, in one pass (new buffers
   * for p, m, v). Each operation is rounded to the dtype in the order of the composite update in
   * src/train/adamw.ts, so the two agree bit for bit (see AdamWHyper).
   */
  adamw(p: BackendData, g: BackendData, m: BackendData, v: BackendData, size: number, h: AdamWHyper, dtype: DType): { p: BackendData; m: BackendData; v: BackendData };
  /** The same step for every parameter in `params` (one dtype), in one launch where the backend can; `h.decay` is per entry. */
  adamwAll(params: AdamWEntry[], h: AdamWHyper, dtype: DType): { p: BackendData; m: BackendData; v: BackendData }[];
  /**
   * Phase timing (engine `phase`): the work queued from now on belongs to phase `name`, until the next mark. A device
   * backend records an event on its queue (no synchronisation); the CPU notes the time. Absent: no phase timing.
   */
  markPhase?(name: string): void;
  /** Time per phase since the last report (device time between consecutive marks), and how many spans each had; clears the marks. */
  phaseReport?(): PhaseTime[];
}

/** One phase's share of the work timed by `Backend.markPhase`. */
export interface PhaseTime {
  phase: string;
  ms: number;
  spans: number;
}

/** One parameter of `adamwAll`: its arrays, its size and whether it takes weight decay. */
export interface AdamWEntry {
  p: BackendData;
  g: BackendData;
  m: BackendData;
  v: BackendData;
  size: number;
  decay: boolean;
}

/**
 * The scalars of one AdamW step, each converted to the parameter dtype before use:
 *   m' = m·beta1 + g·oneMinusBeta1;   v' = v·beta2 + (g·g)·oneMinusBeta2
 *   p' = (decay ? p·shrink : p) − ((m'/c1) / (√(v'/c2) + eps))·lr
 */
export interface AdamWHyper {
  beta1: number;
  oneMinusBeta1: number;
  beta2: number;
  oneMinusBeta2: number;
  /** Bias corrections 1 − β^t. */
  c1: number;
  c2: number;
  eps: number;
  lr: number;
  /** Whether this parameter takes decoupled weight decay, and its factor 1 − lr·wd. */
  decay: boolean;
  shrink: number;
}

/** Phase times from marks in order and the time between each mark and the next (the last mark's span is open), largest first. */
export function sumPhaseSpans(names: readonly string[], gaps: readonly number[]): PhaseTime[] {
  const by = new Map<string, PhaseTime>();
  gaps.forEach((ms, i) => {
    const e = by.get(names[i]) ?? { phase: names[i], ms: 0, spans: 0 };
    e.ms += ms;
    e.spans++;
    by.set(names[i], e);
  });
  return [...by.values()].sort((a, b) => b.ms - a.ms);
}
