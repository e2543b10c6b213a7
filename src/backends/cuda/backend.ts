/**
 * The CUDA backend: device memory from a caching allocator, kernels generated as CUDA C and
 * compiled by NVRTC (./kernels, ./compiler.ts), GEMMs through cuBLAS. Everything is queued on the
 * legacy default stream, so ops never wait for the device: `download` (reading a tensor back) is
 * the sync point, and that is also where a device-side index error is reported.
 *
 * dtypes: float32, float64 (cuBLAS D-GEMM, double kernels), int32, bool, and bfloat16 storage
 * (values widen to float in every kernel and round once on store; GEMMs on tensor cores with fp32
 * accumulation through cublasGemm*Ex).
 */
import { type AdamWEntry, type AdamWHyper, type AttentionJob, type Backend, type BinaryOp, type CompareOp, type MatmulJob, type PhaseTime, type ReduceOp, type RopeLayout, type UnaryOp, sumPhaseSpans } from '../../engine/backend.js';
import { type DType, type HostArray, fromBfloat16Bits, hostArray, statDType, toBfloat16Bits } from '../../engine/dtype.js';
import { sizeOf } from '../../engine/shape.js';
import { type AllocatorStats, CachingAllocator, DeviceBuffer } from './allocator.js';
import { KernelCompiler, cacheDir } from './compiler.js';
import {
  ArgPacker, CU_STREAM_CAPTURE_MODE_RELAXED, CU_STREAM_NON_BLOCKING, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT, CUBLAS_OP_N, CUBLAS_OP_T, CUDA_R_16BF, CUDA_R_32F, CUDA_ERROR_OUT_OF_MEMORY, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
  CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, type Cublas, CudaError,
  type Driver, type Handle, type Nvrtc, checkCublas, loadCublas, loadDriver, loadNvrtc, makeChecks,
} from './ffi.js';
import {
  ADAMW, ROPE, SWIGLU_BWD, SWIGLU_FWD, SWIGLU_GRAD_BWD, ATT_BWD_DKV, ATT_BWD_DQ, ATT_FWD, ATT_MAX_D, ATT_THREADS, BYTES, CUMSUM, type CudaDType, FILL, GATHER, LOGSUMEXP, MAX_RANK,
  LSE_FINAL, LSE_PARTIAL, type ModuleKind, SCATTER_ADD, allModuleSources, SOFTMAX, SOFTMAX_BIAS, SOFTMAX_BWD, SOFTMAX_GRAD_BWD, THREADS, WHERE, ADDCMUL, ADDCMUL_ROWS_VEC, ROPE_LAYOUTS, ADAMW_ALL, ADAMW_ENTRY_WORDS, ADAMW_PER_BLOCK, attentionShared, binaryName, binaryFlatName, binaryVecName, unaryVecName, vecWidth, castName, castAddName, CUDA_FLOATS, compareName, copyName,
  COL_TILE, writeRowsAtName, NLL_BWD, NLL_BWD_ACC, NLL_FWD, NLL_HVP, NLL_HVP_ACC, RMSNORM_BWD, RMSNORM_BWD_VEC, RMSNORM_DW_PARTIAL, RMSNORM_GRAD_BWD, RMSNORM_FWD, RMSNORM_FWD_VEC, RMSNORM_ROWS, moduleSource, rmsNormLanes, rmsNormVectorizable, reduceColsName, reduceColsPartialName, reduceFinalName, reduceFinalWarpName, reduceRowsName, reduceRowsPartialName, reduceRowsWarpName, unaryName,
} from './kernels/index.js';
import { CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, CU_FUNC_ATTRIBUTE_NUM_REGS } from './ffi.js';
import {
  ATT_DECODE_COMBINE, ATT_DECODE_PARTIAL, ATT_SPLIT_COMBINE, ATT_SPLIT_SUM, SPLIT_COMBINE_ROWS, ATT_DELTA, ATT_DELTA_THREADS, type AttnDType, type AttnKernel, type AttnPlan, DECODE_CHUNK,
  DECODE_COMBINE_THREADS, DECODE_MAX_TQ, DECODE_MIN_KEYS, DECODE_THREADS, decodeCombineSharedBytes, FA_MAX_D, attentionAccBytes, attentionLseBytes, attentionPlan,
  decodeSharedBytes, isAttnDType,
} from './kernels/attention.js';

const NULL_STREAM = null;
/** Threads of the merge after a split forward (few splits per row: ATT_DECODE_COMBINE with two warps). */
/** The shortest piece of a row that logsumexp gives its own block (below: one block per row). */
const LSE_MIN_CHUNK = 4096;
/** cuBLAS's workspace while recording (set explicitly, or it allocates one per recording). */
const CAPTURE_WORKSPACE_BYTES = 32 << 20;

interface LoadedModule {
  module: Handle;
  fns: Map<string, Handle>;
}

function buf(data: unknown): DeviceBuffer {
  if (!(data instanceof DeviceBuffer)) throw new Error('cuda backend: a tensor of another backend was passed to a cuda kernel');
  if (data.freed) throw new Error('cuda backend: internal: use of freed device memory');
  return data;
}

const INT_UNARY = new Set<UnaryOp>(['neg', 'abs', 'square', 'sign']);

export class CudaBackend implements Backend {
  readonly name = 'cuda';
  readonly preferFused = true;
  private drv: Driver;
  private cu: (name: string, status: unknown) => void;
  private blas: Cublas;
  private blasHandle: Handle;
  private compiler: KernelCompiler;
  private allocator: CachingAllocator;
  private args = new ArgPacker();
  private modules = new Map<string, LoadedModule>();
  private status: DeviceBuffer;
  private statusPending = false;
  private sms: number;
  private deviceName: string;
  private arch: string;
  private driverVersion: number;
  private paths: Record<string, string>;
  private launches = 0;
  /**
   * Where kernels, memsets and device copies are queued: the legacy default stream, except while
   * recording (captureWork), when they go to a side stream whose work becomes a graph. Uploads stay on
   * the legacy stream: during a recording they happen at once, into memory the recording keeps.
   */
  private stream: unknown = NULL_STREAM;
  private captureStream: unknown = null;
  private captureWorkspace: DeviceBuffer | null = null;
  private recording = false;
  private graphs = { recorded: 0, replays: 0 };
  private ixWords = new Float64Array(1 + 4 * MAX_RANK);
  /** Scalars cuBLAS reads through host pointers. */
  private one32 = new Float32Array([1]);
  private zero32 = new Float32Array([0]);
  private one64 = new Float64Array([1]);
  private zero64 = new Float64Array([0]);

  /**
   * `libraries` replaces the native libraries (tests and the host-overhead bench pass stand-ins
   * that do nothing, to measure and check the backend's own host-side work without a GPU).
   */
  constructor(
    ordinal = Number(process.env.TTT_CUDA_DEVICE ?? 0),
    libraries?: { driver: Driver; nvrtc: Nvrtc; cublas: Cublas },
  ) {
    const drv = libraries?.driver ?? loadDriver();
    this.drv = drv;
    this.cu = makeChecks(drv).cu;
    const cu = this.cu;
    const init = drv.cuInit(0) as number;
    if (init !== 0) {
      try {
        cu('cuInit', init);
      } catch (e) {
        throw new Error(`${(e as Error).message} (driver library: ${drv.path}; is a GPU visible to this process?)`);
      }
    }
    const count: [number | null] = [null];
    cu('cuDeviceGetCount', drv.cuDeviceGetCount(count));
    if (!count[0]) throw new Error(`cuda backend: the CUDA driver (${drv.path}) found no GPU`);
    if (ordinal < 0 || ordinal >= count[0]) throw new Error(`cuda backend: device ${ordinal} requested, ${count[0]} present`);
    const dev: [number | null] = [null];
    cu('cuDeviceGet', drv.cuDeviceGet(dev, ordinal));
    const ctx: [unknown] = [null];
    cu('cuDevicePrimaryCtxRetain', drv.cuDevicePrimaryCtxRetain(ctx, dev[0]));
    cu('cuCtxSetCurrent', drv.cuCtxSetCurrent(ctx[0]));
    const attr = (a: number): number => {
      const v: [number | null] = [null];
      cu('cuDeviceGetAttribute', drv.cuDeviceGetAttribute(v, a, dev[0]));
      return v[0]!;
    };
    this.sms = attr(CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT);
    const major = attr(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR);
    this.arch = `${major}${attr(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)}`;
    this.attentionTensorCores = major >= 8 && process.env.TTT_CUDA_ATTENTION !== 'simt';
    this.attentionWgmma = this.arch === '90' && this.attentionTensorCores && process.env.TTT_CUDA_ATTENTION !== 'mma';
    const nameBuf = Buffer.alloc(256);
    cu('cuDeviceGetName', drv.cuDeviceGetName(nameBuf, 256, dev[0]));
    this.deviceName = nameBuf.toString('utf8').replace(/\0.*$/s, '');
    const ver: [number | null] = [null];
    cu('cuDriverGetVersion', drv.cuDriverGetVersion(ver));
    this.driverVersion = ver[0]!;

    const nv = libraries?.nvrtc ?? loadNvrtc();
    this.compiler = new KernelCompiler(nv, this.arch);
    this.blas = libraries?.cublas ?? loadCublas();
    const h: [unknown] = [null];
    checkCublas('cublasCreate', this.blas.cublasCreate(h));
    this.blasHandle = h[0];
    checkCublas('cublasSetStream', this.blas.cublasSetStream(this.blasHandle, NULL_STREAM));
    checkCublas('cublasSetMathMode', this.blas.cublasSetMathMode(this.blasHandle, 0)); // CUBLAS_DEFAULT_MATH: true fp32, no TF32
    this.paths = { driver: drv.path, nvrtc: nv.path, cublas: this.blas.path };

    this.allocator = new CachingAllocator({
      alloc: (bytes) => {
        const p: [number | null] = [null];
        cu('cuMemAlloc', drv.cuMemAlloc(p, bytes));
        return Number(p[0]);
      },
      free: (ptr) => cu('cuMemFree', drv.cuMemFree(ptr)),
      isOutOfMemory: (e) => e instanceof CudaError && e.code === CUDA_ERROR_OUT_OF_MEMORY,
    });
    this.status = this.allocator.alloc(16);
    cu('cuMemsetD8Async', drv.cuMemsetD8Async(this.status.ptr, 0, 16, NULL_STREAM));
  }

  // ---- plumbing -------------------------------------------------------------------------------

  info(): Record<string, unknown> {
    return {
      name: this.name,
      device: this.deviceName,
      arch: `sm_${this.arch}`,
      multiprocessors: this.sms,
      driverVersion: this.driverVersion,
      nvrtcVersion: this.compiler.version,
      libraries: this.paths,
      kernelCache: cacheDir(),
      kernels: { ...this.compiler.stats, modules: this.modules.size, launches: this.launches },
      graphs: { ...this.graphs },
      memory: this.memoryStats(),
    };
  }

  /** Allocator statistics in bytes (in use, cached, peak). */
  memoryStats(): AllocatorStats {
    return this.allocator.stats();
  }
  /** Returns cached blocks to the driver. */
  emptyCache(): void {
    this.synchronize();
    this.allocator.emptyCache();
  }
  resetPeakMemory(): void {
    this.allocator.resetPeak();
  }
  /** Waits for every queued kernel, and reports a device-side index error if one happened. */
  synchronize(): void {
    this.notRecording('synchronize');
    this.cu('cuCtxSynchronize', this.drv.cuCtxSynchronize());
    this.checkStatus();
  }

