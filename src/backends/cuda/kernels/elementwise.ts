/**
 * One generator for every elementwise kernel: unary maps (flat), binary maps, comparisons and
 * select (strided, broadcast through stride-0 axes). Each op is an expression in x, y (and c);
 * the generator wraps it in the load / index / store loop of its arity and dtype.
 */
import type { BinaryOp, CompareOp, UnaryOp } from '../../../engine/backend.js';
import { CTYPE, CUDA_FLOATS, type CudaDType, MATH, STORE, load, vecWidth } from './common.js';

/** Expressions over x (and y) in the math type M. */
export const UNARY: Record<UnaryOp, string> = {
  neg: '-x',
  exp: 'exp(x)',
  log: 'log(x)',
  sqrt: 'sqrt(x)',
  rsqrt: 'M(1) / sqrt(x)',
  tanh: 'tanh(x)',
  sigmoid: 'M(1) / (M(1) + exp(-x))',
  silu: 'x / (M(1) + exp(-x))',
  square: 'x * x',
  abs: 'fabs(x)',
  cos: 'cos(x)',
  sin: 'sin(x)',
  sign: '(x > M(0) ? M(1) : (x < M(0) ? M(-1) : x))',
  reciprocal: 'M(1) / x',
};
export const BINARY: Record<BinaryOp, string> = {
  add: 'x + y',
  sub: 'x - y',
  mul: 'x * y',
  div: 'x / y',
  pow: 'pow(x, y)',
  // NaN-propagating, like Math.max / Math.min
  maximum: '(x != x ? x : (y != y ? y : (x > y ? x : y)))',
  minimum: '(x != x ? x : (y != y ? y : (x < y ? x : y)))',
};
export const COMPARE: Record<CompareOp, string> = {
  eq: 'x == y',
  ne: 'x != y',
  lt: 'x < y',
  le: 'x <= y',
  gt: 'x > y',
  ge: 'x >= y',
};

export const unaryName = (op: UnaryOp) => `unary_${op}`;
export const binaryName = (op: BinaryOp) => `binary_${op}`;
export const binaryFlatName = (op: BinaryOp) => `binary_flat_${op}`;
/** Float dtypes: the flat unary and binary maps over 16-byte vectors (then a tail of single elements). */
export const unaryVecName = (op: UnaryOp) => `unary_vec_${op}`;
export const binaryVecName = (op: BinaryOp) => `binary_vec_${op}`;
export const compareName = (op: CompareOp) => `compare_${op}`;
export const WHERE = 'where_select';
/** a + b·c over broadcast strides; the _rows_vec form for a, b contiguous and c one value per row of `inner` (16-byte vectors). */
export const ADDCMUL = 'addcmul';
export const ADDCMUL_ROWS_VEC = 'addcmul_rows_vec';
export const ADAMW = 'adamw_step';
/** Every parameter's AdamW step in one launch; elements per block, and 64-bit words per table entry. */
export const ADAMW_ALL = 'adamw_all';
export const ADAMW_PER_BLOCK = 4096;
export const ADAMW_ENTRY_WORDS = 10;
export const ROPE = 'rope_pairs';
/** The rope kernel's layout argument: the index of the RopeLayout. */
export const ROPE_LAYOUTS = ['same', 'split', 'merge'] as const;
export const SWIGLU_FWD = 'swiglu_fwd';
export const SWIGLU_BWD = 'swiglu_bwd';
export const SWIGLU_GRAD_BWD = 'swiglu_grad_bwd';

/**
 * The SwiGLU gate silu(a) · b, its backward (both cotangents in one pass) and the backward of that backward
 * (Backend.swigluGradBackward: the cotangents of a, b and g in one pass), math in M.
 */
