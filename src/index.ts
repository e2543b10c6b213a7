/** ttt-e2e: the public API. */
export * from './engine/index.js';
export * from './data/index.js';
