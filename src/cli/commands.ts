/**
 * What each `ttt` command does, as functions of parsed options (main.ts only parses). Long work shows
 * a progress bar on a terminal and plain lines otherwise.
 */
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import cliProgress from 'cli-progress';
import { dispose } from '../engine/index.js';
import { type Shards, evalDocuments, loadShards, makeSampler, makeTokenizer, prepareData } from '../data/index.js';
import { type ContextResult, evaluateContexts, formatTable } from '../experiments/context-eval.js';
import { lineChartSvg } from '../experiments/plot.js';
import { Session } from '../model/session.js';
import { type Batch, type LogRecord, loadRun, parseTrainOptions, train } from '../train/trainer.js';

const log = (msg: string) => process.stderr.write(`${msg}\n`);

// ---- data ----------------------------------------------------------------------------------------

export function dataPrepare(o: { source: string; out: string; tokenizer: 'byte' | 'gpt2'; val: number; test: number; seed: number; docs?: number; docLength?: number }): void {
  const m = prepareData({
    source: o.source, out: o.out, tokenizer: o.tokenizer, valFraction: o.val, testFraction: o.test, seed: o.seed,
    ...(o.source === 'synthetic' ? { synthetic: { seed: o.seed, ...(o.docs ? { numDocs: o.docs } : {}), ...(o.docLength ? { length: o.docLength } : {}) } } : {}),
    ...(o.docs && o.source !== 'synthetic' ? { maxDocuments: o.docs } : {}),
  });
  const counts = Object.entries(m.splits).map(([k, v]) => `${k} ${(v as { documents: unknown[]; tokens: number }).documents.length} docs / ${(v as { tokens: number }).tokens} tokens`);
  console.log(`wrote ${o.out}: tokenizer ${m.tokenizer.name} (vocab ${m.tokenizer.vocabSize}); ${counts.join('; ')}`);
}

// ---- train -----------------------------------------------------------------------------------

/** Fixed validation batches: the first sequences of the val split. */
function valBatches(shards: Shards, seqLen: number, batch: number, count: number, seed: number): Batch[] {
  if (shards.splits.val.documents.length === 0) return [];
  const s = makeSampler(shards, 'val', { seqLen, seed });
  return Array.from({ length: count }, () => s.next(batch));
}

export function progressReporter(label: string, total: number): { update: (r: LogRecord) => void; stop: () => void } {
  if (process.stderr.isTTY) {
    const bar = new cliProgress.SingleBar(
      { format: `${label} [{bar}] {value}/{total} steps | loss {loss} | {tps} tok/s | ETA {eta_formatted}`, stream: process.stderr, hideCursor: true },
      cliProgress.Presets.shades_classic,
    );
    bar.start(total, 0, { loss: '-', tps: '-' });
    return {
      update: (r) => bar.update(r.step, { loss: r.loss.toFixed(3), tps: Math.round(r.tokensPerSec) }),
      stop: () => bar.stop(),
    };
  }
  const every = Math.max(1, Math.round(total / 20));
  return {
    update: (r) => {
      if (r.step % every === 0 || r.step === total || r.valLoss !== undefined) {
        const eta = (r.elapsedSec / r.step) * (total - r.step);
        log(`${label} step ${r.step}/${total} loss ${r.loss.toFixed(4)}${r.valLoss !== undefined ? ` val ${r.valLoss.toFixed(4)}` : ''} lr ${r.lr.toExponential(2)} ${Math.round(r.tokensPerSec)} tok/s eta ${Math.round(eta)}s`);
      }
    },
    stop: () => {},
  };
}

/** Ctrl-C once: stop after the current step with a checkpoint. Twice: exit now. */
function interruptFlag(): { stopped: () => boolean; release: () => void } {
  let hits = 0;
  const handler = () => {
    hits++;
    if (hits === 1) log('\ninterrupted: finishing this step and saving a checkpoint (Ctrl-C again to quit now)');
    else process.exit(130);
  };
  process.on('SIGINT', handler);
  return { stopped: () => hits > 0, release: () => process.off('SIGINT', handler) };
}

