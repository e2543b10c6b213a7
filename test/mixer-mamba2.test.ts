/**
 * The Mamba-2 mixer (src/model/mixers/mamba2.ts), float64 on the CPU with tiny dims: the chunked SSD
 * form against an independent per-token recurrence written here on plain numbers (unfolded conv,
 * explicit state update), chunked prefill and single-token decoding continuing from the carried
 * state, causality and Session prefill of a whole mamba2 model, parameter gradients against central
 * finite differences, and a few training steps lowering the loss.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import * as T from '../src/index.js';
import type { Tensor } from '../src/index.js';
import { type ModelConfig, type ModelConfigInput, makeConfig, preset } from '../src/model/config.js';
import { type MixerState, getMixer } from '../src/model/mixers/index.js';
import { type Mamba2State, mamba2Options } from '../src/model/mixers/mamba2.js';
import { softplus } from '../src/nn/layers.js';
import { type Params, initParams } from '../src/model/transformer.js';
import { innerLoop, lmLoss } from '../src/model/ttt-e2e.js';
import { AdamW } from '../src/train/adamw.js';
import { checkReadingEquivalence } from './helpers/session-check.js';

// ---- helpers ---------------------------------------------------------------------------------

/** A tiny mamba2 model: E = 16, P = 4 → H = 4 heads, N = 3, K = 4, chunk 4; dt large enough to decay visibly. */
function cfg(over: Partial<ModelConfigInput> = {}, mixer: Record<string, unknown> = {}): ModelConfig {
  return makeConfig({
    variant: 'mamba2', vocabSize: 29, dModel: 8, nLayers: 2, nHeads: 2, ffnDim: 12, window: 6, miniBatch: 4,
    mixer: { headDim: 4, stateSize: 3, dtMin: 0.05, dtMax: 0.8, ...mixer }, ...over,
  });
}

const mixer = getMixer('mamba2');
const range = (n: number, start = 0) => Array.from({ length: n }, (_, i) => start + i);

/** One layer's mixer params in float64, matrices at std 0.4 so every path matters. */
function mixerParams(c: ModelConfig, seed = 1): Record<string, Tensor> {
  const key = T.randomKey(seed);
  return mixer.init(c, 0, {
    normal: (name, shape) => T.keep(T.truncatedNormal(T.foldIn(key, name), shape, 0.4, 'float64')),
    full: (shape, v) => T.keep(T.full(shape, v, 'float64')),
    key,
  });
}

const randn = (seed: number, shape: number[]) => T.keep(T.randn(T.randomKey(seed), shape, 'float64'));

function maxDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  assert.equal(a.length, b.length, 'length mismatch');
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i] - b[i]));
  return m;
}

interface RefState {
  ssm: number[][][][]; // [B][H][P][N]
  raw: number[][][]; // [B][K-1][ch]: the last K-1 conv inputs (h W_xBC), oldest first
}

/**
 * The Mamba-2 block token by token on plain numbers: projections, the depthwise causal conv as K
 * shifted taps, softplus, S_t = exp(dt·A) S_{t−1} + dt x_t B_tᵀ, y_t = S_t C_t + D x_t, gated RMSNorm,
 * output projection. Independent of the engine ops and of the chunked form.
 */
