import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as T from '../src/index.js';
import { type Variant, makeConfig } from '../src/model/config.js';
import { type Params, initParams } from '../src/model/transformer.js';
import { checkReadingEquivalence } from './helpers/session-check.js';
import { countCalls } from './helpers/spy.js';
import { Session, sample } from '../src/model/session.js';
import { readSafetensors } from '../src/io/safetensors.js';
import { innerLoop } from '../src/model/ttt-e2e.js';

const VARIANTS: Variant[] = ['e2e', 'naive', 'swa', 'full', 'hybrid'];
const cfg = (variant: Variant, extra = {}) =>
  makeConfig({ variant, vocabSize: 29, dModel: 16, nLayers: 4, nHeads: 2, ffnDim: 24, window: 6, miniBatch: 4, innerLr: 2, ...extra });
/** Weights scaled up from the 0.02 init so that attention and the inner steps visibly matter. */
const scaled = (c: ReturnType<typeof cfg>, seed = 1): Params =>
  T.mapLeaves(initParams(c, T.randomKey(seed), 'float64'), (t) => (t.rank >= 2 ? T.keep(T.mul(t, 12)) : T.keep(t)));
const randomTokens = (n: number, vocab: number, seed: number): number[] => T.tidy(() => T.randint(T.randomKey(seed), [n], 0, vocab).toArray());
const maxDiff = (a: number[], b: number[]) => a.reduce((m, v, i) => Math.max(m, Math.abs(v - b[i])), 0);

