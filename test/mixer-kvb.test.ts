/**
 * TTT-KVB mixers (kvb-linear, kvb-mlp; src/model/mixers/ttt-kvb.ts) in float64 with small dims:
 * the dual form against a per-token primal reference with the engine's `grad`, chunked reads with
 * carried state against one pass, causality of whole models, Session reads against the inner loop,
 * parameter gradients (through the inner updates) against central differences, and training.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import * as T from '../src/index.js';
import type { Tensor } from '../src/index.js';
import { type ModelConfig, type ModelConfigInput, makeConfig } from '../src/model/config.js';
import { type Params, initParams } from '../src/model/transformer.js';
import { innerLoop, lmLoss } from '../src/model/ttt-e2e.js';
import { type MixerState, getMixer } from '../src/model/mixers/index.js';
import { type InnerLayer, type KvbKind, type ScanInputs, kvbScan } from '../src/model/mixers/ttt-kvb.js';
import { AdamW } from '../src/train/adamw.js';
import { checkReadingEquivalence } from './helpers/session-check.js';

const KINDS: KvbKind[] = ['linear', 'mlp'];
const EPS = 1e-6;

const rn = (seed: number, shape: number[], std = 1) => T.mul(T.randn(T.randomKey(seed), shape, 'float64'), std);
const maxDiff = (a: ArrayLike<number>, b: ArrayLike<number>) => {
  assert.equal(a.length, b.length, 'length mismatch');
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i] - b[i]));
  return m;
};

// ---- the primal reference, written independently of the mixer ---------------------------------

function lnRef(x: Tensor, w: Tensor, b: Tensor): Tensor {
  const mu = T.mean(x, -1, true);
  const variance = T.mean(T.square(T.sub(x, mu)), -1, true);
  return T.add(T.mul(T.div(T.sub(x, mu), T.sqrt(T.add(variance, EPS))), w), b);
}

/** The inner model f: x W + b, or silu(x W1 + b1) W2 + b2. */
function fRef(W: InnerLayer[], x: Tensor): Tensor {
  let y = x;
  W.forEach((l, i) => {
    if (i > 0) y = T.silu(y);
    y = T.add(T.matmul(y, l.w), l.b);
  });
  return y;
}

/**
 * Token by token: ∇ℓ_t at the mini-batch's start weights (engine `grad`), W_t = W_{t-1} − η_t ∇ℓ_t,
 * z_t = LN(f(q_t; W_t)) + q_t, and the start weights move on at the end of each mini-batch.
 */
function primalScan(b: number, inp: ScanInputs, W0: InnerLayer[]): { z: Tensor; cur: InnerLayer[] } {
  const [B, H, Tn, d] = inp.q.shape;
  const at = (x: Tensor, t: number) => T.slice(x, [0, 0, t, 0], [B, H, t + 1, x.shape[3]]);
  let start = W0;
  let cur = W0;
  const zs: Tensor[] = [];
  for (let t = 0; t < Tn; t++) {
    const k = at(inp.k, t);
    const v = at(inp.v, t);
    const loss = (W: InnerLayer[]) => T.mul(T.sum(T.square(T.sub(T.add(lnRef(fRef(W, k), inp.lnW, inp.lnB), k), v))), 0.5);
    const g = T.grad(loss)(start) as InnerLayer[];
    const eta = at(inp.eta, t); // [B, H, 1, 1]
    cur = cur.map((l, i) => ({ w: T.sub(l.w, T.mul(g[i].w, eta)), b: T.sub(l.b, T.mul(g[i].b, eta)) }));
    const q = at(inp.q, t);
    zs.push(T.add(lnRef(fRef(cur, q), inp.lnW, inp.lnB), q));
    if ((t + 1) % b === 0) start = cur;
  }
  void d;
  return { z: T.concat(zs, 2), cur };
}

function scanInputs(seed: number, B: number, H: number, Tn: number, d: number, etaScale = 1): ScanInputs {
  return {
    q: rn(seed + 1, [B, H, Tn, d]),
    k: rn(seed + 2, [B, H, Tn, d]),
    v: rn(seed + 3, [B, H, Tn, d]),
    eta: T.mul(T.uniform(T.randomKey(seed + 4), [B, H, Tn, 1], { min: 0.05, max: 0.5, dtype: 'float64' }), etaScale),
    lnW: T.add(rn(seed + 5, [H, 1, d], 0.3), 1),
    lnB: rn(seed + 6, [H, 1, d], 0.3),
  };
}

function innerWeights(kind: KvbKind, seed: number, B: number, H: number, d: number): InnerLayer[] {
  const dims = kind === 'linear' ? [d, d] : [d, 4 * d, d];
  return dims.slice(1).map((out, l) => ({
    w: rn(seed + 10 * l, [B, H, dims[l], out], 0.5),
    b: rn(seed + 10 * l + 1, [B, H, 1, out], 0.2),
  }));
}