function swigluSource(dtype: CudaDType): string {
  const T = CTYPE[dtype];
  const ld = (e: string) => load(dtype, e);
  return `extern "C" __global__ void ${SWIGLU_FWD}(${T}* y, const ${T}* a, const ${T}* b, i64 n) {
  for (i64 i = gtid(); i < n; i += gstride()) { const M x = ${ld('a[i]')}; y[i] = ${STORE[dtype](`x / (M(1) + exp(-x)) * ${ld('b[i]')}`)}; }
}
extern "C" __global__ void ${SWIGLU_BWD}(${T}* da, ${T}* db, const ${T}* a, const ${T}* b, const ${T}* g, i64 n) {
  for (i64 i = gtid(); i < n; i += gstride()) {
    const M x = ${ld('a[i]')}, gi = ${ld('g[i]')};
    const M s = M(1) / (M(1) + exp(-x));
    da[i] = ${STORE[dtype]('gi * ' + ld('b[i]') + ' * s * (M(1) + x * (M(1) - s))')};
    db[i] = ${STORE[dtype]('gi * x * s')};
  }
}
extern "C" __global__ void ${SWIGLU_GRAD_BWD}(${T}* da, ${T}* db, ${T}* dg, const ${T}* a, const ${T}* b, const ${T}* g, const ${T}* ca, const ${T}* cb, i64 n) {
  for (i64 i = gtid(); i < n; i += gstride()) {
    const M x = ${ld('a[i]')}, bi = ${ld('b[i]')}, gi = ${ld('g[i]')}, cai = ${ld('ca[i]')}, cbi = ${ld('cb[i]')};
    const M s = M(1) / (M(1) + exp(-x));
    const M s1 = s * (M(1) + x * (M(1) - s));
    const M s2 = s * (M(1) - s) * (M(2) + x * (M(1) - M(2) * s));
    da[i] = ${STORE[dtype]('cai * gi * bi * s2 + cbi * gi * s1')};
    db[i] = ${STORE[dtype]('cai * gi * s1')};
    dg[i] = ${STORE[dtype]('cai * bi * s1 + cbi * x * s')};
  }
}`;
}

/**
 * RoPE over pairs (fusedRope, src/engine/rope.ts): one thread per pair (x[2k], x[2k+1]) of x [outer, T,
 * H, D] with tables [T, D/2]; every product and sum rounded to the storage type in the composite's
 * order (bf16: to bf16 after each operation, as the composite's kernels store), with _rn intrinsics so
 * nothing is contracted.
 */
function ropeSource(dtype: CudaDType): string {
  const T = CTYPE[dtype];
  const f = dtype === 'float64' ? 'd' : 'f';
  const round = dtype === 'bfloat16' ? 'bf2f(f2bf(v))' : 'v';
  return `__device__ __forceinline__ M rp_round(M v) { return ${round}; }
__device__ __forceinline__ M rp_mul(M a, M b) { return rp_round(__${f}mul_rn(a, b)); }
__device__ __forceinline__ M rp_add(M a, M b) { return rp_round(__${f}add_rn(a, b)); }
__device__ __forceinline__ M rp_sub(M a, M b) { return rp_round(__${f}sub_rn(a, b)); }
extern "C" __global__ void ${ROPE}(${T}* out, const ${T}* x, const ${T}* cs, const ${T}* sn, i64 pairs, i64 tokens, i64 H, i64 half, int inverse, int layout) {
  for (i64 k = gtid(); k < pairs; k += gstride()) {
    // k walks the output's pairs; layout (ROPE_LAYOUTS) 0: same, 1: split (out [o, H, T]), 2: merge (x [o, H, T])
    const i64 i = k % half;
    const bool headsOut = layout == 1;
    const i64 a1 = (k / half) % (headsOut ? tokens : H), a2 = (k / half) / (headsOut ? tokens : H);
    const i64 t = headsOut ? a1 : a2 % tokens, h = headsOut ? a2 % H : a1, o = a2 / (headsOut ? H : tokens);
    const i64 from = layout == 2 ? ((o * H + h) * tokens + t) * half + i : ((o * tokens + t) * H + h) * half + i;
    const M e = ${load(dtype, 'x[2 * from]')}, d = ${load(dtype, 'x[2 * from + 1]')};
    const M c = ${load(dtype, 'cs[t * half + i]')}, s = ${load(dtype, 'sn[t * half + i]')};
    M a, b;
    if (inverse) { a = rp_add(rp_mul(e, c), rp_mul(d, s)); b = rp_sub(rp_mul(d, c), rp_mul(e, s)); }
    else { a = rp_sub(rp_mul(e, c), rp_mul(d, s)); b = rp_add(rp_mul(e, s), rp_mul(d, c)); }
    out[2 * k] = ${STORE[dtype]('a')};
    out[2 * k + 1] = ${STORE[dtype]('b')};
  }
}`;
}

