import { readFileSync } from 'node:fs';
import * as T from './src/index.js';
import { configFromReference, paramsFromReference, namedLeaves, referenceNames, referenceSlice } from './src/model/reference.js';
import { outerLoss } from './src/model/ttt-e2e.js';
const golden = JSON.parse(readFileSync('/work/shared/golden/ttt-e2e-tiny.json', 'utf8'));
const rel = (a: ArrayLike<number>, b: ArrayLike<number>) => { let n = 0, d = 0; for (let i = 0; i < b.length; i++) { n += (a[i] - b[i]) ** 2; d += b[i] ** 2; } return Math.sqrt(n / d); };
const name = process.argv[2] ?? 'full';
const cs = golden.cases[name];
const c = configFromReference(cs.model_config, cs.inner_optimizer);
const n = golden.input_ids.length;
const tokens = T.tensor(golden.input_ids, [1, n], 'int32');
const targets = T.tensor(golden.target_tokens, [1, n], 'int32');
const names = referenceNames(c);
const g: Record<string, Map<string, number[]>> = {};
for (const dt of ['float64', 'float32'] as const) {
  const p = paramsFromReference(c, cs.params, dt);
  const [loss, grads] = T.valueAndGrad((q: any) => outerLoss(c, q, tokens, targets))(p);
  g[dt] = new Map([...namedLeaves(grads)].map(([k, v]) => [k, v.toArray()]));
  console.log(dt, 'loss', loss.item(), 'ref', cs.loss);
}
for (const [path, entry] of names) {
  const ref = referenceSlice(cs.grads, entry).data;
  console.log(path.padEnd(28), 'f64-ref', rel(g.float64.get(path)!, ref).toExponential(2), 'f32-ref', rel(g.float32.get(path)!, ref).toExponential(2), 'f32-f64', rel(g.float32.get(path)!, g.float64.get(path)!).toExponential(2));
}
