/** The `ttt` command line end to end on `tiny`: every command once, and the errors a user can hit. */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = fileURLToPath(new URL('..', import.meta.url));
const cli = join(root, 'src/cli/main.ts');
const dir = mkdtempSync(join(tmpdir(), 'ttt-cli-'));
const D = join(dir, 'data');
const R = join(dir, 'runs');
const prompt = join(dir, 'prompt.txt');
writeFileSync(prompt, 'The glossary says that the zorp means kelta. Later the zorp');

function ttt(...args: string[]) {
  const r = spawnSync(process.execPath, ['--import', 'tsx', cli, ...args], { cwd: root, encoding: 'utf8', env: { ...process.env, FORCE_COLOR: '0' } });
  return { code: r.status, out: r.stdout, err: r.stderr };
}
const ok = (r: ReturnType<typeof ttt>) => assert.equal(r.code, 0, `exit ${r.code}: ${r.err}`);
/** A user error: non-zero exit and one clear line (no stack trace). */
const fails = (r: ReturnType<typeof ttt>, pattern: RegExp) => {
  assert.notEqual(r.code, 0);
  assert.match(r.err, pattern);
  assert.doesNotMatch(r.err, /\n\s+at /, `a stack trace leaked: ${r.err}`);
};
const trainArgs = (name: string, steps: number) => ['train', '--name', name, '--model', 'tiny', '--variant', 'e2e', '--data', D, '--steps', String(steps),
  '--seq-len', '32', '--batch', '2', '--runs-dir', R, '--set', 'window=16', 'miniBatch=8'];

