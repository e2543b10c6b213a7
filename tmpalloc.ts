process.env.TTT_CACHE_DIR ??= '/tmp/ttt-stand-in-cache';
import { dispose, keep, randint, randomKey, registerBackend, setBackend, tidy, valueAndGrad } from './src/index.js';
import { CudaBackend } from './src/backends/cuda/backend.js';
import { standInLibraries } from './src/backends/cuda/stand-in.js';
import { preset } from './src/model/config.js';
import { type Params, initParams } from './src/model/transformer.js';
import { outerLoss } from './src/model/ttt-e2e.js';
const be = new CudaBackend(0, standInLibraries()) as any;
registerBackend('s', () => be); setBackend('s');
be.rmsNormGradKernel = process.env.NG === '1';
const variant = (process.argv[2] ?? 'e2e') as any;
const c = preset('125m', variant, { computeDType: 'bfloat16' });
const params = initParams(c, randomKey(0));
const tokens = keep(randint(randomKey(1), [1, 8192], 0, c.vocabSize));
const buckets = new Map<string, { n: number; bytes: number }>();
let on = false;
const sites = new Map<string, number>();
const alloc = be.allocator.alloc.bind(be.allocator);
be.allocator.alloc = (n: number) => { if (on && n >= 1e6 && process.env.SITES) { const st = (new Error().stack ?? '').split('\n').slice(2, 14).map((l) => l.trim().replace(/^at /, '').replace(/\(.*\/src\//, '(').replace(/:\d+\)$/, ')')).filter((l) => !/backends\/cuda|runtime|tensor\.ts/.test(l)).slice(0, 8).join(' < '); const k2 = `${(n / 1e6).toFixed(0)}MB ${st}`; sites.set(k2, (sites.get(k2) ?? 0) + 1); } if (on) { const k = n >= 50e6 ? '>=50MB' : n >= 10e6 ? '10-50MB' : n >= 1e6 ? '1-10MB' : n >= 1e5 ? '0.1-1MB' : '<0.1MB'; const b = buckets.get(k) ?? { n: 0, bytes: 0 }; b.n++; b.bytes += n; buckets.set(k, b); } return alloc(n); };
const step = () => tidy(() => { const [l, g] = valueAndGrad((p: Params) => outerLoss(c, p, tokens, tokens))(params); dispose([l, g]); });
step(); on = true; step();
let tot = 0;
for (const [k, v] of [...buckets.entries()]) { tot += v.bytes; console.log(k.padEnd(8), String(v.n).padStart(6), 'allocs', (v.bytes / 1e9).toFixed(2), 'GB written'); }
console.log('total', (tot / 1e9).toFixed(1), 'GB -> at 3 TB/s write-only', (tot / 3e12 * 1e3).toFixed(1), 'ms; x3 (read 2 + write 1):', (3 * tot / 3e12 * 1e3).toFixed(1), 'ms');

for (const [k, v] of [...sites.entries()].sort((a, b) => b[1] * Number(b[0].split('MB')[0]) - a[1] * Number(a[0].split('MB')[0])).slice(0, 30)) console.log(String(v).padStart(4), k);

const cats = new Map<string, number>();
for (const [k, v] of sites) {
  const mb = Number(k.split('MB')[0]);
  const cat = /attention\.ts|softmaxVjp|biasedSoftmax/.test(k) ? 'attention (composite)' : /loss\.ts|outputLogits/.test(k) && mb > 200 ? 'logits / NLL' : mb > 300 ? 'embedding-sized' : /swiglu|silu|sigmoid/.test(k) ? 'swiglu' : /norm/i.test(k) ? 'norm' : 'other';
  cats.set(cat, (cats.get(cat) ?? 0) + v * mb);
}
for (const [k, v] of cats) console.log('CAT', k.padEnd(24), (v / 1e3).toFixed(1), 'GB written');
const other = new Map<string, number>();
for (const [k, v] of sites) {
  const mb = Number(k.split('MB')[0]);
  const site = k.slice(k.indexOf(' ') + 1).split(' < ').slice(0, 4).join(' < ');
  other.set(site, (other.get(site) ?? 0) + v * mb);
}
for (const [k, v] of [...other.entries()].sort((a, b) => b[1] - a[1]).slice(0, 25)) console.log('SITE', (v / 1e3).toFixed(2).padStart(6), 'GB', k);
