/**
 * NVRTC compilation to CUBIN for the device's arch, cached on disk under
 * `$TTT_CACHE_DIR` or `$XDG_CACHE_HOME/ttt-e2e` or `~/.cache/ttt-e2e` (cuda-kernels/), keyed by a
 * hash of the source, the arch, the options and NVRTC's version. A cache that cannot be written
 * (read-only home) only costs a recompile.
 */
import { createHash } from 'node:crypto';
import { mkdirSync, readFileSync, renameSync, writeFileSync } from 'node:fs';
import { homedir } from 'node:os';
import { join } from 'node:path';
import { type Nvrtc, checkNvrtc } from './ffi.js';

export function cacheDir(): string {
  const base = process.env.TTT_CACHE_DIR || (process.env.XDG_CACHE_HOME ? join(process.env.XDG_CACHE_HOME, 'ttt-e2e') : join(homedir(), '.cache', 'ttt-e2e'));
  return join(base, 'cuda-kernels');
}

export interface CompileStats {
  compiled: number;
  fromCache: number;
  compileMs: number;
}

export class KernelCompiler {
  readonly version: string;
  readonly stats: CompileStats = { compiled: 0, fromCache: 0, compileMs: 0 };
  private options: string[];

  constructor(
    private nv: Nvrtc,
    readonly arch: string, // e.g. "90"
  ) {
    const maj: [number | null] = [null];
    const min: [number | null] = [null];
    checkNvrtc(nv, 'nvrtcVersion', nv.nvrtcVersion(maj, min));
    this.version = `${maj[0]}.${min[0]}`;
    // sm_90 compiles as sm_90a: the Hopper-only instructions (wgmma) of the attention forward need it,
    // and the device is exactly the one the CUBIN is built for anyway
    this.options = [`--gpu-architecture=sm_${arch === '90' ? '90a' : arch}`, '--std=c++17'];
  }

  /** CUBIN of `source`; `name` only labels errors. */
  compile(source: string, name: string): Buffer {
    const key = createHash('sha256').update(`${source}\0${this.arch}\0${this.version}\0${this.options.join(' ')}`).digest('hex').slice(0, 32);
    const dir = cacheDir();
    const file = join(dir, `${key}.cubin`);
    try {
      const hit = readFileSync(file);
      this.stats.fromCache++;
      return hit;
    } catch {
      // not cached
    }
    const t0 = performance.now();
    const cubin = this.compileNow(source, name);
    this.stats.compileMs += performance.now() - t0;
    this.stats.compiled++;
    try {
      mkdirSync(dir, { recursive: true });
      const tmp = `${file}.${process.pid}.tmp`;
      writeFileSync(tmp, cubin);
      renameSync(tmp, file);
    } catch {
      // read-only cache: fine
    }
    return cubin;
  }

  private compileNow(source: string, name: string): Buffer {
    const nv = this.nv;
    const prog: [unknown] = [null];
    checkNvrtc(nv, 'nvrtcCreateProgram', nv.nvrtcCreateProgram(prog, source, `${name.replace(/\W/g, '_')}.cu`, 0, null, null));
    try {
      const status = nv.nvrtcCompileProgram(prog[0], this.options.length, this.options) as number;
      if (status !== 0) {
        const size: [number | null] = [null];
        nv.nvrtcGetProgramLogSize(prog[0], size);
        const log = Buffer.alloc(Number(size[0] ?? 0) + 1);
        nv.nvrtcGetProgramLog(prog[0], log);
        throw new Error(
          `cuda backend: NVRTC could not compile kernel module '${name}' for sm_${this.arch} (NVRTC ${this.version}):\n` +
            log.toString('utf8').replace(/\0.*$/s, '').trim().split('\n').slice(0, 30).join('\n'),
        );
      }
      const size: [number | null] = [null];
      checkNvrtc(nv, 'nvrtcGetCUBINSize', nv.nvrtcGetCUBINSize(prog[0], size));
      const cubin = Buffer.alloc(Number(size[0]));
      checkNvrtc(nv, 'nvrtcGetCUBIN', nv.nvrtcGetCUBIN(prog[0], cubin));
      return cubin;
    } finally {
      nv.nvrtcDestroyProgram(prog);
    }
  }
}