export async function trainCommand(raw: Record<string, unknown>, resume: boolean): Promise<{ runDir: string; stoppedEarly: boolean }> {
  let input = { ...raw };
  if (typeof raw.config === 'string') {
    if (!existsSync(raw.config)) throw new Error(`--config: ${raw.config} not found`);
    input = { ...JSON.parse(readFileSync(raw.config, 'utf8')), ...Object.fromEntries(Object.entries(raw).filter(([k, v]) => k !== 'config' && v !== undefined)) };
  }
  if (resume && input.name) {
    const saved = join(String(input.runsDir ?? 'runs'), String(input.name), 'config.json');
    if (!existsSync(saved)) throw new Error(`--resume: no run at ${saved}`);
    const prev = JSON.parse(readFileSync(saved, 'utf8')).train;
    input = { ...prev, ...Object.fromEntries(Object.entries(input).filter(([, v]) => v !== undefined)) };
  }
  const o = parseTrainOptions(Object.fromEntries(Object.entries(input).filter(([, v]) => v !== undefined)));
  const shards = loadShards(o.data);
  const source = makeSampler(shards, 'train', { seqLen: o.seqLen, seed: o.seed, starts: o.starts });
  const progress = progressReporter(`${o.name} (${o.variant})`, o.steps);
  const intr = interruptFlag();
  try {
    const r = await train(o, {
      source: { next: (b) => source.next(b), state: () => source.state(), restore: (s) => source.restore(s as never) },
      valBatches: valBatches(shards, o.seqLen, o.batch, o.evalBatches, o.seed),
      tokenizer: shards.tokenizer.name,
      vocabSize: shards.tokenizer.vocabSize,
    }, { resume, onStep: (rec) => progress.update(rec), shouldStop: intr.stopped });
    progress.stop();
    dispose(r.params);
    const runDir = join(o.runsDir, o.name);
    if (r.stoppedEarly) log(`stopped at step ${r.lastStep}/${o.steps}; checkpoint saved; continue with: ttt train --name ${o.name} --resume`);
    else log(`done: ${runDir} (step ${r.lastStep})`);
    return { runDir, stoppedEarly: r.stoppedEarly };
  } finally {
    progress.stop();
    intr.release();
  }
}

// ---- eval --------------------------------------------------------------------------------------

export interface EvalReport {
  run: string;
  variant: string;
  data: string;
  split: string;
  results: ContextResult[];
}

export function evaluateRun(runDir: string, dataDir: string, contexts: number[], opts: { split?: 'val' | 'test'; maxDocs?: number; buckets?: number } = {}): EvalReport {
  const { run, params } = loadRun(runDir);
  const shards = loadShards(dataDir);
  if (shards.tokenizer.name !== run.tokenizer) throw new Error(`${dataDir} uses tokenizer ${shards.tokenizer.name} but ${runDir} was trained with ${run.tokenizer}`);
  const split = opts.split ?? 'test';
  const docs = [...evalDocuments(shards.splits[split], shards.tokenizer.bos, { maxDocuments: opts.maxDocs })].filter((d) => d.inputs.length >= Math.min(...contexts));
  if (docs.length === 0) throw new Error(`no ${split} document in ${dataDir} has ${Math.min(...contexts)} tokens`);
  const results = evaluateContexts(run.model, params, docs, contexts, { buckets: opts.buckets, onProgress: (m) => log(`eval ${runDir}: ${m}`) });
  dispose(params);
  return { run: runDir, variant: run.model.variant, data: dataDir, split, results };
}

