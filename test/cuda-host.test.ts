/**
 * The cuda backend's host-side logic, on any machine: the backend runs over stand-in native
 * libraries (src/backends/cuda/stand-in.ts) that accept every call. Checks the kernel-argument
 * packing (numbers written as 64-bit words without BigInt) against a BigInt encoding, the index
 * struct of strided kernels against the engine's `coalesce`, and that a launch passes what it packed.
 * Needs koffi (an optional dependency) for the argument buffers; without it the file skips.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { coalesce } from '../src/engine/shape.js';
import { koffiOrSkip } from './helpers/cuda.js';

const opts = await koffiOrSkip();
process.env.TTT_CACHE_DIR ??= '/tmp/ttt-e2e-stand-in-cache';

async function standInBackend() {
  const { CudaBackend } = await import('../src/backends/cuda/backend.js');
  const { standInLibraries } = await import('../src/backends/cuda/stand-in.js');
  const libs = standInLibraries();
  return { backend: new CudaBackend(0, libs), calls: libs.calls };
}

describe('cuda backend host side (stand-in libraries)', () => {
  test('ArgPacker writes 64-bit words equal to a BigInt encoding, at the addresses it hands the driver', opts, async () => {
    const { ArgPacker } = await import('../src/backends/cuda/ffi.js');
    const p = new ArgPacker();
    const values = [0, 1, -1, 2 ** 32 - 1, 2 ** 32, 2 ** 40 + 12345, -(2 ** 35) - 7, 2 ** 53 - 1, 0x7f1234567890];
    p.reset().i32(7);
    for (const v of values) p.i64(v);
    p.f64(0.5).ptr(0x7f00deadbe00).i64s([3, -4, 2 ** 33]);
    const want = new DataView(new ArrayBuffer(8 * (values.length + 6)));
    want.setInt32(0, 7, true);
    let at = 8; // the i32 slot, then 8-byte alignment
    for (const v of values) {
      want.setBigInt64(at, BigInt(v), true);
      at += 8;
    }
    want.setFloat64(at, 0.5, true);
    want.setBigUint64(at + 8, 0x7f00deadbe00n, true);
    want.setBigInt64(at + 16, 3n, true);
    want.setBigInt64(at + 24, -4n, true);
    want.setBigInt64(at + 32, 2n ** 33n, true);
    assert.deepEqual([...p.bytes()], [...new Uint8Array(want.buffer, 0, at + 40)]);
    // argument i's address: base + its slot
    const slots = [0, ...values.map((_, i) => 8 + 8 * i), at, at + 8, at + 16];
    slots.forEach((s, i) => assert.equal(p.argAddress(i), p.baseAddress() + s, `argument ${i}`));
  });

  test('the index struct equals coalesce() padded to MAX_RANK, for broadcasts and permutations', opts, async () => {
    const { backend } = await standInBackend();
    const { MAX_RANK } = await import('../src/backends/cuda/kernels/common.js');
    const ix = (backend as unknown as { ix(shape: number[], s: number[][]): Float64Array }).ix.bind(backend);
    const cases: [number[], number[][]][] = [
      [[], [[], []]],
      [[5], [[1], [0]]],
      [[2, 3, 4], [[12, 4, 1], [0, 0, 1]]],
      [[2, 1, 3, 4], [[12, 12, 4, 1], [12, 12, 4, 1]]],
      [[4, 3], [[1, 4], [3, 1]]],
      [[2, 3, 4], [[12, 4, 1], [4, 0, 1], [0, 1, 0]]],
      [[6, 1, 1, 5], [[5, 5, 5, 1], [0, 0, 0, 1]]],
    ];
    for (const [shape, strides] of cases) {
      const c = coalesce(shape, strides);
      const want = new Array<number>(1 + 4 * MAX_RANK).fill(0);
      want[0] = c.shape.length;
      for (let i = 0; i < MAX_RANK; i++) want[1 + i] = c.shape[i] ?? 1;
      c.strides.forEach((st, j) => st.forEach((v, i) => (want[1 + MAX_RANK * (j + 1) + i] = v)));
      assert.deepEqual([...ix(shape, strides)], want, `shape ${shape.join('x')}`);
    }
    // nine axes that cannot merge (each stride 1 where merging needs stride × size)
    assert.throws(() => ix(new Array(9).fill(2), [new Array(9).fill(1)]), /rank > 8/);
  });

  test('a binary op launches once: the flat kernel when the operands coalesce to rank <= 1 (over 16-byte vectors for floats), else the strided one', opts, async () => {
    const { backend, calls } = await standInBackend();
    const a = backend.fill(1000, 'float32', 2);
    const b = backend.fill(1000, 'float32', 3);
    const launch = (run: () => void) => {
      const before = calls.counts.get('cuLaunchKernel') ?? 0;
      run();
      assert.equal(calls.counts.get('cuLaunchKernel'), before + 1);
      const [fn, gx, , , bx, , , shared] = calls.lastLaunch as [{ name: string }, number, number, number, number, number, number, number];
      return { name: fn.name, gx, bx, shared };
    };
    // 1000 float32 elements: 250 vectors of 4, one block
    assert.deepEqual(launch(() => backend.binary('mul', a, [1], b, [1], [1000], 'float32')), { name: 'binary_vec_mul', gx: 1, bx: 256, shared: 0 });
    assert.deepEqual(launch(() => backend.binary('add', a, [50, 1], b, [0, 0], [20, 50], 'float32')).name, 'binary_vec_add'); // scalar b
    assert.deepEqual(launch(() => backend.binary('sub', a, [50, 1], b, [0, 1], [20, 50], 'float32')).name, 'binary_sub'); // row broadcast
    assert.deepEqual(launch(() => backend.binary('add', a, [1], b, [1], [3], 'float32')).name, 'binary_flat_add', 'fewer elements than a vector');
    const bb = backend.fill(4100, 'bfloat16', 1);
    assert.deepEqual(launch(() => backend.binary('add', bb, [1], bb, [1], [4100], 'bfloat16')), { name: 'binary_vec_add', gx: 3, bx: 256, shared: 0 }); // 512 vectors of 8 and a tail
    const ia = backend.fill(1000, 'int32', 2);
    assert.deepEqual(launch(() => backend.binary('mul', ia, [1], ia, [1], [1000], 'int32')).name, 'binary_flat_mul', 'int32 keeps its wrapping product');
    assert.deepEqual(launch(() => backend.unary('exp', a, 1000, 'float32')), { name: 'unary_vec_exp', gx: 1, bx: 256, shared: 0 });
    assert.deepEqual(launch(() => backend.unary('square', ia, 1000, 'int32')).name, 'unary_square');
    assert.deepEqual(launch(() => backend.unary('exp', a, 3, 'float32')).name, 'unary_exp');
  });

  test('a strided copy whose rows are whole aligned 16-byte vectors on both sides moves 16 bytes per element', opts, async () => {
    const { backend, calls } = await standInBackend();
    const last = () => {
      const [fn, gx] = calls.lastLaunch as [{ name: string }, number];
      return { name: fn.name, gx };
    };
    const src = backend.fill(8 * 12 * 64, 'bfloat16', 0);
    const dst = backend.fill(8 * 12 * 64, 'bfloat16', 0);
    // a head split: [T 8, H 12, D 64] read as [H, T, D] (rows of 64 bf16 = 8 vectors)
    backend.copy(src, 0, [64, 768, 1], dst, 0, [768, 64, 1], [12, 8, 64], 'bfloat16');
    assert.deepEqual(last(), { name: 'copy_strided_16', gx: Math.ceil((8 * 12 * 64) / 8 / 256) });
    // rows of 60: not whole vectors; an offset of 4 elements: not aligned; a float32 transpose of single elements
    backend.copy(src, 0, [60, 720, 1], dst, 0, [720, 60, 1], [12, 8, 60], 'bfloat16');
    assert.equal(last().name, 'copy_strided_2');
    backend.copy(src, 4, [64, 768, 1], dst, 0, [768, 64, 1], [12, 7, 64], 'bfloat16');
    assert.equal(last().name, 'copy_strided_2');
    const f = backend.fill(64 * 64, 'float32', 0);
    backend.copy(f, 0, [1, 64], f, 0, [64, 1], [64, 64], 'float32');
    assert.equal(last().name, 'copy_strided_4');
  });

  test('a split reduction ends with a warp per output when each output has many partials, else a thread per output', opts, async () => {
    const { backend, calls } = await standInBackend();
    const reduce = (outer: number, n: number, inner: number) => {
      const x = backend.fill(outer * n * inner, 'float32', 1);
      const before = calls.counts.get('cuLaunchKernel') ?? 0;
      backend.reduce('sum', x, outer, n, inner, 'float32');
      assert.equal((calls.counts.get('cuLaunchKernel') ?? 0) - before, 2, 'partials, then the final pass');
      return (calls.lastLaunch as [{ name: string }])[0].name;
    };
    assert.equal(reduce(1, 600_000, 1), 'reduce_final_warp_sum'); // 147 chunks of 4096
    assert.equal(reduce(3, 50_000, 1), 'reduce_final_sum'); // 13 chunks each
  });

  test('an AdamW update of one parameter is one kernel launch (float32, float64); other dtypes are refused', opts, async () => {
    const { backend, calls } = await standInBackend();
    const h = { beta1: 0.9, oneMinusBeta1: 0.1, beta2: 0.95, oneMinusBeta2: 0.05, c1: 0.1, c2: 0.05, eps: 1e-8, lr: 0.01, decay: true, shrink: 0.999 };
    for (const dt of ['float32', 'float64'] as const) {
      const x = backend.fill(5000, dt, 1);
      const before = calls.counts.get('cuLaunchKernel') ?? 0;
      backend.adamw(x, x, x, x, 5000, h, dt);
      assert.equal(calls.counts.get('cuLaunchKernel'), before + 1);
      assert.equal((calls.lastLaunch as [{ name: string }])[0].name, 'adamw_step');
    }
    assert.throws(() => backend.adamw(null, null, null, null, 10, h, 'bfloat16'), /adamw needs float32 or float64, got bfloat16/);
  });

  test('the fused RoPE, SwiGLU gate and token NLL launch one kernel each, with the grids their sizes need', opts, async () => {
    const { backend, calls } = await standInBackend();
    const launch = (run: () => void) => {
      const before = calls.counts.get('cuLaunchKernel') ?? 0;
      run();
      const [fn, gx, gy, , bx] = calls.lastLaunch as [{ name: string }, number, number, number, number];
      return { launches: (calls.counts.get('cuLaunchKernel') ?? 0) - before, name: fn.name, gx, bx, ...(gy > 1 ? { gy } : {}) };
    };
    for (const dt of ['float32', 'float64', 'bfloat16'] as const) {
      const x = backend.fill(2 * 6 * 4 * 16, dt, 1);
      const tab = backend.fill(6 * 8, dt, 0.5);
      assert.deepEqual(launch(() => backend.rope(x, tab, tab, 2, 6, 4, 16, false, dt)), { launches: 1, name: 'rope_pairs', gx: 2, bx: 256 });
      assert.deepEqual(launch(() => backend.swigluForward(x, x, 768, dt)), { launches: 1, name: 'swiglu_fwd', gx: 3, bx: 256 });
      assert.deepEqual(launch(() => backend.swigluBackward(x, x, x, 768, dt)), { launches: 1, name: 'swiglu_bwd', gx: 3, bx: 256 });
      const targets = backend.upload(Int32Array.from([0, 5, 9]), 'int32');
      const logits = backend.fill(3 * 10, dt, 0);
      const f = launch(() => backend.tokenNllForward(logits, targets, 3, 10, dt));
      assert.deepEqual([f.launches, f.name], [1, 'token_nll_fwd']);
      // blocks along a row × one row of blocks per logits row
      assert.deepEqual(launch(() => backend.tokenNllBackward(logits, targets, logits, logits, 3, 10, dt)), { launches: 1, name: 'token_nll_bwd', gx: 1, bx: 256, gy: 3 });
      const wide = backend.fill(3 * 128256, dt, 0);
      const perRow = Math.ceil(128256 / (16 / { float32: 4, float64: 8, bfloat16: 2 }[dt]) / 256);
      assert.deepEqual(launch(() => backend.tokenNllBackward(wide, targets, logits, logits, 3, 128256, dt)), { launches: 1, name: 'token_nll_bwd', gx: perRow, bx: 256, gy: 3 });
      // targets uploaded from the host are range-checked at once, before any launch
      const bad = backend.upload(Int32Array.from([0, 10, 1]), 'int32');
      assert.throws(() => backend.tokenNllForward(logits, bad, 3, 10, dt), /tokenNll: index 10 out of range \[0, 10\)/);
    }
  });

  test('matmul writes float32 from bfloat16 operands (cuBLAS C type CUDA_R_32F), and refuses other widenings', opts, async () => {
    const { backend, calls } = await standInBackend();
    const a = backend.fill(32 * 8, 'bfloat16', 1);
    const b = backend.fill(8 * 64, 'bfloat16', 1);
    const job = { batch: 1, m: 32, n: 64, k: 8, transA: false, transB: false, aOffsets: Int32Array.of(0), bOffsets: Int32Array.of(0) };
    backend.matmul(a, b, job, 'bfloat16');
    assert.equal(calls.last.get('cublasGemmEx')![15], 14, 'bf16 product: C is CUDA_R_16BF');
    const c = backend.matmul(a, b, job, 'bfloat16', 'float32');
    assert.equal(calls.last.get('cublasGemmEx')![15], 0, 'float32 product: C is CUDA_R_32F');
    assert.equal(c.bytes, 32 * 64 * 4, 'a float32 buffer');
    const two = { ...job, batch: 2, aOffsets: Int32Array.of(0, 0), bOffsets: Int32Array.of(0, 0) };
    backend.matmul(a, b, two, 'bfloat16', 'float32');
    assert.equal(calls.last.get('cublasGemmStridedBatchedEx')![17], 0, 'batched float32 product');
    assert.throws(() => backend.matmul(a, b, job, 'float32', 'float64'), /matmul of float32 cannot write float64/);
  });

  test('into a running cotangent: matmul with β = 1 and C the given buffer for every GEMM entry point, addInto, the token NLL\'s backward kernels; no new buffer', opts, async () => {
    const { backend, calls } = await standInBackend();
    const job = { batch: 1, m: 32, n: 64, k: 8, transA: false, transB: false, aOffsets: Int32Array.of(0), bOffsets: Int32Array.of(0) };
    const cases = [
      { dt: 'bfloat16', out: 'float32', job, fn: 'cublasGemmEx', beta: 13, c: 14 },
      { dt: 'bfloat16', out: 'bfloat16', job: { ...job, batch: 2, aOffsets: Int32Array.of(0, 256), bOffsets: Int32Array.of(0, 512) }, fn: 'cublasGemmStridedBatchedEx', beta: 15, c: 16 },
      { dt: 'float32', out: 'float32', job, fn: 'cublasSgemmStridedBatched', beta: 13, c: 14 },
      { dt: 'float64', out: 'float64', job: { ...job, batch: 2, aOffsets: Int32Array.of(0, 0), bOffsets: Int32Array.of(0, 0) }, fn: 'cublasDgemmStridedBatched', beta: 13, c: 14 },
      { dt: 'float32', out: 'float32', job: { ...job, batch: 3, aOffsets: Int32Array.of(0, 256, 0), bOffsets: Int32Array.of(0, 0, 512) }, fn: 'cublasSgemmBatched', beta: 11, c: 12 },
    ] as const;
    for (const k of cases) {
      const a = backend.fill(3 * 32 * 8, k.dt, 1);
      const b = backend.fill(3 * 8 * 64, k.dt, 1);
      const acc = backend.fill(k.job.batch * 32 * 64, k.out, 0);
      const plain = backend.matmul(a, b, k.job, k.dt, k.out);
      const alpha = calls.last.get(k.fn)![6];
      const zero = calls.last.get(k.fn)![k.beta];
      assert.notEqual(zero, alpha, `${k.fn}: β = 0 without accumulate`);
      const inUse = backend.memoryStats().inUse;
      const got = backend.matmul(a, b, k.job, k.dt, k.out, acc);
      const args = calls.last.get(k.fn)!;
      assert.equal(got, acc, `${k.fn}: returns the buffer it added into`);
      assert.equal(args[k.beta], alpha, `${k.fn}: β is the scalar one`);
      // (the pointer-array call gets C through its device array of pointers)
      if (k.fn !== 'cublasSgemmBatched') assert.equal(args[k.c], acc.ptr, `${k.fn}: C is the running cotangent`);
      assert.equal(backend.memoryStats().inUse, inUse, `${k.fn}: no new device buffer is left`);
      backend.free(plain);
    }
    const dst = backend.fill(5000, 'bfloat16', 1);
    const src = backend.fill(5000, 'bfloat16', 2);
    const inUse = backend.memoryStats().inUse;
    backend.addInto(dst, src, 5000, 'bfloat16');
    assert.equal((calls.lastLaunch as [{ name: string }])[0].name, 'binary_vec_add');
    assert.equal(backend.memoryStats().inUse, inUse, 'addInto writes dst: no new buffer');
    const wide = backend.fill(5000, 'float32', 1);
    backend.addInto(wide, src, 5000, 'float32', 'bfloat16');
    assert.equal((calls.lastLaunch as [{ name: string }])[0].name, 'cast_add_bfloat16_float32', 'a bfloat16 contribution to a float32 cotangent');
    const copies = calls.counts.get('cuMemcpyDtoDAsync') ?? 0;
    const rowsIdx = backend.upload(Int32Array.of(1, 0, 1), 'int32');
    const held2 = backend.memoryStats().inUse;
    assert.equal(backend.scatterAdd(wide, rowsIdx, wide, 1, 10, 500, 3, 'float32', true), wide, 'scatter-add into the table itself');
    assert.deepEqual([calls.counts.get('cuMemcpyDtoDAsync') ?? 0, backend.memoryStats().inUse], [copies, held2], 'no copy of the base, no new buffer');
    // the token NLL's backward kernels, added into the logits' running cotangent
    const [rows, V] = [4, 1000];
    const [logits, prior, u] = [0, 1, 2].map(() => backend.fill(rows * V, 'bfloat16', 0));
    const [lse, g] = [backend.fill(rows, 'float32', 0), backend.fill(rows, 'float32', 1)];
    const targets = backend.upload(Int32Array.of(0, 1, 2, 3), 'int32');
    const held = backend.memoryStats().inUse;
    assert.equal(backend.tokenNllBackward(logits, targets, lse, g, rows, V, 'bfloat16', prior), prior);
    assert.equal((calls.lastLaunch as [{ name: string }])[0].name, 'token_nll_bwd_acc');
    assert.equal(backend.memoryStats().inUse, held, 'no new [rows, V] buffer');
    const r = backend.tokenNllGradBackward(logits, targets, lse, g, u, rows, V, 'bfloat16', prior);
    assert.deepEqual([r.dLogits === prior, (calls.lastLaunch as [{ name: string }])[0].name], [true, 'token_nll_hvp_acc']);
    backend.tokenNllBackward(logits, targets, lse, g, rows, V, 'bfloat16');
    assert.equal((calls.lastLaunch as [{ name: string }])[0].name, 'token_nll_bwd', 'without accumulate, the plain kernel');
  });

  test('AdamW of every parameter in one launch: the table of pointers, sizes, first blocks and decay, and the grid', opts, async () => {
    const { backend, calls } = await standInBackend();
    const sizes = [5000, 0, 3, 9000];
    const entries = sizes.map((n, i) => ({ p: backend.fill(n, 'float32', 1), g: backend.fill(n, 'float32', 1), m: backend.fill(n, 'float32', 0), v: backend.fill(n, 'float32', 0), size: n, decay: i !== 2 }));
    const h = { beta1: 0.9, oneMinusBeta1: 0.1, beta2: 0.95, oneMinusBeta2: 0.05, c1: 0.1, c2: 0.05, eps: 1e-8, lr: 0.01, decay: true, shrink: 0.999 };
    const out = backend.adamwAll(entries, h, 'float32');
    assert.equal(out.length, 4, 'outputs for every parameter, the empty one included');
    const [fn, grid] = calls.lastLaunch as [{ name: string }, number];
    assert.deepEqual([fn.name, grid], ['adamw_all', 2 + 1 + 3], 'ceil(n / 4096) blocks per non-empty parameter');
    const words = calls.last.get('cuMemcpyHtoDAsync')![1] as Uint32Array;
    const word = (k: number) => words[2 * k] + words[2 * k + 1] * 2 ** 32;
    assert.equal(words.length, 2 * 10 * 3, 'ten 64-bit words for each of the three non-empty parameters');
    const live = [0, 2, 3];
    const firsts = [0, 2, 3];
    live.forEach((i, j) => {
      const e = entries[i];
      const got = Array.from({ length: 10 }, (_, w) => word(j * 10 + w));
      assert.deepEqual(got, [e.p.ptr, e.g.ptr, e.m.ptr, e.v.ptr, out[i].p.ptr, out[i].m.ptr, out[i].v.ptr, e.size, firsts[j], e.decay ? 1 : 0], `entry of parameter ${i}`);
    });
    assert.throws(() => backend.adamwAll(entries, h, 'bfloat16'), /adamw needs float32 or float64/);
  });

  test('addcmul: a factor per row of contiguous a, b takes the 16-byte-vector kernel, anything else the strided one', opts, async () => {
    const { backend, calls } = await standInBackend();
    const name = () => (calls.lastLaunch as [{ name: string }])[0].name;
    const run = (shape: number[], sc: number[], n = shape.reduce((p, d) => p * d, 1), dt: 'float32' | 'bfloat16' = 'float32') => {
      const full = shape.map((_, i) => shape.slice(i + 1).reduce((p, d) => p * d, 1));
      const [a, b, c] = [backend.fill(n, dt, 1), backend.fill(n, dt, 1), backend.fill(n, dt, 1)];
      backend.addcmul(a, full, b, full, c, sc, shape, dt);
      return name();
    };
    assert.equal(run([2, 768, 1664], [1, 0, 0]), 'addcmul_rows_vec', 'a factor per sequence');
    assert.equal(run([1, 768, 1664], [0, 0, 0]), 'addcmul_rows_vec', 'one factor');
    assert.equal(run([4, 64], [1, 0], 256, 'bfloat16'), 'addcmul_rows_vec', 'bf16 rows of 64');
    assert.equal(run([4, 6], [1, 0]), 'addcmul', 'rows of 6 floats are not whole vectors');
    assert.equal(run([4, 8], [0, 1]), 'addcmul', 'a factor per column');
    assert.equal(run([4, 8], [8, 1]), 'addcmul', 'three full operands');
  });

  test('RMSNorm takes the 16-byte for rows of whole vectors (up to 8 per lane), else the element-wise ones', opts, async () => {
    const { backend, calls } = await standInBackend();
    const name = () => (calls.lastLaunch as [{ name: string }])[0].name;
    for (const [dt, d, vec] of [
      ['bfloat16', 768, true], ['bfloat16', 2048, true], ['bfloat16', 2056, false], ['bfloat16', 33, false], ['bfloat16', 12, false],
      ['float32', 768, true], ['float32', 1024, true], ['float32', 1028, false], ['float32', 6, false],
      ['float64', 512, true], ['float64', 514, false], ['float64', 7, false],
    ] as const) {
      const x = backend.fill(4 * d, dt, 1);
      const w = backend.fill(d, dt, 1);
      const { y, rstd } = backend.rmsNormForward(x, w, 4, d, 1e-6, dt);
      assert.equal(name(), vec ? 'rmsnorm_fwd_vec' : 'rmsnorm_fwd', `${dt} d ${d} forward`);
      backend.rmsNormBackward(x, w, rstd, y, 4, d, dt, false);
      assert.equal(name(), vec ? 'rmsnorm_bwd_vec' : 'rmsnorm_bwd', `${dt} d ${d} backward`);
    }
    // rows of fewer than 32 vectors: a power of two of lanes each, several rows a warp (8 warps a block)
    for (const [dt, d, lanes] of [['bfloat16', 64, 8], ['bfloat16', 16, 2], ['float32', 64, 16], ['float32', 100, 32], ['float64', 2, 1]] as const) {
      const rows = 1000;
      const x = backend.fill(rows * d, dt, 1);
      const w = backend.fill(d, dt, 1);
      backend.rmsNormForward(x, w, rows, d, 1e-6, dt);
      const [fn, grid, , , threads] = calls.lastLaunch as [{ name: string }, number, number, number, number];
      assert.deepEqual([fn.name, grid, threads], ['rmsnorm_fwd_vec', Math.ceil(rows / ((8 * 32) / lanes)), 256], `${dt} d ${d}`);
    }
  });

  test('second-order kernels (RMSNorm: a warp per row, the gain\'s column sum only when asked; SwiGLU gate; softmax\'s backward and its backward: a block per row): off by default, and on they shorten a meta-gradient', opts, async () => {
    const { backend, calls } = await standInBackend();
    const launches = () => calls.counts.get('cuLaunchKernel') ?? 0;
    const on = process.env.TTT_CUDA_GRAD_KERNELS === '1';
    assert.deepEqual([backend.rmsNormGradKernel, backend.swigluGradKernel, backend.softmaxGradKernel], [on, on, on], 'off unless TTT_CUDA_GRAD_KERNELS=1 (not yet run on a GPU)');
    for (const dt of ['float32', 'bfloat16', 'float64'] as const) {
      const [rows, len] = [3000, 900];
      const [y, g, u] = [0, 1, 2].map(() => backend.fill(rows * len, dt, 1));
      const start = launches();
      backend.softmaxBackward(y, g, rows, len, dt);
      const [fn1, grid1, , , threads1] = calls.lastLaunch as [{ name: string }, number, number, number, number];
      backend.softmaxGradBackward(y, g, u, rows, len, dt);
      const [fn2, grid2, , , threads2] = calls.lastLaunch as [{ name: string }, number, number, number, number];
      assert.deepEqual([fn1.name, grid1, threads1, fn2.name, grid2, threads2, launches() - start], ['softmax_bwd_rows', rows, 256, 'softmax_grad_bwd_rows', rows, 256, 2], dt);
    }
    const n = 5000;
    const [a, b, g, ca, cb] = [0, 1, 2, 3, 4].map(() => backend.fill(n, 'bfloat16', 1));
    const before = launches();
    backend.swigluGradBackward(a, b, g, ca, cb, n, 'bfloat16');
    assert.deepEqual([(calls.lastLaunch as [{ name: string }])[0].name, launches() - before], ['swiglu_grad_bwd', 1]);
    for (const dt of ['float32', 'bfloat16', 'float64'] as const) {
      const [rows, d] = [1000, 768];
      const [x, g, c] = [0, 1, 2].map(() => backend.fill(rows * d, dt, 1));
      const w = backend.fill(d, dt, 1);
      const rstd = backend.fill(rows, dt === 'float64' ? 'float64' : 'float32', 1);
      const before = launches();
      const plain = backend.rmsNormGradBackward(x, w, rstd, g, c, rows, d, dt, false);
      const [fn, grid, , , threads] = calls.lastLaunch as [{ name: string }, number, number, number, number];
      assert.deepEqual([fn.name, grid, threads, launches() - before, plain.dw], ['rmsnorm_grad_bwd', 125, 256, 1, null], `${dt} without the gain`);
      const mid = launches();
      const withDw = backend.rmsNormGradBackward(x, w, rstd, g, c, rows, d, dt, true);
      assert.ok(withDw.dw !== null && launches() - mid > 1, `${dt}: the kernel, then the column sum`);
      // the first-order backward's dw over more than 64 rows: partials from dy and x, no [rows, d] buffer of products
      // the kernels a call launches and the buffer sizes it allocates (the backend's own launch and alloc, spied on)
      const traced = (fn: () => void) => {
        const be = backend as unknown as { launch: (...a: unknown[]) => void; alloc: (dt: string, n: number) => unknown };
        const [launch, alloc] = [be.launch, be.alloc];
        const seen = { names: [] as string[], sizes: [] as number[] };
        be.launch = function (this: unknown, ...a: unknown[]) { seen.names.push(String(a[5])); return launch.apply(this, a); };
        be.alloc = function (this: unknown, t: string, n: number) { seen.sizes.push(n); return alloc.call(this, t, n); };
        try {
          fn();
        } finally {
          [be.launch, be.alloc] = [launch, alloc];
        }
        return seen;
      };
      const first = traced(() => backend.rmsNormBackward(x, w, rstd, g, rows, d, dt, true));
      assert.ok(first.names.includes('rmsnorm_dw_partial'), `${dt}: ${first.names}`);
      assert.equal(first.sizes.filter((n) => n === rows * d).length, 1, `${dt}: dx alone is [rows, d]`);
      // TTT_CUDA_NEW_KERNELS=0: the written products and their column sum, as before; softmax adds its bias first
      backend.newKernels = false;
      let names: string[];
      try {
        names = traced(() => {
          backend.rmsNormBackward(x, w, rstd, g, rows, d, dt, true);
          backend.softmax(x, rows, d, dt, { data: w, rows: 1 });
        }).names;
      } finally {
        backend.newKernels = true;
      }
      assert.ok(!names.includes('rmsnorm_dw_partial') && !names.includes('softmax_bias_rows') && names.includes('softmax_rows'), `${dt}: ${names}`);
      backend.softmax(x, rows, d, dt, { data: w, rows: 1 });
      assert.equal((calls.lastLaunch as [{ name: string }])[0].name, 'softmax_bias_rows', `${dt}: the bias in the softmax kernel`);
    }
    // a TTT-E2E meta-gradient over the stand-in: fewer launches with the kernel than through the composite
    const T = await import('../src/index.js');
    const { makeConfig } = await import('../src/model/config.js');
    const { initParams } = await import('../src/model/transformer.js');
    const { outerLoss } = await import('../src/model/ttt-e2e.js');
    T.registerBackend('stand-in-norm', () => backend);
    T.setBackend('stand-in-norm');
    try {
      const cfg = makeConfig({ variant: 'e2e', vocabSize: 64, dModel: 32, nHeads: 2, ffnDim: 48, nLayers: 4, window: 16, miniBatch: 8, computeDType: 'bfloat16' });
      const params = initParams(cfg, T.randomKey(0));
      const tokens = T.zeros([1, 32], 'int32');
      const count = (kernels: boolean) => {
        backend.rmsNormGradKernel = kernels;
        backend.swigluGradKernel = kernels;
        backend.softmaxGradKernel = kernels;
        const start = launches();
        T.tidy(() => T.valueAndGrad((p: typeof params) => outerLoss(cfg, p, tokens, tokens))(params));
        return launches() - start;
      };
      const [without, withKernels] = [count(false), count(true)];
      console.log(`# meta-gradient launches over the stand-in: ${withKernels} with the second-order kernels, ${without} without`);
      assert.ok(withKernels < 0.8 * without, `meta-gradient launches: ${withKernels} with the kernels, ${without} through the composites`);
    } finally {
      backend.rmsNormGradKernel = false;
      backend.swigluGradKernel = false;
      backend.softmaxGradKernel = false;
      T.setBackend('cpu');
    }
  });

  test('recording: launches go to the capture stream, constants and uploads land at once, frees stay with the graph', opts, async () => {
    const { backend, calls } = await standInBackend();
    const count = (name: string) => calls.counts.get(name) ?? 0;
    const a = backend.fill(1000, 'float32', 2);
    const inUse = () => backend.memoryStats().inUse;
    const before = inUse();
    let scratch: unknown = null;
    const work = backend.captureWork(() => {
      const t = backend.binary('mul', a, [1], a, [1], [1000], 'float32');
      assert.deepEqual(calls.lastLaunch![8], { stream: true }, 'kernels are captured');
      backend.fill(10, 'float32', 3);
      assert.equal(calls.last.get('cuMemsetD32Async')![3], null, 'a constant is filled at once, on the legacy stream');
      backend.upload(Float32Array.from([1, 2]), 'float32');
      assert.equal(calls.last.get('cuMemcpyHtoDAsync')![3], null, 'uploads are not captured');
      assert.throws(() => backend.download(a, 'float32', 1000), /not possible while recording/);
      assert.throws(() => backend.synchronize(), /not possible while recording/);
      backend.free(t);
      scratch = backend.fill(1000, 'float32', 0);
      assert.notEqual((scratch as { ptr: number }).ptr, (t as { ptr: number }).ptr, 'a block freed while recording is not handed out again');
    });
    assert.deepEqual([count('cuStreamBeginCapture'), count('cuStreamEndCapture'), count('cuGraphInstantiate'), count('cuGraphDestroy')], [1, 1, 1, 1]);
    assert.equal(calls.last.get('cuStreamBeginCapture')![1], 2, 'relaxed capture mode');
    assert.deepEqual(calls.last.get('cublasSetStream')![1], null, 'cuBLAS is back on the legacy stream');
    backend.binary('add', a, [1], a, [1], [1000], 'float32');
    assert.equal(calls.lastLaunch![8], null, 'after recording, kernels run on the legacy stream again');
    const held = inUse();
    assert.ok(held > before, 'the graph holds the memory its kernels use');
    work.replay();
    work.replay();
    assert.equal(count('cuGraphLaunch'), 2);
    assert.equal(calls.last.get('cuGraphLaunch')![1], null);
    work.dispose();
    assert.equal(count('cuGraphExecDestroy'), 1);
    assert.ok(inUse() < held, 'dispose gives the held blocks back');
    assert.throws(() => work.replay(), /replayed after dispose/);
    assert.ok(backend.info().graphs, 'info() reports graphs');
  });

  test('a recording that throws ends the capture and gives its memory back', opts, async () => {
    const { backend, calls } = await standInBackend();
    const a = backend.fill(100, 'float32', 1);
    const before = backend.memoryStats().inUse;
    assert.throws(() => backend.captureWork(() => {
      backend.free(backend.binary('mul', a, [1], a, [1], [100], 'float32'));
      throw new Error('step failed');
    }), /step failed/);
    assert.equal(calls.counts.get('cuStreamEndCapture'), 1);
    assert.equal(calls.counts.get('cuGraphInstantiate') ?? 0, 0);
    assert.equal(backend.memoryStats().inUse - before, 32 << 20, 'only cuBLAS\'s recording workspace (kept for later recordings) stays');
    backend.binary('add', a, [1], a, [1], [100], 'float32');
    assert.equal(calls.lastLaunch![8], null);
  });

  test('ring writes and attention at device-held positions launch the position-reading kernels', opts, async () => {
    const { backend, calls } = await standInBackend();
    for (const [dt, width] of [['bfloat16', 2], ['float32', 4], ['int32', 4], ['float64', 8]] as const) {
      const dst = backend.fill(2 * 8 * 4, dt, 0);
      const src = backend.fill(2 * 1 * 4, dt, 1);
      const at = backend.fill(1, 'int32', 5);
      backend.writeRowsAt(dst, src, at, 2, 1, 8, 4, dt);
      const [fn, , , , , , , , , params] = calls.lastLaunch as [{ name: string }, ...unknown[]];
      assert.equal(fn.name, `write_rows_at_${width}`);
      assert.ok(params);
    }
    // 12 keys: far fewer than the decode path's usual minimum, still the decode kernels
    const q = backend.fill(2 * 16, 'bfloat16', 1);
    const kv = backend.fill(2 * 12 * 16, 'bfloat16', 1);
    const keys = backend.fill(12, 'int32', 0);
    const query = backend.fill(1, 'int32', 0);
    const job = { batch: 2, tq: 1, tk: 12, d: 16, qStart: 0, kStart: 0, window: Infinity, scale: 0.25, keyPositions: keys, queryPosition: query };
    const launches = calls.counts.get('cuLaunchKernel') ?? 0;
    backend.attentionForward(q, kv, kv, job, 'bfloat16');
    assert.equal((calls.counts.get('cuLaunchKernel') ?? 0) - launches, 2);
    assert.equal((calls.lastLaunch as [{ name: string }])[0].name, 'attn_decode_combine');
    assert.throws(() => backend.attentionForward(backend.fill(2 * 9 * 16, 'bfloat16', 1), kv, kv, { ...job, tq: 9 }, 'bfloat16'), /serves up to 8 query rows/);
  });
});
