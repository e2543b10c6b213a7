/**
 * KV caches as rows of preallocated storage (src/engine/kv-store.ts) and attention over such rows
 * (`keyRows`): appends write in place only at the storage's frontier, so every older view keeps its
 * values; dropping rows moves `first`; under an autodiff transform appending is a differentiable
 * concat; and attention over rows of a store equals attention over those rows alone, bit for bit,
 * never reading the rows outside them (they hold NaN here). Runs on the CPU, and on the GPU under
 * `npm run test:cuda`.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import {
  type DType, type KvRows, type Tensor, appendKv, compositeAttention, concat, dropOldestRows, getBackend, grad, kvRows, mul,
  reservingKv, scaledDotAttention, slice, stopGradient, sum, tensor, tidy,
} from '../src/index.js';
import { rn, seededValues } from './helpers/check.js';

const FLOAT: DType = getBackend().name === 'cpu' ? 'float64' : 'float32';

const same = (a: Tensor, b: Tensor, what: string) => {
  assert.deepEqual(a.shape, b.shape, `${what}: shape`);
  const x = a.toArray();
  const y = b.toArray();
  assert.ok(x.every((v, i) => Object.is(v, y[i])), `${what}: values differ`);
};

/** [lead..., n, d] rows with values from `seed`. */
const rows = (seed: number, n: number, lead = [1, 2], d = 4, dtype: DType = FLOAT) => rn(seed, [...lead, n, d], dtype);

