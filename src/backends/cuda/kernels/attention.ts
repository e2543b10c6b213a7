/**
 * Banded causal attention (the Backend's attentionForward / attentionBackward contract).
 *
 * Fused kernels, FlashAttention-2 style, SIMT (fp32 or fp64 FMAs, no tensor cores yet):
 * - `attn_fwd_*`: one block of 256 threads per (batch entry, tile of BQ query rows). The Q tile
 *   stays in shared memory; the block walks only the key tiles of BK keys that intersect its band
 *   (the first tile starts at the band's first key, so a window of w costs about (BQ + w) / BK
 *   tiles, never tk / BK), with an online softmax (running max and sum per row) and an fp32 (fp64
 *   for float64) output accumulator in registers. Writes out and the per-row logsumexp.
 * - backward: `attn_delta` (delta = rowsum(dO ⊙ O), one warp per row), then `attn_dkv_*`, one
 *   block per (batch entry, tile of BK keys) over the query tiles that see those keys, and
 *   `attn_dq_*`, one block per query tile over its key tiles. No atomics: every output element is
 *   summed by one thread in a fixed order, so results are bit-identical between runs.
 * Thread layout (all three): 16 × 16 threads; thread (ty, tx) owns rows ty·RM .. ty·RM+RM-1 of the
 * tile's outer side and columns tx + 16·e of the inner side of each score tile; output columns are
 * tx·OW + 16·OW·g + w. Shared-memory rows are padded by one 16-byte vector (bank spread) and read
 * with 16-byte loads. Head dims are padded (with zeros in shared memory) to DP in {16, 32, 64, 128,
 * 256}; tile sizes per (dtype, kernel, DP) are in TILES.
 *
 * Fallback: the first-version kernels (one block per query or key row, `attn_row_*`), used for
 * head dims above 256 (up to ATT_MAX_D) and on devices that cannot give a fused kernel its shared
 * memory.
 *
 * Storage type T: float, double or bf16 (bf2f / f2bf); math type A: float (float32, bfloat16) or
 * double (float64). lse is stored as L: the tensors' own type, except float for bfloat16 (a bf16
 * logsumexp would put a ~0.4 % error on every recomputed probability of the backward); delta is
 * internal, in A.
 */
import { FM_DIMS, FM_THREADS, FM_TILES, mmaSharedBytes, mmaSource } from './attention-mma.js';
import { WG_FWD_TILE, wgmmaSharedBytes, wgmmaSource, wgmmaThreads } from './attention-wgmma.js';
import { blockReduce } from './common.js';

/** The float dtypes attention kernels are generated for. */
export type AttnDType = 'float32' | 'float64' | 'bfloat16';
export const ATT_DTYPES: readonly AttnDType[] = ['float32', 'float64', 'bfloat16'];
export function isAttnDType(dtype: string): dtype is AttnDType {
  return (ATT_DTYPES as readonly string[]).includes(dtype);
}

const STORAGE: Record<AttnDType, string> = { float32: 'float', float64: 'double', bfloat16: 'bf16' };
const ACC: Record<AttnDType, string> = { float32: 'float', float64: 'double', bfloat16: 'float' };
const LSE: Record<AttnDType, string> = { float32: 'float', float64: 'double', bfloat16: 'float' };
/** Bytes per element of the lse buffer attentionForward returns (float32 for bfloat16 tensors). */
export function attentionLseBytes(dtype: AttnDType): number {
  return dtype === 'float64' ? 8 : 4;
}
/** Bytes per element of the math type (the internal delta buffer of the backward). */
export function attentionAccBytes(dtype: AttnDType): number {
  return dtype === 'float64' ? 8 : 4;
}

// ---- fused (tiled) kernels -------------------------------------------------------------------------

export type AttnKernel = 'fwd' | 'dq' | 'dkv';
/** Threads per block of the fused kernels (a 16 × 16 grid). */
export const FA_THREADS = 256;
/** Padded head dims the fused kernels are built for; d goes to the smallest DP >= d. */
export const FA_DIMS = [16, 32, 64, 128, 256] as const;
export const FA_MAX_D = 256;
/** Warps (rows) per block of the delta kernel. */
export const ATT_DELTA = 'attn_delta';
export const ATT_DELTA_THREADS = 256;

/**
 * [BQ, BK] (query rows, keys per tile) per kernel and padded head dim. Both multiples of 16. Sized
 * for at most ~110 KB of shared memory where possible (two blocks per SM on an H100), every entry
 * under the H100's 227 KB per block; a device with less opt-in shared memory falls back to the
 * row kernels for the configurations it cannot run (attentionSharedBytes says how much each needs).
 */
const TILES: Record<'f32' | 'f64', Record<AttnKernel, Record<number, [number, number]>>> = {
  f32: {
    fwd: { 16: [64, 64], 32: [64, 64], 64: [64, 64], 128: [64, 64], 256: [32, 32] },
    dkv: { 16: [64, 64], 32: [64, 64], 64: [64, 64], 128: [32, 64], 256: [32, 32] },
    dq: { 16: [64, 64], 32: [64, 64], 64: [64, 64], 128: [64, 32], 256: [32, 32] },
  },
  f64: {
    fwd: { 16: [64, 64], 32: [64, 64], 64: [32, 32], 128: [32, 32], 256: [32, 32] },
    dkv: { 16: [32, 32], 32: [32, 32], 64: [32, 32], 128: [32, 32], 256: [16, 16] },
    dq: { 16: [32, 32], 32: [32, 32], 64: [32, 32], 128: [32, 32], 256: [16, 16] },
  },
};

export interface AttnPlan {
  kernel: AttnKernel;
  name: string;
  /** Query rows per tile. */
  bq: number;
  /** Keys per tile. */
  bk: number;
  /** Padded head dim. */
  dp: number;
  /** Dynamic shared memory bytes. */
  shared: number;
  /** Threads per block. */
  threads: number;
  /** Tensor-core (mma.sync, bf16, sm_80+) kernel rather than the SIMT one (attention-mma.ts). */
  tensorCores: boolean;
  /** The Hopper warpgroup-MMA forward (attention-wgmma.ts: sm_90, head dim 64, 16-byte aligned rows); tensorCores too. */
  wgmma: boolean;
  /** Blocks per SM the tile was sized for (how many query tiles fill the GPU). */
  blocksPerSm: number;
}

function vecWidth(dtype: AttnDType): number {
  return dtype === 'float64' ? 2 : 4;
}

/** Dynamic shared memory of one fused kernel configuration (must match the kernels' carving below). */
export function attentionSharedBytes(dtype: AttnDType, kernel: AttnKernel, bq: number, bk: number, dp: number): number {
  const a = attentionAccBytes(dtype);
  const vw = vecWidth(dtype);
  const ldq = dp + vw;
  const elems =
    kernel === 'fwd' ? bq * ldq + bk * ldq + bq * (bk + vw)
    : kernel === 'dkv' ? 2 * bk * ldq + 2 * bq * ldq + 2 * bk * (bq + vw) + 2 * bq
    : 2 * bq * ldq + 2 * bk * ldq + bq * (bk + vw) + 2 * bq;
  return elems * a;
}

function planFor(dtype: AttnDType, kernel: AttnKernel, dp: number): AttnPlan {
  const [bq, bk] = TILES[dtype === 'float64' ? 'f64' : 'f32'][kernel][dp];
  const shared = attentionSharedBytes(dtype, kernel, bq, bk, dp);
  return { kernel, name: `attn_${kernel}_d${dp}_q${bq}_k${bk}`, bq, bk, dp, shared, threads: FA_THREADS, tensorCores: false, wgmma: false, blocksPerSm: 2 };
}

