/**
 * Reductions over the middle axis of [outer, n, inner] (sum / max / min), softmax and logsumexp over
 * the last axis of [outer, n], and the inclusive cumulative sum. Sums accumulate in double, as the
 * CPU backend's do; max and min propagate NaN like the CPU loops.
 */
import type { ReduceOp } from '../../../engine/backend.js';
import { CTYPE, CUDA_FLOATS, type CudaDType, MATH, STORE, blockReduce, load, vecWidth } from './common.js';

const INIT: Record<ReduceOp, string> = { sum: '0.0', max: 'NEG_INF_D', min: 'POS_INF_D', sumSquares: '0.0' };
/** combine(a = accumulator, b = new value) */
const COMBINE: Record<ReduceOp, string> = {
  sum: 'a + b',
  max: '((b > a || b != b) ? b : a)',
  min: '((b < a || b != b) ? b : a)',
  sumSquares: 'a + b',
};
/** What an element of x contributes (partials, once combined, are not mapped again). */
const ELEMENT: Record<ReduceOp, (v: string) => string> = {
  sum: (v) => v,
  max: (v) => v,
  min: (v) => v,
  sumSquares: (v) => `sq_d(${v})`,
};

export const reduceRowsName = (op: ReduceOp) => `reduce_rows_${op}`;
export const reduceColsName = (op: ReduceOp) => `reduce_cols_${op}`;
/** One warp per row, for short rows (a block per row would idle most of its threads). */
export const reduceRowsWarpName = (op: ReduceOp) => `reduce_rows_warp_${op}`;
/**
 * Split reductions, for few outputs over long axes (one block or thread per output would leave the
 * GPU nearly idle): pass 1 reduces chunks of the axis into double partials ws[chunk * total + t],
 * pass 2 combines each output's partials in chunk order, so results stay deterministic.
 */
export const reduceRowsPartialName = (op: ReduceOp) => `reduce_rows_partial_${op}`;
export const reduceColsPartialName = (op: ReduceOp) => `reduce_cols_partial_${op}`;
export const reduceFinalName = (op: ReduceOp) => `reduce_final_${op}`;
/** The same with a warp per output, for many partials each (a fixed lane order and shuffle tree: deterministic). */
export const reduceFinalWarpName = (op: ReduceOp) => `reduce_final_warp_${op}`;
/** Columns per block of the split column reduction (a warp's width); THREADS / COL_TILE row lanes. */
export const COL_TILE = 32;
export const SOFTMAX = 'softmax_rows';
export const LOGSUMEXP = 'logsumexp_rows';
export const SOFTMAX_BWD = 'softmax_bwd_rows';
/** softmax(x + bias) over rows, bias [rows, n] repeating over x's rows (the composite attention's band). */
export const SOFTMAX_BIAS = 'softmax_bias_rows';
export const SOFTMAX_GRAD_BWD = 'softmax_grad_bwd_rows';
export const LSE_PARTIAL = 'logsumexp_partial';
export const LSE_FINAL = 'logsumexp_final';
export const CUMSUM = 'cumsum_mid';
export const NLL_FWD = 'token_nll_fwd';
export const NLL_BWD = 'token_nll_bwd';
export const NLL_HVP = 'token_nll_hvp';
/** The backward kernels adding into the logits' running cotangent in place (dx read, then written, per element). */
export const NLL_BWD_ACC = 'token_nll_bwd_acc';
export const NLL_HVP_ACC = 'token_nll_hvp_acc';
export const RMSNORM_FWD = 'rmsnorm_fwd';
export const RMSNORM_BWD = 'rmsnorm_bwd';
/** The same with 16-byte loads, each lane's share of the row held in registers between the passes. */
export const RMSNORM_FWD_VEC = 'rmsnorm_fwd_vec';
export const RMSNORM_BWD_VEC = 'rmsnorm_bwd_vec';
/** The backward of RMSNorm's backward (Backend.rmsNormGradBackward), a warp per row. */
export const RMSNORM_GRAD_BWD = 'rmsnorm_grad_bwd';
/** dw's split column sum read from dy, x and rstd (the partials of reduce_cols_partial_sum over dy·x·rstd). */
export const RMSNORM_DW_PARTIAL = 'rmsnorm_dw_partial';
/** Rows per block of the RMSNorm kernels (one warp each). */
export const RMSNORM_ROWS = 8;
/** 16-byte vectors of a row each lane of the vector kernels holds at most. */
export const RMSNORM_MAX_VECS = 8;
/** Whether rows of d elements take the vector kernels: whole 16-byte vectors (then every row is aligned), at most RMSNORM_MAX_VECS per lane. */
export function rmsNormVectorizable(dtype: CudaDType, d: number): boolean {
  const vw = vecWidth(dtype);
  return d % vw === 0 && d / vw <= 32 * RMSNORM_MAX_VECS;
}
/**
 * Lanes per row of the vector kernels: a warp, or for rows of fewer than 32 vectors (a head's 64 bf16 of the
 * q/k norms: 8) a power of two that covers them, so that a warp takes several rows instead of idling most lanes.
 */
