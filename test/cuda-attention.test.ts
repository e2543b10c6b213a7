/**
 * The cuda backend's fused (FlashAttention-2 style) attention kernels: forward values, lse and the
 * three gradients against the CPU backend in float64 on the same inputs, for sequence lengths that
 * are not multiples of the tiles, windows of 1, inside a tile, equal to a tile, wider than the
 * sequence and none, queries after a cache (qStart > 0, decode: one query and many keys), keys
 * that start later (kStart > 0), head dims 8 to 256 (and 300, the row-kernel fallback), batch > 1,
 * grouped-query attention (fewer key/value heads);
 * float32 (1e-5 of the largest magnitude), float64 (1e-12) and bfloat16 (3e-2; the tensor-core
 * kernels where the device has them, and the SIMT ones). Also: two runs are
 * bit-identical, the fused and row kernels agree, and (without a GPU, over stand-in libraries) the
 * backend launches the kernels with the grids and shared memory the plans say and falls back to
 * the row kernels where a fused kernel cannot run.
 *
 * Without a GPU (or koffi, or the CUDA libraries) the GPU suites skip with the reason.
 * On the GPU machine: `node --test dist/test/cuda-attention.test.js`.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import * as T from '../src/index.js';
import type { DType, Tensor } from '../src/index.js';
import {
  ATT_DELTA, ATT_DTYPES, FA_DIMS, FA_MAX_D, attentionLseBytes, attentionPlan, attentionPlans, attentionSource,
} from '../src/backends/cuda/kernels/attention.js';
import { seededValues } from './helpers/check.js';
import { cudaOrSkip, koffiOrSkip } from './helpers/cuda.js';
import type { CudaBackend } from '../src/backends/cuda/backend.js';

// ---- which backends ------------------------------------------------------------------------------

const { cuda, gpu } = cudaOrSkip('cuda-attention.test.ts');
const host = await koffiOrSkip();

// ---- cases and helpers ---------------------------------------------------------------------------

/** One attention problem: q [...lead, tq, d], k and v [...lead, tk, d]. */
export interface AttnCase {
  name: string;
  lead: number[];
  /** Leading axes of k and v when they differ from q's (grouped-query attention: fewer heads). */
  kvLead?: number[];
  tq: number;
  tk: number;
  d: number;
  opts: T.AttentionOptions;
}

const c = (name: string, lead: number[], tq: number, tk: number, d: number, qStart: number, kStart: number, window?: number): AttnCase => ({
  name, lead, tq, tk, d, opts: { qStart, kStart, window },
});

/** Every query sees a key, every tile edge and band shape the kernels branch on, d 8..256. */
const CASES: AttnCase[] = [
  c('causal, T 10, d 8', [2, 3], 10, 10, 8, 0, 0),
  c('window 4, T 17, d 16', [2, 2], 17, 17, 16, 0, 0, 4),
  c('window 1 (diagonal only), T 70', [3], 70, 70, 16, 0, 0, 1),
  c('causal, T 130 (2 tiles + 2 rows), d 64', [2, 2], 130, 130, 64, 0, 0),
  c('window 37 inside a tile, T 100, d 64', [4], 100, 100, 64, 0, 0, 37),
  c('window 64 = tile, T 257, d 64', [2], 257, 257, 64, 0, 0, 64),
  c('window 500 >= T 150, d 100', [2], 150, 150, 100, 0, 0, 500),
  c('decode: 1 query, 300 keys, d 64', [2, 3], 1, 300, 64, 299, 0),
  c('decode with window 20, d 100', [3], 1, 150, 100, 149, 0, 20),
  c('chunk after a cache, window 50, d 128', [2], 40, 120, 128, 80, 0, 50),
  c('keys start later (kStart 10), window 25, d 128', [2], 50, 70, 128, 30, 10, 25),
  c('more keys than the band needs, d 16', [1], 33, 200, 16, 167, 0),
  c('d 48 (padded to 64), window 64', [3], 65, 65, 48, 0, 0, 64),
  c('d 200 (padded to 256)', [2], 40, 40, 200, 0, 0),
  c('d 256, window 25, kStart 10', [1], 40, 50, 256, 20, 10, 25),
  c('d 300 (row kernels)', [1], 20, 20, 300, 0, 0),
  // the split-key decode path (tq <= 8, a band of >= 512 keys)
  c('decode path: 1 query, 2000 keys, d 64', [2, 3], 1, 2000, 64, 1999, 0),
  c('decode path: 3 queries, window 700, d 100', [2], 3, 3000, 100, 2997, 0, 700),
  c('decode path: 8 queries, band of 513, kStart 7, d 128', [1], 8, 600, 128, 599, 7, 513),
  c('decode path: 2 queries, 1300 keys, d 256', [1], 2, 1300, 256, 1298, 0),
  // grouped-query attention: 3 and 4 query heads per key/value head
  { ...c('GQA 6 heads over 2, causal, T 130, d 64', [2, 6], 130, 130, 64, 0, 0), kvLead: [2, 2] },
  { ...c('GQA 4 heads over 1, window 37, T 100, d 32', [1, 4], 100, 100, 32, 0, 0, 37), kvLead: [1, 1] },
  { ...c('GQA decode path: 1 query, 900 keys, 4 heads over 2', [1, 4], 1, 900, 64, 899, 0), kvLead: [1, 2] },
];
/** Longer sequences: many tiles, the band skipping most of them. */
const LONG: AttnCase[] = [
  c('T 1024 causal, d 64', [2], 1024, 1024, 64, 0, 0),
  c('T 2048 window 256, d 64', [2], 2048, 2048, 64, 0, 0, 256),
  c('T 700 window 129, d 128', [2], 700, 700, 128, 0, 0, 129),
  // a TTT mini-batch's shape, smaller: few query tiles over a long band (the bf16 forward splits the keys)
  c('256 queries after 4096 cached keys, window 4096, d 64', [2, 3], 256, 4352, 64, 4096, 0, 4096),
];

