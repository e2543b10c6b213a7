/**
 * koffi bindings of the three native libraries the CUDA backend uses: the driver API (memory,
 * modules, launches), NVRTC (compiling kernel source to CUBIN) and cuBLAS (GEMM). Every call that
 * returns a status goes through a checker that turns a failure into an Error naming the call.
 */
import { type Lib, LIBRARIES, koffi, openLibrary } from './library.js';

/** A device address (CUdeviceptr) as a JS number: below 2^53 on every driver we know. */
export type DevicePtr = number;
/** An opaque handle (CUfunction, CUmodule, cublasHandle_t, ...) as koffi returns it. */
export type Handle = unknown;

type Fn = (...args: unknown[]) => unknown;

export const CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT = 16;
export const CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75;
export const CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR = 76;
export const CUDA_ERROR_OUT_OF_MEMORY = 2;
/** cuStreamCreate flag: no implicit synchronisation with the legacy default stream. */
export const CU_STREAM_NON_BLOCKING = 1;
/** CUstreamCaptureMode: other threads' and this thread's unsafe calls (cuMemAlloc) are not refused. */
export const CU_STREAM_CAPTURE_MODE_RELAXED = 2;
/** CUfunction_attribute: the dynamic shared memory a launch may ask for (above 48 KiB needs it raised). */
export const CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8;
export const CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES = 3;
export const CU_FUNC_ATTRIBUTE_NUM_REGS = 4;
export const CUBLAS_OP_N = 0;
export const CUBLAS_OP_T = 1;
/** cudaDataType_t of bfloat16 (CUDA_R_16BF) and float32 (CUDA_R_32F), cublasComputeType_t CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT. */
export const CUDA_R_16BF = 14;
export const CUDA_R_32F = 0;
export const CUBLAS_COMPUTE_32F = 68;
export const CUBLAS_GEMM_DEFAULT = -1;

export class CudaError extends Error {
  constructor(
    message: string,
    readonly code: number,
  ) {
    super(message);
  }
}

export interface Driver {
  path: string;
  cuInit: Fn;
  cuDriverGetVersion: Fn;
  cuDeviceGetCount: Fn;
  cuDeviceGet: Fn;
  cuDeviceGetName: Fn;
  cuDeviceGetAttribute: Fn;
  cuDevicePrimaryCtxRetain: Fn;
  cuCtxSetCurrent: Fn;
  cuMemAlloc: Fn;
  cuMemFree: Fn;
  cuMemGetInfo: Fn;
  cuMemcpyHtoD: Fn;
  cuMemcpyHtoDAsync: Fn;
  cuMemcpyDtoH: Fn;
  cuMemcpyDtoDAsync: Fn;
  cuMemsetD8Async: Fn;
  cuMemsetD32Async: Fn;
  cuModuleLoadData: Fn;
  cuModuleGetFunction: Fn;
  cuFuncSetAttribute: Fn;
  cuFuncGetAttribute: Fn;
  cuOccupancyMaxActiveBlocksPerMultiprocessor: Fn;
  cuLaunchKernel: Fn;
  cuStreamSynchronize: Fn;
  cuStreamCreate: Fn;
  cuStreamBeginCapture: Fn;
  cuStreamEndCapture: Fn;
  cuGraphInstantiate: Fn;
  cuGraphLaunch: Fn;
  cuGraphDestroy: Fn;
  cuGraphExecDestroy: Fn;
  cuCtxSynchronize: Fn;
  cuGetErrorName: Fn;
  cuGetErrorString: Fn;
  /** Events, for phase timing only (absent where the driver exports none of a name). */
  cuEventCreate?: Fn;
  cuEventRecord?: Fn;
  cuEventSynchronize?: Fn;
  cuEventElapsedTime?: Fn;
  cuEventDestroy?: Fn;
}

