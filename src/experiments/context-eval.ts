/**
 * Loss vs context length and loss by token index (SPEC §6.1-6.2): every model reads the same
 * documents, truncated to each context length, through the same per-mini-batch path (the inner loop
 * updates TTT models as they read; plain models just read).
 */
import { tensor, tidy } from '../engine/index.js';
import type { ModelConfig } from '../model/config.js';
import type { Params } from '../model/transformer.js';
import { innerLoop } from '../model/ttt-e2e.js';

/** A document to read: inputs[i] predicts targets[i] (inputs start with BOS), optional mask of predictable positions. */
export interface EvalDoc {
  inputs: ArrayLike<number>;
  targets: ArrayLike<number>;
  factMask?: ArrayLike<number>;
}

export interface ContextResult {
  context: number;
  documents: number;
  /** Mean NLL over all positions of all documents at this context length (nats/token). */
  loss: number;
  /** Mean NLL over the positions the documents mark as predictable from earlier context, if any. */
  factLoss?: number;
  /** Mean NLL by position bucket: [start, end) and loss (and factLoss). */
  byIndex: { start: number; end: number; loss: number; factLoss?: number }[];
}

/**
 * Per-position NLL of `docs` truncated to `context` tokens, read in batches of `batch` documents
 * (each with its own fast weights).
 */
export function tokenNllAt(c: ModelConfig, params: Params, docs: EvalDoc[], context: number, batch = 4): number[][] {
  const out: number[][] = [];
  const cut = (a: ArrayLike<number>) => Array.from(a).slice(0, context);
  for (let i = 0; i < docs.length; i += batch) {
    const group = docs.slice(i, i + batch);
    const nll = tidy(() => {
      const toks = tensor(group.flatMap((d) => cut(d.inputs)), [group.length, context], 'int32');
      const tgts = tensor(group.flatMap((d) => cut(d.targets)), [group.length, context], 'int32');
      return innerLoop(c, params, toks, tgts, { finalUpdate: false }).tokenNll.toArray();
    });
    group.forEach((_, j) => out.push(nll.slice(j * context, (j + 1) * context)));
  }
  return out;
}

export function evaluateContexts(
  c: ModelConfig, params: Params, docs: EvalDoc[], contexts: number[],
  opts: { buckets?: number; batch?: number; onProgress?: (msg: string) => void } = {},
): ContextResult[] {
  const buckets = opts.buckets ?? 8;
  return contexts.map((context) => {
    const usable = docs.filter((d) => d.inputs.length >= context);
    if (usable.length === 0) throw new Error(`no evaluation document has ${context} tokens (longest: ${Math.max(0, ...docs.map((d) => d.inputs.length))})`);
    opts.onProgress?.(`context ${context}: ${usable.length} documents`);
    const nll = tokenNllAt(c, params, usable, context, opts.batch);
    const hasFacts = usable.every((d) => d.factMask);
    const mean = (lo: number, hi: number, facts: boolean) => {
      let s = 0;
      let n = 0;
      nll.forEach((r, j) => {
        for (let t = lo; t < hi; t++) {
          const w = facts ? usable[j].factMask![t] : 1;
          s += w * r[t];
          n += w;
        }
      });
      return n > 0 ? s / n : NaN;
    };
    const width = Math.ceil(context / buckets);
    const byIndex = Array.from({ length: Math.ceil(context / width) }, (_, k) => {
      const start = k * width;
      const end = Math.min(context, start + width);
      return { start, end, loss: mean(start, end, false), ...(hasFacts ? { factLoss: mean(start, end, true) } : {}) };
    });
    return {
      context, documents: usable.length, loss: mean(0, context, false),
      ...(hasFacts ? { factLoss: mean(0, context, true) } : {}), byIndex,
    };
  });
}

/** A plain-text table: one row per model, one column per context length or bucket. */
export function formatTable(title: string, header: string[], rows: { name: string; values: number[] }[]): string {
  const w = Math.max(10, ...rows.map((r) => r.name.length));
  const cols = header.map((h) => Math.max(8, h.length));
  const line = (name: string, cells: string[]) => `${name.padEnd(w)}  ${cells.map((c, i) => c.padStart(cols[i])).join('  ')}`;
  return [title, line('model', header), ...rows.map((r) => line(r.name, r.values.map((v) => (Number.isFinite(v) ? v.toFixed(3) : '-'))))].join('\n');
}
