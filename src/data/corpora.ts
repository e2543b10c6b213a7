/**
 * Public-domain corpora that this machine's package managers install, plus the user's own text files and the
 * synthetic corpus. Nothing is downloaded at run time: a reader finds its source's installed files or throws a
 * `CorpusNotInstalledError` whose message names the install command. Provenance and licenses: docs/data.md.
 */
import { execFileSync } from 'node:child_process';
import { existsSync, readFileSync, readdirSync, statSync } from 'node:fs';
import { basename, dirname, join, relative } from 'node:path';
import { inflateSync } from 'node:zlib';
import { type SyntheticOptions, syntheticCorpus } from './synthetic.js';

export interface CorpusDocument {
  /** Unique within the corpus, stable across runs (used in manifests and to assign splits). */
  id: string;
  title: string;
  text: string;
  /** Optional per-UTF-8-byte mask of positions predictable from earlier context (synthetic corpus). */
  factMask?: Uint8Array;
}

export interface SourceInfo {
  /** The source spec that `loadCorpus` accepts: 'kjv', 'web', 'synthetic' or 'text:<path>'. */
  name: string;
  title: string;
  provenance: string;
  license: string;
  /** Command that installs the source, when it comes from a package manager. */
  install?: string;
  /** Installed files the reader uses. */
  files?: string[];
}

export interface Corpus {
  info: SourceInfo;
  documents: CorpusDocument[];
}

export class CorpusNotInstalledError extends Error {
  constructor(
    readonly source: string,
    readonly install: string,
    detail: string,
  ) {
    super(`corpus "${source}" is not installed (${detail}); install it with: ${install}`);
    this.name = 'CorpusNotInstalledError';
  }
}

export const KJV_INFO: SourceInfo = {
  name: 'kjv',
  title: 'King James Version of the Bible (1611/1769), one document per book (66 books)',
  provenance:
    'Debian package bible-kjv-text (text and concordance of the Bible Retrieval System by Chip Chapin, 1989), read through the `bible` program of Debian package bible-kjv',
  license: 'Public domain text (the KJV translation is out of copyright; Crown patent applies in the UK only). Package software: GPL-2+.',
  install: 'sudo apt-get install bible-kjv',
  files: ['/usr/bin/bible', '/usr/lib/bible.data'],
};

export const WEB_INFO: SourceInfo = {
  name: 'web',
  title: 'World English Bible with Deuterocanon (2015 edition, modern English), one document per book plus the preface',
  provenance: 'Debian package sword-text-web (CrossWire SWORD module engWEB2015eb, from https://ebible.org/web/), read directly from its zText files',
  license: 'Public domain ("World English Bible" is a trademark of eBible.org: a changed text must not carry that name). Debian packaging: GPL-2+.',
  install: 'sudo apt-get install sword-text-web',
  files: ['/usr/share/sword/modules/texts/ztext/engWEB2015eb/{ot,nt}.{bzs,bzv,bzz}'],
};

export const SYNTHETIC_INFO: SourceInfo = {
  name: 'synthetic',
  title: 'Synthetic long-context facts corpus (glossary + filler + restated facts), generated in code',
  provenance: 'src/data/synthetic.ts, deterministic in (seed, document index)',
  license: 'Generated; no third-party content',
};

// ---------------------------------------------------------------------------------------------------------------
// KJV: the `bible` program decodes its own compressed format (EC02), which is simpler to call than to re-implement.

export interface KjvOptions {
  /** Program to run (default: `bible` on PATH, then /usr/bin/bible). */
  program?: string;
  /** Data file (default: the program's own, /usr/lib/bible.data). */
  dataFile?: string;
}

export function readKjv(opts: KjvOptions = {}): Corpus {
  const install = KJV_INFO.install!;
  const dataFile = opts.dataFile ?? '/usr/lib/bible.data';
  if (!existsSync(dataFile)) throw new CorpusNotInstalledError('kjv', install, `${dataFile} not found`);
  const candidates = opts.program ? [opts.program] : ['bible', '/usr/bin/bible'];
  let out: string | null = null;
  let lastError = '';
  for (const program of candidates) {
    try {
      // -l with a huge width turns off the program's line wrapping: one verse per line.
      const where = opts.dataFile ? ['-p', dirname(dataFile), '-d', basename(dataFile)] : [];
      out = execFileSync(program, [...where, '-l1000000', 'Gen1:1-Rev22:21'], { encoding: 'latin1', maxBuffer: 256 << 20, stdio: ['ignore', 'pipe', 'pipe'] });
      break;
    } catch (e) {
      lastError = (e as NodeJS.ErrnoException).code === 'ENOENT' ? `program ${program} not found` : String((e as Error).message).split('\n')[0];
    }
  }
  if (out === null) throw new CorpusNotInstalledError('kjv', install, lastError);
  const documents = parseKjvListing(out);
  if (documents.length !== 66) throw new Error(`kjv: expected 66 books from the bible program, parsed ${documents.length}`);
  return { info: KJV_INFO, documents };
}

