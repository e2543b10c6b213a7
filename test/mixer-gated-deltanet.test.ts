/**
 * The Gated DeltaNet mixer (src/model/mixers/gated-deltanet.ts), float64, small dims:
 * the chunkwise WY form against an independent per-token recurrence written here in plain numbers,
 * chunked reading with carried state against one pass, causality of a whole model, Session prefill
 * against the inner loop, gradients against central finite differences, and that training lowers
 * the loss on a repeated sequence.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import * as T from '../src/index.js';
import type { Tensor } from '../src/index.js';
import { type ModelConfig, type ModelConfigInput, makeConfig } from '../src/model/config.js';
import { getMixer, type MixerState } from '../src/model/mixers/index.js';
import { gatedDeltaChunked, gatedDeltaNetOptions, gatedDeltaStep } from '../src/model/mixers/gated-deltanet.js';
import { type Params, initParams } from '../src/model/transformer.js';
import { innerLoop, outerLoss } from '../src/model/ttt-e2e.js';
import { adamwInit, adamwUpdate } from '../src/train/adamw.js';
import { checkReadingEquivalence } from './helpers/session-check.js';

const mixer = getMixer('gated-deltanet');

function cfg(over: Partial<ModelConfigInput> = {}): ModelConfig {
  return makeConfig({ variant: 'gated-deltanet', vocabSize: 29, dModel: 16, nLayers: 2, nHeads: 2, ffnDim: 24, window: 8, miniBatch: 4, ...over });
}

/** One layer's mixer params in float64, matrices scaled up so the gates and the state matter. */
function mixerParams(c: ModelConfig, seed = 3, scale = 10): Record<string, Tensor> {
  const p = initParams(c, T.randomKey(seed), 'float64').blocks[0].seq!;
  return Object.fromEntries(Object.entries(p).map(([name, t]) => [name, T.keep(t.rank >= 2 && !name.startsWith('conv') ? T.mul(t, scale) : t)]));
}

const randn = (seed: number, shape: number[]) => T.randn(T.randomKey(seed), shape, 'float64');
const range = (start: number, n: number) => Array.from({ length: n }, (_, i) => start + i);

function maxDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  assert.equal(a.length, b.length, 'length mismatch');
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i] - b[i]));
  return m;
}
const maxAbs = (a: ArrayLike<number>) => Array.from(a).reduce((m, v) => Math.max(m, Math.abs(v)), 0);

// ---- an independent reference: the paper's per-token recurrence in plain numbers -------------

