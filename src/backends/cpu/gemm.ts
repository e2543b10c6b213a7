// CPU matrix multiply: the one entry point the CPU backend calls for every (batched) product.
//
// Three interchangeable paths, all synchronous:
//   blas  OpenBLAS (or another CBLAS) through koffi, when installed            -> ./blas.ts
//   wasm  our WebAssembly SIMD kernels (./wasm/gemm-wat.mjs, built into build/wasm/), optionally split
//         across worker threads; they run on the backend's shared arena memory (./arena.ts), so
//         operands from the pool are used in place and only foreign arrays are staged
//   js    plain loops; always available, and used for tiny products on every path because a call
//         into wasm or BLAS costs more than the arithmetic there
import { existsSync, readFileSync } from 'node:fs';
import { availableParallelism } from 'node:os';
import { join } from 'node:path';
import v8 from 'node:v8';
import { Worker } from 'node:worker_threads';
import { arena } from './arena.js';
import { blasGemm, loadBlas } from './blas.js';
import { repoRoot } from '../../util/repo-root.js';

export type FloatArray = Float32Array | Float64Array;

export interface GemmJob {
  batch: number;
  m: number;
  n: number;
  k: number;
  transA: boolean;
  transB: boolean;
  /** For batch i, A_i starts at a[aOffsets[i]]: row-major [m,k], or [k,m] if transA. */
  a: FloatArray;
  aOffsets: ArrayLike<number>;
  /** B_i at b[bOffsets[i]]: row-major [k,n], or [n,k] if transB. */
  b: FloatArray;
  bOffsets: ArrayLike<number>;
  /** Output, contiguous [batch, m, n], overwritten; same dtype as a and b. */
  c: FloatArray;
}

export type GemmPath = 'blas' | 'wasm' | 'js';

/**
 * Below this many multiply-adds per batch entry the JS loop beats the fixed cost of a call (measured:
 * ~0.3 us into OpenBLAS, ~1.5 us into wasm with staging; JS runs ~1.4 multiply-adds per ns at 8^3).
 */
const SMALL_PRODUCT: Record<GemmPath, number> = { blas: 256, wasm: 1536, js: Infinity };
/**
 * Below this many multiply-adds in a whole call, waking worker threads costs more than it saves
 * (measured on 2 cores: 128^3 is no faster on 2 threads, 192^3 is 1.5-1.8x).
 */
const MIN_PARALLEL_WORK = 1 << 22;
const MAX_DEFAULT_THREADS = 16;

let requestedPath: GemmPath | 'auto' = 'auto';
let threads = defaultThreads();

function defaultThreads(): number {
  const env = Number.parseInt(process.env.TTT_THREADS ?? '', 10);
  if (Number.isFinite(env) && env >= 1) return env;
  return Math.max(1, Math.min(availableParallelism(), MAX_DEFAULT_THREADS));
}

// ---------------------------------------------------------------------------------------------------
// Public API

export function gemm(job: GemmJob): void {
  const { batch, m, n, k, a, b, c } = job;
  checkJob(job);
  if (batch === 0 || m === 0 || n === 0) return;
  if (k === 0) {
    c.fill(0, 0, batch * m * n);
    return;
  }
  const path = resolvePath();
  if (m * n * k < SMALL_PRODUCT[path]) {
    jsGemm(job);
  } else if (path === 'blas') {
    const blas = loadBlas()!;
    blasGemm(blas, a instanceof Float64Array, batch, m, n, k, job.transA, job.transB, a, job.aOffsets, b, job.bOffsets, c);
  } else {
    getWasm()!.run(job, threads);
  }
}

export interface GemmInfo {
  path: GemmPath;
  available: GemmPath[];
  threads: number;
  blasLibrary?: string;
  wasmSimd: boolean;
  /** Which wasm build is in use, when the wasm path is available. */
  wasmKernel?: 'simd128' | 'relaxed-simd';
}

