"""Stored cell results against a committed baseline, value by value: ours / baseline / delta.

    python scripts/baseline_delta.py RESULTS_DIR PROFILE BASELINE_JSON [--json OUT]

`vbb check` only says pass or fail; this prints every number, for comparing a run on other
hardware (scripts/gpu_check.sh: the tiny cells on a GPU against the CPU CI baseline). A value
the results lack shows as "missing". Always exits 0 unless the inputs cannot be read (2).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from vlmbackdoor_bench.errors import VbbError
from vlmbackdoor_bench.leaderboard.check import load_baseline, tolerance_for
from vlmbackdoor_bench.leaderboard.results import load_results, metric_values


def deltas(records: list[dict], baseline: dict) -> list[dict]:
    """One row per baseline value: the mean of the matching ok cells' values (None if none)."""
    rows = []
    for entry in baseline["values"]:
        where = (entry["dataset"], entry["attack"], entry["defense"])
        found = [v for r in records if (r.get("dataset"), r.get("attack"), r.get("defense")) == where
                 for split, metric, v in metric_values(r) if (split, metric) == (entry["split"], entry["metric"])]
        ours = math.fsum(found) / len(found) if found else None
        tolerance = tolerance_for(entry["metric"], baseline.get("tolerances", {}))
        delta = None if ours is None else ours - entry["value"]
        rows.append({**{k: entry[k] for k in ("dataset", "attack", "defense", "split", "metric")},
                     "ours": ours, "baseline": entry["value"], "delta": delta, "tolerance": tolerance,
                     "within": delta is not None and abs(delta) <= tolerance + 1e-9})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results_dir", type=Path)
    parser.add_argument("profile")
    parser.add_argument("baseline", type=Path)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    from tabulate import tabulate
    try:
        rows = deltas(load_results(args.results_dir, args.profile), load_baseline(args.baseline))
    except VbbError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    def number(value):
        return "missing" if value is None else f"{value:.2f}"

    print(tabulate([[f"{r['dataset']}/{r['attack']}/{r['defense']}", r["split"], r["metric"], number(r["ours"]),
                     number(r["baseline"]), number(r["delta"]), r["tolerance"], "yes" if r["within"] else "NO"]
                    for r in rows], headers=["cell", "split", "metric", "ours", "baseline", "delta", "tol", "within"]))
    within = sum(r["within"] for r in rows)
    print(f"{within} of {len(rows)} values within the baseline's tolerance")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