/** Splits the `bible` program's listing ("Genesis 1" headings, "  1 verse" lines) into one document per book. */
export function parseKjvListing(listing: string): CorpusDocument[] {
  const docs: CorpusDocument[] = [];
  let book: string | null = null;
  let parts: string[] = [];
  const flush = () => {
    if (book !== null) {
      const slug = book.toLowerCase().replace(/[^a-z0-9]+/g, '-');
      docs.push({ id: `kjv/${String(docs.length + 1).padStart(2, '0')}-${slug}`, title: book, text: `${book}\n\n${parts.join('\n').trim()}\n` });
    }
    parts = [];
  };
  for (const raw of listing.split('\n')) {
    const line = raw.trimEnd();
    if (!line) continue;
    const heading = /^(\S.*) (\d+)$/.exec(line);
    if (heading) {
      if (heading[1] !== book) {
        flush();
        book = heading[1];
      }
      parts.push(`\n${line}\n`);
      continue;
    }
    const verse = /^\s+(\d+) (.*)$/.exec(line);
    if (verse && book !== null) parts.push(`${verse[1]} ${verse[2]}`);
    else if (book !== null) parts.push(line.trim()); // continuation of a wrapped verse (not expected with -l)
  }
  flush();
  return docs;
}

// ---------------------------------------------------------------------------------------------------------------
// WEB: SWORD zText module. Per testament: .bzs = blocks (u32 offset, u32 compressed size, u32 size), .bzz = zlib
// blocks, .bzv = one entry per versification slot in canonical order (u32 block, u32 offset, u16 size). Reading
// entries in .bzv order restores verse order even where the module stores books out of order.

export interface WebOptions {
  /** Module directory (default: the Debian package's). */
  dir?: string;
}

const WEB_DIR = '/usr/share/sword/modules/texts/ztext/engWEB2015eb';

function readZTextTestament(dir: string, testament: 'ot' | 'nt'): string {
  const bzs = readFileSync(join(dir, `${testament}.bzs`));
  const bzv = readFileSync(join(dir, `${testament}.bzv`));
  const bzz = readFileSync(join(dir, `${testament}.bzz`));
  const blocks = new Map<number, Buffer>();
  const block = (i: number): Buffer => {
    let b = blocks.get(i);
    if (!b) {
      if ((i + 1) * 12 > bzs.length) throw new Error(`web: block ${i} out of range in ${testament}.bzs`);
      const off = bzs.readUInt32LE(i * 12);
      const size = bzs.readUInt32LE(i * 12 + 4);
      b = size ? inflateSync(bzz.subarray(off, off + size)) : Buffer.alloc(0);
      blocks.set(i, b);
    }
    return b;
  };
  const pieces: string[] = [];
  for (let e = 0; e + 10 <= bzv.length; e += 10) {
    const size = bzv.readUInt16LE(e + 8);
    if (size === 0) continue;
    const b = block(bzv.readUInt32LE(e));
    const off = bzv.readUInt32LE(e + 4);
    pieces.push(b.subarray(off, off + size).toString('utf8'));
  }
  return pieces.join('');
}

const ENTITIES: Record<string, string> = { amp: '&', lt: '<', gt: '>', quot: '"', apos: "'" };

