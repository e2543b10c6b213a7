import './methods.js';
import { CpuBackend } from '../backends/cpu/backend.js';
import { CudaBackend } from '../backends/cuda/backend.js';
import { registerBackend } from './runtime.js';

registerBackend('cpu', () => new CpuBackend());
// Lazy: koffi and the CUDA libraries load only when 'cuda' is chosen (setBackend / TTT_DEVICE).
registerBackend('cuda', () => new CudaBackend());

export * from './ops.js';
export * from './autodiff.js';
export * from './attention.js';
export * from './kv-store.js';
export * from './launch-plan.js';
export * from './norm.js';
export * from './optim.js';
export * from './rope.js';
export * from './swiglu.js';
export * from './loss.js';
export { TensorCache } from './cache.js';
export * from './random.js';
export { Tensor, engineCacheEntry, keep, liveTensorCount, trackLiveTensors, trackedLiveTensors } from './tensor.js';
export { backendKey, getBackend, setBackend, registerBackend, listBackends, phase, setPhaseTiming } from './runtime.js';
export type { AdamWEntry, AdamWHyper, AttentionJob, Backend, MatmulJob, PhaseTime } from './backend.js';
export { sumPhaseSpans } from './backend.js';
export type { DType } from './dtype.js';
export { fromBfloat16Bits, roundToBfloat16, toBfloat16Bits } from './dtype.js';
export type { Shape } from './shape.js';
export { type Tree, leaves, mapLeaves, unflatten, zipMap } from './pytree.js';