function mmaPlanFor(kernel: AttnKernel, dp: number): AttnPlan {
  const [bq, bk] = FM_TILES[kernel][dp];
  const shared = mmaSharedBytes(kernel, bq, bk, dp);
  return { kernel, name: `attn_mma_${kernel}_d${dp}_q${bq}_k${bk}`, bq, bk, dp, shared, threads: FM_THREADS, tensorCores: true, wgmma: false, blocksPerSm: 2 };
}

function wgmmaFwdPlan(): AttnPlan {
  const [bq, bk] = WG_FWD_TILE;
  return { kernel: 'fwd', name: `attn_wg_fwd_d64_q${bq}_k${bk}`, bq, bk, dp: 64, shared: wgmmaSharedBytes(bq, bk), threads: wgmmaThreads(bq), tensorCores: true, wgmma: true, blocksPerSm: 1 };
}

/**
 * The fused kernel for head dim d, or null when d is above FA_MAX_D (then the row kernels run).
 * `tensorCores`: the mma kernel where one exists (bfloat16, d up to 128; the caller checks sm_80+);
 * `wgmma`: the warpgroup-MMA forward where it applies (d 64; the caller checks sm_90 and alignment).
 */
export function attentionPlan(dtype: AttnDType, kernel: AttnKernel, d: number, tensorCores = false, wgmma = false): AttnPlan | null {
  if (tensorCores && wgmma && dtype === 'bfloat16' && kernel === 'fwd' && d === 64) return wgmmaFwdPlan();
  if (tensorCores && dtype === 'bfloat16') {
    const dp = FM_DIMS.find((x) => x >= d);
    if (dp !== undefined) return mmaPlanFor(kernel, dp);
  }
  const dp = FA_DIMS.find((x) => x >= d);
  return dp === undefined ? null : planFor(dtype, kernel, dp);
}

const KERNELS: AttnKernel[] = ['fwd', 'dq', 'dkv'];

/** Every fused configuration compiled into a dtype's module (SIMT, and for bfloat16 the tensor-core ones). */
export function attentionPlans(dtype: AttnDType): AttnPlan[] {
  const simt = KERNELS.flatMap((k) => FA_DIMS.map((dp) => planFor(dtype, k, dp)));
  return dtype === 'bfloat16' ? [...simt, ...KERNELS.flatMap((k) => FM_DIMS.map((dp) => mmaPlanFor(k, dp))), wgmmaFwdPlan()] : simt;
}

// ---- row kernels (fallback) -------------------------------------------------------------------------

export const ATT_THREADS = 128;
/** Head dimension limit of the row kernels: each thread owns ATT_MAXC output columns. */
export const ATT_MAXC = 8;
export const ATT_MAX_D = ATT_THREADS * ATT_MAXC;
export const ATT_FWD = 'attn_row_fwd';
export const ATT_BWD_DQ = 'attn_row_dq';
export const ATT_BWD_DKV = 'attn_row_dkv';

/** Shared memory bytes of each row kernel for head dimension d. */
export function attentionShared(dtype: AttnDType, d: number): number {
  return (2 * d + 3 * ATT_THREADS) * attentionAccBytes(dtype);
}

// ---- source -----------------------------------------------------------------------------------------

function common(dtype: AttnDType): string {
  const f = dtype !== 'float64';
  return String.raw`
typedef ${ACC[dtype]} A;
typedef ${STORAGE[dtype]} T;
typedef ${LSE[dtype]} L;
#define FA_VW ${vecWidth(dtype)}
#define FA_THREADS ${FA_THREADS}
#define FA_NEG_INF ${f ? 'NEG_INF_F' : 'NEG_INF_D'}
/* exp / log of the fused kernels: base 2 for float (exp2f is one MUFU op), natural for double. Scores
   are multiplied by FA_LOGC (log2 e, or 1) so that fa_exp(s * scale * FA_LOGC - m) = e^(s * scale - m'). */
#define FA_LOGC ${f ? '1.4426950408889634' : '1.0'}
#define FA_INV_LOGC ${f ? '0.6931471805599453' : '1.0'}
__device__ __forceinline__ A att_ld(T x) { return ${dtype === 'bfloat16' ? 'bf2f(x)' : '(A)x'}; }
__device__ __forceinline__ T att_st(A x) { return ${dtype === 'bfloat16' ? 'f2bf(x)' : '(T)x'}; }
__device__ __forceinline__ A fa_exp(A x) { return ${f ? 'exp2f(x)' : 'exp(x)'}; }
__device__ __forceinline__ A fa_log(A x) { return ${f ? 'log2f(x)' : 'log(x)'}; }
__device__ __forceinline__ A fa_max(A a, A b) { return a > b ? a : b; }
/* This block's tile of query rows [i0, iend) of batch entry b: grid = batch * ceil(tq / BQ), the heaviest (last) tiles first. */
struct fa_tile { i64 b, i0, iend; };
template <int BQ>
__device__ __forceinline__ fa_tile fa_query_tile(i64 batch, i64 tq, i64 blk = -1) {
  const i64 nt = (tq + BQ - 1) / BQ;
  if (blk < 0) blk = blockIdx.x;
  fa_tile r;
  r.b = blk % batch;
  r.i0 = (nt - 1 - blk / batch) * BQ;
  r.iend = r.i0 + BQ < tq ? r.i0 + BQ : tq;
  return r;
}
/* The visible keys of query row i are j in [band_lo(i), band_hi(i)] (may be empty only for rows the engine never sends). */
__device__ __forceinline__ i64 band_lo(i64 i, i64 qStart, i64 kStart, i64 window) { i64 v = qStart + i - window + 1 - kStart; return v > 0 ? v : 0; }
__device__ __forceinline__ i64 band_hi(i64 i, i64 qStart, i64 kStart, i64 tk) { i64 v = qStart + i - kStart; return v < tk - 1 ? v : tk - 1; }
`;
}