/**
 * One AdamW step per element (float32 / float64 modules): the composite update of src/train/adamw.ts,
 * every operation explicitly rounded (_rn intrinsics) so that no multiply-add is contracted and the
 * result equals the composite's chain of kernels bit for bit. Two entry points share the element step:
 * one parameter per launch (ADAMW), and every parameter in one launch (ADAMW_ALL) from a table of
 * AwEntry in device memory, ADAMW_PER_BLOCK elements per block, a block finding its entry by binary
 * search over the entries' first blocks.
 */
function adamwSource(dtype: CudaDType): string {
  const T = CTYPE[dtype];
  const f = dtype === 'float32' ? 'f' : 'd';
  const hyper = 'double beta1, double omb1, double beta2, double omb2, double c1, double c2, double eps, double lr, double shrink';
  return `__device__ __forceinline__ ${T} aw_add(${T} a, ${T} b) { return __${f}add_rn(a, b); }
__device__ __forceinline__ ${T} aw_sub(${T} a, ${T} b) { return __${f}sub_rn(a, b); }
__device__ __forceinline__ ${T} aw_mul(${T} a, ${T} b) { return __${f}mul_rn(a, b); }
__device__ __forceinline__ ${T} aw_div(${T} a, ${T} b) { return __${f}div_rn(a, b); }
__device__ __forceinline__ ${T} aw_sqrt(${T} a) { return __${f}sqrt_rn(a); }
struct AwConsts { ${T} b1, ob1, b2, ob2, C1, C2, E, LR, S; };
__device__ __forceinline__ AwConsts aw_consts(${hyper}) {
  return AwConsts{(${T})beta1, (${T})omb1, (${T})beta2, (${T})omb2, (${T})c1, (${T})c2, (${T})eps, (${T})lr, (${T})shrink};
}
__device__ __forceinline__ void aw_step(i64 i, const ${T}* p, const ${T}* g, const ${T}* m, const ${T}* v, ${T}* po, ${T}* mo, ${T}* vo, const AwConsts& k, bool decay) {
  const ${T} gi = g[i];
  const ${T} mi = aw_add(aw_mul(m[i], k.b1), aw_mul(gi, k.ob1));
  const ${T} vi = aw_add(aw_mul(v[i], k.b2), aw_mul(aw_mul(gi, gi), k.ob2));
  const ${T} update = aw_div(aw_div(mi, k.C1), aw_add(aw_sqrt(aw_div(vi, k.C2)), k.E));
  const ${T} shrunk = decay ? aw_mul(p[i], k.S) : p[i];
  po[i] = aw_sub(shrunk, aw_mul(update, k.LR));
  mo[i] = mi;
  vo[i] = vi;
}
extern "C" __global__ void ${ADAMW}(const ${T}* p, const ${T}* g, const ${T}* m, const ${T}* v, ${T}* po, ${T}* mo, ${T}* vo, i64 n,
    ${hyper}, int decay) {
  const AwConsts k = aw_consts(beta1, omb1, beta2, omb2, c1, c2, eps, lr, shrink);
  for (i64 i = gtid(); i < n; i += gstride()) aw_step(i, p, g, m, v, po, mo, vo, k, decay != 0);
}
/* One parameter of ADAMW_ALL: its seven arrays, its size, its first block, whether it decays (ten 64-bit words). */
struct AwEntry { const ${T}* p; const ${T}* g; const ${T}* m; const ${T}* v; ${T}* po; ${T}* mo; ${T}* vo; i64 n; i64 first; i64 decay; };
extern "C" __global__ void ${ADAMW_ALL}(const AwEntry* table, i64 count, ${hyper}) {
  i64 lo = 0, hi = count - 1;
  while (lo < hi) {
    const i64 mid = (lo + hi + 1) >> 1;
    if (table[mid].first <= (i64)blockIdx.x) lo = mid; else hi = mid - 1;
  }
  const AwEntry e = table[lo];
  const AwConsts k = aw_consts(beta1, omb1, beta2, omb2, c1, c2, eps, lr, shrink);
  const i64 begin = ((i64)blockIdx.x - e.first) * ${ADAMW_PER_BLOCK};
  const i64 end = begin + ${ADAMW_PER_BLOCK} < e.n ? begin + ${ADAMW_PER_BLOCK} : e.n;
  for (i64 i = begin + threadIdx.x; i < end; i += blockDim.x) aw_step(i, e.p, e.g, e.m, e.v, e.po, e.mo, e.vo, k, e.decay != 0);
}`;
}

