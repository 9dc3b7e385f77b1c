#!/usr/bin/env python3
"""The paper's Table 2 / Table 3 metrics for a set of curec runs, as Markdown rows.

Each argument is NAME=DIR, where DIR is a run (`metrics.json`) or a `--seeds` directory
(`seed-*/metrics.json`, e.g. from `curec train … --seeds` or benches/correction.sh). Prints, per
row, the mean ± sd over the seeds of Recall@5, NDCG@5 (Table 3's metrics) and NDCG@10 (Table 2's
headline), and the seeds used. No dependencies beyond the standard library.

    python3 benches/paper_tables.py SASRec=runs/controls2-ml100k/sasrec \
        'w/o Corr.=runs/corr-ml100k/no-correction' CUREC=runs/corr-ml100k/full
"""
import json
import pathlib
import statistics
import sys

METRICS = ["recall@5", "ndcg@5", "ndcg@10"]


def seed_runs(d: pathlib.Path):
    runs = sorted(p for p in d.glob("seed-*") if (p / "metrics.json").is_file())
    if runs:
        return runs
    if (d / "metrics.json").is_file():
        return [d]
    sys.exit(f"{d}: no metrics.json here or in seed-*/")


def cell(values):
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def main(args):
    if not args:
        sys.exit(__doc__)
    print("| row | Recall@5 | NDCG@5 | NDCG@10 | seeds |")
    print("|---|---|---|---|---|")
    for a in args:
        name, _, d = a.partition("=")
        if not d:
            sys.exit(f"{a}: expected NAME=DIR")
        runs = seed_runs(pathlib.Path(d))
        ms = [json.loads((r / "metrics.json").read_text()) for r in runs]
        cells = [cell([m[k] for m in ms]) for k in METRICS]
        seeds = ", ".join(r.name.removeprefix("seed-") for r in runs) if len(runs) > 1 else "1 run"
        print(f"| {name} | " + " | ".join(cells) + f" | {seeds} |")


if __name__ == "__main__":
    main(sys.argv[1:])