const FUSED = String.raw`
/* 16-byte (or narrower) shared-memory vector loads. */
struct __align__(16) fa_v4f { float x, y, z, w; };
struct __align__(8) fa_v2f { float x, y; };
struct __align__(16) fa_v2d { double x, y; };
__device__ __forceinline__ void fa_ldv(const float* p, float (&v)[1]) { v[0] = p[0]; }
__device__ __forceinline__ void fa_ldv(const float* p, float (&v)[2]) { fa_v2f t = *reinterpret_cast<const fa_v2f*>(p); v[0] = t.x; v[1] = t.y; }
__device__ __forceinline__ void fa_ldv(const float* p, float (&v)[4]) { fa_v4f t = *reinterpret_cast<const fa_v4f*>(p); v[0] = t.x; v[1] = t.y; v[2] = t.z; v[3] = t.w; }
__device__ __forceinline__ void fa_ldv(const double* p, double (&v)[1]) { v[0] = p[0]; }
__device__ __forceinline__ void fa_ldv(const double* p, double (&v)[2]) { fa_v2d t = *reinterpret_cast<const fa_v2d*>(p); v[0] = t.x; v[1] = t.y; }

/* dst[r * LD + c] = src row (r0 + r), column c, for r < ROWS, c < DP; 0 where r0 + r >= rowEnd or c >= d. */
template <int ROWS, int DP, int LD>
__device__ __forceinline__ void fa_load(A* dst, const T* src, i64 r0, i64 rowEnd, i64 d) {
  for (int x = threadIdx.x; x < ROWS * DP; x += FA_THREADS) {
    const int r = x / DP, c = x % DP;
    const i64 row = r0 + r;
    dst[r * LD + c] = (row < rowEnd && c < d) ? att_ld(src[row * d + c]) : (A)0;
  }
}

/* The lse (times FA_LOGC) and delta of query rows i0 .. i0 + BQ - 1 (0 past iend), as the backward kernels use them. */
template <int BQ>
__device__ __forceinline__ void fa_load_rows(A* Ls, A* Ds, const L* lse, const A* delta, i64 i0, i64 iend) {
  for (int x = threadIdx.x; x < BQ; x += blockDim.x) {
    const bool ok = i0 + x < iend;
    Ls[x] = ok ? (A)lse[i0 + x] * (A)FA_LOGC : (A)0;
    Ds[x] = ok ? delta[i0 + x] : (A)0;
  }
}

/* acc[r][e] += dot(X row (xr + r), Y row (yr + 16 e)) over DP columns; rows of stride LD. */
template <int RM, int CM, int DP, int LD>
__device__ __forceinline__ void fa_dot(A (&acc)[RM][CM], const A* X, int xr, const A* Y, int yr) {
#pragma unroll 2
  for (int c = 0; c < DP; c += FA_VW) {
    A xv[RM][FA_VW], yv[CM][FA_VW];
#pragma unroll
    for (int r = 0; r < RM; r++) fa_ldv(X + (xr + r) * LD + c, xv[r]);
#pragma unroll
    for (int e = 0; e < CM; e++) fa_ldv(Y + (yr + 16 * e) * LD + c, yv[e]);
#pragma unroll
    for (int r = 0; r < RM; r++) {
#pragma unroll
      for (int e = 0; e < CM; e++) {
#pragma unroll
        for (int u = 0; u < FA_VW; u++) acc[r][e] += xv[r][u] * yv[e][u];
      }
    }
  }
}

/* row[c] = acc[g * OW + w] · scale for this thread's output columns c = tx·OW + 16·OW·g + w < d. */
template <int OC, int OW>
__device__ __forceinline__ void fa_store_row(T* row, const A (&acc)[OC], A scale, int tx, i64 d) {
#pragma unroll
  for (int g = 0; g < OC / OW; g++) {
#pragma unroll
    for (int w = 0; w < OW; w++) {
      const int c = tx * OW + 16 * OW * g + w;
      if (c < d) row[c] = att_st(acc[g * OW + w] * scale);
    }
  }
}

/* acc[r][g * OW + w] += sum over k < KN of P[(pr + r) * LDP + k] * V[k * LDV + tx * OW + 16 * OW * g + w]. */
template <int RM, int OC, int OW, int KN, int LDP, int LDV>
__device__ __forceinline__ void fa_pv(A (&acc)[RM][OC], const A* P, int pr, const A* V, int tx) {
#pragma unroll 2
  for (int k = 0; k < KN; k += FA_VW) {
    A pv[RM][FA_VW];
#pragma unroll
    for (int r = 0; r < RM; r++) fa_ldv(P + (pr + r) * LDP + k, pv[r]);
#pragma unroll
    for (int u = 0; u < FA_VW; u++) {
#pragma unroll
      for (int g = 0; g < OC / OW; g++) {
        A vv[OW];
        fa_ldv(V + (k + u) * LDV + tx * OW + 16 * OW * g, vv);
#pragma unroll
        for (int r = 0; r < RM; r++) {
#pragma unroll
          for (int w = 0; w < OW; w++) acc[r][g * OW + w] += pv[r][u] * vv[w];
        }
      }
    }
  }
}

/* Sum / max over the 16 lanes of a half warp (the tx of one ty); every lane gets the same bits. */
__device__ __forceinline__ A fa_sum16(A v) {
#pragma unroll
  for (int off = 8; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}
__device__ __forceinline__ A fa_max16(A v) {
#pragma unroll
  for (int off = 8; off > 0; off >>= 1) v = fa_max(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

/* Forward: grid = batch * ceil(tq / BQ) blocks, the heaviest (last) query tiles first. */
template <int BQ, int BK, int DP>
__device__ __forceinline__ void fa_fwd(const T* q, const T* k, const T* v, T* out, L* lse,
    i64 batch, i64 tq, i64 tk, i64 d, i64 qStart, i64 kStart, i64 window, double scaleD, i64 groups, i64 kvStride) {
  constexpr int RM = BQ / 16, CM = BK / 16, OC = DP / 16, OW = OC < FA_VW ? OC : FA_VW;
  constexpr int LDQ = DP + FA_VW, LDS = BK + FA_VW;
  extern __shared__ __align__(16) unsigned char smem[];
  A* Qs = reinterpret_cast<A*>(smem);   // [BQ][LDQ]
  A* KV = Qs + BQ * LDQ;                // [BK][LDQ]: the key tile, then the value tile
  A* Ps = KV + BK * LDQ;                // [BQ][LDS]: probabilities of the tile
  const int t = threadIdx.x, tx = t & 15, ty = t >> 4;
  const fa_tile tile = fa_query_tile<BQ>(batch, tq);
  const i64 b = tile.b, i0 = tile.i0, iend = tile.iend;
  const T* qb = q + b * tq * d;
  const T* kb = k + (b / groups) * kvStride; // grouped-query attention: the kv entry of query entry b
  const T* vb = v + (b / groups) * kvStride;
  const A sc = (A)(scaleD * FA_LOGC);
  fa_load<BQ, DP, LDQ>(Qs, qb, i0, iend, d);
  i64 lo[RM], hi[RM];
  A m[RM], l[RM], o[RM][OC];
#pragma unroll
  for (int r = 0; r < RM; r++) {
    const i64 i = i0 + ty * RM + r;
    lo[r] = 1; hi[r] = 0; // rows past tq see nothing
    if (i < iend) { lo[r] = band_lo(i, qStart, kStart, window); hi[r] = band_hi(i, qStart, kStart, tk); }
    m[r] = FA_NEG_INF; l[r] = 0;
#pragma unroll
    for (int c = 0; c < OC; c++) o[r][c] = 0;
  }
  // The tile's band: from the first row's first key to the last row's last key.
  const i64 jlo = band_lo(i0, qStart, kStart, window), jhi = band_hi(iend - 1, qStart, kStart, tk);
  for (i64 j0 = jlo; j0 <= jhi; j0 += BK) {
    const i64 jend = j0 + BK < jhi + 1 ? j0 + BK : jhi + 1;
    __syncthreads(); // the previous tile's reads of KV and Ps are done
    fa_load<BK, DP, LDQ>(KV, kb, j0, jend, d);
    __syncthreads();
    A s[RM][CM];
#pragma unroll
    for (int r = 0; r < RM; r++) {
#pragma unroll
      for (int e = 0; e < CM; e++) s[r][e] = 0;
    }
    fa_dot<RM, CM, DP, LDQ>(s, Qs, ty * RM, KV, tx);
#pragma unroll
    for (int r = 0; r < RM; r++) {
      A mx = FA_NEG_INF;
#pragma unroll
      for (int e = 0; e < CM; e++) {
        const i64 j = j0 + tx + 16 * e;
        const A x = (j >= lo[r] && j <= hi[r]) ? s[r][e] * sc : FA_NEG_INF;
        s[r][e] = x;
        mx = fa_max(mx, x);
      }
      mx = fa_max16(mx);
      const A mn = fa_max(m[r], mx);
      const A mu = mn == FA_NEG_INF ? (A)0 : mn; // a row with nothing visible yet: exp(-inf - 0) = 0, never -inf - -inf
      const A alpha = fa_exp(m[r] - mu);
      A rs = 0;
#pragma unroll
      for (int e = 0; e < CM; e++) {
        const A p = fa_exp(s[r][e] - mu);
        s[r][e] = p;
        rs += p;
      }
      rs = fa_sum16(rs);
      l[r] = l[r] * alpha + rs;
      m[r] = mn;
#pragma unroll
      for (int c = 0; c < OC; c++) o[r][c] *= alpha;
#pragma unroll
      for (int e = 0; e < CM; e++) Ps[(ty * RM + r) * LDS + tx + 16 * e] = s[r][e];
    }
    __syncthreads(); // Ps written; every read of the key tile done
    fa_load<BK, DP, LDQ>(KV, vb, j0, jend, d);
    __syncthreads();
    fa_pv<RM, OC, OW, BK, LDS, LDQ>(o, Ps, ty * RM, KV, tx);
  }
#pragma unroll
  for (int r = 0; r < RM; r++) {
    const i64 i = i0 + ty * RM + r;
    if (i < iend) {
      fa_store_row<OC, OW>(out + (b * tq + i) * d, o[r], (A)1 / l[r], tx, d);
      if (tx == 0) lse[b * tq + i] = (L)((m[r] + fa_log(l[r])) * (A)FA_INV_LOGC);
    }
  }
}

/* dK, dV: grid = (batch / groups) * ceil(tk / BK) blocks, one per key tile of a key/value entry, over the query tiles (of each of its query entries) that see it. */
template <int BQ, int BK, int DP>
__device__ __forceinline__ void fa_dkv(const T* q, const T* k, const T* v, const T* dout, const L* lse, const A* delta, T* dk, T* dv,
    i64 batch, i64 tq, i64 tk, i64 d, i64 qStart, i64 kStart, i64 window, double scaleD, i64 groups, i64 kvStride) {
  constexpr int RM = BK / 16, CM = BQ / 16, OC = DP / 16, OW = OC < FA_VW ? OC : FA_VW;
  constexpr int LDQ = DP + FA_VW, LDP = BQ + FA_VW;
  extern __shared__ __align__(16) unsigned char smem[];
  A* Ks = reinterpret_cast<A*>(smem);   // [BK][LDQ]
  A* Vs = Ks + BK * LDQ;                // [BK][LDQ]
  A* Qs = Vs + BK * LDQ;                // [BQ][LDQ]
  A* dOs = Qs + BQ * LDQ;               // [BQ][LDQ]
  A* Ps = dOs + BQ * LDQ;               // [BK][LDP]: P transposed (key rows, query columns)
  A* dSs = Ps + BK * LDP;               // [BK][LDP]: dS transposed
  A* Ls = dSs + BK * LDP;               // [BQ]: lse * FA_LOGC
  A* Ds = Ls + BQ;                      // [BQ]: delta
  const int t = threadIdx.x, tx = t & 15, ty = t >> 4;
  // b: this block's key/value entry; with grouped-query attention its query entries are b·groups .. b·groups + groups − 1
  const i64 kvBatch = batch / groups;
  const i64 b = (i64)blockIdx.x % kvBatch;
  const i64 j0 = ((i64)blockIdx.x / kvBatch) * BK;
  const i64 jend = j0 + BK < tk ? j0 + BK : tk;
  fa_load<BK, DP, LDQ>(Ks, k + b * kvStride, j0, jend, d);
  fa_load<BK, DP, LDQ>(Vs, v + b * kvStride, j0, jend, d);
  // Queries that see some key of the tile: i with s <= qStart + i < s + window for s in [kStart + j0, kStart + jend - 1].
  i64 ilo = kStart + j0 - qStart; if (ilo < 0) ilo = 0;
  i64 ihi = kStart + jend - 1 - qStart + window - 1; if (ihi > tq - 1) ihi = tq - 1;
  const A sc = (A)(scaleD * FA_LOGC);
  A dka[RM][OC], dva[RM][OC];
#pragma unroll
  for (int r = 0; r < RM; r++) {
#pragma unroll
    for (int c = 0; c < OC; c++) { dka[r][c] = 0; dva[r][c] = 0; }
  }
  for (i64 gq = 0; gq < groups; gq++) {
  const i64 qe = b * groups + gq;
  const T* qb = q + qe * tq * d;
  const T* db = dout + qe * tq * d;
  for (i64 i0 = ilo; i0 <= ihi; i0 += BQ) {
    const i64 iend = i0 + BQ < ihi + 1 ? i0 + BQ : ihi + 1;
    __syncthreads(); // the previous tile's reads of Qs, dOs, Ps, dSs are done
    fa_load<BQ, DP, LDQ>(Qs, qb, i0, iend, d);
    fa_load<BQ, DP, LDQ>(dOs, db, i0, iend, d);
    fa_load_rows<BQ>(Ls, Ds, lse + qe * tq, delta + qe * tq, i0, iend);
    __syncthreads();
    A s[RM][CM], dp[RM][CM];
#pragma unroll
    for (int r = 0; r < RM; r++) {
#pragma unroll
      for (int e = 0; e < CM; e++) { s[r][e] = 0; dp[r][e] = 0; }
    }
    fa_dot<RM, CM, DP, LDQ>(s, Ks, ty * RM, Qs, tx);
    fa_dot<RM, CM, DP, LDQ>(dp, Vs, ty * RM, dOs, tx);
#pragma unroll
    for (int e = 0; e < CM; e++) {
      const int ci = tx + 16 * e;
      const i64 i = i0 + ci;
      i64 qlo = 1, qhi = 0;
      if (i < iend) { qlo = band_lo(i, qStart, kStart, window); qhi = band_hi(i, qStart, kStart, tk); }
      const A l2 = Ls[ci], dl = Ds[ci];
#pragma unroll
      for (int r = 0; r < RM; r++) {
        const i64 j = j0 + ty * RM + r;
        const A p = (j >= qlo && j <= qhi) ? fa_exp(s[r][e] * sc - l2) : (A)0;
        Ps[(ty * RM + r) * LDP + ci] = p;
        dSs[(ty * RM + r) * LDP + ci] = p * (dp[r][e] - dl);
      }
    }
    __syncthreads();
    fa_pv<RM, OC, OW, BQ, LDP, LDQ>(dva, Ps, ty * RM, dOs, tx);
    fa_pv<RM, OC, OW, BQ, LDP, LDQ>(dka, dSs, ty * RM, Qs, tx);
  }
  }
  const A scale = (A)scaleD;
#pragma unroll
  for (int r = 0; r < RM; r++) {
    const i64 j = j0 + ty * RM + r;
    if (j < jend) {
      fa_store_row<OC, OW>(dk + (b * tk + j) * d, dka[r], scale, tx, d);
      fa_store_row<OC, OW>(dv + (b * tk + j) * d, dva[r], (A)1, tx, d);
    }
  }
}

/* dQ: grid = batch * ceil(tq / BQ) blocks, one per query tile, over its key tiles. */
template <int BQ, int BK, int DP>
__device__ __forceinline__ void fa_dq(const T* q, const T* k, const T* v, const T* dout, const L* lse, const A* delta, T* dq,
    i64 batch, i64 tq, i64 tk, i64 d, i64 qStart, i64 kStart, i64 window, double scaleD, i64 groups, i64 kvStride) {
  constexpr int RM = BQ / 16, CM = BK / 16, OC = DP / 16, OW = OC < FA_VW ? OC : FA_VW;
  constexpr int LDQ = DP + FA_VW, LDS = BK + FA_VW;
  extern __shared__ __align__(16) unsigned char smem[];
  A* Qs = reinterpret_cast<A*>(smem);   // [BQ][LDQ]
  A* dOs = Qs + BQ * LDQ;               // [BQ][LDQ]
  A* Ks = dOs + BQ * LDQ;               // [BK][LDQ]
  A* Vs = Ks + BK * LDQ;                // [BK][LDQ]
  A* dSs = Vs + BK * LDQ;               // [BQ][LDS]
  A* Ls = dSs + BQ * LDS;               // [BQ]
  A* Ds = Ls + BQ;                      // [BQ]
  const int t = threadIdx.x, tx = t & 15, ty = t >> 4;
  const fa_tile tile = fa_query_tile<BQ>(batch, tq);
  const i64 b = tile.b, i0 = tile.i0, iend = tile.iend;
  const T* kb = k + (b / groups) * kvStride; // grouped-query attention: the kv entry of query entry b
  const T* vb = v + (b / groups) * kvStride;
  fa_load<BQ, DP, LDQ>(Qs, q + b * tq * d, i0, iend, d);
  fa_load<BQ, DP, LDQ>(dOs, dout + b * tq * d, i0, iend, d);
  fa_load_rows<BQ>(Ls, Ds, lse + b * tq, delta + b * tq, i0, iend);
  i64 lo[RM], hi[RM];
  A dqa[RM][OC];
#pragma unroll
  for (int r = 0; r < RM; r++) {
    const i64 i = i0 + ty * RM + r;
    lo[r] = 1; hi[r] = 0;
    if (i < iend) { lo[r] = band_lo(i, qStart, kStart, window); hi[r] = band_hi(i, qStart, kStart, tk); }
#pragma unroll
    for (int c = 0; c < OC; c++) dqa[r][c] = 0;
  }
  const A sc = (A)(scaleD * FA_LOGC);
  const i64 jlo = band_lo(i0, qStart, kStart, window), jhi = band_hi(iend - 1, qStart, kStart, tk);
  for (i64 j0 = jlo; j0 <= jhi; j0 += BK) {
    const i64 jend = j0 + BK < jhi + 1 ? j0 + BK : jhi + 1;
    __syncthreads(); // the previous tile's reads of Ks, Vs, dSs are done (and, the first time, Qs, dOs, Ls, Ds are written)
    fa_load<BK, DP, LDQ>(Ks, kb, j0, jend, d);
    fa_load<BK, DP, LDQ>(Vs, vb, j0, jend, d);
    __syncthreads();
    A s[RM][CM], dp[RM][CM];
#pragma unroll
    for (int r = 0; r < RM; r++) {
#pragma unroll
      for (int e = 0; e < CM; e++) { s[r][e] = 0; dp[r][e] = 0; }
    }
    fa_dot<RM, CM, DP, LDQ>(s, Qs, ty * RM, Ks, tx);
    fa_dot<RM, CM, DP, LDQ>(dp, dOs, ty * RM, Vs, tx);
#pragma unroll
    for (int r = 0; r < RM; r++) {
      const A l2 = Ls[ty * RM + r], dl = Ds[ty * RM + r];
#pragma unroll
      for (int e = 0; e < CM; e++) {
        const i64 j = j0 + tx + 16 * e;
        const A p = (j >= lo[r] && j <= hi[r]) ? fa_exp(s[r][e] * sc - l2) : (A)0;
        dSs[(ty * RM + r) * LDS + tx + 16 * e] = p * (dp[r][e] - dl);
      }
    }
    __syncthreads();
    fa_pv<RM, OC, OW, BK, LDS, LDQ>(dqa, dSs, ty * RM, Ks, tx);
  }
  const A scale = (A)scaleD;
#pragma unroll
  for (int r = 0; r < RM; r++) {
    const i64 i = i0 + ty * RM + r;
    if (i < iend) {
      fa_store_row<OC, OW>(dq + (b * tq + i) * d, dqa[r], scale, tx, d);
    }
  }
}

/* delta[row] = sum_c dout[row][c] * o[row][c], one warp per row (fixed order: deterministic). */
extern "C" __global__ void ${ATT_DELTA}(const T* o, const T* dout, A* delta, i64 rows, i64 d) {
  const int lane = threadIdx.x & 31;
  const i64 warps = (i64)(blockDim.x >> 5);
  for (i64 row = (i64)blockIdx.x * warps + (threadIdx.x >> 5); row < rows; row += (i64)gridDim.x * warps) {
    A s = 0;
    for (i64 c = lane; c < d; c += 32) s += att_ld(o[row * d + c]) * att_ld(dout[row * d + c]);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    if (lane == 0) delta[row] = s;
  }
}
`;

