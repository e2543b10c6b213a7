/** The data layer: tokenizers, corpora, shards, packing. */
export * from './tokenizer.js';
export * from './corpora.js';
export * from './synthetic.js';
export * from './shards.js';
export * from './packing.js';
export { Rng, hash32, permutation } from './rng.js';
