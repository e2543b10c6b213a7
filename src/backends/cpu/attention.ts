/**
 * Banded causal attention kernels for the CPU. Query rows go in blocks; a block's visible keys form
 * one contiguous band (band edges only move forward with the row), so each block is a few batched
 * products through ./gemm.ts over [block × band] scores plus a softmax over those, never the dense
 * [tq × tk] matrix: cost O(tq · (block + min(tk, window)) · d). The batch (all heads) shares the
 * band, so every gemm call covers the whole batch at once.
 */
import type { AttentionJob } from '../../engine/backend.js';
import type { DType } from '../../engine/dtype.js';
import { gemm } from './gemm.js';
import { pool } from './pool.js';
import { wasmBandProbabilitiesF32 } from './wasm-elementwise.js';

type FloatArray = Float32Array | Float64Array;

/**
 * Query rows per block. Smaller blocks waste less of the band on masked scores (a block of m rows
 * spans m + window - 1 keys), larger ones make bigger products; 16, 32 and 64 measured within noise
 * of each other at window 64-256 (2 cores, OpenBLAS), so the middle.
 */
const BLOCK = 32;

/** The visible keys of query row i: j in [lo, hi] (inclusive); the engine guarantees lo <= hi. */
function bandLo(job: AttentionJob, i: number): number {
  return Math.max(0, job.qStart + i - job.window + 1 - job.kStart);
}
function bandHi(job: AttentionJob, i: number): number {
  return Math.min(job.tk - 1, job.qStart + i - job.kStart);
}

interface Block {
  i0: number;
  m: number;
  lo: number;
  nk: number;
  /** Element offsets of this block's first query row and first band key, per batch entry. */
  qOff: Int32Array;
  kOff: Int32Array;
}

function* blocks(job: AttentionJob): Generator<Block> {
  const { batch, tq, tk, d } = job;
  const groups = job.groups ?? 1;
  const qOff = new Int32Array(batch);
  const kOff = new Int32Array(batch);
  const kvOffset = job.kvOffset ?? 0;
  const kvStride = job.kvStride ?? tk * d;
  for (let i0 = 0; i0 < tq; i0 += BLOCK) {
    const m = Math.min(BLOCK, tq - i0);
    const lo = bandLo(job, i0);
    const nk = bandHi(job, i0 + m - 1) - lo + 1;
    for (let b = 0; b < batch; b++) {
      qOff[b] = (b * tq + i0) * d;
      kOff[b] = kvOffset + Math.floor(b / groups) * kvStride + lo * d;
    }
    yield { i0, m, lo, nk, qOff, kOff };
  }
}

const stepOffsets = (batch: number, step: number): Int32Array => Int32Array.from({ length: batch }, (_, b) => b * step);

/**
 * Turns the raw scores of a block (rows of nk, batch-major) into probabilities in place: zero
 * outside each row's band, exp(s · scale − lse) inside. With `lse` given it is used (backward);
 * otherwise it is computed, written to `lseOut`, and the rows are normalised (forward).
 */
function probabilities(s: FloatArray, job: AttentionJob, blk: Block, lse: FloatArray, computeLse: boolean): void {
  const { batch, tq, scale } = job;
  const { i0, m, lo, nk } = blk;
  if (s instanceof Float32Array && lse instanceof Float32Array) {
    // float32: the exp part in WebAssembly SIMD (./wasm-elementwise.ts) when built, then the zeros.
    const band = new Int32Array(2 * m);
    for (let r = 0; r < m; r++) {
      band[2 * r] = bandLo(job, i0 + r) - lo;
      band[2 * r + 1] = bandHi(job, i0 + r) - lo;
    }
    if (wasmBandProbabilitiesF32(s, batch, m, nk, band, scale, lse, tq, i0, computeLse)) {
      for (let b = 0; b < batch; b++) {
        for (let r = 0; r < m; r++) {
          const row = (b * m + r) * nk;
          s.fill(0, row, row + band[2 * r]);
          s.fill(0, row + band[2 * r + 1] + 1, row + nk);
        }
      }
      return;
    }
  }
  for (let b = 0; b < batch; b++) {
    for (let r = 0; r < m; r++) {
      const i = i0 + r;
      const jlo = bandLo(job, i) - lo;
      const jhi = bandHi(job, i) - lo;
      const row = (b * m + r) * nk;
      s.fill(0, row, row + jlo);
      s.fill(0, row + jhi + 1, row + nk);
      if (computeLse) {
        let mx = -Infinity;
        for (let j = row + jlo; j <= row + jhi; j++) if (s[j] > mx) mx = s[j];
        mx *= scale;
        let sum = 0;
        for (let j = row + jlo; j <= row + jhi; j++) {
          const e = Math.exp(s[j] * scale - mx);
          s[j] = e;
          sum += e;
        }
        const inv = 1 / sum;
        for (let j = row + jlo; j <= row + jhi; j++) s[j] *= inv;
        lse[b * tq + i] = mx + Math.log(sum);
      } else {
        const l = lse[b * tq + i];
        for (let j = row + jlo; j <= row + jhi; j++) s[j] = Math.exp(s[j] * scale - l);
      }
    }
  }
}

