/**
 * Reverse-mode autodiff as composable function transforms (JAX style), over a PyTorch-style
 * dynamic graph. Each transform opens a *trace* with a level (0 = outermost); ops record a node when
 * an input is tracked by an active trace. A backward pass runs with only the outer traces
 * recording, so the gradient it returns is itself differentiable by them: grad of grad works to
 * any depth, and nothing about "requires grad" outlives the call that created it.
 */
import { leaves, mapLeaves } from './pytree.js';
import { alias, isTracked, phase, record, setTraceDepth, traceDepth } from './runtime.js';
import { Tensor, closeScope, nextTensorId, openScope } from './tensor.js';
import { add, addInto, onesLike, zerosLike } from './ops.js';
import { fmt } from './shape.js';

// ---- memory ----------------------------------------------------------------------------------

/**
 * Runs fn and disposes every tensor it created except those in its result (any pytree), kept
 * ones, and those an active trace still needs for its backward pass.
 */
export function tidy<T>(fn: () => T): T {
  const scope = openScope();
  let result: T;
  try {
    result = fn();
  } catch (e) {
    closeScope(scope, new Set(), traceDepth());
    throw e;
  }
  closeScope(scope, new Set(leaves(result)), traceDepth());
  return result;
}

/** Disposes every tensor in a pytree. */
export function dispose(tree: unknown): void {
  for (const t of leaves(tree)) t.dispose();
}

// ---- stopGradient --------------------------------------------------------------------------------

/** The same values, as a constant for every active trace. Shares memory with x. */
export function stopGradient<T>(tree: T): T {
  return mapLeaves(tree, (t) => (isTracked(t) ? alias(t) : t));
}

// ---- the backward pass ---------------------------------------------------------------------------

/** Whether running cotangents take contributions in place (see `backward`); `TTT_ACCUMULATE_IN_PLACE=0` turns it off. */
let inPlace = process.env.TTT_ACCUMULATE_IN_PLACE !== '0';

/** Turns in-place accumulation of cotangents on or off (for A/B runs and tests); returns the previous setting. */
export function setInPlaceAccumulation(on: boolean): boolean {
  const before = inPlace;
  inPlace = on;
  return before;
}

/**
 * Accumulates d(outputs · cotangents)/d(targets) by walking the graph from outputs back to targets.
 * Only nodes that lie on a path to a target are visited. Ops run with `traceDepth() = recordDepth`.
 *
 * `keep` (a backward that runs once): the tensors the caller still uses afterwards besides outputs and
 * targets. Then every other output of a visited node is disposed as soon as its node's vjp has run —
 * every consumer of it ran before (the walk goes from consumers to producers), and the transform's scope
 * would dispose it when it closes anyway (the same test as closeScope's: not kept, not held by an outer
 * trace). Peak memory then falls as the walk goes instead of holding the whole tape to the end.
 *
 * A tensor's running cotangent takes further contributions in place where no one else can see it change: one
 * this walk made (or the caller handed over), held for that tensor alone, sharing its memory with no view, that
 * no trace records and no caller keeps. Its producer's vjp then gets it as `into` and may add its contribution
 * there itself (a GEMM with β = 1, the token NLL's kernels, a checkpoint's own backward); any other contribution
 * is added with `addInto`. A 125m TTT-E2E step otherwise summed the tied embedding's 394 MB gradient 15 times.
 */