function fusedEntries(dtype: AttnDType): string {
  const fwdArgs = 'i64 batch, i64 tq, i64 tk, i64 d, i64 qStart, i64 kStart, i64 window, double scale, i64 groups';
  const pass = 'batch, tq, tk, d, qStart, kStart, window, scale, groups';
  return attentionPlans(dtype)
    .map((p) => {
      const tpl = `<${p.bq}, ${p.bk}, ${p.dp}>`;
      const fn = p.tensorCores ? 'fm' : 'fa';
      const head = `extern "C" __global__ void __launch_bounds__(${p.threads}) ${p.name}`;
      if (p.wgmma) {
        return `${head}(const T* q, const T* k, const T* v, T* out, L* lse, ${fwdArgs}, i64 kvStride, i64 splits, float* po, float* pml) { wg_fwd<${p.bq / 64}, ${p.bk}>(q, k, v, out, lse, ${pass}, kvStride, splits, po, pml); }`;
      }
      if (p.kernel === 'fwd' && p.tensorCores) {
        // (splits, po, pml: the split forward, see fm_fwd)
        return `${head}(const T* q, const T* k, const T* v, T* out, L* lse, ${fwdArgs}, i64 kvStride, i64 splits, float* po, float* pml) { fm_fwd${tpl}(q, k, v, out, lse, ${pass}, kvStride, splits, po, pml); }`;
      }
      if (p.kernel === 'fwd') {
        return `${head}(const T* q, const T* k, const T* v, T* out, L* lse, ${fwdArgs}, i64 kvStride) { ${fn}_fwd${tpl}(q, k, v, out, lse, ${pass}, kvStride); }`;
      }
      if (p.kernel === 'dkv' && p.tensorCores) {
        // (splits, part: the split dK/dV, see fm_dkv)
        return `${head}(const T* q, const T* k, const T* v, const T* dout, const L* lse, const A* delta, T* dk, T* dv, ${fwdArgs}, i64 kvStride, i64 splits, float* part) { fm_dkv${tpl}(q, k, v, dout, lse, delta, dk, dv, ${pass}, kvStride, splits, part); }`;
      }
      if (p.kernel === 'dkv') {
        return `${head}(const T* q, const T* k, const T* v, const T* dout, const L* lse, const A* delta, T* dk, T* dv, ${fwdArgs}, i64 kvStride) { ${fn}_dkv${tpl}(q, k, v, dout, lse, delta, dk, dv, ${pass}, kvStride); }`;
      }
      if (p.tensorCores) {
        // (splits, part: the split dQ, see fm_dq)
        return `${head}(const T* q, const T* k, const T* v, const T* dout, const L* lse, const A* delta, T* dq, ${fwdArgs}, i64 kvStride, i64 splits, float* part) { fm_dq${tpl}(q, k, v, dout, lse, delta, dq, ${pass}, kvStride, splits, part); }`;
      }
      return `${head}(const T* q, const T* k, const T* v, const T* dout, const L* lse, const A* delta, T* dq, ${fwdArgs}, i64 kvStride) { fa_dq${tpl}(q, k, v, dout, lse, delta, dq, ${pass}, kvStride); }`;
    })
    .join('\n');
}