export function attentionForward(qd: unknown, kd: unknown, vd: unknown, job: AttentionJob, dtype: DType): { out: FloatArray; lse: FloatArray } {
  const q = qd as FloatArray;
  const k = kd as FloatArray;
  const v = vd as FloatArray;
  if (job.keyPositions) return attentionAtPositions(q, k, v, job, dtype);
  const { batch, tq, tk, d } = job;
  // Outputs come from the backend's pool (every element is written below); so does scratch (given
  // back at the end), which puts it in the wasm arena where the gemm and probability kernels use it
  // in place.
  const out = pool.alloc(dtype, batch * tq * d, false) as FloatArray;
  const lse = pool.alloc(dtype, batch * tq, false) as FloatArray;
  const maxNk = Math.min(tk, BLOCK + job.window - 1);
  const p = pool.alloc(dtype, batch * BLOCK * maxNk, false) as FloatArray;
  const o = pool.alloc(dtype, batch * BLOCK * d, false) as FloatArray;
  for (const blk of blocks(job)) {
    const { i0, m, nk, qOff, kOff } = blk;
    gemm({ batch, m, n: nk, k: d, transA: false, transB: true, a: q, aOffsets: qOff, b: k, bOffsets: kOff, c: p });
    probabilities(p, job, blk, lse, true);
    gemm({ batch, m, n: d, k: nk, transA: false, transB: false, a: p, aOffsets: stepOffsets(batch, m * nk), b: v, bOffsets: kOff, c: o });
    for (let b = 0; b < batch; b++) out.set(o.subarray(b * m * d, (b + 1) * m * d) as never, (b * tq + i0) * d);
  }
  pool.release(p, dtype, p.length);
  pool.release(o, dtype, o.length);
  return { out, lse };
}

/**
 * The forward with positions read from memory (`AttentionJob.keyPositions`): keys in any order, so
 * every key's visibility is tested on its own. Decode-sized work (a launch plan's step: a query row
 * against a ring of keys), in double, one row at a time.
 */
function attentionAtPositions(q: FloatArray, k: FloatArray, v: FloatArray, job: AttentionJob, dtype: DType): { out: FloatArray; lse: FloatArray } {
  const { batch, tq, tk, d, window, scale } = job;
  const keyPos = job.keyPositions as Int32Array;
  const q0 = (job.queryPosition as Int32Array)[0];
  const groups = job.groups ?? 1;
  const kvOffset = job.kvOffset ?? 0;
  const kvStride = job.kvStride ?? tk * d;
  const out = pool.alloc(dtype, batch * tq * d, false) as FloatArray;
  const lse = pool.alloc(dtype, batch * tq, false) as FloatArray;
  const s = new Float64Array(tk);
  const acc = new Float64Array(d);
  for (let b = 0; b < batch; b++) {
    const kb = kvOffset + Math.floor(b / groups) * kvStride;
    for (let i = 0; i < tq; i++) {
      const qp = q0 + i;
      const qo = (b * tq + i) * d;
      let m = -Infinity;
      for (let j = 0; j < tk; j++) {
        const kp = keyPos[j];
        if (kp < 0 || kp > qp || qp - kp >= window) {
          s[j] = -Infinity;
          continue;
        }
        let dot = 0;
        for (let c = 0; c < d; c++) dot += q[qo + c] * k[kb + j * d + c];
        s[j] = dot * scale;
        if (s[j] > m) m = s[j];
      }
      acc.fill(0);
      let sum = 0;
      for (let j = 0; j < tk; j++) {
        if (s[j] === -Infinity) continue;
        const p = Math.exp(s[j] - m);
        sum += p;
        for (let c = 0; c < d; c++) acc[c] += p * v[kb + j * d + c];
      }
      // a row that sees no key (which the host cannot rule out here) gives NaN, not a silent zero
      for (let c = 0; c < d; c++) out[qo + c] = sum > 0 ? acc[c] / sum : NaN;
      lse[b * tq + i] = sum > 0 ? m + Math.log(sum) : NaN;
    }
  }
  return { out, lse };
}

