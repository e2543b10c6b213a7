/**
 * safetensors files (8-byte little-endian header length, JSON header, raw little-endian data).
 * Hand-written: the npm registry has no maintained Node reader/writer, and the format is small.
 * Writes are atomic (temp file + rename), so a crash never leaves a half-written file in place.
 */
import { closeSync, fsyncSync, openSync, readFileSync, renameSync, writeSync } from 'node:fs';
import type { DType } from '../engine/dtype.js';
import type { HostArray } from '../engine/dtype.js';

const TO_ST: Partial<Record<DType, string>> = { float32: 'F32', float64: 'F64', int32: 'I32', bool: 'BOOL' };
const FROM_ST: Record<string, DType> = { F32: 'float32', F64: 'float64', I32: 'int32', BOOL: 'bool' };

export interface StoredTensor {
  dtype: DType;
  shape: number[];
  data: HostArray;
}

export function writeSafetensors(path: string, tensors: Map<string, StoredTensor>, metadata: Record<string, string> = {}): void {
  const header: Record<string, unknown> = { __metadata__: metadata };
  let offset = 0;
  for (const [name, t] of tensors) {
    const st = TO_ST[t.dtype];
    if (!st) throw new Error(`safetensors: cannot store dtype ${t.dtype} (${name})`);
    const bytes = t.data.byteLength;
    header[name] = { dtype: st, shape: t.shape, data_offsets: [offset, offset + bytes] };
    offset += bytes;
  }
  let json = JSON.stringify(header);
  json += ' '.repeat((8 - (json.length % 8)) % 8); // keeps the data 8-byte aligned
  const head = Buffer.from(json, 'utf8');
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(head.length));
  const tmp = `${path}.tmp-${process.pid}`;
  const fd = openSync(tmp, 'w');
  try {
    writeSync(fd, len);
    writeSync(fd, head);
    for (const t of tensors.values()) writeSync(fd, new Uint8Array(t.data.buffer, t.data.byteOffset, t.data.byteLength));
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
  renameSync(tmp, path);
}

export function readSafetensors(path: string): { tensors: Map<string, StoredTensor>; metadata: Record<string, string> } {
  let buf: Buffer;
  try {
    buf = readFileSync(path);
  } catch (e) {
    throw new Error(`cannot read ${path}: ${(e as Error).message}`);
  }
  const corrupt = (why: string) => new Error(`${path} is not a valid safetensors file: ${why}`);
  if (buf.length < 8) throw corrupt('shorter than its 8-byte header length');
  const n = Number(buf.readBigUInt64LE(0));
  if (n <= 0 || 8 + n > buf.length) throw corrupt(`header length ${n} does not fit the file (${buf.length} bytes)`);
  let header: Record<string, any>;
  try {
    header = JSON.parse(buf.subarray(8, 8 + n).toString('utf8'));
  } catch {
    throw corrupt('header is not JSON');
  }
  const base = 8 + n;
  const tensors = new Map<string, StoredTensor>();
  for (const [name, info] of Object.entries(header)) {
    if (name === '__metadata__') continue;
    const dtype = FROM_ST[info?.dtype];
    if (!dtype) throw corrupt(`tensor ${name} has unsupported dtype ${info?.dtype}`);
    const [lo, hi] = info.data_offsets ?? [];
    const shape: number[] = info.shape;
    const count = shape.reduce((a, b) => a * b, 1);
    const width = dtype === 'float64' ? 8 : dtype === 'bool' ? 1 : 4;
    if (!(hi - lo === count * width && base + hi <= buf.length)) throw corrupt(`tensor ${name} has bad offsets [${lo}, ${hi}]`);
    const bytes = buf.subarray(base + lo, base + hi);
    const copy = new Uint8Array(bytes); // aligned copy
    const data = dtype === 'float32' ? new Float32Array(copy.buffer) : dtype === 'float64' ? new Float64Array(copy.buffer)
      : dtype === 'int32' ? new Int32Array(copy.buffer) : copy;
    tensors.set(name, { dtype, shape, data });
  }
  return { tensors, metadata: (header.__metadata__ ?? {}) as Record<string, string> };
}