describe('KV store: appendKv, kvRows, dropOldestRows', () => {
  test('appends equal the concatenation of every chunk; in place at the frontier, a copy with room to grow otherwise', () => {
    tidy(() => {
      const chunks = [3, 1, 1, 40, 1, 64, 2].map((n, i) => [rows(10 + 2 * i, n), rows(11 + 2 * i, n)] as const);
      let store: KvRows | null = null;
      let copies = 0;
      for (const [k, v] of chunks) {
        const next: KvRows = appendKv(store, k, v);
        if (!store || next.k !== store.k) copies++;
        else assert.equal(next.v, store.v, 'k and v storage move together');
        store = next;
      }
      assert.ok(copies <= 3, `${copies} reallocations for 112 rows appended (capacity doubles)`);
      const got = kvRows(store!);
      same(got.k, concat(chunks.map((c) => c[0]), 2), 'k');
      same(got.v, concat(chunks.map((c) => c[1]), 2), 'v');
    });
  });

  test('reservingKv: an unbounded store that must grow makes room for the reserved rows at once; others double', () => {
    tidy(() => {
      const cap = (r: KvRows) => r.k.shape[2];
      const chunks = [100, 150, 250].map((n, i) => [rows(40 + 2 * i, n), rows(41 + 2 * i, n)] as const);
      let store: KvRows | null = null;
      let copies = 0;
      reservingKv(500, () => {
        for (const [k, v] of chunks) {
          const next: KvRows = appendKv(store, k, v, { unbounded: true });
          if (!store || next.k !== store.k) copies++;
          store = next;
        }
      });
      assert.equal(copies, 1, 'one allocation for the whole reserve');
      assert.equal(cap(store!), 500);
      const got = kvRows(store!);
      same(got.k, concat(chunks.map((c) => c[0]), 2), 'k');
      // past the reserve, and outside reservingKv, the store doubles again
      store = appendKv(store, rows(60, 1), rows(61, 1), { unbounded: true });
      assert.equal(cap(store), 1002);
      // a windowed cache (not unbounded) ignores the reserve
      const windowed = reservingKv(500, () => appendKv(null, rows(62, 100), rows(63, 100)));
      assert.equal(cap(windowed), 200);
      // a reserve below the rows already there is ignored: the store doubles
      const small = reservingKv(50, () => appendKv(null, rows(64, 100), rows(65, 100), { unbounded: true }));
      assert.equal(cap(small), 200);
    });
  });

  test('older views keep their values: a branch from an old view copies instead of overwriting', () => {
    tidy(() => {
      const base = appendKv(null, rows(1, 5), rows(2, 5));
      const a = appendKv(base, rows(3, 2), rows(4, 2)); // in place: base ends at the frontier
      assert.equal(a.k, base.k);
      const b = appendKv(base, rows(5, 3), rows(6, 3)); // base no longer ends at the frontier
      assert.notEqual(b.k, base.k);
      same(kvRows(base).k, rows(1, 5), 'base after two branches');
      same(kvRows(a).k, concat([rows(1, 5), rows(3, 2)], 2), 'branch a');
      same(kvRows(b).v, concat([rows(2, 5), rows(6, 3)], 2), 'branch b');
    });
  });

  test('dropOldestRows keeps the newest rows without copying; appends continue after them', () => {
    tidy(() => {
      let s = appendKv(null, rows(1, 6), rows(2, 6));
      s = dropOldestRows(s, 4);
      assert.deepEqual([s.first, s.count], [2, 4]);
      assert.deepEqual(dropOldestRows(s, 10), s);
      s = appendKv(s, rows(3, 1), rows(4, 1));
      same(kvRows(s).k, concat([slice(rows(1, 6), [0, 0, 2]), rows(3, 1)], 2), 'k after drop and append');
    });
  });

  test('under grad, appending is a differentiable concat (no shared storage)', () => {
    tidy(() => {
      const k0 = rows(1, 3);
      const w = rows(9, 5);
      const f = (k: Tensor) => {
        const s = appendKv(appendKv(null, k, k), rows(2, 2), rows(3, 2));
        assert.deepEqual(s.k.shape, [1, 2, 5, 4], 'exactly the rows: no spare capacity under a transform');
        return sum(mul(kvRows(s).k, w));
      };
      same(grad(f)(k0) as Tensor, slice(w, [0, 0, 0], [1, 2, 3, 4]), 'gradient reaches the appended rows');
    });
  });

  test('under grad with an untracked cache: the new rows go in place and gradients reach them through `fresh`', () => {
    tidy(() => {
      const cache = appendKv(null, rows(1, 4), rows(2, 4));
      const f = (k: Tensor) => {
        const s = appendKv(cache, k, mul(k, 2));
        assert.equal(s.k, cache.k, 'written into the cache\'s storage, not copied');
        assert.ok(s.fresh && s.fresh.k === k, 'the tracked rows ride along');
        same(kvRows(s).k, concat([rows(1, 4), stopGradient(k)], 2), 'stored values');
        // a view of the result leaves `fresh` behind with the rows it may no longer name
        assert.ok(!('fresh' in dropOldestRows(s, 3)));
        // untracked rows onto it: in place too, nothing rides along
        const u = appendKv(s, rows(7, 1), rows(8, 1));
        assert.ok(u.k === cache.k && !('fresh' in u), 'untracked rows in place');
        return sum(s.fresh.v);
      };
      assert.ok((grad(f)(rows(3, 2)) as Tensor).toArray().every((x) => x === 2), 'd sum(2k) / dk');
      // inside an outer transform (training's checkpointed mini-batches) it stays the concat
      const nested = (s: Tensor) => grad((k: Tensor) => {
        const a = appendKv(cache, k, k);
        assert.ok(!('fresh' in a) && a.k !== cache.k, 'a concat under two transforms');
        return sum(mul(kvRows(a).k, s));
      })(rows(3, 2)) as Tensor;
      assert.equal(sum(grad((s: Tensor) => sum(nested(s)))(rows(5, 6)) as Tensor).toArray().length, 1);
    });
  });

  test('errors: mismatched shapes and dtypes', () => {
    tidy(() => {
      assert.throws(() => appendKv(null, rows(1, 2), rows(2, 3)), /same shape/);
      const s = appendKv(null, rows(1, 2), rows(2, 2));
      assert.throws(() => appendKv(s, rows(1, 2, [1, 3]), rows(2, 2, [1, 3])), /do not match the cache's storage/);
    });
  });
});

describe('attention over rows of a store (keyRows)', () => {
  // rows [first, first + count) of a store of `cap` rows whose other rows are NaN
  const CASES = [
    { name: 'chunk after a cache, window', lead: [2], kvLead: [2], tq: 5, count: 12, first: 3, cap: 20, opts: { qStart: 20, kStart: 12, window: 6 } },
    { name: 'causal, one query', lead: [1, 3], kvLead: [1, 3], tq: 1, count: 9, first: 0, cap: 16, opts: { qStart: 8, kStart: 0 } },
    { name: 'grouped-query, 4 heads over 2', lead: [1, 4], kvLead: [1, 2], tq: 4, count: 7, first: 5, cap: 13, opts: { qStart: 10, kStart: 7 } },
  ];
  const dtypes: DType[] = getBackend().name === 'cuda' ? ['float32', 'bfloat16'] : ['float64', 'float32'];

  for (const cs of CASES) {
    test(`${cs.name}: equals attention over the rows alone, bit for bit (fused and composite)`, () => {
      for (const dtype of dtypes) {
        tidy(() => {
          const d = 8;
          const n = cs.kvLead.reduce((a, b) => a * b, 1);
          const store = (seed: number) => {
            const vals = seededValues(seed, n * cs.cap * d, -1, 1);
            for (let h = 0; h < n; h++) {
              for (let r = 0; r < cs.cap; r++) if (r < cs.first || r >= cs.first + cs.count) vals.fill(NaN, (h * cs.cap + r) * d, (h * cs.cap + r + 1) * d);
            }
            return tensor(vals, [...cs.kvLead, cs.cap, d], dtype);
          };
          const q = rn(7, [...cs.lead, cs.tq, d], dtype);
          const [ks, vs] = [store(1), store(2)];
          const view = kvRows({ k: ks, v: vs, first: cs.first, count: cs.count });
          const keyRows = { first: cs.first, count: cs.count };
          same(scaledDotAttention(q, ks, vs, { ...cs.opts, keyRows }), scaledDotAttention(q, view.k, view.v, cs.opts), `${dtype} fused`);
          same(compositeAttention(q, ks, vs, { ...cs.opts, keyRows }), compositeAttention(q, view.k, view.v, cs.opts), `${dtype} composite`);
          // differentiated: through a copy of the rows, the same gradient as the rows alone
          const gq = (k: Tensor, v: Tensor, kr?: typeof keyRows) => grad((x: Tensor) => sum(scaledDotAttention(x, k, v, { ...cs.opts, keyRows: kr })))(q) as Tensor;
          same(gq(ks, vs, keyRows), gq(view.k, view.v), `${dtype} dq`);
        });
      }
    });
  }

  test('the TTT inner step\'s case: attention over an untracked cache plus tracked new rows (fresh) equals attention over their concat; dK, dV of the new rows only', () => {
    const d = 8;
    const tol: Record<string, number> = { float64: 1e-12, float32: 2e-5, bfloat16: 3e-2 };
    for (const dtype of dtypes) {
      tidy(() => {
        // grouped-query: 4 query heads over 2 key/value heads; 10 cached rows (3 of them dropped by the window), 6 new
        const cached = () => dropOldestRows(appendKv(null, rn(1, [1, 2, 13, d], dtype), rn(2, [1, 2, 13, d], dtype)), 10);
        const q = rn(3, [1, 4, 6, d], dtype);
        const k = rn(4, [1, 2, 6, d], dtype);
        const v = rn(5, [1, 2, 6, d], dtype);
        const w = rn(6, [1, 4, 6, d], dtype);
        const opts = { qStart: 13, kStart: 3, window: 9 };
        const viaStore = (attend: typeof scaledDotAttention) => (a: Tensor, b: Tensor, c: Tensor) => {
          const s = appendKv(cached(), b, c);
          return sum(mul(attend(a, s.k, s.v, { ...opts, keyRows: s }), w));
        };
        const viaConcat = (a: Tensor, b: Tensor, c: Tensor) => {
          const held = kvRows(cached());
          return sum(mul(scaledDotAttention(a, concat([held.k, b], 2), concat([held.v, c], 2), opts), w));
        };
        const spied: (number | undefined)[] = [];
        const be = getBackend();
        const original = be.attentionBackward.bind(be);
        be.attentionBackward = (...args: Parameters<typeof original>) => {
          spied.push(args[6].gradKeysFrom);
          return original(...args);
        };
        let fused: Tensor[];
        try {
          fused = grad(viaStore(scaledDotAttention), [0, 1, 2])(q, k, v) as Tensor[];
        } finally {
          be.attentionBackward = original;
        }
        assert.deepEqual(spied, [10], 'one backward, dK and dV from key row 10 (the first new row)');
        const want = grad(viaConcat, [0, 1, 2])(q, k, v) as Tensor[];
        const composite = grad(viaStore(compositeAttention), [0, 1, 2])(q, k, v) as Tensor[];
        for (const [name, got] of [['fused', fused], ['composite', composite]] as const) {
          got.forEach((g, i) => {
            assert.deepEqual(g.shape, want[i].shape);
            const x = g.toArray();
            const y = want[i].toArray();
            const scale = Math.max(...y.map(Math.abs));
            const e = Math.max(...x.map((a, j) => Math.abs(a - y[j]))) / scale;
            assert.ok(e <= tol[dtype], `${dtype} ${name}: gradient ${'qkv'[i]} error ${e}`);
          });
        }
        if (dtype === 'float64') {
          // second order goes through the composite, with the cache still constant
          const hv = (f: (a: Tensor, b: Tensor, c: Tensor) => Tensor) => grad((b: Tensor) => sum(mul(grad((a: Tensor) => f(a, b, v))(q) as Tensor, q)))(k) as Tensor;
          const [got, want] = [hv(viaStore(scaledDotAttention)).toArray(), hv(viaConcat).toArray()];
          const scale = Math.max(1, ...want.map(Math.abs));
          const e = Math.max(...got.map((a, j) => Math.abs(a - want[j]) / scale));
          assert.ok(e < 1e-10, `second order ${e}`);
        }
      });
    }
  });

  test('keyRows outside the store throws, naming the rows and the shape', () => {
    tidy(() => {
      const q = rows(1, 2);
      const k = rows(2, 6);
      assert.throws(() => scaledDotAttention(q, k, k, { qStart: 5, kStart: 0, keyRows: { first: 3, count: 4 } }), /keyRows 3\+4 do not fit in the 6 rows of k \[1,2,6,4\]/);
      assert.throws(() => compositeAttention(q, k, k, { qStart: 5, kStart: 0, keyRows: { first: -1, count: 2 } }), /keyRows -1\+2/);
    });
  });
});