export function rmsNormLanes(dtype: CudaDType, d: number): number {
  return Math.min(32, 2 ** Math.ceil(Math.log2(Math.max(1, d / vecWidth(dtype)))));
}

// (the NLL kernels' vec = 1, passed when every row is 16-byte aligned, implies V is a multiple of vecWidth: rows of V · bytes are 16-byte multiples)

/**
 * Token NLL from logits (fusedTokenNll), memory-bound over [rows, V]: forward one block per row, one
 * pass with a running (max, Σ exp) per thread (exp in the math type: float for float32 and bfloat16,
 * sums in double), merged across the block; nll and the row's lse (float, or double for float64; so
 * is the cotangent g) by thread 0; a target outside [0, V) sets the backend's status word (code 3, read
 * at the next sync) and gives NaN. Backward over (column chunk, row) blocks: (exp(x − lse) − [j = target]) · g.
 * Rows are read 16 bytes per load where aligned (vec). An infinite max passes through as lse, as in
 * logsumexp_rows. Its second order (token_nll_hvp) one block per row: s = Σ p·u, then dx = g·p·(u − s)
 * and dg = s − u[target].
 */
/** 16-byte loads each thread of the token NLL's forward has in flight. */
const NLL_LOADS = 4;

function tokenNllSource(dtype: CudaDType): string {
  const T = CTYPE[dtype];
  const L = dtype === 'float64' ? 'double' : 'float';
  const A = MATH[dtype];
  const EXP = dtype === 'float64' ? 'exp' : 'expf';
  const VW = vecWidth(dtype);
  const ld = (e: string) => load(dtype, e, 'double');
  const la = (e: string) => load(dtype, e, A);
  const st = STORE[dtype];
  return `extern "C" __global__ void ${NLL_FWD}(${L}* nll, ${L}* lse, const ${T}* x, const int* tgt, int* status, i64 rows, i64 V, int vec) {
  __shared__ double red[1024];
  const i64 t = threadIdx.x, nt = blockDim.x;
  for (i64 o = blockIdx.x; o < rows; o += gridDim.x) {
    const ${T}* row = x + o * V;
    ${A} m = (${A})NEG_INF_D;
    double s = 0.0;
    if (vec) {
      // NLL_LOADS vectors in flight per thread, then one rescale per group (a running max per element
      // kept each load waiting on the one before: the pass ran at ~40% of the memory bandwidth)
      const uint4* rv = (const uint4*)row;
      const i64 nv = V / ${VW};
      for (i64 i0 = t; i0 < nv; i0 += nt * ${NLL_LOADS}) {
        uint4 u[${NLL_LOADS}];
        #pragma unroll
        for (int a = 0; a < ${NLL_LOADS}; a++) if (i0 + a * nt < nv) u[a] = rv[i0 + a * nt];
        ${A} cm = m;
        #pragma unroll
        for (int a = 0; a < ${NLL_LOADS}; a++) {
          if (i0 + a * nt >= nv) continue;
          const ${T}* e = (const ${T}*)&u[a];
          #pragma unroll
          for (int q = 0; q < ${VW}; q++) cm = fmax(cm, ${la('e[q]')});
        }
        if (cm > m) { s = m == (${A})NEG_INF_D ? 0.0 : s * (double)${EXP}(m - cm); m = cm; }
        ${A} cs = 0;
        #pragma unroll
        for (int a = 0; a < ${NLL_LOADS}; a++) {
          if (i0 + a * nt >= nv) continue;
          const ${T}* e = (const ${T}*)&u[a];
          #pragma unroll
          for (int q = 0; q < ${VW}; q++) { const ${A} v = ${la('e[q]')}; if (!(v == (${A})NEG_INF_D)) cs += ${EXP}(v - m); }
        }
        s += (double)cs;
      }
    } else {
      for (i64 j = t; j < V; j += nt) {
        const ${A} v = ${la('row[j]')};
        if (v > m) { s = (m == (${A})NEG_INF_D ? 0.0 : s * (double)${EXP}(m - v)) + 1.0; m = v; } else if (!(v == (${A})NEG_INF_D)) s += (double)${EXP}(v - m);
      }
    }
    const double M = block_fmax((double)m, red);
    double l = M;
    if (M != NEG_INF_D && M != POS_INF_D) l = M + log(block_dsum(m == (${A})NEG_INF_D ? 0.0 : s * exp((double)m - M), red));
    if (threadIdx.x == 0) {
      const int r = tgt[o];
      lse[o] = (${L})l;
      if (r < 0 || r >= V) {
        if (atomicCAS(status, 0, 3) == 0) { status[1] = r; status[2] = (int)V; }
        nll[o] = (${L})__longlong_as_double(0x7ff8000000000000LL);
      } else {
        nll[o] = (${L})(l - ${ld('row[r]')});
      }
    }
  }
}
${[false, true].map((acc) => `extern "C" __global__ void ${acc ? NLL_BWD_ACC : NLL_BWD}(${T}* dx, const ${T}* x, const int* tgt, const ${L}* lse, const ${L}* g, i64 rows, i64 V, int vec) {
  const i64 t = (i64)blockIdx.x * blockDim.x + threadIdx.x, nt = (i64)gridDim.x * blockDim.x;
  for (i64 o = blockIdx.y; o < rows; o += gridDim.y) {
    const ${T}* row = x + o * V;
    ${T}* out = dx + o * V;
    const double l = (double)lse[o];
    const ${A} gr = (${A})g[o];
    const i64 r = tgt[o];
    if (vec) {
      const uint4* rv = (const uint4*)row;
      uint4* ov = (uint4*)out;
      const i64 nv = V / ${VW};
      for (i64 i = t; i < nv; i += nt) {
        const uint4 u = rv[i];
        const ${T}* e = (const ${T}*)&u;
        uint4 w${acc ? ' = ov[i]' : ''};
        ${T}* f = (${T}*)&w;
        #pragma unroll
        for (int q = 0; q < ${VW}; q++) {
          const ${A} p = ${EXP}((${A})(${ld('e[q]')} - l));
          const ${A} d = (p - (i * ${VW} + q == r ? (${A})1 : (${A})0)) * gr;
          f[q] = ${st(acc ? `${la('f[q]')} + d` : 'd')};
        }
        ov[i] = w;
      }
    } else {
      for (i64 j = t; j < V; j += nt) {
        const ${A} d = (${EXP}((${A})(${ld('row[j]')} - l)) - (j == r ? (${A})1 : (${A})0)) * gr;
        out[j] = ${st(acc ? `${la('out[j]')} + d` : 'd')};
      }
    }
  }
}
extern "C" __global__ void ${acc ? NLL_HVP_ACC : NLL_HVP}(${T}* dx, ${L}* dg, const ${T}* x, const int* tgt, const ${L}* lse, const ${L}* g, const ${T}* u, i64 rows, i64 V) {
  __shared__ double red[1024];
  for (i64 o = blockIdx.x; o < rows; o += gridDim.x) {
    const ${T}* xr = x + o * V;
    const ${T}* ur = u + o * V;
    const double l = (double)lse[o];
    double s = 0.0;
    for (i64 j = threadIdx.x; j < V; j += blockDim.x) s += exp(${ld('xr[j]')} - l) * ${ld('ur[j]')};
    s = block_dsum(s, red);
    const double gr = (double)g[o];
    for (i64 j = threadIdx.x; j < V; j += blockDim.x) {
      const double d = gr * exp(${ld('xr[j]')} - l) * (${ld('ur[j]')} - s);
      dx[o * V + j] = ${st(acc ? `${ld('dx[o * V + j]')} + d` : 'd')};
    }
    if (threadIdx.x == 0) { const int r = tgt[o]; dg[o] = (${L})(s - (r >= 0 && r < V ? ${ld('ur[r]')} : 0.0)); }
  }
}`).join('\n')}`;
}

