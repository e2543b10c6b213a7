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

function rotl(x: number, r: number): number {
  return ((x << r) | (x >>> (32 - r))) >>> 0;
}

/** Threefry-2x32 of the counter pair (c0, c1) under `key`. */
export function threefry2x32(key: Key, c0: number, c1: number): [number, number] {
  const k0 = key[0] >>> 0;
  const k1 = key[1] >>> 0;
  const k2 = (k0 ^ k1 ^ 0x1bd11bda) >>> 0;
  const ks = [k0, k1, k2];
  let x0 = (c0 + k0) >>> 0;
  let x1 = (c1 + k1) >>> 0;
  for (let block = 0; block < 5; block++) {
    for (let r = 0; r < 4; r++) {
      x0 = (x0 + x1) >>> 0;
      x1 = rotl(x1, ROTATIONS[(block % 2) * 4 + r]) ^ x0;
    }
    x0 = (x0 + ks[(block + 1) % 3]) >>> 0;
    x1 = (x1 + ks[(block + 2) % 3] + block + 1) >>> 0;
  }
  return [x0, x1];
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

/** `n` uniform numbers in [0, 1) with 32 random bits each. */
export function uniformHost(key: Key, n: number): Float64Array {
  const out = new Float64Array(n);
  for (let i = 0; i < n; i += 2) {
    const [a, b] = threefry2x32(key, i, 0x5eed);
    out[i] = a / 2 ** 32;
    if (i + 1 < n) out[i + 1] = b / 2 ** 32;
  }
  return out;
}

/** `n` standard normal numbers (Box-Muller on uniforms in (0, 1]). */
export function normalHost(key: Key, n: number): Float64Array {
  const u = uniformHost(key, n + (n % 2));
  const out = new Float64Array(n);
  for (let i = 0; i < n; i += 2) {
    const r = Math.sqrt(-2 * Math.log(1 - u[i]));
    const t = 2 * Math.PI * u[i + 1];
    out[i] = r * Math.cos(t);
    if (i + 1 < n) out[i + 1] = r * Math.sin(t);
  }
  return out;
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
  while (filled < n) {
    const draw = normalHost(foldIn(key, round++), Math.max(16, (n - filled) * 2));
    for (let i = 0; i < draw.length && filled < n; i++) if (Math.abs(draw[i]) <= 2) out[filled++] = draw[i] * std;
  }
  return upload(out, shape, dtype);
}

/** Integers uniform in [low, high). */
export function randint(key: Key, shape: Shape, low: number, high: number): Tensor {
  const u = uniformHost(key, sizeOf(shape));
  for (let i = 0; i < u.length; i++) u[i] = low + Math.floor(u[i] * (high - low));
  return upload(u, shape, 'int32');
}
