/** Learning-rate schedules (SPEC §4) and the inner-lr warm-up (SPEC §3.4), as plain functions of the step. */

export interface LrSchedule {
  peak: number;
  warmupSteps: number;
  totalSteps: number;
  /** The value reached at `totalSteps` (SPEC §4: 1e-5). */
  floor: number;
  kind: 'cosine' | 'linear';
}

/**
 * Linear warm-up to `peak`, then cosine (or linear) decay to `floor` at `totalSteps`, constant after.
 * Warm-up reaches peak/warmupSteps at step 0 (not 0), so the first step already trains.
 */
export function lrAt(step: number, s: LrSchedule): number {
  if (step < s.warmupSteps) return (s.peak * (step + 1)) / s.warmupSteps;
  const span = s.totalSteps - s.warmupSteps;
  const progress = span <= 0 ? 1 : Math.min(1, Math.max(0, (step - s.warmupSteps) / span));
  const shape = s.kind === 'cosine' ? 0.5 * (1 + Math.cos(Math.PI * progress)) : 1 - progress;
  return s.floor + (s.peak - s.floor) * shape;
}

/** Inner-lr multiplier: linear from `ilrInit` at step 0 to 1.0 at `warmupSteps`, then 1.0. */
export function ilrMultiplier(step: number, ilrInit: number, warmupSteps: number): number {
  if (warmupSteps <= 0 || step >= warmupSteps) return 1;
  return ilrInit + ((1 - ilrInit) * Math.max(0, step)) / warmupSteps;
}
