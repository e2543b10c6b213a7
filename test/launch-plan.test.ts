/**
 * The pieces a launch plan is made of (src/engine/launch-plan.ts): ring writes at a device-held
 * position (`writeRowsAt`), attention whose key positions are read from memory, in-place copies and
 * host writes, and the plan itself (on a backend that cannot record, each replay runs the step again).
 * Backend-independent: `npm run test:cuda` runs it again on the GPU, where plans record CUDA graphs.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import * as T from '../src/index.js';
import { seededValues } from './helpers/check.js';

const close = (a: number[], b: number[], tol: number, what: string) => {
  assert.equal(a.length, b.length, `${what}: lengths`);
  const worst = a.reduce((m, v, i) => Math.max(m, Math.abs(v - b[i])), 0);
  assert.ok(worst <= tol, `${what}: max difference ${worst} > ${tol}`);
};

describe('launch plans', () => {
  test('writeRowsAt writes rows at (at + i) mod R along axis -2, per leading index, and nothing else', () => {
    T.tidy(() => {
      const store = T.tensor(Array.from({ length: 2 * 5 * 3 }, (_, i) => -i - 1), [2, 5, 3], 'float32');
      const rows = T.tensor(Array.from({ length: 2 * 3 * 3 }, (_, i) => i), [2, 3, 3], 'float32');
      T.writeRowsAt(store, rows, T.tensor([8], [1], 'int32')); // rows 3, 4, 0 of each leading index
      const want = Array.from({ length: 2 * 5 * 3 }, (_, i) => -i - 1);
      for (let o = 0; o < 2; o++) {
        for (let r = 0; r < 3; r++) {
          for (let c = 0; c < 3; c++) want[(o * 5 + ((8 + r) % 5)) * 3 + c] = (o * 3 + r) * 3 + c;
        }
      }
      assert.deepEqual(store.toArray(), want);
      // int32 rows (the key positions of a ring), a negative position wraps too
      const pos = T.full([4, 1], -1, 'int32');
      T.writeRowsAt(pos, T.tensor([7, 8], [2, 1], 'int32'), T.tensor([-1], [1], 'int32'));
      assert.deepEqual(pos.toArray(), [8, -1, -1, 7]);
    });
  });

  test('writeRowsAt refuses rows that do not fit, a bad position tensor and differentiation', () => {
    T.tidy(() => {
      const store = T.zeros([2, 4, 3]);
      const at = T.tensor([0], [1], 'int32');
      assert.throws(() => T.writeRowsAt(store, T.zeros([2, 1, 4]), at), /writeRowsAt: rows \[2,1,4\] float32 do not fit the store \[2,4,3\]/);
      assert.throws(() => T.writeRowsAt(store, T.zeros([2, 5, 3]), at), /5 rows do not fit a ring of 4/);
      assert.throws(() => T.writeRowsAt(store, T.zeros([2, 1, 3], 'float64'), at), /do not fit the store/);
      assert.throws(() => T.writeRowsAt(store, T.zeros([2, 1, 3]), T.tensor([0, 1], [2], 'int32')), /the position must be one int32/);
      assert.throws(() => T.grad((x: T.Tensor) => (T.writeRowsAt(store, x, at), T.sum(x)))(T.zeros([2, 1, 3])), /writes in place and cannot be differentiated/);
    });
  });

  for (const [label, window, groups] of [['full attention', undefined, 1], ['a window of 5', 5, 1], ['grouped queries, window 3', 3, 2]] as const) {
    test(`attention at device-held positions over a shuffled ring equals attention over the ordered keys (${label})`, () => {
      T.tidy(() => {
        const [H, D, n, R, q0] = [4, 8, 9, 13, 20]; // 9 cached positions 12..20 in a ring of 13 rows
        const Hkv = H / groups;
        const dt = 'float64';
        const q = T.tensor(seededValues(1, H * D, -1, 1), [1, H, 1, D], dt);
        const k = T.tensor(seededValues(2, Hkv * n * D, -1, 1), [1, Hkv, n, D], dt);
        const v = T.tensor(seededValues(3, Hkv * n * D, -1, 1), [1, Hkv, n, D], dt);
        const want = T.scaledDotAttention(q, k, v, { qStart: q0, kStart: q0 - n + 1, window });
        // position p in row (5 p) mod R: a permutation; the rows left over hold garbage and position -1
        const slot = (p: number) => (5 * p) % R;
        const ringK = T.tensor(seededValues(4, Hkv * R * D, -1, 1), [1, Hkv, R, D], dt);
        const ringV = T.tensor(seededValues(5, Hkv * R * D, -1, 1), [1, Hkv, R, D], dt);
        const keyPos = new Array<number>(R).fill(-1);
        for (let j = 0; j < n; j++) {
          const p = q0 - n + 1 + j;
          keyPos[slot(p)] = p;
          const one = (t: T.Tensor) => T.slice(t, [0, 0, j, 0], [1, Hkv, j + 1, D]);
          T.writeRowsAt(ringK, one(k), T.tensor([slot(p)], [1], 'int32'));
          T.writeRowsAt(ringV, one(v), T.tensor([slot(p)], [1], 'int32'));
        }
        const got = T.scaledDotAttention(q, ringK, ringV, {
          qStart: 0, kStart: 0, window, positions: { keys: T.tensor(keyPos, [R], 'int32'), query: T.tensor([q0], [1], 'int32') },
        });
        close(got.toArray(), want.toArray(), 1e-12, label);
      });
    });
  }

  test('attention at device-held positions: checks, and no composite or gradient', () => {
    T.tidy(() => {
      const q = T.zeros([1, 2, 1, 4]);
      const kv = T.zeros([1, 2, 6, 4]);
      const positions = { keys: T.full([6], 0, 'int32'), query: T.full([1], 0, 'int32') };
      const o = { qStart: 0, kStart: 0 };
      assert.throws(() => T.scaledDotAttention(q, kv, kv, { ...o, positions: { ...positions, keys: T.full([5], 0, 'int32') } }), /positions must be int32 \[6\]/);
      assert.throws(() => T.scaledDotAttention(q, kv, kv, { ...o, positions, keyRows: { first: 0, count: 6 } }), /positions and keyRows cannot be combined/);
      assert.throws(() => T.compositeAttention(q, kv, kv, { ...o, positions }), /for the fused forward only/);
      assert.throws(() => T.grad((x: T.Tensor) => T.sum(T.scaledDotAttention(x, kv, kv, { ...o, positions })))(q), /forward only/);
    });
  });

  test('copyInto and writeHost overwrite in place; mismatches are refused', () => {
    T.tidy(() => {
      const dst = T.zeros([2, 3]);
      T.copyInto(dst, T.tensor([1, 2, 3, 4, 5, 6], [2, 3]));
      assert.deepEqual(dst.toArray(), [1, 2, 3, 4, 5, 6]);
      T.writeHost(dst, [6, 5, 4, 3, 2, 1]);
      assert.deepEqual(dst.toArray(), [6, 5, 4, 3, 2, 1]);
      const ix = T.zeros([2], 'int32');
      T.writeHost(ix, [7, -3]);
      assert.deepEqual(ix.toArray(), [7, -3]);
      assert.throws(() => T.copyInto(dst, T.zeros([3, 2])), /copyInto: src \[3,2\] float32 does not match dst \[2,3\] float32/);
      assert.throws(() => T.writeHost(dst, [1, 2]), /writeHost: 2 values for a tensor of 6/);
    });
  });

  test('a plan replays its step against the inputs of the moment and keeps live tensors flat', () => {
    const input = T.keep(T.zeros([4]));
    const output = T.keep(T.zeros([4]));
    const weight = T.keep(T.tensor([1, 2, 3, 4], [4]));
    const step = () => T.copyInto(output, T.add(T.mul(T.exp(input), weight), 1));
    T.writeHost(input, [0, 0, 0, 0]);
    const plan = T.launchPlan(step); // runs the step once now
    assert.deepEqual(output.toArray(), [2, 3, 4, 5]);
    const live = T.liveTensorCount();
    for (const x of [0.5, -1, 2]) {
      T.writeHost(input, [x, x, x, x]);
      plan.replay();
      close(output.toArray(), [1, 2, 3, 4].map((w) => Math.exp(x) * w + 1), 1e-5, `replay at ${x}`);
    }
    assert.equal(T.liveTensorCount(), live, 'replays make no tensors');
    plan.dispose();
    assert.equal(plan.recorded, T.getBackend().captureWork !== undefined && process.env.TTT_LAUNCH_PLANS !== 'eager');
    if (plan.recorded) assert.throws(() => plan.replay(), /replayed after dispose/);
    T.dispose([input, output, weight]);
  });
});
