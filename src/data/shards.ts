/**
 * Token shards: a directory with train.bin / val.bin / test.bin (the documents' tokens back to back, no separators,
 * little-endian uint16 when the vocabulary fits, else uint32), optional <split>.mask.bin (one uint8 per token:
 * synthetic fact positions), and manifest.json (format version, tokenizer, per-split token counts, document
 * boundaries, sha256 of every file, and the source's provenance). The manifest is written last, so an interrupted
 * build never looks complete. Documents are assigned whole to one split, by a seeded shuffle of their ids.
 */
import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync, renameSync, statSync, writeFileSync } from 'node:fs';
import { endianness } from 'node:os';
import { join } from 'node:path';
import { z } from 'zod';
import { type Corpus, type CorpusDocument, type LoadCorpusOptions, type SourceInfo, loadCorpus } from './corpora.js';
import { hash32 } from './rng.js';
import type { SyntheticOptions } from './synthetic.js';
import { type Tokenizer, makeTokenizer, tokenByteLengths } from './tokenizer.js';

export const SHARD_FORMAT = 'ttt-e2e-shards';
export const SHARD_VERSION = 1;
export const SPLITS = ['train', 'val', 'test'] as const;
export type Split = (typeof SPLITS)[number];

/** One line, so a CLI can print it as is. */
export class DataError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'DataError';
  }
}

const sha256Hex = z.string().regex(/^[0-9a-f]{64}$/, 'expected a hex sha256');
const fileEntry = z.object({ file: z.string().regex(/^[\w.-]+$/, 'expected a plain file name'), sha256: sha256Hex, bytes: z.number().int().nonnegative() });
const documentEntry = z.object({ id: z.string().min(1), title: z.string(), start: z.number().int().nonnegative(), length: z.number().int().nonnegative() });
const splitEntry = z.object({
  tokens: z.number().int().nonnegative(),
  data: fileEntry,
  mask: fileEntry.optional(),
  documents: z.array(documentEntry),
});
export const manifestSchema = z.object({
  format: z.literal(SHARD_FORMAT),
  version: z.literal(SHARD_VERSION),
  tokenizer: z.object({ name: z.enum(['byte', 'gpt2']), vocabSize: z.number().int().positive(), bos: z.number().int().nonnegative() }),
  dtype: z.enum(['uint16', 'uint32']),
  endianness: z.literal('little'),
  source: z.object({
    name: z.string(),
    title: z.string(),
    provenance: z.string(),
    license: z.string(),
    install: z.string().optional(),
    files: z.array(z.string()).optional(),
    options: z.record(z.unknown()).optional(),
  }),
  seed: z.number().int(),
  valFraction: z.number().min(0).max(1),
  testFraction: z.number().min(0).max(1),
  createdAt: z.string(),
  splits: z.object({ train: splitEntry, val: splitEntry, test: splitEntry }),
});
export type Manifest = z.infer<typeof manifestSchema>;
export type ShardDocument = z.infer<typeof documentEntry>;

export interface PrepareDataOptions {
  /** 'synthetic', 'kjv', 'web' or 'text:<path>'. */
  source: string;
  /** Output directory (created; existing shard files in it are replaced). */
  out: string;
  tokenizer: 'byte' | 'gpt2' | Tokenizer;
  valFraction?: number;
  testFraction?: number;
  /** Seeds the split assignment (and the synthetic corpus, unless `synthetic.seed` is given). */
  seed?: number;
  /** Keep only the first N documents of the source (in source order), e.g. for quick tests. */
  maxDocuments?: number;
  synthetic?: SyntheticOptions;
  /** Options of the installed-corpus readers (paths), mainly for tests. */
  corpus?: Omit<LoadCorpusOptions, 'synthetic'>;
  /** Documents already in memory instead of `source` (source is then only a label). */
  corpusOverride?: Corpus;
}

