/** The kernel modules of the CUDA backend: each a complete NVRTC source, compiled once per arch. */
import { attentionSource, isAttnDType } from './attention.js';
import { CUDA_DTYPES, type CudaDType, PRELUDE } from './common.js';
import { elementwiseSource } from './elementwise.js';
import { indexingSource, movementSource } from './indexing.js';
import { reduceSource } from './reduce.js';

export * from './attention.js';
export * from './common.js';
export * from './elementwise.js';
export * from './indexing.js';
export * from './reduce.js';

export type ModuleKind = 'elementwise' | 'reduce' | 'indexing' | 'attention' | 'movement';

/** Source of one module: `movement` is dtype-free, the others are per dtype. */
export function moduleSource(kind: ModuleKind, dtype: CudaDType = 'float32'): string {
  const body =
    kind === 'elementwise' ? elementwiseSource(dtype)
    : kind === 'reduce' ? reduceSource(dtype)
    : kind === 'indexing' ? indexingSource(dtype)
    : kind === 'attention' ? attentionSource(dtype)
    : movementSource();
  return `${PRELUDE}\n${body}\n`;
}

/** Every module source (for ahead-of-time checks: `nvcc --ptx` or a warm-up compile). */
export function allModuleSources(): { key: string; source: string }[] {
  const out = [{ key: 'movement', source: moduleSource('movement') }];
  for (const d of CUDA_DTYPES) {
    for (const k of ['elementwise', 'reduce', 'indexing', 'attention'] as ModuleKind[]) {
      if (k === 'attention' && !isAttnDType(d)) continue;
      out.push({ key: `${k}/${d}`, source: moduleSource(k, d) });
    }
  }
  return out;
}
