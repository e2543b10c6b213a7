/**
 * Shared pieces of the CUDA C kernel sources: C types per dtype, the index struct of strided
 * kernels, JS-compatible integer conversions, and block reductions. Sources are compiled by NVRTC
 * without any header, so everything a kernel needs is defined here.
 */
import type { DType } from '../../../engine/dtype.js';

/** Highest rank a strided kernel walks (after the engine's axis coalescing). */
export const MAX_RANK = 8;
/** Threads per block of the elementwise and row kernels. */
export const THREADS = 256;

/** Every engine dtype has a cuda storage. */
export type CudaDType = DType;
export const CUDA_DTYPES: readonly CudaDType[] = ['float32', 'float64', 'int32', 'bool', 'bfloat16'];
/** Floating dtypes: the ones with transcendental ops, softmax, GEMM and attention. */
export const CUDA_FLOATS: ReadonlySet<CudaDType> = new Set(['float32', 'float64', 'bfloat16']);

/** C storage type. */
export const CTYPE: Record<CudaDType, string> = { float32: 'float', float64: 'double', int32: 'int', bool: 'unsigned char', bfloat16: 'bf16' };
/**
 * Type arithmetic is done in: float64 and float32 in their own type, bfloat16 in float (bf16 is a
 * storage format: values widen on load and round once on store), integers and bools in double (as JS does).
 */
export const MATH: Record<CudaDType, string> = { float32: 'float', float64: 'double', int32: 'double', bool: 'double', bfloat16: 'float' };
/** A stored value widened to the C type `to`. */
export function load(dtype: CudaDType, expr: string, to: string = MATH[dtype]): string {
  return dtype === 'bfloat16' ? `(${to})bf2f(${expr})` : `(${to})(${expr})`;
}
/** Conversion of a MATH value back to storage, with JS's ToInt32 / ToUint8 wrapping for ints. */
export const STORE: Record<CudaDType, (v: string) => string> = {
  float32: (v) => `(float)(${v})`,
  float64: (v) => `(double)(${v})`,
  int32: (v) => `to_i32((double)(${v}))`,
  bool: (v) => `to_u8((double)(${v}))`,
  bfloat16: (v) => `f2bf((float)(${v}))`,
};
export const BYTES: Record<CudaDType, number> = { float32: 4, float64: 8, int32: 4, bool: 1, bfloat16: 2 };
/** Elements of a 16-byte vector (the unit of the vector loads and stores several kernels use). */
export const vecWidth = (dtype: CudaDType): number => 16 / BYTES[dtype];

export const PRELUDE = String.raw`
typedef long long i64;
#define POS_INF_F __int_as_float(0x7f800000)
#define NEG_INF_F __int_as_float(0xff800000)
#define POS_INF_D __longlong_as_double(0x7ff0000000000000LL)
#define NEG_INF_D __longlong_as_double(0xfff0000000000000LL)
#define NAN_D __longlong_as_double(0x7ff8000000000000LL)
struct Ix { i64 rank; i64 shape[${MAX_RANK}]; i64 st[3][${MAX_RANK}]; };
__device__ __forceinline__ int to_i32(double v) {
  if (!(v - v == 0.0)) return 0;
  v = trunc(v);
  double m = fmod(v, 4294967296.0);
  if (m < 0) m += 4294967296.0;
  if (m >= 2147483648.0) m -= 4294967296.0;
  return (int)m;
}
__device__ __forceinline__ unsigned char to_u8(double v) {
  if (!(v - v == 0.0)) return 0;
  v = trunc(v);
  double m = fmod(v, 256.0);
  if (m < 0) m += 256.0;
  return (unsigned char)m;
}
/** bfloat16 storage: the high 16 bits of a float32; conversions round to nearest even, NaN stays NaN. */
typedef unsigned short bf16;
__device__ __forceinline__ float bf2f(bf16 h) { return __uint_as_float(((unsigned)h) << 16); }
__device__ __forceinline__ bf16 f2bf(float f) {
  unsigned u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (bf16)(u >> 16);
}
__device__ __forceinline__ i64 gtid() { return (i64)blockIdx.x * blockDim.x + threadIdx.x; }
__device__ __forceinline__ i64 gstride() { return (i64)gridDim.x * blockDim.x; }
/** Offsets of flat output index i in up to three strided inputs. */
__device__ __forceinline__ void offsets(const Ix& ix, i64 i, i64& o0, i64& o1, i64& o2) {
  o0 = 0; o1 = 0; o2 = 0;
  for (int d = (int)ix.rank - 1; d >= 0; --d) {
    i64 n = ix.shape[d];
    i64 c = i % n;
    i /= n;
    o0 += c * ix.st[0][d];
    o1 += c * ix.st[1][d];
    o2 += c * ix.st[2][d];
  }
}
`;

/** Block-wide reduction of `T` with `combine(a, b)`, every thread gets the result (blockDim <= 1024). */
export function blockReduce(name: string, T: string, combine: string): string {
  return String.raw`
__device__ ${T} ${name}(${T} v, ${T}* red) {
  int t = threadIdx.x;
  red[t] = v;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (t < s) { ${T} a = red[t]; ${T} b = red[t + s]; red[t] = ${combine}; }
    __syncthreads();
  }
  ${T} r = red[0];
  __syncthreads();
  return r;
}
`;
}