/**
 * Assigns each document to a split. Documents are ranked by a seeded hash of their id (so the assignment depends on
 * the seed and the ids, not on the source's order or on which other documents exist), then the first go to test,
 * the next to val, the rest to train. A non-zero fraction gets at least one document when there are three or more,
 * and train always keeps at least one.
 */
export function assignSplits(ids: readonly string[], valFraction: number, testFraction: number, seed: number): Split[] {
  const n = ids.length;
  const key = ids.map((id) => hash32('split', seed, id));
  const order = ids.map((_, i) => i).sort((a, b) => key[a] - key[b] || a - b);
  const count = (f: number) => (f <= 0 ? 0 : Math.max(n >= 3 ? 1 : 0, Math.round(f * n)));
  const nTest = Math.min(count(testFraction), Math.max(0, n - 1));
  const nVal = Math.min(count(valFraction), Math.max(0, n - 1 - nTest));
  const out = new Array<Split>(n).fill('train');
  order.forEach((doc, rank) => {
    if (rank < nTest) out[doc] = 'test';
    else if (rank < nTest + nVal) out[doc] = 'val';
  });
  return out;
}

function sha256(buf: Uint8Array): string {
  return createHash('sha256').update(buf).digest('hex');
}

function writeAtomic(path: string, data: Uint8Array | string): void {
  const tmp = `${path}.tmp-${process.pid}`;
  writeFileSync(tmp, data);
  renameSync(tmp, path);
}

function tokensToBytes(tokens: readonly number[] | Uint32Array, dtype: 'uint16' | 'uint32'): Uint8Array {
  const size = dtype === 'uint16' ? 2 : 4;
  const buf = Buffer.alloc(tokens.length * size);
  if (dtype === 'uint16') for (let i = 0; i < tokens.length; i++) buf.writeUInt16LE(tokens[i], i * 2);
  else for (let i = 0; i < tokens.length; i++) buf.writeUInt32LE(tokens[i], i * 4);
  return buf;
}

function tokenMask(tok: Tokenizer, ids: number[], doc: CorpusDocument): Uint8Array {
  const mask = doc.factMask!;
  const lengths = tokenByteLengths(tok, ids, mask.length);
  if (!lengths) throw new DataError(`document ${doc.id}: its fact mask cannot be carried over to ${tok.name} tokens (tokens split characters); use the byte tokenizer`);
  const out = new Uint8Array(ids.length);
  let b = 0;
  for (let i = 0; i < ids.length; i++) {
    for (let k = 0; k < lengths[i]; k++) if (mask[b + k]) out[i] = 1;
    b += lengths[i];
  }
  return out;
}

