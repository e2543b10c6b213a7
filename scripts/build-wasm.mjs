#!/usr/bin/env node
// Assembles the CPU GEMM WebAssembly kernels into build/wasm/ (not committed; run by `npm run build`).
//   gemm.wasm          baseline: WebAssembly SIMD128 + threads (runs on Node >= 16)
//   gemm-relaxed.wasm  same, with relaxed_madd (fused multiply-add); picked at run time where the
//                      engine validates it (Node >= 22, or Node 20 with --experimental-wasm-relaxed-simd)
//   elementwise.wasm   float32 exp / sigmoid / silu, softmax / logsumexp rows and the attention probability
//                      blocks, float32 / float64 binary arithmetic; WebAssembly SIMD128 on the shared
//                      arena memory (src/backends/cpu/wasm-elementwise.ts, arena.ts)
//   fma-peak(-relaxed).wasm  register-only f32x4 multiply-add loops: the peak bench/cpu-matmul.ts compares against
import { mkdirSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import wabtInit from 'wabt';
import { generateElementwiseWat } from '../src/backends/cpu/wasm/elementwise-wat.mjs';
import { generatePeakWat, generateWat } from '../src/backends/cpu/wasm/gemm-wat.mjs';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const outDir = join(root, 'build', 'wasm');

export async function buildWasm({ config, outDir: dir = outDir, quiet = false } = {}) {
  const wabt = await wabtInit();
  mkdirSync(dir, { recursive: true });
  const outputs = [];
  const modules = [
    ['gemm.wasm', () => generateWat({ relaxed: false, config }), { simd: true, threads: true, relaxed_simd: false }],
    ['gemm-relaxed.wasm', () => generateWat({ relaxed: true, config }), { simd: true, threads: true, relaxed_simd: true }],
    ['fma-peak.wasm', () => generatePeakWat({ relaxed: false }), { simd: true }],
    ['fma-peak-relaxed.wasm', () => generatePeakWat({ relaxed: true }), { simd: true, relaxed_simd: true }],
    ['elementwise.wasm', () => generateElementwiseWat(), { simd: true, threads: true }],
  ];
  for (const [name, makeWat, features] of modules) {
    const wat = makeWat();
    const mod = wabt.parseWat(name.replace('.wasm', '.wat'), wat, features);
    try {
      mod.validate(features);
      const { buffer } = mod.toBinary({ log: false });
      const file = join(dir, name);
      writeFileSync(file, buffer);
      outputs.push(file);
      if (!quiet) console.log(`build-wasm: wrote ${file} (${buffer.length} bytes)`);
    } finally {
      mod.destroy();
    }
  }
  return outputs;
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) {
  await buildWasm();
}
