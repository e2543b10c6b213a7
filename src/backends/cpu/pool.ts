/**
 * A free list of typed arrays for the CPU backend. Tensors are freed deterministically
 * (`Storage.release()` → `backend.free`), so instead of handing a buffer to the garbage collector
 * and zero-filling a fresh one for the next op, freed arrays wait here, keyed by (array type,
 * length), and are handed out again. A pooled array holds stale values: `alloc(..., true)` zeroes
 * it, and only kernels that overwrite every element may ask for it unzeroed.
 *
 * Safety rests on the engine's contract that a freed buffer is referenced nowhere: the backend
 * never returns one of its inputs as an output, upload/download copy, and reshaped views share
 * one refcounted Storage that frees only when the last view goes.
 *
 * Storage of MIN_BYTES and more comes from the shared wasm arena (./arena.ts) when it has room, so
 * the wasm kernels can work on it in place; the lists here then keep arena views of exact lengths
 * (a hit costs no new view), and an arena array the pool does not keep (cap reached, list full,
 * clear()) goes back to the arena's free lists instead of to the garbage collector.
 *
 * `TTT_CPU_POOL=0` turns pooling off (every alloc is a fresh, ordinary array: no arena either, as
 * nothing would give its blocks back); `TTT_CPU_POOL_MB` sets the cap on the bytes the pool holds
 * (default 512).
 */
import type { DType, HostArray } from '../../engine/dtype.js';
import { type ArenaStats, arena } from './arena.js';

/** Arrays below this many bytes live on V8's heap and cost little to make: not worth pooling. */
const MIN_BYTES = 256;
/** At most this many arrays of one (type, length) wait in the pool. */
const PER_LIST_CAP = 4096;
const DEFAULT_CAP_MB = 512;

type Ctor = Float32ArrayConstructor | Float64ArrayConstructor | Int32ArrayConstructor | Uint8ArrayConstructor;
const KINDS: Ctor[] = [Float32Array, Float64Array, Int32Array, Uint8Array];

function kindOf(dtype: DType): number {
  switch (dtype) {
    case 'float32':
    case 'bfloat16':
      return 0;
    case 'float64':
      return 1;
    case 'int32':
      return 2;
    case 'bool':
      return 3;
  }
}

export interface PoolStats {
  enabled: boolean;
  capBytes: number;
  heldBytes: number;
  heldArrays: number;
  /** Allocations served from the pool / by a fresh array (pool empty for that size, or too small). */
  hits: number;
  misses: number;
  /** Frees kept in the pool / let go to the garbage collector (cap reached, too small, foreign array). */
  kept: number;
  dropped: number;
  /** Arrays handed out and not yet released that live in the arena / are ordinary arrays. */
  liveArena: number;
  liveHeap: number;
  arena: ArenaStats;
}

export class ArrayPool {
  private readonly lists: Map<number, HostArray[]>[] = KINDS.map(() => new Map());
  private held = 0;
  private heldArrays = 0;
  private hits = 0;
  private misses = 0;
  private kept = 0;
  private dropped = 0;
  private liveArena = 0;
  private liveHeap = 0;

  constructor(
    public enabled: boolean,
    public capBytes: number,
  ) {}

  static fromEnv(): ArrayPool {
    const on = (process.env.TTT_CPU_POOL ?? '1') !== '0';
    const mb = Number.parseFloat(process.env.TTT_CPU_POOL_MB ?? '');
    return new ArrayPool(on, (Number.isFinite(mb) && mb >= 0 ? mb : DEFAULT_CAP_MB) * 2 ** 20);
  }

  /** A `size`-element array of `dtype`'s host type; zero-filled iff `zero` (else stale values). */
  alloc(dtype: DType, size: number, zero: boolean): HostArray {
    const k = kindOf(dtype);
    const C = KINDS[k];
    const bytes = size * C.BYTES_PER_ELEMENT;
    if (this.enabled && bytes >= MIN_BYTES) {
      const list = this.lists[k].get(size);
      if (list !== undefined && list.length > 0) {
        const a = list.pop()!;
        this.held -= a.byteLength;
        this.heldArrays--;
        this.hits++;
        if (arena.owns(a)) this.liveArena++;
        else this.liveHeap++;
        if (zero) a.fill(0);
        return a;
      }
      this.misses++;
      const p = arena.allocTensor(bytes);
      if (p >= 0) {
        const a = arena.view(C, p, size);
        this.liveArena++;
        if (zero) a.fill(0); // a reused block holds stale values
        return a;
      }
    } else {
      this.misses++;
    }
    this.liveHeap++;
    return new C(size);
  }

  /** Takes back an array nothing references any more (or lets it go when full / not ours). */
  release(a: unknown, dtype: DType, size: number): void {
    if (!this.enabled) return;
    const k = kindOf(dtype);
    const C = KINDS[k];
    // Only whole, exactly typed arrays of the expected length: never a view into a larger buffer
    // (for the arena: never anything but the view of a whole live block).
    if (!(a instanceof C) || a.constructor !== C || a.length !== size) {
      this.dropped++;
      return;
    }
    const inArena = arena.owns(a);
    if (inArena ? !arena.isBlock(a) : a.byteOffset !== 0 || a.buffer.byteLength !== a.byteLength) {
      this.dropped++;
      return;
    }
    if (inArena) this.liveArena--;
    else this.liveHeap--;
    let list = this.lists[k].get(size);
    if (a.byteLength < MIN_BYTES || this.held + a.byteLength > this.capBytes || (list !== undefined && list.length >= PER_LIST_CAP)) {
      this.dropped++;
      if (inArena) arena.release(a.byteOffset);
      return;
    }
    if (list === undefined) {
      list = [];
      this.lists[k].set(size, list);
    }
    list.push(a);
    this.held += a.byteLength;
    this.heldArrays++;
    this.kept++;
  }

  /** Lets every pooled array go: ordinary ones to the garbage collector, arena blocks to the arena. */
  clear(): void {
    for (const m of this.lists) {
      for (const list of m.values()) for (const a of list) if (arena.owns(a)) arena.release(a.byteOffset);
      m.clear();
    }
    this.held = 0;
    this.heldArrays = 0;
  }

  stats(): PoolStats {
    return {
      enabled: this.enabled, capBytes: this.capBytes, heldBytes: this.held, heldArrays: this.heldArrays,
      hits: this.hits, misses: this.misses, kept: this.kept, dropped: this.dropped,
      liveArena: this.liveArena, liveHeap: this.liveHeap, arena: arena.stats(),
    };
  }
}

/** The process-wide pool shared by the CPU backend and its kernel modules. */
export const pool = ArrayPool.fromEnv();
