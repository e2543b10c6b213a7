import type { Backend, BackendData } from './backend.js';
import { type DType, type HostArray } from './dtype.js';
import { type Shape, sizeOf, fmt } from './shape.js';

/** Reference-counted backend memory, shared by a tensor and its reshaped views. */
export class Storage {
  refs = 1;
  constructor(
    readonly backend: Backend,
    public data: BackendData,
    readonly dtype: DType,
    readonly size: number,
  ) {}
  retain(): this {
    this.refs++;
    return this;
  }
  release(): void {
    if (--this.refs === 0) {
      this.backend.free(this.data, this.dtype, this.size);
      this.data = null;
    }
  }
}

/**
 * A node of the autodiff graph: one recorded op application. `vjp` maps output cotangents to input
 * cotangents and is written in ops, so it can itself be recorded and differentiated again.
 */
export interface Node {
  readonly name: string;
  readonly inputs: Tensor[];
  readonly outputs: Tensor[];
  /** The outermost trace this node belongs to (smaller = outer). */
  readonly level: number;
  /** Non-differentiable tensors the vjp reads besides its inputs and outputs. */
  readonly saved: Tensor[];
  /**
   * `into[i]`, where the backward walk gives it, is input i's running cotangent, which the vjp may add its
   * contribution to in place (a GEMM with β = 1, a checkpoint's inner backward) and return as its cotangent for
   * that input; any other tensor returned is a contribution the walk adds. Given only where nothing the vjp
   * reads is traced, so nothing it computes is recorded.
   */
  vjp(cotangents: (Tensor | null)[], needs: boolean[], into?: (Tensor | null)[]): (Tensor | null)[];
}

let nextId = 1;
let liveTensors = 0;

/** The id the next tensor gets: every tensor created after this call has an id at least this. */
export function nextTensorId(): number {
  return nextId;
}

export class Tensor {
  readonly id = nextId++;
  readonly shape: readonly number[];
  readonly size: number;
  /** Set when this tensor was produced by a recorded op (or is a traced variable). */
  node: Node | null = null;
  /** Bit i set: this tensor depends on a variable of the trace at level i. 0 = a constant. */
  deps = 0;
  /** Outermost trace whose graph holds this tensor for its backward pass. */
  pin = Infinity;
  kept = false;
  private storageRef: Storage | null;

  constructor(storage: Storage, shape: Shape) {
    this.shape = Object.freeze([...shape]);
    this.size = sizeOf(shape);
    if (this.size !== storage.size) throw new Error(`internal: tensor shape ${fmt(shape)} does not match storage of ${storage.size}`);
    this.storageRef = storage;
    liveTensors++;
    liveSet?.add(this);
    currentScope()?.tensors.push(this);
  }

  /** Outermost trace that tracks this tensor; Infinity = a constant for every trace. */
  get level(): number {
    return this.deps === 0 ? Infinity : 31 - Math.clz32(this.deps & -this.deps);
  }
  get dtype(): DType {
    return this.storage.dtype;
  }
  get rank(): number {
    return this.shape.length;
  }
  get backend(): Backend {
    return this.storage.backend;
  }
  get isDisposed(): boolean {
    return this.storageRef === null;
  }
  get storage(): Storage {
    if (this.storageRef === null) throw new Error(`tensor #${this.id} ${fmt(this.shape)} was used after dispose()`);
    return this.storageRef;
  }
  get data(): BackendData {
    return this.storage.data;
  }

  /** Flat values in row-major order (copies from the device where needed). */
  toArray(): number[] {
    const t = this.toTyped();
    // a preallocated loop: Array.from on a typed array is ~5x slower (4 ms for 128K values)
    const out = new Array<number>(t.length);
    for (let i = 0; i < t.length; i++) out[i] = t[i];
    return out;
  }
  /** Flat values as a fresh typed array of the tensor's host type. */
  toTyped(): HostArray {
    return this.backend.download(this.data, this.dtype, this.size);
  }
  /** The single value of a size-1 tensor. */
  item(): number {
    if (this.size !== 1) throw new Error(`item(): tensor has shape ${fmt(this.shape)}, expected a single element`);
    return this.toTyped()[0];
  }
  dispose(): void {
    if (this.storageRef === null) return;
    this.storageRef.release();
    this.storageRef = null;
    this.node = null;
    if (!this.engineCache) liveTensors--;
    liveSet?.delete(this);
  }
  /** Held by one of the engine's bounded caches (see `engineCacheEntry`): not counted as live. */
  private engineCache = false;
  /** @internal */
  markEngineCache(): this {
    if (!this.engineCache && this.storageRef !== null) {
      this.engineCache = true;
      this.kept = true;
      liveTensors--;
      liveSet?.delete(this);
    }
    return this;
  }
  toString(): string {
    return `Tensor(${fmt(this.shape)}, ${this.isDisposed ? 'disposed' : this.dtype})`;
  }
}

let liveSet: Set<Tensor> | null = null;

/**
 * Leak hunting: after `trackLiveTensors(true)`, `trackedLiveTensors()` lists the tensors created
 * since then and not yet disposed (with their shapes and the op that made them).
 */
export function trackLiveTensors(on: boolean): void {
  liveSet = on ? new Set() : null;
}
export function trackedLiveTensors(): Tensor[] {
  return liveSet ? [...liveSet] : [];
}

/**
 * A tensor owned by one of the engine's bounded caches (RoPE tables, scalar constants): kept
 * across `tidy` and left out of `liveTensorCount`, since the cache, not the user, frees it. Users
 * get aliases of it (their own references to the same storage), which are counted as usual.
 */
export function engineCacheEntry<T extends Tensor>(t: T): T {
  return t.markEngineCache();
}

/** Number of tensors created and not yet disposed, engine caches aside (a leak detector for tests). */
export function liveTensorCount(): number {
  return liveTensors;
}

// ---- memory scopes -------------------------------------------------------------------------

interface Scope {
  tensors: Tensor[];
}
const scopes: Scope[] = [];

function currentScope(): Scope | undefined {
  return scopes[scopes.length - 1];
}

/** Pins a tensor so no enclosing `tidy` disposes it. */
export function keep<T extends Tensor>(t: T): T {
  t.kept = true;
  return t;
}

/** Opens a memory scope; `close` disposes what the scope created except `survivors`. */
export function openScope(): Scope {
  const s: Scope = { tensors: [] };
  scopes.push(s);
  return s;
}

/**
 * Closes the innermost scope. A tensor survives (moves to the parent scope) when it is returned,
 * kept, or still needed by a trace that stays active (`activeDepth`): its graph holds it for a
 * backward pass that has not run yet.
 */
export function closeScope(scope: Scope, survivors: Set<Tensor>, activeDepth: number): void {
  if (scopes.pop() !== scope) throw new Error('internal: memory scopes closed out of order');
  const parent = currentScope();
  for (const t of scope.tensors) {
    if (t.isDisposed) continue;
    if (survivors.has(t) || t.level < activeDepth || t.pin < activeDepth) {
      if (!t.kept) parent?.tensors.push(t);
    } else if (!t.kept) {
      t.dispose();
    }
  }
}
