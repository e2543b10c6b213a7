/**
 * The backward walk's in-place accumulation: a tensor's running cotangent takes further contributions in place
 * (products through GEMMs with β = 1, checkpointed segments through their own backward, anything else through
 * `addInto`) where that is safe — a cotangent the walk made, held for one tensor, sharing memory with no view,
 * that no trace records and no caller keeps. Checked: the products go into the running cotangent (a spy on the
 * backend), gradients against finite differences on graphs with shared cotangents, views, broadcasting,
 * checkpoints and second order, and that a caller's cotangents and kept tensors are never written.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import * as T from '../src/index.js';
import { checkGrad, checkHvp, rn } from './helpers/check.js';
import { spyBackend } from './helpers/fused.js';

/** fn's result and the backend's matmul calls, each with the buffer it accumulated into (undefined: none). */
function spyMatmul<R>(fn: () => R): { result: R; calls: { accumulate: unknown }[] } {
  const { result, calls } = spyBackend('matmul', fn);
  return { result, calls: calls.map((a) => ({ accumulate: a[5] })) };
}

/** fn's result and how many binary adds the backend ran over tensors of `size` elements. */
function countAdds<R>(size: number, fn: () => R): { result: R; adds: number } {
  const { result, calls } = spyBackend('binary', fn);
  return { result, adds: calls.filter((a) => a[0] === 'add' && (a[5] as number[]).reduce((x, y) => x * y, 1) === size).length };
}

/** fn with in-place accumulation off (each contribution added separately), the setting restored after. */
function separately<R>(fn: () => R): R {
  const before = T.setInPlaceAccumulation(false);
  try {
    return fn();
  } finally {
    T.setInPlaceAccumulation(before);
  }
}

