/** Element types. `bfloat16` is reserved for the CUDA backend; `bool` is what comparisons produce. */
export type DType = 'float32' | 'float64' | 'int32' | 'bool' | 'bfloat16';

export type HostArray = Float32Array | Float64Array | Int32Array | Uint8Array;

export const FLOAT_DTYPES: ReadonlySet<DType> = new Set(['float32', 'float64', 'bfloat16']);

export function isFloat(dtype: DType): boolean {
  return FLOAT_DTYPES.has(dtype);
}

/** Host array type used to move values of `dtype` in and out of a backend (bf16 travels as float32). */
/**
 * Where per-row statistics and losses of a float tensor are kept (logsumexp, the token NLL, RMSNorm's
 * rstd, their cotangents): float64 for float64, else float32 (a bf16 statistic would lose the loss).
 */
export function statDType(dtype: DType): 'float32' | 'float64' {
  return dtype === 'float64' ? 'float64' : 'float32';
}

export function hostArray(dtype: DType, size: number): HostArray {
  switch (dtype) {
    case 'float32':
    case 'bfloat16':
      return new Float32Array(size);
    case 'float64':
      return new Float64Array(size);
    case 'int32':
      return new Int32Array(size);
    case 'bool':
      return new Uint8Array(size);
  }
}

export function bytesPerElement(dtype: DType): number {
  switch (dtype) {
    case 'float64':
      return 8;
    case 'float32':
    case 'int32':
      return 4;
    case 'bfloat16':
      return 2;
    case 'bool':
      return 1;
  }
}

export function assertDType(value: string): DType {
  if (['float32', 'float64', 'int32', 'bool', 'bfloat16'].includes(value)) return value as DType;
  throw new Error(`unknown dtype '${value}' (expected float32, float64, int32, bool or bfloat16)`);
}

/**
 * bfloat16 on the host: the high 16 bits of a float32, rounded to nearest even (NaN stays a quiet
 * NaN, infinities stay infinite, values past the largest bf16 round to infinity), as the CUDA
 * kernels' f2bf does. Backends with bf16 storage move values through these.
 */
export function toBfloat16Bits(values: ArrayLike<number>): Uint16Array {
  const f = Float32Array.from(values as ArrayLike<number>);
  const u = new Uint32Array(f.buffer);
  const out = new Uint16Array(f.length);
  for (let i = 0; i < u.length; i++) {
    const x = u[i];
    if ((x & 0x7fffffff) > 0x7f800000) out[i] = (x >>> 16) | 0x40;
    else out[i] = ((x + 0x7fff + ((x >>> 16) & 1)) >>> 16) & 0xffff;
  }
  return out;
}

export function fromBfloat16Bits(bits: Uint16Array): Float32Array {
  const u = new Uint32Array(bits.length);
  for (let i = 0; i < bits.length; i++) u[i] = bits[i] << 16;
  return new Float32Array(u.buffer);
}

/** float32 values rounded to the nearest bfloat16 (what a bf16 tensor holds). */
export function roundToBfloat16(values: ArrayLike<number>): Float32Array {
  return fromBfloat16Bits(toBfloat16Bits(values));
}
