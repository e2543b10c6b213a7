/**
 * Finds and opens the native libraries of the CUDA backend (driver, NVRTC, cuBLAS) with koffi.
 * Search order, for each library: `CUDA_LIB_DIR`, the usual toolkit folders, the pip `nvidia-*`
 * wheel layout (site-packages/nvidia/<part>/lib), then the system loader (LD_LIBRARY_PATH, ldconfig).
 * Nothing here is imported until the 'cuda' backend is chosen, so the CPU backend never needs koffi.
 */
import { existsSync, readdirSync } from 'node:fs';
import { createRequire } from 'node:module';
import { homedir } from 'node:os';
import { join } from 'node:path';

/** The part of koffi's API this backend uses (declared here so the build never needs koffi's types). */
export interface Lib {
  func(declaration: string): (...args: unknown[]) => unknown;
}
export interface Koffi {
  load(path: string): Lib;
  alloc(type: string, length: number): unknown;
  free(ptr: unknown): void;
  address(ptr: unknown): bigint;
  view(ptr: unknown, length: number): ArrayBuffer;
}

let koffiModule: Koffi | null = null;

/** koffi, loaded on first use; a clear error when the optional dependency is absent. */
export function koffi(): Koffi {
  if (koffiModule) return koffiModule;
  try {
    const req = createRequire(import.meta.url);
    const mod = req('koffi') as Koffi & { default?: Koffi };
    koffiModule = mod.default ?? mod;
  } catch (e) {
    throw new Error(
      `cuda backend: the optional dependency 'koffi' could not be loaded (${(e as Error).message.split('\n')[0]}); ` +
        `install it with \`npm install koffi\` to use --device cuda`,
    );
  }
  return koffiModule;
}

export interface LibrarySpec {
  /** What the error message calls it. */
  what: string;
  /** File names to try in each folder, best first (globs of the form prefix* are allowed). */
  names: string[];
  /** Sub-folder of site-packages/nvidia/ in the pip wheel layout (e.g. 'cublas'), if any. */
  wheel?: string;
  /** Whether the toolkit folders apply (false for the driver, which lives with the system's driver). */
  toolkit: boolean;
}

export const LIBRARIES = {
  driver: { what: 'the CUDA driver', names: ['libcuda.so.1', 'libcuda.so'], toolkit: false },
  nvrtc: { what: 'NVRTC (the CUDA runtime compiler)', names: ['libnvrtc.so.13', 'libnvrtc.so.12', 'libnvrtc.so', 'libnvrtc.so.*'], wheel: 'cuda_nvrtc', toolkit: true },
  cublas: { what: 'cuBLAS', names: ['libcublas.so.13', 'libcublas.so.12', 'libcublas.so', 'libcublas.so.*'], wheel: 'cublas', toolkit: true },
} satisfies Record<string, LibrarySpec>;

function toolkitDirs(): string[] {
  const dirs = ['/usr/local/cuda/lib64', '/usr/local/cuda/targets/x86_64-linux/lib', '/usr/local/cuda/targets/sbsa-linux/lib'];
  try {
    for (const d of readdirSync('/usr/local').sort().reverse()) {
      if (/^cuda-\d/.test(d)) dirs.push(`/usr/local/${d}/lib64`, `/usr/local/${d}/targets/x86_64-linux/lib`, `/usr/local/${d}/targets/sbsa-linux/lib`);
    }
  } catch {
    // no /usr/local
  }
  if (process.env.CUDA_HOME) dirs.unshift(join(process.env.CUDA_HOME, 'lib64'));
  if (process.env.CUDA_PATH) dirs.unshift(join(process.env.CUDA_PATH, 'lib64'));
  return dirs;
}

function driverDirs(): string[] {
  return ['/usr/local/nvidia/lib64', '/usr/lib/x86_64-linux-gnu', '/usr/lib64', '/usr/lib/wsl/lib'];
}

/** site-packages folders that may hold pip's nvidia-* wheels. */
function sitePackages(): string[] {
  const roots = new Set<string>();
  for (const p of (process.env.PYTHONPATH ?? '').split(':')) if (p) roots.add(p);
  const prefixes = [process.env.VIRTUAL_ENV, process.env.CONDA_PREFIX, '/usr', '/usr/local', '/opt/conda', join(homedir(), '.local')];
  for (const pre of prefixes) {
    if (!pre) continue;
    for (const lib of ['lib', 'lib64']) {
      const base = join(pre, lib);
      let entries: string[] = [];
      try {
        entries = readdirSync(base).filter((d) => /^python3/.test(d));
      } catch {
        continue;
      }
      for (const py of entries) for (const sp of ['site-packages', 'dist-packages']) roots.add(join(base, py, sp));
    }
  }
  return [...roots].filter((r) => existsSync(join(r, 'nvidia')));
}

function candidates(dir: string, names: string[]): string[] {
  const out: string[] = [];
  let listing: string[] | null = null;
  for (const n of names) {
    if (n.endsWith('*')) {
      try {
        listing ??= readdirSync(dir);
      } catch {
        return out;
      }
      const pre = n.slice(0, -1);
      out.push(...listing.filter((f) => f.startsWith(pre)).sort().reverse().map((f) => join(dir, f)));
    } else if (existsSync(join(dir, n))) {
      out.push(join(dir, n));
    }
  }
  return out;
}

/** Opens one library; throws one error naming every place looked and why each failed. */
export function openLibrary(spec: LibrarySpec): { lib: Lib; path: string } {
  const k = koffi();
  const dirs: string[] = [];
  if (process.env.CUDA_LIB_DIR) dirs.push(...process.env.CUDA_LIB_DIR.split(':').filter(Boolean));
  if (spec.toolkit) dirs.push(...toolkitDirs());
  if (spec.wheel) for (const sp of sitePackages()) dirs.push(join(sp, 'nvidia', spec.wheel, 'lib'), join(sp, 'nvidia', 'cu13', 'lib'));
  if (!spec.toolkit) dirs.push(...driverDirs());
  const failures: string[] = [];
  const tried = new Set<string>();
  for (const dir of dirs) {
    for (const path of candidates(dir, spec.names)) {
      if (tried.has(path)) continue;
      tried.add(path);
      try {
        return { lib: k.load(path), path };
      } catch (e) {
        failures.push(`${path}: ${(e as Error).message}`);
      }
    }
  }
  // Last: the system loader by bare name (LD_LIBRARY_PATH, ldconfig's cache).
  for (const n of spec.names.filter((x) => !x.includes('*'))) {
    try {
      return { lib: k.load(n), path: n };
    } catch (e) {
      failures.push(`${n} (system loader): ${(e as Error).message}`);
    }
  }
  throw new Error(
    `cuda backend: could not load ${spec.what}. Looked for ${spec.names.join(', ')} in ` +
      `${dirs.length ? dirs.join(', ') : '(no folders)'} and through the system loader (LD_LIBRARY_PATH, ldconfig)` +
      `${failures.length ? `; failures: ${failures.join('; ')}` : ''}. ` +
      (spec.toolkit
        ? 'Set CUDA_LIB_DIR to the folder that holds it (a CUDA toolkit lib64, or pip\'s nvidia/*/lib).'
        : 'Is an NVIDIA driver installed and a GPU present? (CUDA_LIB_DIR may name the driver\'s folder too.)'),
  );
}