function reference(c: ModelConfig, p: Record<string, Tensor>, h: Tensor, state: RefState | null): { out: number[]; state: RefState } {
  const o = mamba2Options(c);
  const [B, Tn, D] = h.shape;
  const E = o.expand * D;
  const N = o.stateSize;
  const P = o.headDim;
  const H = E / P;
  const K = o.convKernel;
  const ch = E + 2 * N;
  const w = Object.fromEntries(Object.entries(p).map(([k, v]) => [k, v.toArray()]));
  const hv = h.toArray();
  const vecMat = (v: number[], m: number[], cols: number) => range(cols).map((j) => v.reduce((s, x, i) => s + x * m[i * cols + j], 0));
  const sig = (x: number) => 1 / (1 + Math.exp(-x));
  const sp = (x: number) => (x > 30 ? x : Math.log1p(Math.exp(x)));
  const out: number[] = [];
  const st: RefState = state
    ? structuredClone(state)
    : { ssm: range(B).map(() => range(H).map(() => range(P).map(() => Array(N).fill(0)))), raw: range(B).map(() => range(K - 1).map(() => Array(ch).fill(0))) };
  for (let b = 0; b < B; b++) {
    for (let t = 0; t < Tn; t++) {
      const x0 = hv.slice((b * Tn + t) * D, (b * Tn + t + 1) * D);
      const z = vecMat(x0, w.wz, E);
      const dtr = vecMat(x0, w.wdt, H);
      const u = vecMat(x0, w.wxbc, ch);
      const win = [...st.raw[b], u]; // K rows, oldest first
      st.raw[b] = win.slice(1);
      const xbc = range(ch).map((j) => {
        let a = w.convB[j];
        for (let k = 0; k < K; k++) a += w.convW[k * ch + j] * win[k][j];
        return a * sig(a);
      });
      const x = xbc.slice(0, E);
      const Bv = xbc.slice(E, E + N);
      const Cv = xbc.slice(E + N);
      const y = Array(E).fill(0);
      for (let hh = 0; hh < H; hh++) {
        const dt = sp(dtr[hh] + w.dtBias[hh]);
        const decay = Math.exp(-dt * Math.exp(w.aLog[hh]));
        const S = st.ssm[b][hh];
        for (let i = 0; i < P; i++) {
          const xi = x[hh * P + i];
          let acc = 0;
          for (let n = 0; n < N; n++) {
            S[i][n] = decay * S[i][n] + dt * xi * Bv[n];
            acc += S[i][n] * Cv[n];
          }
          y[hh * P + i] = acc + w.dSkip[hh] * xi;
        }
      }
      const g = y.map((v, j) => v * z[j] * sig(z[j]));
      const r = 1 / Math.sqrt(g.reduce((s, v) => s + v * v, 0) / E + c.normEps);
      out.push(...vecMat(g.map((v, j) => v * r * w.norm[j]), w.wout, D));
    }
  }
  return { out, state: st };
}

/** Runs the mixer over `h` in pieces cut at `cuts` (absolute positions), carrying the state. */
function inPieces(c: ModelConfig, p: Record<string, Tensor>, h: Tensor, cuts: number[]): { out: number[]; state: Mamba2State } {
  const [B, Tn, D] = h.shape;
  let state: MixerState | null = null;
  const outs: number[][] = range(B).map(() => []);
  let at = 0;
  for (const cut of [...cuts, Tn]) {
    const r = mixer.forward(c, p, T.slice(h, [0, at], [B, cut]), range(cut - at, at), state);
    const o = r.out.toArray();
    for (let b = 0; b < B; b++) outs[b].push(...o.slice(b * (cut - at) * D, (b + 1) * (cut - at) * D));
    state = r.state;
    at = cut;
  }
  return { out: outs.flat(), state: state as Mamba2State };
}

// ---- the mixer -------------------------------------------------------------------------------

