/**
 * Data movement: strided copy (by element size, so one kernel serves every dtype of that size),
 * fill, gather and scatter-add along the middle axis of [outer, n, inner], and dtype casts.
 * Index range errors cannot throw on the device: indices uploaded from the host are checked on the
 * host (their range is known at upload); for indices computed on the device the kernel records the
 * first bad index in a small status buffer that the backend reads at its next sync point (download)
 * and turns into an Error.
 */
import { CTYPE, CUDA_DTYPES, CUDA_FLOATS, type CudaDType, STORE, load } from './common.js';

export const copyName = (bytes: number) => `copy_strided_${bytes}`;
export const writeRowsAtName = (bytes: number) => `write_rows_at_${bytes}`;
export const FILL = 'fill_value';
export const GATHER = 'gather_mid';
export const SCATTER_ADD = 'scatter_add_mid';
export const castName = (from: CudaDType, to: CudaDType) => `cast_${from}_${to}`;
/** dst (of `to`) += src (of `from`), in place: a running cotangent taking a contribution of another float dtype. */
export const castAddName = (from: CudaDType, to: CudaDType) => `cast_add_${from}_${to}`;

const UINT: Record<number, string> = { 1: 'unsigned char', 2: 'unsigned short', 4: 'unsigned int', 8: 'unsigned long long', 16: 'uint4' };
/** Element sizes of the copy kernels: one per storage width, and 16 bytes (rows copied a vector at a time). */
export const COPY_WIDTHS = [1, 2, 4, 8, 16] as const;

/**
 * Copy kernels for each element width, and every cast. A cast widens to double and converts from
 * there (float64 -> bfloat16 therefore rounds twice, through float32; fp32 -> bf16 rounds once).
 */
export function movementSource(): string {
  const parts: string[] = [];
  for (const b of COPY_WIDTHS) {
    parts.push(`extern "C" __global__ void ${copyName(b)}(${UINT[b]}* dst, i64 dOff, const ${UINT[b]}* src, i64 sOff, Ix ix, i64 n) {
  for (i64 i = gtid(); i < n; i += gstride()) {
    i64 os, od, unused; offsets(ix, i, os, od, unused);
    dst[dOff + od] = src[sOff + os];
  }
}`);
  }
  for (const b of COPY_WIDTHS.filter((w) => w < 16)) {
    // a ring buffer's rows at a position read on the device: row i of src goes to row (at + i) mod rows
    parts.push(`extern "C" __global__ void ${writeRowsAtName(b)}(${UINT[b]}* dst, const ${UINT[b]}* src, const int* at, i64 outer, i64 n, i64 rows, i64 rowLen) {
  const i64 a = (i64)at[0];
  const i64 total = outer * n * rowLen;
  for (i64 t = gtid(); t < total; t += gstride()) {
    const i64 c = t % rowLen, i = (t / rowLen) % n, o = t / (rowLen * n);
    i64 r = (a + i) % rows;
    if (r < 0) r += rows;
    dst[(o * rows + r) * rowLen + c] = src[t];
  }
}`);
  }
  for (const from of CUDA_DTYPES) {
    for (const to of CUDA_DTYPES) {
      if (from === to) continue;
      const F = CTYPE[from];
      const T = CTYPE[to];
      const expr = to === 'bool' ? '(x != 0.0 || x != x) ? 1 : 0' : to === 'int32' ? 'to_i32(trunc(x))' : STORE[to]('x');
      parts.push(`extern "C" __global__ void ${castName(from, to)}(${T}* out, const ${F}* a, i64 n) {
  for (i64 i = gtid(); i < n; i += gstride()) { double x = ${load(from, 'a[i]', 'double')}; out[i] = ${expr}; }
}`);
      // the contribution cast to the cotangent's dtype, then the sum in double rounded once (for float32 and
      // bfloat16 the correctly rounded sum in that dtype): what a cast kernel and then an add kernel give
      const widened = load(to, STORE[to](load(from, 'a[i]', 'double')), 'double');
      if (CUDA_FLOATS.has(from) && CUDA_FLOATS.has(to)) parts.push(`extern "C" __global__ void ${castAddName(from, to)}(${T}* out, const ${F}* a, i64 n) {
  for (i64 i = gtid(); i < n; i += gstride()) out[i] = ${STORE[to](`${load(to, 'out[i]', 'double')} + ${widened}`)};
}`);
    }
  }
  return parts.join('\n');
}

/** fill, gather and scatter-add of one dtype. */
export function indexingSource(dtype: CudaDType): string {
  const T = CTYPE[dtype];
  const parts: string[] = [];
  parts.push(`extern "C" __global__ void ${FILL}(${T}* out, double v, i64 n) {
  for (i64 i = gtid(); i < n; i += gstride()) out[i] = ${STORE[dtype]('v')};
}`);
  // status: [code, bad index, n]; the first failing thread wins
  parts.push(`__device__ void report(int* status, int code, int idx, i64 n) {
  if (atomicCAS(status, 0, code) == 0) { status[1] = idx; status[2] = (int)n; }
}`);
  parts.push(`extern "C" __global__ void ${GATHER}(${T}* out, const ${T}* x, const int* idx, int* status, i64 outer, i64 n, i64 inner, i64 count) {
  i64 total = outer * count * inner;
  for (i64 t = gtid(); t < total; t += gstride()) {
    i64 i = t % inner; i64 j = (t / inner) % count; i64 o = t / (inner * count);
    int r = idx[j];
    if (r < 0 || r >= n) { report(status, 1, r, n); out[t] = (${T})0; continue; }
    out[t] = x[(o * n + r) * inner + i];
  }
}`);
  // Deterministic, in the CPU's order: one thread per (outer, inner) column adds the updates in
  // index order, so results are bit-identical run to run (no atomics).
  parts.push(`extern "C" __global__ void ${SCATTER_ADD}(${T}* out, const int* idx, const ${T}* upd, int* status, i64 outer, i64 n, i64 inner, i64 count) {
  i64 total = outer * inner;
  for (i64 t = gtid(); t < total; t += gstride()) {
    i64 i = t % inner; i64 o = t / inner;
    for (i64 j = 0; j < count; j++) {
      int r = idx[j];
      if (r < 0 || r >= n) { report(status, 2, r, n); continue; }
      ${T}* p = out + (o * n + r) * inner + i;
      *p = ${STORE[dtype](`${load(dtype, '*p')} + ${load(dtype, 'upd[(o * count + j) * inner + i]')}`)};
    }
  }
}`);
  return parts.join('\n');
}
