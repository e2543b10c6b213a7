/** Counts calls of `proto[method]` while `fn` runs (the method still runs); restores it afterwards. */
export function countCalls<R>(proto: object, method: string, fn: () => R): { result: R; calls: number } {
  const target = proto as Record<string, (...a: unknown[]) => unknown>;
  const original = target[method];
  let calls = 0;
  target[method] = function (this: unknown, ...a: unknown[]) {
    calls++;
    return original.apply(this, a);
  };
  try {
    return { result: fn(), calls };
  } finally {
    target[method] = original;
  }
}
