/**
 * The CUDA backend against the CPU backend: every kernel of the Backend interface on random inputs
 * (float32 within ~1e-5 relative, int32 and bool exactly), first- and second-order gradients
 * through the engine, a TTT-E2E outer loss and meta-gradient on a tiny config, and the caching
 * allocator (a repeated training step keeps device memory flat). Without a GPU (or without koffi
 * or the CUDA libraries) the GPU part reports a skip with the reason; the library search error and
 * the allocator's bookkeeping are checked everywhere.
 *
 * `npm run test:cuda` runs this file alone (on the GPU machine: `node --test dist/test/cuda.test.js`).
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import * as T from '../src/index.js';
import type { Backend, DType, Tensor } from '../src/index.js';
import { CachingAllocator, bucketOf } from '../src/backends/cuda/allocator.js';
import { CudaError } from '../src/backends/cuda/ffi.js';
import { openLibrary } from '../src/backends/cuda/library.js';
import { makeConfig } from '../src/model/config.js';
import { type Params, initParams } from '../src/model/transformer.js';
import { e2eOuterLoss, lmLoss } from '../src/model/ttt-e2e.js';
import { AdamW } from '../src/train/adamw.js';
import { seededValues } from './helpers/check.js';
import { cudaOrSkip } from './helpers/cuda.js';
import { sizeOf } from '../src/engine/shape.js';

// ---- which backends ------------------------------------------------------------------------------

const { cuda, gpu } = cudaOrSkip('cuda.test.ts');

// ---- helpers -------------------------------------------------------------------------------------

interface HostResult {
  shape: readonly number[];
  dtype: DType;
  values: number[];
}

function toHost(r: unknown): HostResult[] {
  if (r instanceof T.Tensor) return [{ shape: r.shape, dtype: r.dtype, values: r.toArray() }];
  if (Array.isArray(r)) return r.flatMap(toHost);
  if (r && typeof r === 'object') return Object.values(r).flatMap(toHost);
  if (typeof r === 'number') return [{ shape: [], dtype: 'float64', values: [r] }];
  throw new Error(`toHost: unexpected ${typeof r}`);
}

/** Runs `fn` on each backend (inputs must be made inside from host data) and returns both results. */
function onBoth(fn: () => unknown): { cpu: HostResult[]; gpu: HostResult[] } {
  const run = (name: string): HostResult[] => {
    T.setBackend(name);
    try {
      return T.tidy(() => toHost(fn()));
    } finally {
      T.setBackend('cpu');
    }
  };
  return { cpu: run('cpu'), gpu: run('cuda') };
}

interface Tol {
  rtol?: number;
  /** Absolute tolerance as a fraction of the largest |value| of the CPU result. */
  scaled?: number;
}

function assertSame(label: string, r: { cpu: HostResult[]; gpu: HostResult[] }, tol: Tol & { anyDType?: boolean } = {}): void {
  assert.equal(r.gpu.length, r.cpu.length, `${label}: number of outputs`);
  r.cpu.forEach((c, k) => {
    const g = r.gpu[k];
    const name = r.cpu.length > 1 ? `${label}[out ${k}]` : label;
    assert.deepEqual([...g.shape], [...c.shape], `${name}: shape`);
    if (!tol.anyDType) assert.equal(g.dtype, c.dtype, `${name}: dtype`);
    const exact = c.dtype === 'int32' || c.dtype === 'bool';
    const rtol = exact ? 0 : tol.rtol ?? (c.dtype === 'float64' ? 1e-12 : 1e-5);
    let scale = 0;
    for (const v of c.values) if (Number.isFinite(v)) scale = Math.max(scale, Math.abs(v));
    const atol = exact ? 0 : (tol.scaled ?? (c.dtype === 'float64' ? 1e-12 : 1e-6)) * scale;
    for (let i = 0; i < c.values.length; i++) {
      const a = c.values[i];
      const b = g.values[i];
      if (Number.isNaN(a) || Number.isNaN(b)) {
        assert.ok(Number.isNaN(a) && Number.isNaN(b), `${name}[${i}]: cpu ${a} vs cuda ${b}`);
        continue;
      }
      if (a === b) continue;
      assert.ok(Math.abs(a - b) <= atol + rtol * Math.max(Math.abs(a), Math.abs(b)), `${name}[${i}]: cpu ${a} vs cuda ${b} (shape ${c.shape})`);
    }
  });
}

function check(label: string, fn: () => unknown, tol?: Tol): void {
  assertSame(label, onBoth(fn), tol);
}

/** Seeded host values in [lo, hi). */
const rand = (seed: number, n: number, lo = -2, hi = 2): number[] => seededValues(seed, n, lo, hi);
/** Runs fn with the cuda backend current (tensors made inside live on the GPU). */
const onCuda = <R>(fn: () => R): R => {
  T.setBackend('cuda');
  try {
    return fn();
  } finally {
    T.setBackend('cpu');
  }
};
const R = (seed: number, shape: number[], lo = -2, hi = 2, dtype: DType = 'float32') => T.tensor(rand(seed, sizeOf(shape), lo, hi), shape, dtype);
const I = (seed: number, shape: number[], lo: number, hi: number) => T.tensor(rand(seed, sizeOf(shape), lo, hi).map(Math.floor), shape, 'int32');
/** Values on a coarse grid, so comparisons have ties. */
const Q = (seed: number, shape: number[], dtype: DType = 'float32') => T.tensor(rand(seed, sizeOf(shape), -3, 3).map(Math.round), shape, dtype);

// ---- checks that need no GPU ---------------------------------------------------------------------