export interface Nvrtc {
  path: string;
  nvrtcVersion: Fn;
  nvrtcCreateProgram: Fn;
  nvrtcCompileProgram: Fn;
  nvrtcGetCUBINSize: Fn;
  nvrtcGetCUBIN: Fn;
  nvrtcGetProgramLogSize: Fn;
  nvrtcGetProgramLog: Fn;
  nvrtcDestroyProgram: Fn;
  nvrtcGetErrorString: Fn;
}

export interface Cublas {
  path: string;
  cublasCreate: Fn;
  cublasDestroy: Fn;
  cublasSetStream: Fn;
  cublasSetMathMode: Fn;
  cublasSetWorkspace: Fn;
  cublasGetVersion: Fn;
  cublasSgemmStridedBatched: Fn;
  cublasDgemmStridedBatched: Fn;
  cublasSgemmBatched: Fn;
  cublasDgemmBatched: Fn;
  cublasGemmEx: Fn;
  cublasGemmStridedBatchedEx: Fn;
  cublasGemmBatchedEx: Fn;
}

function bind(lib: Lib, decls: Record<string, string>): Record<string, Fn> {
  const out: Record<string, Fn> = {};
  for (const [key, decl] of Object.entries(decls)) out[key] = lib.func(decl) as unknown as Fn;
  return out;
}

export function loadDriver(): Driver {
  const { lib, path } = openLibrary(LIBRARIES.driver);
  const f = bind(lib, {
    cuInit: 'int cuInit(unsigned int flags)',
    cuDriverGetVersion: 'int cuDriverGetVersion(_Out_ int *v)',
    cuDeviceGetCount: 'int cuDeviceGetCount(_Out_ int *n)',
    cuDeviceGet: 'int cuDeviceGet(_Out_ int *dev, int ordinal)',
    cuDeviceGetName: 'int cuDeviceGetName(void *name, int len, int dev)',
    cuDeviceGetAttribute: 'int cuDeviceGetAttribute(_Out_ int *v, int attrib, int dev)',
    cuDevicePrimaryCtxRetain: 'int cuDevicePrimaryCtxRetain(_Out_ void **ctx, int dev)',
    cuCtxSetCurrent: 'int cuCtxSetCurrent(void *ctx)',
    cuMemAlloc: 'int cuMemAlloc_v2(_Out_ uint64_t *dptr, size_t bytes)',
    cuMemFree: 'int cuMemFree_v2(uint64_t dptr)',
    cuMemGetInfo: 'int cuMemGetInfo_v2(_Out_ size_t *free, _Out_ size_t *total)',
    cuMemcpyHtoD: 'int cuMemcpyHtoD_v2(uint64_t dst, const void *src, size_t bytes)',
    cuMemcpyHtoDAsync: 'int cuMemcpyHtoDAsync_v2(uint64_t dst, const void *src, size_t bytes, void *stream)',
    cuMemcpyDtoH: 'int cuMemcpyDtoH_v2(void *dst, uint64_t src, size_t bytes)',
    cuMemcpyDtoDAsync: 'int cuMemcpyDtoDAsync_v2(uint64_t dst, uint64_t src, size_t bytes, void *stream)',
    cuMemsetD8Async: 'int cuMemsetD8Async(uint64_t dst, uint8_t value, size_t n, void *stream)',
    cuMemsetD32Async: 'int cuMemsetD32Async(uint64_t dst, uint32_t value, size_t n, void *stream)',
    cuModuleLoadData: 'int cuModuleLoadData(_Out_ void **module, const void *image)',
    cuModuleGetFunction: 'int cuModuleGetFunction(_Out_ void **fn, void *module, const char *name)',
    cuFuncSetAttribute: 'int cuFuncSetAttribute(void *fn, int attrib, int value)',
    cuFuncGetAttribute: 'int cuFuncGetAttribute(_Out_ int *value, int attrib, void *fn)',
    cuOccupancyMaxActiveBlocksPerMultiprocessor: 'int cuOccupancyMaxActiveBlocksPerMultiprocessor(_Out_ int *blocks, void *fn, int blockSize, size_t dynamicSMemSize)',
    cuLaunchKernel:
      'int cuLaunchKernel(void *f, unsigned int gx, unsigned int gy, unsigned int gz, unsigned int bx, unsigned int by, unsigned int bz, unsigned int shmem, void *stream, void *params, void *extra)',
    cuStreamSynchronize: 'int cuStreamSynchronize(void *stream)',
    cuStreamCreate: 'int cuStreamCreate(_Out_ void **stream, unsigned int flags)',
    cuStreamBeginCapture: 'int cuStreamBeginCapture_v2(void *stream, int mode)',
    cuStreamEndCapture: 'int cuStreamEndCapture(void *stream, _Out_ void **graph)',
    cuGraphInstantiate: 'int cuGraphInstantiateWithFlags(_Out_ void **exec, void *graph, unsigned long long flags)',
    cuGraphLaunch: 'int cuGraphLaunch(void *exec, void *stream)',
    cuGraphDestroy: 'int cuGraphDestroy(void *graph)',
    cuGraphExecDestroy: 'int cuGraphExecDestroy(void *exec)',
    cuCtxSynchronize: 'int cuCtxSynchronize()',
    cuGetErrorName: 'int cuGetErrorName(int err, _Out_ const char **s)',
    cuGetErrorString: 'int cuGetErrorString(int err, _Out_ const char **s)',
  });
  // CUDA 12.8+ exports the _v2 names the headers map these to; older drivers the plain ones
  const events = bindFirst(lib, {
    cuEventCreate: ['int cuEventCreate(_Out_ void **event, unsigned int flags)'],
    cuEventRecord: ['int cuEventRecord(void *event, void *stream)'],
    cuEventSynchronize: ['int cuEventSynchronize(void *event)'],
    cuEventElapsedTime: ['int cuEventElapsedTime_v2(_Out_ float *ms, void *start, void *end)', 'int cuEventElapsedTime(_Out_ float *ms, void *start, void *end)'],
    cuEventDestroy: ['int cuEventDestroy_v2(void *event)', 'int cuEventDestroy(void *event)'],
  });
  return { path, ...f, ...events } as unknown as Driver;
}