  /**
   * Compiles (or loads from the disk cache) and loads every kernel module now, instead of on first
   * use; returns each module's outcome, so one call shows every compile error.
   */
  compileAll(): Record<string, string> {
    const out: Record<string, string> = {};
    for (const { key } of allModuleSources()) {
      const [kind, dtype] = key.split('/') as [ModuleKind, CudaDType | undefined];
      const t0 = performance.now();
      try {
        this.loadModule(kind, dtype ?? 'float32');
        out[key] = `ok ${(performance.now() - t0).toFixed(0)} ms`;
      } catch (e) {
        out[key] = `FAILED: ${(e as Error).message}`;
      }
    }
    return out;
  }

  private loadModule(kind: ModuleKind, dtype: CudaDType): LoadedModule {
    const key = kind === 'movement' ? kind : `${kind}/${dtype}`;
    let m = this.modules.get(key);
    if (!m) {
      const cubin = this.compiler.compile(moduleSource(kind, dtype), key);
      const mod: [unknown] = [null];
      this.cu(`cuModuleLoadData(${key})`, this.drv.cuModuleLoadData(mod, cubin));
      m = { module: mod[0], fns: new Map() };
      this.modules.set(key, m);
    }
    return m;
  }

  private alloc(dtype: CudaDType, size: number): DeviceBuffer {
    return this.allocator.alloc(size * BYTES[dtype]);
  }

  private fn(kind: ModuleKind, dtype: CudaDType, name: string): Handle {
    const m = this.loadModule(kind, dtype);
    let f = m.fns.get(name);
    if (!f) {
      const out: [unknown] = [null];
      this.cu(`cuModuleGetFunction(${name})`, this.drv.cuModuleGetFunction(out, m.module, name));
      f = out[0];
      m.fns.set(name, f);
    }
    return f;
  }

  /**
   * What the compiler and the driver say about one kernel (benches and tuning): registers per thread,
   * local (spill) bytes per thread, and how many blocks of `threads` threads with `shared` bytes of
   * dynamic shared memory fit on one SM.
   */
  kernelResources(kind: ModuleKind, dtype: CudaDType, name: string, threads: number, shared: number): { regs: number; localBytes: number; blocksPerSm: number } {
    const f = this.fn(kind, dtype, name);
    if (shared > 48 * 1024) this.drv.cuFuncSetAttribute(f, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, shared);
    const get = (attr: number): number => {
      const v: [number | null] = [null];
      this.cu('cuFuncGetAttribute', this.drv.cuFuncGetAttribute(v, attr, f));
      return v[0]!;
    };
    const blocks: [number | null] = [null];
    this.cu('cuOccupancyMaxActiveBlocksPerMultiprocessor', this.drv.cuOccupancyMaxActiveBlocksPerMultiprocessor(blocks, f, threads, shared));
    return { regs: get(CU_FUNC_ATTRIBUTE_NUM_REGS), localBytes: get(CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES), blocksPerSm: blocks[0]! };
  }

  /** A launch of `blocks` (× `blocksY`) blocks of `threads`. */
  private launch(f: Handle, blocks: number, threads: number, shared: number, a: ArgPacker, what: string, blocksY = 1): void {
    this.launches++;
    const run = () => this.cu(`cuLaunchKernel(${what})`, this.drv.cuLaunchKernel(f, blocks, blocksY, 1, threads, 1, 1, shared, this.stream, a.params(), null));
    if (this.profile) this.timed(what, run);
    else run();
  }

  /**
   * Device time per kernel (and per GEMM shape) when `TTT_CUDA_PROFILE` is set: every op is then
   * synchronised before and after, which is slow, so this is for finding hot spots, not for speed.
   */
  private profile: Map<string, { calls: number; ms: number }> | null = process.env.TTT_CUDA_PROFILE ? new Map() : null;

  private timed(what: string, run: () => void): void {
    if (!this.profile) return run();
    this.synchronize();
    const t0 = performance.now();
    run();
    this.synchronize();
    const e = this.profile.get(what) ?? { calls: 0, ms: 0 };
    e.calls++;
    e.ms += performance.now() - t0;
    this.profile.set(what, e);
  }

  /** Phase marks: an event recorded on the stream at each (none while recording for replay). */
  private phaseEvents: { name: string; event: Handle }[] = [];

  markPhase(name: string): void {
    if (this.recording) return;
    const { cuEventCreate, cuEventRecord } = this.drv;
    if (!cuEventCreate || !cuEventRecord) throw new Error('cuda backend: phase timing needs the driver\'s event API (cuEventCreate, cuEventRecord)');
    const out: unknown[] = [null];
    this.cu('cuEventCreate', cuEventCreate(out, 0));
    this.cu('cuEventRecord', cuEventRecord(out[0], this.stream));
    this.phaseEvents.push({ name, event: out[0] });
  }

  /** Device time between consecutive marks, by phase (waits for the last mark); frees the events. */
  phaseReport(): PhaseTime[] {
    const marks = this.phaseEvents;
    this.phaseEvents = [];
    if (marks.length === 0) return [];
    const { cuEventSynchronize, cuEventElapsedTime, cuEventDestroy } = this.drv;
    if (!cuEventSynchronize || !cuEventElapsedTime || !cuEventDestroy) throw new Error('cuda backend: phase timing needs the driver\'s event API');
    this.cu('cuEventSynchronize', cuEventSynchronize(marks[marks.length - 1].event));
    const gaps: number[] = [];
    const ms = [0];
    for (let i = 0; i + 1 < marks.length; i++) {
      this.cu('cuEventElapsedTime', cuEventElapsedTime(ms, marks[i].event, marks[i + 1].event));
      gaps.push(ms[0]);
    }
    for (const m of marks) this.cu('cuEventDestroy', cuEventDestroy(m.event));
    return sumPhaseSpans(marks.map((m) => m.name), gaps);
  }

  /** The profile since the last reset, largest total first (empty unless TTT_CUDA_PROFILE is set). */
  profileReport(): { what: string; calls: number; ms: number }[] {
    return [...(this.profile ?? new Map<string, { calls: number; ms: number }>()).entries()].map(([what, e]) => ({ what, ...e })).sort((a, b) => b.ms - a.ms);
  }
  resetProfile(): void {
    this.profile?.clear();
  }

  /** Grid size of a grid-stride loop over n items. */
  private blocksFor(n: number, threads = THREADS): number {
    return Math.max(1, Math.min(Math.ceil(n / threads), this.sms * 32));
  }
  /** Grid size of a one-block-per-row kernel. */
  private rowBlocks(rows: number): number {
    return Math.max(1, Math.min(rows, 65535 * 16));
  }

  /**
   * The index struct of strided kernels (rank, coalesced shape, three stride lists), written into
   * one reused array: this runs for every binary op, so it allocates nothing.
   */
  private ix(shape: number[], strides: number[][]): Float64Array {
    const out = this.ixWords;
    out.fill(0);
    const lists = strides.length;
    let r = 0;
    for (let i = 0; i < shape.length; i++) {
      const n = shape[i];
      if (n === 1) continue;
      let merge = r > 0;
      for (let j = 0; merge && j < lists; j++) merge = out[1 + MAX_RANK * (j + 1) + r - 1] === strides[j][i] * n;
      if (merge) {
        out[r] *= n;
        for (let j = 0; j < lists; j++) out[1 + MAX_RANK * (j + 1) + r - 1] = strides[j][i];
      } else {
        if (r === MAX_RANK) throw new Error(`cuda backend: strided kernel over rank > ${MAX_RANK} after coalescing (shape ${shape.join('x')})`);
        out[1 + r] = n;
        for (let j = 0; j < lists; j++) out[1 + MAX_RANK * (j + 1) + r] = strides[j][i];
        r++;
      }
    }
    for (let i = r; i < MAX_RANK; i++) out[1 + i] = 1;
    out[0] = r;
    return out;
  }

  private checkStatus(): void {
    if (!this.statusPending) return;
    this.statusPending = false;
    const s = new Int32Array(4);
    this.cu('cuMemcpyDtoH(status)', this.drv.cuMemcpyDtoH(s, this.status.ptr, 16));
    if (s[0] !== 0) {
      this.cu('cuMemsetD8Async', this.drv.cuMemsetD8Async(this.status.ptr, 0, 16, NULL_STREAM));
      const op = s[0] === 1 ? 'gather' : s[0] === 2 ? 'scatterAdd' : 'tokenNll';
      throw new Error(`${op}: index ${s[1]} out of range [0, ${s[2]}) (cuda: found by the kernel, reported at the next sync point)`);
    }
  }

  // ---- recorded work (CUDA graphs) ----------------------------------------------------------------

  private notRecording(what: string): void {
    if (this.recording) throw new Error(`cuda backend: ${what} is not possible while recording device work for replay (the recorded kernels have not run)`);
  }

  /**
   * Records fn's device work into a CUDA graph by stream capture. The side stream is non-blocking, so
   * uploads on the legacy stream (constants fn makes) land at once instead of breaking the capture;
   * memory fn frees stays with the graph (allocator.holdFrees). Replays go to the legacy stream, in
   * order with everything else.
   */
  captureWork(fn: () => void): { replay(): void; dispose(): void } {
    this.notRecording('recording');
    if (this.profile) throw new Error('cuda backend: recording device work is not possible with TTT_CUDA_PROFILE (it synchronises around every op)');
    this.synchronize();
    const cu = this.cu;
    if (this.captureStream === null) {
      const st: [unknown] = [null];
      cu('cuStreamCreate', this.drv.cuStreamCreate(st, CU_STREAM_NON_BLOCKING));
      this.captureStream = st[0];
    }
    this.captureWorkspace ??= this.allocator.alloc(CAPTURE_WORKSPACE_BYTES);
    // cublasSetStream resets the workspace to cuBLAS's own, so the workspace is set after it
    checkCublas('cublasSetStream', this.blas.cublasSetStream(this.blasHandle, this.captureStream));
    checkCublas('cublasSetWorkspace', this.blas.cublasSetWorkspace(this.blasHandle, this.captureWorkspace.ptr, CAPTURE_WORKSPACE_BYTES));
    this.stream = this.captureStream;
    this.recording = true;
    this.allocator.holdFrees();
    const graph: [unknown] = [null];
    let failure: unknown = null;
    try {
      cu('cuStreamBeginCapture', this.drv.cuStreamBeginCapture(this.captureStream, CU_STREAM_CAPTURE_MODE_RELAXED));
      try {
        fn();
      } catch (e) {
        failure = e;
      }
      // always ended, so a failed recording leaves the stream usable
      const ended = this.drv.cuStreamEndCapture(this.captureStream, graph) as number;
      if (failure === null) cu('cuStreamEndCapture', ended);
    } finally {
      this.recording = false;
      this.stream = NULL_STREAM;
      checkCublas('cublasSetStream', this.blas.cublasSetStream(this.blasHandle, NULL_STREAM));
    }
    let held = this.allocator.endHold();
    if (failure !== null) {
      if (graph[0]) this.drv.cuGraphDestroy(graph[0]);
      this.allocator.release(held);
      throw failure;
    }
    const exec: [unknown] = [null];
    try {
      cu('cuGraphInstantiate', this.drv.cuGraphInstantiate(exec, graph[0], 0));
    } finally {
      cu('cuGraphDestroy', this.drv.cuGraphDestroy(graph[0]));
    }
    this.graphs.recorded++;
    let live = true;
    return {
      replay: () => {
        if (!live) throw new Error('cuda backend: a recorded graph was replayed after dispose()');
        this.notRecording('replaying a recording');
        this.graphs.replays++;
        cu('cuGraphLaunch', this.drv.cuGraphLaunch(exec[0], NULL_STREAM));
        this.statusPending = true; // its gathers report bad indices like any other
      },
      dispose: () => {
        if (!live) return;
        live = false;
        // the held blocks may be reused once the last replay has run
        this.synchronize();
        cu('cuGraphExecDestroy', this.drv.cuGraphExecDestroy(exec[0]));
        this.allocator.release(held);
        held = [];
      },
    };
  }