export function gemmInfo(): GemmInfo {
  const blas = loadBlas();
  const info: GemmInfo = {
    path: resolvePath(),
    available: availablePaths(),
    threads,
    wasmSimd: getWasm() !== null,
  };
  if (blas) info.blasLibrary = blas.library;
  if (wasmKernel) info.wasmKernel = wasmKernel;
  return info;
}

/** Forces a path; 'auto' picks the best available (blas, then wasm, then js). */
export function setGemmPath(path: GemmPath | 'auto'): void {
  if (path !== 'auto' && !availablePaths().includes(path)) {
    const why = path === 'blas'
      ? 'no CBLAS library could be loaded (needs the optional koffi package and libopenblas; see TTT_BLAS_LIB, TTT_NO_BLAS)'
      : `the wasm kernel is missing or failed to load (${wasmError ?? 'run `npm run build`'})`;
    throw new Error(`gemm path '${path}' is not available: ${why}`);
  }
  requestedPath = path;
}

/** Thread count for the wasm path, and for OpenBLAS when it is the library in use. */
export function setGemmThreads(n: number): void {
  if (!Number.isInteger(n) || n < 1) throw new RangeError(`setGemmThreads: expected a positive integer, got ${n}`);
  threads = n;
  loadBlas()?.setNumThreads?.(n);
}

function availablePaths(): GemmPath[] {
  const paths: GemmPath[] = [];
  if (loadBlas()) paths.push('blas');
  if (getWasm()) paths.push('wasm');
  paths.push('js');
  return paths;
}

function resolvePath(): GemmPath {
  if (requestedPath !== 'auto') return requestedPath;
  return availablePaths()[0];
}

function checkJob(job: GemmJob): void {
  const { batch, m, n, k, a, b, c, aOffsets, bOffsets } = job;
  for (const [name, v] of [['batch', batch], ['m', m], ['n', n], ['k', k]] as const) {
    if (!Number.isInteger(v) || v < 0) throw new RangeError(`gemm: ${name} must be a non-negative integer, got ${v}`);
  }
  const Ctor = a.constructor;
  if (b.constructor !== Ctor || c.constructor !== Ctor || (Ctor !== Float32Array && Ctor !== Float64Array)) {
    throw new TypeError('gemm: a, b and c must all be Float32Array or all be Float64Array');
  }
  if (c.length < batch * m * n) throw new RangeError(`gemm: c has ${c.length} elements, needs ${batch * m * n}`);
  if (aOffsets.length < batch || bOffsets.length < batch) throw new RangeError('gemm: fewer offsets than batch entries');
  for (let i = 0; i < batch; i++) {
    if (!(aOffsets[i] >= 0 && aOffsets[i] + m * k <= a.length)) throw new RangeError(`gemm: A_${i} out of bounds`);
    if (!(bOffsets[i] >= 0 && bOffsets[i] + k * n <= b.length)) throw new RangeError(`gemm: B_${i} out of bounds`);
  }
}

// ---------------------------------------------------------------------------------------------------
// JS path

let rowScratch = new Float64Array(64);

