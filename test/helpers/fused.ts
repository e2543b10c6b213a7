/**
 * Helpers for the fused-op suites (norm, rope, swiglu, loss, softmax, accumulate): spy on or count a backend kernel's calls, and run
 * with a layer forced onto its fused op or its composite definition.
 */
import { getBackend } from '../../src/index.js';
import { type OpPath, type PathKind, setOpPath } from '../../src/nn/layers.js';

/** fn's result and the argument list of each call it made to the current backend's `method`. */
export function spyBackend<R>(method: string, fn: () => R): { result: R; calls: unknown[][] } {
  const be = getBackend() as unknown as Record<string, (...args: unknown[]) => unknown>;
  const kernel = be[method];
  const calls: unknown[][] = [];
  be[method] = (...args: unknown[]) => (calls.push(args), kernel.apply(be, args));
  try {
    return { result: fn(), calls };
  } finally {
    be[method] = kernel;
  }
}

/** fn's result and how many times it called the current backend's `method`. */
export function countingCalls<R>(method: string, fn: () => R): { result: R; calls: number } {
  const { result, calls } = spyBackend(method, fn);
  return { result, calls: calls.length };
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