  // ---- memory -----------------------------------------------------------------------------------

  upload(values: HostArray, dtype: DType): DeviceBuffer {
    const dt = dtype;
    const n = values.length;
    const out = this.alloc(dt, n);
    if (n === 0) return out;
    let host: HostArray | Uint16Array = values;
    if (dt === 'bfloat16') host = toBfloat16Bits(values);
    else if (host.constructor !== hostArray(dt, 0).constructor) {
      host = hostArray(dt, n);
      host.set(values as ArrayLike<number>);
    }
    this.cu('cuMemcpyHtoDAsync', this.drv.cuMemcpyHtoDAsync(out.ptr, host, n * BYTES[dt], NULL_STREAM));
    if (dt === 'int32') {
      let lo = Infinity;
      let hi = -Infinity;
      for (let i = 0; i < n; i++) {
        const v = host[i];
        if (v < lo) lo = v;
        if (v > hi) hi = v;
      }
      out.range = [lo, hi];
    }
    return out;
  }

  download(data: unknown, dtype: DType, size: number): HostArray {
    this.notRecording('reading a tensor back');
    const dt = dtype;
    if (dt === 'bfloat16') {
      const bits = new Uint16Array(size);
      if (size > 0) this.cu('cuMemcpyDtoH', this.drv.cuMemcpyDtoH(bits, buf(data).ptr, size * 2));
      this.checkStatus();
      return fromBfloat16Bits(bits);
    }
    const out = hostArray(dt, size);
    if (size > 0) this.cu('cuMemcpyDtoH', this.drv.cuMemcpyDtoH(out, buf(data).ptr, size * BYTES[dt]));
    this.checkStatus();
    return out;
  }

  free(data: unknown): void {
    this.allocator.free(buf(data));
  }

  empty(size: number, dtype: DType): DeviceBuffer {
    return this.alloc(dtype, size);
  }

  fill(size: number, dtype: DType, value: number): DeviceBuffer {
    const out = this.alloc(dtype, size);
    if (size === 0 || !this.recording) return this.fillWith(out, size, dtype, value);
    // a constant made while recording is filled now, on the legacy stream, like an upload: cached
    // scalars made here are also read outside the graph, before any replay could have filled them
    this.stream = NULL_STREAM;
    try {
      return this.fillWith(out, size, dtype, value);
    } finally {
      this.stream = this.captureStream;
    }
  }

  private fillWith(out: DeviceBuffer, size: number, dtype: DType, value: number): DeviceBuffer {
    const dt = dtype;
    if (size === 0) return out;
    if (dt === 'bool' || (value === 0 && !Object.is(value, -0))) {
      const byte = dt === 'bool' ? (value !== 0 ? 1 : 0) : 0;
      this.cu('cuMemsetD8Async', this.drv.cuMemsetD8Async(out.ptr, byte, size * BYTES[dt], this.stream));
    } else if (dt === 'float32' || dt === 'int32') {
      const bits = new Uint32Array(dt === 'float32' ? new Float32Array([value]).buffer : new Int32Array([value]).buffer)[0];
      this.cu('cuMemsetD32Async', this.drv.cuMemsetD32Async(out.ptr, bits, size, this.stream));
    } else {
      const a = this.args.reset().ptr(out.ptr).f64(value).i64(size);
      this.launch(this.fn('indexing', dt, FILL), this.blocksFor(size), THREADS, 0, a, FILL);
    }
    return out;
  }

  // ---- elementwise --------------------------------------------------------------------------------

  unary(op: UnaryOp, x: unknown, size: number, dtype: DType): DeviceBuffer {
    const dt = dtype;
    if (!CUDA_FLOATS.has(dt) && !INT_UNARY.has(op)) throw new Error(`cuda backend: ${op} is not defined for ${dt}`);
    const out = this.alloc(dt, size);
    if (size === 0) return out;
    const a = this.args.reset().ptr(out.ptr).ptr(buf(x).ptr).i64(size);
    const vw = vecWidth(dt);
    const vec = CUDA_FLOATS.has(dt) && size >= vw && this.aligned16(x);
    const name = vec ? unaryVecName(op) : unaryName(op);
    this.launch(this.fn('elementwise', dt, name), this.blocksFor(vec ? Math.ceil(size / vw) : size), THREADS, 0, a, name);
    return out;
  }

  /** Whether every buffer starts on a 16-byte boundary (the vector kernels' loads). */
  private aligned16(...xs: unknown[]): boolean {
    return xs.every((x) => buf(x).ptr % 16 === 0);
  }

  binary(op: BinaryOp, a: unknown, sa: number[], b: unknown, sb: number[], shape: number[], dtype: DType): DeviceBuffer {
    const out = this.alloc(dtype, sizeOf(shape));
    return sizeOf(shape) === 0 ? out : this.binaryTo(out, op, a, sa, b, sb, shape, dtype);
  }

  /** The binary kernels into `out` (which may be `a` itself: each element is read before it is written, by its own thread). */
  private binaryTo(out: DeviceBuffer, op: BinaryOp, a: unknown, sa: number[], b: unknown, sb: number[], shape: number[], dtype: DType): DeviceBuffer {
    const dt = dtype;
    const n = sizeOf(shape);
    const ix = this.ix(shape, [sa, sb]);
    if (ix[0] <= 1) {
      // rank 0 or 1: strides are ix[1 + MAX_RANK] and ix[1 + 2 * MAX_RANK] (0 for rank 0: a single element)
      const [strideA, strideB] = [ix[1 + MAX_RANK], ix[1 + 2 * MAX_RANK]];
      const vw = vecWidth(dt);
      // 16-byte vectors where the element-wise sides (stride 1) are aligned, for floats (int32 keeps Math.imul's kernel)
      const vec = CUDA_FLOATS.has(dt) && n >= vw && strideA + strideB > 0 && (strideA === 0 || this.aligned16(a)) && (strideB === 0 || this.aligned16(b));
      const name = vec ? binaryVecName(op) : binaryFlatName(op);
      const args = this.args.reset().ptr(out.ptr).ptr(buf(a).ptr).i64(strideA).ptr(buf(b).ptr).i64(strideB).i64(n);
      this.launch(this.fn('elementwise', dt, name), this.blocksFor(vec ? Math.ceil(n / vw) : n), THREADS, 0, args, name);
      return out;
    }
    const args = this.args.reset().ptr(out.ptr).ptr(buf(a).ptr).ptr(buf(b).ptr).i64s(ix).i64(n);
    this.launch(this.fn('elementwise', dt, binaryName(op)), this.blocksFor(n), THREADS, 0, args, binaryName(op));
    return out;
  }

  addInto(dst: unknown, src: unknown, size: number, dtype: DType, srcDType: DType = dtype): void {
    if (size === 0) return;
    if (srcDType === dtype) {
      this.binaryTo(buf(dst), 'add', dst, [1], src, [1], [size], dtype);
      return;
    }
    if (!CUDA_FLOATS.has(dtype) || !CUDA_FLOATS.has(srcDType)) throw new Error(`cuda backend: addInto of ${srcDType} into ${dtype}`);
    const name = castAddName(srcDType, dtype);
    this.launch(this.fn('movement', srcDType, name), this.blocksFor(size), THREADS, 0, this.args.reset().ptr(buf(dst).ptr).ptr(buf(src).ptr).i64(size), name);
  }

  compare(op: CompareOp, a: unknown, sa: number[], b: unknown, sb: number[], shape: number[], dtype: DType): DeviceBuffer {
    const dt = dtype;
    const n = sizeOf(shape);
    const out = this.alloc('bool', n);
    if (n === 0) return out;
    const args = this.args.reset().ptr(out.ptr).ptr(buf(a).ptr).ptr(buf(b).ptr).i64s(this.ix(shape, [sa, sb])).i64(n);
    this.launch(this.fn('elementwise', dt, compareName(op)), this.blocksFor(n), THREADS, 0, args, compareName(op));
    return out;
  }

  where(c: unknown, sc: number[], a: unknown, sa: number[], b: unknown, sb: number[], shape: number[], dtype: DType): DeviceBuffer {
    const dt = dtype;
    const n = sizeOf(shape);
    const out = this.alloc(dt, n);
    if (n === 0) return out;
    const args = this.args.reset().ptr(out.ptr).ptr(buf(c).ptr).ptr(buf(a).ptr).ptr(buf(b).ptr).i64s(this.ix(shape, [sc, sa, sb])).i64(n);
    this.launch(this.fn('elementwise', dt, WHERE), this.blocksFor(n), THREADS, 0, args, WHERE);
    return out;
  }

  addcmul(a: unknown, sa: number[], b: unknown, sb: number[], c: unknown, sc: number[], shape: number[], dtype: DType): DeviceBuffer {
    const dt = dtype;
    if (!CUDA_FLOATS.has(dt)) throw new Error(`cuda backend: addcmul needs a float dtype, got ${dt}`);
    const n = sizeOf(shape);
    const out = this.alloc(dt, n);
    if (n === 0) return out;
    const ix = this.ix(shape, [sa, sb, sc]);
    const inner = this.rowsOf(ix);
    if (inner !== null && inner % vecWidth(dt) === 0 && this.aligned16(a, b)) {
      // a, b contiguous and one c per row of `inner` (the TTT update w − lr·clip·g, a factor per sequence)
      const args = this.args.reset().ptr(out.ptr).ptr(buf(a).ptr).ptr(buf(b).ptr).ptr(buf(c).ptr).i64(inner).i64(n);
      this.launch(this.fn('elementwise', dt, ADDCMUL_ROWS_VEC), this.blocksFor(n / vecWidth(dt)), THREADS, 0, args, ADDCMUL_ROWS_VEC);
      return out;
    }
    const args = this.args.reset().ptr(out.ptr).ptr(buf(a).ptr).ptr(buf(b).ptr).ptr(buf(c).ptr).i64s(ix).i64(n);
    this.launch(this.fn('elementwise', dt, ADDCMUL), this.blocksFor(n), THREADS, 0, args, ADDCMUL);
    return out;
  }

  /**
   * For coalesced index data of three inputs (this.ix): the row length when the first two are contiguous and the third
   * holds one value per row (rank 1 with the third a scalar, or rank 2 with strides [inner, 1], [inner, 1], [1, 0]), else null.
   */
  private rowsOf(ix: Float64Array): number | null {
    const rank = ix[0];
    const st = (input: number, dim: number) => ix[1 + (input + 1) * MAX_RANK + dim];
    if (rank === 1) return st(0, 0) === 1 && st(1, 0) === 1 && st(2, 0) === 0 ? ix[1] : null;
    if (rank !== 2) return null;
    const inner = ix[2];
    return st(0, 0) === inner && st(0, 1) === 1 && st(1, 0) === inner && st(1, 1) === 1 && st(2, 0) === 1 && st(2, 1) === 0 ? inner : null;
  }

  // ---- reductions ---------------------------------------------------------------------------------