describe('mamba2 mixer', () => {
  test('options: defaults, and errors that name the field', () => {
    const o = mamba2Options(makeConfig({ variant: 'mamba2', vocabSize: 8, dModel: 16, nLayers: 1, nHeads: 2, ffnDim: 8, window: 4, miniBatch: 8 }));
    assert.deepEqual([o.expand, o.headDim, o.stateSize, o.convKernel, o.chunk], [2, 32, 64, 4, 8]);
    assert.throws(() => mamba2Options(cfg({}, { headDim: 5 })), /'mixer\.headDim'/);
    assert.throws(() => mamba2Options(cfg({}, { stateSize: 0 })), /'mixer\.stateSize'/);
    assert.throws(() => mamba2Options(cfg({}, { sateSize: 4 })), /'mixer/);
    assert.throws(() => initParams(cfg({}, { expand: 1.5 })), /'mixer\.expand'/);
  });

  test('init: dt = softplus(dt_bias) in [dtMin, dtMax], A = exp(A_log) in [1, 16], D = 1', () => {
    const c = makeConfig({ variant: 'mamba2', vocabSize: 8, dModel: 64, nLayers: 1, nHeads: 2, ffnDim: 8, window: 4, miniBatch: 8, mixer: { headDim: 4 } });
    const p = initParams(c, T.randomKey(3), 'float64').blocks[0].seq!;
    const dt = softplus(p.dtBias).toArray();
    assert.equal(dt.length, 32);
    assert.ok(dt.every((v) => v >= 1e-3 - 1e-12 && v <= 0.1 + 1e-12), `dt ${dt}`);
    assert.ok(Math.max(...dt) / Math.min(...dt) > 5, 'dt spread over the log-uniform range');
    const A = p.aLog.toArray().map(Math.exp);
    assert.ok(A.every((v) => v >= 1 && v <= 16));
    assert.ok(p.dSkip.toArray().every((v) => v === 1));
    assert.deepEqual(p.wz.shape, [64, 128]);
    assert.deepEqual(p.wxbc.shape, [64, 128 + 2 * 64]);
  });

  test('softplus is stable for large |x| and matches log(1 + eˣ)', () => {
    const x = T.tensor([-800, -30, -1, 0, 0.5, 30, 800], [7], 'float64');
    const ref = [0, Math.log1p(Math.exp(-30)), Math.log1p(Math.exp(-1)), Math.log(2), Math.log1p(Math.exp(0.5)), 30 + Math.log1p(Math.exp(-30)), 800];
    assert.ok(maxDiff(softplus(x).toArray(), ref) < 1e-14);
    const g = T.grad((t: Tensor) => T.sum(softplus(t)))(x).toArray();
    assert.ok(maxDiff(g, [-800, -30, -1, 0, 0.5, 30, 800].map((v) => 1 / (1 + Math.exp(-v)))) < 1e-14);
  });

  test('chunked SSD equals the per-token recurrence, for T on and off the chunk grid', () => {
    for (const chunk of [4, 3]) {
      const c = cfg({}, { chunk });
      const p = mixerParams(c, 7);
      for (const Tn of [1, 2, 3, 4, 7, 9, 16, 17]) {
        const h = randn(100 + Tn, [2, Tn, c.dModel]);
        const got = T.tidy(() => mixer.forward(c, p, h, range(Tn), null).out.toArray());
        const ref = reference(c, p, h, null).out;
        const d = maxDiff(got, ref);
        assert.ok(d < 1e-11, `chunk ${chunk}, T ${Tn}: ${d}`);
        assert.ok(Math.max(...ref.map(Math.abs)) > 1e-2, 'outputs are not trivially small');
      }
    }
  });

  test('decoding token by token (the recurrent step) equals the recurrence, state included', () => {
    const c = cfg();
    const p = mixerParams(c, 8);
    const h = randn(200, [2, 11, c.dModel]);
    const steps = T.tidy(() => inPieces(c, p, h, range(10, 1)));
    const ref = reference(c, p, h, null);
    assert.ok(maxDiff(steps.out, ref.out) < 1e-11, `${maxDiff(steps.out, ref.out)}`);
    assert.ok(maxDiff(steps.state.ssm.toArray(), ref.state.ssm.flat(3)) < 1e-11, 'final SSM state');
  });

  test('any split into chunks with the carried state equals one pass', () => {
    const c = cfg();
    const p = mixerParams(c, 9);
    const Tn = 23;
    const h = randn(300, [2, Tn, c.dModel]);
    const whole = T.tidy(() => inPieces(c, p, h, []));
    const ref = reference(c, p, h, null);
    assert.ok(maxDiff(whole.out, ref.out) < 1e-11);
    assert.ok(maxDiff(whole.state.ssm.toArray(), ref.state.ssm.flat(3)) < 1e-11, 'state after one pass');
    for (const cuts of [[1, 2, 3], [5, 13], [4, 8, 12, 16, 20], [3, 10, 11, 19, 22], [2, 9, 15]]) {
      const r = T.tidy(() => inPieces(c, p, h, cuts));
      assert.ok(maxDiff(r.out, whole.out) < 1e-11, `split at ${cuts}: ${maxDiff(r.out, whole.out)}`);
      assert.ok(maxDiff(r.state.ssm.toArray(), whole.state.ssm.toArray()) < 1e-11, `state, split at ${cuts}`);
      assert.ok(maxDiff(r.state.conv.toArray(), whole.state.conv.toArray()) === 0, `conv state, split at ${cuts}`);
    }
  });

  test('gradients w.r.t. every parameter match central finite differences', () => {
    const c = cfg();
    const p = mixerParams(c, 10);
    const Tn = 9;
    const h0 = randn(400, [2, 3, c.dModel]);
    const h = randn(401, [2, Tn, c.dModel]);
    // Start from a carried state so the gradient also flows through the state's contribution.
    const s0 = T.tidy(() => T.mapLeaves(mixer.forward(c, p, h0, range(3), null).state as Mamba2State, (t) => T.keep(t)));
    const R = randn(402, [2, Tn, c.dModel]);
    const R2 = randn(403, [...s0.ssm.shape]);
    const f = (q: Record<string, Tensor>) => {
      const r = mixer.forward(c, q, h, range(Tn, 3), s0);
      return T.add(T.sum(T.mul(r.out, R)), T.sum(T.mul((r.state as Mamba2State).ssm, R2)));
    };
    const g = T.tidy(() => T.mapLeaves(T.grad(f)(p) as Record<string, Tensor>, (t) => T.keep(t)));
    const eps = 1e-5;
    for (const name of Object.keys(p)) {
      const base = p[name].toArray();
      const ga = g[name].toArray();
      for (const i of [0, Math.floor(base.length / 2), base.length - 1]) {
        const at = (delta: number) => {
          const v = [...base];
          v[i] += delta;
          return T.tidy(() => f({ ...p, [name]: T.tensor(v, p[name].shape, 'float64') }).item());
        };
        const fd = (at(eps) - at(-eps)) / (2 * eps);
        const err = Math.abs(fd - ga[i]) / Math.max(1, Math.abs(fd));
        assert.ok(err < 1e-6, `${name}[${i}]: autodiff ${ga[i]} vs finite differences ${fd}`);
      }
      assert.ok(ga.some((v) => Math.abs(v) > 1e-8), `${name}: gradient is zero`);
    }
  });
});

// ---- the mamba2 model --------------------------------------------------------------------------

describe('mamba2 model', () => {
  const c = cfg({ nLayers: 2, vocabSize: 29, dModel: 16, ffnDim: 24 });
  const params: Params = T.mapLeaves(initParams(c, T.randomKey(4), 'float64'), (t) => T.keep(t.rank >= 2 ? T.mul(t, 12) : t));
  const randTokens = (n: number, seed: number) => T.tidy(() => T.randint(T.randomKey(seed), [n], 0, c.vocabSize).toArray());
  const nllOf = (tokens: number[], targets: number[]) =>
    T.tidy(() => innerLoop(c, params, T.tensor(tokens, [1, tokens.length], 'int32'), T.tensor(targets, [1, targets.length], 'int32')).tokenNll.toArray());

  test('causality: NLL at positions <= t ignores tokens and targets after t', () => {
    const tokens = randTokens(14, 11);
    const targets = randTokens(14, 12);
    const ref = nllOf(tokens, targets);
    for (const t of [0, 3, 4, 9, 12]) {
      const tok2 = tokens.map((x, i) => (i > t ? (x + 1 + (i % 5)) % c.vocabSize : x));
      const tgt2 = targets.map((x, i) => (i > t ? (x + 3 + (i % 7)) % c.vocabSize : x));
      const alt = nllOf(tok2, tgt2);
      assert.ok(maxDiff(ref.slice(0, t + 1), alt.slice(0, t + 1)) <= 1e-12, `positions <= ${t} moved`);
      assert.ok(maxDiff(ref.slice(t + 1), alt.slice(t + 1)) > 1e-6, `changing the future after ${t} changed nothing`);
    }
    // the state carries information: a change at position 0 reaches the last position
    const far = nllOf([(tokens[0] + 1) % c.vocabSize, ...tokens.slice(1)], targets);
    assert.ok(Math.abs(far[13] - ref[13]) > 1e-9, 'token 0 does not reach position 13');
  });

  test('Session: one prefill = the inner loop; pieces and token-by-token reads = one read', () => {
    const doc = randTokens(23, 5);
    const s1 = checkReadingEquivalence(c, params, doc);
    // decoding continues from the state
    const before = T.liveTensorCount();
    s1.decode(3);
    assert.equal(s1.tokensRead, 26);
    assert.ok(T.liveTensorCount() <= before + 2, 'decoding keeps the live tensor count bounded');
  });

  test('a few AdamW steps lower the loss on a repeated sequence', () => {
    const tc = cfg({ nLayers: 2, vocabSize: 16, dModel: 16, ffnDim: 24 });
    let p: Params = T.mapLeaves(initParams(tc, T.randomKey(6), 'float64'), (t) => T.keep(t));
    const motif = [3, 1, 4, 1, 5, 9, 2, 6];
    const seq = [...motif, ...motif, ...motif, ...motif, 3];
    const tokens = T.keep(T.tensor(seq.slice(0, -1), [1, 32], 'int32'));
    const targets = T.keep(T.tensor(seq.slice(1), [1, 32], 'int32'));
    const opt = new AdamW(p, { weightDecay: 0 });
    const losses: number[] = [];
    for (let step = 0; step < 12; step++) {
      losses.push(T.tidy(() => {
        const [l, g] = T.valueAndGrad((q: Params) => lmLoss(tc, q, tokens, targets))(p);
        p = opt.step(p, g, 2e-2);
        return l.item();
      }));
    }
    assert.ok(losses.every(Number.isFinite));
    assert.ok(losses[losses.length - 1] < 0.6 * losses[0], `loss ${losses[0]} → ${losses[losses.length - 1]}`);
  });

  test('the tiny preset builds; the initial loss is near log V', () => {
    const m = preset('tiny', 'mamba2');
    const p = initParams(m, T.randomKey(0));
    const l = T.tidy(() => lmLoss(m, p, T.tensor(range(20), [1, 20], 'int32'), T.tensor(range(20, 1), [1, 20], 'int32')).item());
    assert.ok(Math.abs(l - Math.log(m.vocabSize)) < 0.5, `initial loss ${l} near log V`);
  });
});
