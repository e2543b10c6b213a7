/**
 * The reading-equivalence check every variant must pass: a Session's prefill of a document gives
 * the inner loop's per-token NLL, and reading it in pieces or token by token (incremental decoding
 * with the mixers' states) gives the same numbers and the same next-token distribution.
 */
import assert from 'node:assert/strict';
import * as T from '../../src/index.js';
import type { ModelConfig } from '../../src/model/config.js';
import { Session } from '../../src/model/session.js';
import type { Params } from '../../src/model/transformer.js';
import { innerLoop } from '../../src/model/ttt-e2e.js';

const maxDiff = (a: number[], b: number[]) => a.reduce((m, v, i) => Math.max(m, Math.abs(v - b[i])), 0);

/** Runs the checks; returns the session that read `doc` token by token (to continue decoding). */
export function checkReadingEquivalence(
  c: ModelConfig, params: Params, doc: number[], cutsList: number[][] = [[1, 7, 8, 13], [3, 4, 5, 6, 16], [11]], tol = 1e-9,
): Session {
  const n = doc.length - 1;
  const ref = T.tidy(() => innerLoop(c, params, T.tensor(doc.slice(0, -1), [1, n], 'int32'), T.tensor(doc.slice(1), [1, n], 'int32')).tokenNll.toArray());
  const whole = new Session(c, params);
  const nll = whole.prefill(doc);
  assert.ok(Number.isNaN(nll[0]), 'the first token has no context');
  assert.ok(maxDiff(nll.slice(1), ref) < tol, `session vs innerLoop: ${maxDiff(nll.slice(1), ref)}`);
  for (const cuts of cutsList) {
    const s = new Session(c, params);
    const pieces: number[] = [];
    let at = 0;
    for (const cut of [...cuts, doc.length]) {
      pieces.push(...s.prefill(doc.slice(at, cut)));
      at = cut;
    }
    assert.ok(maxDiff(pieces.slice(1), nll.slice(1)) < tol, `split at ${cuts}`);
    assert.ok(maxDiff(s.nextLogProbs(), whole.nextLogProbs()) < tol, `next-token distribution after split at ${cuts}`);
  }
  const single = new Session(c, params);
  const one = doc.flatMap((t) => single.prefill([t]));
  assert.ok(maxDiff(one.slice(1), nll.slice(1)) < tol, 'token-by-token read');
  return single;
}
