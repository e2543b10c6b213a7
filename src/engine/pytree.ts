import { Tensor } from './tensor.js';

/** A pytree: a tensor, or plain arrays/objects nesting tensors (other values ride along unchanged). */
export type Tree = Tensor | readonly Tree[] | { readonly [key: string]: Tree } | number | string | boolean | null | undefined;

/** Tensors of a tree in a fixed order (array order, then object keys in insertion order). */
export function leaves(tree: unknown): Tensor[] {
  const out: Tensor[] = [];
  const visit = (t: unknown): void => {
    if (t instanceof Tensor) out.push(t);
    else if (Array.isArray(t)) t.forEach(visit);
    else if (t !== null && typeof t === 'object') for (const k of Object.keys(t)) visit((t as Record<string, unknown>)[k]);
  };
  visit(tree);
  return out;
}

/** Rebuild `tree` with its tensors replaced, in `leaves` order, by `fn(tensor, index)`. */
export function mapLeaves<T>(tree: T, fn: (t: Tensor, i: number) => Tensor): T {
  let i = 0;
  const visit = (t: unknown): unknown => {
    if (t instanceof Tensor) return fn(t, i++);
    if (Array.isArray(t)) return t.map(visit);
    if (t !== null && typeof t === 'object') {
      const o: Record<string, unknown> = {};
      for (const k of Object.keys(t)) o[k] = visit((t as Record<string, unknown>)[k]);
      return o;
    }
    return t;
  };
  return visit(tree) as T;
}

/** Replace the tensors of `tree` by `values` (same count, same order). */
export function unflatten<T>(tree: T, values: readonly Tensor[]): T {
  const n = leaves(tree).length;
  if (n !== values.length) throw new Error(`unflatten: tree has ${n} tensors, got ${values.length}`);
  return mapLeaves(tree, (_, i) => values[i]);
}

/** Apply fn to corresponding tensors of trees with the same structure. */
export function zipMap<T>(trees: readonly T[], fn: (ts: Tensor[], i: number) => Tensor): T {
  const flat = trees.map(leaves);
  flat.forEach((l, j) => {
    if (l.length !== flat[0].length) throw new Error(`zipMap: tree ${j} has ${l.length} tensors, tree 0 has ${flat[0].length}`);
  });
  return mapLeaves(trees[0], (_, i) => fn(flat.map((l) => l[i]), i));
}
