/**
 * Sequence mixers: the one sub-layer that differs between variants (attention of any window, TTT
 * layers, state-space models, delta-rule linear attention). Everything else in a block — norms,
 * MLPs, prime MLPs, embeddings, training and evaluation — is shared, so comparisons are apples to
 * apples.
 *
 * A mixer reads a chunk of consecutive positions given the state carried from the positions before
 * it (null at the start of a document) and returns the state for the next chunk: the whole
 * sequence at once (training), mini-batches (the TTT-E2E inner loop, prefill) and one token at a
 * time (decoding) all go through the same `forward`.
 */
import type { ZodTypeAny, output } from 'zod';
import type { Key, Tensor } from '../../engine/index.js';
import type { ModelConfig } from '../config.js';

/** What a mixer carries between chunks: tensors and plain numbers (a pytree). */
export type MixerState = { readonly [key: string]: Tensor | number };

export interface MixerInit {
  /** A weight ~ N(0, std²) truncated at 2σ (std defaults to the config's initStd), seeded by its name. */
  normal(name: string, shape: number[], std?: number): Tensor;
  /** A tensor filled with `value` (norm gains, biases, decay parameters). */
  full(shape: number[], value: number): Tensor;
  /** The raw key of this layer, for inits that need their own draws. */
  key: Key;
}

export interface Mixer {
  /** The mixer's parameters for one layer (a flat object of tensors). */
  init(c: ModelConfig, layer: number, init: MixerInit): Record<string, Tensor>;
  /** h [B, T, D] at absolute `positions` (consecutive) → out [B, T, D] and the state after them. */
  forward(c: ModelConfig, p: Record<string, Tensor>, h: Tensor, positions: number[], state: MixerState | null): { out: Tensor; state: MixerState };
  /** The same state without storage kept for later (what a saved memory holds); default: as is. */
  compact?(state: MixerState): MixerState;
}

const mixers = new Map<string, Mixer>();

export function registerMixer(kind: string, mixer: Mixer): void {
  mixers.set(kind, mixer);
}

export function getMixer(kind: string): Mixer {
  const m = mixers.get(kind);
  if (!m) throw new Error(`unknown sequence mixer '${kind}' (known: ${[...mixers.keys()].join(', ')})`);
  return m;
}

/** Throws unless positions are consecutive (mixers take a chunk's start, not arbitrary positions). */
export function checkConsecutive(what: string, positions: readonly number[]): void {
  if (positions.some((p, i) => p !== positions[0] + i)) throw new Error(`${what}: positions must be consecutive, got ${positions.slice(0, 8).join(',')}…`);
}

/**
 * A mixer's options (`c.mixer`) validated by its schema, defaults filled in. Errors name the field like
 * makeConfig's ("model config: field 'mixer.chunkSize': ..."); an unknown key is reported on 'mixer'
 * with zod's message, which names the key.
 */
export function parseMixerOptions<S extends ZodTypeAny>(kind: string, schema: S, c: ModelConfig): output<S> {
  const r = schema.safeParse(c.mixer);
  if (r.success) return r.data;
  const issue = r.error.issues[0];
  const field = issue.path.length ? `mixer.${issue.path.join('.')}` : 'mixer';
  throw new Error(`model config: field '${field}': ${issue.message} (${kind})`);
}