  reduce(op: ReduceOp, x: unknown, outer: number, n: number, inner: number, dtype: DType): DeviceBuffer {
    const dt = dtype;
    const total = outer * inner;
    const out = this.alloc(dt, total);
    if (total === 0) return out;
    const busy = 4 * this.sms; // blocks that keep every SM occupied
    if (inner === 1 && n <= 256) {
      const rowsPerBlock = THREADS / 32;
      const a = this.args.reset().ptr(out.ptr).ptr(buf(x).ptr).i64(outer).i64(n);
      this.launch(this.fn('reduce', dt, reduceRowsWarpName(op)), Math.ceil(outer / rowsPerBlock), THREADS, 0, a, reduceRowsWarpName(op));
    } else if (inner === 1 && (outer >= busy || n < 8192)) {
      const a = this.args.reset().ptr(out.ptr).ptr(buf(x).ptr).i64(outer).i64(n);
      this.launch(this.fn('reduce', dt, reduceRowsName(op)), this.rowBlocks(outer), THREADS, 0, a, reduceRowsName(op));
    } else if (inner > 1 && n <= 64) {
      const a = this.args.reset().ptr(out.ptr).ptr(buf(x).ptr).i64(outer).i64(n).i64(inner);
      this.launch(this.fn('reduce', dt, reduceColsName(op)), this.blocksFor(total), THREADS, 0, a, reduceColsName(op));
    } else {
      // Split along n into chunks so that enough blocks run, then combine the partials in order.
      const { outputBlocks, chunks, len } = this.splitPlan(outer, n, inner);
      const ws = this.allocator.alloc(chunks * total * 8);
      const name = inner === 1 ? reduceRowsPartialName(op) : reduceColsPartialName(op);
      const a = this.args.reset().ptr(ws.ptr).ptr(buf(x).ptr).i64(outer).i64(n);
      if (inner > 1) a.i64(inner);
      a.i64(chunks).i64(len);
      this.launch(this.fn('reduce', dt, name), Math.min(outputBlocks * chunks, 65535 * 16), THREADS, 0, a, name);
      this.combinePartials(op, out, ws, total, chunks, dt);
    }
    return out;
  }

  /** How the split reduction of [outer, n, inner] along n divides the work: chunks of len rows, outputBlocks blocks per chunk. */
  private splitPlan(outer: number, n: number, inner: number): { outputBlocks: number; chunks: number; len: number } {
    const busy = 4 * this.sms; // blocks that keep every SM occupied
    const outputBlocks = inner === 1 ? outer : outer * Math.ceil(inner / COL_TILE);
    const minLen = inner === 1 ? 4096 : 256;
    const chunks = Math.max(1, Math.min(Math.ceil(n / minLen), Math.ceil(busy / outputBlocks)));
    return { outputBlocks, chunks, len: Math.ceil(n / chunks) };
  }

  /** The split reduction's last step: `total` outputs of `dt` from the chunks' partials in ws (double), in chunk order; frees ws. */
  private combinePartials(op: ReduceOp, out: DeviceBuffer, ws: DeviceBuffer, total: number, chunks: number, dt: DType): void {
    const f = this.args.reset().ptr(out.ptr).ptr(ws.ptr).i64(total).i64(chunks);
    // many partials per output (a whole tensor's sum: hundreds of chunks): a warp per output, not one thread
    const warpPerOutput = chunks >= 32;
    const final = warpPerOutput ? reduceFinalWarpName(op) : reduceFinalName(op);
    const blocks = warpPerOutput ? Math.ceil(total / (THREADS / 32)) : this.blocksFor(total);
    this.launch(this.fn('reduce', dt, final), blocks, THREADS, 0, f, final);
    this.allocator.free(ws); // stream-ordered: a later reuse runs after these kernels
  }

  private rowKernel(name: string, x: unknown, outer: number, n: number, outSize: number, dtype: DType): DeviceBuffer {
    const dt = dtype;
    if (!CUDA_FLOATS.has(dt)) throw new Error(`cuda backend: ${name} needs a float dtype, got ${dt}`);
    const out = this.alloc(dt, outSize);
    if (outSize === 0 || n === 0) return out;
    const a = this.args.reset().ptr(out.ptr).ptr(buf(x).ptr).i64(outer).i64(n);
    this.launch(this.fn('reduce', dt, name), this.rowBlocks(outer), THREADS, 0, a, name);
    return out;
  }

  /**
   * Whether the kernels added since the last GPU run (`softmax_bias_rows`, `rmsnorm_dw_partial`) are used; off
   * (`TTT_CUDA_NEW_KERNELS=0`), softmax adds its bias first and RMSNorm's dw sums written products, as before them.
   */
  newKernels = process.env.TTT_CUDA_NEW_KERNELS !== '0';

  softmax(x: unknown, outer: number, n: number, dtype: DType, bias?: { data: unknown; rows: number }): DeviceBuffer {
    if (!bias) return this.rowKernel(SOFTMAX, x, outer, n, outer * n, dtype);
    if (!this.newKernels) {
      const r = bias.rows;
      const biased = this.binary('add', x, [r * n, n, 1], bias.data, [0, n, 1], [outer / r, r, n], dtype);
      const out = this.rowKernel(SOFTMAX, biased, outer, n, outer * n, dtype);
      this.allocator.free(biased);
      return out;
    }
    if (!CUDA_FLOATS.has(dtype)) throw new Error(`cuda backend: softmax needs a float dtype, got ${dtype}`);
    const out = this.alloc(dtype, outer * n);
    if (outer * n === 0) return out;
    const a = this.args.reset().ptr(out.ptr).ptr(buf(x).ptr).ptr(buf(bias.data).ptr).i64(outer).i64(n).i64(bias.rows);
    this.launch(this.fn('reduce', dtype, SOFTMAX_BIAS), this.rowBlocks(outer), THREADS, 0, a, SOFTMAX_BIAS);
    return out;
  }

  /** Whether softmax's backward takes the row kernels below (see Backend.softmaxGradKernel): off until they have run on a GPU, as rmsNormGradKernel. */
  softmaxGradKernel = process.env.TTT_CUDA_GRAD_KERNELS === '1';

  softmaxBackward(y: unknown, g: unknown, outer: number, n: number, dtype: DType): DeviceBuffer {
    const dt = dtype;
    if (!CUDA_FLOATS.has(dt)) throw new Error(`cuda backend: softmax needs a float dtype, got ${dt}`);
    const dx = this.alloc(dt, outer * n);
    if (outer * n === 0) return dx;
    const a = this.args.reset().ptr(dx.ptr).ptr(buf(y).ptr).ptr(buf(g).ptr).i64(outer).i64(n);
    this.launch(this.fn('reduce', dt, SOFTMAX_BWD), this.rowBlocks(outer), THREADS, 0, a, SOFTMAX_BWD);
    return dx;
  }

  softmaxGradBackward(y: unknown, g: unknown, u: unknown, outer: number, n: number, dtype: DType): { dy: DeviceBuffer; dg: DeviceBuffer } {
    const dt = dtype;
    if (!CUDA_FLOATS.has(dt)) throw new Error(`cuda backend: softmax needs a float dtype, got ${dt}`);
    const dy = this.alloc(dt, outer * n);
    const dg = this.alloc(dt, outer * n);
    if (outer * n === 0) return { dy, dg };
    const a = this.args.reset().ptr(dy.ptr).ptr(dg.ptr).ptr(buf(y).ptr).ptr(buf(g).ptr).ptr(buf(u).ptr).i64(outer).i64(n);
    this.launch(this.fn('reduce', dt, SOFTMAX_GRAD_BWD), this.rowBlocks(outer), THREADS, 0, a, SOFTMAX_GRAD_BWD);
    return { dy, dg };
  }

  logsumexp(x: unknown, outer: number, n: number, dtype: DType): DeviceBuffer {
    const chunks = Math.min(Math.ceil(n / LSE_MIN_CHUNK), Math.ceil((2 * this.sms) / Math.max(outer, 1)));
    if (chunks < 2 || !CUDA_FLOATS.has(dtype)) return this.rowKernel(LOGSUMEXP, x, outer, n, outer, dtype);
    // few long rows (one block per row would leave the GPU idle): chunks on separate blocks, then a merge
    const out = this.alloc(dtype, outer);
    const len = Math.ceil(n / chunks);
    const ws = this.allocator.alloc(outer * chunks * 2 * 8);
    const a = this.args.reset().ptr(ws.ptr).ptr(buf(x).ptr).i64(outer).i64(n).i64(chunks).i64(len);
    this.launch(this.fn('reduce', dtype, LSE_PARTIAL), Math.min(outer * chunks, 65535 * 16), THREADS, 0, a, LSE_PARTIAL);
    const f = this.args.reset().ptr(out.ptr).ptr(ws.ptr).i64(outer).i64(chunks);
    this.launch(this.fn('reduce', dtype, LSE_FINAL), this.blocksFor(outer), THREADS, 0, f, LSE_FINAL);
    this.allocator.free(ws); // stream-ordered
    return out;
  }

  cumsum(x: unknown, outer: number, n: number, inner: number, reverse: boolean, dtype: DType): DeviceBuffer {
    const dt = dtype;
    const size = outer * n * inner;
    const out = this.alloc(dt, size);
    if (size === 0) return out;
    const a = this.args.reset().ptr(out.ptr).ptr(buf(x).ptr).i64(outer).i64(n).i64(inner).i32(reverse ? 1 : 0);
    this.launch(this.fn('reduce', dt, CUMSUM), this.blocksFor(outer * inner), THREADS, 0, a, CUMSUM);
    return out;
  }

  // ---- token NLL ----------------------------------------------------------------------------------

  tokenNllForward(logits: unknown, targets: unknown, rows: number, V: number, dtype: DType): { nll: DeviceBuffer; lse: DeviceBuffer } {
    const dt = dtype;
    if (!CUDA_FLOATS.has(dt)) throw new Error(`cuda backend: tokenNll needs float logits, got ${dt}`);
    this.checkHostRange('tokenNll', targets, V, rows);
    const nll = this.alloc(statDType(dt), rows);
    const lse = this.alloc(statDType(dt), rows);
    if (rows === 0) return { nll, lse };
    const a = this.args.reset().ptr(nll.ptr).ptr(lse.ptr).ptr(buf(logits).ptr).ptr(buf(targets).ptr).ptr(this.status.ptr).i64(rows).i64(V);
    a.i32(this.nllRowsAligned(logits, V, dt));
    this.launch(this.fn('reduce', dt, NLL_FWD), this.rowBlocks(rows), THREADS, 0, a, NLL_FWD);
    this.statusPending = true;
    return { nll, lse };
  }

  tokenNllBackward(logits: unknown, targets: unknown, lse: unknown, g: unknown, rows: number, V: number, dtype: DType, accumulate?: unknown): DeviceBuffer {
    const dt = dtype;
    if (!CUDA_FLOATS.has(dt)) throw new Error(`cuda backend: tokenNll needs float logits, got ${dt}`);
    const dx = accumulate === undefined ? this.alloc(dt, rows * V) : buf(accumulate);
    if (rows * V === 0) return dx;
    const a = this.args.reset().ptr(dx.ptr).ptr(buf(logits).ptr).ptr(buf(targets).ptr).ptr(buf(lse).ptr).ptr(buf(g).ptr).i64(rows).i64(V);
    const vec = this.nllRowsAligned(logits, V, dt) & this.nllRowsAligned(dx, V, dt);
    a.i32(vec);
    // blocks along a row (each thread one 16-byte vector, or one element) × rows
    const perRow = Math.ceil(V / (vec ? vecWidth(dt) : 1) / THREADS);
    const name = accumulate === undefined ? NLL_BWD : NLL_BWD_ACC;
    this.launch(this.fn('reduce', dt, name), Math.max(1, Math.min(perRow, 1024)), THREADS, 0, a, name, Math.min(rows, 65535));
    return dx;
  }