/** OSIS markup of one book → plain text: footnotes dropped, titles and chapters as heading lines, paragraphs and poetry lines as line breaks. */
export function osisToText(osis: string, book: string): string {
  // A footnote sometimes stands in for the space between two words ("God<note>…</note>created"), so it leaves a
  // marker that becomes a space only where a word follows.
  let s = osis
    .replace(/<note\b[^>]*\/>/g, '')
    .replace(/<note\b[^>]*>[\s\S]*?<\/note>/g, '\u0001')
    .replace(/<title\b[^>]*>([\s\S]*?)<\/title>/g, '\n\n$1\n\n')
    .replace(/<chapter\b[^>]*\bn="(\d+)"[^>]*\bsID="[^"]*"[^>]*\/>/g, `\n\n${book} $1\n\n`)
    .replace(/<chapter\b[^>]*\bsID="[^"]*"[^>]*\bn="(\d+)"[^>]*\/>/g, `\n\n${book} $1\n\n`)
    .replace(/<div\b[^>]*type="(?:x-p|paragraph)"[^>]*\/>/g, '\n')
    .replace(/<(?:l|lb|lg|item)\b[^>]*\/?>/g, '\n')
    .replace(/<[^>]*>/g, '')
    .replace(/\u0001(?=[\p{L}\p{N}“‘(])/gu, ' ')
    .replace(/\u0001/g, '')
    .replace(/&(amp|lt|gt|quot|apos);/g, (_, e: string) => ENTITIES[e]);
  s = s
    .replace(/[ \t\r\u00a0]+/g, ' ')
    .replace(/ *\n */g, '\n')
    .replace(/\n{3,}/g, '\n\n')
    .trim();
  return s + '\n';
}

export function readWeb(opts: WebOptions = {}): Corpus {
  const dir = opts.dir ?? WEB_DIR;
  const install = WEB_INFO.install!;
  for (const t of ['ot', 'nt']) for (const ext of ['bzs', 'bzv', 'bzz']) {
    const f = join(dir, `${t}.${ext}`);
    if (!existsSync(f)) throw new CorpusNotInstalledError('web', install, `${f} not found`);
  }
  const osis = readZTextTestament(dir, 'ot') + readZTextTestament(dir, 'nt');
  // Book starts are OSIS milestone divs: <div canonical="true" osisID="Exod" sID="..." type="book"/>.
  // The back matter (a glossary of Bible words) follows Revelation and becomes its own document.
  const bookStart = /<div\b(?=[^>]*\btype="book")(?=[^>]*\bsID=)[^>]*\bosisID="([^"]+)"[^>]*\/>|<div\b(?=[^>]*\btype="glossary")[^>]*\bsID=[^>]*\/>/g;
  const starts: { at: number; osisId: string }[] = [];
  for (let m; (m = bookStart.exec(osis)); ) starts.push({ at: m.index, osisId: m[1] ?? 'glossary' });
  if (starts.length === 0) throw new Error(`web: no books found in ${dir}`);
  const documents: CorpusDocument[] = [];
  const front = osis.slice(0, starts[0].at);
  const frontTitle = /<title\b[^>]*type="main"[^>]*>([\s\S]*?)<\/title>/.exec(front)?.[1] ?? 'Preface';
  const frontText = osisToText(front, 'Preface');
  if (frontText.trim().length > 0) documents.push({ id: 'web/00-preface', title: frontTitle, text: frontText });
  starts.forEach((s, i) => {
    const chunk = osis.slice(s.at, i + 1 < starts.length ? starts[i + 1].at : osis.length);
    const name = /<milestone\b[^>]*\bn="([^"]+)"[^>]*type="x-usfm-h"/.exec(chunk)?.[1] ?? s.osisId;
    documents.push({ id: `web/${String(i + 1).padStart(2, '0')}-${s.osisId.toLowerCase()}`, title: name, text: osisToText(chunk, name) });
  });
  return { info: WEB_INFO, documents };
}

// ---------------------------------------------------------------------------------------------------------------
// The user's own text: a .txt file (one document) or a directory of .txt files (one document each, recursively).

export function readTextFiles(path: string): Corpus {
  if (!existsSync(path)) throw new Error(`text source: ${path} does not exist`);
  const files: string[] = [];
  const root = statSync(path).isDirectory() ? path : null;
  const walk = (dir: string) => {
    for (const name of readdirSync(dir).sort()) {
      const p = join(dir, name);
      if (statSync(p).isDirectory()) walk(p);
      else if (name.toLowerCase().endsWith('.txt')) files.push(p);
    }
  };
  if (root) walk(root);
  else files.push(path);
  if (files.length === 0) throw new Error(`text source: no .txt files under ${path}`);
  const documents = files.map((f) => {
    const text = readFileSync(f, 'utf8').replace(/^\ufeff/, '').replace(/\r\n?/g, '\n');
    return { id: root ? relative(root, f) : basename(f), title: basename(f).replace(/\.txt$/i, ''), text };
  });
  return {
    info: { name: `text:${path}`, title: `user text files at ${path} (${files.length} file${files.length > 1 ? 's' : ''})`, provenance: 'local files supplied by the user', license: 'as supplied by the user' },
    documents,
  };
}

// ---------------------------------------------------------------------------------------------------------------

export interface LoadCorpusOptions {
  synthetic?: SyntheticOptions;
  kjv?: KjvOptions;
  web?: WebOptions;
}

export const SOURCES = ['synthetic', 'kjv', 'web', 'text:<path>'] as const;

/** Reads a source by spec: 'synthetic', 'kjv', 'web' or 'text:<path>'. */
export function loadCorpus(source: string, opts: LoadCorpusOptions = {}): Corpus {
  if (source === 'kjv') return readKjv(opts.kjv);
  if (source === 'web') return readWeb(opts.web);
  if (source === 'synthetic') {
    const documents = syntheticCorpus(opts.synthetic).map(({ id, title, text, factMask }) => ({ id, title, text, factMask }));
    return { info: SYNTHETIC_INFO, documents };
  }
  if (source.startsWith('text:')) return readTextFiles(source.slice(5));
  throw new Error(`unknown data source "${source}" (expected one of: ${SOURCES.join(', ')})`);
}
