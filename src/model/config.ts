/**
 * Model configuration: one validated object for every variant, plus named presets (SPEC §1).
 */
import { z } from 'zod';

/** The paper's model and its baselines (SPEC §5). The last four swap the sequence mixer in every layer. */
export const VARIANTS = ['e2e', 'naive', 'swa', 'full', 'hybrid', 'kvb-linear', 'kvb-mlp', 'mamba2', 'gated-deltanet'] as const;
export type Variant = (typeof VARIANTS)[number];
export type AttentionKind = 'full' | 'swa';
/** A layer's sequence mixer: attention of a kind, or a baseline's mixer (named like its variant). */
export type MixerKind = AttentionKind | 'kvb-linear' | 'kvb-mlp' | 'mamba2' | 'gated-deltanet';

const configSchema = z
  .object({
    name: z.string().default('custom'),
    variant: z.enum(VARIANTS),
    vocabSize: z.number().int().positive(),
    dModel: z.number().int().positive(),
    nLayers: z.number().int().positive(),
    nHeads: z.number().int().positive(),
    /** Width of each SwiGLU MLP (for e2e/naive: of both the safe and the prime MLP). */
    ffnDim: z.number().int().positive(),
    /** Sliding window k: a query sees the last k keys including itself. */
    window: z.number().int().positive(),
    /** Hybrid layout: 'full' or 'swa' per layer; default every 4th layer full (layers 3, 7, ...). */
    layerPattern: z.array(z.enum(['full', 'swa'])).optional(),
    ropeTheta: z.number().positive().default(500000),
    normEps: z.number().positive().default(1e-6),
    preNorm: z.boolean().default(true),
    postNorm: z.boolean().default(true),
    qkNorm: z.boolean().default(true),
    /** No attention sub-layers at all: only MLPs (the toy setting of SPEC §6.7). */
    attentionFree: z.boolean().default(false),
    /** Options of a baseline's sequence mixer (state size, conv width, inner mini-batch, ...); see src/model/mixers/. */
    mixer: z.record(z.unknown()).default({}),
    initStd: z.number().positive().default(0.02),
    /** Test-time training (e2e and naive). */
    suffixLen: z.number().int().nonnegative().optional(),
    miniBatch: z.number().int().positive().default(16),
    innerLr: z.number().nonnegative().default(1.0),
    /** Global-norm clip of each inner gradient; 0 disables. */
    innerClip: z.number().nonnegative().default(1.0),
    ilrInit: z.number().nonnegative().default(0.1),
    ilrWarmupSteps: z.number().int().nonnegative().default(0),
    /** Stop the outer gradient through the inner gradients (first-order meta-learning). */
    firstOrder: z.boolean().default(false),
    /**
     * Mixed precision (SPEC §1: bf16 compute, fp32 parameters and fast-weight state): activations
     * in bfloat16, each weight cast where it is used, the loss from float32 logits. Absent: compute
     * in the parameters' dtype. Attention mixers only (the others say so).
     */
    computeDType: z.literal('bfloat16').optional(),
  })
  .strict();

export type ModelConfigInput = z.input<typeof configSchema>;
export type ModelConfig = z.output<typeof configSchema> & { suffixLen: number };

/** Validates a config; errors name the offending field. */
export function makeConfig(input: ModelConfigInput): ModelConfig {
  const parsed = configSchema.safeParse(input);
  if (!parsed.success) {
    const issue = parsed.error.issues[0];
    throw new Error(`model config: field '${issue.path.join('.') || '(root)'}': ${issue.message}`);
  }
  const c = parsed.data;
  const fail = (field: string, msg: string) => {
    throw new Error(`model config: field '${field}': ${msg}`);
  };
  if (c.dModel % c.nHeads !== 0) fail('nHeads', `${c.nHeads} heads do not divide dModel ${c.dModel}`);
  if ((c.dModel / c.nHeads) % 2 !== 0) fail('nHeads', `head dim ${c.dModel / c.nHeads} must be even for RoPE`);
  const ttt = c.variant === 'e2e' || c.variant === 'naive';
  const suffixLen = c.suffixLen ?? (ttt ? Math.max(1, Math.round(c.nLayers / 4)) : 0);
  if (suffixLen > c.nLayers) fail('suffixLen', `${suffixLen} exceeds nLayers ${c.nLayers}`);
  if (!ttt && suffixLen !== 0) fail('suffixLen', `only e2e and naive variants have prime MLPs (got ${suffixLen} for ${c.variant})`);
  if (ttt && c.window < c.miniBatch) fail('window', `window ${c.window} must be >= miniBatch ${c.miniBatch} for test-time training`);
  if (c.layerPattern && c.layerPattern.length !== c.nLayers) fail('layerPattern', `has ${c.layerPattern.length} entries for ${c.nLayers} layers`);
  if (c.layerPattern && c.variant !== 'hybrid') fail('layerPattern', `only the hybrid variant takes a layer pattern`);
  const out = { ...c, suffixLen };
  const other = layerKinds(out).find((k) => k !== 'full' && k !== 'swa');
  if (c.computeDType && other) fail('computeDType', `bfloat16 compute is implemented for attention models only, not the ${other} mixer`);
  return out;
}

