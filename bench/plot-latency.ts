/**
 * The latency plots of issue #6 from bench/results/latency-cuda.json (written by bench/cuda-latency.ts
 * on the GPU machine; this runs anywhere): prefill seconds and decode milliseconds per token vs context
 * length for full attention, SWA and TTT-E2E → docs/latency-prefill.svg, docs/latency-decode.svg.
 * Usage: node dist/bench/plot-latency.js [results json]
 */
import { readFileSync, writeFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { lineChartSvg } from '../src/experiments/plot.js';
import { join } from 'node:path';
import { repoRoot } from '../src/util/repo-root.js';
import { resultsPath } from './common.js';

interface Row {
  variant: string;
  context: number;
  prefillS: number;
  decodeMsPerToken: number;
  decodeNoPlanMsPerToken?: number;
}

const NAMES: Record<string, string> = { full: 'full attention', swa: 'SWA', e2e: 'TTT-E2E' };

export async function main(): Promise<void> {
  const file = process.argv[2] ?? resultsPath('latency-cuda.json');
  const data = JSON.parse(readFileSync(file, 'utf8')) as { date: string; backend: { device?: string }; rows: Row[] };
  const variants = [...new Set(data.rows.map((r) => r.variant))];
  const series = (y: (r: Row) => number | undefined, suffix = '') =>
    variants.map((v) => ({
      name: `${NAMES[v] ?? v}${suffix}`,
      points: data.rows.filter((r) => r.variant === v && y(r) !== undefined).map((r) => [r.context, y(r)!] as [number, number]),
    }));
  const where = `${data.backend.device ?? 'GPU'}, ${data.date.slice(0, 10)}`;
  const docs = join(repoRoot() ?? '.', 'docs');
  const prefill = await lineChartSvg({ title: `125m prefill vs context (${where})`, xTitle: 'context (tokens)', yTitle: 'prefill (s)', series: series((r) => r.prefillS), logX: true });
  const decode = await lineChartSvg({
    title: `125m decode latency vs context (${where})`, xTitle: 'context (tokens)', yTitle: 'ms per token', logX: true,
    series: [...series((r) => r.decodeMsPerToken), ...series((r) => r.decodeNoPlanMsPerToken, ', no launch plan')],
  });
  writeFileSync(join(docs, 'latency-prefill.svg'), prefill);
  writeFileSync(join(docs, 'latency-decode.svg'), decode);
  console.log(`wrote docs/latency-prefill.svg and docs/latency-decode.svg from ${file}`);
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) await main();