export async function writeEvalOutputs(reports: EvalReport[], outDir: string): Promise<string> {
  mkdirSync(outDir, { recursive: true });
  writeFileSync(join(outDir, 'results.json'), JSON.stringify(reports, null, 1));
  const name = (r: EvalReport) => `${r.variant} (${r.run.split('/').pop()})`;
  const contexts = reports[0].results.map((x) => x.context);
  const tables: string[] = [];
  tables.push(formatTable('mean loss (nats/token) by context length', contexts.map(String), reports.map((r) => ({ name: name(r), values: r.results.map((x) => x.loss) }))));
  if (reports.every((r) => r.results.every((x) => x.factLoss !== undefined))) {
    tables.push(formatTable('loss on the predictable (fact) tokens by context length', contexts.map(String), reports.map((r) => ({ name: name(r), values: r.results.map((x) => x.factLoss!) }))));
  }
  const last = (r: EvalReport) => r.results[r.results.length - 1];
  const buckets = last(reports[0]).byIndex;
  tables.push(formatTable(`loss by token index at context ${last(reports[0]).context}`, buckets.map((b) => `${b.start}-${b.end}`), reports.map((r) => ({ name: name(r), values: last(r).byIndex.map((b) => b.loss) }))));
  if (buckets.every((b) => b.factLoss !== undefined)) {
    tables.push(formatTable('fact-token loss by token index', buckets.map((b) => `${b.start}-${b.end}`), reports.map((r) => ({ name: name(r), values: last(r).byIndex.map((b) => b.factLoss ?? NaN) }))));
  }
  const text = tables.join('\n\n');
  writeFileSync(join(outDir, 'tables.txt'), `${text}\n`);
  writeFileSync(join(outDir, 'loss-vs-context.svg'), await lineChartSvg({
    title: 'Loss vs context length', xTitle: 'context length (tokens)', yTitle: 'mean loss (nats/token)', logX: true,
    series: reports.map((r) => ({ name: name(r), points: r.results.map((x) => [x.context, x.loss] as [number, number]) })),
  }));
  const useFacts = buckets.every((b) => b.factLoss !== undefined);
  writeFileSync(join(outDir, 'loss-by-token-index.svg'), await lineChartSvg({
    title: `Loss by token index (context ${last(reports[0]).context}${useFacts ? ', fact tokens' : ''})`, xTitle: 'token index', yTitle: 'loss (nats/token)',
    series: reports.map((r) => ({ name: name(r), points: last(r).byIndex.map((b) => [(b.start + b.end) / 2, useFacts ? b.factLoss! : b.loss] as [number, number]) })),
  }));
  return text;
}

// ---- generate and memories -------------------------------------------------------------------------

function readPrompt(path: string): string {
  if (!existsSync(path)) throw new Error(`prompt file not found: ${path}`);
  return readFileSync(path, 'utf8');
}

function sessionFor(runDir: string): { session: Session; encode: (s: string) => number[]; decode: (ids: number[]) => string; bos: number } {
  const { run, params } = loadRun(runDir);
  const tok = makeTokenizer(run.tokenizer);
  return { session: new Session(run.model, params), encode: (s) => tok.encode(s), decode: (ids) => tok.decode(ids), bos: tok.bos };
}

export interface GenerateOptions {
  run: string;
  promptFile?: string;
  memory?: string;
  tokens: number;
  temperature: number;
  topK?: number;
  topP?: number;
  seed: number;
  maxPromptTokens: number;
}

export function generate(o: GenerateOptions): void {
  const { session, encode, decode, bos } = sessionFor(o.run);
  if (o.memory) session.loadMemory(o.memory);
  const prompt = o.promptFile ? encode(readPrompt(o.promptFile)) : [];
  if (prompt.length > o.maxPromptTokens) throw new Error(`the prompt has ${prompt.length} tokens, more than --max-prompt-tokens ${o.maxPromptTokens}`);
  if (!o.promptFile && !o.memory) throw new Error('nothing to continue from: give --prompt-file or --memory');
  const start = session.tokensRead === 0 ? [bos, ...prompt] : prompt;
  const nll = session.prefill(start).filter((x) => !Number.isNaN(x));
  if (nll.length) log(`prompt: ${start.length} tokens, mean NLL ${(nll.reduce((a, b) => a + b, 0) / nll.length).toFixed(3)} nats/token`);
  // Decode token by token and print whole characters as they complete.
  let pending: number[] = [];
  session.decode(o.tokens, { temperature: o.temperature, topK: o.topK, topP: o.topP, seed: o.seed }, (t) => {
    pending.push(t);
    const text = decode(pending);
    if (!text.endsWith('\uFFFD')) {
      process.stdout.write(text);
      pending = [];
    }
  });
  if (pending.length) process.stdout.write(decode(pending));
  process.stdout.write('\n');
}

export function memorySave(o: { run: string; promptFile: string; out: string }): void {
  const { session, encode, bos } = sessionFor(o.run);
  const tokens = [bos, ...encode(readPrompt(o.promptFile))];
  session.prefill(tokens);
  session.saveMemory(o.out);
  log(`saved the memory of ${tokens.length} tokens to ${o.out} (model ${session.hash.slice(0, 12)})`);
}

export function memoryInfo(o: { run: string; memory: string }): void {
  const { session } = sessionFor(o.run);
  session.loadMemory(o.memory);
  const lp = session.nextLogProbs();
  const best = lp.indexOf(Math.max(...lp));
  console.log(JSON.stringify({ memory: o.memory, tokensRead: session.tokensRead, model: session.hash, nextTokenArgmax: best }));
}