/** The sequence mixer of each layer. */
export function layerKinds(c: ModelConfig): MixerKind[] {
  switch (c.variant) {
    case 'full':
      return Array(c.nLayers).fill('full');
    case 'hybrid':
      return c.layerPattern ?? Array.from({ length: c.nLayers }, (_, i) => (i % 4 === 3 ? 'full' : 'swa'));
    case 'e2e':
    case 'naive':
    case 'swa':
      return Array(c.nLayers).fill('swa');
    default:
      return Array(c.nLayers).fill(c.variant);
  }
}

export const headDim = (c: ModelConfig): number => c.dModel / c.nHeads;
export const hasPrime = (c: ModelConfig, layer: number): boolean => layer >= c.nLayers - c.suffixLen;
export const isTtt = (c: ModelConfig): boolean => c.suffixLen > 0;

interface Size {
  nLayers: number;
  dModel: number;
  nHeads: number;
  /** MLP width of the plain model, and of each MLP in the E2E model (smaller, to match parameters). */
  ffn: number;
  ffnE2E: number;
  window: number;
  miniBatch: number;
  vocabSize: number;
}

/** Named sizes. tiny/mini/small are ours (CI, CPU demo, GPU); 125m and up follow the reference table. */
export const PRESETS: Record<string, Size> = {
  tiny: { nLayers: 2, dModel: 64, nHeads: 4, ffn: 128, ffnE2E: 104, window: 32, miniBatch: 16, vocabSize: 256 },
  mini: { nLayers: 4, dModel: 128, nHeads: 4, ffn: 384, ffnE2E: 320, window: 64, miniBatch: 32, vocabSize: 256 },
  small: { nLayers: 12, dModel: 512, nHeads: 8, ffn: 1408, ffnE2E: 1152, window: 1024, miniBatch: 256, vocabSize: 50257 },
  '125m': { nLayers: 12, dModel: 768, nHeads: 12, ffn: 2048, ffnE2E: 1664, window: 8192, miniBatch: 1024, vocabSize: 128256 },
  '350m': { nLayers: 24, dModel: 1024, nHeads: 16, ffn: 2736, ffnE2E: 2240, window: 8192, miniBatch: 1024, vocabSize: 128256 },
  '760m': { nLayers: 24, dModel: 1536, nHeads: 16, ffn: 4096, ffnE2E: 3328, window: 8192, miniBatch: 1024, vocabSize: 128256 },
  '1b': { nLayers: 24, dModel: 2048, nHeads: 32, ffn: 5504, ffnE2E: 4480, window: 8192, miniBatch: 1024, vocabSize: 128256 },
};

/** A preset for a variant, with overrides. Unknown presets fail naming the field. */
export function preset(name: string, variant: Variant, overrides: Partial<ModelConfigInput> = {}): ModelConfig {
  const p = PRESETS[name];
  if (!p) throw new Error(`model config: field 'preset': unknown preset '${name}' (known: ${Object.keys(PRESETS).join(', ')})`);
  const ttt = variant === 'e2e' || variant === 'naive';
  return makeConfig({
    name,
    variant,
    vocabSize: p.vocabSize,
    dModel: p.dModel,
    nLayers: p.nLayers,
    nHeads: p.nHeads,
    ffnDim: ttt ? p.ffnE2E : p.ffn,
    window: p.window,
    miniBatch: p.miniBatch,
    ...overrides,
  });
}