/** Seeded host values in [lo, hi). */
const rand = (seed: number, n: number, lo = -1, hi = 1): number[] => seededValues(seed, n, lo, hi);

/** Input values exactly representable in `dtype` (so the float64 reference sees the same numbers). */
function valuesIn(dtype: DType, seed: number, n: number): number[] {
  const v = rand(seed, n);
  if (dtype === 'float32') return v.map(Math.fround);
  if (dtype === 'bfloat16') return [...T.roundToBfloat16(v)];
  return v;
}

interface AttnResult {
  out: number[];
  dq: number[];
  dk: number[];
  dv: number[];
}

/**
 * Forward and the three gradients of sum(attention(q, k, v) ⊙ w) on `backend` in `dtype`, inputs
 * from the case's seeds (held in `inputDType`'s precision, so every dtype sees the same numbers).
 */
export function runAttention(backend: 'cpu' | 'cuda', dtype: DType, cs: AttnCase, inputDType: DType = dtype, seed = 1): AttnResult {
  const n = cs.lead.reduce((a, b) => a * b, 1);
  const nkv = (cs.kvLead ?? cs.lead).reduce((a, b) => a * b, 1);
  const qShape = [...cs.lead, cs.tq, cs.d];
  const kShape = [...(cs.kvLead ?? cs.lead), cs.tk, cs.d];
  T.setBackend(backend);
  try {
    return T.tidy(() => {
      const mk = (s: number, shape: number[], size: number) => T.tensor(valuesIn(inputDType, seed * 7919 + s, size), shape, dtype);
      const q = mk(1, qShape, n * cs.tq * cs.d);
      const k = mk(2, kShape, nkv * cs.tk * cs.d);
      const v = mk(3, kShape, nkv * cs.tk * cs.d);
      const w = mk(4, qShape, n * cs.tq * cs.d);
      const out = T.scaledDotAttention(q, k, v, cs.opts);
      const g = T.grad((a: Tensor, b: Tensor, cc: Tensor) => T.sum(T.mul(T.scaledDotAttention(a, b, cc, cs.opts), w)), [0, 1, 2])(q, k, v) as Tensor[];
      return { out: out.toArray(), dq: g[0].toArray(), dk: g[1].toArray(), dv: g[2].toArray() };
    });
  } finally {
    T.setBackend('cpu');
  }
}

/**
 * max |got − want| / max(max |want|, floor) (Infinity if got has a NaN where want has none). The
 * floor is the problem's scale: an output whose exact value is 0 (dq with a window of 1, where
 * each row's only probability is 1) holds nothing but rounding noise, which no relative bound fits.
 */
export function relErr(got: number[], want: number[], floor = 0): number {
  assert.equal(got.length, want.length, 'length');
  let scale = floor;
  let err = 0;
  for (let i = 0; i < want.length; i++) {
    scale = Math.max(scale, Math.abs(want[i]));
    if (Number.isNaN(got[i]) && !Number.isNaN(want[i])) return Infinity;
    err = Math.max(err, Math.abs(got[i] - want[i]));
  }
  return scale > 0 ? err / scale : err;
}

const TOL: Record<string, number> = { float32: 1e-5, float64: 1e-12, bfloat16: 3e-2 };

/**
 * Cuda in `dtype` against the CPU in float64 from the same inputs (rounded to `dtype`), each of out,
 * dq, dk, dv within `tol` of the largest reference magnitude among the four. bf16 tests call this with 'bfloat16'.
 */
export function checkAgainstCpu(cs: AttnCase, dtype: DType, tol = TOL[dtype]): AttnResult {
  const want = runAttention('cpu', 'float64', cs, dtype);
  const got = runAttention('cuda', dtype, cs);
  const keys = ['out', 'dq', 'dk', 'dv'] as const;
  const floor = Math.max(...keys.map((key) => want[key].reduce((m, x) => Math.max(m, Math.abs(x)), 0)));
  for (const key of keys) {
    const e = relErr(got[key], want[key], floor);
    assert.ok(e <= tol, `${cs.name} ${dtype}: ${key} error ${e.toExponential(2)} > ${tol} (of the largest |value| among out, dq, dk, dv)`);
  }
  return got;
}

