/** Training loop: checkpoints, bit-exact resume, logs. */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as T from '../src/index.js';
import { loadShards, makeSampler, prepareData } from '../src/data/index.js';
import { namedLeaves } from '../src/model/reference.js';
import { loadRun, parseTrainOptions, train } from '../src/train/trainer.js';

const dir = mkdtempSync(join(tmpdir(), 'ttt-train-'));
const dataDir = join(dir, 'data');
prepareData({ source: 'synthetic', out: dataDir, tokenizer: 'byte', valFraction: 0.1, testFraction: 0.1, seed: 1, synthetic: { seed: 1, numDocs: 12, length: 300 } });
const shards = loadShards(dataDir);

async function run(name: string, steps: number, variant: 'e2e' | 'swa', resume = false, stopAfter?: number, extra: Record<string, unknown> = {}) {
  const o = parseTrainOptions({
    name, variant, model: 'tiny', data: dataDir, seqLen: 32, batch: 2, steps, runsDir: join(dir, 'runs'),
    checkpointEvery: 100, evalEvery: 2, modelOverrides: { window: 16, miniBatch: 8 }, ...extra,
  });
  const sampler = makeSampler(shards, 'train', { seqLen: 32, seed: 0 });
  const val = makeSampler(shards, 'val', { seqLen: 32, seed: 0 });
  let n = 0;
  const r = await train(o, {
    source: { next: (b) => sampler.next(b), state: () => sampler.state(), restore: (s) => sampler.restore(s as never) },
    valBatches: [val.next(2)], tokenizer: 'byte', vocabSize: 256,
  }, { resume, onStep: () => n++, shouldStop: () => stopAfter !== undefined && n >= stopAfter });
  const values = [...namedLeaves(r.params)].map(([k, t]) => [k, Array.from(t.toTyped())] as const);
  T.dispose(r.params);
  return { ...r, values };
}

describe('training', () => {
  for (const variant of ['swa', 'e2e'] as const) {
    test(`${variant}: stopping and resuming gives bit-identical parameters to an uninterrupted run`, async () => {
      const straight = await run(`straight-${variant}`, 4, variant);
      const first = await run(`split-${variant}`, 4, variant, false, 2);
      assert.equal(first.stoppedEarly, true);
      assert.equal(first.lastStep, 2);
      const resumed = await run(`split-${variant}`, 4, variant, true);
      assert.equal(resumed.lastStep, 4);
      assert.deepEqual(resumed.values, straight.values);
      const log = readFileSync(join(dir, 'runs', `split-${variant}`, 'log.jsonl'), 'utf8').trim().split('\n').map((l) => JSON.parse(l));
      assert.deepEqual(log.map((r) => r.step), [1, 2, 3, 4]);
      for (const r of log) for (const k of ['loss', 'lr', 'gradNorm', 'tokensPerSec']) assert.ok(Number.isFinite(r[k]), `${k} logged`);
      assert.ok(log.some((r) => Number.isFinite(r.valLoss)), 'periodic validation loss');
    });
  }

  test('the loss goes down, and the saved run loads back', async () => {
    const r = await run('learns', 12, 'swa');
    const log = readFileSync(join(dir, 'runs', 'learns', 'log.jsonl'), 'utf8').trim().split('\n').map((l) => JSON.parse(l));
    assert.ok(log[log.length - 1].loss < log[0].loss - 0.3, `loss ${log[0].loss} → ${log[log.length - 1].loss}`);
    const loaded = loadRun(join(dir, 'runs', 'learns'));
    assert.deepEqual([...namedLeaves(loaded.params)].map(([k, t]) => [k, Array.from(t.toTyped())]), r.values);
  });

  test('gradient accumulation: 2 micro-batches of 1 sequence = 1 batch of 2', async () => {
    const whole = await run('accum-whole', 3, 'e2e', false, undefined, { batch: 2, gradAccum: 1 });
    const accum = await run('accum-micro', 3, 'e2e', false, undefined, { batch: 1, gradAccum: 2 });
    let worst = 0;
    whole.values.forEach(([, v], i) => v.forEach((x, j) => (worst = Math.max(worst, Math.abs(x - accum.values[i][1][j])))));
    // float32 sums the two sequences in another order; AdamW amplifies that rounding in near-zero coordinates.
    assert.ok(worst < 5e-5, `params differ by ${worst}`);
    const other = await run('accum-other', 3, 'e2e', false, undefined, { batch: 1, gradAccum: 1 });
    const differs = whole.values.some(([, v], i) => v.some((x, j) => Math.abs(x - other.values[i][1][j]) > 1e-4));
    assert.ok(differs, 'one micro-batch alone trains differently (the comparison can fail)');
  });

  test('clear errors: existing run without --resume, changed options on resume, corrupt checkpoint', async () => {
    await run('twice', 1, 'swa');
    await assert.rejects(() => run('twice', 1, 'swa'), /already exists/);
    await assert.rejects(() => run('twice', 2, 'e2e', true), /differ/);
    writeFileSync(join(dir, 'runs', 'twice', 'checkpoint.safetensors'), 'garbage');
    await assert.rejects(() => run('twice', 2, 'swa', true), /not a valid safetensors file/);
    assert.throws(() => parseTrainOptions({ name: 'x', variant: 'swa', data: 'd', seqLen: 0, batch: 1, steps: 1 }), /seqLen/);
    assert.throws(() => parseTrainOptions({ name: 'bad name', variant: 'swa', data: 'd', seqLen: 4, batch: 1, steps: 1 }), /name/);
  });
});
