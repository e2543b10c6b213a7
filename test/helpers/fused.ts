/**
 * Helpers for the fused-op suites (norm, rope, swiglu, loss): count a backend kernel's calls, and run
 * with a layer forced onto its fused op or its composite definition.
 */
import { getBackend } from '../../src/index.js';
import { type OpPath, type PathKind, setOpPath } from '../../src/nn/layers.js';

/** fn's result and how many times it called the current backend's `method`. */
export function countingCalls<R>(method: string, fn: () => R): { result: R; calls: number } {
  const be = getBackend() as unknown as Record<string, (...args: unknown[]) => unknown>;
  const kernel = be[method];
  let calls = 0;
  be[method] = (...args: unknown[]) => (calls++, kernel.apply(be, args));
  try {
    return { result: fn(), calls };
  } finally {
    be[method] = kernel;
  }
}

/** fn run with `setOpPath(kind, path)`, the previous setting restored after. */
export function withOpPath<R>(kind: PathKind, path: OpPath, fn: () => R): R {
  const before = setOpPath(kind, path);
  try {
    return fn();
  } finally {
    setOpPath(kind, before);
  }
}

/** fn run with the current backend's second-order kernel switch `flag` set to `on`, the previous setting restored after. */
export function withGradKernel<R>(flag: 'rmsNormGradKernel' | 'swigluGradKernel' | 'softmaxGradKernel', on: boolean, fn: () => R): R {
  const be = getBackend() as unknown as Record<typeof flag, boolean>;
  const before = be[flag];
  be[flag] = on;
  try {
    return fn();
  } finally {
    be[flag] = before;
  }
}