describe('in-place accumulation of cotangents', () => {
  test('matmul({ into }) adds the product into the tensor and returns it; refuses a traced operand or a wrong shape', () => {
    T.tidy(() => {
      const [a, b, c] = [rn(1, [2, 3, 4]), rn(2, [2, 4, 5]), rn(3, [2, 3, 5])];
      const want = T.add(c, T.matmul(a, b)).toArray();
      const acc = T.add(c, 0);
      assert.equal(T.matmul(a, b, { into: acc }), acc);
      assert.deepEqual(acc.toArray().map((v, i) => Math.abs(v - want[i]) < 1e-12), want.map(() => true));
      assert.throws(() => T.matmul(a, b, { into: rn(4, [2, 3, 4]) }), /into is float64\[2,3,4\], the product float64\[2,3,5\]/);
      assert.throws(() => T.grad((x: T.Tensor) => T.sum(T.matmul(x, b, { into: T.add(c, 0) })))(a), /cannot be traced/);
      assert.throws(() => T.addInto(acc, rn(5, [3, 5])), /addInto: shapes/);
    });
  });

  test('a weight used by several products (one batched over an axis of 1): each product after the first goes into its running cotangent (β = 1), no add of its size', () => {
    T.tidy(() => {
      const w = rn(10, [6, 5]);
      // (one with a leading axis of 1, as the output layer's [1, T, D] activations: its product still fits w's cotangent)
      const xs = [rn(11, [4, 6]), rn(12, [1, 3, 6]), rn(13, [7, 6])];
      const f = (p: T.Tensor) => xs.reduce((s, x) => T.add(s, T.sum(T.tanh(T.matmul(x, p)))), T.scalar(0, 'float64'));
      const { result: g, calls } = spyMatmul(() => countAdds(30, () => T.grad(f)(w) as T.Tensor));
      const into = calls.filter((c) => c.accumulate !== undefined);
      assert.equal(into.length, 2, 'the second and third products of the weight\'s gradient are added in place');
      assert.equal(into[0].accumulate, into[1].accumulate, 'into one buffer');
      assert.equal(g.result.size, 30);
      assert.equal(g.adds, 0, 'no separate add of weight-sized cotangents');
      checkGrad(f, [w], { label: 'shared weight' });
    });
  });

  test('checkpointed segments: their backward adds into the outer running cotangent; the same gradients as without checkpoints', () => {
    T.tidy(() => {
      const w = rn(20, [5, 5]);
      const x0 = rn(21, [3, 5]);
      const seg = T.checkpoint((h: T.Tensor, p: T.Tensor) => T.tanh(T.matmul(h, p)));
      const f = (useCheckpoint: boolean) => (p: T.Tensor) => {
        let h = x0;
        for (let i = 0; i < 4; i++) h = useCheckpoint ? seg(h, p) : T.tanh(T.matmul(h, p));
        return T.sum(T.square(h));
      };
      const { result: g, calls } = spyMatmul(() => T.grad(f(true))(w) as T.Tensor);
      const into = calls.filter((c) => c.accumulate !== undefined);
      assert.equal(into.length, 3, 'segments 2-4 (in backward order) add their weight gradient into the first one\'s');
      assert.ok(into.every((c) => c.accumulate === into[0].accumulate), 'one running cotangent across the segments');
      const plain = T.grad(f(false))(w) as T.Tensor;
      const [a, b] = [g.toArray(), plain.toArray()];
      assert.ok(a.every((v, i) => Math.abs(v - b[i]) < 1e-12), 'checkpointed = plain');
      checkGrad(f(true), [w], { label: 'checkpointed' });
    });
  });

  test('shared cotangents, views, broadcasts, a product of a tensor with itself, second order: all match finite differences', () => {
    T.tidy(() => {
      const x = rn(30, [4, 4]);
      const w = rn(31, [4, 4]);
      const f = (a: T.Tensor, p: T.Tensor) => {
        const s = T.add(a, a); // one cotangent handed to both inputs
        const v = T.reshape(T.matmul(s, p), [2, 8]); // a view of a product
        const sq = T.matmul(a, a); // the same tensor on both sides of a product
        const b = T.mul(T.reshape(v, [4, 4]), T.sum(a, 0, true)); // a broadcast
        return T.sum(T.tanh(T.add(T.add(sq, b), T.matmul(T.transpose(a, [1, 0]), p))));
      };
      checkGrad(f, [x, w], { label: 'mixed graph' });
      checkHvp(f, [x, w], { label: 'mixed graph, second order', rtol: 1e-5 });
      const seg = T.checkpoint(f);
      checkGrad((a: T.Tensor, p: T.Tensor) => T.add(seg(a, p), f(a, p)), [x, w], { label: 'the graph checkpointed beside itself' });
    });
  });

  test('random graphs of views, shared cotangents and elementwise ops match finite differences (a view of a cotangent still held elsewhere is never added into)', () => {
    let seed = 1;
    const rnd = () => (seed = (seed * 1103515245 + 12345) % 2147483648) / 2147483648;
    const flat = (t: T.Tensor) => (t.rank === 1 ? t : T.reshape(t, [4]));
    const square = (t: T.Tensor) => (t.rank === 2 ? t : T.reshape(t, [2, 2]));
    const ops: ((a: T.Tensor, b: T.Tensor) => T.Tensor)[] = [
      (a) => square(a), (a) => flat(a), (a) => T.tanh(a), (a) => T.sin(a),
      (a, b) => T.add(flat(a), flat(b)), (a, b) => T.mul(square(a), square(b)), (a, b) => T.add(square(a), square(b)),
    ];
    const weights = T.tensor([1, -2, 3, 0.5], [4], 'float64');
    for (let trial = 0; trial < 24; trial++) {
      const start = seed;
      const f = (x: T.Tensor) => {
        seed = start; // the same graph on every evaluation
        const made = [x];
        for (let i = 0; i < 8; i++) {
          const op = ops[Math.floor(rnd() * ops.length)];
          made.push(op(made[Math.floor(rnd() * made.length)], made[Math.floor(rnd() * made.length)]));
        }
        let loss = T.sum(T.mul(flat(made[made.length - 1]), weights));
        for (let i = 1; i < made.length - 1; i += 3) loss = T.add(loss, T.sum(T.mul(flat(made[i]), 0.3)));
        return loss;
      };
      T.tidy(() => checkGrad(f, [rn(trial, [4])], { label: `random graph ${trial}` }));
      seed = ((start * 7 + 13) % 2147483648) + 1;
    }
  });

  test('the token NLL: the logits\' two cotangents (the outer NLL\'s and the second order\'s) share one [rows, V] buffer; same values as without in-place, and finite differences', () => {
    T.tidy(() => {
      const targets = T.tensor([1, 4, 0], [3], 'int32');
      const v = rn(51, [3, 5]);
      // the outer NLL plus a product with the NLL's gradient: the logits get both cotangents in one walk
      const f = (x: T.Tensor) => T.add(T.sum(T.fusedTokenNll(x, targets)), T.sum(T.mul(T.grad((y: T.Tensor) => T.sum(T.fusedTokenNll(y, targets)))(x) as T.Tensor, v)));
      const x = rn(50, [3, 5]);
      const first = spyBackend('tokenNllBackward', () => spyBackend('tokenNllGradBackward', () => T.grad(f)(x) as T.Tensor));
      const g = first.result.result;
      // whichever of the two kernels runs second adds into the other's result
      const accumulated = [...first.calls.filter((a) => a[7] !== undefined), ...first.result.calls.filter((a) => a[8] !== undefined)];
      assert.equal(accumulated.length, 1, 'one kernel added into the running cotangent');
      const plain = separately(() => T.grad(f)(x) as T.Tensor);
      const [a, b] = [g.toArray(), plain.toArray()];
      assert.ok(a.every((val, i) => Math.abs(val - b[i]) < 1e-13), 'in place = a separate sum');
      checkGrad(f, [x], { label: 'NLL + its gradient' });
    });
  });

  test('a cast\'s cotangent goes into the source\'s running cotangent in its dtype (no source-sized copy); same values as without in-place', () => {
    T.tidy(() => {
      const w = rn(55, [4, 6]);
      const x = T.cast(rn(56, [3, 4]), 'float32');
      // w (float64) is used directly and through a float32 copy: the copy's cotangent comes back as float32
      // (in this order the walk reaches the cast after w's direct use, so the cast adds into w's running cotangent)
      const f = (p: T.Tensor) => T.add(T.cast(T.sum(T.tanh(T.matmul(x, T.cast(p, 'float32')))), 'float64'), T.sum(T.square(p)));
      const { result: g, calls } = spyBackend('addInto', () => T.grad(f)(w) as T.Tensor);
      const mixed = calls.filter((a) => a[4] !== undefined && a[4] !== a[3]).map((a) => `${a[4]} into ${a[3]}`);
      assert.deepEqual(mixed, ['float32 into float64']);
      const plain = separately(() => T.grad(f)(w) as T.Tensor);
      assert.deepEqual(g.toArray(), plain.toArray(), 'the same values, bit for bit');
    });
  });

  test('a tied embedding: the lookup\'s scatter-add goes into the table\'s running cotangent (no zero table); finite differences', () => {
    T.tidy(() => {
      const table = rn(65, [7, 4]);
      const tokens = T.tensor([3, 1, 3, 6, 0], [5], 'int32');
      // the output layer's product comes first in the walk, then the lookup adds into its gradient
      const f = (e: T.Tensor) => T.sum(T.tanh(T.matmul(T.gather(e, tokens, 0), e, { transB: true })));
      const { result: g, calls } = spyBackend('scatterAdd', () => T.grad(f)(table) as T.Tensor);
      assert.deepEqual(calls.map((a) => a[8] === true), [true], 'one scatter-add, in place');
      const plain = separately(() => T.grad(f)(table) as T.Tensor);
      const [a, b] = [g.toArray(), plain.toArray()];
      assert.ok(a.every((v, i) => Math.abs(v - b[i]) < 1e-14));
      checkGrad(f, [table], { label: 'tied embedding' });
    });
  });

  test('TTT_ACCUMULATE_IN_PLACE=0 (setInPlaceAccumulation(false)) adds every contribution separately', () => {
    T.tidy(() => {
      const w = rn(60, [6, 5]);
      const xs = [rn(61, [4, 6]), rn(62, [3, 6])];
      const f = (p: T.Tensor) => T.add(T.sum(T.tanh(T.matmul(xs[0], p))), T.sum(T.tanh(T.matmul(xs[1], p))));
      const off = separately(() => spyMatmul(() => countAdds(30, () => T.grad(f)(w))));
      assert.equal(off.calls.filter((c) => c.accumulate !== undefined).length, 0);
      assert.equal(off.result.adds, 1, 'the two products summed by an add');
      const { result, calls } = spyMatmul(() => countAdds(30, () => T.grad(f)(w)));
      assert.equal(calls.filter((c) => c.accumulate !== undefined).length, 1);
      assert.equal(result.adds, 0);
    });
  });

  test('a caller\'s cotangents and kept tensors are never written in place', () => {
    T.tidy(() => {
      const w = rn(40, [3, 3]);
      const a = rn(41, [2, 3]);
      // output 0 is the variable itself: its cotangent (the caller's) becomes w's running cotangent
      const [, pullback] = T.vjp((p: T.Tensor) => [p, T.matmul(a, p), T.matmul(a, p)], w);
      const cts = [rn(42, [3, 3]), rn(43, [2, 3]), rn(44, [2, 3])];
      const before = cts.map((c) => c.toArray());
      const [g] = pullback(cts) as T.Tensor[];
      cts.forEach((c, i) => assert.deepEqual(c.toArray(), before[i], `cotangent ${i} unchanged`));
      const want = T.add(cts[0], T.matmul(a, T.add(cts[1], cts[2]), { transA: true })).toArray();
      g.toArray().forEach((v, i) => assert.ok(Math.abs(v - want[i]) < 1e-12));
      // a second pullback with the same cotangents gives the same gradient (nothing was consumed or changed)
      const [again] = pullback(cts) as T.Tensor[];
      assert.deepEqual(again.toArray(), g.toArray());
    });
  });
});