/** The row kernels: one block per query row (forward, dQ) or key row (dK, dV). */
const ROW = String.raw`
__device__ __forceinline__ A dotp(const A* a, const T* b, i64 d) { A s = 0; for (i64 c = 0; c < d; c++) s += a[c] * att_ld(b[c]); return s; }

extern "C" __global__ void ${ATT_FWD}(const T* q, const T* k, const T* v, T* out, L* lse,
    i64 rows, i64 tq, i64 tk, i64 d, i64 qStart, i64 kStart, i64 window, double scaleD, i64 groups, i64 kvStride) {
  extern __shared__ __align__(16) unsigned char smem[];
  A* qs = (A*)smem; A* ps = qs + 2 * d; A* red = ps + ${ATT_THREADS};
  const A scale = (A)scaleD;
  int t = threadIdx.x;
  for (i64 row = blockIdx.x; row < rows; row += gridDim.x) {
    i64 b = row / tq, i = row % tq;
    const T* kb = k + (b / groups) * kvStride; const T* vb = v + (b / groups) * kvStride;
    for (i64 c = t; c < d; c += blockDim.x) qs[c] = att_ld(q[row * d + c]);
    __syncthreads();
    i64 lo = band_lo(i, qStart, kStart, window), hi = band_hi(i, qStart, kStart, tk);
    A m = -(A)1e308 * (A)1e308;
    for (i64 j = lo + t; j <= hi; j += blockDim.x) m = fmax(m, dotp(qs, kb + j * d, d) * scale);
    m = att_max(m, red);
    A acc[${ATT_MAXC}];
    for (int a = 0; a < ${ATT_MAXC}; a++) acc[a] = 0;
    A l = 0;
    for (i64 t0 = lo; t0 <= hi; t0 += blockDim.x) {
      i64 j = t0 + t;
      A p = 0;
      if (j <= hi) p = exp(dotp(qs, kb + j * d, d) * scale - m);
      ps[t] = p; l += p;
      __syncthreads();
      i64 nt = hi - t0 + 1 < (i64)blockDim.x ? hi - t0 + 1 : (i64)blockDim.x;
      for (int a = 0; a < ${ATT_MAXC}; a++) {
        i64 c = t + (i64)a * blockDim.x;
        if (c < d) { A s = 0; for (i64 jj = 0; jj < nt; jj++) s += ps[jj] * att_ld(vb[(t0 + jj) * d + c]); acc[a] += s; }
      }
      __syncthreads();
    }
    l = att_sum(l, red);
    for (int a = 0; a < ${ATT_MAXC}; a++) { i64 c = t + (i64)a * blockDim.x; if (c < d) out[row * d + c] = att_st(acc[a] / l); }
    if (t == 0) lse[row] = (L)(m + log(l));
    __syncthreads();
  }
}

/** dQ per query row (delta comes from ${ATT_DELTA}). */
extern "C" __global__ void ${ATT_BWD_DQ}(const T* q, const T* k, const T* v, const T* dout, const L* lse, const A* delta,
    T* dq, i64 rows, i64 tq, i64 tk, i64 d, i64 qStart, i64 kStart, i64 window, double scaleD, i64 groups, i64 kvStride) {
  extern __shared__ __align__(16) unsigned char smem[];
  A* qs = (A*)smem; A* dos = qs + d; A* ps = dos + d;
  const A scale = (A)scaleD;
  int t = threadIdx.x;
  for (i64 row = blockIdx.x; row < rows; row += gridDim.x) {
    i64 b = row / tq, i = row % tq;
    const T* kb = k + (b / groups) * kvStride; const T* vb = v + (b / groups) * kvStride;
    for (i64 c = t; c < d; c += blockDim.x) { qs[c] = att_ld(q[row * d + c]); dos[c] = att_ld(dout[row * d + c]); }
    __syncthreads();
    const A dl = delta[row];
    const A ls = (A)lse[row];
    i64 lo = band_lo(i, qStart, kStart, window), hi = band_hi(i, qStart, kStart, tk);
    A acc[${ATT_MAXC}];
    for (int a = 0; a < ${ATT_MAXC}; a++) acc[a] = 0;
    for (i64 t0 = lo; t0 <= hi; t0 += blockDim.x) {
      i64 j = t0 + t;
      A ds = 0;
      if (j <= hi) {
        A p = exp(dotp(qs, kb + j * d, d) * scale - ls);
        ds = p * (dotp(dos, vb + j * d, d) - dl);
      }
      ps[t] = ds;
      __syncthreads();
      i64 nt = hi - t0 + 1 < (i64)blockDim.x ? hi - t0 + 1 : (i64)blockDim.x;
      for (int a = 0; a < ${ATT_MAXC}; a++) {
        i64 c = t + (i64)a * blockDim.x;
        if (c < d) { A s = 0; for (i64 jj = 0; jj < nt; jj++) s += ps[jj] * att_ld(kb[(t0 + jj) * d + c]); acc[a] += s; }
      }
      __syncthreads();
    }
    for (int a = 0; a < ${ATT_MAXC}; a++) { i64 c = t + (i64)a * blockDim.x; if (c < d) dq[row * d + c] = att_st(acc[a] * scale); }
    __syncthreads();
  }
}

/** dK and dV per key row, over the queries that see that key. */
extern "C" __global__ void ${ATT_BWD_DKV}(const T* q, const T* k, const T* v, const T* dout, const L* lse, const A* delta,
    T* dk, T* dv, i64 rows, i64 tq, i64 tk, i64 d, i64 qStart, i64 kStart, i64 window, double scaleD, i64 groups, i64 kvStride) {
  extern __shared__ __align__(16) unsigned char smem[];
  A* ks = (A*)smem; A* vs = ks + d; A* ps = vs + d; A* dss = ps + ${ATT_THREADS};
  const A scale = (A)scaleD;
  int t = threadIdx.x;
  for (i64 row = blockIdx.x; row < rows; row += gridDim.x) {
    i64 b = row / tk, j = row % tk;
    for (i64 c = t; c < d; c += blockDim.x) { ks[c] = att_ld(k[b * kvStride + j * d + c]); vs[c] = att_ld(v[b * kvStride + j * d + c]); }
    __syncthreads();
    i64 s = kStart + j;
    i64 ilo = s - qStart; if (ilo < 0) ilo = 0;
    i64 ihi = s - qStart + window - 1; if (ihi > tq - 1) ihi = tq - 1;
    A akk[${ATT_MAXC}], avv[${ATT_MAXC}];
    for (int a = 0; a < ${ATT_MAXC}; a++) { akk[a] = 0; avv[a] = 0; }
    for (i64 gq = 0; gq < groups; gq++) { // b is a key/value entry: sum over its query entries
    const i64 qe = b * groups + gq;
    const T* qb = q + qe * tq * d; const T* db = dout + qe * tq * d;
    for (i64 t0 = ilo; t0 <= ihi; t0 += blockDim.x) {
      i64 i = t0 + t;
      A p = 0, ds = 0;
      if (i <= ihi) {
        p = exp(dotp(ks, qb + i * d, d) * scale - (A)lse[qe * tq + i]);
        ds = p * (dotp(vs, db + i * d, d) - delta[qe * tq + i]);
      }
      ps[t] = p; dss[t] = ds;
      __syncthreads();
      i64 nt = ihi - t0 + 1 < (i64)blockDim.x ? ihi - t0 + 1 : (i64)blockDim.x;
      for (int a = 0; a < ${ATT_MAXC}; a++) {
        i64 c = t + (i64)a * blockDim.x;
        if (c < d) {
          A sv = 0, sk = 0;
          for (i64 ii = 0; ii < nt; ii++) { sv += ps[ii] * att_ld(db[(t0 + ii) * d + c]); sk += dss[ii] * att_ld(qb[(t0 + ii) * d + c]); }
          avv[a] += sv; akk[a] += sk;
        }
      }
      __syncthreads();
    }
    }
    for (int a = 0; a < ${ATT_MAXC}; a++) {
      i64 c = t + (i64)a * blockDim.x;
      if (c < d) { dk[row * d + c] = att_st(akk[a] * scale); dv[row * d + c] = att_st(avv[a]); }
    }
    __syncthreads();
  }
}
`;

