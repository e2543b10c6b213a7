/**
 * One shared WebAssembly memory that holds the CPU backend's tensor storage, so the wasm kernels
 * (./wasm-elementwise.ts, ./gemm.ts) work in place on tensors instead of copying them into a
 * private memory and back: for memory-bound ops (add, mul, ...) the two copies cost as much as SIMD
 * saves. The pool (./pool.ts) asks the arena for a block on a miss and gives blocks back when it
 * lets an array go.
 *
 * Blocks come from size-class free lists (64-byte multiples up to 4 KiB, then 8 classes per power
 * of two, so at most 12.5% is lost to rounding) or from a bump pointer; they are never merged or
 * returned to the system (wasm memory cannot shrink), which is the pool's behaviour anyway for
 * the shapes a training loop repeats. Every block is 64-byte aligned and the memory keeps
 * 64 bytes of slack past the last block, so a kernel may read a whole vector past a row's end.
 *
 * The memory is `shared`: `grow` then leaves every existing view valid, but `memory.buffer` returns
 * a new SharedArrayBuffer after each grow, so arena arrays are recognised by their buffer being
 * one of those the arena handed out (a WeakSet), and a view's wasm address is its byteOffset.
 *
 * Limits: the memory's maximum is 2 GiB (32768 pages: pointers stay non-negative int32, as the gemm
 * task words need); tensor blocks stop at `TTT_CPU_ARENA_MB` (default: that maximum; 0 = no tensor
 * storage in the arena), and past it the pool hands out ordinary typed arrays, which every kernel
 * still accepts (JS loops or staged copies). Kernel scratch (`allocScratch`) may use the memory up
 * to its maximum, so staging still works when tensors have filled their share.
 */
import type { HostArray } from '../../engine/dtype.js';

const PAGE = 65536;
/** Must match the maximum the wasm modules declare for their imported memory. */
export const ARENA_MAX_PAGES = 32768;
const ALIGN = 64;
const SLACK = 64;
/** Grow by at least this much (or by half the current size) so growing is rare. */
const MIN_GROW = 16 << 20;

type Ctor = Float32ArrayConstructor | Float64ArrayConstructor | Int32ArrayConstructor | Uint8ArrayConstructor;

/** Size class (bytes) of a request: 64-byte steps to 4 KiB, then 8 steps per power of two. */
export function sizeClass(bytes: number): number {
  const b = Math.max(ALIGN, Math.ceil(bytes / ALIGN) * ALIGN);
  if (b <= 4096) return b;
  const step = 2 ** (Math.floor(Math.log2(b)) - 3);
  return Math.ceil(b / step) * step;
}

export interface ArenaStats {
  /** Whether tensor storage comes from the arena. */
  enabled: boolean;
  /** Cap on the bytes tensor blocks may reach (TTT_CPU_ARENA_MB). */
  limitBytes: number;
  memoryBytes: number;
  /** High-water mark of the bump pointer: bytes ever carved into blocks. */
  usedBytes: number;
  liveBlocks: number;
  liveBytes: number;
  freeBlocks: number;
  /** Tensor requests the arena could not serve (limit or maximum reached). */
  fallbacks: number;
}

export class Arena {
  readonly memory = new WebAssembly.Memory({ initial: 1, maximum: ARENA_MAX_PAGES, shared: true });
  private buffers = new WeakSet<object>();
  /** typed as ArrayBuffer (as `memory.buffer` is in lib.dom), a SharedArrayBuffer at run time */
  private current!: ArrayBuffer;
  /** Address 0 is never handed out, so a zero pointer is never valid data. */
  private top = ALIGN;
  private readonly free = new Map<number, number[]>();
  private freeCount = 0;
  /** Block start -> class bytes, for every block handed out and not yet freed. */
  private readonly live = new Map<number, number>();
  private liveBytes = 0;
  private fallbacks = 0;

