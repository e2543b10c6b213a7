/** bench/results/<file> of the repository, whether a bench runs from bench/ (tsx) or dist/bench/ (built). */
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { repoRoot } from '../src/util/repo-root.js';

export function resultsPath(file: string): string {
  const out = join(repoRoot() ?? '.', 'bench', 'results');
  mkdirSync(out, { recursive: true });
  return join(out, file);
}