/** For each key, the first of its declarations the library exports (none: the key is left out). */
function bindFirst(lib: Lib, decls: Record<string, string[]>): Record<string, Fn> {
  const out: Record<string, Fn> = {};
  for (const [key, options] of Object.entries(decls)) {
    for (const decl of options) {
      try {
        out[key] = lib.func(decl) as unknown as Fn;
        break;
      } catch {
        // not exported under this name: try the next
      }
    }
  }
  return out;
}

export function loadNvrtc(): Nvrtc {
  const { lib, path } = openLibrary(LIBRARIES.nvrtc);
  const f = bind(lib, {
    nvrtcVersion: 'int nvrtcVersion(_Out_ int *major, _Out_ int *minor)',
    nvrtcCreateProgram:
      'int nvrtcCreateProgram(_Out_ void **prog, const char *src, const char *name, int numHeaders, const char **headers, const char **includeNames)',
    nvrtcCompileProgram: 'int nvrtcCompileProgram(void *prog, int numOptions, const char **options)',
    nvrtcGetCUBINSize: 'int nvrtcGetCUBINSize(void *prog, _Out_ size_t *size)',
    nvrtcGetCUBIN: 'int nvrtcGetCUBIN(void *prog, void *cubin)',
    nvrtcGetProgramLogSize: 'int nvrtcGetProgramLogSize(void *prog, _Out_ size_t *size)',
    nvrtcGetProgramLog: 'int nvrtcGetProgramLog(void *prog, void *log)',
    nvrtcDestroyProgram: 'int nvrtcDestroyProgram(_Inout_ void **prog)',
    nvrtcGetErrorString: 'const char *nvrtcGetErrorString(int result)',
  });
  return { path, ...f } as unknown as Nvrtc;
}

