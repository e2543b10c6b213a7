/**
 * Stand-in native libraries for the CUDA backend: every call succeeds and does nothing, except
 * that out-parameters get plausible values (a device count of 1, sm_90, increasing device
 * addresses). With them, `new CudaBackend(0, standInLibraries())` runs on any machine, so tests
 * can check the backend's host-side logic (argument packing, allocator traffic, launch counts) and
 * the host-overhead bench can time our own per-op work without the driver's share.
 * Kernels are never compiled: NVRTC's stand-in returns a 4-byte "CUBIN".
 */
import type { Cublas, Driver, Nvrtc } from './ffi.js';

export interface StandInCalls {
  /** Calls per function name. */
  counts: Map<string, number>;
  /** Arguments of the last cuLaunchKernel (function handle, grid, block, shared, params). */
  lastLaunch: unknown[] | null;
  /** Arguments of the last call per function name. */
  last: Map<string, unknown[]>;
}

export function standInLibraries(): { driver: Driver; nvrtc: Nvrtc; cublas: Cublas; calls: StandInCalls } {
  const calls: StandInCalls = { counts: new Map(), lastLaunch: null, last: new Map() };
  let nextAddress = 0x7f0000000000;
  const ok =
    (name: string, body?: (...args: unknown[]) => void) =>
    (...args: unknown[]): number => {
      calls.counts.set(name, (calls.counts.get(name) ?? 0) + 1);
      calls.last.set(name, args);
      body?.(...args);
      return 0;
    };
  const set = (out: unknown, value: unknown) => {
    (out as unknown[])[0] = value;
  };
  const driver = {
    path: '(stand-in driver)',
    cuInit: ok('cuInit'),
    cuDriverGetVersion: ok('cuDriverGetVersion', (v) => set(v, 13000)),
    cuDeviceGetCount: ok('cuDeviceGetCount', (n) => set(n, 1)),
    cuDeviceGet: ok('cuDeviceGet', (d) => set(d, 0)),
    cuDeviceGetName: ok('cuDeviceGetName', (buf) => (buf as Buffer).write('stand-in GPU\0')),
    cuDeviceGetAttribute: ok('cuDeviceGetAttribute', (v, attr) => set(v, attr === 75 ? 9 : attr === 76 ? 0 : 132)),
    cuDevicePrimaryCtxRetain: ok('cuDevicePrimaryCtxRetain', (c) => set(c, {})),
    cuCtxSetCurrent: ok('cuCtxSetCurrent'),
    cuMemAlloc: ok('cuMemAlloc', (p, bytes) => {
      set(p, nextAddress);
      nextAddress += Math.ceil(Number(bytes) / 256) * 256 + 256;
    }),
    cuMemFree: ok('cuMemFree'),
    cuMemGetInfo: ok('cuMemGetInfo', (f, t) => {
      set(f, 80e9);
      set(t, 80e9);
    }),
    cuMemcpyHtoD: ok('cuMemcpyHtoD'),
    cuMemcpyHtoDAsync: ok('cuMemcpyHtoDAsync'),
    cuMemcpyDtoH: ok('cuMemcpyDtoH'),
    cuMemcpyDtoDAsync: ok('cuMemcpyDtoDAsync'),
    cuMemsetD8Async: ok('cuMemsetD8Async'),
    cuMemsetD16Async: ok('cuMemsetD16Async'),
    cuMemsetD32Async: ok('cuMemsetD32Async'),
    cuModuleLoadData: ok('cuModuleLoadData', (m) => set(m, {})),
    cuModuleGetFunction: ok('cuModuleGetFunction', (f, _m, name) => set(f, { name })),
    cuFuncSetAttribute: ok('cuFuncSetAttribute'),
    cuFuncGetAttribute: ok('cuFuncGetAttribute', (v) => set(v, 0)),
    cuOccupancyMaxActiveBlocksPerMultiprocessor: ok('cuOccupancyMaxActiveBlocksPerMultiprocessor', (v) => set(v, 1)),
    cuLaunchKernel: ok('cuLaunchKernel', (...args) => {
      calls.lastLaunch = args;
    }),
    cuStreamSynchronize: ok('cuStreamSynchronize'),
    cuEventCreate: ok('cuEventCreate', (e) => set(e, { event: true })),
    cuEventRecord: ok('cuEventRecord'),
    cuEventSynchronize: ok('cuEventSynchronize'),
    cuEventElapsedTime: ok('cuEventElapsedTime', (ms) => set(ms, 0.25)),
    cuEventDestroy: ok('cuEventDestroy'),
    cuStreamCreate: ok('cuStreamCreate', (st) => set(st, { stream: true })),
    cuStreamBeginCapture: ok('cuStreamBeginCapture'),
    cuStreamEndCapture: ok('cuStreamEndCapture', (_s, g) => set(g, { graph: true })),
    cuGraphInstantiate: ok('cuGraphInstantiate', (e) => set(e, { exec: true })),
    cuGraphLaunch: ok('cuGraphLaunch'),
    cuGraphDestroy: ok('cuGraphDestroy'),
    cuGraphExecDestroy: ok('cuGraphExecDestroy'),
    cuCtxSynchronize: ok('cuCtxSynchronize'),
    cuGetErrorName: ok('cuGetErrorName', (_c, s) => set(s, 'CUDA_ERROR_STAND_IN')),
    cuGetErrorString: ok('cuGetErrorString', (_c, s) => set(s, 'stand-in error')),
  };
  const nvrtc = {
    path: '(stand-in nvrtc)',
    nvrtcVersion: ok('nvrtcVersion', (a, b) => {
      set(a, 0);
      set(b, 0);
    }),
    nvrtcCreateProgram: ok('nvrtcCreateProgram', (p) => set(p, {})),
    nvrtcCompileProgram: ok('nvrtcCompileProgram'),
    nvrtcGetCUBINSize: ok('nvrtcGetCUBINSize', (s) => set(s, 4)),
    nvrtcGetCUBIN: ok('nvrtcGetCUBIN'),
    nvrtcGetProgramLogSize: ok('nvrtcGetProgramLogSize', (s) => set(s, 1)),
    nvrtcGetProgramLog: ok('nvrtcGetProgramLog'),
    nvrtcDestroyProgram: ok('nvrtcDestroyProgram'),
    nvrtcGetErrorString: () => 'stand-in',
  };
  const gemm = (name: string) => ok(name);
  const cublas = {
    path: '(stand-in cublas)',
    cublasCreate: ok('cublasCreate', (h) => set(h, {})),
    cublasDestroy: ok('cublasDestroy'),
    cublasSetStream: ok('cublasSetStream'),
    cublasSetMathMode: ok('cublasSetMathMode'),
    cublasSetWorkspace: ok('cublasSetWorkspace'),
    cublasGetVersion: ok('cublasGetVersion', (_h, v) => set(v, 130000)),
    cublasSgemmStridedBatched: gemm('cublasSgemmStridedBatched'),
    cublasDgemmStridedBatched: gemm('cublasDgemmStridedBatched'),
    cublasSgemmBatched: gemm('cublasSgemmBatched'),
    cublasDgemmBatched: gemm('cublasDgemmBatched'),
    cublasGemmEx: gemm('cublasGemmEx'),
    cublasGemmStridedBatchedEx: gemm('cublasGemmStridedBatchedEx'),
    cublasGemmBatchedEx: gemm('cublasGemmBatchedEx'),
  };
  return { driver: driver as unknown as Driver, nvrtc: nvrtc as unknown as Nvrtc, cublas: cublas as unknown as Cublas, calls };
}
