/**
 * The engine's bounded caches: scalar constants (JS numbers in ops) and RoPE tables. Each is made
 * once per key, handed out as the caller's own alias (so evicting or clearing an entry never breaks
 * a tensor in use), and left out of liveTensorCount.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import * as T from '../src/index.js';
import { clearRopeCache, rope } from '../src/nn/layers.js';
import { CpuBackend } from '../src/backends/cpu/backend.js';

/** How many times fn calls one method of the current backend. */
function countCalls(method: 'fill' | 'upload', fn: () => unknown): number {
  const be = T.getBackend() as unknown as Record<string, (...a: unknown[]) => unknown>;
  const original = be[method];
  let calls = 0;
  be[method] = (...a: unknown[]) => {
    calls++;
    return original.apply(be, a);
  };
  try {
    fn();
  } finally {
    be[method] = original;
  }
  return calls;
}

describe('engine caches', () => {
  test('a scalar is filled once, then reused; -0 and 0 stay distinct', () => {
    const x = T.keep(T.tensor([1, 2, 3], [3]));
    const fills = countCalls('fill', () => T.tidy(() => [T.add(x, 0.123456789), T.mul(x, 0.123456789), T.sub(x, 0.123456789)].map((t) => t.toArray())));
    assert.equal(fills, 1);
    assert.equal(countCalls('fill', () => T.tidy(() => T.add(x, 0.123456789).toArray())), 0);
    assert.ok(Object.is(T.tidy(() => T.full([], -0).toArray()[0]), -0));
    assert.ok(Object.is(T.tidy(() => T.full([], 0).toArray()[0]), 0));
    assert.deepEqual(T.tidy(() => T.add(x, 0.5).toArray()), [1.5, 2.5, 3.5]);
    x.dispose();
  });

  test('two backend instances with one name (the cuda backend and its stand-in) never share cached scalars', () => {
    // two cpu instances (whichever backend the suite runs on)
    const before = T.getBackend();
    const cpu = T.setBackend('cpu');
    T.registerBackend('cpu-twin', () => new CpuBackend());
    try {
      const twin = T.setBackend('cpu-twin');
      assert.equal(twin.name, cpu.name);
      const y = T.tidy(() => T.add(T.tensor([1, 2], [2]), 7.25));
      assert.equal(y.backend, twin);
      assert.deepEqual(y.toArray(), [8.25, 9.25]);
      y.dispose();
      // the same number on the first instance: its own scalar, not the twin's
      T.setBackend('cpu');
      assert.deepEqual(T.tidy(() => T.add(T.tensor([1], [1]), 7.25).toArray()), [8.25]);
      assert.notEqual(T.backendKey(twin), T.backendKey(cpu));
    } finally {
      T.setBackend(before.name); // (registered under its own name: 'cpu' or 'cuda')
    }
  });

  test('cache entries are not live tensors; an alias outlives the eviction of its entry', () => {
    const before = T.liveTensorCount();
    T.tidy(() => void T.add(T.ones([2]), 0.777));
    assert.equal(T.liveTensorCount(), before);
    const held = T.keep(T.full([], 0.25));
    // more distinct scalars than the cache holds: 0.25's entry is evicted and disposed
    T.tidy(() => {
      for (let i = 0; i < 1100; i++) T.full([], 1000 + i);
    });
    assert.deepEqual(held.toArray(), [0.25]);
    held.dispose();
    assert.equal(T.liveTensorCount(), before);
    T.clearScalarCache();
    assert.deepEqual(T.tidy(() => T.full([], 0.25).toArray()), [0.25]);
  });

  test('attention band biases are built once per geometry (shape, qStart − kStart, window)', () => {
    const want = (tq: number, tk: number, q0: number, k0: number, w: number) =>
      Array.from({ length: tq * tk }, (_, idx) => {
        const p = q0 + Math.floor(idx / tk);
        const s = k0 + (idx % tk);
        return s <= p && p - s < w ? 0 : -1e9;
      });
    const a = T.tidy(() => T.attentionBandBias(4, 9, { qStart: 105, kStart: 100, window: 3 }, 'float64').toArray());
    assert.deepEqual(a, want(4, 9, 105, 100, 3));
    // the same geometry at other absolute positions: no new upload, same values
    assert.equal(countCalls('upload', () => T.tidy(() => assert.deepEqual(T.attentionBandBias(4, 9, { qStart: 505, kStart: 500, window: 3 }, 'float64').toArray(), a))), 0);
    // another offset is another bias
    assert.deepEqual(T.tidy(() => T.attentionBandBias(4, 9, { qStart: 106, kStart: 100, window: 3 }, 'float64').toArray()), want(4, 9, 106, 100, 3));
    const before = T.liveTensorCount();
    T.clearBandBiasCache();
    assert.equal(T.liveTensorCount(), before);
  });

  test('RoPE tables are uploaded once per position range and survive clearing while in use', () => {
    const x = T.keep(T.randn(T.randomKey(1), [1, 5, 2, 8], 'float64'));
    const positions = [3, 4, 5, 6, 7];
    const first = T.tidy(() => rope(x, positions, 10000).toArray());
    assert.equal(countCalls('upload', () => T.tidy(() => rope(x, positions, 10000).toArray())), 0, 'the second call uploads no tables');
    const kept = T.keep(rope(x, positions, 10000));
    clearRopeCache();
    assert.deepEqual(kept.toArray(), first);
    // and the values are RoPE's: position 3, pair 0 rotates by 3 rad
    const xs = x.toArray();
    assert.ok(Math.abs(first[0] - (xs[0] * Math.cos(3) - xs[1] * Math.sin(3))) < 1e-12);
    T.dispose([kept, x]);
  });
});