/** fn's result with one of the backend's attention switches set to `value`, restored afterwards. */
function withSetting<K extends 'attentionKernels' | 'attentionTensorCores' | 'attentionWgmma', R>(key: K, value: CudaBackend[K], fn: () => R): R {
  const before = cuda![key];
  cuda![key] = value;
  try {
    return fn();
  } finally {
    cuda![key] = before;
  }
}

function withKernels<R>(kind: 'fused' | 'row', fn: () => R): R {
  return withSetting('attentionKernels', kind, fn);
}

// ---- kernel sources and plans (anywhere) ---------------------------------------------------------

describe('cuda attention: kernel sources and tile plans (no GPU needed)', () => {
  test('every dtype module has each planned kernel, within the H100 shared-memory limit', () => {
    for (const dt of ATT_DTYPES) {
      const src = attentionSource(dt);
      assert.ok(src.includes(`void ${ATT_DELTA}(`), `${dt}: delta kernel`);
      for (const p of attentionPlans(dt)) {
        assert.ok(src.includes(` ${p.name}(`), `${dt}: ${p.name}`);
        assert.equal(p.bq % 16, 0);
        assert.equal(p.bk % 16, 0);
        assert.ok(p.shared <= 227 * 1024, `${dt} ${p.name}: ${p.shared} bytes of shared memory`);
      }
    }
    assert.equal(attentionSource('int32'), '');
    for (const d of [1, 8, 16, 17, 64, 100, 128, 129, 256]) assert.equal(attentionPlan('float32', 'fwd', d)!.dp, FA_DIMS.find((x) => x >= d));
    assert.equal(attentionPlan('float32', 'fwd', FA_MAX_D + 1), null);
    assert.equal(attentionLseBytes('bfloat16'), 4);
  });

  test('bfloat16 tensor-core plans: 128 threads, head dims up to 128, SIMT beyond and for other dtypes', () => {
    const src = attentionSource('bfloat16');
    for (const kind of ['fwd', 'dq', 'dkv'] as const) {
      for (const d of [8, 16, 33, 64, 100, 128]) {
        const p = attentionPlan('bfloat16', kind, d, true)!;
        assert.ok(p.tensorCores && p.threads === 128 && p.dp >= d && p.dp <= 128, `${kind} d ${d}: ${JSON.stringify(p)}`);
        assert.ok(p.name.startsWith('attn_mma_') && src.includes(` ${p.name}(`), p.name);
        assert.equal(p.bq % 16, 0);
        assert.ok([64, 128].includes(kind === 'dkv' ? p.bk : p.bq), 'the warp-owned side is 4 warps × 16 or 32 rows');
      }
      assert.equal(attentionPlan('bfloat16', kind, 129, true)!.tensorCores, false);
      assert.equal(attentionPlan('bfloat16', kind, 64, false)!.tensorCores, false);
      assert.equal(attentionPlan('float32', kind, 64, true)!.tensorCores, false);
    }
    assert.ok(!attentionSource('float32').includes('attn_mma_'), 'no tensor-core kernels in the float32 module');
  });

  test('the wgmma forward: bfloat16, head dim 64, forward only, when asked for', () => {
    const wg = attentionPlan('bfloat16', 'fwd', 64, true, true)!;
    assert.ok(wg.wgmma && wg.tensorCores && wg.name.startsWith('attn_wg_fwd_d64'), JSON.stringify(wg));
    assert.equal(wg.threads, 2 * wg.bq, 'a warpgroup of 128 threads per 64 query rows');
    assert.ok(attentionSource('bfloat16').includes(` ${wg.name}(`));
    assert.ok(wg.shared >= wg.bq * 128 + 6 * wg.bk * 128 + 1024, 'Q, three K/V buffers, 1 KB of alignment');
    for (const [kind, d, dt] of [['dq', 64, 'bfloat16'], ['dkv', 64, 'bfloat16'], ['fwd', 32, 'bfloat16'], ['fwd', 128, 'bfloat16'], ['fwd', 63, 'bfloat16'], ['fwd', 64, 'float32']] as const) {
      assert.equal(attentionPlan(dt, kind, d, true, true)!.wgmma, false, `${kind} d ${d} ${dt}`);
    }
    assert.equal(attentionPlan('bfloat16', 'fwd', 64, false, true)!.tensorCores, false, 'tensor cores off turns it off too');
    assert.equal(attentionPlan('bfloat16', 'fwd', 64, true, false)!.wgmma, false);
  });
});

// ---- host side over stand-in libraries -----------------------------------------------------------

