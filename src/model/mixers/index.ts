/** Every sequence mixer, registered on import. */
import './attention.js';
import './gated-deltanet.js';
import './ttt-kvb.js';
import './mamba2.js';

export { type Mixer, type MixerInit, type MixerState, getMixer, registerMixer } from './registry.js';
export type { KvCache } from './attention.js';
