/**
 * Checkpoints as safetensors: parameters, AdamW moments and step, plus JSON metadata (training
 * step, data position, configs). Written atomically (temp file + rename), so the last good
 * checkpoint survives a crash or Ctrl-C mid-write.
 */
import { type Tensor, keep, tensor, unflatten } from '../engine/index.js';
import { readSafetensors, writeSafetensors, type StoredTensor } from '../io/safetensors.js';
import { namedLeaves } from '../model/reference.js';
import type { AdamWState } from './adamw.js';

export interface CheckpointContents<P> {
  params: P;
  opt: AdamWState<P>;
  /** Free-form JSON-serialisable metadata (step, sampler state, configs). */
  meta: Record<string, unknown>;
}

const FORMAT = 'ttt-e2e-checkpoint/1';

export function saveCheckpoint<P>(path: string, c: CheckpointContents<P>): void {
  const tensors = new Map<string, StoredTensor>();
  const put = (prefix: string, tree: unknown) => {
    for (const [name, t] of namedLeaves(tree)) tensors.set(`${prefix}${name}`, { dtype: t.dtype, shape: [...t.shape], data: t.toTyped() });
  };
  put('params.', c.params);
  put('opt.m.', c.opt.m);
  put('opt.v.', c.opt.v);
  put('opt.', { step: c.opt.step });
  writeSafetensors(path, tensors, { format: FORMAT, meta: JSON.stringify(c.meta) });
}

/**
 * Loads a checkpoint into the structure of `template` (e.g. freshly initialised params of the same
 * config). Throws one clear line for a missing/corrupt file or a parameter mismatch.
 */
export function loadCheckpoint<P>(path: string, template: P): CheckpointContents<P> {
  const { tensors, metadata } = readSafetensors(path);
  if (metadata.format !== FORMAT) throw new Error(`${path} is not a ttt-e2e checkpoint (format '${metadata.format ?? 'missing'}')`);
  const names = [...namedLeaves(template)];
  const take = (prefix: string): P => {
    const values: Tensor[] = names.map(([name, t]) => {
      const s = tensors.get(prefix + name);
      if (!s) throw new Error(`${path}: missing tensor ${prefix + name} (was the checkpoint made with another model config?)`);
      if (s.shape.join(',') !== t.shape.join(',')) {
        throw new Error(`${path}: ${prefix + name} has shape [${s.shape}] but the model expects [${t.shape}] (config mismatch)`);
      }
      return keep(tensor(s.data, s.shape, t.dtype));
    });
    return unflatten(template, values);
  };
  const stepT = tensors.get('opt.step');
  if (!stepT) throw new Error(`${path}: missing tensor opt.step`);
  let meta: Record<string, unknown>;
  try {
    meta = JSON.parse(metadata.meta ?? '{}');
  } catch {
    throw new Error(`${path}: corrupt metadata`);
  }
  return {
    params: take('params.'),
    opt: { m: take('opt.m.'), v: take('opt.v.'), step: keep(tensor(stepT.data, [], stepT.dtype)) },
    meta,
  };
}
