/**
 * Kernels of the CUDA backend that have not yet run on a GPU, checked without one: their generated CUDA C
 * (the same source NVRTC compiles) is built with g++ against a small emulation of the CUDA execution model
 * (test/helpers/cuda-emu.h: a std::thread per CUDA thread, warp shuffles through a per-warp exchange), launched
 * with the backend's geometry on seeded inputs, and compared with the CPU backend: the RMSNorm and SwiGLU
 * second-order kernels, softmax's backward and its backward's backward (float32, float64, bfloat16) and AdamW over every parameter in one launch (float32,
 * float64, bit for bit). This checks their arithmetic and indexing, not their speed or the GPU's memory model;
 * `npm run test:cuda` runs them on a GPU. Skips, saying so, where g++ is missing.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { CpuBackend } from '../src/backends/cpu/backend.js';
import { ADAMW_ALL, ADAMW_ENTRY_WORDS, COL_TILE, RMSNORM_BWD, RMSNORM_DW_PARTIAL, castAddName, ADAMW_PER_BLOCK, NLL_BWD, NLL_BWD_ACC, NLL_HVP, NLL_HVP_ACC, RMSNORM_GRAD_BWD, RMSNORM_ROWS, SOFTMAX_BIAS, SOFTMAX_BWD, SOFTMAX_GRAD_BWD, SWIGLU_GRAD_BWD, THREADS, moduleSource } from '../src/backends/cuda/kernels/index.js';
import { fromBfloat16Bits, roundToBfloat16, toBfloat16Bits } from '../src/index.js';
import { seededValues } from './helpers/check.js';

const EMU_HEADER = fileURLToPath(new URL('./helpers/cuda-emu.h', import.meta.url));
const gxx = spawnSync('g++', ['--version'], { encoding: 'utf8' });
const skip = gxx.status === 0 ? false : 'g++ not found: the generated CUDA C cannot be built for the CPU';

type Dt = 'float32' | 'float64' | 'bfloat16';
const CT: Record<Dt, string> = { float32: 'float', float64: 'double', bfloat16: 'bf16' };
const STAT: Record<Dt, 'float32' | 'float64'> = { float32: 'float32', float64: 'float64', bfloat16: 'float32' };
const BYTES: Record<Dt | 'u64' | 'i32', number> = { float32: 4, float64: 8, bfloat16: 2, u64: 8, i32: 4 };

/** An array the harness reads (values given), writes (out) or both: its C element type and values or length. */
interface Arg { name: string; dt: Dt | 'u64' | 'i32'; values?: ArrayLike<number> | BigUint64Array; size?: number; out?: boolean }

function encode(a: Arg): Buffer {
  const v = a.values!;
  if (a.dt === 'u64') return Buffer.from((v as BigUint64Array).buffer);
  if (a.dt === 'i32') return Buffer.from(Int32Array.from(v as ArrayLike<number>).buffer);
  if (a.dt === 'bfloat16') return Buffer.from(new Uint16Array(Array.from(v as ArrayLike<number>, (x) => toBfloat16Bits([x])[0])).buffer);
  return Buffer.from((a.dt === 'float32' ? Float32Array.from(v as ArrayLike<number>) : Float64Array.from(v as ArrayLike<number>)).buffer);
}

function decode(dt: Dt, buf: Buffer): number[] {
  const ab = buf.buffer.slice(buf.byteOffset, buf.byteOffset + buf.byteLength);
  if (dt === 'bfloat16') return Array.from(fromBfloat16Bits(new Uint16Array(ab)));
  return Array.from(dt === 'float32' ? new Float32Array(ab) : new Float64Array(ab));
}

/**
 * Builds `source` with a main that reads the `in` arrays, runs `call` (C, over the arrays' names) on a grid of
 * `grid` blocks of `block` threads, and writes the `out` arrays; returns them decoded, by name.
 */