  /** 1 when every row of [rows, V] logits at this buffer starts 16-byte aligned (the NLL kernels' vector loads). */
  private nllRowsAligned(x: unknown, V: number, dt: DType): number {
    return this.aligned16(x) && (V * BYTES[dt]) % 16 === 0 ? 1 : 0;
  }

  tokenNllGradBackward(
    logits: unknown, targets: unknown, lse: unknown, g: unknown, u: unknown, rows: number, V: number, dtype: DType, accumulate?: unknown,
  ): { dLogits: DeviceBuffer; dG: DeviceBuffer } {
    const dt = dtype;
    if (!CUDA_FLOATS.has(dt)) throw new Error(`cuda backend: tokenNll needs float logits, got ${dt}`);
    const dLogits = accumulate === undefined ? this.alloc(dt, rows * V) : buf(accumulate);
    const dG = this.alloc(statDType(dt), rows);
    if (rows === 0) return { dLogits, dG };
    const a = this.args.reset().ptr(dLogits.ptr).ptr(dG.ptr).ptr(buf(logits).ptr).ptr(buf(targets).ptr).ptr(buf(lse).ptr).ptr(buf(g).ptr).ptr(buf(u).ptr).i64(rows).i64(V);
    const name = accumulate === undefined ? NLL_HVP : NLL_HVP_ACC;
    this.launch(this.fn('reduce', dt, name), this.rowBlocks(rows), THREADS, 0, a, name);
    return { dLogits, dG };
  }

  // ---- SwiGLU gate --------------------------------------------------------------------------------

  swigluForward(a: unknown, b: unknown, size: number, dtype: DType): DeviceBuffer {
    const dt = dtype;
    if (!CUDA_FLOATS.has(dt)) throw new Error(`cuda backend: swigluGate needs a float dtype, got ${dt}`);
    const y = this.alloc(dt, size);
    if (size === 0) return y;
    const args = this.args.reset().ptr(y.ptr).ptr(buf(a).ptr).ptr(buf(b).ptr).i64(size);
    this.launch(this.fn('elementwise', dt, SWIGLU_FWD), this.blocksFor(size), THREADS, 0, args, SWIGLU_FWD);
    return y;
  }

  swigluBackward(a: unknown, b: unknown, g: unknown, size: number, dtype: DType): { da: DeviceBuffer; db: DeviceBuffer } {
    const dt = dtype;
    if (!CUDA_FLOATS.has(dt)) throw new Error(`cuda backend: swigluGate needs a float dtype, got ${dt}`);
    const [da, db] = [this.alloc(dt, size), this.alloc(dt, size)];
    if (size === 0) return { da, db };
    const args = this.args.reset().ptr(da.ptr).ptr(db.ptr).ptr(buf(a).ptr).ptr(buf(b).ptr).ptr(buf(g).ptr).i64(size);
    this.launch(this.fn('elementwise', dt, SWIGLU_BWD), this.blocksFor(size), THREADS, 0, args, SWIGLU_BWD);
    return { da, db };
  }

  /** Whether the engine records the SwiGLU gate's backward as one op in a second-order trace: see rmsNormGradKernel. */
  swigluGradKernel = process.env.TTT_CUDA_GRAD_KERNELS === '1';

  swigluGradBackward(
    a: unknown, b: unknown, g: unknown, ca: unknown, cb: unknown, size: number, dtype: DType,
  ): { da: DeviceBuffer; db: DeviceBuffer; dg: DeviceBuffer } {
    const dt = dtype;
    if (!CUDA_FLOATS.has(dt)) throw new Error(`cuda backend: swigluGate needs a float dtype, got ${dt}`);
    const [da, db, dg] = [this.alloc(dt, size), this.alloc(dt, size), this.alloc(dt, size)];
    if (size === 0) return { da, db, dg };
    const args = this.args.reset().ptr(da.ptr).ptr(db.ptr).ptr(dg.ptr).ptr(buf(a).ptr).ptr(buf(b).ptr).ptr(buf(g).ptr).ptr(buf(ca).ptr).ptr(buf(cb).ptr).i64(size);
    this.launch(this.fn('elementwise', dt, SWIGLU_GRAD_BWD), this.blocksFor(size), THREADS, 0, args, SWIGLU_GRAD_BWD);
    return { da, db, dg };
  }

  // ---- RoPE ---------------------------------------------------------------------------------------

  rope(x: unknown, cos: unknown, sin: unknown, outer: number, T: number, H: number, D: number, inverse: boolean, dtype: DType, layout: RopeLayout = 'same'): DeviceBuffer {
    const dt = dtype;
    if (!CUDA_FLOATS.has(dt)) throw new Error(`cuda backend: rope needs a float dtype, got ${dt}`);
    const pairs = (outer * T * H * D) / 2;
    const out = this.alloc(dt, 2 * pairs);
    if (pairs === 0) return out;
    const a = this.args.reset().ptr(out.ptr).ptr(buf(x).ptr).ptr(buf(cos).ptr).ptr(buf(sin).ptr).i64(pairs).i64(T).i64(H).i64(D / 2).i32(inverse ? 1 : 0);
    a.i32(ROPE_LAYOUTS.indexOf(layout));
    this.launch(this.fn('elementwise', dt, ROPE), this.blocksFor(pairs), THREADS, 0, a, ROPE);
    return out;
  }

  // ---- AdamW --------------------------------------------------------------------------------------

  adamw(p: unknown, g: unknown, m: unknown, v: unknown, size: number, h: AdamWHyper, dtype: DType): { p: DeviceBuffer; m: DeviceBuffer; v: DeviceBuffer } {
    const dt = dtype;
    if (dt !== 'float32' && dt !== 'float64') throw new Error(`cuda backend: adamw needs float32 or float64, got ${dt}`);
    const [po, mo, vo] = [this.alloc(dt, size), this.alloc(dt, size), this.alloc(dt, size)];
    if (size === 0) return { p: po, m: mo, v: vo };
    const a = this.args.reset().ptr(buf(p).ptr).ptr(buf(g).ptr).ptr(buf(m).ptr).ptr(buf(v).ptr).ptr(po.ptr).ptr(mo.ptr).ptr(vo.ptr).i64(size);
    a.f64(h.beta1).f64(h.oneMinusBeta1).f64(h.beta2).f64(h.oneMinusBeta2).f64(h.c1).f64(h.c2).f64(h.eps).f64(h.lr).f64(h.shrink).i32(h.decay ? 1 : 0);
    this.launch(this.fn('elementwise', dt, ADAMW), this.blocksFor(size), THREADS, 0, a, ADAMW);
    return { p: po, m: mo, v: vo };
  }

  /**
   * Every parameter's step in one launch: a table of ADAMW_ENTRY_WORDS 64-bit words per parameter (its seven
   * pointers, size, first block, decay) goes to the device ahead of the kernel, as the batched GEMM's pointer arrays do.
   */
  adamwAll(params: AdamWEntry[], h: AdamWHyper, dtype: DType): { p: DeviceBuffer; m: DeviceBuffer; v: DeviceBuffer }[] {
    const dt = dtype;
    if (dt !== 'float32' && dt !== 'float64') throw new Error(`cuda backend: adamw needs float32 or float64, got ${dt}`);
    const out = params.map((e) => ({ p: this.alloc(dt, e.size), m: this.alloc(dt, e.size), v: this.alloc(dt, e.size) }));
    const live = params.map((e, i) => ({ e, o: out[i] })).filter(({ e }) => e.size > 0);
    if (live.length === 0) return out;
    const words = new Uint32Array(2 * ADAMW_ENTRY_WORDS * live.length);
    const put = (slot: number, value: number) => {
      words[2 * slot] = value % 2 ** 32;
      words[2 * slot + 1] = Math.floor(value / 2 ** 32);
    };
    let blocks = 0;
    live.forEach(({ e, o }, i) => {
      const at = i * ADAMW_ENTRY_WORDS;
      [buf(e.p).ptr, buf(e.g).ptr, buf(e.m).ptr, buf(e.v).ptr, o.p.ptr, o.m.ptr, o.v.ptr, e.size, blocks, e.decay ? 1 : 0].forEach((w, j) => put(at + j, w));
      blocks += Math.ceil(e.size / ADAMW_PER_BLOCK);
    });
    const table = this.allocator.alloc(words.byteLength);
    this.cu('cuMemcpyHtoDAsync', this.drv.cuMemcpyHtoDAsync(table.ptr, words, words.byteLength, NULL_STREAM));
    const a = this.args.reset().ptr(table.ptr).i64(live.length);
    a.f64(h.beta1).f64(h.oneMinusBeta1).f64(h.beta2).f64(h.oneMinusBeta2).f64(h.c1).f64(h.c2).f64(h.eps).f64(h.lr).f64(h.shrink);
    this.launch(this.fn('elementwise', dt, ADAMW_ALL), blocks, THREADS, 0, a, ADAMW_ALL);
    this.allocator.free(table); // stream-ordered: reuse comes after the kernel
    return out;
  }

  // ---- RMSNorm ------------------------------------------------------------------------------------

  rmsNormForward(x: unknown, w: unknown, rows: number, d: number, eps: number, dtype: DType): { y: DeviceBuffer; rstd: DeviceBuffer } {
    const dt = dtype;
    if (!CUDA_FLOATS.has(dt)) throw new Error(`cuda backend: rmsNorm needs a float dtype, got ${dt}`);
    const y = this.alloc(dt, rows * d);
    const rstd = this.alloc(statDType(dt), rows);
    if (rows === 0) return { y, rstd };
    const a = this.args.reset().ptr(buf(x).ptr).ptr(buf(w).ptr).ptr(y.ptr).ptr(rstd.ptr).i64(rows).i64(d).f64(eps);
    this.launchRmsNorm(dt, d, rows, [x, w], a, RMSNORM_FWD, RMSNORM_FWD_VEC);
    return { y, rstd };
  }

  /**
   * An RMSNorm kernel over `rows` rows of d: the 16-byte-vector form where the rows are whole vectors and the
   * buffers aligned (with its lanes per row appended to the arguments), else the element-wise one (a warp per row).
   */
  private launchRmsNorm(dt: CudaDType, d: number, rows: number, bufs: unknown[], a: ArgPacker, plain: string, vec: string): void {
    if (!rmsNormVectorizable(dt, d) || !this.aligned16(...bufs)) {
      this.launch(this.fn('reduce', dt, plain), Math.ceil(rows / RMSNORM_ROWS), 32 * RMSNORM_ROWS, 0, a, plain);
      return;
    }
    const lanes = rmsNormLanes(dt, d);
    a.i32(lanes);
    this.launch(this.fn('reduce', dt, vec), Math.ceil(rows / ((RMSNORM_ROWS * 32) / lanes)), 32 * RMSNORM_ROWS, 0, a, vec);
  }

