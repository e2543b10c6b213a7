/** bench/results/<file> of the repository, whether a bench runs from bench/ (tsx) or dist/bench/ (built). */
import { existsSync, mkdirSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

export function resultsPath(file: string): string {
  let dir = dirname(fileURLToPath(import.meta.url));
  while (!existsSync(join(dir, 'package.json')) && dirname(dir) !== dir) dir = dirname(dir);
  const out = join(dir, 'bench', 'results');
  mkdirSync(out, { recursive: true });
  return join(out, file);
}
