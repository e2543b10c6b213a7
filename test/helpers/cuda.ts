/**
 * What the cuda test files share: whether a GPU is usable (else a skip reason, printed once), and
 * whether koffi is installed (the stand-in-library checks need it, not a GPU).
 */
import * as T from '../../src/index.js';
import type { CudaBackend } from '../../src/backends/cuda/backend.js';

/** The cuda backend, or null and `{ skip: reason }` options for the GPU suites of `file`. */
export function cudaOrSkip(file: string): { cuda: CudaBackend | null; gpu: { skip?: string } } {
  let cuda: CudaBackend | null = null;
  let reason = '';
  try {
    cuda = T.setBackend('cuda') as unknown as CudaBackend;
  } catch (e) {
    const msg = (e as Error).message.replace(/\s+/g, ' ');
    reason = `no usable CUDA device: ${msg.length > 240 ? `${msg.slice(0, 240)}…` : msg}`;
  } finally {
    T.setBackend('cpu');
  }
  if (!cuda) console.log(`# ${file}: GPU checks skipped (${reason})`);
  return { cuda, gpu: cuda ? {} : { skip: reason } };
}

/** `{}` when koffi loads, else `{ skip: reason }` (koffi is an optional dependency). */
export async function koffiOrSkip(): Promise<{ skip?: string }> {
  try {
    await import('koffi');
    return {};
  } catch {
    return { skip: 'koffi is not installed' };
  }
}