export function loadCublas(): Cublas {
  const { lib, path } = openLibrary(LIBRARIES.cublas);
  // Device pointers travel as uint64_t (the same register as a pointer on every 64-bit ABI).
  const gemmArgs = (t: string) =>
    `void *h, int ta, int tb, int m, int n, int k, const ${t} *alpha, uint64_t A, int lda, int64_t sA, uint64_t B, int ldb, int64_t sB, const ${t} *beta, uint64_t C, int ldc, int64_t sC, int batch`;
  const ptrArgs = (t: string) =>
    `void *h, int ta, int tb, int m, int n, int k, const ${t} *alpha, uint64_t A, int lda, uint64_t B, int ldb, const ${t} *beta, uint64_t C, int ldc, int batch`;
  const f = bind(lib, {
    cublasCreate: 'int cublasCreate_v2(_Out_ void **h)',
    cublasDestroy: 'int cublasDestroy_v2(void *h)',
    cublasSetStream: 'int cublasSetStream_v2(void *h, void *stream)',
    cublasSetMathMode: 'int cublasSetMathMode(void *h, int mode)',
    cublasSetWorkspace: 'int cublasSetWorkspace_v2(void *h, uint64_t workspace, size_t bytes)',
    cublasGetVersion: 'int cublasGetVersion_v2(void *h, _Out_ int *v)',
    cublasSgemmStridedBatched: `int cublasSgemmStridedBatched(${gemmArgs('float')})`,
    cublasDgemmStridedBatched: `int cublasDgemmStridedBatched(${gemmArgs('double')})`,
    cublasSgemmBatched: `int cublasSgemmBatched(${ptrArgs('float')})`,
    cublasDgemmBatched: `int cublasDgemmBatched(${ptrArgs('double')})`,
    // bf16 in/out with fp32 accumulation (tensor cores): data types and compute type are arguments
    cublasGemmEx:
      'int cublasGemmEx(void *h, int ta, int tb, int m, int n, int k, const float *alpha, uint64_t A, int Atype, int lda, uint64_t B, int Btype, int ldb, const float *beta, uint64_t C, int Ctype, int ldc, int computeType, int algo)',
    cublasGemmStridedBatchedEx:
      'int cublasGemmStridedBatchedEx(void *h, int ta, int tb, int m, int n, int k, const float *alpha, uint64_t A, int Atype, int lda, int64_t sA, uint64_t B, int Btype, int ldb, int64_t sB, const float *beta, uint64_t C, int Ctype, int ldc, int64_t sC, int batch, int computeType, int algo)',
    cublasGemmBatchedEx:
      'int cublasGemmBatchedEx(void *h, int ta, int tb, int m, int n, int k, const float *alpha, uint64_t A, int Atype, int lda, uint64_t B, int Btype, int ldb, const float *beta, uint64_t C, int Ctype, int ldc, int batch, int computeType, int algo)',
  });
  return { path, ...f } as unknown as Cublas;
}

/** Checkers: one line per failing call, with the library's own name for the status. */
export function makeChecks(drv: Driver) {
  const cu = (name: string, status: unknown): void => {
    const code = status as number;
    if (code === 0) return;
    const n: [string | null] = [null];
    const s: [string | null] = [null];
    drv.cuGetErrorName(code, n);
    drv.cuGetErrorString(code, s);
    throw new CudaError(`cuda backend: ${name} failed: ${n[0] ?? 'CUDA_ERROR'} (${code}): ${s[0] ?? 'unknown error'}`, code);
  };
  return { cu };
}

export function checkNvrtc(nv: Nvrtc, name: string, status: unknown): void {
  const code = status as number;
  if (code !== 0) throw new CudaError(`cuda backend: ${name} failed: ${String(nv.nvrtcGetErrorString(code))} (${code})`, code);
}

const CUBLAS_STATUS: Record<number, string> = {
  1: 'CUBLAS_STATUS_NOT_INITIALIZED',
  3: 'CUBLAS_STATUS_ALLOC_FAILED',
  7: 'CUBLAS_STATUS_INVALID_VALUE',
  8: 'CUBLAS_STATUS_ARCH_MISMATCH',
  11: 'CUBLAS_STATUS_MAPPING_ERROR',
  13: 'CUBLAS_STATUS_EXECUTION_FAILED',
  14: 'CUBLAS_STATUS_INTERNAL_ERROR',
  15: 'CUBLAS_STATUS_NOT_SUPPORTED',
  16: 'CUBLAS_STATUS_LICENSE_ERROR',
};
export function checkCublas(name: string, status: unknown): void {
  const code = status as number;
  if (code !== 0) throw new CudaError(`cuda backend: ${name} failed: ${CUBLAS_STATUS[code] ?? 'cuBLAS error'} (${code})`, code);
}

