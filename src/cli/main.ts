#!/usr/bin/env node
/**
 * The `ttt` command line. Each command's work lives in a module of its own; this file only parses
 * arguments (commander) and turns errors into one clear line and a non-zero exit.
 */
import { Command, InvalidArgumentError, Option } from 'commander';
import { VARIANTS } from '../model/config.js';
import { getBackend, setBackend } from '../engine/index.js';

export function positiveInt(name: string) {
  return (value: string): number => {
    const n = Number(value);
    if (!Number.isInteger(n) || n <= 0) throw new InvalidArgumentError(`${name} must be a positive integer, got '${value}'`);
    return n;
  };
}

export function integer(name: string) {
  return (value: string): number => {
    const n = Number(value);
    if (!Number.isInteger(n)) throw new InvalidArgumentError(`${name} must be an integer, got '${value}'`);
    return n;
  };
}

export function positiveNumber(name: string) {
  return (value: string): number => {
    const n = Number(value);
    if (!(n > 0) || !Number.isFinite(n)) throw new InvalidArgumentError(`${name} must be a positive number, got '${value}'`);
    return n;
  };
}

export function nonNegativeNumber(name: string) {
  return (value: string): number => {
    const n = Number(value);
    if (!(n >= 0) || !Number.isFinite(n)) throw new InvalidArgumentError(`${name} must be a number >= 0, got '${value}'`);
    return n;
  };
}

export function fraction(name: string) {
  return (value: string): number => {
    const n = Number(value);
    if (!(n >= 0 && n <= 1)) throw new InvalidArgumentError(`${name} must be between 0 and 1, got '${value}'`);
    return n;
  };
}

export function intList(name: string) {
  return (value: string): number[] => {
    const xs = value.split(',').map((v) => Number(v.trim()));
    if (xs.length === 0 || xs.some((n) => !Number.isInteger(n) || n <= 0)) throw new InvalidArgumentError(`${name} must be a comma-separated list of positive integers, got '${value}'`);
    return xs;
  };
}

/** `--set window=64 innerLr=1 firstOrder=true` → { window: 64, innerLr: 1, firstOrder: true }. */
export function parseOverrides(pairs: string[]): Record<string, unknown> {
  return Object.fromEntries(pairs.map((p) => {
    const eq = p.indexOf('=');
    if (eq <= 0) throw new Error(`--set: expected key=value, got '${p}'`);
    const v = p.slice(eq + 1);
    let value: unknown = v;
    try {
      value = JSON.parse(v);
    } catch {
      // a bare string
    }
    return [p.slice(0, eq), value];
  }));
}

