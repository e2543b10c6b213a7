import * as T from '../src/index.js';
import { makeConfig } from '../src/model/config.js';
import { initParams, embed, runBlocks, range, suffixStart, type Params } from '../src/model/transformer.js';
import { e2eOuterLoss, miniBatchStep, perSequence } from '../src/model/ttt-e2e.js';
const scale = Number(process.argv[2] ?? 5), clip = Number(process.argv[3] ?? 0.05), eps = Number(process.argv[4] ?? 1e-5);
const c = makeConfig({ variant: 'e2e', vocabSize: 16, dModel: 8, nLayers: 2, nHeads: 2, ffnDim: 8, window: 4, miniBatch: 2, innerLr: 1, innerClip: clip });
const p0 = initParams(c, T.randomKey(7), 'float64');
const params = T.mapLeaves(p0, (t) => (t.rank >= 2 ? T.mul(t, scale) : T.add(t, T.mul(T.randn(T.randomKey(t.id), t.shape, 'float64'), 0.1))));
const tok = T.randint(T.randomKey(3), [1, 7], 0, 16).toArray();
const tokens = T.tensor(tok.slice(0, 6), [1, 6], 'int32');
const targets = T.tensor(tok.slice(1, 7), [1, 6], 'int32');
const t0 = Date.now();
const [val, g] = T.valueAndGrad((p: Params) => e2eOuterLoss(c, p, tokens, targets))(params);
console.log('loss', val.item(), Date.now() - t0, 'ms');
// inner grad norm of first step
const s = suffixStart(c);
const x = runBlocks(c, params, 0, s, embed(params, T.slice(tokens, [0, 0], [1, 2])), range(0, 2), [], []).x;
const ig = T.grad((w: any) => miniBatchStep(c, params, w, [], x, T.slice(targets, [0, 0], [1, 2]), range(0, 2), 0, undefined, false).loss)(perSequence(params.fast, 1));
console.log('inner grad norm', Math.sqrt(T.leaves(ig).reduce((a, t) => a + t.toArray().reduce((u, v) => u + v * v, 0), 0)));
const paths: [string, (p: any) => T.Tensor][] = [
  ['embed', (p) => p.embed], ['b0.wq', (p) => p.blocks[0].attn.wq], ['b1.wk', (p) => p.blocks[1].attn.wk], ['b1.wq', (p) => p.blocks[1].attn.wq],
  ['fast.w1', (p) => p.fast[0].w1], ['fast.w2', (p) => p.fast[0].w2], ['fast.w3', (p) => p.fast[0].w3], ['b1.mlp.w1', (p) => p.blocks[1].mlp.w1],
  ['b0.attnNorm', (p) => p.blocks[0].attnNorm], ['b1.primeNorm', (p) => p.blocks[1].primeNorm], ['finalNorm', (p) => p.finalNorm], ['b1.qNorm', (p) => p.blocks[1].attn.qNorm],
];
const leafIndex = (get: (p: any) => T.Tensor) => T.leaves(params).indexOf(get(params));
for (const [name, get] of paths) {
  const gi = get(g).toArray();
  const i = gi.reduce((bi, v, j) => (Math.abs(v) > Math.abs(gi[bi]) ? j : bi), 0);
  const li = leafIndex(get);
  const at = (d: number) => T.tidy(() => {
    const p = T.mapLeaves(params, (t, k) => { if (k !== li) return t; const a = t.toArray(); a[i] += d; return T.tensor(a, t.shape, 'float64'); });
    return e2eOuterLoss(c, p, tokens, targets).item();
  });
  const fd = (at(eps) - at(-eps)) / (2 * eps);
  console.log(name, i, gi[i].toExponential(6), fd.toExponential(6), (Math.abs(fd - gi[i]) / Math.abs(gi[i])).toExponential(2));
}