function backward(
  outputs: Tensor[], cotangents: (Tensor | null)[], targets: Tensor[], traceLevel: number, keep: Set<Tensor> | null = null,
  /** Running cotangents of targets the caller hands over to be added into in place (a checkpoint's `into`). */
  adopted: (Tensor | null)[] = [],
): (Tensor | null)[] {
  const walkStart = nextTensorId();
  const targetSet = new Set(targets);
  const bit = 1 << traceLevel;
  // A tensor is on a path to a target iff it carries this trace's bit (set by `record`).
  const needed = (t: Tensor): boolean => targetSet.has(t) || ((t.deps & bit) !== 0 && t.node !== null);
  // Post-order of the nodes reachable through needed tensors (iterative: inner loops make deep graphs).
  const order: NonNullable<Tensor['node']>[] = [];
  const seen = new Set<NonNullable<Tensor['node']>>();
  for (const root of outputs) {
    if (!needed(root) || targetSet.has(root)) continue;
    const stack: [NonNullable<Tensor['node']>, number][] = [[root.node!, 0]];
    seen.add(root.node!);
    while (stack.length) {
      const top = stack[stack.length - 1];
      const node = top[0];
      if (top[1] < node.inputs.length) {
        const child = node.inputs[top[1]++];
        if (needed(child) && !targetSet.has(child) && !seen.has(child.node!)) {
          seen.add(child.node!);
          stack.push([child.node!, 0]);
        }
        continue;
      }
      order.push(node);
      stack.pop();
    }
  }
  // Tensors a vjp reads besides its inputs and outputs (`record`'s saved) are never disposed early.
  const spare = keep && new Set<Tensor>([...outputs, ...keep, ...order.flatMap((n) => n.saved)]);
  const disposable = (t: Tensor): boolean =>
    !spare!.has(t) && !targetSet.has(t) && !t.kept && !t.isDisposed && t.level >= traceLevel && t.pin >= traceLevel;
  // Cotangents by tensor. A vjp may hand one tensor to several inputs (add: [g, g]), so count holders
  // before disposing a consumed cotangent.
  const cts = new Map<Tensor, Tensor>();
  const holders = new Map<Tensor, number>();
  const seeds = new Set(cotangents);
  const hold = (t: Tensor, g: Tensor): void => {
    cts.set(t, g);
    holders.set(g, (holders.get(g) ?? 0) + 1);
  };
  const adoptedSet = new Set(adopted.filter((t): t is Tensor => t !== null));
  // Dead once consumed, unless an outer trace recorded it or the caller owns it.
  const disposeConsumed = (g: Tensor): void => {
    if (!seeds.has(g) && !adoptedSet.has(g) && !isTracked(g) && g.pin >= traceDepth()) g.dispose();
  };
  /**
   * Whether a running cotangent may be added into in place: one this walk made (or the caller handed over) and
   * holds for one tensor alone, with memory no view shares, that no trace recorded and no caller keeps.
   */
  const mutable = (g: Tensor): boolean =>
    adoptedSet.has(g) ||
    (inPlace && g.id >= walkStart && !seeds.has(g) && holders.get(g) === 1 && g.storage.refs === 1 && !isTracked(g) && !g.kept && g.pin >= traceDepth());
  const drop = (t: Tensor): void => {
    const g = cts.get(t);
    if (!g) return;
    cts.delete(t);
    const n = holders.get(g)! - 1;
    if (n > 0) {
      holders.set(g, n);
      return;
    }
    holders.delete(g);
    disposeConsumed(g);
  };
  const accumulate = (t: Tensor, g: Tensor): void => {
    const prev = cts.get(t);
    if (!prev) return hold(t, g);
    if (mutable(prev) && !isTracked(g)) {
      if (prev.dtype !== g.dtype) throw new Error(`internal: a ${g.dtype} cotangent for a ${prev.dtype} tensor`);
      addInto(prev, g);
      return;
    }
    if (adoptedSet.has(prev)) throw new Error('internal: a handed-over cotangent could not be added into in place');
    const sum = add(prev, g);
    drop(t);
    hold(t, sum);
  };
  targets.forEach((t, i) => {
    if (adopted[i]) hold(t, adopted[i]!);
  });
  outputs.forEach((o, i) => {
    const c = cotangents[i];
    if (c && needed(o)) accumulate(o, c);
  });
  // `order` lists inputs before their consumers: walk it backwards.
  for (let j = order.length - 1; j >= 0; j--) {
    const node = order[j];
    const outCts = node.outputs.map((o) => cts.get(o) ?? null);
    if (outCts.every((c) => c === null)) continue;
    const needs = node.inputs.map(needed);
    // running cotangents the vjp may add into in place, where nothing it reads is traced (checked only for a node
    // that has one: most inputs get their first contribution)
    const into = node.inputs.map((t, i) => {
      const prev = needs[i] ? cts.get(t) : undefined;
      return prev && mutable(prev) ? prev : null;
    });
    const untracked = () => !outCts.some((c) => c !== null && isTracked(c)) && !node.inputs.some(isTracked) && !node.outputs.some(isTracked) && !node.saved.some(isTracked);
    if (into.some((p) => p !== null) && !untracked()) into.fill(null);
    const scope = openScope();
    let inCts: (Tensor | null)[];
    try {
      inCts = node.vjp(outCts, needs, into);
    } catch (e) {
      closeScope(scope, new Set(), traceDepth());
      throw e;
    }
    closeScope(scope, new Set(inCts.filter((c): c is Tensor => c !== null)), traceDepth());
    node.inputs.forEach((t, i) => {
      const c = inCts[i];
      if (!c || !needs[i] || c === into[i]) return; // (into[i] returned: added into in place)
      if (!shapeEq(c, t)) throw new Error(`internal: ${node.name} backward gave ${fmt(c.shape)} for input ${fmt(t.shape)}`);
      accumulate(t, c);
    });
    // a contribution added into an existing cotangent is dead now (one held as a cotangent has holders);
    // without this, every input's summed contributions (a tied embedding's, 0.4 GB each) lived to the end
    for (const c of new Set(inCts)) if (c && !holders.has(c) && !c.isDisposed) disposeConsumed(c);
    for (const o of node.outputs) if (!targetSet.has(o)) drop(o);
    if (spare) for (const o of node.outputs) if (disposable(o)) o.dispose();
  }
  return targets.map((t) => cts.get(t) ?? null);
}