function emulate(source: string, args: Arg[], call: string, grid: number, block: number, prelude = '', gridY = 1): Record<string, number[]> {
  const dir = mkdtempSync(join(tmpdir(), 'ttt-cuda-emu-'));
  try {
    const ctype = (a: Arg) => (a.dt === 'u64' ? 'unsigned long long' : a.dt === 'i32' ? 'int' : CT[a.dt]);
    const count = (a: Arg) => (a.values ? a.values.length : a.size!);
    const decls = args.map((a) => `std::vector<${ctype(a)}> ${a.name}(${Math.max(count(a), 1)});`).join('\n  ');
    const reads = args.filter((a) => a.values !== undefined).map((a) => `if (fread(${a.name}.data(), sizeof(${ctype(a)}), ${count(a)}, in) != ${count(a)}) return 2;`).join('\n  ');
    const writes = args.filter((a) => a.out).map((a) => `fwrite(${a.name}.data(), sizeof(${ctype(a)}), ${count(a)}, out);`).join('\n  ');
    const main = `
#include <cstdio>
${prelude}
int main(int argc, char** argv) {
  FILE* in = fopen(argv[1], "rb");
  ${decls}
  ${reads}
  fclose(in);
  emuLaunch(${grid}, ${block}, [&] { ${call}; }, ${gridY});
  FILE* out = fopen(argv[2], "wb");
  ${writes}
  fclose(out);
  return 0;
}`;
    writeFileSync(join(dir, 'k.cpp'), `#include "${EMU_HEADER}"\n${source}\n${main}\n`);
    const cc = spawnSync('g++', ['-std=c++20', '-O1', '-pthread', '-ffp-contract=off', '-w', '-o', join(dir, 'k'), join(dir, 'k.cpp')], { encoding: 'utf8' });
    assert.equal(cc.status, 0, `g++ failed:\n${cc.stderr.slice(0, 3000)}`);
    writeFileSync(join(dir, 'in.bin'), Buffer.concat(args.filter((a) => a.values !== undefined).map(encode)));
    const run = spawnSync(join(dir, 'k'), [join(dir, 'in.bin'), join(dir, 'out.bin')], { encoding: 'utf8' });
    assert.equal(run.status, 0, `the emulated kernel failed: ${run.stderr}`);
    const bytes = readFileSync(join(dir, 'out.bin'));
    const result: Record<string, number[]> = {};
    let at = 0;
    for (const a of args.filter((x) => x.out)) {
      const n = count(a) * BYTES[a.dt];
      result[a.name] = decode(a.dt as Dt, bytes.subarray(at, at + n));
      at += n;
    }
    return result;
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

/** Seeded values, rounded to bf16 for bf16 (so every side sees the same numbers). */
const values = (dt: Dt, seed: number, n: number, lo = -2, hi = 2): number[] => {
  const v = seededValues(seed, n, lo, hi);
  return dt === 'bfloat16' ? Array.from(roundToBfloat16(v)) : Array.from(v);
};
const typed = (dt: 'float32' | 'float64', v: ArrayLike<number>) => (dt === 'float32' ? Float32Array.from(v) : Float64Array.from(v));
/** max |a − b| / max(1, max |b|). */
function relErr(a: ArrayLike<number>, b: ArrayLike<number>): number {
  assert.equal(a.length, b.length);
  let scale = 1;
  for (let i = 0; i < b.length; i++) scale = Math.max(scale, Math.abs(b[i]));
  let e = 0;
  for (let i = 0; i < b.length; i++) e = Math.max(e, Math.abs(a[i] - b[i]));
  return e / scale;
}
/** The tolerance of a kernel's result in `dt` against a double-rounded-once reference. */
const TOL: Record<Dt, number> = { float32: 2e-6, float64: 1e-13, bfloat16: 1.6e-2 };

const cpu = new CpuBackend();

describe('CUDA kernels not yet run on a GPU, emulated on the CPU (g++)', { skip }, () => {
  for (const dt of ['float32', 'float64', 'bfloat16'] as const) {
    test(`${RMSNORM_GRAD_BWD} ${dt}: dx', d(dy) and dy·h against the CPU backend (rows of 33, 768 and 1; the gain's column sum)`, () => {
      const ref = dt === 'bfloat16' ? 'float64' : dt;
      for (const [rows, d] of [[37, 33], [9, 768], [5, 1]]) {
        const n = rows * d;
        const [x, w, g, c] = [values(dt, 1, n), values(dt, 2, d), values(dt, 3, n), values(dt, 4, n)];
        let rstd = Array.from({ length: rows }, (_, r) => 1 / Math.sqrt(x.slice(r * d, (r + 1) * d).reduce((s, v) => s + v * v, 0) / d + 1e-6));
        if (STAT[dt] === 'float32') rstd = rstd.map(Math.fround);
        const out = emulate(moduleSource('reduce', dt), [
          { name: 'x', dt, values: x }, { name: 'w', dt, values: w }, { name: 'rstd', dt: STAT[dt], values: rstd },
          { name: 'g', dt, values: g }, { name: 'c', dt, values: c },
          { name: 'dx', dt, size: n, out: true }, { name: 'dg', dt, size: n, out: true }, { name: 'gh', dt: STAT[dt], size: n, out: true },
        ], `${RMSNORM_GRAD_BWD}(x.data(), w.data(), rstd.data(), g.data(), c.data(), dx.data(), dg.data(), gh.data(), ${rows}, ${d})`,
        Math.ceil(rows / RMSNORM_ROWS), 32 * RMSNORM_ROWS);
        const want = cpu.rmsNormGradBackward(typed(ref, x), typed(ref, w), typed(ref, rstd), typed(ref, g), typed(ref, c), rows, d, ref, true);
        const dw = Array.from({ length: d }, (_, j) => out.gh.reduce((s, v, i) => (i % d === j ? s + v : s), 0));
        for (const [name, got, exp] of [['dx', out.dx, want.dx], ['d(dy)', out.dg, want.dg], ['dw (column sums of dy·h)', dw, want.dw!]] as const) {
          const e = relErr(got, exp as ArrayLike<number>);
          assert.ok(e < TOL[dt] * (name.startsWith('dw') ? Math.max(1, rows / 4) : 1), `${dt} ${rows}x${d} ${name}: error ${e}`);
        }
      }
    });

    test(`${SWIGLU_GRAD_BWD} ${dt}: the cotangents of a, b and g against the CPU backend (a grid-stride loop over more elements than threads)`, () => {
      const ref = dt === 'bfloat16' ? 'float64' : dt;
      const n = 1500;
      const [a, b, g, ca, cb] = [1, 2, 3, 4, 5].map((s) => values(dt, 10 + s, n, -6, 6));
      const out = emulate(moduleSource('elementwise', dt), [
        ...(['a', 'b', 'g', 'ca', 'cb'] as const).map((name, i) => ({ name, dt, values: [a, b, g, ca, cb][i] })),
        { name: 'da', dt, size: n, out: true }, { name: 'db', dt, size: n, out: true }, { name: 'dg', dt, size: n, out: true },
      ], `${SWIGLU_GRAD_BWD}(da.data(), db.data(), dg.data(), a.data(), b.data(), g.data(), ca.data(), cb.data(), ${n})`, 2, 256);
      const [ta, tb, tg, tca, tcb] = [a, b, g, ca, cb].map((v) => typed(ref, v));
      const want = cpu.swigluGradBackward(ta, tb, tg, tca, tcb, n, ref) as unknown as Record<string, ArrayLike<number>>;
      for (const name of ['da', 'db', 'dg'] as const) {
        // float32 sums of products as large as 6^4 cancel: relative to the terms, not only the result
        const e = relErr(out[name], want[name]);
        assert.ok(e < TOL[dt] * (dt === 'float32' ? 8 : 1), `${dt} ${name}: error ${e}`);
      }
    });
  }

  for (const dt of ['float32', 'float64', 'bfloat16'] as const) {
    test(`${SOFTMAX_BWD}, ${SOFTMAX_GRAD_BWD} and ${SOFTMAX_BIAS} ${dt}: dx, dy, dg and softmax(x + bias) against the CPU backend (a block per row; rows of 700, 33 and 1)`, () => {
      const ref = dt === 'bfloat16' ? 'float64' : dt;
      for (const [rows, n] of [[5, 700], [9, 33], [4, 1]]) {
        const size = rows * n;
        // y: rows of a softmax (positive, summing to about 1), g and u of either sign
        const y = values(dt, 61, size, 0, 2 / n);
        const [g, u] = [values(dt, 62, size), values(dt, 63, size)];
        // and softmax(g + bias) with a bias of fewer rows, repeating (values like the attention band's: 0 and -1e9)
        const biasRows = rows === 9 ? 3 : rows === 4 ? 2 : rows;
        const bias = values(dt, 64, biasRows * n).map((v, i) => (i % 4 === 1 ? -1e9 : v));
        // the kernels in one launch of the emulation (one build): each thread runs one, then the next
        const out = emulate(moduleSource('reduce', dt), [
          { name: 'y', dt, values: y }, { name: 'g', dt, values: g }, { name: 'u', dt, values: u }, { name: 'b', dt, values: bias },
          { name: 'dx', dt, size, out: true }, { name: 'dy', dt, size, out: true }, { name: 'dg', dt, size, out: true }, { name: 'p', dt, size, out: true },
        ], `${SOFTMAX_BWD}(dx.data(), y.data(), g.data(), ${rows}, ${n}); ${SOFTMAX_GRAD_BWD}(dy.data(), dg.data(), y.data(), g.data(), u.data(), ${rows}, ${n}); ` +
          `${SOFTMAX_BIAS}(p.data(), g.data(), b.data(), ${rows}, ${n}, ${biasRows})`, rows, THREADS);
        const [ty, tg, tu] = [y, g, u].map((v) => typed(ref, v));
        const want = {
          dx: cpu.softmaxBackward(ty, tg, rows, n, ref), ...cpu.softmaxGradBackward(ty, tg, tu, rows, n, ref), p: cpu.softmax(tg, rows, n, ref, { data: typed(ref, bias), rows: biasRows }),
        } as unknown as Record<string, ArrayLike<number>>;
        for (const name of ['dx', 'dy', 'dg', 'p'] as const) {
          const got = out[name];
          const e = relErr(got, want[name]);
          assert.ok(e < TOL[dt], `${dt} ${rows}x${n} ${name}: error ${e}`);
        }
      }
    });
  }

  for (const dt of ['float32', 'float64', 'bfloat16'] as const) {
    test(`${NLL_BWD_ACC} and ${NLL_HVP_ACC} ${dt}: added into a running cotangent in place (beside the plain kernels), against the CPU backend (rows of 16-byte vectors and not)`, () => {
      const ref = dt === 'bfloat16' ? 'float64' : dt;
      const stat = (v: number) => (STAT[dt] === 'float32' ? Math.fround(v) : v);
      const source = moduleSource('reduce', dt);
      for (const [kernel, rows, V] of [[NLL_BWD, 3, 40], [NLL_BWD, 2, 37], [NLL_HVP, 3, 37]] as const) {
        const size = rows * V;
        const [x, u, prior] = [values(dt, 71, size, -4, 4), values(dt, 72, size), values(dt, 73, size)];
        const targets = Array.from({ length: rows }, (_, r) => (r * 7) % V);
        const g = seededValues(74, rows, -2, 2).map(stat);
        const lse = Array.from(cpu.tokenNllForward(typed(ref, x), Int32Array.from(targets), rows, V, ref).lse as ArrayLike<number>, stat);
        const ins: Arg[] = [
          { name: 'x', dt, values: x }, { name: 't', dt: 'i32', values: targets }, { name: 'lse', dt: STAT[dt], values: lse },
          { name: 'g', dt: STAT[dt], values: g }, { name: 'u', dt, values: u },
        ];
        // d0 written from scratch (it starts as garbage: the prior), d1 added into the prior in place, in one launch
        const outs: Arg[] = [{ name: 'd0', dt, values: prior, out: true }, { name: 'd1', dt, values: prior, out: true }];
        let out: Record<string, number[]>;
        if (kernel === NLL_BWD) {
          const vec = (V * BYTES[dt]) % 16 === 0 ? 1 : 0;
          const perRow = Math.ceil(V / (vec ? 16 / BYTES[dt] : 1) / THREADS);
          const call = (d: string, acc: number) => `${acc ? NLL_BWD_ACC : NLL_BWD}(${d}.data(), x.data(), t.data(), lse.data(), g.data(), ${rows}, ${V}, ${vec})`;
          out = emulate(source, [...ins, ...outs], `${call('d0', 0)}; ${call('d1', 1)}`, perRow, THREADS, '', rows);
        } else {
          const dg: Arg[] = [{ name: 'dg0', dt: STAT[dt], size: rows, out: true }, { name: 'dg1', dt: STAT[dt], size: rows, out: true }];
          const call = (d: string, acc: number) => `${acc ? NLL_HVP_ACC : NLL_HVP}(${d}.data(), dg${d[1]}.data(), x.data(), t.data(), lse.data(), g.data(), u.data(), ${rows}, ${V})`;
          out = emulate(source, [...ins, ...outs, ...dg], `${call('d0', 0)}; ${call('d1', 1)}`, rows, THREADS);
        }
        const [tx, tt, tl, tg, tu] = [typed(ref, x), Int32Array.from(targets), typed(ref, lse), typed(ref, g), typed(ref, u)];
        const run = (acc?: Float32Array | Float64Array) =>
          kernel === NLL_BWD ? (cpu.tokenNllBackward(tx, tt, tl, tg, rows, V, ref, acc) as ArrayLike<number>) : (cpu.tokenNllGradBackward(tx, tt, tl, tg, tu, rows, V, ref, acc).dLogits as ArrayLike<number>);
        const want = [run(), run(typed(ref, prior))];
        ['d0', 'd1'].forEach((name, i) => {
          const e = relErr(out[name], want[i]);
          assert.ok(e < TOL[dt] * 2, `${kernel} ${dt} ${rows}x${V} ${name}: error ${e}`);
        });
      }
    });
  }

  for (const dt of ['float32', 'float64', 'bfloat16'] as const) {
    test(`${RMSNORM_DW_PARTIAL} ${dt}: the split column sum's partials of dy·x·rstd read from dy and x, bit for bit those of ${RMSNORM_BWD}'s written products`, () => {
      const [rows, d] = [300, 100];
      const n = rows * d;
      const [x, dy] = [values(dt, 101, n), values(dt, 102, n)];
      let rstd = seededValues(103, rows, 0.5, 2);
      if (STAT[dt] === 'float32') rstd = rstd.map(Math.fround);
      const w = values(dt, 104, d);
      const source = moduleSource('reduce', dt);
      // the old path: the backward kernel writes gxr = dy·x·rstd, then reduce_cols_partial_sum over it
      const gxr = emulate(source, [
        { name: 'x', dt, values: x }, { name: 'w', dt, values: w }, { name: 'rstd', dt: STAT[dt], values: rstd }, { name: 'dy', dt, values: dy },
        { name: 'dx', dt, size: n, out: true }, { name: 'gxr', dt: STAT[dt], size: n, out: true },
      ], `${RMSNORM_BWD}(x.data(), w.data(), rstd.data(), dy.data(), dx.data(), gxr.data(), ${rows}, ${d})`, Math.ceil(rows / RMSNORM_ROWS), 32 * RMSNORM_ROWS).gxr;
      // the backend's split for [1, rows, d] on a GPU of 132 SMs: chunks of 256 rows at most
      const tiles = Math.ceil(d / COL_TILE);
      const chunks = Math.max(1, Math.min(Math.ceil(rows / 256), Math.ceil((4 * 132) / tiles)));
      const len = Math.ceil(rows / chunks);
      const grid = Math.min(tiles * chunks, 65535 * 16);
      // (the gxr column sum runs in the module of gxr's dtype: float32 for bfloat16 tensors)
      const wsOld = emulate(moduleSource('reduce', STAT[dt]), [{ name: 'gxr', dt: STAT[dt], values: gxr }, { name: 'ws', dt: 'float64', size: chunks * d, out: true }],
        `reduce_cols_partial_sum(ws.data(), gxr.data(), 1, ${rows}, ${d}, ${chunks}, ${len})`, grid, THREADS).ws;
      const wsNew = emulate(source, [
        { name: 'x', dt, values: x }, { name: 'dy', dt, values: dy }, { name: 'rstd', dt: STAT[dt], values: rstd }, { name: 'ws', dt: 'float64', size: chunks * d, out: true },
      ], `${RMSNORM_DW_PARTIAL}(ws.data(), x.data(), dy.data(), rstd.data(), ${rows}, ${d}, ${chunks}, ${len})`, grid, THREADS).ws;
      const out = { wsOld, wsNew };
      assert.ok(chunks > 1, 'the test covers more than one chunk');
      const bad = out.wsNew.findIndex((v, i) => !Object.is(v, out.wsOld[i]));
      assert.equal(bad, -1, `${dt} partial ${bad}: ${out.wsNew[bad]} vs ${out.wsOld[bad]}`);
      // and the partials sum to the CPU backend's dw
      const want = cpu.rmsNormBackward(typed(dt === 'bfloat16' ? 'float64' : dt, x), typed(dt === 'bfloat16' ? 'float64' : dt, w), typed(dt === 'bfloat16' ? 'float64' : dt, rstd), typed(dt === 'bfloat16' ? 'float64' : dt, dy), rows, d, dt === 'bfloat16' ? 'float64' : dt, true).dw!;
      const dw = Array.from({ length: d }, (_, c) => out.wsNew[c] + out.wsNew[d + c]);
      assert.ok(relErr(dw, want as ArrayLike<number>) < TOL[dt] * 10, `${dt} dw: ${relErr(dw, want as ArrayLike<number>)}`);
    });
  }

  test('cast_add (a running cotangent taking a contribution of another float dtype): bit for bit the cast and then the sum in the cotangent\'s dtype', () => {
    const n = 1500;
    const pairs = [['bfloat16', 'float32'], ['float32', 'float64'], ['float64', 'float32'], ['float32', 'bfloat16']] as const;
    const round = { float32: Math.fround, float64: (v: number) => v, bfloat16: (v: number) => roundToBfloat16([v])[0] };
    // values representable in their dtype, so the reference sees what the kernel reads
    const args: Arg[] = pairs.flatMap(([from, to], i) => [
      { name: `src${i}`, dt: from, values: values(from, 80 + i, n).map(round[from]) }, { name: `dst${i}`, dt: to, values: values(to, 90 + i, n).map(round[to]), out: true },
    ] as Arg[]);
    const call = pairs.map(([from, to], i) => `${castAddName(from, to)}(dst${i}.data(), src${i}.data(), ${n})`).join('; ');
    const out = emulate(moduleSource('movement'), args, call, 2, 256);
    pairs.forEach(([from, to], i) => {
      const [src, dst] = [args[2 * i].values as number[], args[2 * i + 1].values as number[]];
      // the contribution cast to the cotangent's dtype, then added there
      const want = dst.map((d, j) => round[to](d + round[to](src[j])));
      const bad = out[`dst${i}`].findIndex((v, j) => !Object.is(v, want[j]));
      assert.equal(bad, -1, `${from} into ${to} [${bad}]: ${out[`dst${i}`][bad]} vs ${want[bad]}`);
    });
  });

  for (const dt of ['float32', 'float64'] as const) {
    test(`${ADAMW_ALL} ${dt}: every parameter in one launch equals the CPU backend's per-parameter update bit for bit`, () => {
      const sizes = [5000, 3, 9000, 4096];
      const decays = [true, false, true, false];
      const h = { beta1: 0.9, oneMinusBeta1: 0.1, beta2: 0.95, oneMinusBeta2: 0.05, c1: 1 - 0.9 ** 3, c2: 1 - 0.95 ** 3, eps: 1e-8, lr: 3e-3, decay: false, shrink: 1 - 3e-3 * 0.1 };
      const params = sizes.map((n, i) => ({
        p: values(dt, 20 + i, n), g: values(dt, 30 + i, n, -1e-2, 1e-2), m: values(dt, 40 + i, n, -1e-3, 1e-3), v: values(dt, 50 + i, n, 0, 1e-4),
      }));
      // the table: ten 64-bit words per parameter (its seven arrays, size, first block, decay), pointers filled in by the harness
      const firsts = sizes.map((_, i) => sizes.slice(0, i).reduce((s, n) => s + Math.ceil(n / ADAMW_PER_BLOCK), 0));
      const blocks = sizes.reduce((s, n) => s + Math.ceil(n / ADAMW_PER_BLOCK), 0);
      const arrays: Arg[] = params.flatMap((q, i) => [
        { name: `p${i}`, dt, values: q.p }, { name: `g${i}`, dt, values: q.g }, { name: `m${i}`, dt, values: q.m }, { name: `v${i}`, dt, values: q.v },
        { name: `po${i}`, dt, size: sizes[i], out: true }, { name: `mo${i}`, dt, size: sizes[i], out: true }, { name: `vo${i}`, dt, size: sizes[i], out: true },
      ] as Arg[]);
      const T = dt === 'float32' ? 'float' : 'double';
      const fill = sizes.map((n, i) => `{ (const ${T}*)p${i}.data(), (const ${T}*)g${i}.data(), (const ${T}*)m${i}.data(), (const ${T}*)v${i}.data(), po${i}.data(), mo${i}.data(), vo${i}.data(), ${n}, ${firsts[i]}, ${decays[i] ? 1 : 0} }`).join(', ');
      assert.equal(ADAMW_ENTRY_WORDS, 10, 'the table layout this harness builds');
      const call = `static AwEntry table[] = { ${fill} }; ${ADAMW_ALL}(table, ${sizes.length}, ${[h.beta1, h.oneMinusBeta1, h.beta2, h.oneMinusBeta2, h.c1, h.c2, h.eps, h.lr, h.shrink].map((x) => x.toPrecision(17)).join(', ')})`;
      const out = emulate(moduleSource('elementwise', dt), arrays, call, blocks, 256);
      params.forEach((q, i) => {
        const want = cpu.adamw(typed(dt, q.p), typed(dt, q.g), typed(dt, q.m), typed(dt, q.v), sizes[i], { ...h, decay: decays[i] }, dt);
        for (const [name, got, exp] of [['p', out[`po${i}`], want.p], ['m', out[`mo${i}`], want.m], ['v', out[`vo${i}`], want.v]] as const) {
          const bad = (exp as ArrayLike<number>).length === got.length ? got.findIndex((x, j) => !Object.is(x, (exp as ArrayLike<number>)[j])) : 0;
          assert.equal(bad, -1, `${dt} parameter ${i} (${sizes[i]} elements) ${name}[${bad}]: ${got[bad]} vs ${(exp as ArrayLike<number>)[bad]}`);
        }
      });
    });
  }
});
