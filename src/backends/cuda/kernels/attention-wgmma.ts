/**
 * Hopper (sm_90a) attention forward on warpgroup MMAs (`wgmma.mma_async`), bfloat16, head dim 64:
 * the same contract, grid and split-key partials as the mma.sync forward (attention-mma.ts), whose
 * online-softmax step and epilogue it shares; only the two products and the tile loads differ.
 *
 * A block is WG warpgroups of 128 threads; warpgroup w owns query rows 64 w .. 64 w + 63 of the
 * block's BQ = 64 · WG. Per key tile of BK keys:
 * - S = Q Kᵀ: wgmma m64nBKk16, both operands read from shared memory by descriptor (four k steps of
 *   16 over d = 64); the scores land in registers in the mma.sync accumulator layout, per warp of
 *   the group (warp i of a warpgroup holds rows 16 i .. 16 i + 15).
 * - the online softmax turns them into bf16 A fragments of P in registers (fm_softmax_probs);
 * - O += P V: wgmma m64n64k16 with A = P from registers and B = V from shared memory, transposed
 *   (V is stored [key][dim], i.e. N-major for this product).
 * Q, K and V tiles are stored in the layout wgmma reads with 128-byte swizzling: a row of 64 bf16 is
 * 128 bytes, and its 16-byte chunk c of row r lives at chunk c ^ (r % 8) (so both K as K-major B of
 * the first product and V as N-major B of the second are one layout, and the cp.async stores of a
 * warp hit distinct banks). The descriptor strides are 1024 bytes between 8-row groups; a k step of
 * 16 along a 128-byte row moves the descriptor's start by 32 bytes (the hardware applies the XOR).
 * K/V tiles are filled by cp.async while the previous tile computes; a proxy fence makes the
 * generic-proxy copies visible to the tensor cores' async proxy before each barrier.
 *
 * Only compiled for sm_90a (NVRTC defines __CUDA_ARCH_FEAT_SM90_ALL); elsewhere the entry points are
 * empty and the host never picks them (attentionPlan's `wgmma` flag is the device's sm_90).
 */

/**
 * [BQ, BK] of the wgmma forward (head dim 64). The kernel is written for BQ a multiple of 64 (a warpgroup
 * per 64 rows) and BK 64 or 128, but only this tile has run on a GPU: a sweep's first other tile (192, 64)
 * never finished on an H100 (the device hung; not investigated), so no other is offered.
 */
export const WG_FWD_TILE: [number, number] = [128, 128];

/** Threads per block of a wgmma kernel with query tile bq (one warpgroup per 64 rows). */
export function wgmmaThreads(bq: number): number {
  return 2 * bq;
}

/** Dynamic shared memory: Q, three (K, V) buffers, and 1 KB to align the swizzled tiles to 1024 bytes. */
export function wgmmaSharedBytes(bq: number, bk: number): number {
  return bq * 128 + 3 * 2 * bk * 128 + 1024;
}

/** wgmma m64nNk16 (f32 += bf16 · bf16), both operands by shared-memory descriptor, K-major. */
function mmaSS(n: number): string {
  const regs = n / 2;
  const list = Array.from({ length: regs }, (_, i) => `%${i}`).join(',');
  const outs = Array.from({ length: regs }, (_, i) => `"+f"(d[${i >> 2}][${i & 3}])`).join(', ');
  return `
__device__ __forceinline__ void wg_mma_ss_n${n}(float (&d)[${n / 8}][4], u64 da, u64 db, int accumulate) {
  asm volatile("{\\n.reg .pred p;\\nsetp.ne.b32 p, %${regs + 2}, 0;\\n"
      "wgmma.mma_async.sync.aligned.m64n${n}k16.f32.bf16.bf16 {${list}}, %${regs}, %${regs + 1}, p, 1, 1, 0, 0;\\n}\\n"
      : ${outs}
      : "l"(da), "l"(db), "r"(accumulate));
}`;
}

/** wgmma m64nNk16 with A (bf16 fragments) in registers and B by descriptor, N-major (transposed). */
function mmaRSt(n: number): string {
  const regs = n / 2;
  const list = Array.from({ length: regs }, (_, i) => `%${i}`).join(',');
  const outs = Array.from({ length: regs }, (_, i) => `"+f"(d[${i >> 2}][${i & 3}])`).join(', ');
  return `
__device__ __forceinline__ void wg_mma_rs_t_n${n}(float (&d)[${n / 8}][4], const u32 (&a)[4], u64 db) {
  asm volatile("{\\n.reg .pred p;\\nsetp.ne.b32 p, %${regs + 5}, 0;\\n"
      "wgmma.mma_async.sync.aligned.m64n${n}k16.f32.bf16.bf16 {${list}}, {%${regs},%${regs + 1},%${regs + 2},%${regs + 3}}, %${regs + 4}, p, 1, 1, 1;\\n}\\n"
      : ${outs}
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1));
}`;
}

