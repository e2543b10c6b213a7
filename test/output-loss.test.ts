/**
 * linearTokenNllSum — the output layer's training loss Σ weights ⊙ tokenNll(x Wᵀ) whose forward also takes its
 * gradients, piece by piece — against its composite definition: the loss, the gradients of x and W (finite
 * differences too) for pieces that do and do not divide the rows, a cotangent other than 1, second order through the
 * composite, the untraced loss, no [rows, V] tensor left after the forward, and the plain LM loss with it (masked
 * and not) equal to the loss through the checkpointed output layer.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import * as T from '../src/index.js';
import { makeConfig } from '../src/model/config.js';
import { initParams, type Params } from '../src/model/transformer.js';
import { lmLoss, setFusedOutputLoss, setOutputRows } from '../src/model/ttt-e2e.js';
import { checkGrad, checkHvp, rn } from './helpers/check.js';
import { withOpPath } from './helpers/fused.js';

const maxRel = (a: T.Tensor, b: T.Tensor) => {
  const [x, y] = [a.toArray(), b.toArray()];
  const scale = Math.max(1e-30, ...y.map(Math.abs));
  return x.reduce((m, v, i) => Math.max(m, Math.abs(v - y[i])), 0) / scale;
};

describe('linearTokenNllSum (the output layer\'s loss with its gradients taken in the forward)', () => {
  const [B, Tn, D, V] = [2, 5, 4, 7];
  const targets = T.tensor([0, 3, 6, 1, 2, 5, 5, 0, 4, 1], [B, Tn], 'int32');
  const weights = T.tensor(Array.from({ length: B * Tn }, (_, i) => 0.05 + 0.01 * i), [B, Tn], 'float64');

  test('the loss and the gradients of x and W equal the composite\'s, for every piece size', () => {
    T.tidy(() => {
      const [x, w] = [rn(1, [B, Tn, D]), rn(2, [V, D])];
      const want = T.valueAndGrad((a: T.Tensor, b: T.Tensor) => T.compositeLinearTokenNllSum(a, b, targets, weights), { argnums: [0, 1] })(x, w);
      for (const per of [0, 1, 3, 10, 64]) {
        const got = T.valueAndGrad((a: T.Tensor, b: T.Tensor) => T.linearTokenNllSum(a, b, targets, weights, per), { argnums: [0, 1] })(x, w);
        assert.ok(Math.abs(got[0].item() - want[0].item()) < 1e-13, `pieces of ${per}: loss`);
        (got[1] as T.Tensor[]).forEach((g, i) => assert.ok(maxRel(g, (want[1] as T.Tensor[])[i]) < 1e-12, `pieces of ${per}: gradient ${i}`));
      }
    });
  });

  test('finite differences; a cotangent other than 1 scales the kept gradients', () => {
    T.tidy(() => {
      const [x, w] = [rn(3, [B, Tn, D]), rn(4, [V, D])];
      checkGrad((a: T.Tensor, b: T.Tensor) => T.linearTokenNllSum(a, b, targets, weights, 3), [x, w], { label: 'linearTokenNllSum' });
      checkGrad((a: T.Tensor, b: T.Tensor) => T.tanh(T.mul(T.linearTokenNllSum(a, b, targets, weights, 4), 0.3)), [x, w], { label: 'through tanh(0.3 · loss)' });
    });
  });

  test('second order goes through the composite (the backward is differentiated) and matches finite differences', () => {
    T.tidy(() => {
      const [x, w] = [rn(5, [B, Tn, D]), rn(6, [V, D])];
      checkHvp((a: T.Tensor, b: T.Tensor) => T.linearTokenNllSum(a, b, targets, weights, 3), [x, w], { label: 'linearTokenNllSum hvp', rtol: 1e-5 });
    });
  });

  test('untraced, the loss alone; traced, no [rows, V] tensor outlives the forward\'s pieces', () => {
    T.tidy(() => {
      const [x, w] = [rn(7, [B, Tn, D]), rn(8, [V, D])];
      const plain = T.linearTokenNllSum(x, w, targets, weights, 3);
      assert.ok(Math.abs(plain.item() - T.compositeLinearTokenNllSum(x, w, targets, weights).item()) < 1e-13);
      T.trackLiveTensors(true);
      try {
        const [, pullback] = T.vjp((a: T.Tensor, b: T.Tensor) => T.linearTokenNllSum(a, b, targets, weights, 3), x, w);
        const wide = T.trackedLiveTensors().filter((t) => !t.isDisposed && t.shape[t.shape.length - 1] === V && t.size > V * D);
        assert.deepEqual(wide.map((t) => t.shape), [], 'no logits-shaped tensor is alive after the forward');
        const [gx] = pullback(T.scalar(2, 'float64')) as T.Tensor[];
        assert.equal(gx.shape.join(), [B, Tn, D].join());
      } finally {
        T.trackLiveTensors(false);
      }
    });
  });

  test('errors: W\'s width, the targets\' and weights\' shapes, the piece size', () => {
    T.tidy(() => {
      const x = rn(9, [B, Tn, D]);
      assert.throws(() => T.linearTokenNllSum(x, rn(10, [V, D + 1]), targets, weights), /W \[7,5\] should be \[V, 4\]/);
      assert.throws(() => T.linearTokenNllSum(x, rn(10, [V, D]), T.reshape(targets, [Tn * B]), weights), /should be x's leading shape/);
      assert.throws(() => T.linearTokenNllSum(x, rn(10, [V, D]), targets, weights, 1.5), /rowsPerPiece must be a whole number/);
    });
  });

  test('the plain LM loss through it (fused loss path) equals the loss through the checkpointed output layer, masked and not', () => {
    const c = makeConfig({ variant: 'swa', vocabSize: 40, dModel: 16, nHeads: 2, ffnDim: 24, nLayers: 2, window: 8, miniBatch: 8 });
    T.tidy(() => {
      const params = T.mapLeaves(initParams(c, T.randomKey(0)), (t) => T.cast(t, 'float64')) as Params;
      const tokens = T.randint(T.randomKey(1), [2, 12], 0, 40);
      const targets2 = T.randint(T.randomKey(2), [2, 12], 0, 40);
      const mask = T.tensor(Array.from({ length: 24 }, (_, i) => (i % 5 === 0 ? 0 : 1)), [2, 12], 'float64');
      const before = setOutputRows(7); // pieces that do not divide the 24 rows
      try {
        for (const m of [undefined, mask]) {
          const run = (path: 'fused' | 'composite') => withOpPath('loss', path, () => T.valueAndGrad((p: Params) => lmLoss(c, p, tokens, targets2, m))(params));
          const [fused, composite] = [run('fused'), run('composite')];
          const off = setFusedOutputLoss(false);
          let pieces: ReturnType<typeof run>;
          try {
            pieces = run('fused'); // the fused token NLL through outputNll's checkpointed pieces
          } finally {
            setFusedOutputLoss(off);
          }
          assert.ok(Math.abs(pieces[0].item() - fused[0].item()) < 1e-13, 'the checkpointed pieces give the same loss');
          assert.ok(Math.abs(fused[0].item() - composite[0].item()) < 1e-13, `${m ? 'masked' : 'plain'}: loss`);
          const [gf, gc] = [T.leaves(fused[1]), T.leaves(composite[1])];
          gf.forEach((g, i) => assert.ok(maxRel(g, gc[i]) < 1e-11, `${m ? 'masked' : 'plain'}: gradient ${i}: ${maxRel(g, gc[i])}`));
        }
      } finally {
        setOutputRows(before);
      }
    });
  });
});
