/**
 * A synthetic long-context corpus, built in code from a seed (nothing to download).
 *
 * Each document opens with a glossary of K made-up facts ("Velomar means drisk."), then a long body of filler
 * sentences from a small grammar over a made-up vocabulary. Every few sentences the body restates a fact chosen
 * among those not mentioned in the last `minGap` bytes ("Recall that Velomar means drisk."). The value after
 * "means" is only predictable by a model that still holds the glossary (or an earlier mention) in context or in its
 * fast weights; a model limited to a short window sees only the key and must guess among all values, so the loss gap
 * on the value bytes grows with the distance the model can reach back. `factMask` marks those value bytes (the
 * predictable part), so experiments can report loss on facts separately from the filler.
 *
 * The filler vocabulary depends on the corpus seed only (the same for every document, learnable in weights); keys
 * and values depend on (seed, document index), so documents can be generated independently and in any order.
 * Text is ASCII, so one character is one byte is one `byte` token.
 */
import { Rng, hash32 } from './rng.js';

export interface SyntheticOptions {
  /** Corpus seed. */
  seed?: number;
  /** Number of documents (for `syntheticCorpus`). */
  numDocs?: number;
  /** Document length in bytes: a number, or [min, max] drawn uniformly per document. */
  length?: number | [number, number];
  /** Facts per document (glossary size). */
  numFacts?: number;
  /** A fact is restated only if its key was not seen in the last `minGap` bytes. */
  minGap?: number;
  /** Mean number of filler sentences between restatements. */
  fillerPerFact?: number;
}

export interface SyntheticFact {
  key: string;
  value: string;
  /** Byte offsets where the value appears in the body (restatements, not the glossary). */
  mentions: number[];
  /** Byte offset of the value in the glossary. */
  glossaryAt: number;
}

export interface SyntheticDocument {
  id: string;
  title: string;
  text: string;
  /** 1 at the bytes of restated values (predictable from earlier context), else 0; same length as `text`. */
  factMask: Uint8Array;
  facts: SyntheticFact[];
}

export const SYNTHETIC_DEFAULTS = { seed: 0, numDocs: 64, length: 4096, numFacts: 12, minGap: 256, fillerPerFact: 3 } as const;

const CONSONANTS = 'bcdfghklmnprstvz';
const VOWELS = 'aeiou';

function word(r: Rng, syllables: number): string {
  let w = '';
  for (let i = 0; i < syllables; i++) {
    w += CONSONANTS[r.int(CONSONANTS.length)] + VOWELS[r.int(VOWELS.length)];
    if (r.float() < 0.35) w += CONSONANTS[r.int(CONSONANTS.length)];
  }
  return w;
}

function distinctWords(r: Rng, n: number, syllables: () => number, taken: Set<string>): string[] {
  const out: string[] = [];
  while (out.length < n) {
    const w = word(r, syllables());
    if (!taken.has(w)) {
      taken.add(w);
      out.push(w);
    }
  }
  return out;
}

interface Lexicon {
  nouns: string[];
  verbs: string[];
  adjectives: string[];
  taken: Set<string>;
}

const lexicons = new Map<number, Lexicon>();
function lexicon(seed: number): Lexicon {
  let lx = lexicons.get(seed);
  if (!lx) {
    const r = new Rng(hash32('synthetic-lexicon', seed));
    // Function words are excluded so a made-up word never reads as grammar.
    const taken = new Set<string>(['the', 'a', 'no', 'not', 'that', 'every', 'near', 'under', 'with', 'means', 'as', 'to', 'is', 'be', 'do', 'so', 'me', 'he']);
    const two = () => 1 + r.int(2);
    lx = { nouns: distinctWords(r, 24, two, taken), verbs: distinctWords(r, 12, two, taken), adjectives: distinctWords(r, 12, two, taken), taken };
    lexicons.set(seed, lx);
  }
  return lx;
}

const DETERMINERS = ['the', 'a', 'every', 'no', 'that'];
const PREPOSITIONS = ['near', 'under', 'beside', 'after', 'with'];
const LEADS = ['Recall that', 'As noted,', 'Remember that', 'Again,', 'Note that'];

