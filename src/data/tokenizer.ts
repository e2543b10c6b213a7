/**
 * Tokenizers. A tokenizer is identified by its name alone: the name is saved with shards and checkpoints, and
 * `makeTokenizer(name)` must rebuild exactly the same mapping, so neither tokenizer has any options.
 *
 * - `byte`: UTF-8 bytes, vocabulary 256, BOS = 0. The `tiny`/`mini` model presets have vocabSize 256, so the BOS
 *   (document separator) has to live inside the byte range; NUL never occurs in prose, so byte 0 is reserved for it
 *   and a NUL in the input text is encoded as a space (the only lossy case). `decode` drops BOS ids and replaces
 *   invalid UTF-8 (e.g. a sequence cut in the middle of a character) with U+FFFD.
 * - `gpt2`: GPT-2's byte-level BPE (r50k_base, 50257 tokens) from the `gpt-tokenizer` package, which ships the
 *   vocabulary (nothing is downloaded at run time). BOS = `<|endoftext|>` = 50256, GPT-2's document separator. The
 *   literal text "<|endoftext|>" inside a document is encoded as ordinary text, never as the special token, so a
 *   document cannot forge a boundary. `decode` drops BOS ids.
 */
import { decode as gpt2Decode, encode as gpt2Encode } from 'gpt-tokenizer/encoding/r50k_base';

export type TokenizerName = 'byte' | 'gpt2';
export const TOKENIZER_NAMES: readonly TokenizerName[] = ['byte', 'gpt2'];

export interface Tokenizer {
  /** The name to save; `makeTokenizer(name)` reproduces this tokenizer. */
  name: TokenizerName;
  vocabSize: number;
  /** Beginning-of-document id, also the separator between packed documents. Never produced by `encode`. */
  bos: number;
  encode(text: string): number[];
  /** Inverse of `encode` (BOS ids are dropped). */
  decode(ids: ArrayLike<number>): string;
}

const utf8 = new TextEncoder();

function byteTokenizer(): Tokenizer {
  const BOS = 0;
  const SPACE = 0x20;
  const decoder = new TextDecoder('utf-8', { fatal: false });
  return {
    name: 'byte',
    vocabSize: 256,
    bos: BOS,
    encode(text) {
      const bytes = utf8.encode(text);
      const ids = new Array<number>(bytes.length);
      for (let i = 0; i < bytes.length; i++) ids[i] = bytes[i] === BOS ? SPACE : bytes[i];
      return ids;
    },
    decode(ids) {
      const bytes = new Uint8Array(ids.length);
      let n = 0;
      for (let i = 0; i < ids.length; i++) {
        const t = ids[i];
        if (t === BOS) continue;
        if (!(t >= 0 && t < 256)) throw new Error(`byte tokenizer: id ${t} out of range 0..255`);
        bytes[n++] = t;
      }
      return decoder.decode(bytes.subarray(0, n));
    },
  };
}

function gpt2Tokenizer(): Tokenizer {
  const BOS = 50256;
  // An empty disallowed set makes special-token text plain text instead of an error or a forged separator.
  const plain = { disallowedSpecial: new Set<string>(), allowedSpecial: new Set<string>() };
  return {
    name: 'gpt2',
    vocabSize: 50257,
    bos: BOS,
    encode: (text) => gpt2Encode(text, plain),
    decode(ids) {
      const kept: number[] = [];
      for (let i = 0; i < ids.length; i++) {
        const t = ids[i];
        if (t === BOS) continue;
        if (!(t >= 0 && t < 50257)) throw new Error(`gpt2 tokenizer: id ${t} out of range 0..50256`);
        kept.push(t);
      }
      return gpt2Decode(kept);
    },
  };
}

export function isTokenizerName(name: string): name is TokenizerName {
  return (TOKENIZER_NAMES as readonly string[]).includes(name);
}

export function makeTokenizer(name: string): Tokenizer {
  if (name === 'byte') return byteTokenizer();
  if (name === 'gpt2') return gpt2Tokenizer();
  throw new Error(`unknown tokenizer "${name}" (expected one of: ${TOKENIZER_NAMES.join(', ')})`);
}

/**
 * Number of UTF-8 bytes each token of `ids` stands for, when the tokens cut the text only at byte boundaries that
 * are also character boundaries (always true for `byte`; for `gpt2`, true for ASCII text). Used to carry per-byte
 * masks (synthetic fact positions) over to tokens. Returns null when the tokens don't decode one by one.
 */
export function tokenByteLengths(tok: Tokenizer, ids: readonly number[], textBytes: number): Uint32Array | null {
  const out = new Uint32Array(ids.length);
  if (tok.name === 'byte') {
    out.fill(1);
    return out;
  }
  let sum = 0;
  for (let i = 0; i < ids.length; i++) {
    const s = tok.decode([ids[i]]);
    if (s.includes('\ufffd')) return null;
    out[i] = utf8.encode(s).length;
    sum += out[i];
  }
  return sum === textBytes ? out : null;
}
