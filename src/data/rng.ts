/**
 * Small seeded randomness for the data layer. Data must be reproducible from (seed, index) alone, across
 * processes and machines, so everything here is integer arithmetic with no dependence on Math.random or on
 * the engine's RNG (whose key-splitting scheme may change under the engine's own needs).
 */

/** 32-bit hash of a list of numbers and strings (FNV-1a over a canonical encoding, then murmur3's finaliser). */
export function hash32(...parts: (number | string)[]): number {
  let h = 0x811c9dc5;
  const mix = (byte: number) => {
    h ^= byte & 0xff;
    h = Math.imul(h, 0x01000193);
  };
  for (const p of parts) {
    const s = typeof p === 'number' ? `n${p}` : `s${p}`;
    for (let i = 0; i < s.length; i++) {
      const c = s.charCodeAt(i);
      mix(c);
      mix(c >>> 8);
    }
    mix(0x1f); // separator, so ('ab','c') and ('a','bc') differ
  }
  h ^= h >>> 16;
  h = Math.imul(h, 0x85ebca6b);
  h ^= h >>> 13;
  h = Math.imul(h, 0xc2b2ae35);
  h ^= h >>> 16;
  return h >>> 0;
}

/** A seeded generator (mulberry32): uniform floats in [0, 1) and integers in [0, n). */
export class Rng {
  private s: number;
  constructor(seed: number) {
    this.s = seed >>> 0;
  }
  uint32(): number {
    this.s = (this.s + 0x6d2b79f5) >>> 0;
    let t = this.s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return (t ^ (t >>> 14)) >>> 0;
  }
  float(): number {
    return this.uint32() / 4294967296;
  }
  int(n: number): number {
    return Math.floor(this.float() * n);
  }
  pick<T>(xs: readonly T[]): T {
    return xs[this.int(xs.length)];
  }
}

/** A permutation of 0..n-1 (Fisher-Yates) determined by the seed. */
export function permutation(n: number, seed: number): Uint32Array {
  const p = new Uint32Array(n);
  for (let i = 0; i < n; i++) p[i] = i;
  const r = new Rng(seed);
  for (let i = n - 1; i > 0; i--) {
    const j = r.int(i + 1);
    const t = p[i];
    p[i] = p[j];
    p[j] = t;
  }
  return p;
}
