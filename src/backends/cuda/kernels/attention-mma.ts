/**
 * Tensor-core attention for bfloat16 tensors (sm_80 and later): the same three kernels as the SIMT
 * fused path (forward, dK/dV, dQ; same band logic, same lse and delta contracts, same launch grids),
 * with every product on `mma.sync.m16n8k16` (bf16 operands, fp32 accumulators).
 *
 * One warp owns MT tiles of 16 rows of the block's outer side (query rows in the forward and dQ, key
 * rows in dK/dV); a block is 4 warps, so 64 · MT rows. FlashAttention-2's register trick: the score
 * tile comes out of the first product as accumulator fragments, and the accumulator layout of two adjacent
 * 8-column tiles is exactly the A-operand layout of one 16-wide k step, so probabilities (and dS)
 * go from the softmax into the second product without a trip through shared memory. They are
 * rounded to bf16 there, as FlashAttention does; the row sums (and so lse, which the backward
 * reuses) are taken over the fp32 values.
 *
 * Operands in shared memory stay bf16, rows padded by 8 elements (16 bytes), which makes both the
 * 4-byte fragment loads and the 16-byte ldmatrix row loads conflict-free. Products whose B operand
 * is a row-major [k][n] tile (P·V, dS·K, Pᵀ·dO, dSᵀ·Q) load it with `ldmatrix.trans`. The side each
 * kernel streams (K/V tiles in the forward and dQ, Q/dO tiles in dK/dV) is double-buffered: the next
 * tile's `cp.async` copies run while the current one computes.
 *
 * Fragment layouts (PTX ISA, mma.m16n8k16, g = lane / 4, t = lane % 4; pairs are packed low half
 * first): A (16 × 16, row-major) a0 = (g, 2t..2t+1), a1 = (g + 8, 2t..), a2 = (g, 2t + 8..),
 * a3 = (g + 8, 2t + 8..); B (16 × 8) b0 = (k 2t..2t+1, n g), b1 = (k 2t + 8.., n g); C (16 × 8)
 * c0, c1 = (g, 2t), (g, 2t + 1), c2, c3 = (g + 8, 2t), (g + 8, 2t + 1).
 *
 * Under FM_EMU (the CPU emulation used to check these kernels off the GPU) fm_mma, fm_pack, fm_ldsm_t,
 * fm_cp_commit and fm_cp_wait come from the emulator, and tiles load synchronously.
 */

/** Threads per block of the tensor-core kernels (4 warps). */
export const FM_THREADS = 128;
/** Padded head dims the tensor-core kernels are built for. */
export const FM_DIMS = [16, 32, 64, 128] as const;
/**
 * [BQ, BK] per kernel and padded head dim. The warp-owned side (BQ for the forward and dQ, BK for
 * dK/dV) is 64 or 128: 4 warps of MT = side / 64 tiles of 16 rows, and every fragment of the other
 * side a warp loads from shared memory serves all MT of them, which halves shared-memory traffic per
 * mma at MT = 2. MT = 2 needs about twice the accumulators, so it is used where they fit in the 255
 * registers a thread can have. Measured on an H100 (bench/cuda-attention-tiles.ts, d 64, T 2048-8192,
 * results in bench/results/cuda-attention-tiles.json): these tiles were the fastest or within 5% of it
 * on every shape but one (the forward at [64, 64] is 11% faster at T 8192 with a window of 1024, 10%
 * slower at T 8192 full); the cp.async pipeline (FM_OPTIONS) made the forward 1.2-1.3x faster.
 * Every kernel here uses 238-250 registers per thread (2 blocks per SM) without spilling.
 */
export const FM_TILES: Record<'fwd' | 'dq' | 'dkv', Record<number, [number, number]>> = {
  fwd: { 16: [128, 64], 32: [128, 64], 64: [128, 64], 128: [64, 64] },
  dq: { 16: [128, 32], 32: [128, 32], 64: [128, 32], 128: [64, 64] },
  dkv: { 16: [32, 128], 32: [32, 128], 64: [32, 128], 128: [32, 64] },
};

/** Dynamic shared memory (bytes) of one tensor-core kernel; must match the carving in the kernels. */
export function mmaSharedBytes(kernel: 'fwd' | 'dq' | 'dkv', bq: number, bk: number, dp: number): number {
  const ld = dp + 8;
  // the streamed side is double-buffered: fwd and dQ stream (K, V) tiles, dK/dV (Q, dO, lse, delta) tiles
  if (kernel === 'fwd') return (bq + 4 * bk) * ld * 2;
  if (kernel === 'dq') return (2 * bq + 4 * bk) * ld * 2 + 2 * bq * 4;
  return (2 * bk + 4 * bq) * ld * 2 + 4 * bq * 4;
}

/** Tuning switches compiled into the module (bench/cuda-attention-tiles.ts flips them in a child process). */
export const FM_OPTIONS = {
  /** Double-buffered tiles filled by cp.async while the previous tile computes; off: synchronous loads into the same double buffer. */
  pipeline: true,
};