/**
 * Kernel arguments: one native buffer for the values (each in its own 8-byte aligned slot, or a
 * larger aligned slot for a struct) and one for the pointer array cuLaunchKernel reads. Reused by
 * every launch: the driver copies the arguments when the launch is queued.
 */
/** Most arguments one launch may have. */
const MAX_ARGS = 256;

export class ArgPacker {
  private cap = 0;
  private values: unknown = null;
  private ptrs: unknown = null;
  private base = 0;
  private view!: DataView;
  /** 32-bit halves of the pointer array (numbers, not BigInts: they cost an allocation each). */
  private ptrWords!: Uint32Array;
  private off = 0;
  private count = 0;

  constructor() {
    this.grow(16384);
  }
  private grow(bytes: number): void {
    const k = koffi();
    if (this.values) k.free(this.values);
    if (this.ptrs) k.free(this.ptrs);
    this.cap = bytes;
    this.values = k.alloc('uint8_t', bytes);
    this.ptrs = k.alloc('uint64_t', MAX_ARGS);
    this.base = Number(k.address(this.values));
    this.view = new DataView(k.view(this.values, bytes));
    this.ptrWords = new Uint32Array(k.view(this.ptrs, MAX_ARGS * 8));
  }
  reset(): this {
    this.off = 0;
    this.count = 0;
    return this;
  }
  private slot(bytes: number, align: number): number {
    const at = Math.ceil(this.off / align) * align;
    if (at + bytes > this.cap || this.count >= MAX_ARGS) throw new Error('cuda backend: too many kernel arguments');
    const address = this.base + at;
    this.ptrWords[2 * this.count] = address % 2 ** 32;
    this.ptrWords[2 * this.count + 1] = Math.floor(address / 2 ** 32);
    this.count++;
    this.off = at + bytes;
    return at;
  }
  /** A 64-bit integer from a JS number (exact up to 2^53, two's complement for negatives). */
  private put64(at: number, v: number): void {
    const lo = v % 2 ** 32;
    this.view.setUint32(at, lo < 0 ? lo + 2 ** 32 : lo, true);
    this.view.setInt32(at + 4, Math.floor(v / 2 ** 32), true);
  }
  ptr(p: DevicePtr): this {
    this.put64(this.slot(8, 8), p);
    return this;
  }
  i32(v: number): this {
    this.view.setInt32(this.slot(4, 4), v, true);
    return this;
  }
  i64(v: number): this {
    this.put64(this.slot(8, 8), v);
    return this;
  }
  f32(v: number): this {
    this.view.setFloat32(this.slot(4, 4), v, true);
    return this;
  }
  f64(v: number): this {
    this.view.setFloat64(this.slot(8, 8), v, true);
    return this;
  }
  /** A struct of 64-bit integers (the layout of the kernels' index structs). */
  i64s(vs: ArrayLike<number>): this {
    const at = this.slot(vs.length * 8, 8);
    for (let i = 0; i < vs.length; i++) this.put64(at + i * 8, vs[i]);
    return this;
  }
  /** The bytes written so far (tests compare them with a BigInt encoding). */
  bytes(): Uint8Array {
    return new Uint8Array(this.view.buffer, this.view.byteOffset, this.off).slice();
  }
  /** The address of argument i as the driver will read it. */
  argAddress(i: number): number {
    return this.ptrWords[2 * i] + this.ptrWords[2 * i + 1] * 2 ** 32;
  }
  baseAddress(): number {
    return this.base;
  }
  /** The `void **kernelParams` pointer. */
  params(): unknown {
    return this.ptrs;
  }
}