describe('cuda attention: launches (stand-in libraries, no GPU needed)', () => {
  process.env.TTT_CACHE_DIR ??= '/tmp/ttt-e2e-stand-in-cache';
  type Launch = { name: string; grid: number; threads: number; shared: number };
  async function standIn(setAttribute = 0) {
    const { CudaBackend } = await import('../src/backends/cuda/backend.js');
    const { standInLibraries } = await import('../src/backends/cuda/stand-in.js');
    const libs = standInLibraries();
    const launches: Launch[] = [];
    const drv = libs.driver as unknown as Record<string, (...a: unknown[]) => unknown>;
    const launch = drv.cuLaunchKernel;
    drv.cuLaunchKernel = (...a: unknown[]) => {
      launches.push({ name: (a[0] as { name: string }).name, grid: a[1] as number, threads: a[4] as number, shared: a[7] as number });
      return launch(...a);
    };
    drv.cuFuncSetAttribute = () => setAttribute;
    return { backend: new CudaBackend(0, libs), launches };
  }
  const job = (d: number, tq = 100, tk = 100) => ({ batch: 6, tq, tk, d, qStart: tk - tq, kStart: 0, window: Infinity, scale: 1 / Math.sqrt(d) });

  test('forward and backward launch the planned fused kernels with their grids and shared memory', host, async () => {
    const { backend, launches } = await standIn();
    for (const d of [8, 64, 128, 256]) {
      const j = job(d);
      const buf = (n: number) => backend.fill(n, 'float32', 0);
      const [q, k, v] = [buf(600 * d), buf(600 * d), buf(600 * d)];
      launches.length = 0;
      const { out, lse } = backend.attentionForward(q, k, v, j, 'float32');
      const fwd = attentionPlan('float32', 'fwd', d)!;
      assert.deepEqual(launches, [{ name: fwd.name, grid: 6 * Math.ceil(100 / fwd.bq), threads: 256, shared: fwd.shared }]);
      launches.length = 0;
      backend.attentionBackward(q, k, v, out, lse, buf(600 * d), j, 'float32');
      const dkv = attentionPlan('float32', 'dkv', d)!;
      const dq = attentionPlan('float32', 'dq', d)!;
      assert.deepEqual(launches, [
        { name: ATT_DELTA, grid: Math.ceil(600 / 8), threads: 256, shared: 0 },
        { name: dkv.name, grid: 6 * Math.ceil(100 / dkv.bk), threads: 256, shared: dkv.shared },
        { name: dq.name, grid: 6 * Math.ceil(100 / dq.bq), threads: 256, shared: dq.shared },
      ]);
    }
  });

  test('grouped-query attention: dK/dV runs one block per key tile of each key/value entry, and gets batch / groups entries', host, async () => {
    const { backend, launches } = await standIn();
    const d = 64;
    const j = { ...job(d), groups: 3 }; // 6 query entries over 2 key/value entries
    for (const dt of ['float32', 'bfloat16'] as const) {
      const q = backend.fill(600 * d, dt, 0);
      const kv = backend.fill(200 * d, dt, 0);
      const { out, lse } = backend.attentionForward(q, kv, kv, j, dt);
      launches.length = 0;
      const g = backend.attentionBackward(q, kv, kv, out, lse, backend.fill(600 * d, dt, 0), j, dt);
      const dkv = attentionPlan(dt, 'dkv', d, backend.attentionTensorCores)!;
      assert.equal(launches[1].name, dkv.name);
      assert.equal(launches[1].grid, 2 * Math.ceil(100 / dkv.bk));
      const E = dt === 'float32' ? 4 : 2;
      assert.ok(g.dk.bytes >= 200 * d * E && g.dk.bytes < 600 * d * E, `dK holds the 2 key/value entries, not 6 (${g.dk.bytes} bytes)`);
    }
  });

  test('bfloat16 launches the tensor-core kernels (128 threads) on sm_80+, the SIMT ones when switched off', host, async () => {
    const { backend, launches } = await standIn();
    assert.equal(backend.attentionTensorCores, true, 'the stand-in device is sm_90');
    const d = 64;
    const j = job(d);
    const buf = (n: number) => backend.fill(n, 'bfloat16', 0);
    const [q, k, v] = [buf(600 * d), buf(600 * d), buf(600 * d)];
    for (const tc of [true, false]) {
      backend.attentionTensorCores = tc;
      launches.length = 0;
      const { out, lse } = backend.attentionForward(q, k, v, j, 'bfloat16');
      backend.attentionBackward(q, k, v, out, lse, buf(600 * d), j, 'bfloat16');
      const [fwd, dkv, dq] = (['fwd', 'dkv', 'dq'] as const).map((kind) => attentionPlan('bfloat16', kind, d, tc, backend.attentionWgmma)!);
      assert.equal(fwd.wgmma, tc, 'the stand-in device is sm_90: the forward runs on warpgroup MMAs');
      assert.deepEqual(launches, [
        { name: fwd.name, grid: 6 * Math.ceil(100 / fwd.bq), threads: fwd.threads, shared: fwd.shared },
        { name: ATT_DELTA, grid: Math.ceil(600 / 8), threads: 256, shared: 0 },
        { name: dkv.name, grid: 6 * Math.ceil(100 / dkv.bk), threads: tc ? 128 : 256, shared: dkv.shared },
        { name: dq.name, grid: 6 * Math.ceil(100 / dq.bq), threads: tc ? 128 : 256, shared: dq.shared },
      ]);
      assert.equal(fwd.tensorCores, tc);
    }
  });

  test('bfloat16 forward of few query tiles over a long band: keys split across blocks, merged a warp per row', host, async () => {
    const { backend, launches } = await standIn();
    const { splitCountFor } = await import('../src/backends/cuda/backend.js');
    const sms = backend.info().multiprocessors as number;
    const d = 64;
    // a TTT-E2E mini-batch of 125m: 12 heads, 1024 queries after 8192 cached keys, window 8192
    const j = { batch: 12, tq: 1024, tk: 9216, d, qStart: 8192, kStart: 0, window: 8192, scale: 1 / 8 };
    const q = backend.fill(12 * 1024 * d, 'bfloat16', 0);
    const kv = backend.fill(12 * 9216 * d, 'bfloat16', 0);
    const fwd = attentionPlan('bfloat16', 'fwd', d, true, true)!;
    assert.ok(fwd.wgmma && fwd.blocksPerSm === 1);
    const tiles = 12 * Math.ceil(1024 / fwd.bq);
    const slots = fwd.blocksPerSm * sms;
    assert.ok(tiles < slots, 'the case leaves SMs idle without a split');
    const splits = splitCountFor(tiles, slots, Math.min(9216, 8192 + fwd.bq) / fwd.bk);
    // whole waves: 96 tiles on the stand-in's 132 SMs in 4 splits (2.9 waves), not 6 (4.4 waves, the last a third full)
    assert.equal(sms, 132);
    assert.equal(splits, 4);
    // the rule alone: tiles that fill the slots never split, nor bands of under 16 tiles
    assert.deepEqual([splitCountFor(300, 264, 500), splitCountFor(10, 264, 15)], [1, 1]);
    launches.length = 0;
    const { out, lse } = backend.attentionForward(q, kv, kv, j, 'bfloat16');
    assert.deepEqual(launches.map((l) => [l.name, l.grid]), [[fwd.name, tiles * splits], ['attn_split_combine', Math.ceil((12 * 1024) / 8)]]);
    // its backward in the TTT inner step (dK, dV of the 1024 new rows only): dQ split the same way, then summed;
    // dK, dV over their 8 key tiles per head, each seen by all 1024 queries at the most: the query tiles split
    launches.length = 0;
    backend.attentionBackward(q, kv, kv, out, lse, q, { ...j, gradKeysFrom: 8192 }, 'bfloat16');
    const [dkv, dq] = [attentionPlan('bfloat16', 'dkv', d, true)!, attentionPlan('bfloat16', 'dq', d, true)!];
    const dqSlots = dq.blocksPerSm * sms;
    const dqTiles = 12 * Math.ceil(1024 / dq.bq);
    const dqSplits = splitCountFor(dqTiles, dqSlots, Math.min(9216, 8192 + dq.bq) / dq.bk);
    assert.ok(dqSplits > 1);
    const dkvTiles = 12 * (1024 / dkv.bk);
    const dkvSplits = Math.min(Math.ceil((4 * dkv.blocksPerSm * sms) / dkvTiles), Math.floor(1024 / dkv.bq / 8));
    assert.ok(dkvTiles < dkv.blocksPerSm * sms);
    assert.equal(dkvSplits, 4, 'dK/dV (unequal blocks): as many splits as keep 8 query tiles each');
    assert.deepEqual(launches.slice(1).map((l) => l.name), [dkv.name, 'attn_split_sum', 'attn_split_sum', dq.name, 'attn_split_sum']);
    assert.deepEqual([launches[1].grid, launches[4].grid], [dkvTiles * dkvSplits, dqTiles * dqSplits]);
    // enough query tiles to fill the GPU: one pass, no merge
    const big = { ...j, tq: 16384, tk: 16384, qStart: 0 };
    const qb = backend.fill(12 * 16384 * d, 'bfloat16', 0);
    const kb = backend.fill(12 * 16384 * d, 'bfloat16', 0);
    launches.length = 0;
    backend.attentionForward(qb, kb, kb, big, 'bfloat16');
    assert.deepEqual(launches.map((l) => [l.name, l.grid]), [[fwd.name, 12 * Math.ceil(16384 / fwd.bq)]]);
  });

  test('bfloat16 forward: keys not 16-byte aligned, or TTT_CUDA_ATTENTION=mma, take the mma.sync kernel', host, async () => {
    const d = 64;
    const j = { batch: 2, tq: 64, tk: 200, d, qStart: 136, kStart: 0, window: Infinity, scale: 1 / 8 };
    const mma = attentionPlan('bfloat16', 'fwd', d, true)!;
    const wg = attentionPlan('bfloat16', 'fwd', d, true, true)!;
    const run = async (job: typeof j & { kvOffset?: number; kvStride?: number }) => {
      const { backend, launches } = await standIn();
      const q = backend.fill(2 * 64 * d, 'bfloat16', 0);
      const kv = backend.fill(2 * 208 * d, 'bfloat16', 0);
      backend.attentionForward(q, kv, kv, job, 'bfloat16');
      return launches[0].name;
    };
    assert.equal(await run(j), wg.name);
    assert.equal(await run({ ...j, kvOffset: 8 * d, kvStride: 208 * d }), wg.name, 'a store offset of whole 16-byte chunks');
    assert.equal(await run({ ...j, kvOffset: 4, kvStride: 208 * d }), mma.name, 'keys start 8 bytes into a chunk');
    assert.equal(await run({ ...j, kvOffset: 0, kvStride: 200 * d + 4 }), mma.name, 'rows of a stride that is not whole chunks');
    const before = process.env.TTT_CUDA_ATTENTION;
    process.env.TTT_CUDA_ATTENTION = 'mma';
    try {
      assert.equal(await run(j), mma.name);
    } finally {
      if (before === undefined) delete process.env.TTT_CUDA_ATTENTION;
      else process.env.TTT_CUDA_ATTENTION = before;
    }
  });

  test('row kernels where the device refuses the shared memory, above d 256, or when asked; errors beyond', host, async () => {
    const { backend, launches } = await standIn(1); // cuFuncSetAttribute fails: only kernels under 48 KiB stay fused
    const buf = (n: number) => backend.fill(n, 'float32', 0);
    const d = 128;
    const j = job(d);
    const [q, k, v] = [buf(600 * d), buf(600 * d), buf(600 * d)];
    const { out, lse } = backend.attentionForward(q, k, v, j, 'float32');
    backend.attentionBackward(q, k, v, out, lse, buf(600 * d), j, 'float32');
    const fused = (kind: 'fwd' | 'dq' | 'dkv') => attentionPlan('float32', kind, d)!.shared <= 48 * 1024;
    const names = launches.map((l) => l.name);
    assert.equal(names[names.length - 4], fused('fwd') ? attentionPlan('float32', 'fwd', d)!.name : 'attn_row_fwd');
    assert.deepEqual(names.slice(-3), [ATT_DELTA, fused('dkv') ? attentionPlan('float32', 'dkv', d)!.name : 'attn_row_dkv', fused('dq') ? attentionPlan('float32', 'dq', d)!.name : 'attn_row_dq']);
    const row = launches.find((l) => l.name === 'attn_row_dkv');
    if (row) assert.deepEqual([row.grid, row.threads], [600, 128]);

    const ok = await standIn();
    const big = 300;
    const jb = job(big, 20, 20);
    const [bq, bk, bv] = [ok.backend.fill(120 * big, 'float32', 0), ok.backend.fill(120 * big, 'float32', 0), ok.backend.fill(120 * big, 'float32', 0)];
    ok.backend.attentionForward(bq, bk, bv, jb, 'float32');
    assert.equal(ok.launches[ok.launches.length - 1].name, 'attn_row_fwd');
    ok.backend.attentionKernels = 'row';
    ok.backend.attentionForward(q, k, v, j, 'float32');
    assert.equal(ok.launches[ok.launches.length - 1].name, 'attn_row_fwd');
    assert.throws(() => ok.backend.attentionForward(q, k, v, job(1100), 'float32'), /head dimension 1100 is not supported/);
    assert.throws(() => ok.backend.attentionForward(q, k, v, j, 'int32'), /attention needs float32, float64 or bfloat16, got int32/);
  });
});

