/**
 * Caching device allocator (PyTorch's idea, simplified): sizes round up to buckets, freed blocks go
 * to their bucket's free list and are handed out again without a driver call. Everything runs on
 * one stream, so a block freed by the host may be reused by the next kernel at once: that kernel is
 * queued after every kernel that read the block. When the driver runs out of memory the cache is
 * emptied and the allocation tried once more.
 */
import type { DevicePtr } from './ffi.js';

export interface AllocatorStats {
  /** Bytes handed out and not yet freed (bucket sizes). */
  inUse: number;
  /** Bytes held in free lists, ready for reuse. */
  cached: number;
  /** Highest `inUse` since the last resetPeak(). */
  peak: number;
  /** Blocks handed out and not yet freed. */
  blocks: number;
  /** Driver allocations (cuMemAlloc) so far, and frees (cuMemFree). */
  driverAllocs: number;
  driverFrees: number;
  /** Host time spent in those driver calls (ms). */
  driverMs: number;
}

/** A block of device memory: `bytes` is its bucket size; size-0 tensors get ptr 0. */
export class DeviceBuffer {
  freed = false;
  /** [min, max] of int32 values uploaded from the host (index checks without a device sync). */
  range: [number, number] | null = null;
  constructor(
    readonly ptr: DevicePtr,
    readonly bytes: number,
  ) {}
}

const MiB = 1 << 20;

/** Bucket of a request: 512-byte steps below 1 MiB, 2 MiB steps up to 64 MiB, then 1/16 steps. */
export function bucketOf(bytes: number): number {
  if (bytes <= 0) return 0;
  if (bytes < MiB) return Math.ceil(bytes / 512) * 512;
  if (bytes < 64 * MiB) return Math.ceil(bytes / (2 * MiB)) * 2 * MiB;
  const step = 2 ** Math.floor(Math.log2(bytes)) / 16;
  return Math.ceil(bytes / step) * step;
}

export interface RawMemory {
  alloc(bytes: number): DevicePtr; // throws an error with code CUDA_ERROR_OUT_OF_MEMORY when full
  free(ptr: DevicePtr): void;
  isOutOfMemory(e: unknown): boolean;
}

export class CachingAllocator {
  private free_ = new Map<number, DevicePtr[]>();
  private s: AllocatorStats = { inUse: 0, cached: 0, peak: 0, blocks: 0, driverAllocs: 0, driverFrees: 0, driverMs: 0 };

  constructor(private raw: RawMemory) {}

  alloc(bytes: number): DeviceBuffer {
    const size = bucketOf(bytes);
    if (size === 0) return new DeviceBuffer(0, 0);
    let ptr = this.free_.get(size)?.pop();
    if (ptr !== undefined) {
      this.s.cached -= size;
    } else {
      const t0 = performance.now();
      try {
        ptr = this.raw.alloc(size);
      } catch (e) {
        if (!this.raw.isOutOfMemory(e)) throw e;
        this.emptyCache();
        ptr = this.raw.alloc(size);
      }
      this.s.driverMs += performance.now() - t0;
      this.s.driverAllocs++;
    }
    this.s.inUse += size;
    this.s.blocks++;
    if (this.s.inUse > this.s.peak) this.s.peak = this.s.inUse;
    return new DeviceBuffer(ptr, size);
  }

  /**
   * While recording device work for replay (a CUDA graph), a freed block may not be handed out again:
   * the recording's later kernels and every replay still write there. Such frees are held here and
   * belong to the recording, which gives them back (`release`) when it is disposed.
   */
  private held: DeviceBuffer[] | null = null;

  holdFrees(): void {
    if (this.held) throw new Error('cuda backend: internal: recordings do not nest');
    this.held = [];
  }
  /** Stops holding frees; returns the blocks held since holdFrees(). */
  endHold(): DeviceBuffer[] {
    const held = this.held ?? [];
    this.held = null;
    return held;
  }
  /** Frees blocks a recording held (once nothing that writes them is queued any more). */
  release(blocks: DeviceBuffer[]): void {
    for (const b of blocks) this.put(b);
  }

  free(buf: DeviceBuffer): void {
    if (buf.freed) throw new Error('cuda backend: internal: device buffer freed twice');
    buf.freed = true;
    if (buf.bytes === 0) return;
    if (this.held) {
      this.held.push(buf);
      return;
    }
    this.put(buf);
  }

  private put(buf: DeviceBuffer): void {
    let list = this.free_.get(buf.bytes);
    if (!list) this.free_.set(buf.bytes, (list = []));
    list.push(buf.ptr);
    this.s.inUse -= buf.bytes;
    this.s.cached += buf.bytes;
    this.s.blocks--;
  }

  /** Returns every cached block to the driver. */
  emptyCache(): void {
    const t0 = performance.now();
    for (const list of this.free_.values()) {
      for (const p of list) {
        this.raw.free(p);
        this.s.driverFrees++;
      }
    }
    this.free_.clear();
    this.s.cached = 0;
    this.s.driverMs += performance.now() - t0;
  }

  resetPeak(): void {
    this.s.peak = this.s.inUse;
  }

  stats(): AllocatorStats {
    return { ...this.s };
  }
}