  constructor(
    public enabled: boolean,
    public limitBytes: number,
  ) {
    this.refresh();
  }

  static fromEnv(): Arena {
    const mb = Number.parseFloat(process.env.TTT_CPU_ARENA_MB ?? '');
    const max = ARENA_MAX_PAGES * PAGE;
    const limit = Number.isFinite(mb) && mb >= 0 ? Math.min(max, mb * 2 ** 20) : max;
    return new Arena(limit > 0, limit);
  }

  private refresh(): void {
    this.current = this.memory.buffer;
    this.buffers.add(this.current);
  }

  /** True when `a` views the arena's memory (any of its buffers), so `a.byteOffset` is its wasm address. */
  owns(a: ArrayBufferView): boolean {
    return this.buffers.has(a.buffer);
  }

  /** Views of the whole memory, current after any grow (for staging copies). */
  heap<C extends Ctor>(C: C): InstanceType<C> {
    return new C(this.current) as InstanceType<C>;
  }

  /** A tensor block of `bytes`, or -1 when the arena is off or full (the caller uses a plain array). */
  allocTensor(bytes: number): number {
    if (!this.enabled) return -1;
    const p = this.take(bytes, this.limitBytes);
    if (p < 0) this.fallbacks++;
    return p;
  }

  /** A scratch block for kernels (staging, workspaces); -1 only when the memory's maximum is reached. */
  allocScratch(bytes: number): number {
    return this.take(bytes, ARENA_MAX_PAGES * PAGE);
  }

  private take(bytes: number, ceiling: number): number {
    const cls = sizeClass(bytes);
    const list = this.free.get(cls);
    let p: number;
    if (list !== undefined && list.length > 0) {
      p = list.pop()!;
      this.freeCount--;
    } else {
      if (this.top + cls + SLACK > ceiling || !this.ensure(this.top + cls + SLACK)) return -1;
      p = this.top;
      this.top += cls;
    }
    this.live.set(p, cls);
    this.liveBytes += cls;
    return p;
  }

  private ensure(bytes: number): boolean {
    const have = this.current.byteLength;
    if (bytes <= have) return true;
    const want = Math.min(ARENA_MAX_PAGES * PAGE, Math.max(bytes, have + Math.max(MIN_GROW, have >> 1)));
    try {
      this.memory.grow(Math.ceil((want - have) / PAGE));
    } catch {
      try {
        this.memory.grow(Math.ceil((bytes - have) / PAGE)); // the generous step may be what failed
      } catch {
        return false;
      }
    }
    this.refresh();
    return true;
  }

  /** A typed view of `length` elements at block `p`. */
  view<C extends Ctor>(C: C, p: number, length: number): InstanceType<C> {
    return new C(this.current, p, length) as InstanceType<C>;
  }

  /** Gives a block back; false if `p` is not the start of a live block (the caller's bug). */
  release(p: number): boolean {
    const cls = this.live.get(p);
    if (cls === undefined) return false;
    this.live.delete(p);
    this.liveBytes -= cls;
    let list = this.free.get(cls);
    if (list === undefined) {
      list = [];
      this.free.set(cls, list);
    }
    list.push(p);
    this.freeCount++;
    return true;
  }

  /** True when `a` is a whole live block's view (its start, within the block). */
  isBlock(a: HostArray): boolean {
    if (!this.owns(a)) return false;
    const cls = this.live.get(a.byteOffset);
    return cls !== undefined && a.byteLength <= cls;
  }

  stats(): ArenaStats {
    return {
      enabled: this.enabled, limitBytes: this.limitBytes, memoryBytes: this.current.byteLength, usedBytes: this.top,
      liveBlocks: this.live.size, liveBytes: this.liveBytes, freeBlocks: this.freeCount, fallbacks: this.fallbacks,
    };
  }
}

/** The process-wide arena: the pool's tensor storage and the wasm kernels' one memory. */
export const arena = Arena.fromEnv();