describe('cuda backend: library search and allocator (no GPU needed)', () => {
  test('a missing library gives one clear error naming what was looked for and where', () => {
    const prev = process.env.CUDA_LIB_DIR;
    process.env.CUDA_LIB_DIR = '/nonexistent/cuda/lib';
    try {
      assert.throws(
        () => openLibrary({ what: 'a test library', names: ['libttt-e2e-missing.so.1'], toolkit: true }),
        (e: Error) =>
          // without koffi, the error names koffi instead
          /koffi/.test(e.message) ||
          (/could not load a test library/.test(e.message) && /libttt-e2e-missing\.so\.1/.test(e.message) && /\/nonexistent\/cuda\/lib/.test(e.message) && /CUDA_LIB_DIR/.test(e.message)),
      );
    } finally {
      if (prev === undefined) delete process.env.CUDA_LIB_DIR;
      else process.env.CUDA_LIB_DIR = prev;
    }
  });

  test('caching allocator: buckets, reuse, stats, retry after out-of-memory', () => {
    let next = 4096;
    let live = 0;
    let capacity = 10_000;
    const raw = {
      alloc: (bytes: number) => {
        if (live + bytes > capacity) throw new CudaError('out of memory', 2);
        live += bytes;
        const p = next;
        next += bytes;
        return p;
      },
      free: () => {
        live = 0; // the fake only ever frees everything at once (emptyCache)
      },
      isOutOfMemory: (e: unknown) => e instanceof CudaError && e.code === 2,
    };
    const a = new CachingAllocator(raw);
    assert.equal(bucketOf(1), 512);
    assert.equal(bucketOf(513), 1024);
    assert.equal(bucketOf(3 << 20), 4 << 20);
    const x = a.alloc(100);
    const y = a.alloc(600);
    assert.deepEqual([a.stats().inUse, a.stats().blocks, a.stats().driverAllocs], [512 + 1024, 2, 2]);
    a.free(x);
    assert.equal(a.stats().cached, 512);
    const z = a.alloc(400); // same bucket: reused, no driver call
    assert.equal(z.ptr, x.ptr);
    assert.equal(a.stats().driverAllocs, 2);
    assert.equal(a.stats().peak, 1536);
    assert.throws(() => a.free(x), /freed twice/);
    a.free(y);
    a.free(z);
    assert.equal(a.stats().inUse, 0);
    capacity = 2000;
    live = 1536;
    const big = a.alloc(1500); // does not fit next to the cache: cache emptied, then allocated
    assert.equal(a.stats().cached, 0);
    assert.equal(a.stats().driverFrees, 2);
    assert.equal(big.bytes, 1536);
    assert.equal(a.alloc(0).ptr, 0);
  });
});

// ---- every kernel, cuda vs cpu -------------------------------------------------------------------

