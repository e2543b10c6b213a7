/** Element types. `bfloat16` is reserved for the CUDA backend; `bool` is what comparisons produce. */
export type DType = 'float32' | 'float64' | 'int32' | 'bool' | 'bfloat16';

export type HostArray = Float32Array | Float64Array | Int32Array | Uint8Array;

export const FLOAT_DTYPES: ReadonlySet<DType> = new Set(['float32', 'float64', 'bfloat16']);

export function isFloat(dtype: DType): boolean {
  return FLOAT_DTYPES.has(dtype);
}

/** Host array type used to move values of `dtype` in and out of a backend (bf16 travels as float32). */
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