// ---- decode (flash-decoding) -----------------------------------------------------------------------

export const ATT_DECODE_PARTIAL = 'attn_decode_partial';
export const ATT_DECODE_COMBINE = 'attn_decode_combine';
/** dQ of a split backward: the splits' float partials [splits][n] added in split order. */
export const ATT_SPLIT_SUM = 'attn_split_sum';
/** The split forward's merge (a few splits per row): one warp per row. */
export const ATT_SPLIT_COMBINE = 'attn_split_combine';
export const SPLIT_COMBINE_ROWS = 8;
/** Threads (4 warps, DECODE_UNROLL keys per warp at a time) of the partial kernel; keys per split. */
export const DECODE_THREADS = 128;
export const DECODE_CHUNK = 128;
/** Threads of the combine kernel (a warp per share of the chunks). */
export const DECODE_COMBINE_THREADS = 256;
/** Keys a warp of the partial kernel reads at once. */
export const DECODE_UNROLL = 4;
/** The decode path serves at most this many query rows per batch entry, over bands of at least DECODE_MIN_KEYS. */
export const DECODE_MAX_TQ = 8;
export const DECODE_MIN_KEYS = 512;

/**
 * Decoding reads one (or a few) query rows against a long band of keys: the fused kernel would run
 * one block per batch entry over all of them. Here the band is split into chunks of DECODE_CHUNK
 * keys, one block per (row, chunk): each warp takes DECODE_UNROLL keys at a time (lanes across d,
 * shuffle sums side by side), keeps its own online-softmax state, and the block writes the chunk's unnormalised output,
 * max and sum (base-2 units, like the fused kernels). The combine kernel merges a row's chunks in
 * order (deterministic) into out and lse.
 */
