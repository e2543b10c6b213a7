/**
 * Phase timing (`phase`, `setPhaseTiming`, `Backend.markPhase` / `phaseReport`): off, a phase only runs its
 * function; on, nested phases are named by their path, spans telescope to the time between the first and last
 * marks, a throwing phase still closes, and a TTT-E2E training step reports the method's phases. The CUDA backend's
 * events are checked over the stand-in libraries.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import * as T from '../src/index.js';
import { makeConfig } from '../src/model/config.js';
import { initParams } from '../src/model/transformer.js';
import { outerLoss } from '../src/model/ttt-e2e.js';

/** fn with phase timing on, and the backend's report of it. */
function timed<R>(fn: () => R): { result: R; report: T.PhaseTime[] } {
  const be = T.getBackend();
  be.phaseReport!();
  const before = T.setPhaseTiming(true);
  try {
    const result = fn();
    return { result, report: be.phaseReport!() };
  } finally {
    T.setPhaseTiming(before);
  }
}

describe('phase timing', () => {
  test('off: a phase runs its function and marks nothing', () => {
    const be = T.getBackend();
    be.phaseReport!();
    assert.equal(T.phase('a', () => 7), 7);
    assert.deepEqual(be.phaseReport!(), []);
  });

  test('nested phases are named by their path; the spans add up to the time between the first and last marks; a throw still closes its phase (CPU: wall-clock marks)', () => {
    const previous = T.getBackend().name;
    T.setBackend('cpu');
    try {
      nestedPhases();
    } finally {
      T.setBackend(previous);
    }
  });

  function nestedPhases(): void {
    const busy = (ms: number) => {
      const end = performance.now() + ms;
      while (performance.now() < end);
    };
    const t0 = performance.now();
    const { report } = timed(() => {
      T.phase('outer', () => {
        busy(5);
        T.phase('inner', () => busy(5));
        busy(2);
      });
      assert.throws(() => T.phase('failing', () => {
        throw new Error('boom');
      }), /boom/);
      T.phase('outer', () => busy(1));
    });
    const wall = performance.now() - t0;
    const by = new Map(report.map((r) => [r.phase, r]));
    assert.deepEqual([...by.keys()].sort(), ['(outside any phase)', 'failing', 'outer', 'outer / inner'].sort());
    assert.equal(by.get('outer')!.spans, 3, 'outer: before inner, after inner, and the second call');
    assert.ok(by.get('outer / inner')!.ms >= 4.5 && by.get('outer')!.ms >= 7.5, JSON.stringify(report));
    const total = report.reduce((s, r) => s + r.ms, 0);
    assert.ok(total <= wall + 1e-6, `the spans (${total} ms) lie within the call (${wall} ms)`);
  }

  test('a TTT-E2E training step reports the prefix, each mini-batch\'s forward and inner gradient, and the backward\'s recomputation and second order', () => {
    const c = makeConfig({ variant: 'e2e', vocabSize: 32, dModel: 16, nHeads: 2, ffnDim: 24, nLayers: 4, window: 8, miniBatch: 4 });
    const params = initParams(c, T.randomKey(0));
    const tokens = T.randint(T.randomKey(1), [1, 16], 0, 32);
    const { report } = timed(() => T.tidy(() => T.valueAndGrad((p: typeof params) => outerLoss(c, p, tokens, tokens))(params)[0].item()));
    const by = new Map(report.map((r) => [r.phase, r]));
    for (const name of ['prefix', 'mini-batch / forward', 'mini-batch / backward', 'backward', 'backward / recompute / forward', 'backward / checkpoint backward']) {
      assert.ok(by.has(name), `${name} in ${[...by.keys()]}`);
    }
    // four mini-batches of 4: each forward once, and once more in the backward's recomputation
    assert.equal(by.get('mini-batch / forward')!.spans, 4);
    assert.equal(by.get('backward / recompute / forward')!.spans, 4);
    // the last mini-batch takes no inner step (no loss depends on it): three inner gradients, in the forward and again
    assert.equal(by.get('mini-batch / backward')!.spans, 3);
  });

  test('cuda (stand-in libraries): an event per mark on the stream, none while recording; the report waits for the last, times each gap and frees them', async () => {
    const { CudaBackend } = await import('../src/backends/cuda/backend.js');
    const { standInLibraries } = await import('../src/backends/cuda/stand-in.js');
    const libs = standInLibraries();
    const be = new CudaBackend(0, libs);
    const count = (name: string) => libs.calls.counts.get(name) ?? 0;
    for (const name of ['a', 'b', 'a', 'c']) be.markPhase(name);
    be.captureWork(() => be.markPhase('while recording')).dispose();
    assert.deepEqual([count('cuEventCreate'), count('cuEventRecord')], [4, 4]);
    const report = be.phaseReport();
    assert.deepEqual([count('cuEventSynchronize'), count('cuEventElapsedTime'), count('cuEventDestroy')], [1, 3, 4]);
    // the stand-in's gaps are 0.25 ms each: a twice (a→b, a→c), b once; c's span is open
    assert.deepEqual(report, [{ phase: 'a', ms: 0.5, spans: 2 }, { phase: 'b', ms: 0.25, spans: 1 }]);
    assert.deepEqual(be.phaseReport(), [], 'the marks are cleared');
  });
});