function reference(c: ModelConfig, params: Record<string, Tensor>, h: Tensor): number[] {
  const { heads: H, dk, dv, convSize: K, normEps, l2Eps } = gatedDeltaNetOptions(c);
  const [B, Tn, D] = h.shape;
  const p = Object.fromEntries(Object.entries(params).map(([k, t]) => [k, t.toArray() as number[]]));
  const x = h.toArray() as number[];
  const proj = (w: number[], n: number, b: number, t: number) =>
    range(0, n).map((j) => range(0, D).reduce((s, i) => s + x[(b * Tn + t) * D + i] * w[i * n + j], 0));
  const silu = (z: number) => z / (1 + Math.exp(-z));
  const sigmoid = (z: number) => 1 / (1 + Math.exp(-z));
  const softplus = (z: number) => Math.log(1 + Math.exp(z));
  const l2 = (u: number[]) => {
    const n = Math.sqrt(u.reduce((s, e) => s + e * e, 0) + l2Eps);
    return u.map((e) => e / n);
  };
  const out: number[] = [];
  for (let b = 0; b < B; b++) {
    const raw = { q: [] as number[][], k: [] as number[][], v: [] as number[][] };
    for (let t = 0; t < Tn; t++) {
      raw.q.push(proj(p.wq, H * dk, b, t));
      raw.k.push(proj(p.wk, H * dk, b, t));
      raw.v.push(proj(p.wv, H * dv, b, t));
    }
    // causal depthwise conv: y_t = Σ_i w[i] x_{t-K+1+i}, then silu
    const conv = (xs: number[][], w: number[], t: number) =>
      xs[t].map((_, ch) => silu(range(0, K).reduce((s, i) => { const u = t - K + 1 + i; return s + (u >= 0 ? w[i * xs[t].length + ch] * xs[u][ch] : 0); }, 0)));
    const S = range(0, H).map(() => range(0, dv).map(() => new Array<number>(dk).fill(0)));
    for (let t = 0; t < Tn; t++) {
      const cq = conv(raw.q, p.convQ, t);
      const ck = conv(raw.k, p.convK, t);
      const cv = conv(raw.v, p.convV, t);
      const a = proj(p.wa, H, b, t);
      const bb = proj(p.wb, H, b, t);
      const gate = proj(p.wg, H * dv, b, t);
      const y: number[] = [];
      for (let hd = 0; hd < H; hd++) {
        const q = l2(cq.slice(hd * dk, (hd + 1) * dk)).map((e) => e / Math.sqrt(dk));
        const k = l2(ck.slice(hd * dk, (hd + 1) * dk));
        const v = cv.slice(hd * dv, (hd + 1) * dv);
        const alpha = Math.exp(-Math.exp(p.aLog[hd]) * softplus(a[hd] + p.dtBias[hd]));
        const beta = sigmoid(bb[hd]);
        // S ← α S (I − β k kᵀ) + β v kᵀ
        const Sh = S[hd];
        const next = Sh.map((row, i) => range(0, dk).map((j) =>
          alpha * row.reduce((s, sil, l) => s + sil * ((l === j ? 1 : 0) - beta * k[l] * k[j]), 0) + beta * v[i] * k[j]));
        S[hd] = next;
        const o = next.map((row) => row.reduce((s, e, j) => s + e * q[j], 0));
        const rms = 1 / Math.sqrt(o.reduce((s, e) => s + e * e, 0) / dv + normEps);
        o.forEach((e, i) => y.push(e * rms * p.oNorm[i] * silu(gate[hd * dv + i])));
      }
      for (let j = 0; j < D; j++) out.push(y.reduce((s, e, i) => s + e * p.wo[i * D + j], 0));
    }
  }
  return out;
}

/** Runs the mixer over h in pieces ending at `cuts` (and T), carrying the state. */
function inPieces(c: ModelConfig, p: Record<string, Tensor>, h: Tensor, cuts: number[]): { out: Tensor; state: MixerState } {
  const [B, Tn, D] = h.shape;
  let state: MixerState | null = null;
  const outs: Tensor[] = [];
  let at = 0;
  for (const cut of [...cuts, Tn]) {
    const r = mixer.forward(c, p, T.slice(h, [0, at, 0], [B, cut, D]), range(at, cut - at), state);
    outs.push(r.out);
    state = r.state;
    at = cut;
  }
  return { out: T.concat(outs, 1), state: state! };
}