  rmsNormBackward(
    x: unknown, w: unknown, rstd: unknown, dy: unknown, rows: number, d: number, dtype: DType, wantDw: boolean,
  ): { dx: DeviceBuffer; dw: DeviceBuffer | null } {
    const dt = dtype;
    if (!CUDA_FLOATS.has(dt)) throw new Error(`cuda backend: rmsNorm needs a float dtype, got ${dt}`);
    const acc: DType = statDType(dt);
    const dx = this.alloc(dt, rows * d);
    if (rows === 0) return { dx, dw: wantDw ? this.fill(d, dt, 0) : null };
    // dw = Σ_rows dy·x·rstd. Over few rows, the kernel writes those products (gxr) for a column sum; over more, the
    // split reduction's partials come from dy and x themselves (no [rows, d] float buffer written and read back),
    // the same terms in the same order, so the same bits
    const gxr = wantDw && (rows <= 64 || !this.newKernels) ? this.alloc(acc, rows * d) : null;
    const a = this.args.reset().ptr(buf(x).ptr).ptr(buf(w).ptr).ptr(buf(rstd).ptr).ptr(buf(dy).ptr).ptr(dx.ptr).ptr(gxr ? gxr.ptr : 0).i64(rows).i64(d);
    this.launchRmsNorm(dt, d, rows, [x, w, dy], a, RMSNORM_BWD, RMSNORM_BWD_VEC);
    if (!wantDw) return { dx, dw: null };
    return { dx, dw: gxr ? this.columnSum(gxr, rows, d, acc, dt) : this.rmsNormDw(x, dy, rstd, rows, d, dt) };
  }

  /** RMSNorm's dw = Σ_rows dy·x·rstd for rows > 64, as `reduce`'s split column sum of those products would give it. */
  private rmsNormDw(x: unknown, dy: unknown, rstd: unknown, rows: number, d: number, dt: DType): DeviceBuffer {
    const acc: DType = statDType(dt);
    const { outputBlocks, chunks, len } = this.splitPlan(1, rows, d);
    const ws = this.allocator.alloc(chunks * d * 8);
    const a = this.args.reset().ptr(ws.ptr).ptr(buf(x).ptr).ptr(buf(dy).ptr).ptr(buf(rstd).ptr).i64(rows).i64(d).i64(chunks).i64(len);
    this.launch(this.fn('reduce', dt, RMSNORM_DW_PARTIAL), Math.min(outputBlocks * chunks, 65535 * 16), THREADS, 0, a, RMSNORM_DW_PARTIAL);
    const sums = this.alloc(acc, d);
    this.combinePartials('sum', sums, ws, d, chunks, acc);
    return this.sumsIn(sums, d, acc, dt);
  }

  /**
   * Whether the engine records RMSNorm's backward as one op in a second-order trace (its backward the
   * kernel below). Off until the kernel has run on a GPU: `TTT_CUDA_GRAD_KERNELS=1` (or setting this) turns it on.
   */
  rmsNormGradKernel = process.env.TTT_CUDA_GRAD_KERNELS === '1';

  rmsNormGradBackward(
    x: unknown, w: unknown, rstd: unknown, dy: unknown, c: unknown, rows: number, d: number, dtype: DType, wantDw: boolean,
  ): { dx: DeviceBuffer; dw: DeviceBuffer | null; dg: DeviceBuffer } {
    const dt = dtype;
    if (!CUDA_FLOATS.has(dt)) throw new Error(`cuda backend: rmsNorm needs a float dtype, got ${dt}`);
    const acc: DType = statDType(dt);
    const dx = this.alloc(dt, rows * d);
    const dg = this.alloc(dt, rows * d);
    if (rows === 0) return { dx, dg, dw: wantDw ? this.fill(d, dt, 0) : null };
    const gh = wantDw ? this.alloc(acc, rows * d) : null;
    const a = this.args.reset().ptr(buf(x).ptr).ptr(buf(w).ptr).ptr(buf(rstd).ptr).ptr(buf(dy).ptr).ptr(buf(c).ptr)
      .ptr(dx.ptr).ptr(dg.ptr).ptr(gh ? gh.ptr : 0).i64(rows).i64(d);
    this.launch(this.fn('reduce', dt, RMSNORM_GRAD_BWD), Math.ceil(rows / RMSNORM_ROWS), 32 * RMSNORM_ROWS, 0, a, RMSNORM_GRAD_BWD);
    return { dx, dg, dw: gh ? this.columnSum(gh, rows, d, acc, dt) : null };
  }

  /** Column sums of a [rows, d] buffer in `acc` (the deterministic split reduction), freed, as [d] of `dt`. */
  private columnSum(m: DeviceBuffer, rows: number, d: number, acc: DType, dt: DType): DeviceBuffer {
    const sums = this.reduce('sum', m, 1, rows, d, acc);
    this.allocator.free(m);
    return this.sumsIn(sums, d, acc, dt);
  }

  /** d sums kept in `acc`, as a buffer of `dt` (the same one where the dtypes agree; else a cast, the sums freed). */
  private sumsIn(sums: DeviceBuffer, d: number, acc: DType, dt: DType): DeviceBuffer {
    if (acc === dt) return sums;
    const out = this.cast(sums, d, acc, dt);
    this.allocator.free(sums);
    return out;
  }

  // ---- matmul -------------------------------------------------------------------------------------