/**
 * RMSNorm, one warp per row: forward y = x · rstd · w (rstd kept for the backward: float for
 * float32/bfloat16, double for float64); backward dx = rstd·dy·w − x·rstd³·Σ(dy·w·x)/d, plus
 * gxr = dy·x·rstd (in the math type) whose column sum the backend takes as dw (fixed order), written
 * only when gxr is not null. Two forms of each: rows of whole 16-byte vectors (rmsNormVectorizable) load a
 * vector per lane at a time and keep the lane's share of the row in registers between the sum and the
 * output pass; other rows go element by element with the column loops unrolled, so that a warp's loads
 * go out together (one row per warp is latency-bound otherwise). Both keep a fixed summation order.
 * The backward's backward (RMSNORM_GRAD_BWD, element-wise form only) takes the cotangent c of dx and writes
 * dx', d(dy) and, when gh is not null, gh = dy·h (math type) whose column sum is the gain's cotangent.
 */
function rmsNormSource(dtype: CudaDType): string {
  const T = CTYPE[dtype];
  const A = dtype === 'float64' ? 'double' : 'float';
  const VW = vecWidth(dtype);
  const ld = (e: string) => load(dtype, e, A);
  const st = STORE[dtype];
  const warpSum = `for (int s = 16; s > 0; s >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, s);`;
  // the per-element math, shared by both forms (x, w, g: math-type values; k = rstd)
  const y = (x: string, w: string) => st(`${x} * k * ${w}`);
  const dx = (g: string, w: string, x: string) => st(`k * ${g} * ${w} - ${x} * k3`);
  const head = `const i64 row = (i64)blockIdx.x * ${RMSNORM_ROWS} + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;`;
  // the vector kernels: lpr lanes per row (rmsNormLanes), RMSNORM_ROWS · 32 / lpr rows per block. Lanes of rows past
  // the end (in a warp that has a live row) load and store nothing but join the shuffles.
  const vecHead = `const int rpw = 32 / lpr;
  const i64 warpRow = ((i64)blockIdx.x * ${RMSNORM_ROWS} + threadIdx.x / 32) * rpw;
  if (warpRow >= rows) return;
  const i64 row = warpRow + (threadIdx.x % 32) / lpr;
  const int lane = threadIdx.x % lpr;
  const bool live = row < rows;`;
  const vecSum = `for (int s = lpr / 2; s > 0; s >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, s);`;
  // for each of this lane's vectors u (index i of the row's nv), with e = its elements
  const eachVec = (body: string) => `#pragma unroll
  for (int u = 0; u < ${RMSNORM_MAX_VECS}; u++) {
    const i64 i = lane + lpr * u;
    if (live && i < nv) { ${body} }
  }`;
  return `extern "C" __global__ void ${RMSNORM_FWD}(const ${T}* x, const ${T}* w, ${T}* y, ${A}* rstd, i64 rows, i64 d, double eps) {
  ${head}
  const ${T}* xr = x + row * d;
  ${A} acc = 0;
  #pragma unroll 8
  for (i64 c = lane; c < d; c += 32) { ${A} v = ${ld('xr[c]')}; acc += v * v; }
  ${warpSum}
  const ${A} k = (${A})1 / sqrt(acc / (${A})d + (${A})eps);
  #pragma unroll 8
  for (i64 c = lane; c < d; c += 32) y[row * d + c] = ${y(ld('xr[c]'), ld('w[c]'))};
  if (lane == 0) rstd[row] = k;
}
extern "C" __global__ void ${RMSNORM_FWD_VEC}(const ${T}* x, const ${T}* w, ${T}* y, ${A}* rstd, i64 rows, i64 d, double eps, int lpr) {
  ${vecHead}
  const i64 nv = d / ${VW};
  const uint4* xr = (const uint4*)(x + row * d);
  uint4 xv[${RMSNORM_MAX_VECS}];
  ${A} acc = 0;
  ${eachVec(`xv[u] = xr[i]; const ${T}* e = (const ${T}*)&xv[u];
    #pragma unroll
    for (int q = 0; q < ${VW}; q++) { ${A} v = ${ld('e[q]')}; acc += v * v; }`)}
  ${vecSum}
  const ${A} k = (${A})1 / sqrt(acc / (${A})d + (${A})eps);
  const uint4* wr = (const uint4*)w;
  uint4* yr = (uint4*)(y + row * d);
  ${eachVec(`const uint4 wv = wr[i]; uint4 out; const ${T}* e = (const ${T}*)&xv[u]; const ${T}* ew = (const ${T}*)&wv; ${T}* o = (${T}*)&out;
    #pragma unroll
    for (int q = 0; q < ${VW}; q++) o[q] = ${y(ld('e[q]'), ld('ew[q]'))};
    yr[i] = out;`)}
  if (live && lane == 0) rstd[row] = k;
}
extern "C" __global__ void ${RMSNORM_BWD}(const ${T}* x, const ${T}* w, const ${A}* rstd, const ${T}* dy, ${T}* dx, ${A}* gxr, i64 rows, i64 d) {
  ${head}
  const ${T}* xr = x + row * d;
  const ${T}* gr = dy + row * d;
  const ${A} k = rstd[row];
  ${A} acc = 0;
  #pragma unroll 8
  for (i64 c = lane; c < d; c += 32) acc += ${ld('gr[c]')} * ${ld('w[c]')} * ${ld('xr[c]')};
  ${warpSum}
  const ${A} k3 = k * k * k * acc / (${A})d;
  #pragma unroll 8
  for (i64 c = lane; c < d; c += 32) {
    const ${A} g = ${ld('gr[c]')}, xv = ${ld('xr[c]')};
    dx[row * d + c] = ${dx('g', ld('w[c]'), 'xv')};
    if (gxr) gxr[row * d + c] = g * xv * k;
  }
}
extern "C" __global__ void ${RMSNORM_BWD_VEC}(const ${T}* x, const ${T}* w, const ${A}* rstd, const ${T}* dy, ${T}* dx, ${A}* gxr, i64 rows, i64 d, int lpr) {
  ${vecHead}
  const i64 nv = d / ${VW};
  const uint4* xr = (const uint4*)(x + row * d);
  const uint4* gr = (const uint4*)(dy + row * d);
  const uint4* wr = (const uint4*)w;
  const ${A} k = live ? rstd[row] : (${A})0;
  uint4 xv[${RMSNORM_MAX_VECS}], gv[${RMSNORM_MAX_VECS}];
  ${A} acc = 0;
  ${eachVec(`xv[u] = xr[i]; gv[u] = gr[i]; const uint4 wv = wr[i];
    const ${T}* ex = (const ${T}*)&xv[u]; const ${T}* eg = (const ${T}*)&gv[u]; const ${T}* ew = (const ${T}*)&wv;
    #pragma unroll
    for (int q = 0; q < ${VW}; q++) acc += ${ld('eg[q]')} * ${ld('ew[q]')} * ${ld('ex[q]')};`)}
  ${vecSum}
  const ${A} k3 = k * k * k * acc / (${A})d;
  uint4* dr = (uint4*)(dx + row * d);
  ${eachVec(`const uint4 wv = wr[i]; uint4 out;
    const ${T}* ex = (const ${T}*)&xv[u]; const ${T}* eg = (const ${T}*)&gv[u]; const ${T}* ew = (const ${T}*)&wv; ${T}* o = (${T}*)&out;
    #pragma unroll
    for (int q = 0; q < ${VW}; q++) {
      const ${A} g = ${ld('eg[q]')}, xq = ${ld('ex[q]')};
      o[q] = ${dx('g', ld('ew[q]'), 'xq')};
      if (gxr) gxr[row * d + i * ${VW} + q] = g * xq * k;
    }
    dr[i] = out;`)}
}
extern "C" __global__ void ${RMSNORM_DW_PARTIAL}(double* ws, const ${T}* x, const ${T}* dy, const ${A}* rstd, i64 n, i64 inner, i64 chunks, i64 len) {
  __shared__ double part[1024];
  const int tx = threadIdx.x % ${COL_TILE}, ty = threadIdx.x / ${COL_TILE}, lanes = blockDim.x / ${COL_TILE};
  const i64 tiles = (inner + ${COL_TILE} - 1) / ${COL_TILE};
  for (i64 blk = blockIdx.x; blk < tiles * chunks; blk += gridDim.x) {
    const i64 ch = blk % chunks, tile = blk / chunks;
    const i64 c = tile * ${COL_TILE} + tx;
    const i64 lo = ch * len, hi = lo + len < n ? lo + len : n;
    double acc = 0.0;
    if (c < inner) {
      // each term rounded to the math type as the backward kernels' gxr = g * x * k is
      for (i64 r = lo + ty; r < hi; r += lanes) { const ${A} t = ${ld('dy[r * inner + c]')} * ${ld('x[r * inner + c]')} * rstd[r]; acc += (double)t; }
    }
    part[threadIdx.x] = acc;
    __syncthreads();
    if (ty == 0 && c < inner) {
      for (int l = 1; l < lanes; l++) acc += part[l * ${COL_TILE} + tx];
      ws[ch * inner + c] = acc;
    }
    __syncthreads();
  }
}
extern "C" __global__ void ${RMSNORM_GRAD_BWD}(const ${T}* x, const ${T}* w, const ${A}* rstd, const ${T}* dy, const ${T}* c,
    ${T}* dx, ${T}* dg, ${A}* gh, i64 rows, i64 d) {
  ${head}
  const ${T}* xr = x + row * d;
  const ${T}* gr = dy + row * d;
  const ${T}* cr = c + row * d;
  const ${A} k = rstd[row];
  ${A} s = 0, a1 = 0, a2 = 0;
  #pragma unroll 8
  for (i64 j = lane; j < d; j += 32) {
    const ${A} xv = ${ld('xr[j]')}, u = ${ld('gr[j]')} * ${ld('w[j]')}, cv = ${ld('cr[j]')};
    s += u * xv;
    a1 += cv * u;
    a2 += cv * xv;
  }
  for (int o = 16; o > 0; o >>= 1) {
    s += __shfl_xor_sync(0xffffffffu, s, o);
    a1 += __shfl_xor_sync(0xffffffffu, a1, o);
    a2 += __shfl_xor_sync(0xffffffffu, a2, o);
  }
  s /= (${A})d;
  const ${A} k3 = k * k * k;
  const ${A} hx = k3 * a2 / (${A})d;
  const ${A} cx = ((${A})3 * k3 * k * k * s * a2 - k3 * a1) / (${A})d;
  #pragma unroll 8
  for (i64 j = lane; j < d; j += 32) {
    const ${A} xv = ${ld('xr[j]')}, g = ${ld('gr[j]')}, wv = ${ld('w[j]')}, cv = ${ld('cr[j]')};
    const ${A} h = k * cv - xv * hx;
    dg[row * d + j] = ${st('wv * h')};
    if (gh) gh[row * d + j] = g * h;
    dx[row * d + j] = ${st('-k3 * s * cv - hx * g * wv + xv * cx')};
  }
}`;
}