/** Reads a source, tokenizes it, and writes the shard directory. Returns the manifest it wrote. */
export function prepareData(opts: PrepareDataOptions): Manifest {
  const tok = typeof opts.tokenizer === 'string' ? makeTokenizer(opts.tokenizer) : opts.tokenizer;
  const seed = opts.seed ?? 0;
  const valFraction = opts.valFraction ?? 0.05;
  const testFraction = opts.testFraction ?? 0.05;
  if (!(valFraction >= 0 && testFraction >= 0 && valFraction + testFraction < 1)) {
    throw new DataError(`valFraction (${valFraction}) and testFraction (${testFraction}) must be >= 0 and sum to less than 1`);
  }
  const synthetic = { seed, ...opts.synthetic };
  const corpus = opts.corpusOverride ?? loadCorpus(opts.source, { ...opts.corpus, synthetic });
  let docs = corpus.documents;
  if (opts.maxDocuments !== undefined) docs = docs.slice(0, opts.maxDocuments);
  if (docs.length === 0) throw new DataError(`source ${opts.source} has no documents`);
  const seen = new Set<string>();
  for (const d of docs) {
    if (seen.has(d.id)) throw new DataError(`source ${opts.source}: duplicate document id ${d.id}`);
    seen.add(d.id);
  }

  const assignment = assignSplits(docs.map((d) => d.id), valFraction, testFraction, seed);
  const dtype = tok.vocabSize <= 65536 ? 'uint16' : 'uint32';
  const hasMask = docs.some((d) => d.factMask);
  mkdirSync(opts.out, { recursive: true });

  const splits = {} as Manifest['splits'];
  for (const split of SPLITS) {
    const tokens: number[] = [];
    const masks: Uint8Array[] = [];
    const documents: ShardDocument[] = [];
    docs.forEach((doc, i) => {
      if (assignment[i] !== split) return;
      const ids = tok.encode(doc.text);
      documents.push({ id: doc.id, title: doc.title, start: tokens.length, length: ids.length });
      for (const t of ids) tokens.push(t);
      if (hasMask) masks.push(doc.factMask ? tokenMask(tok, ids, doc) : new Uint8Array(ids.length));
    });
    const data = tokensToBytes(tokens, dtype);
    const file = `${split}.bin`;
    writeAtomic(join(opts.out, file), data);
    const entry: Manifest['splits'][Split] = { tokens: tokens.length, data: { file, sha256: sha256(data), bytes: data.length }, documents };
    if (hasMask) {
      const m = Buffer.concat(masks);
      const mfile = `${split}.mask.bin`;
      writeAtomic(join(opts.out, mfile), m);
      entry.mask = { file: mfile, sha256: sha256(m), bytes: m.length };
    }
    splits[split] = entry;
  }

  const info: SourceInfo = corpus.info;
  const sourceOptions: Record<string, unknown> = {};
  if (opts.maxDocuments !== undefined) sourceOptions.maxDocuments = opts.maxDocuments;
  if (opts.source === 'synthetic') sourceOptions.synthetic = synthetic;
  const manifest: Manifest = {
    format: SHARD_FORMAT,
    version: SHARD_VERSION,
    tokenizer: { name: tok.name, vocabSize: tok.vocabSize, bos: tok.bos },
    dtype,
    endianness: 'little',
    source: { ...info, options: sourceOptions },
    seed,
    valFraction,
    testFraction,
    createdAt: new Date().toISOString(),
    splits,
  };
  writeAtomic(join(opts.out, 'manifest.json'), JSON.stringify(manifest, null, 1) + '\n');
  return manifest;
}

export interface ShardSplit {
  split: Split;
  tokens: Uint16Array | Uint32Array;
  documents: ShardDocument[];
  /** Fact mask per token (synthetic corpus), when the shards have one. */
  factMask?: Uint8Array;
}

export interface Shards {
  dir: string;
  manifest: Manifest;
  tokenizer: Tokenizer;
  splits: Record<Split, ShardSplit>;
}

function readChecked(dir: string, entry: z.infer<typeof fileEntry>): Buffer {
  const path = join(dir, entry.file);
  if (!existsSync(path)) throw new DataError(`data file missing: ${path} (listed in ${join(dir, 'manifest.json')}; rebuild the shards)`);
  const buf = readFileSync(path);
  if (buf.length !== entry.bytes) throw new DataError(`data file has the wrong size: ${path} is ${buf.length} bytes, the manifest says ${entry.bytes} (rebuild the shards)`);
  const got = sha256(buf);
  if (got !== entry.sha256) throw new DataError(`checksum mismatch: ${path} has sha256 ${got.slice(0, 16)}…, the manifest says ${entry.sha256.slice(0, 16)}… (file corrupt or changed; rebuild the shards)`);
  return buf;
}

function toTokens(buf: Buffer, dtype: 'uint16' | 'uint32'): Uint16Array | Uint32Array {
  const size = dtype === 'uint16' ? 2 : 4;
  const n = buf.length / size;
  // A typed-array view needs an aligned offset and host order little-endian; otherwise decode element by element.
  if (endianness() === 'LE' && buf.byteOffset % size === 0) {
    return dtype === 'uint16' ? new Uint16Array(buf.buffer, buf.byteOffset, n) : new Uint32Array(buf.buffer, buf.byteOffset, n);
  }
  const out = dtype === 'uint16' ? new Uint16Array(n) : new Uint32Array(n);
  for (let i = 0; i < n; i++) out[i] = dtype === 'uint16' ? buf.readUInt16LE(i * 2) : buf.readUInt32LE(i * 4);
  return out;
}

