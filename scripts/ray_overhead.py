"""What the Ray executor costs on real cells: one grid run cold with --executor local and again with
--executor ray, each from an empty store, with the same CPU share (Ray: one worker holding all the
machine's CPUs, so both run the stages one after another with the same PyTorch thread count).

    python scripts/ray_overhead.py [--config .ci/benchmark.toml] [--json out.json]

Prints the wall time of each run, the overhead in percent, and whether the cells' metrics are
identical. Issue 27's aim: < 5 % on the tiny profile's BadNet cells. Needs the [ray] extra.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

from vlmbackdoor_bench.grid.dag import STAGE_KINDS


def _toml_value(value) -> str:
    return json.dumps(value) if not isinstance(value, bool) else str(value).lower()


def write_config(source: dict, cache_dir: Path, executor: str, cpus: int) -> Path:
    lines = ["[benchmark]"]
    for key, value in {**source["benchmark"], "cache_dir": str(cache_dir), "executor": executor}.items():
        lines.append(f"{key} = {_toml_value(value)}")
    for table, values in source.items():
        if table == "benchmark":
            continue
        for name, params in values.items():
            lines.append(f"[{table}.{name}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in params.items()]
    # One worker with every CPU: the same parallelism as the local executor's one process.
    for kind in STAGE_KINDS:
        lines += [f"[executor.resources.{kind}]", f"num_cpus = {cpus}"]
    path = cache_dir.parent / f"{executor}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def run(config: Path) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "vlmbackdoor_bench.cli", "--config", str(config), "run", "--no-report"],
                   check=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    return time.perf_counter() - started


def metrics(cache_dir: Path) -> dict:
    return {p.stem: json.loads(p.read_text())["metrics"] for p in sorted((cache_dir / "results").rglob("*.json"))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path(".ci/benchmark.toml"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    source = tomllib.loads(args.config.read_text())
    cpus = os.cpu_count() or 1
    seconds, results = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for executor in ("local", "ray"):
            cache_dir = Path(tmp) / executor / "cache"
            cache_dir.mkdir(parents=True)
            seconds[executor] = run(write_config(source, cache_dir, executor, cpus))
            results[executor] = metrics(cache_dir)
    overhead = 100 * (seconds["ray"] - seconds["local"]) / seconds["local"]
    report = {"config": str(args.config), "cells": len(results["local"]), "cpus": cpus,
              "machine": platform.processor() or platform.machine(), "load_average": os.getloadavg(),
              "local_s": round(seconds["local"], 1), "ray_s": round(seconds["ray"], 1),
              "overhead_percent": round(overhead, 1), "identical_metrics": results["local"] == results["ray"]}
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if report["identical_metrics"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