function shapeEq(a: Tensor, b: Tensor): boolean {
  return a.shape.length === b.shape.length && a.shape.every((d, i) => d === b.shape[i]);
}

/** The traced stand-in for a variable x at `level`: an identity of x, so outer traces see through it. */
function makeVariable(x: Tensor, level: number): Tensor {
  const v = alias(x);
  if (isTracked(x)) record('variable', [x], [v], ([g]) => [g]);
  v.deps |= 1 << level;
  return v;
}

/** Drops tracking by traces at `level` and deeper from a result leaving its trace. */
function release(t: Tensor, level: number): Tensor {
  if (t.pin >= level) t.pin = Infinity;
  const outer = t.deps & ((1 << level) - 1);
  if (outer === t.deps) return t;
  if (outer !== 0) {
    t.deps = outer;
    return t;
  }
  const free = alias(t);
  t.dispose();
  return free;
}

// ---- transforms -------------------------------------------------------------------------------------

type AnyFn = (...args: any[]) => any;
export type Argnums = number | number[];

interface Traced {
  out: unknown;
  vars: Tensor[];
  argnums: number[];
  level: number;
}

/** Runs f with the tensors of args[argnums] replaced by traced variables of a new trace. */
function trace(f: AnyFn, args: unknown[], argnums: Argnums): Traced {
  const nums = typeof argnums === 'number' ? [argnums] : argnums;
  for (const n of nums) if (n < 0 || n >= args.length) throw new Error(`grad: argnum ${n} out of range for ${args.length} arguments`);
  const level = traceDepth();
  if (level >= 30) throw new Error('grad: transforms nested more than 30 deep');
  setTraceDepth(level + 1);
  const vars: Tensor[] = [];
  const traced = args.map((a, i) => (nums.includes(i) ? mapLeaves(a, (t) => {
    const v = makeVariable(t, level);
    vars.push(v);
    return v;
  }) : a));
  try {
    return { out: f(...traced), vars, argnums: nums, level };
  } catch (e) {
    setTraceDepth(level);
    throw e;
  }
}

/** Gradients shaped like args[argnums]: one tree for a single argnum, a tuple for a list (as in JAX). */
function gradsTree(args: unknown[], argnums: Argnums, grads: Tensor[]): unknown {
  let i = 0;
  const nums = typeof argnums === 'number' ? [argnums] : argnums;
  const per = nums.map((n) => mapLeaves(args[n], () => grads[i++]));
  return typeof argnums === 'number' ? per[0] : per;
}

export interface ValueAndGradOptions {
  argnums?: Argnums;
  /** f returns [value, aux]; aux is returned untouched (and not differentiated). */
  hasAux?: boolean;
}

/**
 * valueAndGrad(f)(...args) → [value, grads] (or [[value, aux], grads] with hasAux). f must return a
 * scalar tensor. grads mirrors args[argnums] (a tuple when argnums is a list).
 */
export function valueAndGrad<F extends AnyFn>(f: F, opts: ValueAndGradOptions = {}): (...args: Parameters<F>) => [any, any] {
  const argnums = opts.argnums ?? 0;
  return (...args: Parameters<F>) => {
    const scope = openScope();
    const outerDepth = traceDepth();
    let value: Tensor;
    let aux: unknown;
    let grads: Tensor[];
    let t: Traced | undefined;
    try {
      t = trace(f, args, argnums);
      const out = t.out;
      [value, aux] = opts.hasAux ? (out as [Tensor, unknown]) : [out as Tensor, undefined];
      if (!(value instanceof Tensor) || value.size !== 1) {
        throw new Error(`grad: the function must return a scalar tensor${opts.hasAux ? ' as the first element of [value, aux]' : ''}, got ${value instanceof Tensor ? fmt(value.shape) : typeof value}`);
      }
      setTraceDepth(t.level);
      const traced = t;
      const raw = phase('backward', () => backward([value], [onesLike(value)], traced.vars, traced.level, new Set(leaves(aux))));
      grads = raw.map((g, i) => g ?? zerosLike(t!.vars[i]));
    } catch (e) {
      setTraceDepth(outerDepth);
      closeScope(scope, new Set(), outerDepth);
      throw e;
    }
    closeScope(scope, new Set([value, ...grads, ...leaves(aux)]), outerDepth);
    value = release(value, t.level);
    grads = grads.map((g) => release(g, t!.level));
    aux = mapLeaves(aux, (a) => release(a, t!.level));
    const g = gradsTree(args, argnums, grads);
    return [opts.hasAux ? [value, aux] : value, g];
  };
}