/** The tensor-core kernels' source (included in the bfloat16 attention module). */
export const mmaSource = (): string => String.raw`
#if defined(FM_EMU) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800)
#define FM_ENABLED 1
#define FM_THREADS ${FM_THREADS}
#define FM_PIPELINE ${FM_OPTIONS.pipeline ? 1 : 0}
typedef unsigned int u32;
struct __align__(16) fm_u4 { u32 x, y, z, w; };
#ifndef FM_EMU
/* c += a · b on the tensor cores: a 16 × 16 bf16, b 16 × 8 bf16, c 16 × 8 fp32, one warp. */
__device__ __forceinline__ void fm_mma(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
/* Two floats to a bf16 pair (round to nearest even), lo in the low half. */
__device__ __forceinline__ u32 fm_pack(float lo, float hi) {
  u32 r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}
/* Four 8 × 8 bf16 matrices from shared memory, transposed; lane l gives the address of row l % 8 of matrix l / 8. */
__device__ __forceinline__ void fm_ldsm_t(u32 (&r)[4], const bf16* p) {
  u32 a;
  asm("{ .reg .u64 s; cvta.to.shared.u64 s, %1; cvt.u32.u64 %0, s; }\n" : "=r"(a) : "l"(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
      : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
}
/* 16 bytes global -> shared without a register round trip (zeros when !valid; src is then not read). */
__device__ __forceinline__ void fm_cp16(bf16* dst, const bf16* src, bool valid) {
  u32 a;
  asm("{ .reg .u64 s; cvta.to.shared.u64 s, %1; cvt.u32.u64 %0, s; }\n" : "=r"(a) : "l"(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" :: "r"(a), "l"(src), "r"(valid ? 16 : 0) : "memory");
}
__device__ __forceinline__ void fm_cp_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
/* Wait until at most N committed groups of this thread are still in flight. */
template <int N>
__device__ __forceinline__ void fm_cp_wait() { asm volatile("cp.async.wait_group %0;\n" :: "n"(N) : "memory"); }
#endif
__device__ __forceinline__ u32 fm_ld32(const bf16* p) { return *reinterpret_cast<const u32*>(p); }

/*
 * dst[r * LD + c] = src row (r0 + r), column c, for r < ROWS, c < DP (bf16 bits); 0 where r0 + r >=
 * rowEnd or c >= d. Each thread fetches all of its 16-byte chunks before it stores any: a store to
 * shared memory through a generic pointer may alias the next global load, so interleaving them
 * would serialise the loads' latency.
 */
template <int ROWS, int DP, int LD>
__device__ __forceinline__ void fm_load(bf16* dst, const bf16* src, i64 r0, i64 rowEnd, i64 d) {
  constexpr int CH = DP / 8, N = (ROWS * CH + FM_THREADS - 1) / FM_THREADS; // 16-byte chunks per row, per thread
  const bool vec = (d & 7) == 0 && (reinterpret_cast<unsigned long long>(src) & 15) == 0;
  fm_u4 val[N];
#pragma unroll
  for (int u = 0; u < N; u++) {
    const int x = threadIdx.x + u * FM_THREADS, r = x / CH, c = (x % CH) * 8;
    const i64 row = r0 + r;
    val[u] = {0, 0, 0, 0};
    if (x < ROWS * CH && row < rowEnd) {
      const bf16* p = src + row * d + c;
      if (vec && c + 8 <= d) {
        val[u] = *reinterpret_cast<const fm_u4*>(p);
      } else {
        u32 w[4];
#pragma unroll
        for (int e = 0; e < 4; e++) {
          const u32 lo = c + 2 * e < d ? (u32)p[2 * e] : 0u;
          const u32 hi = c + 2 * e + 1 < d ? (u32)p[2 * e + 1] : 0u;
          w[e] = lo | (hi << 16);
        }
        val[u].x = w[0]; val[u].y = w[1]; val[u].z = w[2]; val[u].w = w[3];
      }
    }
  }
#pragma unroll
  for (int u = 0; u < N; u++) {
    const int x = threadIdx.x + u * FM_THREADS;
    if (x < ROWS * CH) *reinterpret_cast<fm_u4*>(dst + (x / CH) * LD + (x % CH) * 8) = val[u];
  }
}

/*
 * fm_load, started asynchronously (cp.async) where every chunk is a whole aligned 16 bytes (d a
 * multiple of 8); the caller commits the group and waits for it (fm_cp_wait) before a barrier. Ragged
 * head dims, FM_PIPELINE 0 and the CPU emulation load synchronously instead.
 */
template <int ROWS, int DP, int LD>
__device__ __forceinline__ void fm_load_async(bf16* dst, const bf16* src, i64 r0, i64 rowEnd, i64 d) {
#if FM_PIPELINE && !defined(FM_EMU)
  constexpr int CH = DP / 8, N = (ROWS * CH + FM_THREADS - 1) / FM_THREADS;
  if ((d & 7) == 0 && (reinterpret_cast<unsigned long long>(src) & 15) == 0) {
#pragma unroll
    for (int u = 0; u < N; u++) {
      const int x = threadIdx.x + u * FM_THREADS, r = x / CH, c = (x % CH) * 8;
      const i64 row = r0 + r;
      const bool valid = row < rowEnd && c < d;
      if (x < ROWS * CH) fm_cp16(dst + r * LD + c, valid ? src + row * d + c : src, valid);
    }
    return;
  }
#endif
  fm_load<ROWS, DP, LD>(dst, src, r0, rowEnd, d);
}

/*
 * Starts filling buffer buf of a double-buffered pair of tiles ([2][2][ROWS][LD]: (first, second) of
 * each buffer) with rows r0 .. min(r0 + ROWS, last + 1) - 1 of x and of y, and commits the group.
 */
template <int ROWS, int DP, int LD>
__device__ __forceinline__ void fm_fetch_pair(bf16* pairs, int buf, const bf16* x, const bf16* y, i64 r0, i64 last, i64 d) {
  const i64 rend = r0 + ROWS < last + 1 ? r0 + ROWS : last + 1;
  fm_load_async<ROWS, DP, LD>(pairs + (2 * buf) * ROWS * LD, x, r0, rend, d);
  fm_load_async<ROWS, DP, LD>(pairs + (2 * buf + 1) * ROWS * LD, y, r0, rend, d);
  fm_cp_commit();
}

/*
 * The head of each pipelined iteration: start the next tile's copies into the other buffer (fetchNext,
 * when there is a next tile; that buffer was last read before the previous iteration's closing
 * barrier), wait for this tile's own copies, and a barrier after which every thread sees them.
 */
template <class F>
__device__ __forceinline__ void fm_pipeline_step(bool hasNext, F fetchNext) {
  if (hasNext) {
    fetchNext();
    fm_cp_wait<1>();
  } else {
    fm_cp_wait<0>();
  }
  __syncthreads();
}

/* A fragment of the 16 × 16 block at (row0, k0) of a row-major tile. */
template <int LD>
__device__ __forceinline__ void fm_afrag(u32 (&a)[4], const bf16* M, int row0, int k0, int g, int t) {
  const bf16* p = M + (row0 + g) * LD + k0 + 2 * t;
  a[0] = fm_ld32(p);
  a[1] = fm_ld32(p + 8 * LD);
  a[2] = fm_ld32(p + 8);
  a[3] = fm_ld32(p + 8 * LD + 8);
}

/* B fragment of B = Mᵀ (B[k][n] = M[n0 + n][k0 + k]) for a row-major tile M: keys (or queries) as rows. */
template <int LD>
__device__ __forceinline__ void fm_bfrag(u32& b0, u32& b1, const bf16* M, int n0, int k0, int g, int t) {
  const bf16* p = M + (n0 + g) * LD + k0 + 2 * t;
  b0 = fm_ld32(p);
  b1 = fm_ld32(p + 8);
}

/* B fragments of B = M[k0 .. k0 + 15][n0 .. n0 + 15] (row-major [k][n]) for the two 8-column tiles at n0 and n0 + 8. */
template <int LD>
__device__ __forceinline__ void fm_bfrag_t(u32 (&b)[4], const bf16* M, int k0, int n0, int lane) {
  fm_ldsm_t(b, M + (k0 + ((lane >> 3) & 1) * 8 + (lane & 7)) * LD + n0 + (lane >> 4) * 8);
}

/* acc[mt][OT][4] += A[mt] (16 × MK, bf16 fragments in registers) · M[0 .. MK)[0 .. 8 OT) (row-major in
   shared memory), for each of the warp's MT row tiles: every B fragment is loaded once for all MT. */
template <int MT, int MK, int OT, int LD>
__device__ __forceinline__ void fm_mma_rt(float (&acc)[MT][OT][4], const u32 (&a)[MT][MK / 16][4], const bf16* M, int lane) {
#pragma unroll
  for (int kb = 0; kb < MK / 16; kb++) {
#pragma unroll
    for (int ot = 0; ot < OT; ot += 2) {
      u32 b[4];
      fm_bfrag_t<LD>(b, M, kb * 16, ot * 8, lane);
#pragma unroll
      for (int mt = 0; mt < MT; mt++) {
        fm_mma(acc[mt][ot], a[mt][kb], b[0], b[1]);
        fm_mma(acc[mt][ot + 1], a[mt][kb], b[2], b[3]);
      }
    }
  }
}

/* acc[mt][n] += X rows (r0 + 16 mt ..) · Y rows (8 n ..)ᵀ over DP columns: both row-major tiles in shared memory. */
template <int MT, int NT, int DP, int LD>
__device__ __forceinline__ void fm_mma_nt(float (&acc)[MT][NT][4], const bf16* X, int r0, const bf16* Y, int g, int t) {
#pragma unroll
  for (int kk = 0; kk < DP / 16; kk++) {
    u32 a[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; mt++) fm_afrag<LD>(a[mt], X, r0 + 16 * mt, kk * 16, g, t);
#pragma unroll
    for (int n = 0; n < NT; n++) {
      u32 b0, b1;
      fm_bfrag<LD>(b0, b1, Y, n * 8, kk * 16, g, t);
#pragma unroll
      for (int mt = 0; mt < MT; mt++) fm_mma(acc[mt][n], a[mt], b0, b1);
    }
  }
}

template <int MT, int NT>
__device__ __forceinline__ void fm_zero(float (&x)[MT][NT][4]) {
#pragma unroll
  for (int mt = 0; mt < MT; mt++) {
#pragma unroll
    for (int n = 0; n < NT; n++) x[mt][n][0] = x[mt][n][1] = x[mt][n][2] = x[mt][n][3] = 0;
  }
}

/* Whether every (row, key) pair of a tile is visible: all rows and keys real, and the band covers the corners. */
__device__ __forceinline__ bool fm_tile_full(i64 i0, i64 rows, i64 iend, i64 j0, i64 keys, i64 jend, i64 qStart, i64 kStart, i64 window) {
  return iend - i0 == rows && jend - j0 == keys && qStart + i0 - kStart - (jend - 1) >= 0 && qStart + iend - 1 - kStart - j0 < window;
}

/* Accumulator tiles x[2 kb], x[2 kb + 1] (16 × 16 of fp32) as the bf16 A fragment of k step kb. */
template <int NT>
__device__ __forceinline__ void fm_to_afrag(u32 (&a)[NT / 2][4], const float (&x)[NT][4]) {
#pragma unroll
  for (int kb = 0; kb < NT / 2; kb++) {
#pragma unroll
    for (int h = 0; h < 2; h++) {
      a[kb][2 * h] = fm_pack(x[2 * kb + h][0], x[2 * kb + h][1]);
      a[kb][2 * h + 1] = fm_pack(x[2 * kb + h][2], x[2 * kb + h][3]);
    }
  }
}

/* Sum / max over the 4 lanes of a quad (the threads holding one accumulator row). */
__device__ __forceinline__ float fm_sum4(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}
__device__ __forceinline__ float fm_max4(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}

/* Store this thread's columns (2t, 2t + 1 of each 8-column tile) of accumulator row half h, times scale. */
template <int OT>
__device__ __forceinline__ void fm_store_row(bf16* row, const float (&acc)[OT][4], int h, float scale, int t, i64 d) {
#pragma unroll
  for (int ot = 0; ot < OT; ot++) {
    const int c = ot * 8 + 2 * t;
    if (c < d) row[c] = f2bf(acc[ot][2 * h] * scale);
    if (c + 1 < d) row[c + 1] = f2bf(acc[ot][2 * h + 1] * scale);
  }
}

/* Store this thread's columns of accumulator row half h as floats, times scale (a split kernel's partial output). */
template <int OT>
__device__ __forceinline__ void fm_store_partial(float* row, const float (&acc)[OT][4], int h, float scale, int t, i64 d) {
#pragma unroll
  for (int ot = 0; ot < OT; ot++) {
    const int c = ot * 8 + 2 * t;
    if (c < d) row[c] = acc[ot][2 * h] * scale;
    if (c + 1 < d) row[c + 1] = acc[ot][2 * h + 1] * scale;
  }
}

/*
 * The forward's end for a warp's 16-row tile: rows row[0], row[1] (of batch entry b) get out = o / l and
 * their lse; with splits > 1, split sp's unnormalised o and (m, l) go to the partials po, pml instead.
 */
template <int OT>
__device__ __forceinline__ void fm_finish_rows(const float (&o)[OT][4], const float (&m)[2], const float (&l)[2], const i64 (&row)[2], i64 iend,
    i64 b, i64 tq, i64 d, int t, i64 sp, i64 splits, bf16* out, float* lse, float* po, float* pml) {
#pragma unroll
  for (int h = 0; h < 2; h++) {
    if (row[h] >= iend) continue;
    if (splits > 1) {
      const i64 slot = (b * tq + row[h]) * splits + sp;
      fm_store_partial<OT>(po + slot * d, o, h, 1.f, t, d);
      if (t == 0) { pml[2 * slot] = m[h]; pml[2 * slot + 1] = l[h]; }
    } else {
      fm_store_row<OT>(out + (b * tq + row[h]) * d, o, h, 1.f / l[h], t, d);
      if (t == 0) lse[b * tq + row[h]] = (m[h] + fa_log(l[h])) * (float)FA_INV_LOGC;
    }
  }
}

/* Split sp of the splits of a query tile's key range [jlo, jhi]: whole key tiles of BK from the start (possibly none). */
template <int BK>
__device__ __forceinline__ void fm_split_keys(i64& jlo, i64& jhi, i64 sp, i64 splits) {
  if (splits <= 1) return;
  const i64 per = ((jhi - jlo) / BK + splits) / splits;
  jlo += sp * per * BK;
  if (jlo + per * BK - 1 < jhi) jhi = jlo + per * BK - 1;
}

/* Key j is visible from query row i (band_lo(i) <= j <= band_hi(i), i < tq assumed). */
__device__ __forceinline__ bool fm_sees(i64 i, i64 j, i64 qStart, i64 kStart, i64 window) {
  const i64 diff = qStart + i - kStart - j;
  return diff >= 0 && diff < window;
}

/*
 * One key tile of the forward's online softmax for a warp's 16-row tile (rows row[0], row[1] of this
 * thread; keys j0 .. jend - 1): the scores s (accumulator fragments) become probabilities, handed on as
 * the bf16 A fragments pa of the P·V product; the running max m and sum l move to the new max, and
 * alpha is the factor that takes output accumulators from the old max to it (fm_rescale). Masked element
 * by element unless the tile is full. Shared by the mma.sync and the wgmma forward (same fragment layouts).
 */
template <int NT>
__device__ __forceinline__ void fm_softmax_probs(float (&s)[NT][4], u32 (&pa)[NT / 2][4], float (&m)[2], float (&l)[2], float (&alpha)[2],
    const i64 (&row)[2], bool full, i64 j0, i64 jend, i64 iend, float sc, int t, i64 qStart, i64 kStart, i64 window) {
  float mx[2] = {FA_NEG_INF, FA_NEG_INF};
#pragma unroll
  for (int n = 0; n < NT; n++) {
#pragma unroll
    for (int e = 0; e < 4; e++) {
      const int h = e >> 1;
      float x = s[n][e] * sc;
      if (!full) {
        const i64 j = j0 + n * 8 + 2 * t + (e & 1);
        if (!(row[h] < iend && j < jend && fm_sees(row[h], j, qStart, kStart, window))) x = FA_NEG_INF;
      }
      s[n][e] = x;
      mx[h] = fmaxf(mx[h], x);
    }
  }
  float mu[2], rs[2] = {0, 0};
#pragma unroll
  for (int h = 0; h < 2; h++) {
    const float mn = fmaxf(m[h], fm_max4(mx[h]));
    mu[h] = mn == FA_NEG_INF ? 0.f : mn; // nothing visible yet: exp(-inf - 0) = 0, never -inf - -inf
    alpha[h] = fa_exp(m[h] - mu[h]);
    m[h] = mn;
  }
#pragma unroll
  for (int n = 0; n < NT; n++) {
#pragma unroll
    for (int e = 0; e < 4; e++) {
      s[n][e] = fa_exp(s[n][e] - mu[e >> 1]);
      rs[e >> 1] += s[n][e];
    }
  }
#pragma unroll
  for (int h = 0; h < 2; h++) l[h] = l[h] * alpha[h] + fm_sum4(rs[h]);
  fm_to_afrag<NT>(pa, s);
}

/* Output accumulators (rows g and g + 8 of a 16-row tile) times the softmax step's alpha. */
template <int OT>
__device__ __forceinline__ void fm_rescale(float (&o)[OT][4], const float (&alpha)[2]) {
#pragma unroll
  for (int ot = 0; ot < OT; ot++) {
    o[ot][0] *= alpha[0]; o[ot][1] *= alpha[0]; o[ot][2] *= alpha[1]; o[ot][3] *= alpha[1];
  }
}
#endif

/*
 * Forward: grid = batch * ceil(tq / BQ) * splits blocks, the heaviest (last) query tiles first. Each of
 * the 4 warps owns MT = BQ / 64 tiles of 16 query rows: every K and V fragment it loads serves all MT.
 * With splits > 1 (few query tiles over long bands: the TTT inner step's 1024 queries over a window of
 * 8 K keys would leave most SMs idle), block (tile, s) takes the s-th share of the tile's key tiles and
 * writes its unnormalised output and (max, sum) to po and pml (the decode partials' layout, [row][split]),
 * which the decode combine kernel merges into out and lse.
 */
template <int BQ, int BK, int DP>
__device__ __forceinline__ void fm_fwd(const bf16* q, const bf16* k, const bf16* v, bf16* out, float* lse,
    i64 batch, i64 tq, i64 tk, i64 d, i64 qStart, i64 kStart, i64 window, double scaleD, i64 groups, i64 kvStride,
    i64 splits, float* po, float* pml) {
#ifdef FM_ENABLED
  constexpr int MT = BQ / 64, LD = DP + 8, NT = BK / 8, OT = DP / 8, KD = DP / 16;
  extern __shared__ __align__(16) unsigned char smem[];
  bf16* Qs = reinterpret_cast<bf16*>(smem); // [BQ][LD]
  bf16* KVs = Qs + BQ * LD;                 // [2][2][BK][LD]: (K, V) of the current and the next key tile
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const i64 sp = (i64)blockIdx.x % splits;
  const fa_tile tile = fa_query_tile<BQ>(batch, tq, (i64)blockIdx.x / splits);
  const i64 b = tile.b, i0 = tile.i0, iend = tile.iend;
  const bf16* kb = k + (b / groups) * kvStride; // grouped-query attention: the kv entry of query entry b
  const bf16* vb = v + (b / groups) * kvStride;
  const float sc = (float)(scaleD * FA_LOGC);
  i64 jlo = band_lo(i0, qStart, kStart, window), jhi = band_hi(iend - 1, qStart, kStart, tk);
  fm_split_keys<BK>(jlo, jhi, sp, splits);
  // key tile j0 goes to buffer ((j0 - jlo) / BK) & 1; the first one is on its way while Q loads
  fm_fetch_pair<BK, DP, LD>(KVs, 0, kb, vb, jlo, jhi, d);
  fm_load<BQ, DP, LD>(Qs, q + b * tq * d, i0, iend, d);
  __syncthreads();
  u32 qa[MT][KD][4];
#pragma unroll
  for (int mt = 0; mt < MT; mt++) {
#pragma unroll
    for (int kk = 0; kk < KD; kk++) fm_afrag<LD>(qa[mt][kk], Qs, (warp * MT + mt) * 16, kk * 16, g, t);
  }
  i64 row[MT][2];
  float m[MT][2], l[MT][2], o[MT][OT][4];
#pragma unroll
  for (int mt = 0; mt < MT; mt++) {
#pragma unroll
    for (int h = 0; h < 2; h++) { row[mt][h] = i0 + (warp * MT + mt) * 16 + g + 8 * h; m[mt][h] = FA_NEG_INF; l[mt][h] = 0; }
  }
  fm_zero<MT, OT>(o);
  int buf = 0;
  for (i64 j0 = jlo; j0 <= jhi; j0 += BK, buf ^= 1) {
    const i64 jend = j0 + BK < jhi + 1 ? j0 + BK : jhi + 1;
    fm_pipeline_step(j0 + BK <= jhi, [&] { fm_fetch_pair<BK, DP, LD>(KVs, buf ^ 1, kb, vb, j0 + BK, jhi, d); });
    const bf16* Ks = KVs + (2 * buf) * BK * LD;
    const bf16* Vs = Ks + BK * LD;
    float s[MT][NT][4];
    fm_zero<MT, NT>(s);
#pragma unroll
    for (int kk = 0; kk < KD; kk++) {
#pragma unroll
      for (int n = 0; n < NT; n++) {
        u32 b0, b1;
        fm_bfrag<LD>(b0, b1, Ks, n * 8, kk * 16, g, t);
#pragma unroll
        for (int mt = 0; mt < MT; mt++) fm_mma(s[mt][n], qa[mt][kk], b0, b1);
      }
    }
    const bool full = fm_tile_full(i0, BQ, iend, j0, BK, jend, qStart, kStart, window);
    u32 pa[MT][NT / 2][4];
#pragma unroll
    for (int mt = 0; mt < MT; mt++) {
      float alpha[2];
      fm_softmax_probs<NT>(s[mt], pa[mt], m[mt], l[mt], alpha, row[mt], full, j0, jend, iend, sc, t, qStart, kStart, window);
      fm_rescale<OT>(o[mt], alpha);
    }
    fm_mma_rt<MT, BK, OT, LD>(o, pa, Vs, lane);
    __syncthreads(); // every read of this buffer is done before it is refilled
  }
#pragma unroll
  for (int mt = 0; mt < MT; mt++) fm_finish_rows<OT>(o[mt], m[mt], l[mt], row[mt], iend, b, tq, d, t, sp, splits, out, lse, po, pml);
#endif
}

/*
 * dQ: grid = batch * ceil(tq / BQ) * splits blocks, one per (query tile, split), over its key tiles; MT = BQ / 64
 * row tiles per warp. With splits > 1 (as in the forward) each block writes its share of dQ in float to
 * part [splits][batch · tq][d], which attn_split_sum adds up in split order.
 */
template <int BQ, int BK, int DP>
__device__ __forceinline__ void fm_dq(const bf16* q, const bf16* k, const bf16* v, const bf16* dout, const float* lse, const float* delta, bf16* dq,
    i64 batch, i64 tq, i64 tk, i64 d, i64 qStart, i64 kStart, i64 window, double scaleD, i64 groups, i64 kvStride,
    i64 splits, float* part) {
#ifdef FM_ENABLED
  constexpr int MT = BQ / 64, LD = DP + 8, NT = BK / 8, OT = DP / 8;
  extern __shared__ __align__(16) unsigned char smem[];
  bf16* Qs = reinterpret_cast<bf16*>(smem); // [BQ][LD]
  bf16* dOs = Qs + BQ * LD;                 // [BQ][LD]
  float* Ls = reinterpret_cast<float*>(dOs + BQ * LD); // [BQ]: lse * FA_LOGC
  float* Ds = Ls + BQ;                      // [BQ]: delta
  bf16* KVs = reinterpret_cast<bf16*>(Ds + BQ); // [2][2][BK][LD]: (K, V) of the current and the next key tile
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const i64 sp = (i64)blockIdx.x % splits;
  const fa_tile tile = fa_query_tile<BQ>(batch, tq, (i64)blockIdx.x / splits);
  const i64 b = tile.b, i0 = tile.i0, iend = tile.iend;
  const bf16* kb = k + (b / groups) * kvStride; // grouped-query attention: the kv entry of query entry b
  const bf16* vb = v + (b / groups) * kvStride;
  i64 jlo = band_lo(i0, qStart, kStart, window), jhi = band_hi(iend - 1, qStart, kStart, tk);
  fm_split_keys<BK>(jlo, jhi, sp, splits);
  fm_fetch_pair<BK, DP, LD>(KVs, 0, kb, vb, jlo, jhi, d);
  fm_load<BQ, DP, LD>(Qs, q + b * tq * d, i0, iend, d);
  fm_load<BQ, DP, LD>(dOs, dout + b * tq * d, i0, iend, d);
  fa_load_rows<BQ>(Ls, Ds, lse + b * tq, delta + b * tq, i0, iend);
  const float sc = (float)(scaleD * FA_LOGC);
  const int r0 = warp * MT * 16;
  float dqa[MT][OT][4];
  fm_zero<MT, OT>(dqa);
  int buf = 0;
  for (i64 j0 = jlo; j0 <= jhi; j0 += BK, buf ^= 1) {
    const i64 jend = j0 + BK < jhi + 1 ? j0 + BK : jhi + 1;
    // (the first barrier also publishes Qs, dOs, Ls, Ds)
    fm_pipeline_step(j0 + BK <= jhi, [&] { fm_fetch_pair<BK, DP, LD>(KVs, buf ^ 1, kb, vb, j0 + BK, jhi, d); });
    const bf16* Ks = KVs + (2 * buf) * BK * LD;
    const bf16* Vs = Ks + BK * LD;
    float s[MT][NT][4], dp[MT][NT][4];
    fm_zero<MT, NT>(s);
    fm_zero<MT, NT>(dp);
    fm_mma_nt<MT, NT, DP, LD>(s, Qs, r0, Ks, g, t);
    fm_mma_nt<MT, NT, DP, LD>(dp, dOs, r0, Vs, g, t);
    const bool full = fm_tile_full(i0, BQ, iend, j0, BK, jend, qStart, kStart, window);
    u32 dsa[MT][NT / 2][4];
#pragma unroll
    for (int mt = 0; mt < MT; mt++) {
#pragma unroll
      for (int n = 0; n < NT; n++) {
#pragma unroll
        for (int e = 0; e < 4; e++) {
          const int ri = r0 + 16 * mt + g + 8 * (e >> 1);
          float p = fa_exp(s[mt][n][e] * sc - Ls[ri]);
          if (!full) {
            const i64 i = i0 + ri, j = j0 + n * 8 + 2 * t + (e & 1);
            if (!(i < iend && j < jend && fm_sees(i, j, qStart, kStart, window))) p = 0.f;
          }
          s[mt][n][e] = p * (dp[mt][n][e] - Ds[ri]);
        }
      }
      fm_to_afrag<NT>(dsa[mt], s[mt]);
    }
    fm_mma_rt<MT, BK, OT, LD>(dqa, dsa, Ks, lane);
    __syncthreads(); // every read of this buffer is done before it is refilled
  }
#pragma unroll
  for (int mt = 0; mt < MT; mt++) {
#pragma unroll
    for (int h = 0; h < 2; h++) {
      const i64 i = i0 + r0 + 16 * mt + g + 8 * h;
      if (i >= iend) continue;
      if (splits > 1) fm_store_partial<OT>(part + (sp * batch * tq + b * tq + i) * d, dqa[mt], h, (float)scaleD, t, d);
      else fm_store_row<OT>(dq + (b * tq + i) * d, dqa[mt], h, (float)scaleD, t, d);
    }
  }
#endif
}

/*
 * dK, dV: grid = (batch / groups) * ceil(tk / BK) * splits blocks, one per (key tile of a key/value entry, split), over
 * the query tiles (of each of its query entries) that see it; MT = BK / 64 key tiles per warp. With splits > 1 (few
 * key tiles over many query tiles: the TTT inner step's 1024 fresh keys, seen by the tile at the start through
 * all 1024 queries) split sp takes its share of those query tiles and writes its dK and dV in float to
 * part [2][splits][(batch / groups) · tk][d], which attn_split_sum adds up in split order.
 */
template <int BQ, int BK, int DP>
__device__ __forceinline__ void fm_dkv(const bf16* q, const bf16* k, const bf16* v, const bf16* dout, const float* lse, const float* delta, bf16* dk, bf16* dv,
    i64 batch, i64 tq, i64 tk, i64 d, i64 qStart, i64 kStart, i64 window, double scaleD, i64 groups, i64 kvStride,
    i64 splits, float* part) {
#ifdef FM_ENABLED
  constexpr int MT = BK / 64, LD = DP + 8, NQ = BQ / 8, OT = DP / 8;
  extern __shared__ __align__(16) unsigned char smem[];
  bf16* Ks = reinterpret_cast<bf16*>(smem); // [BK][LD]
  bf16* Vs = Ks + BK * LD;                  // [BK][LD]
  bf16* QDs = Vs + BK * LD;                 // [2][2][BQ][LD]: (Q, dO) of the current and the next query tile
  float* LDs = reinterpret_cast<float*>(QDs + 4 * BQ * LD); // [2][2][BQ]: (lse * FA_LOGC, delta) of the same
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  // b: this block's key/value entry. Its query entries are b·groups .. b·groups + groups − 1 (grouped-query
  // attention), and the pipeline runs over (query entry, query tile) pairs: step tt is entry
  // b·groups + tt / ntiles, rows from ilo + (tt % ntiles)·BQ.
  const i64 kvBatch = batch / groups;
  const i64 sp = (i64)blockIdx.x % splits, tile = (i64)blockIdx.x / splits;
  const i64 b = tile % kvBatch;
  const i64 j0 = (tile / kvBatch) * BK;
  const i64 jend = j0 + BK < tk ? j0 + BK : tk;
  i64 ilo = kStart + j0 - qStart; if (ilo < 0) ilo = 0;
  i64 ihi = kStart + jend - 1 - qStart + window - 1; if (ihi > tq - 1) ihi = tq - 1;
  const i64 ntiles = ilo <= ihi ? (ihi - ilo) / BQ + 1 : 0, steps = groups * ntiles;
  // this split's steps [tlo, thi) (an empty share still writes its zeros)
  const i64 per = (steps + splits - 1) / splits;
  const i64 tlo = sp * per < steps ? sp * per : steps, thi = tlo + per < steps ? tlo + per : steps;
  auto fetch = [&](i64 tt, int buf) {
    const i64 qe = b * groups + tt / ntiles, i0 = ilo + (tt % ntiles) * BQ;
    fm_fetch_pair<BQ, DP, LD>(QDs, buf, q + qe * tq * d, dout + qe * tq * d, i0, ihi, d);
    const i64 iend = i0 + BQ < ihi + 1 ? i0 + BQ : ihi + 1;
    fa_load_rows<BQ>(LDs + 2 * buf * BQ, LDs + (2 * buf + 1) * BQ, lse + qe * tq, delta + qe * tq, i0, iend);
  };
  if (tlo < thi) fetch(tlo, 0);
  fm_load<BK, DP, LD>(Ks, k + b * kvStride, j0, jend, d);
  fm_load<BK, DP, LD>(Vs, v + b * kvStride, j0, jend, d);
  const float sc = (float)(scaleD * FA_LOGC);
  const int r0 = warp * MT * 16;
  float dka[MT][OT][4], dva[MT][OT][4];
  fm_zero<MT, OT>(dka);
  fm_zero<MT, OT>(dva);
  int buf = 0;
  for (i64 tt = tlo; tt < thi; tt++, buf ^= 1) {
    const i64 i0 = ilo + (tt % ntiles) * BQ;
    const i64 iend = i0 + BQ < ihi + 1 ? i0 + BQ : ihi + 1;
    // (the first barrier also publishes Ks and Vs)
    fm_pipeline_step(tt + 1 < thi, [&] { fetch(tt + 1, buf ^ 1); });
    const bf16* Qs = QDs + (2 * buf) * BQ * LD;
    const bf16* dOs = Qs + BQ * LD;
    const float* Ls = LDs + 2 * buf * BQ;
    const float* Ds = Ls + BQ;
    float s[MT][NQ][4], dp[MT][NQ][4];
    fm_zero<MT, NQ>(s);
    fm_zero<MT, NQ>(dp);
    fm_mma_nt<MT, NQ, DP, LD>(s, Ks, r0, Qs, g, t);
    fm_mma_nt<MT, NQ, DP, LD>(dp, Vs, r0, dOs, g, t);
    const bool full = fm_tile_full(i0, BQ, iend, j0, BK, jend, qStart, kStart, window);
    // s becomes Pᵀ (key rows, query columns), dp becomes dSᵀ
    u32 pa[MT][NQ / 2][4], dsa[MT][NQ / 2][4];
#pragma unroll
    for (int mt = 0; mt < MT; mt++) {
#pragma unroll
      for (int n = 0; n < NQ; n++) {
#pragma unroll
        for (int e = 0; e < 4; e++) {
          const int ci = n * 8 + 2 * t + (e & 1);
          float p = fa_exp(s[mt][n][e] * sc - Ls[ci]);
          if (!full) {
            const i64 i = i0 + ci, j = j0 + r0 + 16 * mt + g + 8 * (e >> 1);
            if (!(i < iend && j < jend && fm_sees(i, j, qStart, kStart, window))) p = 0.f;
          }
          s[mt][n][e] = p;
          dp[mt][n][e] = p * (dp[mt][n][e] - Ds[ci]);
        }
      }
      fm_to_afrag<NQ>(pa[mt], s[mt]);
      fm_to_afrag<NQ>(dsa[mt], dp[mt]);
    }
    fm_mma_rt<MT, BQ, OT, LD>(dva, pa, dOs, lane);
    fm_mma_rt<MT, BQ, OT, LD>(dka, dsa, Qs, lane);
    __syncthreads(); // every read of this buffer is done before it is refilled
  }
#pragma unroll
  for (int mt = 0; mt < MT; mt++) {
#pragma unroll
    for (int h = 0; h < 2; h++) {
      const i64 j = j0 + r0 + 16 * mt + g + 8 * h;
      if (j >= jend) continue;
      if (splits > 1) {
        const i64 n = kvBatch * tk * d;
        fm_store_partial<OT>(part + sp * n + (b * tk + j) * d, dka[mt], h, (float)scaleD, t, d);
        fm_store_partial<OT>(part + (splits + sp) * n + (b * tk + j) * d, dva[mt], h, 1.f, t, d);
      } else {
        fm_store_row<OT>(dk + (b * tk + j) * d, dka[mt], h, (float)scaleD, t, d);
        fm_store_row<OT>(dv + (b * tk + j) * d, dva[mt], h, 1.f, t, d);
      }
    }
  }
#endif
}
`;