describe('kvb: dual form equals the primal reference', () => {
  for (const kind of KINDS) {
    test(`${kind}: several T, b = 4 (T not a multiple of b too)`, () => {
      T.tidy(() => {
        const [B, H, d, b] = [2, 2, 4, 4];
        for (const Tn of [1, 3, 4, 7, 9, 12]) {
          const inp = scanInputs(100 + Tn, B, H, Tn, d);
          const W0 = innerWeights(kind, 7, B, H, d);
          const ref = primalScan(b, inp, W0);
          const dual = kvbScan(kind, b, inp, { start: W0, cur: W0, pos: 0 }, EPS);
          const dz = maxDiff(dual.z.toArray(), ref.z.toArray());
          assert.ok(dz < 1e-10, `${kind} T=${Tn}: outputs differ by ${dz}`);
          dual.state.cur.forEach((l, i) => {
            assert.ok(maxDiff(l.w.toArray(), ref.cur[i].w.toArray()) < 1e-10, `${kind} T=${Tn}: final W${i}`);
            assert.ok(maxDiff(l.b.toArray(), ref.cur[i].b.toArray()) < 1e-10, `${kind} T=${Tn}: final b${i}`);
          });
          assert.equal(dual.state.pos, Tn % b);
          // not vacuous: without inner updates the outputs after the first token differ
          if (Tn > 1) {
            const frozen = primalScan(b, { ...inp, eta: T.mul(inp.eta, 0) }, W0);
            assert.ok(maxDiff(frozen.z.toArray(), ref.z.toArray()) > 1e-3, `${kind} T=${Tn}: the inner updates do not matter`);
          }
        }
      });
    });
  }
});

// ---- mixer and model level ---------------------------------------------------------------------

const cfg = (kind: KvbKind, extra: Partial<ModelConfigInput> = {}): ModelConfig =>
  makeConfig({
    variant: `kvb-${kind}`, vocabSize: 29, dModel: 16, nLayers: 2, nHeads: 2, ffnDim: 24, window: 6, miniBatch: 4,
    mixer: { miniBatch: 4, baseLr: kind === 'linear' ? 4 : 1 }, ...extra,
  });
/** Float64 params with the matrices scaled up from the 0.02 init, so the mixer and the updates visibly matter. */
const scaled = (c: ModelConfig, seed = 1, s = 12): Params =>
  T.mapLeaves(initParams(c, T.randomKey(seed), 'float64'), (t) => (t.rank >= 2 ? T.keep(T.mul(t, s)) : T.keep(t)));
const randomTokens = (n: number, vocab: number, seed: number): number[] => T.tidy(() => T.randint(T.randomKey(seed), [n], 0, vocab).toArray());
const range = (lo: number, n: number) => Array.from({ length: n }, (_, i) => lo + i);

describe('kvb: chunks with carried state equal one pass', () => {
  for (const kind of KINDS) {
    test(`${kind}: arbitrary cuts and single tokens`, () => {
      T.tidy(() => {
        const c = cfg(kind);
        const p = scaled(c).blocks[0].seq!;
        const mixer = getMixer(c.variant);
        const B = 2;
        for (const Tn of [23, 24]) { // 24: whole mini-batches, the batched query path
          const h = rn(3, [B, Tn, c.dModel]);
          const whole = mixer.forward(c, p, h, range(0, Tn), null);
          // not vacuous: the output depends on the inner steps
          const noLr = mixer.forward({ ...c, mixer: { ...c.mixer, baseLr: 0 } }, p, h, range(0, Tn), null);
          assert.ok(maxDiff(noLr.out.toArray(), whole.out.toArray()) > 1e-4, 'inner updates change the output');
          for (const cuts of [[1, 7, 8, 13], [3, 4, 5, 6, 16], [11], range(1, Tn - 1)]) {
            let state: MixerState | null = null;
            const outs: Tensor[] = [];
            let at = 0;
            for (const cut of [...cuts, Tn]) {
              const r = mixer.forward(c, p, T.slice(h, [0, at, 0], [B, cut, c.dModel]), range(at, cut - at), state);
              outs.push(r.out);
              state = r.state;
              at = cut;
            }
            const d = maxDiff(T.concat(outs, 1).toArray(), whole.out.toArray());
            assert.ok(d < 1e-10, `${kind} cuts ${cuts.length}: outputs differ by ${d}`);
            for (const [name, t] of Object.entries(whole.state)) {
              const other = state![name];
              if (typeof t === 'number') assert.equal(other, t, name);
              else assert.ok(maxDiff((other as Tensor).toArray(), t.toArray()) < 1e-10, `state ${name}`);
            }
          }
        }
      });
    });
  }

  test('options are validated and name the field', () => {
    const c = cfg('linear', { mixer: { miniBatch: 0 } });
    assert.throws(() => initParams(c), /mixer\.miniBatch/);
    assert.throws(() => initParams(cfg('mlp', { mixer: { minibatch: 4 } })), /mixer/);
  });
});