describe('ttt CLI', () => {
  test('data prepare, train, eval, generate, memory save/load', () => {
    ok(ttt('data', 'prepare', '--source', 'synthetic', '--out', D, '--docs', '12', '--doc-length', '400'));
    assert.ok(existsSync(join(D, 'manifest.json')));
    const t = ttt(...trainArgs('t1', 5));
    ok(t);
    assert.equal(readFileSync(join(R, 't1', 'log.jsonl'), 'utf8').trim().split('\n').length, 5);
    const e = ttt('eval', '--run', join(R, 't1'), '--data', D, '--context', '32,64', '--docs', '3', '--buckets', '4');
    ok(e);
    assert.match(e.out, /loss by token index/);
    const results = JSON.parse(readFileSync(join(R, 't1', 'results.json'), 'utf8'));
    assert.deepEqual(results[0].results.map((r: { context: number }) => r.context), [32, 64]);
    assert.match(readFileSync(join(R, 't1', 'loss-vs-context.svg'), 'utf8'), /^<svg/);
    const g = ttt('generate', '--run', join(R, 't1'), '--prompt-file', prompt, '--tokens', '20', '--temperature', '0');
    ok(g);
    assert.ok(g.out.length > 0, 'generated text on stdout');
    const mem = join(dir, 'mem.safetensors');
    ok(ttt('memory', 'save', '--run', join(R, 't1'), '--prompt-file', prompt, '--out', mem));
    const l = ttt('memory', 'load', '--run', join(R, 't1'), '--memory', mem);
    ok(l);
    assert.equal(JSON.parse(l.out).tokensRead, readFileSync(prompt).length + 1);
    // generating from the memory equals generating after reading the prompt
    const fromMem = ttt('generate', '--run', join(R, 't1'), '--memory', mem, '--tokens', '20', '--temperature', '0');
    ok(fromMem);
    assert.equal(fromMem.out, g.out);
  });

  for (const variant of ['kvb-linear', 'kvb-mlp', 'mamba2', 'gated-deltanet']) {
    test(`the ${variant} baseline trains and evaluates through the CLI`, () => {
      ok(ttt('train', '--name', `b-${variant}`, '--model', 'tiny', '--variant', variant, '--data', D, '--steps', '2', '--seq-len', '32', '--batch', '2', '--runs-dir', R));
      const e = ttt('eval', '--run', join(R, `b-${variant}`), '--data', D, '--context', '32', '--docs', '2', '--buckets', '2');
      ok(e);
      assert.match(e.out, new RegExp(variant));
    });
  }

  test('errors a user can hit get one line and a non-zero exit', () => {
    fails(ttt('train', '--name', 'x', '--model', 'tiny', '--variant', 'e2e', '--data', join(dir, 'nope'), '--steps', '2', '--seq-len', '8', '--batch', '1', '--runs-dir', R), /data directory not found/);
    fails(ttt(...trainArgs('t1', 5)), /already exists/);
    fails(ttt('train', '--name', 'y', '--steps', '-1'), /--steps must be a positive integer/);
    fails(ttt('train', '--name', 'y', '--variant', 'lstm'), /variant/);
    fails(ttt('eval', '--run', join(dir, 'missing-run'), '--data', D, '--context', '32'), /not a training run/);
    fails(ttt('eval', '--run', join(R, 't1'), '--data', D, '--context', '32,abc'), /--context/);
    fails(ttt('generate', '--run', join(R, 't1'), '--prompt-file', prompt, '--max-prompt-tokens', '5'), /more than --max-prompt-tokens/);
    fails(ttt('generate', '--run', join(R, 't1'), '--prompt-file', join(dir, 'none.txt')), /prompt file not found/);
    ok(ttt(...trainArgs('other', 1).map((a) => (a === 'miniBatch=8' ? 'miniBatch=4' : a))));
    fails(ttt('memory', 'load', '--run', join(R, 'other'), '--memory', join(dir, 'mem.safetensors')), /different model/);
    writeFileSync(join(R, 'other', 'checkpoint.safetensors'), 'not a checkpoint');
    fails(ttt('generate', '--run', join(R, 'other'), '--prompt-file', prompt), /not a valid safetensors file/);
    fails(ttt('train', '--name', 't1', '--runs-dir', R, '--resume', '--lr', '0.5'), /only --steps may change/);
  });

  test('demo: a second run in the same --out resumes with the first run\'s steps (no re-calibration); --fresh starts over', () => {
    const out = join(dir, 'demo');
    ok(ttt('demo', '--steps', '2', '--variants', 'swa', '--out', out));
    const again = ttt('demo', '--variants', 'swa', '--out', out);
    ok(again);
    assert.match(again.err, /resuming the demo in .* \(2 steps per model; --fresh starts over\)/);
    assert.doesNotMatch(again.err, /calibration:/);
    assert.match(again.out, /swa/);
    assert.equal(readFileSync(join(out, 'runs', 'swa', 'log.jsonl'), 'utf8').trim().split('\n').length, 2);
    const fresh = ttt('demo', '--fresh', '--steps', '1', '--variants', 'swa', '--out', out);
    ok(fresh);
    assert.equal(readFileSync(join(out, 'runs', 'swa', 'log.jsonl'), 'utf8').trim().split('\n').length, 1);
  });

  test('Ctrl-C during training keeps a checkpoint, and --resume finishes the run', async () => {
    const child = spawn(process.execPath, ['--import', 'tsx', cli, ...trainArgs('intr', 400)], { cwd: root });
    let err = '';
    child.stderr.on('data', (d) => (err += d));
    const log = join(R, 'intr', 'log.jsonl');
    const deadline = Date.now() + 60_000;
    while (!(existsSync(log) && readFileSync(log, 'utf8').length > 0)) {
      if (Date.now() > deadline) throw new Error(`training never logged a step: ${err}`);
      await new Promise((r) => setTimeout(r, 100));
    }
    child.kill('SIGINT');
    const code = await new Promise<number | null>((r) => child.on('exit', r));
    assert.equal(code, 130, err);
    assert.match(err, /checkpoint saved/);
    const stoppedAt = readFileSync(log, 'utf8').trim().split('\n').length;
    assert.ok(stoppedAt < 400);
    const r = ttt('train', '--name', 'intr', '--runs-dir', R, '--resume', '--steps', String(stoppedAt + 2));
    ok(r);
    assert.equal(readFileSync(log, 'utf8').trim().split('\n').length, stoppedAt + 2);
  });
});
