/**
 * `npm run bench`: every benchmark in bench/, one after another. Each prints its table and writes
 * bench/results/<name>.json. Speed goals live here, never in the test suite.
 */
const benches: Record<string, () => Promise<{ main: () => Promise<unknown> | unknown }>> = {
  'cpu-matmul': () => import('./cpu-matmul.js'),
  'cpu-attention': () => import('./cpu-attention.js'),
  'cpu-elementwise': () => import('./cpu-elementwise.js'),
  variants: () => import('./variants.js'),
  'cuda-gemm': () => import('./cuda-gemm.js'),
  'cuda-attention': () => import('./cuda-attention.js'),
  'cuda-attention-fwd': () => import('./cuda-attention-fwd.js'),
  'cuda-overhead': () => import('./cuda-overhead.js'),
  'cuda-train': () => import('./cuda-train.js'),
  'cuda-profile': () => import('./cuda-profile.js'),
  'cuda-latency': () => import('./cuda-latency.js'),
  'cuda-decode': () => import('./cuda-decode.js'),
  'cuda-memory': () => import('./cuda-memory.js'),
  'cuda-launches': () => import('./cuda-launches.js'),
};

const only = process.argv.slice(2);
for (const [name, load] of Object.entries(benches)) {
  if (only.length && !only.includes(name)) continue;
  console.log(`\n=== bench: ${name} ===`);
  await (await load()).main();
}