/** Loads and validates a shard directory; every failure is a `DataError` with a one-line message. */
export function loadShards(dir: string): Shards {
  if (!existsSync(dir) || !statSync(dir).isDirectory()) throw new DataError(`data directory not found: ${dir} (build it first with prepareData)`);
  const mpath = join(dir, 'manifest.json');
  if (!existsSync(mpath)) throw new DataError(`data file missing: ${mpath} (not a shard directory, or an interrupted build; rebuild the shards)`);
  let raw: unknown;
  try {
    raw = JSON.parse(readFileSync(mpath, 'utf8'));
  } catch (e) {
    throw new DataError(`malformed manifest ${mpath}: not JSON (${(e as Error).message.split('\n')[0]})`);
  }
  const parsed = manifestSchema.safeParse(raw);
  if (!parsed.success) {
    const issue = parsed.error.issues[0];
    const more = parsed.error.issues.length > 1 ? ` (+${parsed.error.issues.length - 1} more)` : '';
    throw new DataError(`malformed manifest ${mpath}: ${issue.path.join('.') || '(root)'}: ${issue.message}${more}`);
  }
  const manifest = parsed.data;
  const tokenizer = makeTokenizer(manifest.tokenizer.name);
  if (tokenizer.vocabSize !== manifest.tokenizer.vocabSize || tokenizer.bos !== manifest.tokenizer.bos) {
    throw new DataError(`malformed manifest ${mpath}: tokenizer ${manifest.tokenizer.name} has vocabSize ${tokenizer.vocabSize} and bos ${tokenizer.bos}, the manifest says ${manifest.tokenizer.vocabSize} and ${manifest.tokenizer.bos}`);
  }
  const size = manifest.dtype === 'uint16' ? 2 : 4;
  const splits = {} as Record<Split, ShardSplit>;
  const ids = new Set<string>();
  for (const split of SPLITS) {
    const e = manifest.splits[split];
    const bad = (what: string) => new DataError(`malformed manifest ${mpath}: splits.${split}: ${what}`);
    if (e.data.bytes !== e.tokens * size) throw bad(`${e.tokens} tokens of ${manifest.dtype} need ${e.tokens * size} bytes, data.bytes says ${e.data.bytes}`);
    let at = 0;
    for (const d of e.documents) {
      if (d.start !== at) throw bad(`document ${d.id} starts at ${d.start}, expected ${at} (documents must tile the split)`);
      if (ids.has(d.id)) throw bad(`document ${d.id} appears twice`);
      ids.add(d.id);
      at += d.length;
    }
    if (at !== e.tokens) throw bad(`documents cover ${at} tokens, the split has ${e.tokens}`);
    const tokens = toTokens(readChecked(dir, e.data), manifest.dtype);
    for (let i = 0; i < tokens.length; i++) {
      if (tokens[i] >= tokenizer.vocabSize) throw new DataError(`token id ${tokens[i]} at ${split}[${i}] is outside the vocabulary (${tokenizer.vocabSize}) of ${tokenizer.name}`);
    }
    const s: ShardSplit = { split, tokens, documents: e.documents };
    if (e.mask) {
      if (e.mask.bytes !== e.tokens) throw bad(`mask has ${e.mask.bytes} bytes for ${e.tokens} tokens`);
      const m = readChecked(dir, e.mask);
      s.factMask = new Uint8Array(m.buffer, m.byteOffset, m.length);
    }
    splits[split] = s;
  }
  return { dir, manifest, tokenizer, splits };
}