/** grad(f)(...args): the gradient of scalar f w.r.t. args[argnums] (default 0). */
export function grad<F extends AnyFn>(f: F, opts: Omit<ValueAndGradOptions, 'hasAux'> | Argnums = {}): (...args: Parameters<F>) => any {
  const o = typeof opts === 'number' || Array.isArray(opts) ? { argnums: opts } : opts;
  const vg = valueAndGrad(f, o);
  return (...args: Parameters<F>) => {
    const [value, g] = vg(...args);
    value.dispose();
    return g;
  };
}

/**
 * vjp(f, ...primals) → [out, pullback]; pullback(cotangent tree shaped like out) returns the
 * cotangents of every primal (a tuple, one per primal). The forward pass's tensors stay alive (in
 * the enclosing tidy) so pullback can be called any number of times.
 */
export function vjp<F extends AnyFn>(f: F, ...primals: Parameters<F>): [ReturnType<F>, (ct: unknown) => any[]] {
  const argnums = primals.map((_, i) => i);
  const t = trace(f, primals, argnums);
  setTraceDepth(t.level);
  const outLeaves = leaves(t.out);
  const pullback = (ct: unknown): any[] => {
    const ctLeaves = leaves(ct);
    if (ctLeaves.length !== outLeaves.length) throw new Error(`vjp: cotangent has ${ctLeaves.length} tensors, output has ${outLeaves.length}`);
    ctLeaves.forEach((c, i) => {
      if (!shapeEq(c, outLeaves[i])) throw new Error(`vjp: cotangent ${i} has shape ${fmt(c.shape)}, output has ${fmt(outLeaves[i].shape)}`);
    });
    const raw = backward(outLeaves, ctLeaves, t.vars, t.level);
    const grads = raw.map((g, i) => g ?? zerosLike(t.vars[i]));
    let i = 0;
    return primals.map((p) => mapLeaves(p, () => grads[i++]));
  };
  return [t.out as ReturnType<F>, pullback];
}

/**
 * checkpoint(f): the same function, but its backward pass recomputes f's forward instead of
 * keeping f's intermediate tensors alive. Every tensor f differentiates through must be an
 * argument (a closed-over tracked tensor throws), so the recomputation sees the same inputs.
 */
export function checkpoint<F extends AnyFn>(f: F): F {
  return ((...args: unknown[]) => {
    const inputs = leaves(args);
    const tracked = inputs.filter(isTracked);
    if (tracked.length === 0) return f(...args);
    const plainArgs = stopGradient(args);
    const out = tidy(() => f(...plainArgs));
    const outs = leaves(out);
    if (outs.some(isTracked)) {
      throw new Error('checkpoint: the function closes over a tensor that is being differentiated; pass it as an argument');
    }
    const trackedIdx = inputs.map((t, i) => (isTracked(t) ? i : -1)).filter((i) => i >= 0);
    record('checkpoint', tracked, outs, (cts, _needs, into) => {
      const rerun = (...vars: Tensor[]): Tensor[] => {
        const flat = [...inputs];
        trackedIdx.forEach((idx, j) => (flat[idx] = vars[j]));
        let k = 0;
        return leaves(f(...mapLeaves(args, () => flat[k++])));
      };
      // Straight through trace and backward rather than vjp: outputs without a cotangent and inputs
      // the rerun's gradient does not reach stay null instead of becoming zero tensors (a TTT-E2E
      // mini-batch's checkpoint takes every parameter; most get nothing from its outputs' cotangents).
      const t = phase('recompute', () => trace(rerun, tracked, tracked.map((_, i) => i)));
      setTraceDepth(t.level);
      // the running cotangents handed in are added into by the rerun's backward itself (its GEMMs with β = 1)
      return phase('checkpoint backward', () => backward(t.out as Tensor[], cts, t.vars, t.level, new Set(), into ?? []));
    });
    return out;
  }) as F;
}
