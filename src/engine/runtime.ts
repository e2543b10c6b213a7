import type { Backend, BackendData } from './backend.js';
import type { DType } from './dtype.js';
import type { Shape } from './shape.js';
import { sizeOf } from './shape.js';
import { Storage, Tensor, type Node } from './tensor.js';

// ---- backends ----------------------------------------------------------------------------

const registry = new Map<string, () => Backend>();
const instances = new Map<string, Backend>();
let current: Backend | null = null;

/** Makes a backend selectable by name; the factory runs on first use. */
export function registerBackend(name: string, factory: () => Backend): void {
  registry.set(name, factory);
}

export function listBackends(): string[] {
  return [...registry.keys()];
}

export function setBackend(name: string): Backend {
  const factory = registry.get(name);
  if (!factory) throw new Error(`unknown backend '${name}' (available: ${listBackends().join(', ')})`);
  let b = instances.get(name);
  if (!b) {
    b = factory();
    instances.set(name, b);
  }
  current = b;
  return b;
}

/** The backend new tensors are created on: `TTT_DEVICE` if set, else `cpu`. */
export function getBackend(): Backend {
  return current ?? setBackend(process.env.TTT_DEVICE || 'cpu');
}

const backendIds = new WeakMap<Backend, number>();
/**
 * A key naming one backend instance in the engine's caches (its name and a serial number): two
 * instances can share a name (the cuda backend over the real libraries and over the stand-ins), and a
 * cached tensor must never go to the other one.
 */
export function backendKey(backend: Backend = getBackend()): string {
  let id = backendIds.get(backend);
  if (id === undefined) {
    id = nextBackendId++;
    backendIds.set(backend, id);
  }
  return `${backend.name}#${id}`;
}
let nextBackendId = 0;

export function fromData(data: BackendData, shape: Shape, dtype: DType, backend: Backend = getBackend()): Tensor {
  return new Tensor(new Storage(backend, data, dtype, sizeOf(shape)), shape);
}

/** A new tensor object sharing `t`'s memory, untracked by every trace. */
export function alias(t: Tensor, shape: Shape = t.shape): Tensor {
  return new Tensor(t.storage.retain(), shape);
}

// ---- launch plans ----------------------------------------------------------------------------

/**
 * Aliases of engine-cache entries (scalar constants, RoPE tables) handed out while a launch plan
 * records: the recording reads their memory on every replay, so it must outlive any eviction.
 */
let pinned: Tensor[] | null = null;

export function startPinning(): void {
  if (pinned) throw new Error('launch plan: recordings do not nest');
  pinned = [];
}
export function stopPinning(): Tensor[] {
  const out = pinned ?? [];
  pinned = null;
  return out;
}
/** Called by the engine's caches for each entry they hand out. */
export function pinWhileRecording(t: Tensor): void {
  if (pinned) pinned.push(alias(t));
}

// ---- phase timing ---------------------------------------------------------------------------

let phaseTiming = process.env.TTT_PHASES === '1';
const phaseStack: string[] = [];

/** Turns phase timing on or off (`TTT_PHASES=1` at start); returns the previous setting. */
export function setPhaseTiming(on: boolean): boolean {
  const before = phaseTiming;
  phaseTiming = on;
  return before;
}

/**
 * Runs fn as the phase `name` (nested in the phases around it: "backward / recompute / mini-batch / forward"): with
 * phase timing on, the backend marks where its work begins and ends (`Backend.markPhase`; `phaseReport` sums them).
 * Off, or on a backend without marks, it only runs fn.
 */
export function phase<T>(name: string, fn: () => T): T {
  const be = current;
  if (!phaseTiming || !be?.markPhase) return fn();
  phaseStack.push(name);
  be.markPhase(phaseStack.join(' / '));
  try {
    return fn();
  } finally {
    phaseStack.pop();
    be.markPhase(phaseStack.length ? phaseStack.join(' / ') : '(outside any phase)');
  }
}

// ---- traces --------------------------------------------------------------------------------

/**
 * Number of traces that currently record ops. Trace levels are 0 (outermost) .. depth-1; a tensor
 * with `level < depth` depends on a variable of an active trace and so gets its ops recorded.
 */
let depth = 0;

export function traceDepth(): number {
  return depth;
}
export function setTraceDepth(d: number): void {
  depth = d;
}

/** Bit mask of the traces that currently record. */
export function activeMask(): number {
  return depth >= 31 ? -1 : (1 << depth) - 1;
}

export function isTracked(t: Tensor): boolean {
  return (t.deps & activeMask()) !== 0;
}

/**
 * Records an op application if any input is tracked. Outputs depend on the union of the inputs'
 * active traces; the node's level is the outermost of them, and inputs are pinned to that level
 * because the backward pass reads them.
 */
export function record(
  name: string,
  inputs: Tensor[],
  outputs: Tensor[],
  vjp: Node['vjp'],
  /** Non-differentiable tensors the vjp reads (indices, masks): kept alive like inputs. */
  saved: Tensor[] = [],
): void {
  if (depth === 0) return;
  let deps = 0;
  for (const t of inputs) deps |= t.deps;
  deps &= activeMask();
  if (deps === 0) return;
  const level = 31 - Math.clz32(deps & -deps);
  const node: Node = { name, inputs, outputs, level, saved, vjp };
  for (const o of outputs) {
    o.node = node;
    o.deps = deps;
    if (o.pin > level) o.pin = level;
  }
  for (const t of inputs) if (t.pin > level) t.pin = level;
  for (const t of saved) if (t.pin > level) t.pin = level;
}