export function buildCli(): Command {
  const program = new Command();
  program
    .name('ttt')
    .description('End-to-End Test-Time Training (TTT-E2E) for long context, in TypeScript')
    .option('--device <name>', 'backend: cpu (default) or cuda; env TTT_DEVICE', process.env.TTT_DEVICE ?? 'cpu')
    .hook('preAction', (cmd) => {
      setBackend(cmd.opts().device);
    });

  program
    .command('info')
    .description('print the backend in use and how its kernels run (matmul path, threads)')
    .action(() => {
      console.log(JSON.stringify(getBackend().info(), null, 2));
    });

  const data = program.command('data').description('corpora and tokenized shards');
  data
    .command('prepare')
    .description('tokenize a corpus into train/val/test shards with a manifest (documents never cross splits)')
    .requiredOption('--source <name>', "synthetic | kjv | web | text:<file-or-dir>")
    .requiredOption('--out <dir>', 'output directory, e.g. data/synthetic')
    .addOption(new Option('--tokenizer <name>', 'tokenizer').choices(['byte', 'gpt2']).default('byte'))
    .option('--val <fraction>', 'share of documents for validation', fraction('--val'), 0.05)
    .option('--test <fraction>', 'share of documents for test', fraction('--test'), 0.1)
    .option('--seed <n>', 'seed of the split (and of the synthetic corpus)', integer('--seed'), 0)
    .option('--docs <n>', 'number of documents (synthetic), or keep only the first n', positiveInt('--docs'))
    .option('--doc-length <n>', 'synthetic document length in bytes', positiveInt('--doc-length'))
    .action(async (o) => (await import('./commands.js')).dataPrepare(o));

  program
    .command('train')
    .description('train a model (TTT-E2E meta-learning, or plain next-token training for the other variants)')
    .option('--name <name>', 'run name: writes runs/<name>/')
    .option('--config <file>', 'JSON file with any of these options (flags override it)')
    .option('--model <preset>', 'tiny | mini | small | 125m | 350m | 760m | 1b')
    .addOption(new Option('--variant <v>', 'model variant').choices([...VARIANTS]))
    .option('--data <dir>', 'shard directory made by `ttt data prepare`')
    .option('--steps <n>', 'outer steps', positiveInt('--steps'))
    .option('--seq-len <n>', 'tokens per training sequence', positiveInt('--seq-len'))
    .option('--batch <n>', 'sequences per step', positiveInt('--batch'))
    .option('--grad-accum <n>', 'micro-batches per step', positiveInt('--grad-accum'))
    .option('--lr <x>', 'peak learning rate', positiveNumber('--lr'))
    .option('--eval-every <n>', 'validation loss every n steps (0 = at the end only if set)', integer('--eval-every'))
    .option('--checkpoint-every <n>', 'checkpoint every n steps', positiveInt('--checkpoint-every'))
    .option('--seed <n>', 'seed', integer('--seed'))
    .addOption(new Option('--starts <where>', 'training sequences start at document starts, or also every seq-len tokens inside long documents').choices(['documents', 'chunks']))
    .option('--runs-dir <dir>', 'where runs live', 'runs')
    .option('--set <key=value...>', 'model config overrides, e.g. --set window=64 miniBatch=16 innerLr=1')
    .option('--resume', 'continue the run from its last checkpoint (bit-exact)')
    .action(async (o) => {
      const { trainCommand } = await import('./commands.js');
      const { resume, set, ...rest } = o;
      const modelOverrides = set ? parseOverrides(set) : undefined;
      const r = await trainCommand({ ...rest, ...(modelOverrides ? { modelOverrides } : {}) }, !!resume);
      if (r.stoppedEarly) process.exitCode = 130;
    });

  program
    .command('eval')
    .description('loss vs context length and loss by token index; writes results.json, tables.txt and SVG plots')
    .requiredOption('--run <dirs...>', 'one or more run directories (compared in one table)')
    .requiredOption('--data <dir>', 'shard directory')
    .requiredOption('--context <list>', 'context lengths, e.g. 512,1024,2048', intList('--context'))
    .addOption(new Option('--split <s>', 'which split').choices(['val', 'test']).default('test'))
    .option('--docs <n>', 'at most n documents', positiveInt('--docs'))
    .option('--buckets <n>', 'token-index buckets', positiveInt('--buckets'), 8)
    .option('--out <dir>', 'output directory (default: the first run directory)')
    .action(async (o) => {
      const { evaluateRun, writeEvalOutputs } = await import('./commands.js');
      const reports = o.run.map((r: string) => evaluateRun(r, o.data, o.context, { split: o.split, maxDocs: o.docs, buckets: o.buckets }));
      console.log(await writeEvalOutputs(reports, o.out ?? o.run[0]));
    });

  program
    .command('generate')
    .description('read a prompt (test-time training as it reads), then generate, streaming text to stdout')
    .requiredOption('--run <dir>', 'run directory')
    .option('--prompt-file <file>', 'text to read first')
    .option('--memory <file>', 'continue from a saved fast-weight memory instead of (or before) the prompt')
    .option('--tokens <n>', 'tokens to generate', positiveInt('--tokens'), 200)
    .option('--temperature <x>', '0 = greedy', nonNegativeNumber('--temperature'), 0.8)
    .option('--top-k <n>', 'sample from the k most likely tokens', positiveInt('--top-k'))
    .option('--top-p <x>', 'nucleus sampling', fraction('--top-p'))
    .option('--seed <n>', 'sampling seed', integer('--seed'), 0)
    .option('--max-prompt-tokens <n>', 'refuse longer prompts', positiveInt('--max-prompt-tokens'), 1 << 20)
    .action(async (o) => (await import('./commands.js')).generate(o));

  const memory = program.command('memory').description('fast-weight memories: what a model learned from a document, saved and reloaded');
  memory
    .command('save')
    .description('read a document and save the fast weights and caches')
    .requiredOption('--run <dir>', 'run directory')
    .requiredOption('--prompt-file <file>', 'the document')
    .requiredOption('--out <file>', 'memory file (.safetensors)')
    .action(async (o) => (await import('./commands.js')).memorySave(o));
  memory
    .command('load')
    .description('load a memory into the model of a run (refused if made by another model) and print what it holds')
    .requiredOption('--run <dir>', 'run directory')
    .requiredOption('--memory <file>', 'memory file')
    .action(async (o) => (await import('./commands.js')).memoryInfo(o));

  program
    .command('demo')
    .description('the main job: train TTT-E2E, TTT-naive, SWA and full attention on long synthetic documents and compare them')
    .option('--minutes <x>', 'rough total training budget on this machine', positiveNumber('--minutes'), 8)
    .option('--steps <n>', 'outer steps per model (overrides --minutes)', positiveInt('--steps'))
    .option('--variants <list>', 'models to train', 'e2e,naive,swa,full')
    .addOption(new Option('--corpus <name>', 'synthetic (built in code) or real text installed here (kjv: apt-get install bible-kjv; web: apt-get install sword-text-web)').choices(['synthetic', 'kjv', 'web']).default('synthetic'))
    .option('--out <dir>', 'where the runs and results go', 'runs/demo')
    .option('--seed <n>', 'seed', integer('--seed'), 0)
    .option('--fresh', 'delete earlier demo runs in --out first')
    .action(async (o) => (await import('../experiments/demo.js')).runDemo(o));

  const experiment = program.command('experiment').description("the paper's experiments, scaled to this machine");
  experiment
    .command('toy')
    .description('attention-free toy (SPEC 6.7): TTT-E2E vs TTT-naive vs a context-aware oracle on per-sequence random rules')
    .option('--steps <n>', 'outer training steps per model', positiveInt('--steps'))
    .option('--seed <n>', 'random seed', integer('--seed'), 0)
    .option('--json <path>', 'also write the results as JSON')
    .action(async (opts) => {
      const { runToyCli } = await import('../experiments/toy.js');
      await runToyCli(opts);
    });

  return program;
}

const isMain = import.meta.url === `file://${process.argv[1]}` || process.argv[1]?.endsWith('/ttt');
if (isMain) {
  buildCli()
    .parseAsync(process.argv)
    .catch((e: Error) => {
      console.error(`ttt: ${e.message}`);
      process.exit(1);
    });
}