  /**
   * Row-major C = op(A) op(B) as column-major Cᵀ = op(B)ᵀ op(A)ᵀ: cuBLAS gets B first, and
   * transposes stay flags. Evenly spaced batch offsets (broadcast = stride 0) go to the strided
   * batched call; any other offsets to the pointer-array batched call.
   */
  matmul(a: unknown, b: unknown, job: MatmulJob, dtype: DType, outDType: DType = dtype, accumulate?: unknown): DeviceBuffer {
    const dt = dtype;
    if (!CUDA_FLOATS.has(dt)) throw new Error(`cuda backend: matmul needs a float dtype, got ${dt}`);
    if (outDType !== dt && !(dt === 'bfloat16' && outDType === 'float32')) throw new Error(`cuda backend: matmul of ${dt} cannot write ${outDType}`);
    const { batch, m, n, k, transA, transB, aOffsets, bOffsets } = job;
    const E = BYTES[dt];
    const EC = BYTES[outDType];
    // bf16 operands write bf16 or float32 (CUBLAS_COMPUTE_32F accumulates in float32 either way)
    const CT = outDType === 'float32' ? CUDA_R_32F : CUDA_R_16BF;
    // with `accumulate`, C = op(A) op(B) + C (β = 1) into that buffer
    const c = accumulate === undefined ? this.alloc(outDType, batch * m * n) : buf(accumulate);
    if (batch * m * n === 0) return c;
    if (k === 0) {
      if (accumulate === undefined) this.cu('cuMemsetD8Async', this.drv.cuMemsetD8Async(c.ptr, 0, batch * m * n * EC, this.stream));
      return c;
    }
    const A = buf(a).ptr;
    const B = buf(b).ptr;
    const lda = transA ? m : k;
    const ldb = transB ? k : n;
    const opA = transA ? CUBLAS_OP_T : CUBLAS_OP_N;
    const opB = transB ? CUBLAS_OP_T : CUBLAS_OP_N;
    // bf16 scales by float (CUBLAS_COMPUTE_32F), float32 by float, float64 by double
    const [one, beta] = dt === 'float64' ? [this.one64, accumulate === undefined ? this.zero64 : this.one64] : [this.one32, accumulate === undefined ? this.zero32 : this.one32];
    const sA = evenStride(aOffsets);
    const sB = evenStride(bOffsets);
    const bl = this.blas;
    const h = this.blasHandle;
    if (sA !== null && sB !== null) {
      const A0 = A + aOffsets[0] * E;
      const B0 = B + bOffsets[0] * E;
      this.timed(`gemm ${dt}${outDType === dt ? '' : `→${outDType}`} ${batch}x[${m}x${k}]@[${k}x${n}]`, () => {
        // one product: the plain GemmEx (its heuristics pick faster kernels than a batch of one)
        const status =
          dt !== 'bfloat16'
            ? (dt === 'float32' ? bl.cublasSgemmStridedBatched : bl.cublasDgemmStridedBatched)(h, opB, opA, n, m, k, one, B0, ldb, sB, A0, lda, sA, beta, c.ptr, n, m * n, batch)
            : batch === 1
              ? bl.cublasGemmEx(h, opB, opA, n, m, k, one, B0, CUDA_R_16BF, ldb, A0, CUDA_R_16BF, lda, beta, c.ptr, CT, n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT)
              : bl.cublasGemmStridedBatchedEx(h, opB, opA, n, m, k, one, B0, CUDA_R_16BF, ldb, sB, A0, CUDA_R_16BF, lda, sA, beta, c.ptr, CT, n, m * n, batch, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
        checkCublas(`gemm strided batched (${dt})`, status);
      });
      return c;
    }
    // Arbitrary per-batch offsets: device arrays of pointers, queued like any other copy.
    const words = new Uint32Array(6 * batch);
    const put = (slot: number, address: number) => {
      words[2 * slot] = address % 2 ** 32;
      words[2 * slot + 1] = Math.floor(address / 2 ** 32);
    };
    for (let i = 0; i < batch; i++) {
      put(i, B + bOffsets[i] * E);
      put(batch + i, A + aOffsets[i] * E);
      put(2 * batch + i, c.ptr + i * m * n * EC);
    }
    const dev = this.allocator.alloc(words.byteLength);
    this.cu('cuMemcpyHtoDAsync', this.drv.cuMemcpyHtoDAsync(dev.ptr, words, words.byteLength, NULL_STREAM));
    const [Bs, As, Cs] = [dev.ptr, dev.ptr + batch * 8, dev.ptr + 2 * batch * 8];
    this.timed(`gemm ${dt}${outDType === dt ? '' : `→${outDType}`} ${batch}x[${m}x${k}]@[${k}x${n}] (pointer arrays)`, () => {
      const status =
        dt === 'bfloat16'
          ? bl.cublasGemmBatchedEx(h, opB, opA, n, m, k, one, Bs, CUDA_R_16BF, ldb, As, CUDA_R_16BF, lda, beta, Cs, CT, n, batch, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT)
          : (dt === 'float32' ? bl.cublasSgemmBatched : bl.cublasDgemmBatched)(h, opB, opA, n, m, k, one, Bs, ldb, As, lda, beta, Cs, n, batch);
      checkCublas(`gemm batched (${dt})`, status);
    });
    this.allocator.free(dev); // stream-ordered: later reuse runs after this GEMM
    return c;
  }

  // ---- data movement ------------------------------------------------------------------------------

  writeRowsAt(dst: unknown, src: unknown, at: unknown, outer: number, n: number, rows: number, rowLen: number, dtype: DType): void {
    const total = outer * n * rowLen;
    if (total === 0) return;
    const E = BYTES[dtype];
    buf(dst).range = null;
    const a = this.args.reset().ptr(buf(dst).ptr).ptr(buf(src).ptr).ptr(buf(at).ptr).i64(outer).i64(n).i64(rows).i64(rowLen);
    this.launch(this.fn('movement', dtype, writeRowsAtName(E)), this.blocksFor(total), THREADS, 0, a, writeRowsAtName(E));
  }

  copy(src: unknown, srcOffset: number, ss: number[], dst: unknown, dstOffset: number, ds: number[], shape: number[], dtype: DType): void {
    const dt = dtype;
    const n = sizeOf(shape);
    if (n === 0) return;
    const E = BYTES[dt];
    buf(dst).range = null; // written on the device: no longer known on the host
    const ix = this.ix(shape, [ss, ds]);
    // rows contiguous on both sides, in whole aligned 16-byte vectors (a head split's [T, H, D] → [H, T, D] rows of
    // D, a concat's blocks): copied a vector at a time, with V times fewer index computations
    const V = vecWidth(dt);
    const rank = ix[0];
    const stride = (list: number, axis: number) => ix[1 + MAX_RANK * (list + 1) + axis];
    let vec = rank > 0 && stride(0, rank - 1) === 1 && stride(1, rank - 1) === 1 && ix[rank] % V === 0;
    vec &&= srcOffset % V === 0 && dstOffset % V === 0 && this.aligned16(src, dst);
    for (let axis = 0; vec && axis < rank - 1; axis++) vec = stride(0, axis) % V === 0 && stride(1, axis) % V === 0;
    const w = vec ? 16 : E;
    if (vec) {
      ix[rank] /= V;
      for (let axis = 0; axis < rank - 1; axis++) for (const list of [0, 1]) ix[1 + MAX_RANK * (list + 1) + axis] /= V;
    }
    const units = vec ? n / V : n;
    const a = this.args.reset().ptr(buf(dst).ptr).i64(vec ? dstOffset / V : dstOffset).ptr(buf(src).ptr).i64(vec ? srcOffset / V : srcOffset).i64s(ix).i64(units);
    this.launch(this.fn('movement', dt, copyName(w)), this.blocksFor(units), THREADS, 0, a, copyName(w));
  }

  /** Indices uploaded from the host are checked here, at once and without a device sync. */
  private checkHostRange(op: string, indices: unknown, n: number, count: number): void {
    const r = buf(indices).range;
    if (!r || count === 0) return;
    if (r[0] < 0) throw new Error(`${op}: index ${r[0]} out of range [0, ${n})`);
    if (r[1] >= n) throw new Error(`${op}: index ${r[1]} out of range [0, ${n})`);
  }

  gather(x: unknown, indices: unknown, outer: number, n: number, inner: number, count: number, dtype: DType): DeviceBuffer {
    const dt = dtype;
    this.checkHostRange('gather', indices, n, count);
    const total = outer * count * inner;
    const out = this.alloc(dt, total);
    if (total === 0) return out;
    const a = this.args.reset().ptr(out.ptr).ptr(buf(x).ptr).ptr(buf(indices).ptr).ptr(this.status.ptr).i64(outer).i64(n).i64(inner).i64(count);
    this.launch(this.fn('indexing', dt, GATHER), this.blocksFor(total), THREADS, 0, a, GATHER);
    this.statusPending = true;
    return out;
  }

  scatterAdd(base: unknown, indices: unknown, updates: unknown, outer: number, n: number, inner: number, count: number, dtype: DType, inPlace = false): DeviceBuffer {
    const dt = dtype;
    this.checkHostRange('scatterAdd', indices, n, count);
    const size = outer * n * inner;
    const out = inPlace ? buf(base) : this.alloc(dt, size);
    if (size === 0) return out;
    if (!inPlace) this.cu('cuMemcpyDtoDAsync', this.drv.cuMemcpyDtoDAsync(out.ptr, buf(base).ptr, size * BYTES[dt], this.stream));
    const total = outer * count * inner;
    if (total === 0) return out;
    const a = this.args.reset().ptr(out.ptr).ptr(buf(indices).ptr).ptr(buf(updates).ptr).ptr(this.status.ptr).i64(outer).i64(n).i64(inner).i64(count);
    this.launch(this.fn('indexing', dt, SCATTER_ADD), this.blocksFor(outer * inner), THREADS, 0, a, SCATTER_ADD);
    this.statusPending = true;
    return out;
  }

  cast(x: unknown, size: number, from: DType, to: DType): DeviceBuffer {
    const f = from;
    const t = to;
    const out = this.alloc(t, size);
    if (size === 0) return out;
    if (f === t) {
      this.cu('cuMemcpyDtoDAsync', this.drv.cuMemcpyDtoDAsync(out.ptr, buf(x).ptr, size * BYTES[t], this.stream));
      return out;
    }
    const a = this.args.reset().ptr(out.ptr).ptr(buf(x).ptr).i64(size);
    this.launch(this.fn('movement', f, castName(f, t)), this.blocksFor(size), THREADS, 0, a, castName(f, t));
    return out;
  }

  // ---- attention ----------------------------------------------------------------------------------

  /**
   * Which attention kernels run: 'fused' (tiled FlashAttention-2 style, head dims up to 256; the
   * row kernels still take over where a fused kernel cannot get its shared memory) or 'row' (the
   * first-version kernels, one block per row). Tests and benches switch it; TTT_CUDA_ATTENTION=row
   * sets it at start.
   */
  attentionKernels: 'fused' | 'row' = process.env.TTT_CUDA_ATTENTION === 'row' ? 'row' : 'fused';
  /**
   * bfloat16 attention on the tensor cores (mma.sync, attention-mma.ts) where the device has them
   * (sm_80+) and the head dim is at most 128; else the SIMT fused kernels. TTT_CUDA_ATTENTION=simt
   * turns it off at start; tests and benches switch it to compare the two.
   */
  attentionTensorCores: boolean;
  /**
   * The bfloat16 forward at head dim 64 on Hopper's warpgroup MMAs (attention-wgmma.ts) on sm_90, where rows
   * are 16-byte aligned; else the mma.sync one. TTT_CUDA_ATTENTION=mma turns it off at start; benches switch it.
   */
  attentionWgmma: boolean;
  /** Per fused kernel: whether the driver granted its dynamic shared memory (asked once). */
  private attnSharedOk = new Map<string, boolean>();

  private attentionArgs(job: AttentionJob): number[] {
    // window = Infinity: a band wider than any position difference
    const window = Number.isFinite(job.window) ? job.window : 2 ** 60;
    return [job.tq, job.tk, job.d, job.qStart, job.kStart, window];
  }

  private attentionDType(dtype: DType, job: AttentionJob): AttnDType {
    if (!isAttnDType(dtype)) throw new Error(`cuda backend: attention needs float32, float64 or bfloat16, got ${dtype}`);
    if (job.d > ATT_MAX_D) {
      throw new Error(`cuda backend: attention head dimension ${job.d} is not supported (fused kernels up to ${FA_MAX_D}, row kernels up to ${ATT_MAX_D})`);
    }
    return dtype;
  }

  /** The fused kernel for head dim d with its shared memory granted, or null: run the row kernels. */
  private fusedAttention(dt: AttnDType, kernel: AttnKernel, d: number, wgmma = false): { f: Handle; plan: AttnPlan } | null {
    if (this.attentionKernels === 'row') return null;
    const plan = attentionPlan(dt, kernel, d, this.attentionTensorCores, wgmma && this.attentionWgmma);
    if (!plan) return null;
    const f = this.fn('attention', dt, plan.name);
    if (plan.shared > 48 * 1024) {
      const key = `${dt}/${plan.name}`;
      let ok = this.attnSharedOk.get(key);
      if (ok === undefined) {
        // fails (CUDA_ERROR_INVALID_VALUE, not sticky) on devices with less opt-in shared memory per block
        ok = this.drv.cuFuncSetAttribute(f, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, plan.shared) === 0;
        this.attnSharedOk.set(key, ok);
      }
      if (!ok) return null;
    }
    return { f, plan };
  }

  /** Blocks of a fused kernel: one per (batch entry, tile of `tile` rows out of n). */
  private attnGrid(batch: number, n: number, tile: number): number {
    const blocks = batch * Math.ceil(n / tile);
    if (blocks > 2 ** 31 - 1) throw new Error(`cuda backend: attention grid of ${blocks} blocks is too large`);
    return blocks;
  }

  attentionForward(q: unknown, k: unknown, v: unknown, job: AttentionJob, dtype: DType): { out: DeviceBuffer; lse: DeviceBuffer } {
    const dt = this.attentionDType(dtype, job);
    const groups = job.groups ?? 1;
    const rows = job.batch * job.tq;
    const out = this.alloc(dt, rows * job.d);
    // lse: the tensors' dtype, except float32 for bfloat16 (attentionLseBytes)
    const lse = this.allocator.alloc(rows * attentionLseBytes(dt));
    if (rows === 0 || job.tk === 0) return { out, lse };
    const [tq, tk, d, qs, ks, w] = this.attentionArgs(job);
    // keys and values may be rows of a larger store (a preallocated KV cache): an offset and a stride
    const kvStride = job.kvStride ?? tk * d;
    const kvAt = (job.kvOffset ?? 0) * BYTES[dt];
    const kPtr = buf(k).ptr + kvAt;
    const vPtr = buf(v).ptr + kvAt;
    // with positions read on the device (a launch plan's ring), every key row is a candidate
    const ring = job.keyPositions !== undefined;
    const band = ring ? tk : Math.min(tk, Number.isFinite(job.window) ? job.window : tk);
    const splits = Math.ceil(band / DECODE_CHUNK);
    // (the merge keeps a weight per chunk in shared memory: up to ~3 M keys in float32)
    const decodable = tq <= DECODE_MAX_TQ && d <= FA_MAX_D && decodeCombineSharedBytes(dt, splits, d) <= 48 * 1024;
    if (ring && !decodable) throw new Error(`cuda backend: attention at device-held positions serves up to ${DECODE_MAX_TQ} query rows of head dim <= ${FA_MAX_D} (got ${tq} rows, d ${d}, ${tk} keys)`);
    if (ring || (this.attentionKernels === 'fused' && decodable && band >= DECODE_MIN_KEYS)) {
      // decoding: split the long band across blocks (flash-decoding), then merge the chunks
      const A = attentionAccBytes(dt);
      const po = this.allocator.alloc(rows * splits * d * A);
      const pml = this.allocator.alloc(rows * splits * 2 * A);
      const a1 = this.args.reset().ptr(buf(q).ptr).ptr(kPtr).ptr(vPtr).ptr(po.ptr).ptr(pml.ptr);
      a1.i64(tq).i64(tk).i64(d).i64(qs).i64(ks).i64(w).f64(job.scale).i64(splits).i64(groups).i64(kvStride);
      a1.ptr(ring ? buf(job.keyPositions).ptr : 0).ptr(ring ? buf(job.queryPosition).ptr : 0);
      this.launch(this.fn('attention', dt, ATT_DECODE_PARTIAL), rows * splits, DECODE_THREADS, decodeSharedBytes(dt, d), a1, ATT_DECODE_PARTIAL);
      const a2 = this.args.reset().ptr(po.ptr).ptr(pml.ptr).ptr(out.ptr).ptr(lse.ptr).i64(rows).i64(d).i64(splits);
      this.launch(this.fn('attention', dt, ATT_DECODE_COMBINE), this.rowBlocks(rows), DECODE_COMBINE_THREADS, decodeCombineSharedBytes(dt, splits, d), a2, ATT_DECODE_COMBINE);
      this.allocator.free(po); // stream-ordered
      this.allocator.free(pml);
      return { out, lse };
    }
    // the wgmma forward copies whole 16-byte chunks of 64-element rows
    const aligned = [buf(q).ptr, kPtr, vPtr].every((p) => p % 16 === 0) && kvStride % 8 === 0;
    const fused = this.fusedAttention(dt, 'fwd', d, aligned);
    const a = this.args.reset().ptr(buf(q).ptr).ptr(kPtr).ptr(vPtr).ptr(out.ptr).ptr(lse.ptr);
    if (fused) {
      a.i64(job.batch).i64(tq).i64(tk).i64(d).i64(qs).i64(ks).i64(w).f64(job.scale).i64(groups).i64(kvStride);
      const tiles = this.attnGrid(job.batch, tq, fused.plan.bq);
      if (!fused.plan.tensorCores) {
        this.launch(fused.f, tiles, fused.plan.threads, fused.plan.shared, a, fused.plan.name);
        return { out, lse };
      }
      // few query tiles over long bands: each tile's keys split across blocks, then merged as in decoding
      const splits = this.keySplits(job, tiles, fused.plan);
      const A = attentionAccBytes(dt);
      const po = splits > 1 ? this.allocator.alloc(rows * splits * d * A) : null;
      const pml = splits > 1 ? this.allocator.alloc(rows * splits * 2 * A) : null;
      a.i64(splits).ptr(po ? po.ptr : 0).ptr(pml ? pml.ptr : 0);
      this.launch(fused.f, tiles * splits, fused.plan.threads, fused.plan.shared, a, fused.plan.name);
      if (po && pml) {
        // a few splits per row: a warp per row (the decode merge's block per row waits on its barriers)
        const a2 = this.args.reset().ptr(po.ptr).ptr(pml.ptr).ptr(out.ptr).ptr(lse.ptr).i64(rows).i64(d).i64(splits);
        this.launch(this.fn('attention', dt, ATT_SPLIT_COMBINE), Math.ceil(rows / SPLIT_COMBINE_ROWS), 32 * SPLIT_COMBINE_ROWS, 0, a2, ATT_SPLIT_COMBINE);
        this.allocator.free(po); // stream-ordered
        this.allocator.free(pml);
      }
    } else {
      a.i64(rows).i64(tq).i64(tk).i64(d).i64(qs).i64(ks).i64(w).f64(job.scale).i64(groups).i64(kvStride);
      this.launch(this.fn('attention', dt, ATT_FWD), this.rowBlocks(rows), ATT_THREADS, attentionShared(dt, d), a, ATT_FWD);
    }
    return { out, lse };
  }

  /**
   * Key splits of the tensor-core forward and dQ (`plan`) over `tiles` query tiles: 1 when the tiles fill the
   * GPU (the plan's blocks per SM on every SM), else enough for about four waves, each split keeping at least 8 key tiles
   * of the keys a query tile's band spans (below that, the partial outputs cost more than they save).
   */
  private keySplits(job: AttentionJob, tiles: number, plan: AttnPlan): number {
    const tileBand = Math.min(job.tk, (Number.isFinite(job.window) ? job.window : job.tk) + plan.bq);
    return this.splitCount(tiles, plan, tileBand / plan.bk);
  }

  /**
   * Query splits of the tensor-core dK/dV over `tiles` key tiles (`nk` keys from the job's gradKeysFrom), over the
   * query tiles (of every query head of a group) that the band of a key tile spans: unlike the forward's, these
   * blocks are unequal (causal: the first key tile is seen by every query tile, the last by a few), so the heaviest
   * block sets the time, and as many splits as keep 8 tiles each and about four waves (the wave-count rule of
   * splitCount chose 2 for the inner step's fresh keys, where 4 measured 110 against 137 µs for two calls under ncu).
   */
  private querySplits(job: AttentionJob, tiles: number, plan: AttnPlan): number {
    const slots = plan.blocksPerSm * this.sms;
    if (tiles >= slots) return 1;
    const tileBand = Math.min(job.tq, (Number.isFinite(job.window) ? job.window : job.tq) + plan.bk);
    const steps = ((job.groups ?? 1) * tileBand) / plan.bq;
    return Math.max(1, Math.min(Math.ceil((4 * slots) / tiles), Math.floor(steps / 8)));
  }

  /**
   * 1 when `tiles` blocks fill the GPU; else the split count, each split walking at least 8 of a block's `steps` tiles,
   * with the least estimated time: waves × (tiles walked per split + SPLIT_OVERHEAD_TILES). Equal blocks run in whole
   * waves, so a last wave a third full costs as much as a full one (the TTT inner step's forward: 96 query tiles on
   * 132 SMs took 6 splits, 4.4 waves, where 4 splits run in 2.9).
   */
  private splitCount(tiles: number, plan: AttnPlan, steps: number): number {
    return splitCountFor(tiles, plan.blocksPerSm * this.sms, steps);
  }

  /**
   * delta = rowsum(dO ⊙ O) first, then dK and dV (one block per key tile) and dQ (one block per
   * query tile), each summed by one thread in a fixed order: no atomics, bit-identical between runs.
   */
  attentionBackward(
    q: unknown, k: unknown, v: unknown, o: unknown, lse: unknown, dout: unknown, job: AttentionJob, dtype: DType,
  ): { dq: DeviceBuffer; dk: DeviceBuffer; dv: DeviceBuffer } {
    const dt = this.attentionDType(dtype, job);
    const { batch, d } = job;
    const groups = job.groups ?? 1;
    const qRows = batch * job.tq;
    // dK, dV for key rows [from, tk) only (before: constants); keys may be rows of a store
    const from = job.gradKeysFrom ?? 0;
    const kRows = (batch / groups) * (job.tk - from); // key/value entries: batch / groups
    const kvStride = job.kvStride ?? job.tk * d;
    const kvAt = (job.kvOffset ?? 0) * BYTES[dt];
    const dq = this.alloc(dt, qRows * d);
    const dk = this.alloc(dt, kRows * d);
    const dv = this.alloc(dt, kRows * d);
    if (job.tk * d === 0) return { dq, dk, dv };
    if (qRows === 0) {
      // no query sees any key: zero gradients
      for (const g of [dk, dv]) this.cu('cuMemsetD8Async', this.drv.cuMemsetD8Async(g.ptr, 0, kRows * d * BYTES[dt], this.stream));
      return { dq, dk, dv };
    }
    const [tq, tk, dd, qs, ks, w] = this.attentionArgs(job);
    const fdkv = this.fusedAttention(dt, 'dkv', d);
    const fdq = this.fusedAttention(dt, 'dq', d);
    const delta = this.allocator.alloc(qRows * attentionAccBytes(dt));
    const a0 = this.args.reset().ptr(buf(o).ptr).ptr(buf(dout).ptr).ptr(delta.ptr).i64(qRows).i64(dd);
    const deltaBlocks = Math.max(1, Math.min(Math.ceil(qRows / (ATT_DELTA_THREADS / 32)), this.sms * 64));
    this.launch(this.fn('attention', dt, ATT_DELTA), deltaBlocks, ATT_DELTA_THREADS, 0, a0, ATT_DELTA);
    const common = (a: ArgPacker, keysAt: number) =>
      a.ptr(buf(q).ptr).ptr(buf(k).ptr + keysAt).ptr(buf(v).ptr + keysAt).ptr(buf(dout).ptr).ptr(buf(lse).ptr).ptr(delta.ptr);
    // dK/dV see only the keys from `from`: the same kernel over a shorter key range starting there
    const nk = tk - from;
    const a1 = common(this.args.reset(), kvAt + from * d * BYTES[dt]).ptr(dk.ptr).ptr(dv.ptr);
    if (nk > 0 && fdkv) {
      a1.i64(batch).i64(tq).i64(nk).i64(dd).i64(qs).i64(ks + from).i64(w).f64(job.scale).i64(groups).i64(kvStride);
      const tiles = this.attnGrid(batch / groups, nk, fdkv.plan.bk);
      if (!fdkv.plan.tensorCores) {
        this.launch(fdkv.f, tiles, fdkv.plan.threads, fdkv.plan.shared, a1, fdkv.plan.name);
      } else {
        // few key tiles seen by many query tiles (the TTT inner step's fresh keys): the query tiles split, the float partials added up
        const splits = this.querySplits({ ...job, tk: nk }, tiles, fdkv.plan);
        const n = kRows * d;
        const part = splits > 1 ? this.allocator.alloc(2 * splits * n * 4) : null;
        a1.i64(splits).ptr(part ? part.ptr : 0);
        this.launch(fdkv.f, tiles * splits, fdkv.plan.threads, fdkv.plan.shared, a1, fdkv.plan.name);
        if (part) {
          for (const [g, at] of [[dk, 0], [dv, splits * n * 4]] as const) {
            const a3 = this.args.reset().ptr(g.ptr).ptr(part.ptr + at).i64(n).i64(splits);
            this.launch(this.fn('attention', dt, ATT_SPLIT_SUM), this.blocksFor(n), THREADS, 0, a3, ATT_SPLIT_SUM);
          }
          this.allocator.free(part); // stream-ordered
        }
      }
    } else if (nk > 0) {
      a1.i64(kRows).i64(tq).i64(nk).i64(dd).i64(qs).i64(ks + from).i64(w).f64(job.scale).i64(groups).i64(kvStride);
      this.launch(this.fn('attention', dt, ATT_BWD_DKV), this.rowBlocks(kRows), ATT_THREADS, attentionShared(dt, d), a1, ATT_BWD_DKV);
    }
    const a2 = common(this.args.reset(), kvAt).ptr(dq.ptr);
    if (fdq) {
      a2.i64(batch).i64(tq).i64(tk).i64(dd).i64(qs).i64(ks).i64(w).f64(job.scale).i64(groups).i64(kvStride);
      const tiles = this.attnGrid(batch, tq, fdq.plan.bq);
      if (!fdq.plan.tensorCores) {
        this.launch(fdq.f, tiles, fdq.plan.threads, fdq.plan.shared, a2, fdq.plan.name);
      } else {
        // as in the forward: few query tiles over long bands split their keys, and the float partials are added up
        const splits = this.keySplits(job, tiles, fdq.plan);
        const part = splits > 1 ? this.allocator.alloc(splits * qRows * d * 4) : null;
        a2.i64(splits).ptr(part ? part.ptr : 0);
        this.launch(fdq.f, tiles * splits, fdq.plan.threads, fdq.plan.shared, a2, fdq.plan.name);
        if (part) {
          const a3 = this.args.reset().ptr(dq.ptr).ptr(part.ptr).i64(qRows * d).i64(splits);
          this.launch(this.fn('attention', dt, ATT_SPLIT_SUM), this.blocksFor(qRows * d), THREADS, 0, a3, ATT_SPLIT_SUM);
          this.allocator.free(part); // stream-ordered
        }
      }
    } else {
      a2.i64(qRows).i64(tq).i64(tk).i64(dd).i64(qs).i64(ks).i64(w).f64(job.scale).i64(groups).i64(kvStride);
      this.launch(this.fn('attention', dt, ATT_BWD_DQ), this.rowBlocks(qRows), ATT_THREADS, attentionShared(dt, d), a2, ATT_BWD_DQ);
    }
    this.allocator.free(delta); // stream-ordered: reuse comes after these kernels
    return { dq, dk, dv };
  }
}

/** A split's fixed cost in loop steps: loading its query (or key) tile, writing and merging its partials. */
const SPLIT_OVERHEAD_TILES = 2;

/** The split count of `splitCount` for `tiles` blocks on `slots` resident-block slots, each walking `steps` tiles unsplit. */
export function splitCountFor(tiles: number, slots: number, steps: number): number {
  if (tiles >= slots) return 1;
  const most = Math.max(1, Math.floor(steps / 8));
  let best = 1;
  let bestCost = Infinity;
  for (let s = 1; s <= most; s++) {
    const cost = Math.ceil((tiles * s) / slots) * (Math.ceil(steps / s) + SPLIT_OVERHEAD_TILES);
    if (cost < bestCost) [best, bestCost] = [s, cost];
  }
  return best;
}

/** The common step of evenly spaced offsets (0 for one entry or a broadcast), or null. */
function evenStride(offsets: Int32Array): number | null {
  if (offsets.length <= 1) return 0;
  const s = offsets[1] - offsets[0];
  for (let i = 2; i < offsets.length; i++) if (offsets[i] - offsets[i - 1] !== s) return null;
  return s;
}
