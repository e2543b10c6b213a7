#!/usr/bin/env python3
"""GPU time per kernel of TTT-E2E inner steps, from an ncu CSV of a prefill.

Usage (the CSV from `ncu --csv --metrics gpu__time_duration.sum --print-units base
node dist/bench/cuda-profile.js prefill 16384 > ncu.csv`):
    python3 scripts/ncu-inner-step.py ncu.csv LABEL [OUT.json]
Takes the last four mini-batches of the last prefill in the file (each inner step starts with a
token_nll_fwd launch), sums each kernel's time over them, divides by four and prints the table;
with OUT.json, adds the summary under LABEL to that file (ncu's locked clocks: compare within it).
"""
import csv
import json
import sys
from collections import defaultdict

path, label = sys.argv[1], sys.argv[2]
rows = [r for r in csv.reader(open(path)) if len(r) > 14 and r[0].isdigit()]
kernels = [(r[4], float(r[14].replace(',', '')) / 1000) for r in rows]  # name, µs
starts = [i for i, (name, _) in enumerate(kernels) if name == 'token_nll_fwd']
if len(starts) < 5:
    sys.exit(f'{path}: fewer than five inner steps found')
lo, hi, steps = starts[-5], starts[-1], 4
per = defaultdict(lambda: [0, 0.0])
for name, us in kernels[lo:hi]:
    key = name if len(name) < 60 else name[:60]
    per[key][0] += 1
    per[key][1] += us
table = sorted(({'kernel': k, 'launches': c // steps, 'us': round(t / steps, 1)} for k, (c, t) in per.items()), key=lambda e: -e['us'])
total = sum(e['us'] for e in table)
print(f'{label}: {total / 1000:.2f} ms of GPU time per inner step ({hi - lo} launches over {steps} steps)')
for e in table[:20]:
    print(f"{e['us']:9.1f} µs {e['launches']:4d}  {e['kernel']}")
if len(sys.argv) > 3:
    out = sys.argv[3]
    try:
        data = json.load(open(out))
    except FileNotFoundError:
        data = {}
    data[label] = {'msPerInnerStep': round(total / 1000, 3), 'kernels': table}
    json.dump(data, open(out, 'w'), indent=1)
    print(f'wrote {out}')