/**
 * FlashAttention's backward per block: P is recomputed from q, k and the saved lse;
 * dV += Pᵀ dO, dS = P ⊙ (dO Vᵀ − rowsum(dO ⊙ O)), dQ = dS K · scale, dK += dSᵀ Q · scale. A key
 * belongs to the bands of several blocks, so dK and dV accumulate in double across blocks. Keys may
 * be rows of a store (kvOffset, kvStride); dK and dV cover rows from gradKeysFrom.
 */
export function attentionBackward(
  qd: unknown, kd: unknown, vd: unknown, od: unknown, lsed: unknown, dod: unknown, job: AttentionJob, dtype: DType,
): { dq: FloatArray; dk: FloatArray; dv: FloatArray } {
  const q = qd as FloatArray;
  const k = kd as FloatArray;
  const v = vd as FloatArray;
  const o = od as FloatArray;
  const lse = lsed as FloatArray;
  const dO = dod as FloatArray;
  const { batch, tq, tk, d, scale } = job;
  const groups = job.groups ?? 1;
  const kvBatch = batch / groups;
  const from = job.gradKeysFrom ?? 0;
  const dq = pool.alloc(dtype, batch * tq * d, false) as FloatArray; // outputs: every element is written below
  const dk = pool.alloc(dtype, kvBatch * (tk - from) * d, false) as FloatArray;
  const dv = pool.alloc(dtype, kvBatch * (tk - from) * d, false) as FloatArray;
  // a key/value head's gradient sums its query heads', in head order
  const dkAcc = new Float64Array(kvBatch * tk * d);
  const dvAcc = new Float64Array(kvBatch * tk * d);
  const delta = new Float64Array(batch * tq);
  for (let r = 0; r < batch * tq; r++) {
    let s = 0;
    for (let t = r * d; t < (r + 1) * d; t++) s += dO[t] * o[t];
    delta[r] = s;
  }
  const maxNk = Math.min(tk, BLOCK + job.window - 1);
  const p = pool.alloc(dtype, batch * BLOCK * maxNk, false) as FloatArray;
  const ds = pool.alloc(dtype, batch * BLOCK * maxNk, false) as FloatArray;
  const tmp = pool.alloc(dtype, batch * Math.max(BLOCK, maxNk) * d, false) as FloatArray;
  for (const blk of blocks(job)) {
    const { i0, m, lo, nk, qOff, kOff } = blk;
    const pOff = stepOffsets(batch, m * nk);
    gemm({ batch, m, n: nk, k: d, transA: false, transB: true, a: q, aOffsets: qOff, b: k, bOffsets: kOff, c: p });
    probabilities(p, job, blk, lse, false);
    gemm({ batch, m, n: nk, k: d, transA: false, transB: true, a: dO, aOffsets: qOff, b: v, bOffsets: kOff, c: ds });
    for (let b = 0; b < batch; b++) {
      for (let r = 0; r < m; r++) {
        const dl = delta[b * tq + i0 + r];
        const row = (b * m + r) * nk;
        for (let j = row; j < row + nk; j++) ds[j] = p[j] * (ds[j] - dl);
      }
    }
    // The [nk, d] products land in tmp and are added into the band rows of the accumulators.
    const accumulate = (acc: Float64Array, mul: number) => {
      for (let b = 0; b < batch; b++) {
        const from = b * nk * d;
        const to = (Math.floor(b / groups) * tk + lo) * d;
        for (let x = 0; x < nk * d; x++) acc[to + x] += tmp[from + x] * mul;
      }
    };
    if (lo + nk > from) {
      gemm({ batch, m: nk, n: d, k: m, transA: true, transB: false, a: p, aOffsets: pOff, b: dO, bOffsets: qOff, c: tmp });
      accumulate(dvAcc, 1);
      gemm({ batch, m: nk, n: d, k: m, transA: true, transB: false, a: ds, aOffsets: pOff, b: q, bOffsets: qOff, c: tmp });
      accumulate(dkAcc, scale);
    }
    gemm({ batch, m, n: d, k: nk, transA: false, transB: false, a: ds, aOffsets: pOff, b: k, bOffsets: kOff, c: tmp });
    for (let b = 0; b < batch; b++) {
      const from = b * m * d;
      const to = (b * tq + i0) * d;
      for (let x = 0; x < m * d; x++) dq[to + x] = tmp[from + x] * scale;
    }
  }
  for (const a of [p, ds, tmp]) pool.release(a, dtype, a.length);
  for (let e = 0; e < kvBatch; e++) {
    dk.set(dkAcc.subarray((e * tk + from) * d, (e + 1) * tk * d), e * (tk - from) * d);
    dv.set(dvAcc.subarray((e * tk + from) * d, (e + 1) * tk * d), e * (tk - from) * d);
  }
  return { dq, dk, dv };
}
