/** ttt-e2e: the public API. */
export * from './engine/index.js';
export * from './data/index.js';
// the layers' one piece of engine-level state: RoPE's cos/sin table cache
export { clearRopeCache } from './nn/layers.js';