/** Every elementwise kernel of one dtype, as one source. */
export function elementwiseSource(dtype: CudaDType): string {
  const T = CTYPE[dtype];
  const M = MATH[dtype];
  const store = STORE[dtype];
  const isFloat = CUDA_FLOATS.has(dtype);
  const parts: string[] = [`typedef ${M} M;`];
  const VW = vecWidth(dtype);
  // the vector kernels: element q of each 16-byte vector v through `body` (which reads x, y from the
  // vectors' elements ea[q], eb[q] or the broadcast scalars), the rest of n element by element
  const vecLoop = (inputs: string, body: (e: string) => string) => `const i64 nv = n / ${VW};
  for (i64 v = gtid(); v < nv; v += gstride()) {
    ${inputs}
    uint4 ov; ${T}* eo = (${T}*)&ov;
    #pragma unroll
    for (int q = 0; q < ${VW}; q++) eo[q] = ${body('q')};
    ((uint4*)out)[v] = ov;
  }`;
  for (const [op, expr] of Object.entries(UNARY) as [UnaryOp, string][]) {
    if (!isFloat && !['neg', 'abs', 'square', 'sign'].includes(op)) continue;
    parts.push(`extern "C" __global__ void ${unaryName(op)}(${T}* out, const ${T}* a, i64 n) {
  for (i64 i = gtid(); i < n; i += gstride()) { M x = ${load(dtype, 'a[i]')}; out[i] = ${store(expr)}; }
}`);
    if (isFloat) {
      parts.push(`extern "C" __global__ void ${unaryVecName(op)}(${T}* out, const ${T}* a, i64 n) {
  ${vecLoop(`const uint4 av = ((const uint4*)a)[v]; const ${T}* ea = (const ${T}*)&av;`, (q) => `[&] { M x = ${load(dtype, `ea[${q}]`)}; return ${store(expr)}; }()`)}
  for (i64 i = nv * ${VW} + gtid(); i < n; i += gstride()) { M x = ${load(dtype, 'a[i]')}; out[i] = ${store(expr)}; }
}`);
    }
  }
  for (const [op, expr] of Object.entries(BINARY) as [BinaryOp, string][]) {
    // Math.imul: wrapping 32-bit product
    const body = (ia: string, ib: string) =>
      dtype === 'int32' && op === 'mul' ? `(int)((unsigned)a[${ia}] * (unsigned)b[${ib}])` : `${store(expr)}`;
    const read = (ia: string, ib: string) => `M x = ${load(dtype, `a[${ia}]`)}; M y = ${load(dtype, `b[${ib}]`)};`;
    parts.push(`extern "C" __global__ void ${binaryName(op)}(${T}* out, const ${T}* a, const ${T}* b, Ix ix, i64 n) {
  for (i64 i = gtid(); i < n; i += gstride()) {
    i64 o0, o1, o2; offsets(ix, i, o0, o1, o2);
    ${read('o0', 'o1')}
    out[i] = ${body('o0', 'o1')};
  }
}`);
    // rank <= 1 after coalescing (same shape, or one side a scalar): element strides 1 or 0, no index walk
    parts.push(`extern "C" __global__ void ${binaryFlatName(op)}(${T}* out, const ${T}* a, i64 sa, const ${T}* b, i64 sb, i64 n) {
  for (i64 i = gtid(); i < n; i += gstride()) {
    ${read('i * sa', 'i * sb')}
    out[i] = ${body('i * sa', 'i * sb')};
  }
}`);
    if (isFloat) {
      // the same over 16-byte vectors of the sides with stride 1 (a side of stride 0 is one value)
      parts.push(`extern "C" __global__ void ${binaryVecName(op)}(${T}* out, const ${T}* a, i64 sa, const ${T}* b, i64 sb, i64 n) {
  const M xs = ${load(dtype, 'a[0]')}, ys = ${load(dtype, 'b[0]')};
  ${vecLoop(`uint4 av, bv; if (sa) av = ((const uint4*)a)[v]; if (sb) bv = ((const uint4*)b)[v];
    const ${T}* ea = (const ${T}*)&av; const ${T}* eb = (const ${T}*)&bv;`, (q) => `[&] { M x = sa ? ${load(dtype, `ea[${q}]`)} : xs; M y = sb ? ${load(dtype, `eb[${q}]`)} : ys; return ${store(expr)}; }()`)}
  for (i64 i = nv * ${VW} + gtid(); i < n; i += gstride()) {
    ${read('i * sa', 'i * sb')}
    out[i] = ${body('i * sa', 'i * sb')};
  }
}`);
    }
  }
  for (const [op, expr] of Object.entries(COMPARE) as [CompareOp, string][]) {
    parts.push(`extern "C" __global__ void ${compareName(op)}(unsigned char* out, const ${T}* a, const ${T}* b, Ix ix, i64 n) {
  for (i64 i = gtid(); i < n; i += gstride()) {
    i64 o0, o1, o2; offsets(ix, i, o0, o1, o2);
    M x = ${load(dtype, 'a[o0]')}; M y = ${load(dtype, 'b[o1]')};
    out[i] = (${expr}) ? 1 : 0;
  }
}`);
  }
  if (dtype === 'float32' || dtype === 'float64') parts.push(adamwSource(dtype));
  if (isFloat) parts.push(ropeSource(dtype), swigluSource(dtype));
  if (isFloat) {
    parts.push(`extern "C" __global__ void ${ADDCMUL}(${T}* out, const ${T}* a, const ${T}* b, const ${T}* c, Ix ix, i64 n) {
  for (i64 i = gtid(); i < n; i += gstride()) {
    i64 o0, o1, o2; offsets(ix, i, o0, o1, o2);
    const M x = ${load(dtype, 'a[o0]')}, y = ${load(dtype, 'b[o1]')}, z = ${load(dtype, 'c[o2]')};
    out[i] = ${store('x + y * z')};
  }
}
extern "C" __global__ void ${ADDCMUL_ROWS_VEC}(${T}* out, const ${T}* a, const ${T}* b, const ${T}* c, i64 inner, i64 n) {
  ${vecLoop(`const uint4 av = ((const uint4*)a)[v], bv = ((const uint4*)b)[v]; const M z = ${load(dtype, `c[v * ${VW} / inner]`)};
    const ${T}* ea = (const ${T}*)&av; const ${T}* eb = (const ${T}*)&bv;`, (q) => `[&] { const M x = ${load(dtype, `ea[${q}]`)}, y = ${load(dtype, `eb[${q}]`)}; return ${store('x + y * z')}; }()`)}
}`);
  }
  parts.push(`extern "C" __global__ void ${WHERE}(${T}* out, const unsigned char* c, const ${T}* a, const ${T}* b, Ix ix, i64 n) {
  for (i64 i = gtid(); i < n; i += gstride()) {
    i64 o0, o1, o2; offsets(ix, i, o0, o1, o2);
    out[i] = c[o0] ? a[o1] : b[o2];
  }
}`);
  return parts.join('\n');
}
