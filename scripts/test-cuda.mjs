#!/usr/bin/env node
// `npm run test:cuda`: the backend-independent suites (engine ops and gradients, autodiff, attention,
// models, sessions, baselines, training, the golden reference) run again with TTT_DEVICE=cuda, plus the
// cuda-vs-cpu checks. Without a usable GPU it says why and exits 0. Runs the TypeScript through tsx
// where it is installed (a dev checkout), else the compiled tests in dist/ (the GPU machine, after
// `npm run build`, with only production dependencies staged).
import { spawnSync } from 'node:child_process';
import { existsSync, readdirSync } from 'node:fs';
import { join } from 'node:path';

const root = new URL('..', import.meta.url).pathname;
const SUITES = ['cuda', 'kv-store', 'norm', 'rope', 'swiglu', 'softmax', 'accumulate', 'phases', 'output-loss', 'loss', 'engine-caches', 'autodiff', 'ops-forward', 'ops-grad', 'errors', 'attention', 'model', 'session', 'golden', 'mixer-', 'train.test', 'toy', 'launch-plan', 'decode-plan'];
const useTsx = existsSync(join(root, 'node_modules', 'tsx'));
const dir = useTsx ? 'test' : join('dist', 'test');
const ext = useTsx ? '.test.ts' : '.test.js';
if (!existsSync(join(root, dir))) {
  console.error(`test:cuda: ${dir} not found (run npm run build first)`);
  process.exit(1);
}
const files = readdirSync(join(root, dir)).filter((f) => f.endsWith(ext) && SUITES.some((s) => f.includes(s))).sort().map((f) => join(dir, f));
const loader = useTsx ? ['--import', 'tsx'] : [];
const engine = useTsx ? './src/index.ts' : './dist/src/index.js';
const probe = spawnSync(process.execPath, [...loader, '--input-type=module', '-e',
  `const T = await import(${JSON.stringify(engine)}); T.setBackend('cuda'); console.log(T.getBackend().info().device ?? 'cuda');`], { cwd: root, encoding: 'utf8' });
if (probe.status !== 0) {
  const why = (probe.stderr || probe.stdout).split('\n').find((l) => /^\w*Error: /.test(l)) ?? 'the cuda backend did not start';
  console.log(`test:cuda: skipped — no usable CUDA device (${why.slice(0, 300)})`);
  process.exit(0);
}
console.log(`test:cuda: ${files.length} suites with TTT_DEVICE=cuda on ${probe.stdout.trim()}`);
const r = spawnSync(process.execPath, [...loader, '--test', '--test-reporter=spec', ...files], {
  cwd: root, stdio: 'inherit', env: { ...process.env, TTT_DEVICE: 'cuda' },
});
process.exit(r.status ?? 1);