describe('cuda vs cpu: kernels', gpu, () => {
  test('info and dtype errors', () => {
    const info = cuda!.info();
    console.log(`# cuda device: ${JSON.stringify({ device: info.device, arch: info.arch, driver: info.driverVersion, nvrtc: info.nvrtcVersion, libraries: info.libraries })}`);
    T.setBackend('cuda');
    try {
      assert.deepEqual(T.zeros([2], 'bfloat16').toArray(), [0, 0]);
      assert.throws(() => cuda!.softmax(cuda!.upload(new Int32Array([1, 2]), 'int32'), 1, 2, 'int32'), /softmax_rows needs a float dtype, got int32/);
    } finally {
      T.setBackend('cpu');
    }
  });

  test('unary ops (float32, float64) incl. special values', () => {
    const ops = ['neg', 'exp', 'log', 'sqrt', 'rsqrt', 'tanh', 'sigmoid', 'silu', 'square', 'abs', 'cos', 'sin', 'sign', 'reciprocal'] as const;
    for (const dtype of ['float32', 'float64'] as DType[]) {
      for (const op of ops) {
        const positive = ['log', 'sqrt', 'rsqrt'].includes(op);
        check(`${op} ${dtype}`, () => (T as unknown as Record<string, (x: Tensor) => Tensor>)[op](R(1, [7, 33], positive ? 0.01 : -4, 4, dtype)));
        check(`${op} ${dtype} specials`, () => (T as unknown as Record<string, (x: Tensor) => Tensor>)[op](T.tensor([0, -0, Infinity, -Infinity, NaN, 1e-30, -1e30, 88.5, -88.5], [9], dtype)));
      }
    }
  });

  test('int32 unary and binary ops (exact, JS wrapping)', () => {
    for (const op of ['neg', 'abs', 'square', 'sign'] as const) check(`${op} int32`, () => T[op](I(2, [50], -1000, 1000)));
    const big = () => T.tensor([2147483647, -2147483648, 123456789, -7, 0, 65536], [6], 'int32');
    // (div and pow are float-only in the engine)
    for (const op of ['add', 'sub', 'mul', 'maximum', 'minimum'] as const) {
      check(`${op} int32`, () => T[op](I(3, [4, 5], -50, 50), I(4, [5], 1, 9)));
      check(`${op} int32 wrap`, () => T[op](big(), T.tensor([2, 3, -4, 5, 7, 65536], [6], 'int32')));
    }
  });

  test('binary ops with broadcasting (float32, float64)', () => {
    for (const dtype of ['float32', 'float64'] as DType[]) {
      // (div and pow are float-only in the engine)
    for (const op of ['add', 'sub', 'mul', 'maximum', 'minimum'] as const) {
        check(`${op} ${dtype} [3,1,5]x[4,5]`, () => T[op](R(10, [3, 1, 5], -2, 2, dtype), R(11, [4, 5], -2, 2, dtype)));
        check(`${op} ${dtype} scalar`, () => T[op](R(12, [6, 7], -2, 2, dtype), 0.75));
        check(`${op} ${dtype} transposed`, () => T[op](T.transpose(R(13, [5, 6], -2, 2, dtype)), R(14, [6, 1], -2, 2, dtype)));
      }
      // same shapes (the 16-byte-vector kernels, with and without a tail) and a scalar on either side
      for (const shape of [[7, 33], [8, 64], [3]]) {
        check(`add/mul/div/maximum ${dtype} ${shape}`, () => {
          const [x, y] = [R(30, shape, -2, 2, dtype), R(31, shape, 0.5, 2, dtype)];
          return [T.add(x, y), T.mul(x, y), T.div(x, y), T.maximum(x, y), T.sub(0.25, x), T.div(y, 3)];
        });
      }
      check(`pow ${dtype}`, () => T.pow(R(15, [4, 9], 0.1, 3, dtype), R(16, [9], -2, 2, dtype)));
      check(`max/min NaN ${dtype}`, () => [T.maximum(T.tensor([NaN, 1, 2], [3], dtype), T.tensor([0, NaN, 1], [3], dtype)), T.minimum(T.tensor([NaN, 1, 2], [3], dtype), T.tensor([0, NaN, 1], [3], dtype))]);
    }
    check('rank-7 broadcast', () => T.add(R(17, [2, 1, 3, 1, 2, 1, 3]), R(18, [1, 2, 1, 2, 1, 3, 1])));
  });

  test('comparisons and where (float32, int32, bool)', () => {
    const cmp = ['equal', 'notEqual', 'less', 'lessEqual', 'greater', 'greaterEqual'] as const;
    for (const op of cmp) {
      check(`${op} float32`, () => T[op](Q(20, [4, 6]), Q(21, [6])));
      check(`${op} int32`, () => T[op](I(22, [4, 6], -3, 3), I(23, [4, 1], -3, 3)));
      check(`${op} bool`, () => T[op](T.cast(Q(24, [8]), 'bool'), T.cast(Q(25, [8]), 'bool')));
    }
    check('where float32', () => T.where(T.greater(Q(26, [3, 1, 4]), 0), R(27, [5, 4]), R(28, [3, 5, 1])));
    check('where int32', () => T.where(T.less(Q(29, [6]), 0), I(30, [6], -9, 9), I(31, [1], -9, 9)));
  });

  test('reductions (sum, max, min, mean) over every axis pattern', () => {
    const shape = [4, 5, 6];
    const axes: (number | number[] | undefined)[] = [undefined, 0, 1, 2, [0, 1], [1, 2], [0, 2]];
    for (const dtype of ['float32', 'float64', 'int32'] as DType[]) {
      const x = () => (dtype === 'int32' ? I(40, shape, -100, 100) : R(40, shape, -2, 2, dtype));
      for (const ax of axes) {
        for (const op of ['sum', 'max', 'min'] as const) check(`${op}(${JSON.stringify(ax)}) ${dtype}`, () => T[op](x(), ax, ax === 1));
      }
    }
    check('mean', () => T.mean(R(41, [3, 7, 5]), [0, 2]));
    check('sum of 100k (long row)', () => T.sum(R(42, [100_000])), { rtol: 1e-6 });
    check('sum over a long middle axis', () => T.sum(R(43, [3, 5000, 4]), 1));
    // the split paths (partials per chunk, combined in order) and the warp-per-row path
    for (const op of ['sum', 'max', 'min'] as const) {
      check(`${op} split columns [2,3000,70] axis 1`, () => T[op](R(44, [2, 3000, 70]), 1), { rtol: 1e-6 });
      check(`${op} split rows [3,50000]`, () => T[op](R(45, [3, 50000]), 1), { rtol: 1e-6 });
      check(`${op} warp rows [5000,37]`, () => T[op](R(46, [5000, 37]), 1));
      // hundreds of chunks per output: the final pass takes a warp per output
      check(`${op} of 600k (warp final)`, () => T[op](R(48, [600_000])), { rtol: 1e-6 });
    }
    check('NaN in a row of 600k (warp final)', () => {
      const v = rand(49, 600_000);
      v[432_101] = NaN;
      return [T.max(T.tensor(v, [600_000])), T.min(T.tensor(v, [600_000])), T.sum(T.tensor(v, [600_000]))];
    });
    check('NaN in a split column and a split row', () => {
      const nanAt = (shape: number[], at: number) => T.tensor(rand(47, sizeOf(shape)).map((v, i) => (i === at ? NaN : v)), shape);
      return [T.max(nanAt([1, 4000, 40], 2345 * 40 + 7), 1), T.min(nanAt([2, 60000], 70000), 1), T.sum(nanAt([2, 60000], 5), 1)];
    });
    check('max with NaN', () => [T.max(T.tensor([1, NaN, 3, 2], [2, 2]), 1), T.min(T.tensor([1, NaN, 3, 2], [2, 2]), 0)]);
    check('sum of empty', () => T.sum(T.zeros([0, 3]), 0));
  });

  test('softmax, logsumexp, logSoftmax, cumsum', () => {
    for (const dtype of ['float32', 'float64'] as DType[]) {
      check(`softmax last ${dtype}`, () => T.softmax(R(50, [6, 37], -8, 8, dtype)));
      check(`softmax axis 0 ${dtype}`, () => T.softmax(R(51, [9, 4, 3], -8, 8, dtype), 0));
      check(`softmax long row ${dtype}`, () => T.softmax(R(52, [2, 3000], -8, 8, dtype)));
      check(`logsumexp ${dtype}`, () => [T.logsumexp(R(53, [5, 40], -30, 30, dtype)), T.logsumexp(R(54, [5, 4, 3], -3, 3, dtype), [0, 2])]);
      check(`logSoftmax ${dtype}`, () => T.logSoftmax(R(55, [4, 11], -5, 5, dtype)));
      check(`logsumexp ±inf ${dtype}`, () => T.logsumexp(T.tensor([-Infinity, -Infinity, 1, Infinity, 0, 0], [3, 2], dtype)));
      // few long rows take the chunked path (a decoded token's logits): values, ±inf and NaN rows
      check(`logsumexp few long rows ${dtype}`, () => [T.logsumexp(R(59, [1, 128256], -20, 20, dtype)), T.logSoftmax(R(60, [3, 50000], -9, 9, dtype))]);
      check(`logsumexp long rows ±inf, NaN ${dtype}`, () => {
        const v = seededValues(61, 4 * 20000, -5, 5);
        for (let i = 0; i < 20000; i++) v[i] = -Infinity; // row 0: all -inf
        v[20000 + 17000] = Infinity; // row 1: one +inf in a late chunk
        v[40000 + 9] = NaN; // row 2: a NaN
        v[60000 + 19999] = -Infinity; // row 3: one -inf
        return T.logsumexp(T.tensor(v, [4, 20000], dtype), 1);
      });
      for (const axis of [0, 1, 2]) {
        check(`cumsum axis ${axis} ${dtype}`, () => T.cumsum(R(56, [4, 5, 6], -2, 2, dtype), axis));
        check(`cumsum reverse axis ${axis} ${dtype}`, () => T.cumsum(R(57, [4, 5, 6], -2, 2, dtype), axis, true));
      }
    }
    check('cumsum int32', () => T.cumsum(I(58, [3, 40], -50, 50), 1));
  });

  test('matmul: transposes, batches, broadcast batches, float64', () => {
    const cases: [string, number[], number[], T.MatmulOptions][] = [
      ['plain', [5, 7], [7, 3], {}],
      ['transA', [7, 5], [7, 3], { transA: true }],
      ['transB', [5, 7], [3, 7], { transB: true }],
      ['both', [7, 5], [3, 7], { transA: true, transB: true }],
      ['batched', [2, 3, 4, 5], [2, 3, 5, 6], {}],
      ['one side unbatched (stride 0)', [4, 5], [3, 5, 6], {}],
      ['broadcast batches (pointer arrays)', [2, 1, 4, 5], [3, 5, 6], {}],
      ['broadcast batches transposed', [2, 1, 5, 4], [1, 3, 6, 5], { transA: true, transB: true }],
      ['k = 0', [3, 0], [0, 4], {}],
      ['large', [130, 257], [257, 65], {}],
    ];
    for (const dtype of ['float32', 'float64'] as DType[]) {
      for (const [name, as, bs, opts] of cases) check(`matmul ${name} ${dtype}`, () => T.matmul(R(60, as, -1, 1, dtype), R(61, bs, -1, 1, dtype), opts), { scaled: dtype === 'float32' ? 2e-6 : 1e-12 });
    }
  });

  test('strided copies: transpose, slice, pad, concat, stack, broadcastTo', () => {
    for (const dtype of ['float32', 'float64', 'int32', 'bool'] as DType[]) {
      const x = () => T.cast(R(70, [3, 4, 5], -3, 3), dtype);
      check(`transpose ${dtype}`, () => T.transpose(x(), [2, 0, 1]));
      check(`slice ${dtype}`, () => T.slice(x(), [1, 0, 2], [3, 3, 5]));
      check(`pad ${dtype}`, () => T.pad(x(), [[1, 0], [0, 2], [1, 1]], dtype === 'bool' ? 1 : 7));
      check(`concat ${dtype}`, () => T.concat([x(), x()], 1));
      check(`stack ${dtype}`, () => T.stack([x(), x(), x()], 2));
      check(`broadcastTo ${dtype}`, () => T.broadcastTo(T.cast(R(71, [4, 1], -3, 3), dtype), [2, 4, 3]));
    }
  });

  test('gather, scatterAdd, takeAlongAxis; out-of-range indices throw', () => {
    for (const dtype of ['float32', 'float64', 'int32'] as DType[]) {
      const x = () => T.cast(R(80, [5, 7, 3], -3, 3), dtype);
      check(`gather axis 1 ${dtype}`, () => T.gather(x(), I(81, [2, 4], 0, 7), 1));
      check(`gather axis 0 ${dtype}`, () => T.gather(x(), I(82, [6], 0, 5), 0));
      // repeated indices: the updates add up
      check(`scatterAdd ${dtype}`, () => T.scatterAdd(x(), T.tensor([1, 1, 6, 0, 1], [5], 'int32'), T.cast(R(83, [5, 5, 3], -3, 3), dtype), 1));
    }
    check('gather bool', () => T.gather(T.cast(Q(84, [6, 2]), 'bool'), I(85, [4], 0, 6), 0));
    check('takeAlongAxis', () => T.takeAlongAxis(R(86, [4, 9]), I(87, [4, 3], 0, 9), 1));
    // deterministic, in the CPU's order: bit-identical
    check('embedding-sized scatterAdd', () => T.scatterAdd(T.zeros([50, 16]), I(88, [300], 0, 50), R(89, [300, 16]), 0), { rtol: 0, scaled: 0 });
    T.setBackend('cuda');
    try {
      assert.throws(() => T.tidy(() => T.gather(R(90, [4, 2]), T.tensor([1, 4], [2], 'int32'), 0).toArray()), /gather: index 4 out of range \[0, 4\)/);
      assert.throws(() => T.tidy(() => T.scatterAdd(R(91, [4, 2]), T.tensor([-1], [1], 'int32'), R(92, [1, 2]), 0).toArray()), /scatterAdd: index -1 out of range/);
      // indices computed on the device: the kernel finds the bad one, reported at the next sync point
      assert.throws(() => T.tidy(() => T.gather(R(93, [4, 2]), T.add(T.tensor([0, 2], [2], 'int32'), 3), 0).toArray()), /gather: index 5 out of range \[0, 4\).*found by the kernel/);
      // the error was reported once: the backend works on
      assert.equal(T.tidy(() => T.sum(T.ones([3])).item()), 3);
    } finally {
      T.setBackend('cpu');
    }
  });

  test('casts between float32, float64, int32 and bool; fill', () => {
    const dts: DType[] = ['float32', 'float64', 'int32', 'bool'];
    const specials = [0, -0, 1.5, -1.5, 2.5, -2.7, 3e9, -3e9, NaN, Infinity, -Infinity, 255.9, 256, 1e-40];
    for (const from of dts) {
      for (const to of dts) {
        check(`cast ${from}->${to}`, () => T.cast(T.cast(T.tensor(specials, [specials.length], 'float64'), from), to));
      }
    }
    for (const dtype of dts) {
      // bool takes 0 / 1 (the CPU would store other values modulo 256; cuda stores value != 0)
      for (const v of dtype === 'bool' ? [0, 1] : [0, -0, 1, -2.5, 7, NaN]) check(`full ${dtype} ${v}`, () => T.full([3, 5], v, dtype));
    }
    check('zero-size ops', () => [T.add(T.zeros([0, 3]), T.ones([3])), T.matmul(T.zeros([0, 4]), T.ones([4, 2])), T.exp(T.zeros([2, 0]))]);
  });

  test('fused AdamW (per parameter and all in one launch) equals the composite update bit for bit (float32, float64)', () => {
    for (const dtype of ['float32', 'float64'] as DType[]) {
      const run = (kernel: 'fused' | 'fusedAll' | 'composite', where: <R>(fn: () => R) => R = onCuda) => where(() => T.tidy(() => {
        const mk = (seed: number) => ({ w: R(seed, [33, 70], -2, 2, dtype), b: R(seed + 1, [70], -1e-3, 1e-3, dtype) });
        const opt = new AdamW(mk(1), { weightDecay: 0.1, kernel });
        let params = mk(1);
        for (let k = 0; k < 4; k++) params = opt.step(params, mk(10 + k), 0.02);
        const out = [params.w, params.b, opt.state.m.w, opt.state.v.b].map((x) => x.toArray());
        opt.dispose();
        return out;
      }));
      // every step is an IEEE-rounded + − × ÷ √, so the GPU also matches the CPU exactly
      // (and every parameter in one launch: the kernel behind kernel: 'fusedAll')
      const [fused, all, composite, cpu] = [run('fused'), run('fusedAll'), run('composite'), run('fused', (fn) => fn())];
      fused.forEach((xs, j) => xs.forEach((x, i) => {
        assert.ok(Object.is(x, composite[j][i]), `${dtype} output ${j}[${i}]: fused ${x} vs composite ${composite[j][i]}`);
        assert.ok(Object.is(all[j][i], composite[j][i]), `${dtype} output ${j}[${i}]: all in one launch ${all[j][i]} vs composite ${composite[j][i]}`);
        assert.ok(Object.is(x, cpu[j][i]), `${dtype} output ${j}[${i}]: cuda ${x} vs cpu ${cpu[j][i]}`);
      }));
    }
  });

  test('fused banded attention forward and backward', () => {
    const settings: [string, number[], number[], T.AttentionOptions][] = [
      ['causal', [2, 3, 10, 8], [2, 3, 10, 8], { qStart: 0, kStart: 0 }],
      ['window 4', [2, 2, 17, 16], [2, 2, 17, 16], { qStart: 0, kStart: 0, window: 4 }],
      ['offset queries (cache)', [1, 2, 5, 8], [1, 2, 12, 8], { qStart: 7, kStart: 0, window: 6 }],
      ['long band, d 64', [1, 2, 300, 64], [1, 2, 300, 64], { qStart: 0, kStart: 0, window: 200 }],
      ['d 200', [1, 1, 9, 200], [1, 1, 9, 200], { qStart: 0, kStart: 0 }],
    ];
    for (const dtype of ['float32', 'float64'] as DType[]) {
      for (const [name, qs, ks, opts] of settings) {
        const inputs = () => [R(100, qs, -1, 1, dtype), R(101, ks, -1, 1, dtype), R(102, ks, -1, 1, dtype)] as const;
        check(`attention fwd ${name} ${dtype}`, () => {
          const [q, k, v] = inputs();
          return T.scaledDotAttention(q, k, v, opts);
        }, { scaled: dtype === 'float32' ? 2e-6 : 1e-12 });
        check(`attention bwd ${name} ${dtype}`, () => {
          const [q, k, v] = inputs();
          const w = R(103, qs, -1, 1, dtype);
          return T.grad((a: Tensor, b: Tensor, c: Tensor) => T.sum(T.mul(T.scaledDotAttention(a, b, c, opts), w)), [0, 1, 2])(q, k, v);
        }, { scaled: dtype === 'float32' ? 5e-6 : 1e-12 });
        // on cuda alone: the fused kernels against the composite definition
        T.setBackend('cuda');
        try {
          const err = T.tidy(() => {
            const [q, k, v] = inputs();
            return T.max(T.abs(T.sub(T.scaledDotAttention(q, k, v, opts), T.compositeAttention(q, k, v, opts)))).item();
          });
          assert.ok(err <= (dtype === 'float32' ? 2e-6 : 1e-12), `attention fused vs composite on cuda ${name} ${dtype}: max error ${err}`);
        } finally {
          T.setBackend('cpu');
        }
      }
    }
  });
});