describe('Session', () => {
  for (const variant of VARIANTS) {
    test(`${variant}: prefill NLL equals the inner loop's, and reading in pieces equals one read`, () => {
      const c = cfg(variant);
      const params = scaled(c);
      const doc = randomTokens(23, c.vocabSize, 5); // not a multiple of the mini-batch
      checkReadingEquivalence(c, params, doc);
    });
  }

  test('e2e: a prefill longer than one group (2048 scored tokens) gives the inner loop\'s NLL across the boundary', () => {
    const c = cfg('e2e', { miniBatch: 16, window: 16 });
    const params = scaled(c);
    const doc = randomTokens(2100, c.vocabSize, 6);
    const n = doc.length - 1;
    const ref = T.tidy(() => innerLoop(c, params, T.tensor(doc.slice(0, -1), [1, n], 'int32'), T.tensor(doc.slice(1), [1, n], 'int32')).tokenNll.toArray());
    const nll = new Session(c, params).prefill(doc);
    assert.ok(maxDiff(nll.slice(1), ref) < 1e-9, `session vs innerLoop: ${maxDiff(nll.slice(1), ref)}`);
  });

  test('e2e: the fast weights change every b tokens, also while decoding', () => {
    const c = cfg('e2e');
    const s = new Session(c, scaled(c));
    s.prefill(randomTokens(9, c.vocabSize, 2));
    const before = s.nextLogProbs();
    const generated = s.decode(8, { temperature: 0 });
    assert.equal(generated.length, 8);
    assert.equal(s.tokensRead, 17);
    // Reading the same 17 tokens without test-time training gives other predictions.
    const frozen = new Session(cfg('e2e', { innerLr: 0 }), scaled(c));
    frozen.prefill(randomTokens(9, c.vocabSize, 2));
    assert.ok(maxDiff(frozen.nextLogProbs(), before) > 1e-6, 'updates after the first mini-batch change the prediction');
  });

  test('e2e: a whole mini-batch whose next token is known is read and learned from in one pass', () => {
    const c = cfg('e2e');
    const { calls } = countCalls(Session.prototype, 'readAndLearn', () =>
      new Session(c, scaled(c)).prefill(randomTokens(4 * c.miniBatch + 1, c.vocabSize, 8), { score: false }));
    assert.equal(calls, 4, 'four whole mini-batches, each followed by a known token');
  });

  test('decode: greedy is deterministic, sampling is seeded', () => {
    const c = cfg('e2e');
    const params = scaled(c);
    const run = (opts: object) => {
      const s = new Session(c, params);
      s.prefill([1, 2, 3, 4, 5]);
      return s.decode(10, opts);
    };
    assert.deepEqual(run({}), run({}));
    assert.deepEqual(run({ temperature: 1, seed: 3 }), run({ temperature: 1, seed: 3 }));
    const a = [run({ temperature: 1.5, seed: 1 }), run({ temperature: 1.5, seed: 2 }), run({ temperature: 1.5, seed: 3 })];
    assert.ok(new Set(a.map((x) => x.join())).size > 1, 'different seeds give different samples');
  });

  test('sample: greedy, top-k, top-p and argument checks', () => {
    const lp = [Math.log(0.5), Math.log(0.3), Math.log(0.15), Math.log(0.05)];
    assert.equal(sample(lp, {}, T.randomKey(0)), 0);
    for (let s = 0; s < 40; s++) {
      assert.ok([0, 1].includes(sample(lp, { temperature: 1, topK: 2 }, T.randomKey(s))));
      assert.ok([0, 1].includes(sample(lp, { temperature: 1, topP: 0.7 }, T.randomKey(s))));
    }
    const seen = new Set(Array.from({ length: 200 }, (_, s) => sample(lp, { temperature: 1 }, T.randomKey(s))));
    assert.equal(seen.size, 4);
    assert.throws(() => sample(lp, { temperature: -1 }, T.randomKey(0)), /temperature/);
    assert.throws(() => sample(lp, { temperature: 1, topP: 0 }, T.randomKey(0)), /topP/);
  });

  test('sample: draws follow the filtered, renormalised distribution; ties rank the lower index first', () => {
    const p = [0.05, 0.5, 0.15, 0.3];
    const lp = p.map(Math.log);
    const freq = (opts: object, draws = 4000) => {
      const f = [0, 0, 0, 0];
      for (let s = 0; s < draws; s++) f[sample(lp, opts, T.randomKey(s))] += 1 / draws;
      return f;
    };
    const near = (got: number[], want: number[]) => got.forEach((g, i) => assert.ok(Math.abs(g - want[i]) < 0.03, `token ${i}: ${g.toFixed(3)} vs ${want[i]}`));
    near(freq({ temperature: 1 }), p);
    near(freq({ temperature: 1, topK: 2 }), [0, 0.5 / 0.8, 0, 0.3 / 0.8]);
    // top-p 0.6: 0.5 is not enough, 0.5 + 0.3 is
    near(freq({ temperature: 1, topP: 0.6 }), [0, 0.5 / 0.8, 0, 0.3 / 0.8]);
    // temperature 0.5 squares the probabilities before renormalising
    const sq = p.map((x) => x * x);
    near(freq({ temperature: 0.5 }), sq.map((x) => x / sq.reduce((a, b) => a + b)));
    const ties = [Math.log(0.1), Math.log(0.3), Math.log(0.3), Math.log(0.3)];
    for (let s = 0; s < 40; s++) assert.ok([1, 2].includes(sample(ties, { temperature: 1, topK: 2 }, T.randomKey(s))));
  });

  test('sample: a 128256-token vocabulary with temperature, top-k and top-p', () => {
    const V = 128256;
    const lp = Array.from({ length: V }, (_, i) => (i === 777 ? 0 : -12 - (i % 97) / 10));
    for (const opts of [{ temperature: 1 }, { temperature: 0.7, topK: 40 }, { temperature: 0.9, topP: 0.5 }, {}]) {
      const a = sample(lp, opts, T.randomKey(3));
      assert.ok(Number.isInteger(a) && a >= 0 && a < V);
      assert.equal(sample(lp, opts, T.randomKey(3)), a, 'seeded');
    }
    assert.equal(sample(lp, { temperature: 0.9, topP: 0.5 }, T.randomKey(5)), 777, 'token 777 alone holds over half the mass');
  });

  test('memory: save, load into a fresh session, continue exactly; another model is refused', () => {
    const c = cfg('e2e');
    const params = scaled(c);
    const doc = randomTokens(30, c.vocabSize, 9);
    const dir = mkdtempSync(join(tmpdir(), 'ttt-mem-'));
    const path = join(dir, 'doc.safetensors');
    const a = new Session(c, params);
    a.prefill(doc.slice(0, 19));
    a.saveMemory(path);
    const b = new Session(c, params);
    b.loadMemory(path);
    assert.equal(b.tokensRead, 19);
    assert.ok(maxDiff(b.nextLogProbs(), a.nextLogProbs()) < 1e-12);
    const restA = a.prefill(doc.slice(19));
    const restB = b.prefill(doc.slice(19));
    assert.ok(maxDiff(restA, restB) < 1e-12, 'continuing from the memory equals having read the document');
    const other = new Session(c, scaled(c, 2));
    assert.throws(() => other.loadMemory(path), /different model/);
    assert.throws(() => other.loadMemory(join(dir, 'missing.safetensors')), /cannot read/);
  });

  test('long prompts read in pieces of MAX_GROUP tokens score like one pass; score: false gives the same next distribution', () => {
    for (const variant of ['full', 'e2e'] as Variant[]) {
      const c = cfg(variant, { vocabSize: 11, dModel: 8, nLayers: 2, nHeads: 2, ffnDim: 8, window: 64, miniBatch: 64 });
      const params = scaled(c, 3);
      const doc = randomTokens(2100, c.vocabSize, 9); // > MAX_GROUP (2048)
      const scoredSession = new Session(c, params);
      const nll = scoredSession.prefill(doc);
      assert.equal(nll.length, doc.length);
      // every token's NLL, from the model's own whole-sequence path (the inner loop for e2e)
      const whole = T.tidy(() => {
        const ids = T.tensor(doc.slice(0, -1), [1, doc.length - 1], 'int32');
        const targets = T.tensor(doc.slice(1), [1, doc.length - 1], 'int32');
        return innerLoop(c, params, ids, targets).tokenNll.toArray();
      });
      assert.ok(maxDiff(nll.slice(1), whole) < 1e-9, `${variant}: ${maxDiff(nll.slice(1), whole)}`);
      const fast = new Session(c, params);
      assert.deepEqual(fast.prefill(doc, { score: false }), []);
      if (variant === 'full') {
        // the full-attention caches were allocated once, for the prompt and 1024 decoded tokens
        const cache = (fast as unknown as { state: { caches: { k: T.Tensor }[] } }).state.caches[0];
        assert.equal(cache.k.shape[2], doc.length + 1024);
      }
      assert.ok(maxDiff(fast.nextLogProbs(), scoredSession.nextLogProbs()) < 1e-12);
      assert.equal(fast.tokensRead, doc.length);
      const live = T.liveTensorCount();
      fast.dispose();
      assert.ok(T.liveTensorCount() < live, 'dispose frees the caches and fast weights');
      assert.throws(() => fast.prefill([1]), /prefill: the session was disposed/);
      assert.throws(() => fast.decode(1), /decode: the session was disposed/);
      scoredSession.dispose();
    }
  });

  test('token-by-token reading appends to the KV caches in place; saved memories hold only the cached rows', () => {
    for (const variant of ['full', 'swa'] as Variant[]) {
      const c = cfg(variant, { nLayers: 2 });
      const s = new Session(c, scaled(c));
      const cacheOf = () => (s as unknown as { state: { caches: { k: T.Tensor; first: number; count: number }[] } }).state.caches[0];
      const storages = new Set<T.Tensor>();
      const doc = randomTokens(300, c.vocabSize, 4);
      for (const token of doc) {
        s.prefill([token], { score: false });
        storages.add(cacheOf().k);
      }
      const cache = cacheOf();
      assert.equal(cache.count, variant === 'full' ? 300 : c.window - 1);
      // full: capacity doubles (64, 128, 256, 512); swa (window 6): a fresh storage every ~64 tokens
      assert.ok(storages.size <= (variant === 'full' ? 4 : 6), `${variant}: ${storages.size} storages for 300 tokens`);
      const whole = new Session(c, scaled(c));
      whole.prefill(doc, { score: false });
      assert.ok(maxDiff(whole.nextLogProbs(), s.nextLogProbs()) < 1e-12, `${variant}: token by token equals one read`);
      const path = join(mkdtempSync(join(tmpdir(), 'ttt-mem-')), 'kv.safetensors');
      s.saveMemory(path);
      const saved = readSafetensors(path);
      assert.deepEqual(saved.tensors.get('state.0.k')!.shape, [1, c.nHeads, cache.count, c.dModel / c.nHeads]);
      const loaded = new Session(c, scaled(c));
      loaded.loadMemory(path);
      const next = randomTokens(5, c.vocabSize, 6);
      assert.ok(maxDiff(loaded.prefill(next), s.prefill(next)) < 1e-12, `${variant}: the loaded memory continues exactly`);
    }
  });

  test('prefill rejects tokens outside the vocabulary', () => {
    const c = cfg('swa');
    assert.throws(() => new Session(c, scaled(c)).prefill([1, 99]), /outside the vocabulary/);
  });

  test('a long session keeps the live tensor count bounded', () => {
    const c = cfg('e2e');
    const s = new Session(c, scaled(c));
    s.prefill(randomTokens(12, c.vocabSize, 3));
    const counts: number[] = [];
    for (let i = 0; i < 4; i++) {
      s.prefill(randomTokens(c.miniBatch, c.vocabSize, 10 + i));
      counts.push(T.liveTensorCount());
    }
    assert.ok(counts.every((n) => n === counts[0]), `live tensors drift: ${counts}`);
  });
});