export function reduceSource(dtype: CudaDType): string {
  const T = CTYPE[dtype];
  const store = STORE[dtype];
  const ld = (e: string) => load(dtype, e, 'double');
  const parts: string[] = [];
  parts.push('__device__ __forceinline__ double sq_d(double v) { return v * v; }');
  for (const op of ['sum', 'max', 'min', 'sumSquares'] as ReduceOp[]) {
    const el = (e: string) => ELEMENT[op](ld(e));
    parts.push(blockReduce(`block_${op}`, 'double', COMBINE[op]));
    // inner == 1: one block per row
    parts.push(`extern "C" __global__ void ${reduceRowsName(op)}(${T}* out, const ${T}* x, i64 outer, i64 n) {
  __shared__ double red[1024];
  for (i64 o = blockIdx.x; o < outer; o += gridDim.x) {
    const ${T}* row = x + o * n;
    double acc = ${INIT[op]};
    for (i64 i = threadIdx.x; i < n; i += blockDim.x) { double a = acc; double b = ${el('row[i]')}; acc = ${COMBINE[op]}; }
    acc = block_${op}(acc, red);
    if (threadIdx.x == 0) out[o] = ${store('acc')};
  }
}`);
    parts.push(`extern "C" __global__ void ${reduceRowsWarpName(op)}(${T}* out, const ${T}* x, i64 outer, i64 n) {
  i64 o = (i64)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  int lane = threadIdx.x % 32;
  if (o >= outer) return;
  const ${T}* row = x + o * n;
  double acc = ${INIT[op]};
  for (i64 i = lane; i < n; i += 32) { double a = acc; double b = ${el('row[i]')}; acc = ${COMBINE[op]}; }
  for (int s = 16; s > 0; s >>= 1) { double a = acc; double b = __shfl_down_sync(0xffffffffu, acc, s); acc = ${COMBINE[op]}; }
  if (lane == 0) out[o] = ${store('acc')};
}`);
    // blocks = outer * chunks; block (o, ch) reduces x[o, ch*len .. (ch+1)*len)
    parts.push(`extern "C" __global__ void ${reduceRowsPartialName(op)}(double* ws, const ${T}* x, i64 outer, i64 n, i64 chunks, i64 len) {
  __shared__ double red[1024];
  for (i64 blk = blockIdx.x; blk < outer * chunks; blk += gridDim.x) {
    i64 o = blk / chunks, ch = blk % chunks;
    const ${T}* row = x + o * n;
    i64 lo = ch * len, hi = lo + len < n ? lo + len : n;
    double acc = ${INIT[op]};
    for (i64 i = lo + threadIdx.x; i < hi; i += blockDim.x) { double a = acc; double b = ${el('row[i]')}; acc = ${COMBINE[op]}; }
    acc = block_${op}(acc, red);
    if (threadIdx.x == 0) ws[ch * outer + o] = acc;
  }
}`);
    // blocks = outer * colTiles * chunks; threads = COL_TILE columns x (blockDim / COL_TILE) row lanes
    parts.push(`extern "C" __global__ void ${reduceColsPartialName(op)}(double* ws, const ${T}* x, i64 outer, i64 n, i64 inner, i64 chunks, i64 len) {
  __shared__ double part[1024];
  const int tx = threadIdx.x % ${COL_TILE}, ty = threadIdx.x / ${COL_TILE}, lanes = blockDim.x / ${COL_TILE};
  i64 tiles = (inner + ${COL_TILE} - 1) / ${COL_TILE};
  for (i64 blk = blockIdx.x; blk < outer * tiles * chunks; blk += gridDim.x) {
    i64 ch = blk % chunks, rest = blk / chunks, tile = rest % tiles, o = rest / tiles;
    i64 c = tile * ${COL_TILE} + tx;
    i64 lo = ch * len, hi = lo + len < n ? lo + len : n;
    double acc = ${INIT[op]};
    if (c < inner) {
      const ${T}* p = x + o * n * inner + c;
      for (i64 r = lo + ty; r < hi; r += lanes) { double a = acc; double b = ${el('p[r * inner]')}; acc = ${COMBINE[op]}; }
    }
    part[threadIdx.x] = acc;
    __syncthreads();
    if (ty == 0 && c < inner) {
      for (int l = 1; l < lanes; l++) { double a = acc; double b = part[l * ${COL_TILE} + tx]; acc = ${COMBINE[op]}; }
      ws[ch * outer * inner + o * inner + c] = acc;
    }
    __syncthreads();
  }
}`);
    parts.push(`extern "C" __global__ void ${reduceFinalName(op)}(${T}* out, const double* ws, i64 total, i64 chunks) {
  for (i64 t = gtid(); t < total; t += gstride()) {
    double acc = ${INIT[op]};
    #pragma unroll 8
    for (i64 ch = 0; ch < chunks; ch++) { double a = acc; double b = ws[ch * total + t]; acc = ${COMBINE[op]}; }
    out[t] = ${store('acc')};
  }
}`);
    parts.push(`extern "C" __global__ void ${reduceFinalWarpName(op)}(${T}* out, const double* ws, i64 total, i64 chunks) {
  const i64 t = (i64)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (t >= total) return;
  double acc = ${INIT[op]};
  for (i64 ch = lane; ch < chunks; ch += 32) { double a = acc; double b = ws[ch * total + t]; acc = ${COMBINE[op]}; }
  for (int s = 16; s > 0; s >>= 1) { double a = acc; double b = __shfl_xor_sync(0xffffffffu, acc, s); acc = ${COMBINE[op]}; }
  if (lane == 0) out[t] = ${store('acc')};
}`);
    // inner > 1: one thread per output, walking n (reads coalesced across inner)
    parts.push(`extern "C" __global__ void ${reduceColsName(op)}(${T}* out, const ${T}* x, i64 outer, i64 n, i64 inner) {
  i64 total = outer * inner;
  for (i64 t = gtid(); t < total; t += gstride()) {
    i64 o = t / inner, i = t % inner;
    const ${T}* p = x + o * n * inner + i;
    double acc = ${INIT[op]};
    for (i64 r = 0; r < n; r++) { double a = acc; double b = ${el('p[r * inner]')}; acc = ${COMBINE[op]}; }
    out[t] = ${store('acc')};
  }
}`);
  }
  if (CUDA_FLOATS.has(dtype)) {
    // max that skips NaN (the CPU's "if (x > m) m = x"), then sums of exp in double
    parts.push(blockReduce('block_fmax', 'double', 'fmax(a, b)'));
    parts.push(blockReduce('block_dsum', 'double', 'a + b'));
    // softmax over rows; the biased form adds a bias row that repeats over x's rows (o mod rows), the sum rounded to T
    // as the add kernel rounds it, before the same passes
    const softmaxRows = (name: string, biased: boolean) => {
      const v = biased ? ld(store(`${ld('row[i]')} + ${ld('brow[i]')}`)) : ld('row[i]');
      return `extern "C" __global__ void ${name}(${T}* out, const ${T}* x, ${biased ? `const ${T}* bias, ` : ''}i64 outer, i64 n${biased ? ', i64 rows' : ''}) {
  __shared__ double red[1024];
  for (i64 o = blockIdx.x; o < outer; o += gridDim.x) {
    const ${T}* row = x + o * n;${biased ? `
    const ${T}* brow = bias + (o % rows) * n;` : ''}
    ${T}* orow = out + o * n;
    double m = NEG_INF_D;
    for (i64 i = threadIdx.x; i < n; i += blockDim.x) m = fmax(m, ${v});
    m = block_fmax(m, red);
    if (m == NEG_INF_D) m = 0.0;
    double s = 0.0;
    for (i64 i = threadIdx.x; i < n; i += blockDim.x) s += exp(${v} - m);
    s = block_dsum(s, red);
    double inv = 1.0 / s;
    for (i64 i = threadIdx.x; i < n; i += blockDim.x) orow[i] = ${store(`${ld(store(`exp(${v} - m)`))} * inv`)};
  }
}`;
    };
    parts.push(softmaxRows(SOFTMAX, false), softmaxRows(SOFTMAX_BIAS, true));
    // softmax's backward and that backward's backward (Backend.softmaxBackward / softmaxGradBackward): a block
    // per row, the row sums in double, each output rounded once; the second pass rereads the row (from L2)
    parts.push(`extern "C" __global__ void ${SOFTMAX_BWD}(${T}* dx, const ${T}* y, const ${T}* g, i64 outer, i64 n) {
  __shared__ double red[1024];
  for (i64 o = blockIdx.x; o < outer; o += gridDim.x) {
    const ${T}* yr = y + o * n;
    const ${T}* gr = g + o * n;
    ${T}* xr = dx + o * n;
    double s = 0.0;
    for (i64 i = threadIdx.x; i < n; i += blockDim.x) s += ${ld('yr[i]')} * ${ld('gr[i]')};
    s = block_dsum(s, red);
    for (i64 i = threadIdx.x; i < n; i += blockDim.x) xr[i] = ${store(`${ld('yr[i]')} * (${ld('gr[i]')} - s)`)};
  }
}`);
    parts.push(`extern "C" __global__ void ${SOFTMAX_GRAD_BWD}(${T}* dy, ${T}* dg, const ${T}* y, const ${T}* g, const ${T}* u, i64 outer, i64 n) {
  __shared__ double red[1024];
  for (i64 o = blockIdx.x; o < outer; o += gridDim.x) {
    const i64 base = o * n;
    double s = 0.0, r = 0.0;
    for (i64 i = threadIdx.x; i < n; i += blockDim.x) {
      const double yi = ${ld('y[base + i]')};
      s += yi * ${ld('g[base + i]')};
      r += yi * ${ld('u[base + i]')};
    }
    s = block_dsum(s, red);
    r = block_dsum(r, red);
    for (i64 i = threadIdx.x; i < n; i += blockDim.x) {
      const double yi = ${ld('y[base + i]')}, gi = ${ld('g[base + i]')}, ui = ${ld('u[base + i]')};
      dy[base + i] = ${store('ui * (gi - s) - r * gi')};
      dg[base + i] = ${store('yi * (ui - r)')};
    }
  }
}`);
    // the logsumexp of one row over the block, in double; an infinite max passes through (also the token NLL's)
    parts.push(`__device__ double row_lse(const ${T}* row, i64 n, double* red) {
  double m = NEG_INF_D;
  for (i64 i = threadIdx.x; i < n; i += blockDim.x) m = fmax(m, ${ld('row[i]')});
  m = block_fmax(m, red);
  if (m == NEG_INF_D || m == POS_INF_D) return m;
  double s = 0.0;
  for (i64 i = threadIdx.x; i < n; i += blockDim.x) s += exp(${ld('row[i]')} - m);
  return m + log(block_dsum(s, red));
}`);
    parts.push(`extern "C" __global__ void ${LOGSUMEXP}(${T}* out, const ${T}* x, i64 outer, i64 n) {
  __shared__ double red[1024];
  for (i64 o = blockIdx.x; o < outer; o += gridDim.x) {
    const double l = row_lse(x + o * n, n, red);
    if (threadIdx.x == 0) out[o] = ${store('l')};
  }
}`);
    // a few long rows (a decoded token's 128 K logits): chunks of a row on separate blocks, each its
    // max and sum of exp (ws: [outer, chunks, 2]), merged in chunk order by one thread per row
    parts.push(`extern "C" __global__ void ${LSE_PARTIAL}(double* ws, const ${T}* x, i64 outer, i64 n, i64 chunks, i64 len) {
  __shared__ double red[1024];
  for (i64 blk = blockIdx.x; blk < outer * chunks; blk += gridDim.x) {
    const i64 o = blk / chunks, ch = blk % chunks;
    const ${T}* row = x + o * n;
    const i64 lo = ch * len, hi = lo + len < n ? lo + len : n;
    double m = NEG_INF_D;
    for (i64 i = lo + threadIdx.x; i < hi; i += blockDim.x) m = fmax(m, ${ld('row[i]')});
    m = block_fmax(m, red);
    double s = 0.0;
    if (m != NEG_INF_D && m != POS_INF_D) for (i64 i = lo + threadIdx.x; i < hi; i += blockDim.x) s += exp(${ld('row[i]')} - m);
    s = block_dsum(s, red);
    if (threadIdx.x == 0) { ws[2 * blk] = m; ws[2 * blk + 1] = s; }
  }
}`);
    parts.push(`extern "C" __global__ void ${LSE_FINAL}(${T}* out, const double* ws, i64 outer, i64 chunks) {
  for (i64 o = gtid(); o < outer; o += gstride()) {
    const double* w = ws + 2 * o * chunks;
    double m = NEG_INF_D;
    for (i64 c = 0; c < chunks; c++) m = fmax(m, w[2 * c]);
    if (m == NEG_INF_D || m == POS_INF_D) { out[o] = ${store('m')}; continue; }
    double s = 0.0;
    for (i64 c = 0; c < chunks; c++) if (w[2 * c] != NEG_INF_D) s += w[2 * c + 1] * exp(w[2 * c] - m);
    out[o] = ${store('m + log(s)')};
  }
}`);
  }
  if (CUDA_FLOATS.has(dtype)) parts.push(rmsNormSource(dtype), tokenNllSource(dtype));
  parts.push(`extern "C" __global__ void ${CUMSUM}(${T}* out, const ${T}* x, i64 outer, i64 n, i64 inner, int reverse) {
  i64 total = outer * inner;
  for (i64 t = gtid(); t < total; t += gstride()) {
    i64 o = t / inner, i = t % inner;
    i64 base = o * n * inner + i;
    double acc = 0.0;
    for (i64 s = 0; s < n; s++) {
      i64 r = reverse ? n - 1 - s : s;
      acc += ${ld('x[base + r * inner]')};
      out[base + r * inner] = ${store('acc')};
    }
  }
}`);
  return parts.join('\n');
}