// ---- autodiff and the model ----------------------------------------------------------------------

describe('cuda vs cpu: gradients and TTT-E2E', gpu, () => {
  const f = (x: Tensor, w: Tensor) => {
    const h = T.silu(T.matmul(x, w));
    const p = T.softmax(T.mul(h, 1.5), -1);
    return T.add(T.sum(T.mul(p, T.tanh(h))), T.mean(T.square(T.logsumexp(h, 0))));
  };

  test('first-order gradients', () => {
    check('grad f', () => T.grad(f, [0, 1])(R(110, [6, 5], -1, 1), R(111, [5, 7], -1, 1)), { scaled: 1e-5 });
    check('grad through gather / concat / cumsum / where', () => {
      const g = (e: Tensor) => {
        const x = T.gather(e, T.tensor([3, 1, 3, 0], [4], 'int32'), 0);
        const y = T.concat([x, T.cumsum(x, 0)], 1);
        return T.sum(T.where(T.greater(y, 0), T.square(y), T.mul(y, -0.5)));
      };
      return T.grad(g)(R(112, [5, 6], -1, 1));
    }, { scaled: 1e-5 });
  });

  test('second-order gradients (grad of grad)', () => {
    check('grad of |grad f|^2', () => {
      const gx = (x: Tensor, w: Tensor) => T.sum(T.square(T.grad(f, 0)(x, w)));
      return T.grad(gx, [0, 1])(R(113, [4, 5], -1, 1), R(114, [5, 3], -1, 1));
    }, { scaled: 2e-5 });
  });

  const tiny = { variant: 'e2e' as const, vocabSize: 16, dModel: 8, nLayers: 2, nHeads: 2, ffnDim: 8, window: 4, miniBatch: 2, innerLr: 1 };

  test('TTT-E2E outer loss and meta-gradient on a tiny config', () => {
    const c = makeConfig(tiny);
    check('e2e outer loss + meta-gradient', () => {
      const params: Params = T.mapLeaves(initParams(c, T.randomKey(7), 'float32'), (t) => (t.rank >= 2 ? T.mul(t, 5) : t));
      const tokens = T.tensor([1, 5, 2, 9, 3, 3, 12, 7], [1, 8], 'int32');
      const targets = T.tensor([5, 2, 9, 3, 3, 12, 7, 4], [1, 8], 'int32');
      const [loss, g] = T.valueAndGrad((p: Params) => e2eOuterLoss(c, p, tokens, targets))(params);
      return [loss, T.leaves(g)];
    }, { rtol: 1e-4, scaled: 1e-4 });
  });

  test('allocator: a repeated training step keeps device memory flat', () => {
    const be = cuda!;
    T.setBackend('cuda');
    try {
      const c = makeConfig({ ...tiny, variant: 'swa', nLayers: 2 });
      let params: Params = initParams(c, T.randomKey(3), 'float32');
      T.mapLeaves(params, (t) => T.keep(t));
      const tokens = T.keep(T.tensor([1, 5, 2, 9, 3, 3, 12, 7], [1, 8], 'int32'));
      const targets = T.keep(T.tensor([5, 2, 9, 3, 3, 12, 7, 4], [1, 8], 'int32'));
      const step = () => {
        const next = T.tidy(() => {
          const [, g] = T.valueAndGrad((p: Params) => lmLoss(c, p, tokens, targets))(params);
          return T.zipMap([params, g as Params], ([p, d]) => T.sub(p, T.mul(d, 0.1)));
        });
        T.mapLeaves(next, (t) => T.keep(t));
        T.dispose(params);
        params = next;
      };
      const seen: { inUse: number; driverAllocs: number; live: number }[] = [];
      for (let i = 0; i < 6; i++) {
        step();
        const s = be.memoryStats();
        seen.push({ inUse: s.inUse, driverAllocs: s.driverAllocs, live: T.liveTensorCount() });
      }
      console.log(`# allocator per step: ${JSON.stringify(seen)}; stats ${JSON.stringify(be.memoryStats())}`);
      for (let i = 2; i < seen.length; i++) {
        assert.equal(seen[i].inUse, seen[1].inUse, `device bytes in use grew at step ${i}: ${JSON.stringify(seen)}`);
        assert.equal(seen[i].live, seen[1].live, `live tensors grew at step ${i}`);
        assert.equal(seen[i].driverAllocs, seen[1].driverAllocs, `the cache did not serve step ${i}: ${JSON.stringify(seen)}`);
      }
      T.dispose(params);
      T.dispose([tokens, targets]);
    } finally {
      T.setBackend('cpu');
    }
  });
});

