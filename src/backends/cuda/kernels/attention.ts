/**
 * Banded causal attention (the Backend's attentionForward / attentionBackward contract), a first
 * correct version: one block per query row (forward, dQ) or key row (dK, dV); keys or queries go
 * through shared memory in tiles of ATT_THREADS, one dot product per thread, so memory is O(row)
 * and the band is visited, never the dense [tq, tk] matrix. Not yet tensor-core flash attention.
 */
import { CTYPE, type CudaDType, blockReduce } from './common.js';

export const ATT_THREADS = 128;
/** Head dimension limit: each thread owns ATT_MAXC output columns. */
export const ATT_MAXC = 8;
export const ATT_MAX_D = ATT_THREADS * ATT_MAXC;
export const ATT_FWD = 'attn_fwd';
export const ATT_BWD_DQ = 'attn_bwd_dq';
export const ATT_BWD_DKV = 'attn_bwd_dkv';

/** Shared memory bytes of each kernel for head dimension d. */
export function attentionShared(dtype: CudaDType, d: number): number {
  const a = dtype === 'float64' ? 8 : 4;
  return (2 * d + 3 * ATT_THREADS) * a;
}

export function attentionSource(dtype: CudaDType): string {
  if (dtype !== 'float32' && dtype !== 'float64') return '';
  const T = CTYPE[dtype];
  const A = T; // accumulator type
  const band = String.raw`
__device__ __forceinline__ i64 band_lo(i64 i, i64 qStart, i64 kStart, i64 window) { i64 v = qStart + i - window + 1 - kStart; return v > 0 ? v : 0; }
__device__ __forceinline__ i64 band_hi(i64 i, i64 qStart, i64 kStart, i64 tk) { i64 v = qStart + i - kStart; return v < tk - 1 ? v : tk - 1; }
__device__ __forceinline__ ${A} dotp(const ${A}* a, const ${T}* b, i64 d) { ${A} s = 0; for (i64 c = 0; c < d; c++) s += a[c] * (${A})b[c]; return s; }
`;
  return [
    `typedef ${A} A;`,
    band,
    blockReduce('att_max', A, 'fmax(a, b)'),
    blockReduce('att_sum', A, 'a + b'),
    String.raw`
extern "C" __global__ void ${ATT_FWD}(const ${T}* q, const ${T}* k, const ${T}* v, ${T}* out, ${T}* lse,
    i64 rows, i64 tq, i64 tk, i64 d, i64 qStart, i64 kStart, i64 window, double scaleD) {
  extern __shared__ __align__(16) unsigned char smem[];
  A* qs = (A*)smem; A* ps = qs + 2 * d; A* red = ps + ${ATT_THREADS};
  const A scale = (A)scaleD;
  int t = threadIdx.x;
  for (i64 row = blockIdx.x; row < rows; row += gridDim.x) {
    i64 b = row / tq, i = row % tq;
    const ${T}* kb = k + b * tk * d; const ${T}* vb = v + b * tk * d;
    for (i64 c = t; c < d; c += blockDim.x) qs[c] = (A)q[row * d + c];
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
        if (c < d) { A s = 0; for (i64 jj = 0; jj < nt; jj++) s += ps[jj] * (A)vb[(t0 + jj) * d + c]; acc[a] += s; }
      }
      __syncthreads();
    }
    l = att_sum(l, red);
    for (int a = 0; a < ${ATT_MAXC}; a++) { i64 c = t + (i64)a * blockDim.x; if (c < d) out[row * d + c] = (${T})(acc[a] / l); }
    if (t == 0) lse[row] = (${T})(m + log(l));
    __syncthreads();
  }
}

/** dQ per query row; also writes delta = rowsum(dO * O) for the dK/dV kernel. */
extern "C" __global__ void ${ATT_BWD_DQ}(const ${T}* q, const ${T}* k, const ${T}* v, const ${T}* o, const ${T}* lse, const ${T}* dout,
    ${T}* dq, A* delta, i64 rows, i64 tq, i64 tk, i64 d, i64 qStart, i64 kStart, i64 window, double scaleD) {
  extern __shared__ __align__(16) unsigned char smem[];
  A* qs = (A*)smem; A* dos = qs + d; A* ps = dos + d; A* red = ps + ${ATT_THREADS};
  const A scale = (A)scaleD;
  int t = threadIdx.x;
  for (i64 row = blockIdx.x; row < rows; row += gridDim.x) {
    i64 b = row / tq, i = row % tq;
    const ${T}* kb = k + b * tk * d; const ${T}* vb = v + b * tk * d;
    A dl = 0;
    for (i64 c = t; c < d; c += blockDim.x) {
      qs[c] = (A)q[row * d + c]; dos[c] = (A)dout[row * d + c];
      dl += dos[c] * (A)o[row * d + c];
    }
    dl = att_sum(dl, red);
    if (t == 0) delta[row] = dl;
    A ls = (A)lse[row];
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
        if (c < d) { A s = 0; for (i64 jj = 0; jj < nt; jj++) s += ps[jj] * (A)kb[(t0 + jj) * d + c]; acc[a] += s; }
      }
      __syncthreads();
    }
    for (int a = 0; a < ${ATT_MAXC}; a++) { i64 c = t + (i64)a * blockDim.x; if (c < d) dq[row * d + c] = (${T})(acc[a] * scale); }
    __syncthreads();
  }
}

/** dK and dV per key row, over the queries that see that key. */
extern "C" __global__ void ${ATT_BWD_DKV}(const ${T}* q, const ${T}* k, const ${T}* v, const ${T}* lse, const ${T}* dout, const A* delta,
    ${T}* dk, ${T}* dv, i64 rows, i64 tq, i64 tk, i64 d, i64 qStart, i64 kStart, i64 window, double scaleD) {
  extern __shared__ __align__(16) unsigned char smem[];
  A* ks = (A*)smem; A* vs = ks + d; A* ps = vs + d; A* dss = ps + ${ATT_THREADS}; 
  const A scale = (A)scaleD;
  int t = threadIdx.x;
  for (i64 row = blockIdx.x; row < rows; row += gridDim.x) {
    i64 b = row / tk, j = row % tk;
    for (i64 c = t; c < d; c += blockDim.x) { ks[c] = (A)k[row * d + c]; vs[c] = (A)v[row * d + c]; }
    __syncthreads();
    i64 s = kStart + j;
    i64 ilo = s - qStart; if (ilo < 0) ilo = 0;
    i64 ihi = s - qStart + window - 1; if (ihi > tq - 1) ihi = tq - 1;
    const ${T}* qb = q + b * tq * d; const ${T}* db = dout + b * tq * d;
    A akk[${ATT_MAXC}], avv[${ATT_MAXC}];
    for (int a = 0; a < ${ATT_MAXC}; a++) { akk[a] = 0; avv[a] = 0; }
    for (i64 t0 = ilo; t0 <= ihi; t0 += blockDim.x) {
      i64 i = t0 + t;
      A p = 0, ds = 0;
      if (i <= ihi) {
        p = exp(dotp(ks, qb + i * d, d) * scale - (A)lse[b * tq + i]);
        ds = p * (dotp(vs, db + i * d, d) - delta[b * tq + i]);
      }
      ps[t] = p; dss[t] = ds;
      __syncthreads();
      i64 nt = ihi - t0 + 1 < (i64)blockDim.x ? ihi - t0 + 1 : (i64)blockDim.x;
      for (int a = 0; a < ${ATT_MAXC}; a++) {
        i64 c = t + (i64)a * blockDim.x;
        if (c < d) {
          A sv = 0, sk = 0;
          for (i64 ii = 0; ii < nt; ii++) { sv += ps[ii] * (A)db[(t0 + ii) * d + c]; sk += dss[ii] * (A)qb[(t0 + ii) * d + c]; }
          avv[a] += sv; akk[a] += sk;
        }
      }
      __syncthreads();
    }
    for (int a = 0; a < ${ATT_MAXC}; a++) {
      i64 c = t + (i64)a * blockDim.x;
      if (c < d) { dk[row * d + c] = (${T})(akk[a] * scale); dv[row * d + c] = (${T})avv[a]; }
    }
    __syncthreads();
  }
}
`,
  ].join('\n');
}
