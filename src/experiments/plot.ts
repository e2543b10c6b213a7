/** Line charts as SVG through vega-lite (rendered headless by vega; no canvas needed). */
import * as vega from 'vega';
import * as vl from 'vega-lite';

export interface Series {
  name: string;
  points: [number, number][];
}

export async function lineChartSvg(opts: { title: string; xTitle: string; yTitle: string; series: Series[]; logX?: boolean }): Promise<string> {
  const values = opts.series.flatMap((s) => s.points.map(([x, y]) => ({ x, y, model: s.name })));
  const spec = vl.compile({
    $schema: 'https://vega.github.io/schema/vega-lite/v5.json',
    title: opts.title,
    width: 560,
    height: 320,
    data: { values },
    mark: { type: 'line', point: true },
    encoding: {
      x: { field: 'x', type: 'quantitative', title: opts.xTitle, scale: opts.logX ? { type: 'log', base: 2 } : { zero: false } },
      y: { field: 'y', type: 'quantitative', title: opts.yTitle, scale: { zero: false } },
      color: { field: 'model', type: 'nominal', title: 'model' },
    },
  }).spec;
  const view = new vega.View(vega.parse(spec), { renderer: 'none' });
  const svg = await view.toSVG();
  view.finalize();
  return svg;
}