describe('gated-deltanet mixer', () => {
  test('chunkwise WY form equals the per-token recurrence (several T, chunk sizes, T not a multiple of the chunk)', () => {
    for (const chunkSize of [4, 8]) {
      const c = cfg({ mixer: { chunkSize } });
      const p = mixerParams(c);
      for (const Tn of [1, 2, 3, 8, 13, 16, 27]) {
        T.tidy(() => {
          const h = randn(100 + Tn, [2, Tn, c.dModel]);
          const got = mixer.forward(c, p, h, range(0, Tn), null).out;
          assert.deepEqual(got.shape, [2, Tn, c.dModel]);
          const ref = reference(c, p, h);
          const d = maxDiff(got.toArray(), ref);
          assert.ok(maxAbs(ref) > 1e-2, 'the output is not trivially small');
          assert.ok(d < 1e-10 * Math.max(1, maxAbs(ref)), `chunk ${chunkSize}, T=${Tn}: chunked vs recurrence ${d}`);
        });
      }
    }
  });

  test('float32 stays close to float64 with identical keys and β ≈ 1 (the triangular inverse does not cancel)', () => {
    T.tidy(() => {
      const [B, H, Tn, d] = [1, 2, 64, 8];
      const k = T.div(T.ones([B, H, Tn, d], 'float64'), Math.sqrt(d)); // every key the same unit vector
      const q = randn(41, [B, H, Tn, d]);
      const v = randn(42, [B, H, Tn, d]);
      const g = T.full([B, H, Tn], -0.01, 'float64');
      const beta = T.full([B, H, Tn], 0.999, 'float64');
      const ref = gatedDeltaChunked(q, k, v, g, beta, null, 32).o;
      // the same through the per-token step
      let S: Tensor | null = null;
      const steps: Tensor[] = [];
      for (let t = 0; t < Tn; t++) {
        const at = (x: Tensor) => T.slice(x, [0, 0, t], [B, H, t + 1]);
        const r = gatedDeltaStep(at(q), at(k), at(v), at(g), at(beta), S);
        steps.push(r.o);
        S = r.S;
      }
      assert.ok(maxDiff(T.concat(steps, 2).toArray(), ref.toArray()) < 1e-10, 'chunked vs steps in float64');
      const f32 = (x: Tensor) => T.cast(x, 'float32');
      const got = gatedDeltaChunked(f32(q), f32(k), f32(v), f32(g), f32(beta), null, 32).o;
      const d32 = maxDiff(got.toArray(), ref.toArray());
      assert.ok(d32 < 1e-4 * Math.max(1, maxAbs(ref.toArray())), `float32 error ${d32}`);
    });
  });

  test('options: head count, head dim, expandV; bad options name the field', () => {
    const c = cfg({ mixer: { heads: 4, headDim: 3, expandV: 2, chunkSize: 2 } });
    const p = mixerParams(c, 5);
    assert.deepEqual(p.wq.shape, [16, 12]);
    assert.deepEqual(p.wv.shape, [16, 24]);
    assert.deepEqual(p.oNorm.shape, [6]);
    T.tidy(() => {
      const h = randn(7, [1, 9, 16]);
      assert.ok(maxDiff(mixer.forward(c, p, h, range(0, 9), null).out.toArray(), reference(c, p, h)) < 1e-10);
    });
    assert.throws(() => gatedDeltaNetOptions(cfg({ mixer: { chunkSize: 12 } })), /'mixer\.chunkSize'.*power of two/);
    assert.throws(() => gatedDeltaNetOptions(cfg({ mixer: { chunkSzie: 16 } })), /'mixer'/);
    assert.throws(() => gatedDeltaNetOptions(cfg({ mixer: { heads: 3 } })), /'mixer\.heads'/);
    assert.equal(gatedDeltaNetOptions(cfg({ miniBatch: 32 })).chunkSize, 32);
    assert.equal(gatedDeltaNetOptions(cfg({ miniBatch: 4 })).chunkSize, 16);
  });

  test('reading in arbitrary chunks with carried state equals one pass (and the final states agree)', () => {
    const c = cfg({ mixer: { chunkSize: 4 } });
    const p = mixerParams(c);
    T.tidy(() => {
      const h = randn(9, [2, 23, c.dModel]);
      const whole = inPieces(c, p, h, []);
      for (const cuts of [[1, 2, 3], [5, 6, 14, 15], [7, 8, 9, 10, 11, 12, 13, 21], range(1, 22)]) {
        const parts = inPieces(c, p, h, cuts);
        assert.ok(maxDiff(parts.out.toArray(), whole.out.toArray()) < 1e-11, `cuts ${cuts}`);
        for (const key of ['S', 'convQ', 'convK', 'convV']) {
          assert.ok(maxDiff((parts.state[key] as Tensor).toArray(), (whole.state[key] as Tensor).toArray()) < 1e-11, `state ${key} after cuts ${cuts}`);
        }
      }
      assert.deepEqual((whole.state.S as Tensor).shape, [2, 2, 8, 8]);
      assert.deepEqual((whole.state.convQ as Tensor).shape, [2, 3, 16]);
    });
  });

  test('a whole model is causal: NLL at positions <= t ignores tokens after t', () => {
    const c = cfg({ nLayers: 2, mixer: { chunkSize: 4 } });
    const p = T.mapLeaves(initParams(c, T.randomKey(21), 'float64'), (t) => (t.rank >= 2 ? T.mul(t, 10) : t));
    const Tn = 16;
    const tokens = T.randint(T.randomKey(11), [Tn], 0, c.vocabSize).toArray();
    const targets = T.randint(T.randomKey(12), [Tn], 0, c.vocabSize).toArray();
    const ids = (v: number[]) => T.tensor(v, [1, v.length], 'int32');
    const nll = (tok: number[], tgt: number[]) => T.tidy(() => innerLoop(c, p, ids(tok), ids(tgt)).tokenNll.toArray());
    const ref = nll(tokens, targets);
    for (const t of [0, 3, 4, 9, 14]) {
      const tok2 = tokens.map((x, i) => (i > t ? (x + 1 + (i % 5)) % c.vocabSize : x));
      const tgt2 = targets.map((x, i) => (i > t ? (x + 3 + (i % 7)) % c.vocabSize : x));
      const alt = nll(tok2, tgt2);
      assert.ok(maxDiff(ref.slice(0, t + 1), alt.slice(0, t + 1)) <= 1e-12, `positions <= ${t} moved`);
      assert.ok(maxDiff(ref.slice(t + 1), alt.slice(t + 1)) > 1e-6, `changing the future after ${t} changed nothing`);
    }
  });

  test('Session: token-by-token prefill == one prefill == inner-loop NLL', () => {
    const c = cfg({ nLayers: 2, mixer: { chunkSize: 4 } });
    const params: Params = T.mapLeaves(initParams(c, T.randomKey(1), 'float64'), (t) => (t.rank >= 2 ? T.keep(T.mul(t, 12)) : T.keep(t)));
    const doc = T.tidy(() => T.randint(T.randomKey(5), [23], 0, c.vocabSize).toArray());
    const s1 = checkReadingEquivalence(c, params, doc);
    // decoding keeps the live tensor count bounded
    const counts: number[] = [];
    for (let i = 0; i < 4; i++) {
      s1.decode(3);
      counts.push(T.liveTensorCount());
    }
    assert.ok(counts.every((n) => n === counts[0]), `live tensors drift: ${counts}`);
  });

  test('gradient w.r.t. every parameter matches central finite differences (chunked and decode paths)', () => {
    const c = cfg({ mixer: { chunkSize: 4 } });
    const p = mixerParams(c, 4, 6);
    const h = T.keep(randn(31, [2, 13, c.dModel]));
    const R = T.keep(randn(32, [2, 13, c.dModel]));
    // 9 positions chunked (3 chunks, the last padded), 1 decoded, 3 more chunked, all from carried state.
    const f = (params: Record<string, Tensor>) => T.mul(inPieces(c, params, h, [9, 10]).out, R).sum();
    const [value, g] = T.tidy(() => T.valueAndGrad(f)(p));
    assert.ok(Number.isFinite(value.item()));
    const eps = 1e-5;
    for (const name of Object.keys(p).sort()) {
      const size = p[name].size;
      const flat = p[name].toArray() as number[];
      const gv = g[name].toArray() as number[];
      for (const i of [0, Math.floor(size / 2), size - 1, Math.floor(size / 3)]) {
        const at = (delta: number) => {
          const v = flat.slice();
          v[i] += delta;
          return T.tidy(() => f({ ...p, [name]: T.tensor(v, p[name].shape, 'float64') }).item());
        };
        const fd = (at(eps) - at(-eps)) / (2 * eps);
        const tol = 1e-6 * Math.max(1, Math.abs(fd));
        assert.ok(Math.abs(fd - gv[i]) < tol, `${name}[${i}]: autodiff ${gv[i]} vs finite differences ${fd}`);
      }
    }
  });

  test('a few training steps lower the loss on a small repeated sequence', () => {
    const c = cfg({ nLayers: 2, mixer: { chunkSize: 8 } });
    let params: Params = initParams(c, T.randomKey(2), 'float64');
    const pattern = [3, 17, 5, 9, 22, 1, 14, 8];
    const seq = [...pattern, ...pattern, ...pattern, ...pattern, 3];
    const tokens = T.keep(T.tensor(seq.slice(0, -1), [1, 32], 'int32'));
    const targets = T.keep(T.tensor(seq.slice(1), [1, 32], 'int32'));
    const step = T.valueAndGrad((w: Params) => outerLoss(c, w, tokens, targets));
    const losses: number[] = [];
    let opt = adamwInit(params);
    for (let i = 0; i < 10; i++) {
      const [loss, g] = T.tidy(() => step(params));
      losses.push(loss.item());
      ({ params, state: opt } = adamwUpdate(params, g as Params, opt, 2e-2, { weightDecay: 0 }));
    }
    assert.ok(losses.every(Number.isFinite), `losses ${losses}`);
    assert.ok(losses[losses.length - 1] < losses[0] - 0.3, `loss did not drop: ${losses.map((l) => l.toFixed(3)).join(' ')}`);
  });
});