function jsGemm({ batch, m, n, k, transA, transB, a, aOffsets, b, bOffsets, c }: GemmJob): void {
  const rsa = transA ? 1 : k;
  const csa = transA ? m : 1;
  if (!transB && rowScratch.length < n) rowScratch = new Float64Array(n);
  const acc = rowScratch;
  for (let i = 0; i < batch; i++) {
    const ao = aOffsets[i];
    const bo = bOffsets[i];
    const co = i * m * n;
    for (let r = 0; r < m; r++) {
      const ar = ao + r * rsa;
      const cr = co + r * n;
      if (transB) {
        // Rows of B^T are contiguous in p: dot products.
        for (let j = 0; j < n; j++) {
          const bj = bo + j * k;
          let s = 0;
          for (let p = 0; p < k; p++) s += a[ar + p * csa] * b[bj + p];
          c[cr + j] = s;
        }
      } else {
        // Rows of B are contiguous in j: accumulate a row of C (in float64, like the dot branch).
        acc.fill(0, 0, n);
        for (let p = 0; p < k; p++) {
          const av = a[ar + p * csa];
          const bp = bo + p * n;
          for (let j = 0; j < n; j++) acc[j] += av * b[bp + j];
        }
        for (let j = 0; j < n; j++) c[cr + j] = acc[j];
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// wasm path

/** Layout of the shared control words (Int32Array) between the main thread and the workers. */
const CTRL_GEN = 0; // bumped per job; workers sleep on it
const CTRL_CLAIM = 1; // (generation tag << TAG_SHIFT) | next task index; -1 between jobs
const CTRL_DONE = 2; // tasks finished in this job
const CTRL_TOTAL = 3; // tasks in this job
const CTRL_PARTICIPANTS = 4; // thread ids below this may take tasks (each owns a workspace)
const CTRL_ERROR = 5;
const CTRL_WS = 6; // byte address of the workspaces (thread i's at + i * wsBytes); moves when more threads join
const CTRL_WORDS = 8;
const TAG_SHIFT = 11;
const MAX_TASKS = (1 << TAG_SHIFT) - 1;
const TASK_WORDS = 12; // f64 flag, m, n, k, a, rsa, csa, b, rsb, csb, c, ldc
/** How long an idle worker polls for the next job before it blocks. */
const WORKER_SPIN_MS = 0.2;

/**
 * Claims and runs tasks of job `gen` until none are left. The same source runs on the main thread and
 * inside every worker (workers are `eval` workers, so they cannot import this module); the generation
 * tag in the claim word stops a thread that woke late from taking tasks of a newer job.
 */
const RUN_TASKS_SRC = `
  const tag = gen & ${(1 << (31 - TAG_SHIFT)) - 1};
  const ws = Atomics.load(ctrl, ${CTRL_WS}) + id * wsBytes;
  for (;;) {
    const cur = Atomics.load(ctrl, ${CTRL_CLAIM});
    if (cur >>> ${TAG_SHIFT} !== tag || id >= Atomics.load(ctrl, ${CTRL_PARTICIPANTS})) return;
    const t = cur & ${MAX_TASKS};
    const total = Atomics.load(ctrl, ${CTRL_TOTAL});
    if (t >= total) return;
    if (Atomics.compareExchange(ctrl, ${CTRL_CLAIM}, cur, cur + 1) !== cur) continue;
    const o = t * ${TASK_WORDS};
    try {
      (tasks[o] ? ex.gemm_f64 : ex.gemm_f32)(tasks[o + 1], tasks[o + 2], tasks[o + 3], tasks[o + 4], tasks[o + 5],
        tasks[o + 6], tasks[o + 7], tasks[o + 8], tasks[o + 9], tasks[o + 10], tasks[o + 11], ws);
    } catch (e) {
      Atomics.store(ctrl, ${CTRL_ERROR}, 1);
    }
    if (Atomics.add(ctrl, ${CTRL_DONE}, 1) + 1 === total) Atomics.notify(ctrl, ${CTRL_DONE});
  }`;

const WORKER_SRC = `
  const { workerData } = require('node:worker_threads');
  const { module, memory, ctrlBuf, tasksBuf, id, wsBytes } = workerData;
  const ex = new WebAssembly.Instance(module, { env: { memory } }).exports;
  const ctrl = new Int32Array(ctrlBuf);
  const tasks = new Int32Array(tasksBuf);
  function runTasks(gen) { ${RUN_TASKS_SRC} }
  let seen = 0;
  for (;;) {
    // Spin a little before sleeping: a futex wake-up costs ~50 us on this class of VM, as much as a
    // whole 100^3 product, and training calls gemm back to back.
    const until = performance.now() + ${WORKER_SPIN_MS};
    while (Atomics.load(ctrl, ${CTRL_GEN}) === seen && performance.now() < until);
    Atomics.wait(ctrl, ${CTRL_GEN}, seen);
    seen = Atomics.load(ctrl, ${CTRL_GEN});
    runTasks(seen);
  }`;

interface WasmExports {
  gemm_f32: (...args: number[]) => void;
  gemm_f64: (...args: number[]) => void;
  workspace_bytes: () => number;
  mr_f32: WebAssembly.Global; nr_f32: WebAssembly.Global;
  mr_f64: WebAssembly.Global; nr_f64: WebAssembly.Global;
}

/** Soft cap on A/B/C bytes staged in wasm memory at once; bigger batches are processed in chunks. */
const CHUNK_BYTES = 256 << 20;

const align = (x: number, to: number) => Math.ceil(x / to) * to;

class WasmGemm {
  private readonly ex: WasmExports;
  private readonly wsBytes: number;
  private readonly ctrl = new Int32Array(new SharedArrayBuffer(CTRL_WORDS * 4));
  private readonly tasks = new Int32Array(new SharedArrayBuffer(MAX_TASKS * TASK_WORDS * 4));
  private readonly workers: Worker[] = [];
  private readonly runTasks: (gen: number, id: number) => void;
  private gen = 0;
  private wsPtr = 0;
  private wsThreads = 0;

  constructor(private readonly module: WebAssembly.Module, private readonly memory: WebAssembly.Memory) {
    this.ex = new WebAssembly.Instance(module, { env: { memory } }).exports as unknown as WasmExports;
    this.wsBytes = align(this.ex.workspace_bytes(), 64);
    Atomics.store(this.ctrl, CTRL_CLAIM, -1);
    this.runTasks = new Function('ctrl', 'tasks', 'ex', 'wsBytes', 'gen', 'id', RUN_TASKS_SRC)
      .bind(null, this.ctrl, this.tasks, this.ex, this.wsBytes) as (gen: number, id: number) => void;
  }

  /** Workspaces (packed panels) for `threads` threads in the arena; false if it is full. */
  private ensureWorkspace(threads: number): boolean {
    if (threads <= this.wsThreads) return true;
    const p = arena.allocScratch(threads * this.wsBytes);
    if (p < 0) return false;
    if (this.wsPtr) arena.release(this.wsPtr); // no job is running: nothing uses the old ones
    this.wsPtr = p;
    this.wsThreads = threads;
    Atomics.store(this.ctrl, CTRL_WS, p);
    return true;
  }

  run(job: GemmJob, threadCount: number): void {
    const { batch, m, n, k, transA, transB, a, b, c } = job;
    const f64 = a instanceof Float64Array;
    const S = f64 ? 8 : 4;
    const mr = (f64 ? this.ex.mr_f64 : this.ex.mr_f32).value as number;
    const nr = (f64 ? this.ex.nr_f64 : this.ex.nr_f32).value as number;
    const parallel = threadCount > 1 && batch * m * n * k >= MIN_PARALLEL_WORK;
    const participants = parallel ? threadCount : 1;
    // Split each product into pieces along n (each piece then packs only its own part of B; A is
    // re-packed per piece, which is cheap next to the product) unless n is too narrow to give every
    // thread a tile column.
    const nTiles = Math.ceil(n / nr);
    const mTiles = Math.ceil(m / mr);
    const piecesWanted = parallel ? Math.ceil(participants / batch) : 1;
    const splitN = nTiles >= piecesWanted || nTiles >= mTiles;
    const pieces = Math.max(1, Math.min(piecesWanted, splitN ? nTiles : mTiles, MAX_TASKS));

    const aLen = m * k;
    const bLen = k * n;
    const cLen = m * n;
    const [rsa, csa] = transA ? [1, m] : [k, 1];
    const [rsb, csb] = transB ? [1, k] : [n, 1];
    if (!this.ensureWorkspace(participants)) {
      jsGemm(job); // the arena is full: correct, if slow
      return;
    }
    // Operands that live in the arena (tensor storage from the pool) are used where they are; only
    // the others are staged into a scratch block (and C copied back out).
    const aIn = arena.owns(a);
    const bIn = arena.owns(b);
    const cIn = arena.owns(c);
    const entryBytes = ((aIn ? 0 : aLen) + (bIn ? 0 : bLen) + (cIn ? 0 : cLen)) * S + 3 * 64;
    const perChunk = Math.max(1, Math.min(Math.floor(Math.max(CHUNK_BYTES, entryBytes) / entryBytes), Math.floor(MAX_TASKS / pieces)));

    for (let start = 0; start < batch; start += perChunk) {
      const end = Math.min(batch, start + perChunk);
      // Staging layout: C first (one contiguous block, copied out in one go), then A and B, sharing
      // the staged copy between batch entries that broadcast the same operand.
      let top = cIn ? 0 : align((end - start) * cLen * S, 64);
      const stage = (offsets: ArrayLike<number>, len: number, seen: Map<number, number>, i: number) => {
        let p = seen.get(offsets[i]);
        if (p === undefined) {
          p = top;
          seen.set(offsets[i], p);
          top = align(top + len * S, 64);
        }
        return p;
      };
      const aSeen = new Map<number, number>();
      const bSeen = new Map<number, number>();
      const aPtrs: number[] = [];
      const bPtrs: number[] = [];
      for (let i = start; i < end; i++) {
        aPtrs.push(aIn ? a.byteOffset + job.aOffsets[i] * S : stage(job.aOffsets, aLen, aSeen, i));
        bPtrs.push(bIn ? b.byteOffset + job.bOffsets[i] * S : stage(job.bOffsets, bLen, bSeen, i));
      }
      const block = top > 0 ? arena.allocScratch(top) : 0;
      if (block < 0) {
        jsGemm(job); // more than the arena can stage: correct, if slow
        return;
      }
      const heap = f64 ? arena.heap(Float64Array) : arena.heap(Float32Array);
      for (const [off, p] of aSeen) heap.set(a.subarray(off, off + aLen), (block + p) / S);
      for (const [off, p] of bSeen) heap.set(b.subarray(off, off + bLen), (block + p) / S);
      const cPtr = cIn ? c.byteOffset + start * cLen * S : block;

      let t = 0;
      const tasks = this.tasks;
      const addTask = (mm: number, nn: number, ap: number, bp: number, cp: number) => {
        tasks.set([f64 ? 1 : 0, mm, nn, k, ap, rsa, csa, bp, rsb, csb, cp, n], t++ * TASK_WORDS);
      };
      for (let i = start; i < end; i++) {
        const ap = aIn ? aPtrs[i - start] : block + aPtrs[i - start];
        const bp = bIn ? bPtrs[i - start] : block + bPtrs[i - start];
        const cp = cPtr + (i - start) * cLen * S;
        const tiles = splitN ? nTiles : mTiles;
        for (let q = 0; q < pieces; q++) {
          const lo = Math.floor((q * tiles) / pieces);
          const hi = Math.floor(((q + 1) * tiles) / pieces);
          if (splitN) {
            const n0 = lo * nr;
            const n1 = Math.min(n, hi * nr);
            if (n1 > n0) addTask(m, n1 - n0, ap, bp + n0 * csb * S, cp + n0 * S);
          } else {
            const m0 = lo * mr;
            const m1 = Math.min(m, hi * mr);
            if (m1 > m0) addTask(m1 - m0, n, ap + m0 * rsa * S, bp, cp + m0 * n * S);
          }
        }
      }
      try {
        this.dispatch(t, t > 1 ? participants : 1);
        if (!cIn) c.set(heap.subarray(cPtr / S, cPtr / S + (end - start) * cLen), start * cLen);
      } finally {
        if (block > 0) arena.release(block);
      }
    }
  }

  private dispatch(total: number, participants: number): void {
    const ctrl = this.ctrl;
    if (participants > 1) this.ensureWorkers(participants - 1);
    this.gen = (this.gen + 1) & 0x7fffffff;
    const gen = this.gen;
    Atomics.store(ctrl, CTRL_DONE, 0);
    Atomics.store(ctrl, CTRL_ERROR, 0);
    Atomics.store(ctrl, CTRL_TOTAL, total);
    Atomics.store(ctrl, CTRL_PARTICIPANTS, participants);
    Atomics.store(ctrl, CTRL_CLAIM, (gen & ((1 << (31 - TAG_SHIFT)) - 1)) << TAG_SHIFT);
    if (participants > 1) {
      Atomics.store(ctrl, CTRL_GEN, gen);
      Atomics.notify(ctrl, CTRL_GEN);
    }
    this.runTasks(gen, 0);
    // Workers that are still starting up simply find no tasks left: the main thread never waits for
    // a task nobody claimed, so a slow (or failed) worker start cannot deadlock it.
    for (let d = Atomics.load(ctrl, CTRL_DONE); d < total; d = Atomics.load(ctrl, CTRL_DONE)) {
      Atomics.wait(ctrl, CTRL_DONE, d);
    }
    Atomics.store(ctrl, CTRL_CLAIM, -1);
    if (Atomics.load(ctrl, CTRL_ERROR)) throw new Error('gemm: the wasm kernel trapped');
  }

  private ensureWorkers(count: number): void {
    while (this.workers.length < count) {
      const id = this.workers.length + 1;
      const worker = new Worker(WORKER_SRC, {
        eval: true,
        workerData: {
          module: this.module, memory: this.memory, ctrlBuf: this.ctrl.buffer, tasksBuf: this.tasks.buffer,
          id, wsBytes: this.wsBytes,
        },
      });
      worker.unref();
      // A worker that dies only stops taking tasks; the main thread does the rest.
      worker.on('error', () => {});
      this.workers.push(worker);
    }
  }
}

let wasm: WasmGemm | null | undefined;
let wasmError: string | undefined;
let wasmKernel: 'simd128' | 'relaxed-simd' | undefined;

/**
 * The relaxed-SIMD build uses fused multiply-add (relaxed_madd), measured ~5-10% faster here. V8 ships
 * relaxed SIMD from 11.4 (Node 22); Node 20's V8 11.3 has it complete behind a flag, which is a
 * process-wide wasm feature switch and is turned on here unless TTT_WASM_RELAXED=0.
 */
function relaxedSimdSupported(bytes: BufferSource): boolean {
  if (process.env.TTT_WASM_RELAXED === '0') return false;
  if (WebAssembly.validate(bytes)) return true;
  const v8Major = Number.parseInt(process.versions.v8, 10);
  if (v8Major >= 12) return false; // shipped long ago; if it still fails the flag will not help
  v8.setFlagsFromString('--experimental-wasm-relaxed-simd');
  return WebAssembly.validate(bytes);
}


function getWasm(): WasmGemm | null {
  if (wasm !== undefined) return wasm;
  wasm = null;
  try {
    const root = repoRoot();
    if (!root) throw new Error('package.json not found above gemm.ts');
    const dir = join(root, 'build', 'wasm');
    const load = (file: string) => {
      const path = join(dir, file);
      return existsSync(path) ? readFileSync(path) : undefined;
    };
    const plain = load('gemm.wasm');
    const relaxed = load('gemm-relaxed.wasm');
    let bytes = relaxed && relaxedSimdSupported(relaxed) ? relaxed : plain;
    if (bytes && !WebAssembly.validate(bytes)) bytes = undefined;
    if (!bytes) throw new Error(`no loadable kernel in ${dir} (run \`npm run build\`)`);
    // The arena's memory, so tensors from the pool are multiplied where they are, without staging.
    wasm = new WasmGemm(new WebAssembly.Module(bytes), arena.memory);
    wasmKernel = bytes === relaxed ? 'relaxed-simd' : 'simd128';
  } catch (e) {
    wasmError = e instanceof Error ? e.message : String(e);
  }
  return wasm;
}
