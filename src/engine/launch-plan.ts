/**
 * Launch plans: a step whose device work is recorded once and replayed, so that a decode step costs
 * one graph launch instead of a few hundred kernel launches, each behind the engine's host-side op
 * logic (on an H100 a `125m` decode step was ~275 launches and 4-7 ms of host time for ~0.3 ms of GPU
 * work). Where the backend cannot record (the CPU), replay runs the step again, which gives the same
 * values, so one code path serves both.
 *
 * The step must be a pure function of device memory that exists before it: it reads its inputs from
 * tensors the caller rewrites between replays (`writeHost`), reads positions from the device (RoPE by
 * `gather`, ring buffers by `writeRowsAt`, attention by `positions`), and leaves its results in
 * tensors made before it (`copyInto`). Everything it creates itself is an intermediate of one replay.
 */
import type { CapturedWork } from './backend.js';
import { hostArray } from './dtype.js';
import { getBackend, isTracked, startPinning, stopPinning } from './runtime.js';
import { fmt, stridesOf } from './shape.js';
import type { Tensor } from './tensor.js';
import { tidy } from './autodiff.js';

export interface LaunchPlan {
  /** Whether the work was recorded (replays skip the host-side op logic) or is run again at each replay. */
  readonly recorded: boolean;
  replay(): void;
  dispose(): void;
}

/**
 * A plan of `step` (run inside `tidy`). On a recording backend, `step` runs once now for real (which
 * also compiles and loads its kernels, since nothing may be loaded while recording) and once more
 * while recording; the first run's writes are the same as a replay's, so callers treat it as a replay
 * and call `replay()` only for later steps. Elsewhere `step` runs now and at each replay.
 */
export function launchPlan(step: () => void): LaunchPlan {
  const backend = getBackend();
  const run = () => tidy(() => void step());
  run();
  if (!backend.captureWork || process.env.TTT_LAUNCH_PLANS === 'eager') return { recorded: false, replay: run, dispose: () => {} };
  startPinning();
  let work: CapturedWork | null;
  let pinned: Tensor[];
  try {
    work = backend.captureWork(run);
  } finally {
    pinned = stopPinning();
  }
  return {
    recorded: true,
    replay: () => {
      if (!work) throw new Error('launch plan: replayed after dispose()');
      work.replay();
    },
    dispose: () => {
      work?.dispose();
      work = null;
      for (const t of pinned) t.dispose();
      pinned = [];
    },
  };
}

/** In place: dst's values become src's (same shape and dtype, same backend). */
export function copyInto(dst: Tensor, src: Tensor): void {
  if (fmt(dst.shape) !== fmt(src.shape) || dst.dtype !== src.dtype || dst.backend !== src.backend) {
    throw new Error(`copyInto: src ${fmt(src.shape)} ${src.dtype} does not match dst ${fmt(dst.shape)} ${dst.dtype} (or lives on another backend)`);
  }
  if (isTracked(dst) || isTracked(src)) throw new Error('copyInto: writes in place and cannot be differentiated');
  if (dst.size === 0) return;
  const strides = stridesOf(dst.shape);
  dst.backend.copy(src.data, 0, strides, dst.data, 0, strides, [...dst.shape], dst.dtype);
}

/** In place: dst's values become `values` (the host side of a plan's inputs). */
export function writeHost(dst: Tensor, values: ArrayLike<number>): void {
  if (values.length !== dst.size) throw new Error(`writeHost: ${values.length} values for a tensor of ${dst.size} (${fmt(dst.shape)})`);
  if (isTracked(dst)) throw new Error('writeHost: writes in place and cannot be differentiated');
  if (dst.size === 0) return;
  const b = dst.backend;
  const host = hostArray(dst.dtype, dst.size);
  host.set(values as ArrayLike<number>);
  const data = b.upload(host, dst.dtype);
  const strides = stridesOf(dst.shape);
  b.copy(data, 0, strides, dst.data, 0, strides, [...dst.shape], dst.dtype);
  b.free(data, dst.dtype, dst.size);
}

export type { CapturedWork };
