/**
 * A bounded least-recently-used cache of tensors the engine owns: scalar constants, attention band
 * biases, RoPE tables — values that are the same every time a key comes round and cost a fill or
 * an upload to make. Entries are kept across `tidy` and left out of `liveTensorCount`
 * (`engineCacheEntry`); callers get their own alias of an entry's storage, so evicting or clearing
 * an entry never breaks a tensor still in use.
 */
import { alias, pinWhileRecording } from './runtime.js';
import { type Tensor, engineCacheEntry } from './tensor.js';

export class TensorCache {
  private readonly entries = new Map<string, Tensor>();

  constructor(private readonly max: number) {}

  /** The tensor for `key` (made by `make` on a miss), as the caller's own alias. */
  get(key: string, make: () => Tensor): Tensor {
    let t = this.entries.get(key);
    if (t) {
      this.entries.delete(key); // most recently used goes last
    } else {
      t = engineCacheEntry(make());
      if (this.entries.size >= this.max) {
        const [oldest, old] = this.entries.entries().next().value as [string, Tensor];
        this.entries.delete(oldest);
        old.dispose();
      }
    }
    this.entries.set(key, t);
    pinWhileRecording(t);
    return alias(t);
  }

  /** Frees every entry (they are made again on demand). */
  clear(): void {
    for (const t of this.entries.values()) t.dispose();
    this.entries.clear();
  }
}
