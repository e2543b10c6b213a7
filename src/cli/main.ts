#!/usr/bin/env node
/**
 * The `ttt` command line. Each command's work lives in a module of its own; this file only parses
 * arguments (commander) and turns errors into one clear line and a non-zero exit.
 */
import { Command, InvalidArgumentError } from 'commander';
import { getBackend, setBackend } from '../engine/index.js';

export function positiveInt(name: string) {
  return (value: string): number => {
    const n = Number(value);
    if (!Number.isInteger(n) || n <= 0) throw new InvalidArgumentError(`${name} must be a positive integer, got '${value}'`);
    return n;
  };
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

  const experiment = program.command('experiment').description("the paper's experiments, scaled to this machine");
  experiment
    .command('toy')
    .description('attention-free toy (SPEC 6.7): TTT-E2E vs TTT-naive vs a context-aware oracle on per-sequence random rules')
    .option('--steps <n>', 'outer training steps per model', positiveInt('--steps'))
    .option('--seed <n>', 'random seed', (v) => Number.parseInt(v, 10), 0)
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