// ---- on the GPU ----------------------------------------------------------------------------------

describe('cuda fused attention vs cpu', gpu, () => {
  test('float32: values and gradients, every band shape and head dim', () => {
    for (const cs of CASES) checkAgainstCpu(cs, 'float32');
  });

  test('float64: values and gradients within 1e-12', () => {
    for (const cs of CASES) checkAgainstCpu(cs, 'float64');
  });

  test('bfloat16 storage (fp32 math): values and gradients within 3e-2; lse stays float32', () => {
    for (const cs of CASES) checkAgainstCpu(cs, 'bfloat16');
    // lse is a float32 buffer for bf16 tensors: compare it with the float64 logsumexp of the band
    const cs = CASES[4];
    const n = cs.lead.reduce((a, b) => a * b, 1);
    const vals = (s: number, size: number) => valuesIn('bfloat16', 7919 + s, size);
    const q = vals(1, n * cs.tq * cs.d);
    const k = vals(2, n * cs.tk * cs.d);
    const job = { batch: n, tq: cs.tq, tk: cs.tk, d: cs.d, qStart: cs.opts.qStart, kStart: cs.opts.kStart, window: cs.opts.window ?? Infinity, scale: 1 / Math.sqrt(cs.d) };
    const b = cuda!;
    const [qd, kd] = [b.upload(Float32Array.from(q), 'bfloat16'), b.upload(Float32Array.from(k), 'bfloat16')];
    const r = b.attentionForward(qd, kd, kd, job, 'bfloat16');
    const lse = b.download(r.lse, 'float32', n * cs.tq);
    for (const x of [qd, kd, r.out, r.lse]) b.free(x);
    let worst = 0;
    for (let bi = 0; bi < n; bi++) {
      for (let i = 0; i < cs.tq; i++) {
        const p = job.qStart + i;
        let m = -Infinity;
        const s: number[] = [];
        for (let j = 0; j < cs.tk; j++) {
          const pos = job.kStart + j;
          if (pos > p || p - pos >= job.window) continue;
          let dot = 0;
          for (let e = 0; e < cs.d; e++) dot += q[(bi * cs.tq + i) * cs.d + e] * k[(bi * cs.tk + j) * cs.d + e];
          s.push(dot * job.scale);
          m = Math.max(m, dot * job.scale);
        }
        const want = m + Math.log(s.reduce((acc, x) => acc + Math.exp(x - m), 0));
        worst = Math.max(worst, Math.abs(lse[bi * cs.tq + i] - want) / Math.max(1, Math.abs(want)));
      }
    }
    assert.ok(worst < 2e-6, `bf16 lse (float32 storage) error ${worst}`);
  });

  test('long sequences: many tiles, band skipping (float32; bfloat16 on the tensor cores)', () => {
    for (const cs of LONG) checkAgainstCpu(cs, 'float32');
    for (const cs of LONG) checkAgainstCpu(cs, 'bfloat16');
  });

  test('bfloat16: tensor-core and SIMT kernels both match the cpu, and each other', (t) => {
    if (!cuda!.attentionTensorCores) {
      t.skip(`no tensor-core attention on this device (${cuda!.info().arch ?? '?'}, TTT_CUDA_ATTENTION=${process.env.TTT_CUDA_ATTENTION ?? ''})`);
      return;
    }
    let differs = 0;
    for (const cs of [CASES[0], CASES[2], CASES[3], CASES[6], CASES[9], CASES[10], CASES[12], LONG[1]]) {
      const tc = checkAgainstCpu(cs, 'bfloat16');
      const simt = withSetting('attentionTensorCores', false, () => checkAgainstCpu(cs, 'bfloat16'));
      const keys = ['out', 'dq', 'dk', 'dv'] as const;
      const floor = Math.max(...keys.map((key) => simt[key].reduce((m, x) => Math.max(m, Math.abs(x)), 0)));
      for (const key of keys) {
        const e = relErr(tc[key], simt[key], floor);
        assert.ok(e <= TOL.bfloat16, `${cs.name}: tensor cores vs SIMT ${key} error ${e}`);
        if (tc[key].some((x, i) => x !== simt[key][i])) differs++;
      }
    }
    // P and dS are rounded to bf16 before the second product on the tensor cores only: the results must differ somewhere
    assert.ok(differs > 0, 'tensor-core and SIMT results are bit-identical everywhere: did the tensor-core path run?');
  });

  test('bfloat16 forward on sm_90: the wgmma and mma.sync kernels both match the cpu, and each other', (t) => {
    if (!cuda!.attentionWgmma) {
      t.skip(`no wgmma forward on this device (${cuda!.info().arch ?? '?'}, TTT_CUDA_ATTENTION=${process.env.TTT_CUDA_ATTENTION ?? ''})`);
      return;
    }
    // every d-64 shape the forward branches on: ragged tiles, windows inside and equal to a tile, GQA,
    // many tiles with band skipping, a split band (few query tiles after a long cache)
    const d64 = [...CASES, ...LONG].filter((cs) => cs.d === 64 && cs.tq > 8);
    assert.ok(d64.length >= 6);
    for (const cs of d64) {
      const wg = checkAgainstCpu(cs, 'bfloat16');
      const mma = withSetting('attentionWgmma', false, () => checkAgainstCpu(cs, 'bfloat16'));
      const floor = mma.out.reduce((m, x) => Math.max(m, Math.abs(x)), 0);
      const e = relErr(wg.out, mma.out, floor);
      assert.ok(e <= TOL.bfloat16, `${cs.name}: wgmma vs mma.sync forward error ${e}`);
    }
  });

  test('deterministic: two runs are bit-identical (float32, bfloat16)', () => {
    for (const dt of ['float32', 'bfloat16'] as DType[]) {
      for (const cs of [CASES[3], CASES[9], LONG[1]]) {
        const a = runAttention('cuda', dt, cs);
        const b = runAttention('cuda', dt, cs);
        for (const key of ['out', 'dq', 'dk', 'dv'] as const) {
          const same = a[key].every((x, i) => Object.is(x, b[key][i]));
          assert.ok(same, `${cs.name} ${dt}: ${key} differs between two runs`);
        }
      }
    }
  });

  test('fused and row kernels agree (float32, float64)', () => {
    for (const dt of ['float32', 'float64'] as DType[]) {
      for (const cs of [CASES[1], CASES[7], CASES[10], CASES[13]]) {
        const fused = withKernels('fused', () => runAttention('cuda', dt, cs));
        const row = withKernels('row', () => runAttention('cuda', dt, cs));
        for (const key of ['out', 'dq', 'dk', 'dv'] as const) {
          const e = relErr(fused[key], row[key]);
          assert.ok(e <= 2 * TOL[dt], `${cs.name} ${dt}: fused vs row ${key} error ${e}`);
        }
      }
    }
  });

  test('keys as rows of a larger store (a KV cache): every kernel family gives the rows-alone result bit for bit, never reading outside; so does dQ, and dK/dV of the last rows only (gradKeysFrom)', () => {
    // stores of first + tk + 37 rows per key/value entry, NaN outside the keys; 'row' and tensor-core
    // variants switched in turn, the decode path by its shapes
    const cases = [CASES[9], CASES[10], CASES[16], CASES[18], CASES[21], CASES[22], LONG[1]];
    const variants: { dt: DType; kernels: 'fused' | 'row'; tc: boolean }[] = [
      { dt: 'float32', kernels: 'fused', tc: true }, { dt: 'float64', kernels: 'fused', tc: true }, { dt: 'bfloat16', kernels: 'fused', tc: true },
      { dt: 'bfloat16', kernels: 'fused', tc: false }, { dt: 'float32', kernels: 'row', tc: true },
    ];
    T.setBackend('cuda');
    const tcBefore = cuda!.attentionTensorCores;
    try {
      for (const cs of cases) {
        for (const { dt, kernels, tc } of variants) {
          if (kernels === 'row' && cs.d > 256) continue;
          cuda!.attentionTensorCores = tc && tcBefore;
          withKernels(kernels, () => T.tidy(() => {
            const first = 5;
            const cap = first + cs.tk + 37;
            const kvLead = cs.kvLead ?? cs.lead;
            const n = kvLead.reduce((a, b) => a * b, 1);
            const store = (seed: number) => {
              const vals = valuesIn(dt, seed, n * cap * cs.d);
              for (let h = 0; h < n; h++) {
                vals.fill(NaN, h * cap * cs.d, (h * cap + first) * cs.d);
                vals.fill(NaN, (h * cap + first + cs.tk) * cs.d, (h + 1) * cap * cs.d);
              }
              return T.tensor(vals, [...kvLead, cap, cs.d], dt);
            };
            const q = T.tensor(valuesIn(dt, 3, cs.lead.reduce((a, b) => a * b, 1) * cs.tq * cs.d), [...cs.lead, cs.tq, cs.d], dt);
            const [ks, vs] = [store(1), store(2)];
            const rows = T.kvRows({ k: ks, v: vs, first, count: cs.tk });
            const got = T.scaledDotAttention(q, ks, vs, { ...cs.opts, keyRows: { first, count: cs.tk } }).toArray();
            const want = T.scaledDotAttention(q, rows.k, rows.v, cs.opts).toArray();
            const same = got.every((x, i) => Object.is(x, want[i]));
            const what = `${cs.name} ${dt} ${kernels}${tc ? '' : ' simt'}`;
            assert.ok(same, `${what}: keyRows result differs from the rows alone${got.some(Number.isNaN) ? ' (NaN: read outside the rows)' : ''}`);
            // the backward over the store, gradients for its last m rows only (the TTT inner step's `fresh`
            // rows): dQ bit for bit, dK and dV within the dtype's tolerance of the contiguous keys' rows
            const m = Math.min(cs.tk, 7);
            const tail = (t: Tensor) => T.slice(t, [...kvLead.map(() => 0), cs.tk - m, 0], [...kvLead, cs.tk, cs.d]);
            const head = (t: Tensor) => T.slice(t, [...kvLead.map(() => 0), 0, 0], [...kvLead, cs.tk - m, cs.d]);
            const [fk, fv] = [tail(rows.k), tail(rows.v)];
            const w = T.tensor(valuesIn(dt, 4, q.size), q.shape, dt);
            const viaStore = T.grad((a: Tensor, b: Tensor, c: Tensor) =>
              T.sum(T.mul(T.scaledDotAttention(a, ks, vs, { ...cs.opts, keyRows: { first, count: cs.tk, fresh: { k: b, v: c } } }), w)), [0, 1, 2])(q, fk, fv) as Tensor[];
            const viaConcat = T.grad((a: Tensor, b: Tensor, c: Tensor) =>
              T.sum(T.mul(T.scaledDotAttention(a, T.concat([head(rows.k), b], kvLead.length), T.concat([head(rows.v), c], kvLead.length), cs.opts), w)), [0, 1, 2])(q, fk, fv) as Tensor[];
            const [dq, dqWant] = [viaStore[0].toArray(), viaConcat[0].toArray()];
            assert.ok(dq.every((x, i) => Object.is(x, dqWant[i])), `${what}: dq over the store differs from contiguous keys`);
            for (const i of [1, 2]) {
              const e = relErr(viaStore[i].toArray(), viaConcat[i].toArray(), 1e-3);
              assert.ok(e <= 2 * TOL[dt], `${what}: ${'qkv'[i]} gradient of the last ${m} rows, error ${e}`);
            }
          }));
        }
      }
    } finally {
      cuda!.attentionTensorCores = tcBefore;
      T.setBackend('cpu');
    }
  });

  test('the fused op agrees with the composite definition on cuda', () => {
    T.setBackend('cuda');
    try {
      for (const cs of [CASES[2], CASES[5], CASES[9]]) {
        const err = T.tidy(() => {
          const n = cs.lead.reduce((a, b) => a * b, 1);
          const mk = (s: number, t: number) => T.tensor(valuesIn('float32', s, n * t * cs.d), [...cs.lead, t, cs.d], 'float32');
          const [q, k, v] = [mk(11, cs.tq), mk(12, cs.tk), mk(13, cs.tk)];
          return T.max(T.abs(T.sub(T.scaledDotAttention(q, k, v, cs.opts), T.compositeAttention(q, k, v, cs.opts)))).item();
        });
        assert.ok(err <= 2e-6, `${cs.name}: fused vs composite max error ${err}`);
      }
    } finally {
      T.setBackend('cpu');
    }
  });
});