function nounPhrase(r: Rng, lx: Lexicon): string {
  const det = r.pick(DETERMINERS);
  return r.float() < 0.5 ? `${det} ${r.pick(lx.adjectives)} ${r.pick(lx.nouns)}` : `${det} ${r.pick(lx.nouns)}`;
}

function fillerSentence(r: Rng, lx: Lexicon): string {
  let s = `${nounPhrase(r, lx)} ${r.pick(lx.verbs)}s ${nounPhrase(r, lx)}`;
  if (r.float() < 0.4) s += ` ${r.pick(PREPOSITIONS)} ${nounPhrase(r, lx)}`;
  return s[0].toUpperCase() + s.slice(1) + '.';
}

function docLength(r: Rng, length: number | [number, number]): number {
  if (typeof length === 'number') return length;
  const [lo, hi] = length;
  return lo + r.int(hi - lo + 1);
}

/** Document `index` of the corpus with these options: a pure function of (options, index). */
export function syntheticDocument(index: number, options: SyntheticOptions = {}): SyntheticDocument {
  const o = { ...SYNTHETIC_DEFAULTS, ...options };
  if (!(o.numFacts >= 1)) throw new Error('synthetic: numFacts must be at least 1');
  const lx = lexicon(o.seed);
  const r = new Rng(hash32('synthetic-doc', o.seed, index));
  const length = docLength(r, o.length);
  if (!(length >= 1)) throw new Error(`synthetic: document length must be positive, got ${length}`);
  const taken = new Set(lx.taken);
  const cap = (w: string) => w[0].toUpperCase() + w.slice(1);
  const keys = distinctWords(r, o.numFacts, () => 2 + r.int(2), taken).map(cap);
  const values = distinctWords(r, o.numFacts, () => 2, taken);
  const facts: SyntheticFact[] = keys.map((key, i) => ({ key, value: values[i], mentions: [], glossaryAt: 0 }));

  let text = `Document ${index}. Glossary:\n`;
  const valueSpans: [number, number][] = [];
  const lastSeen = new Array<number>(o.numFacts).fill(0);
  facts.forEach((f, i) => {
    text += `${f.key} means `;
    f.glossaryAt = text.length;
    text += `${f.value}.\n`;
    lastSeen[i] = text.length;
  });
  text += '\n';

  let sentencesInParagraph = 0;
  while (text.length < length) {
    const restate = r.float() < 1 / (o.fillerPerFact + 1);
    let sentence: string | null = null;
    if (restate) {
      const here = text.length;
      const due = facts.map((_, i) => i).filter((i) => here - lastSeen[i] >= o.minGap);
      if (due.length > 0) {
        const i = r.pick(due);
        const prefix = `${r.pick(LEADS)} ${facts[i].key} means `;
        const at = here + (sentencesInParagraph > 0 ? 1 : 0) + prefix.length;
        facts[i].mentions.push(at);
        valueSpans.push([at, at + facts[i].value.length]);
        sentence = `${prefix}${facts[i].value}.`;
        lastSeen[i] = at + facts[i].value.length;
      }
    }
    sentence ??= fillerSentence(r, lx);
    text += (sentencesInParagraph > 0 ? ' ' : '') + sentence;
    if (++sentencesInParagraph >= 4 + r.int(4)) {
      text += '\n';
      sentencesInParagraph = 0;
    }
  }
  text = text.slice(0, length);
  const factMask = new Uint8Array(length);
  for (const [a, b] of valueSpans) factMask.fill(1, Math.min(a, length), Math.min(b, length));
  for (const f of facts) f.mentions = f.mentions.filter((m) => m < length);
  return { id: `synthetic/${o.seed}/${index}`, title: `synthetic document ${index}`, text, factMask, facts };
}

/** Documents 0..numDocs-1. */
export function syntheticCorpus(options: SyntheticOptions = {}): SyntheticDocument[] {
  const n = options.numDocs ?? SYNTHETIC_DEFAULTS.numDocs;
  return Array.from({ length: n }, (_, i) => syntheticDocument(i, options));
}