describe('kvb: whole models', () => {
  for (const kind of KINDS) {
    test(`${kind}: causality (NLL at positions <= t ignores everything after t)`, () => {
      const c = cfg(kind);
      const p = scaled(c, 21);
      const Tn = 14;
      const tokens = randomTokens(Tn, c.vocabSize, 11);
      const targets = randomTokens(Tn, c.vocabSize, 12);
      const nll = (tok: number[], tgt: number[]) =>
        T.tidy(() => innerLoop(c, p, T.tensor(tok, [1, Tn], 'int32'), T.tensor(tgt, [1, Tn], 'int32')).tokenNll.toArray());
      const ref = nll(tokens, targets);
      for (const t of [0, 2, 3, 4, 9]) {
        const tok2 = tokens.map((x, i) => (i > t ? (x + 1 + (i % 5)) % c.vocabSize : x));
        const tgt2 = targets.map((x, i) => (i > t ? (x + 3 + (i % 7)) % c.vocabSize : x));
        const alt = nll(tok2, tgt2);
        assert.ok(maxDiff(ref.slice(0, t + 1), alt.slice(0, t + 1)) <= 1e-12, `position <= ${t} saw the future`);
        assert.ok(maxDiff(ref.slice(t + 1), alt.slice(t + 1)) > 1e-6, `changing the future after ${t} changed nothing`);
      }
    });

    test(`${kind}: Session prefill (one read, pieces, token by token) equals the inner loop's NLL`, () => {
      const c = cfg(kind);
      const params = scaled(c);
      const doc = randomTokens(23, c.vocabSize, 5);
      checkReadingEquivalence(c, params, doc, [[1, 7, 8, 13], [3, 5, 6, 17]]);
    });

    test(`${kind}: gradients w.r.t. the mixer's parameters match central differences`, () => {
      T.tidy(() => {
        const c = cfg(kind);
        const p = scaled(c, 4, 8).blocks[0].seq!;
        const mixer = getMixer(c.variant);
        const B = 2;
        for (const Tn of [7, 8]) { // a full inner mini-batch and a partial one; two full ones
          const h = rn(8, [B, Tn, c.dModel]);
          const R = rn(9, [B, Tn, c.dModel]);
          const f = (q: Record<string, Tensor>) => T.sum(T.mul(mixer.forward(c, q, h, range(0, Tn), null).out, R));
          const g = T.grad(f)(p) as Record<string, Tensor>;
          const fd = 1e-6;
          for (const name of Object.keys(p)) {
            const host = p[name].toArray();
            const ga = g[name].toArray();
            let largest = 0;
            for (const j of [0, Math.floor(host.length / 2), host.length - 1]) {
              const at = (delta: number) => {
                const v = host.slice();
                v[j] += delta;
                return f({ ...p, [name]: T.tensor(v, p[name].shape, 'float64') }).item();
              };
              const num = (at(fd) - at(-fd)) / (2 * fd);
              const err = Math.abs(num - ga[j]) / Math.max(Math.abs(num), 1e-6);
              assert.ok(err < 1e-5, `${kind} d/d${name}[${j}]: analytic ${ga[j]}, numeric ${num}`);
              largest = Math.max(largest, Math.abs(num));
            }
            assert.ok(largest > 1e-4, `${kind} d/d${name}: numeric gradient ~0 at the checked entries; the check could not fail`);
          }
        }
      });
    });

    test(`${kind}: a few training steps lower the loss on a repeated sequence`, () => {
      const c = cfg(kind, { vocabSize: 16 });
      let params = T.mapLeaves(initParams(c, T.randomKey(3), 'float64'), (t) => T.keep(t));
      const pattern = randomTokens(6, c.vocabSize, 2);
      const seq = [...pattern, ...pattern, ...pattern, ...pattern, pattern[0]];
      const tokens = T.keep(T.tensor(seq.slice(0, -1), [1, 24], 'int32'));
      const targets = T.keep(T.tensor(seq.slice(1), [1, 24], 'int32'));
      const opt = new AdamW(params, { weightDecay: 0 });
      const losses: number[] = [];
      for (let i = 0; i < 12; i++) {
        const [loss, g] = T.tidy(() => {
          const [l, gr] = T.valueAndGrad((q: Params) => lmLoss(c, q, tokens, targets))(params);
          return [l.item(), T.mapLeaves(gr as Params, (t) => T.keep(t))] as const;
        });
        losses.push(loss);
        params = opt.step(params, g, 3e-2);
        T.dispose(g);
      }
      assert.ok(losses[losses.length - 1] < losses[0] - 0.5, `loss ${losses[0]} → ${losses[losses.length - 1]}`);
    });
  }
});