/** The wgmma kernels' source (included in the bfloat16 attention module after the mma.sync source). */
export const wgmmaSource = (): string => String.raw`
#if defined(__CUDA_ARCH_FEAT_SM90_ALL) && defined(FM_ENABLED)
#define WG_ENABLED 1
typedef unsigned long long u64;
__device__ __forceinline__ u32 wg_smem(const void* p) {
  u32 a;
  asm("{ .reg .u64 s; cvta.to.shared.u64 s, %1; cvt.u32.u64 %0, s; }\n" : "=r"(a) : "l"(p));
  return a;
}
/* Descriptor of a 128-byte-swizzled tile at shared address addr (1024-aligned, or offset along a row):
   1024 bytes between 8-row groups, given as both the leading and the stride offset (one of them is
   unused for a 64-element row: which one depends on the operand's major-ness). */
__device__ __forceinline__ u64 wg_desc(u32 addr) {
  return (u64)((addr & 0x3FFFF) >> 4) | ((u64)(1024 >> 4) << 16) | ((u64)(1024 >> 4) << 32) | (1ull << 62);
}
__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
/* Wait until at most N of this warpgroup's committed wgmma groups are still running. */
template <int N>
__device__ __forceinline__ void wg_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;\n" :: "n"(N) : "memory"); }
/* Generic-proxy writes to shared memory (cp.async, stores) become visible to wgmma's async proxy. */
__device__ __forceinline__ void wg_fence_proxy() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
/* Keeps the compiler from moving accumulator reads or writes across an asynchronous wgmma. */
template <int N>
__device__ __forceinline__ void wg_pin(float (&x)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; i++) {
#pragma unroll
    for (int e = 0; e < 4; e++) asm volatile("" : "+f"(x[i][e]) :: "memory");
  }
}
template <int N>
__device__ __forceinline__ void wg_pin_regs(u32 (&x)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; i++) {
#pragma unroll
    for (int e = 0; e < 4; e++) asm volatile("" : "+r"(x[i][e]) :: "memory");
  }
}
${mmaSS(64)}
${mmaSS(128)}
${mmaRSt(64)}

/*
 * Rows r0 .. r0 + ROWS - 1 of src (64 bf16 each, rows past rowEnd as zeros) into a swizzled tile,
 * asynchronously (cp.async; the caller commits and waits).
 */
template <int ROWS, int THREADS>
__device__ __forceinline__ void wg_load(unsigned char* tile, const bf16* src, i64 r0, i64 rowEnd) {
#pragma unroll
  for (int u = 0; u < (ROWS * 8 + THREADS - 1) / THREADS; u++) {
    const int x = threadIdx.x + u * THREADS, r = x >> 3, c = x & 7;
    if ((ROWS * 8) % THREADS != 0 && x >= ROWS * 8) break;
    const i64 row = r0 + r;
    const bool valid = row < rowEnd;
    fm_cp16(reinterpret_cast<bf16*>(tile + r * 128 + ((c ^ (r & 7)) << 4)), valid ? src + row * 64 + c * 8 : src, valid);
  }
}

/* K and V rows r0 .. min(r0 + BK, last + 1) - 1 into buffer buf of the double-buffered (K, V) pairs; commits the group. */
template <int BK, int THREADS>
__device__ __forceinline__ void wg_fetch_kv(unsigned char* kv, int buf, const bf16* k, const bf16* v, i64 r0, i64 last) {
  const i64 rend = r0 + BK < last + 1 ? r0 + BK : last + 1;
  wg_load<BK, THREADS>(kv + (2 * buf) * BK * 128, k, r0, rend);
  wg_load<BK, THREADS>(kv + (2 * buf + 1) * BK * 128, v, r0, rend);
  fm_cp_commit();
}
#endif

/*
 * The forward (head dim 64): arguments, grid and outputs as fm_fwd. Key tile n's Q·Kᵀ runs on the tensor
 * cores together with tile n - 1's P·V, while the warpgroup turns tile n's scores into probabilities
 * (FlashAttention-3's intra-warpgroup overlap): P is double-buffered in registers, the output is rescaled
 * once P·V is done, and (K, V) tiles take three buffers (tile n + 1 loads while n - 1's V is still read).
 */
template <int WG, int BK>
__device__ __forceinline__ void wg_fwd(const bf16* q, const bf16* k, const bf16* v, bf16* out, float* lse,
    i64 batch, i64 tq, i64 tk, i64 d, i64 qStart, i64 kStart, i64 window, double scaleD, i64 groups, i64 kvStride,
    i64 splits, float* po, float* pml) {
#ifdef WG_ENABLED
  constexpr int BQ = 64 * WG, THREADS = 128 * WG, NT = BK / 8, OT = 8;
  extern __shared__ __align__(16) unsigned char smem[];
  unsigned char* Qs = smem + ((1024 - (wg_smem(smem) & 1023)) & 1023); // [BQ][128 B], swizzled
  unsigned char* KV = Qs + BQ * 128;                                   // [3][K, V][BK][128 B]
  const int wg = threadIdx.x >> 7, warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const i64 sp = (i64)blockIdx.x % splits;
  const fa_tile tile = fa_query_tile<BQ>(batch, tq, (i64)blockIdx.x / splits);
  const i64 b = tile.b, i0 = tile.i0, iend = tile.iend;
  const bf16* kb = k + (b / groups) * kvStride;
  const bf16* vb = v + (b / groups) * kvStride;
  const float sc = (float)(scaleD * FA_LOGC);
  i64 jlo = band_lo(i0, qStart, kStart, window), jhi = band_hi(iend - 1, qStart, kStart, tk);
  fm_split_keys<BK>(jlo, jhi, sp, splits);
  const i64 tiles = jhi >= jlo ? (jhi - jlo) / BK + 1 : 0;
  i64 row[2];
  float m[2], l[2], o[OT][4];
#pragma unroll
  for (int h = 0; h < 2; h++) { row[h] = i0 + wg * 64 + warp * 16 + g + 8 * h; m[h] = FA_NEG_INF; l[h] = 0; }
#pragma unroll
  for (int ot = 0; ot < OT; ot++) o[ot][0] = o[ot][1] = o[ot][2] = o[ot][3] = 0;
  if (tiles > 0) {
    wg_load<BQ, THREADS>(Qs, q + b * tq * 64, i0, iend);
    wg_fetch_kv<BK, THREADS>(KV, 0, kb, vb, jlo, jhi); // Q and the first key tile: one group
    const u32 qAddr = wg_smem(Qs) + wg * 64 * 128, kvAddr = wg_smem(KV);
    // Key tile n: start the next tile's copies once every warpgroup is past tile n - 1 (the buffer they
    // go to held tile n - 2), then S = Q·K_nᵀ beside O += P_{n-1}·V_{n-1}, the softmax of S beside the
    // latter, and the rescale once it is done. pPrev / pNext alternate between the two P buffers.
    float s[NT][4];
    auto step = [&](i64 n, u32 (&pPrev)[NT / 2][4], u32 (&pNext)[NT / 2][4]) {
      fm_cp_wait<0>();
      wg_fence_proxy();
      __syncthreads();
      if (n + 1 < tiles) wg_fetch_kv<BK, THREADS>(KV, (int)((n + 1) % 3), kb, vb, jlo + (n + 1) * BK, jhi);
      const i64 j0 = jlo + n * BK, jend = j0 + BK < jhi + 1 ? j0 + BK : jhi + 1;
      const u32 kAddr = kvAddr + (u32)(n % 3) * 2 * BK * 128;
      wg_fence();
#pragma unroll
      for (int kk = 0; kk < 4; kk++) {
        if constexpr (BK == 128) wg_mma_ss_n128(s, wg_desc(qAddr + kk * 32), wg_desc(kAddr + kk * 32), kk);
        else wg_mma_ss_n64(s, wg_desc(qAddr + kk * 32), wg_desc(kAddr + kk * 32), kk);
      }
      wg_commit();
      if (n > 0) {
        const u32 vAddr = kvAddr + (u32)((n - 1) % 3) * 2 * BK * 128 + BK * 128;
#pragma unroll
        for (int kk = 0; kk < BK / 16; kk++) wg_mma_rs_t_n64(o, pPrev[kk], wg_desc(vAddr + kk * 16 * 128));
        wg_commit();
        wg_wait<1>();
      } else {
        wg_wait<0>();
      }
      wg_pin<NT>(s);
      const bool full = fm_tile_full(i0, BQ, iend, j0, BK, jend, qStart, kStart, window);
      float alpha[2];
      fm_softmax_probs<NT>(s, pNext, m, l, alpha, row, full, j0, jend, iend, sc, t, qStart, kStart, window);
      wg_wait<0>();
      wg_pin<OT>(o);
      wg_pin_regs<NT / 2>(pPrev); // read by the P·V just finished: not reused before here
      fm_rescale<OT>(o, alpha);
    };
    u32 pa[NT / 2][4], pb[NT / 2][4];
    i64 n = 0;
    for (; n + 1 < tiles; n += 2) {
      step(n, pb, pa);
      step(n + 1, pa, pb);
    }
    if (n < tiles) step(n, pb, pa);
    // the last tile's P·V (its P is in pa when the count of tiles is odd, else in pb)
    const u32 vAddr = kvAddr + (u32)((tiles - 1) % 3) * 2 * BK * 128 + BK * 128;
    wg_fence();
    if (tiles & 1) {
#pragma unroll
      for (int kk = 0; kk < BK / 16; kk++) wg_mma_rs_t_n64(o, pa[kk], wg_desc(vAddr + kk * 16 * 128));
    } else {
#pragma unroll
      for (int kk = 0; kk < BK / 16; kk++) wg_mma_rs_t_n64(o, pb[kk], wg_desc(vAddr + kk * 16 * 128));
    }
    wg_commit();
    wg_wait<0>();
    wg_pin<OT>(o);
  }
  fm_finish_rows<OT>(o, m, l, row, iend, b, tq, d, t, sp, splits, out, lse, po, pml);
#endif
}
`;