const DECODE = String.raw`
extern "C" __global__ void __launch_bounds__(${DECODE_THREADS}) ${ATT_DECODE_PARTIAL}(const T* q, const T* k, const T* v, A* po, A* pml,
    i64 tq, i64 tk, i64 d, i64 qStart, i64 kStart, i64 window, double scaleD, i64 splits, i64 groups, i64 kvStride,
    const int* keyPos, const int* qPos) {
  extern __shared__ __align__(16) unsigned char smem[];
  A* qs = reinterpret_cast<A*>(smem);   // [d]
  A* wo = qs + d;                       // [4][d] per-warp outputs
  A* wm = wo + 4 * d;                   // [4] per-warp max
  A* wl = wm + 4;                       // [4] per-warp sum
  const i64 row = (i64)blockIdx.x / splits, sp = (i64)blockIdx.x % splits;
  const i64 b = row / tq, i = row % tq;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  // keyPos (a launch plan's ring of keys): every row is a candidate, visibility tested per key from
  // positions read here; otherwise the band from qStart and kStart
  const bool ring = keyPos != nullptr;
  const i64 qp = ring ? (i64)qPos[0] + i : 0;
  const i64 lo = ring ? 0 : band_lo(i, qStart, kStart, window), hi = ring ? tk - 1 : band_hi(i, qStart, kStart, tk);
  const i64 j0 = lo + sp * ${DECODE_CHUNK}, j1 = j0 + ${DECODE_CHUNK} - 1 < hi ? j0 + ${DECODE_CHUNK} - 1 : hi;
  for (i64 c = threadIdx.x; c < d; c += blockDim.x) qs[c] = att_ld(q[row * d + c]);
  __syncthreads();
  const A sc = (A)(scaleD * FA_LOGC);
  A m = FA_NEG_INF, l = 0;
  A o[8];
#pragma unroll
  for (int t = 0; t < 8; t++) o[t] = 0;
  const T* kb = k + (b / groups) * kvStride; // grouped-query attention: the kv entry of query entry b
  const T* vb = v + (b / groups) * kvStride;
  // each warp takes DECODE_UNROLL keys at a time: their loads issue together and their dot products
  // reduce side by side, instead of one dependent load, shuffle tree and exp per key (a warp waiting
  // on memory most of the time)
  for (i64 j = j0 + warp * ${DECODE_UNROLL}; j <= j1; j += 4 * ${DECODE_UNROLL}) {
    A s[${DECODE_UNROLL}];
    bool vis[${DECODE_UNROLL}];
#pragma unroll
    for (int u = 0; u < ${DECODE_UNROLL}; u++) {
      const i64 jj = j + u; // the same across the warp: visibility is warp-uniform
      vis[u] = jj <= j1;
      if (vis[u] && ring) {
        const i64 kp = keyPos[jj];
        vis[u] = kp >= 0 && kp <= qp && qp - kp < window;
      }
      s[u] = 0;
      if (vis[u]) for (i64 c = lane; c < d; c += 32) s[u] += qs[c] * att_ld(kb[jj * d + c]);
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
#pragma unroll
      for (int u = 0; u < ${DECODE_UNROLL}; u++) s[u] += __shfl_xor_sync(0xffffffffu, s[u], off);
    }
    A mx = m;
#pragma unroll
    for (int u = 0; u < ${DECODE_UNROLL}; u++) if (vis[u]) { s[u] *= sc; mx = fa_max(mx, s[u]); }
    if (mx == FA_NEG_INF) continue; // nothing visible yet
    const A alpha = fa_exp(m - mx);
    A p[${DECODE_UNROLL}];
    A psum = 0;
#pragma unroll
    for (int u = 0; u < ${DECODE_UNROLL}; u++) { p[u] = vis[u] ? fa_exp(s[u] - mx) : (A)0; psum += p[u]; }
    l = l * alpha + psum;
#pragma unroll
    for (int t = 0; t < 8; t++) {
      const i64 c = lane + 32 * t;
      if (c < d) {
        A acc = o[t] * alpha;
#pragma unroll
        for (int u = 0; u < ${DECODE_UNROLL}; u++) if (vis[u]) acc += p[u] * att_ld(vb[(j + u) * d + c]);
        o[t] = acc;
      }
    }
    m = mx;
  }
#pragma unroll
  for (int t = 0; t < 8; t++) {
    const i64 c = lane + 32 * t;
    if (c < d) wo[warp * d + c] = o[t];
  }
  if (lane == 0) { wm[warp] = m; wl[warp] = l; }
  __syncthreads();
  A M = wm[0];
  for (int w = 1; w < 4; w++) M = fa_max(M, wm[w]);
  const i64 slot = row * splits + sp;
  if (M == FA_NEG_INF) {
    // an empty chunk (past the row's band): contributes nothing
    for (i64 c = threadIdx.x; c < d; c += blockDim.x) po[slot * d + c] = 0;
    if (threadIdx.x == 0) { pml[2 * slot] = FA_NEG_INF; pml[2 * slot + 1] = 0; }
    return;
  }
  A f[4];
  A sum = 0;
  for (int w = 0; w < 4; w++) { f[w] = wm[w] == FA_NEG_INF ? (A)0 : fa_exp(wm[w] - M); sum += wl[w] * f[w]; }
  for (i64 c = threadIdx.x; c < d; c += blockDim.x) {
    A acc = 0;
    for (int w = 0; w < 4; w++) acc += wo[w * d + c] * f[w];
    po[slot * d + c] = acc;
  }
  if (threadIdx.x == 0) { pml[2 * slot] = M; pml[2 * slot + 1] = sum; }
}

/*
 * The split forward's merge of a few splits per row (the decode partials' layout): one warp per row, lanes
 * across d, each split's weight exp(m_s − M) taken by every lane (splits are few) and the partials summed in
 * split order: deterministic. The block-per-row decode combine spent most of its time in block barriers here.
 */
extern "C" __global__ void ${ATT_SPLIT_COMBINE}(const A* po, const A* pml, T* out, L* lse, i64 rows, i64 d, i64 splits) {
  const i64 row = (i64)blockIdx.x * ${SPLIT_COMBINE_ROWS} + threadIdx.x / 32;
  const int lane = threadIdx.x & 31;
  if (row >= rows) return;
  const A* ml = pml + 2 * row * splits;
  A M = FA_NEG_INF;
  for (i64 s = 0; s < splits; s++) M = fa_max(M, ml[2 * s]);
  A sum = 0;
  for (i64 s = 0; s < splits; s++) if (ml[2 * s] != FA_NEG_INF) sum += ml[2 * s + 1] * fa_exp(ml[2 * s] - M);
  const A inv = (A)1 / sum;
  for (i64 c = lane; c < d; c += 32) {
    A acc = 0;
    for (i64 s = 0; s < splits; s++) if (ml[2 * s] != FA_NEG_INF) acc += po[(row * splits + s) * d + c] * fa_exp(ml[2 * s] - M);
    out[row * d + c] = att_st(acc * inv);
  }
  if (lane == 0) lse[row] = (L)((M + fa_log(sum)) * (A)FA_INV_LOGC);
}

extern "C" __global__ void ${ATT_SPLIT_SUM}(T* out, const float* part, i64 n, i64 splits) {
  for (i64 x = (i64)blockIdx.x * blockDim.x + threadIdx.x; x < n; x += (i64)gridDim.x * blockDim.x) {
    float acc = 0.f;
    for (i64 s = 0; s < splits; s++) acc += part[s * n + x];
    out[x] = att_st((A)acc);
  }
}

extern "C" __global__ void __launch_bounds__(${DECODE_COMBINE_THREADS}) ${ATT_DECODE_COMBINE}(const A* po, const A* pml, T* out, L* lse, i64 rows, i64 d, i64 splits) {
  // one block per row; the chunks' weights exp(m_s − M) go to shared memory once. Each warp then sums
  // every (blockDim/32)-th chunk for all columns (lanes across d) and the warps' sums are added in warp
  // order: a row of a 128 K-key band has 1024 chunks, which one thread per column summed too slowly.
  // (a block-wide max and sum first, both in a fixed tree order: deterministic)
  extern __shared__ __align__(16) unsigned char smem[];
  A* w = reinterpret_cast<A*>(smem);    // [splits]
  A* red = w + splits;                  // [blockDim.x]
  A* part = red + blockDim.x;           // [warps][d]
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  for (i64 row = blockIdx.x; row < rows; row += gridDim.x) {
    const A* ml = pml + 2 * row * splits;
    A M = FA_NEG_INF;
    for (i64 s = threadIdx.x; s < splits; s += blockDim.x) M = fa_max(M, ml[2 * s]);
    M = att_max(M, red);
    A part_sum = 0;
    for (i64 s = threadIdx.x; s < splits; s += blockDim.x) {
      const A ws = ml[2 * s] == FA_NEG_INF ? (A)0 : fa_exp(ml[2 * s] - M);
      w[s] = ws;
      part_sum += ml[2 * s + 1] * ws;
    }
    const A sum = att_sum(part_sum, red); // its barriers also publish w
    A acc[8];
#pragma unroll
    for (int t = 0; t < 8; t++) acc[t] = 0;
    for (i64 s = warp; s < splits; s += warps) {
      const A ws = w[s];
      const A* p = po + (row * splits + s) * d;
#pragma unroll
      for (int t = 0; t < 8; t++) {
        const i64 c = lane + 32 * t;
        if (c < d) acc[t] += p[c] * ws;
      }
    }
#pragma unroll
    for (int t = 0; t < 8; t++) {
      const i64 c = lane + 32 * t;
      if (c < d) part[warp * d + c] = acc[t];
    }
    __syncthreads();
    const A inv = (A)1 / sum;
    for (i64 c = threadIdx.x; c < d; c += blockDim.x) {
      A total = 0;
      for (int k = 0; k < warps; k++) total += part[k * d + c];
      out[row * d + c] = att_st(total * inv);
    }
    if (threadIdx.x == 0) lse[row] = (L)((M + fa_log(sum)) * (A)FA_INV_LOGC);
    __syncthreads(); // w and part are rewritten for the next row
  }
}
`;

/** Dynamic shared memory of the decode partial kernel (q row, four warps' outputs, their max and sum). */
export function decodeSharedBytes(dtype: AttnDType, d: number): number {
  return (5 * d + 8) * attentionAccBytes(dtype);
}

/** Dynamic shared memory of the decode combine kernel: a weight per chunk, the block reduction's scratch and the warps' column sums. */
export function decodeCombineSharedBytes(dtype: AttnDType, splits: number, d: number): number {
  const threads = DECODE_COMBINE_THREADS;
  return (splits + threads + (threads / 32) * d) * attentionAccBytes(dtype);
}

/**
 * The attention module of one dtype: the fused kernels of every configuration in TILES, the delta
 * kernel and the row kernels. Empty for dtypes attention is not defined on.
 */
export function attentionSource(dtype: string): string {
  if (!isAttnDType(dtype)) return '';
  return [
    common(dtype),
    blockReduce('att_max', 'A', 'fmax(a, b)'),
    blockReduce('att_sum', 'A', 'a + b'),
    FUSED,
    dtype === 'bfloat16' ? mmaSource() : '',
    dtype === 'bfloat16' ? wgmmaSource() : '',
    fusedEntries(dtype),
    DECODE,
    ROW,
  ].join('\n');
}
