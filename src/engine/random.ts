/**
 * Counter-based random numbers (Threefry-2x32, 20 rounds, as in JAX's PRNG). Keys are explicit and
 * split like JAX's, and the numbers are generated on the host, so the same key gives the same
 * values on every backend.
 */
import { type DType, hostArray } from './dtype.js';
import { fromData, getBackend } from './runtime.js';
import { type Shape, sizeOf } from './shape.js';
import type { Tensor } from './tensor.js';

/** A PRNG key: two 32-bit words. */
export type Key = readonly [number, number];

const ROTATIONS = [13, 15, 26, 6, 17, 29, 16, 24];

/** The two output words of the last `threefryInto` call (no array per call on the hot paths). */
const words = new Uint32Array(2);

/** Threefry-2x32 (20 rounds) of the counter pair (c0, c1) under the key words (k0, k1), into `words`. */
function threefryInto(k0: number, k1: number, c0: number, c1: number): void {
  const k2 = (k0 ^ k1 ^ 0x1bd11bda) >>> 0;
  let x0 = (c0 + k0) >>> 0;
  let x1 = (c1 + k1) >>> 0;
  for (let block = 0; block < 5; block++) {
    const rot = (block % 2) * 4;
    for (let r = 0; r < 4; r++) {
      const n = ROTATIONS[rot + r];
      x0 = (x0 + x1) >>> 0;
      x1 = (((x1 << n) | (x1 >>> (32 - n))) ^ x0) >>> 0;
    }
    const s = block % 3; // key schedule: ks[(block + 1) % 3] and ks[(block + 2) % 3]
    x0 = (x0 + (s === 0 ? k1 : s === 1 ? k2 : k0)) >>> 0;
    x1 = (x1 + (s === 0 ? k2 : s === 1 ? k0 : k1) + block + 1) >>> 0;
  }
  words[0] = x0;
  words[1] = x1;
}

/** Threefry-2x32 of the counter pair (c0, c1) under `key`. */
export function threefry2x32(key: Key, c0: number, c1: number): [number, number] {
  threefryInto(key[0] >>> 0, key[1] >>> 0, c0, c1);
  return [words[0], words[1]];
}

export function randomKey(seed: number): Key {
  if (!Number.isInteger(seed)) throw new Error(`randomKey: seed must be an integer, got ${seed}`);
  return [Math.floor(seed / 2 ** 32) >>> 0, seed >>> 0];
}

/** n independent keys derived from `key`. */
export function splitKey(key: Key, n = 2): Key[] {
  return Array.from({ length: n }, (_, i) => threefry2x32(key, 0, i) as Key);
}

/** A key for a named purpose (e.g. one parameter), derived from `key` and a string. */
export function foldIn(key: Key, data: number | string): Key {
  let h = typeof data === 'number' ? data >>> 0 : 2166136261;
  if (typeof data === 'string') for (let i = 0; i < data.length; i++) h = Math.imul(h ^ data.charCodeAt(i), 16777619) >>> 0;
  return threefry2x32(key, h, 0x9e3779b9) as Key;
}

/** Uniforms for counters [start, start + n) (start even) into out[at ..]: the pair (i, i + 1) is threefry2x32(key, i, 0x5eed) / 2^32. */
function uniformInto(key: Key, start: number, n: number, out: Float64Array, at: number): void {
  const k0 = key[0] >>> 0;
  const k1 = key[1] >>> 0;
  for (let i = 0; i < n; i += 2) {
    threefryInto(k0, k1, start + i, 0x5eed);
    out[at + i] = words[0] / 2 ** 32;
    if (i + 1 < n) out[at + i + 1] = words[1] / 2 ** 32;
  }
}

/** `n` uniform numbers in [0, 1) with 32 random bits each. */
export function uniformHost(key: Key, n: number): Float64Array {
  const out = new Float64Array(n);
  uniformInto(key, 0, n, out, 0);
  return out;
}

/** Box-Muller on the uniform pairs of u[0 .. n) (n even), in place: (u1, u2) -> (r cos t, r sin t). */
function boxMuller(u: Float64Array, n: number): void {
  for (let i = 0; i < n; i += 2) {
    const r = Math.sqrt(-2 * Math.log(1 - u[i]));
    const t = 2 * Math.PI * u[i + 1];
    u[i] = r * Math.cos(t);
    u[i + 1] = r * Math.sin(t);
  }
}

/** `n` standard normal numbers (Box-Muller on uniforms in (0, 1]). */
export function normalHost(key: Key, n: number): Float64Array {
  const m = n + (n % 2);
  const u = new Float64Array(m);
  uniformInto(key, 0, m, u, 0);
  boxMuller(u, m);
  return m === n ? u : u.subarray(0, n);
}

function upload(values: Float64Array, shape: Shape, dtype: DType): Tensor {
  const host = hostArray(dtype, values.length);
  host.set(values);
  const backend = getBackend();
  return fromData(backend.upload(host, dtype), shape, dtype, backend);
}

export function uniform(key: Key, shape: Shape, opts: { min?: number; max?: number; dtype?: DType } = {}): Tensor {
  const { min = 0, max = 1, dtype = 'float32' } = opts;
  const u = uniformHost(key, sizeOf(shape));
  for (let i = 0; i < u.length; i++) u[i] = min + (max - min) * u[i];
  return upload(u, shape, dtype);
}

export function randn(key: Key, shape: Shape, dtype: DType = 'float32'): Tensor {
  return upload(normalHost(key, sizeOf(shape)), shape, dtype);
}

/** Normal(0, std²) truncated to ±2 std (redrawn, as the reference's truncated-normal init). */
export function truncatedNormal(key: Key, shape: Shape, std = 1, dtype: DType = 'float32'): Tensor {
  const n = sizeOf(shape);
  const out = new Float64Array(n);
  let filled = 0;
  let round = 0;
  // Round r draws up to max(16, 2·(n − filled)) normals from foldIn(key, r) and keeps those within
  // two standard deviations. The stream is generated in chunks and stops once out is full: a
  // counter-based stream's prefix does not depend on its length, so the values are the same as
  // drawing the whole round, at about half the work (95% are accepted).
  const chunk = new Float64Array(8192);
  while (filled < n) {
    const roundKey = foldIn(key, round++);
    const length = Math.max(16, (n - filled) * 2);
    for (let start = 0; start < length && filled < n; start += chunk.length) {
      const m = Math.min(chunk.length, length - start); // even: length and chunk.length are
      uniformInto(roundKey, start, m, chunk, 0);
      boxMuller(chunk, m);
      for (let i = 0; i < m && filled < n; i++) if (Math.abs(chunk[i]) <= 2) out[filled++] = chunk[i] * std;
    }
  }
  return upload(out, shape, dtype);
}

/** Integers uniform in [low, high). */
export function randint(key: Key, shape: Shape, low: number, high: number): Tensor {
  const u = uniformHost(key, sizeOf(shape));
  for (let i = 0; i < u.length; i++) u[i] = low + Math.floor(u[i] * (high - low));
  return upload(u, shape, 'int32');
}