// ---- bfloat16 -----------------------------------------------------------------------------------

/**
 * bf16 on cuda against float32 on the CPU from the same bf16-rounded inputs: `fn(dtype)` builds its
 * inputs with B16 in that dtype. Differences come from bf16 rounding of results (2^-9 relative per
 * rounding) and of intermediates, so tolerances are ~1e-2.
 */
function checkBf16(label: string, fn: (dt: DType) => unknown, tol: Tol = {}): void {
  const run = (name: string, dt: DType): HostResult[] => {
    T.setBackend(name);
    try {
      return T.tidy(() => toHost(fn(dt)));
    } finally {
      T.setBackend('cpu');
    }
  };
  assertSame(label, { cpu: run('cpu', 'float32'), gpu: run('cuda', 'bfloat16') }, { rtol: 8e-3, scaled: 8e-3, ...tol, anyDType: true });
}
const B16 = (seed: number, shape: number[], lo: number, hi: number, dt: DType) => T.tensor(T.roundToBfloat16(rand(seed, sizeOf(shape), lo, hi)), shape, dt);

describe('cuda bfloat16 vs cpu float32', gpu, () => {
  test('upload, download and casts round to nearest even exactly as the host does', () => {
    const specials = [0, -0, 1, -1, 1 + 2 ** -8, 1 + 3 * 2 ** -8, 1 + 2 ** -9, 3.4e38, -3.4e38, 1e-40, -1e-42, 2 ** -133, Infinity, -Infinity, NaN, 65504.5, 0.1, -0.3];
    const values = [...specials, ...rand(90, 500, -1e4, 1e4), ...rand(91, 500, -1e-3, 1e-3)];
    const want = [...T.roundToBfloat16(values)];
    onCuda(() => {
      const same = (got: number[], what: string) => got.forEach((v, i) => assert.ok(Object.is(v, want[i]) || (Number.isNaN(v) && Number.isNaN(want[i])), `${what}[${i}]: ${values[i]} -> ${v}, want ${want[i]}`));
      same(T.tensor(values, [values.length], 'bfloat16').toArray(), 'upload');
      same(T.cast(T.tensor(values, [values.length], 'float32'), 'bfloat16').toArray(), 'cast float32->bfloat16');
      same(T.cast(T.cast(T.tensor(values, [values.length], 'bfloat16'), 'float32'), 'bfloat16').toArray(), 'bf16->f32->bf16');
      assert.deepEqual(T.cast(T.tensor([1.7, -2.5, 0, 3], [4], 'bfloat16'), 'int32').toArray(), [1, -2, 0, 3]);
      assert.deepEqual(T.cast(T.tensor([0, 2, -0], [3], 'bfloat16'), 'bool').toArray(), [0, 1, 0]);
      assert.deepEqual(T.full([3], 0.1, 'bfloat16').toArray(), [...T.roundToBfloat16([0.1, 0.1, 0.1])]);
    });
  });

  test('elementwise, broadcasts, comparisons and where', () => {
    const ops = ['neg', 'exp', 'log', 'sqrt', 'rsqrt', 'tanh', 'sigmoid', 'silu', 'square', 'abs', 'cos', 'sin', 'reciprocal'] as const;
    for (const op of ops) {
      const positive = ['log', 'sqrt', 'rsqrt'].includes(op);
      checkBf16(`${op} bf16`, (dt) => (T as unknown as Record<string, (x: Tensor) => Tensor>)[op](B16(1, [7, 33], positive ? 0.01 : -4, 4, dt)));
    }
    for (const op of ['add', 'sub', 'mul', 'div', 'maximum', 'minimum'] as const) {
      checkBf16(`${op} bf16 same shape (vectors and a tail)`, (dt) => T[op](B16(12, [7, 33], 0.5, 2, dt), B16(15, [7, 33], 0.5, 2, dt)));
      checkBf16(`${op} bf16 by a scalar`, (dt) => T[op](B16(16, [4, 64], 0.5, 2, dt), 1.5));
      checkBf16(`${op} bf16 [3,1,5]x[4,5]`, (dt) => T[op](B16(10, [3, 1, 5], 0.5, 2, dt), B16(11, [4, 5], 0.5, 2, dt)));
      checkBf16(`${op} bf16 transposed`, (dt) => T[op](T.transpose(B16(13, [5, 6], 0.5, 2, dt)), B16(14, [6, 1], 0.5, 2, dt)));
    }
    checkBf16('compare + where bf16', (dt) => {
      const a = B16(20, [4, 6], -2, 2, dt);
      const b = B16(21, [6], -2, 2, dt);
      return [T.cast(T.greater(a, b), 'float32'), T.where(T.less(a, b), a, T.mul(b, 2))];
    });
  });

  test('reductions, softmax, logsumexp, cumsum', () => {
    for (const ax of [undefined, 0, 1, 2, [0, 2]] as (number | number[] | undefined)[]) {
      for (const op of ['sum', 'max', 'min', 'mean'] as const) checkBf16(`${op}(${JSON.stringify(ax)}) bf16`, (dt) => T[op](B16(40, [4, 50, 6], -2, 2, dt), ax));
    }
    checkBf16('softmax bf16', (dt) => [T.softmax(B16(50, [6, 37], -8, 8, dt)), T.softmax(B16(51, [2, 3000], -8, 8, dt))]);
    checkBf16('logsumexp / logSoftmax bf16', (dt) => [T.logsumexp(B16(53, [5, 40], -30, 30, dt)), T.logSoftmax(B16(55, [4, 11], -5, 5, dt))]);
    checkBf16('cumsum bf16', (dt) => [T.cumsum(B16(56, [4, 20, 6], -2, 2, dt), 1), T.cumsum(B16(57, [4, 5, 6], -2, 2, dt), 2, true)], { scaled: 1.5e-2 });
  });

  test('matmul on tensor cores: transposes, strided and pointer-array batches', () => {
    const cases: [string, number[], number[], T.MatmulOptions][] = [
      ['plain', [5, 7], [7, 3], {}],
      ['both transposed', [7, 5], [3, 7], { transA: true, transB: true }],
      ['batched', [2, 3, 4, 5], [2, 3, 5, 6], {}],
      ['broadcast batches (pointer arrays)', [2, 1, 4, 5], [3, 5, 6], {}],
      ['large', [130, 257], [257, 65], {}],
    ];
    for (const [name, as, bs, opts] of cases) checkBf16(`matmul ${name} bf16`, (dt) => T.matmul(B16(60, as, -1, 1, dt), B16(61, bs, -1, 1, dt), opts));
  });

  test('copies, gather and scatter-add (its gradient)', () => {
    checkBf16('transpose / slice / concat bf16', (dt) => {
      const x = B16(70, [3, 4, 5], -3, 3, dt);
      return [T.transpose(x, [2, 0, 1]), T.slice(x, [1, 0, 2], [3, 3, 5]), T.concat([x, x], 1)];
    });
    checkBf16('gather + scatterAdd bf16', (dt) => {
      const idx = T.tensor([3, 1, 3, 0, 3], [5], 'int32');
      return T.grad((e: Tensor) => T.sum(T.mul(T.gather(e, idx, 0), B16(81, [5, 6], -1, 1, dt))))(B16(80, [5, 6], -1, 1, dt));
    });
  });

  test('mixed matmul: bf16 activations by float32 weights compute in bf16, the weights\' gradient comes from the GEMM in float32', () => {
    onCuda(() => T.tidy(() => {
      const x = B16(112, [3, 9, 16], -1, 1, 'bfloat16');
      const w = T.tensor(rand(113, 16 * 24, -1, 1), [16, 24], 'float32');
      const g = B16(114, [3, 9, 24], -1, 1, 'bfloat16');
      // forward: the same bf16 GEMM as an explicit cast, bit for bit
      const mixed = T.matmul(x, w);
      assert.equal(mixed.dtype, 'bfloat16');
      assert.deepEqual(mixed.toArray(), T.matmul(x, T.cast(w, 'bfloat16')).toArray());
      const wide = T.matmul(x, T.cast(w, 'bfloat16'), { outDType: 'float32' });
      assert.equal(wide.dtype, 'float32');
      const ref = T.matmul(T.cast(x, 'float32'), T.cast(T.cast(w, 'bfloat16'), 'float32')).toArray();
      wide.toArray().forEach((v, i) => assert.ok(Math.abs(v - ref[i]) <= 1e-5 * (1 + Math.abs(ref[i])), `float32 product [${i}]: ${v} vs ${ref[i]}`));
      // first order: dx equal to the composite's, dw float32 and within bf16 rounding of it (one rounding fewer)
      const loss = (cast: boolean) => (a: Tensor, b: Tensor) => T.sum(T.cast(T.mul(T.matmul(a, cast ? T.cast(b, 'bfloat16') : b), g), 'float32'));
      const [dxM, dwM] = T.grad(loss(false), [0, 1])(x, w) as Tensor[];
      const [dxC, dwC] = T.grad(loss(true), [0, 1])(x, w) as Tensor[];
      assert.deepEqual([dxM.dtype, dwM.dtype], ['bfloat16', 'float32']);
      assert.deepEqual(dxM.toArray(), dxC.toArray());
      const [a, b] = [dwM.toArray(), dwC.toArray()];
      a.forEach((v, i) => assert.ok(Math.abs(v - b[i]) <= 8e-3 * (1 + Math.abs(b[i])), `dw [${i}]: ${v} vs ${b[i]}`));
      // second order through it (the backward traced): a Hessian-vector product near the composite's
      const v = T.tensor(rand(115, 16 * 24, -1, 1), [16, 24], 'float32');
      const nl = (cast: boolean) => (b: Tensor) => T.sum(T.cast(T.mul(T.tanh(T.matmul(x, cast ? T.cast(b, 'bfloat16') : b)), g), 'float32'));
      const hvp = (cast: boolean) => (T.grad((b: Tensor) => T.sum(T.mul(T.grad(nl(cast))(b) as Tensor, v)))(w) as Tensor).toArray();
      const [hm, hc] = [hvp(false), hvp(true)];
      const scale = Math.max(...hc.map(Math.abs));
      hm.forEach((e, i) => assert.ok(Math.abs(e - hc[i]) <= 3e-2 * scale, `hvp [${i}]: ${e} vs ${hc[i]}`));
    }));
  });

  test('mixed precision: bf16 compute from float32 master weights, gradients reach the masters in float32', () => {
    const f = (dt: DType) => (x: Tensor, w: Tensor) => {
      const h = T.silu(T.matmul(T.cast(x, dt), T.cast(w, dt)));
      const p = T.softmax(T.mul(h, 1.5), -1);
      return T.cast(T.sum(T.mul(p, T.tanh(h))), 'float32');
    };
    const x = () => T.tensor(T.roundToBfloat16(rand(110, 30, -1, 1)), [6, 5]);
    const w = () => T.tensor(T.roundToBfloat16(rand(111, 35, -1, 1)), [5, 7]);
    checkBf16('loss and grads', (dt) => {
      const [loss, g] = T.valueAndGrad(f(dt), { argnums: [0, 1] })(x(), w());
      for (const t of g as Tensor[]) assert.equal(t.dtype, 'float32');
      return [loss, g];
    }, { rtol: 3e-2, scaled: 3e-2 });
  });

  test('a bf16-compute TTT-E2E outer loss and meta-gradient stay near float32, with float32 gradients', () => {
    // Element-wise bounds do not fit bf16 here: small entries of a second-order gradient carry
    // absolute noise of the bf16 rounding of large intermediates. The loss is checked relatively,
    // each parameter's gradient norm-wise (||g_bf16 - g_fp32|| / ||g_fp32||), both runs on cuda.
    const base = { variant: 'e2e' as const, vocabSize: 32, dModel: 32, nLayers: 4, nHeads: 2, ffnDim: 32, window: 8, miniBatch: 4, innerLr: 1 };
    const run = (bf16: boolean) => onCuda(() => T.tidy(() => {
      const c = makeConfig({ ...base, computeDType: bf16 ? 'bfloat16' : undefined });
      const params: Params = T.mapLeaves(initParams(c, T.randomKey(7), 'float32'), (t) => (t.rank >= 2 ? T.mul(t, 5) : t));
      const tokens = T.tensor(rand(120, 16, 0, 32).map(Math.floor), [1, 16], 'int32');
      const targets = T.tensor(rand(121, 16, 0, 32).map(Math.floor), [1, 16], 'int32');
      const [loss, g] = T.valueAndGrad((p: Params) => e2eOuterLoss(c, p, tokens, targets))(params);
      for (const t of T.leaves(g)) assert.equal(t.dtype, 'float32');
      assert.equal((loss as Tensor).dtype, 'float32');
      return { loss: (loss as Tensor).item(), grads: T.leaves(g).map((t) => t.toArray()) };
    }));
    const lo = run(true);
    const hi = run(false);
    assert.ok(Math.abs(lo.loss - hi.loss) <= 1e-2 * Math.abs(hi.loss), `loss bf16 ${lo.loss} vs fp32 ${hi.loss}`);
    const norm = (xs: number[]) => Math.sqrt(xs.reduce((a, x) => a + x * x, 0));
    const errs = hi.grads.map((g, i) => norm(g.map((x, j) => x - lo.grads[i][j])) / Math.max(norm(g), 1e-12));
    console.log(`# bf16 vs fp32 meta-gradient, norm-wise relative error per parameter: max ${Math.max(...errs).toExponential(2)}, median ${[...errs].sort((a, b) => a - b)[errs.length >> 1].toExponential(2)}`);
    // measured on an H100: median 0.06, largest 0.12 (an early block's MLP, at the end of the longest
    // chain of bf16 roundings); a wrong cast or a float32 path lost shows as errors near 1
    errs.forEach((e, i) => assert.ok(e < 0.2, `parameter ${i}: norm-wise error ${e.toExponential(2)}`));
  });
});

// keep the Backend type import used for readers of this file
export type { Backend };
