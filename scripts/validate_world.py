"""Validate the embedded world and the tiny profile's budgets on the world's val split (never test).

For each dataset it prints: the clean model's CIDEr on the val images, the references' own
leave-one-out CIDEr (each of an image's five references scored against the other four; real COCO
is about 85), and for each attack the no-defense ASR (and CIDEr) of its backdoored model on val.
Stages are cached in --cache-dir as in a grid run (a rerun only computes what changed).

    OMP_NUM_THREADS=1 PYTHONPATH=. python3 scripts/validate_world.py \\
        --cache-dir /tmp/vbb-validate --attacks badnet,trojvlm,vlood
    ... --set finetune_epochs=8          # try another budget ([profile.tiny] keys)
    ... --attack-set trojvlm.trigger_path=/path/trigger_noise_20.png
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from vlmbackdoor_bench.config import BenchmarkConfig
from vlmbackdoor_bench.grid.cells import CLEAN_MODEL, Cell
from vlmbackdoor_bench.grid.runner import GridRunner
from vlmbackdoor_bench.metrics.captioning import caption_scores
from vlmbackdoor_bench.registry import load_registry


class ValidationRunner(GridRunner):
    """The grid runner, evaluating on the val split wherever a grid evaluates on test."""

    def split(self, role: str, split: str):
        return super().split(role, "val" if split == "test" else split)


def leave_one_out_cider(references: list[list[str]]) -> float:
    """Mean over k of CIDEr(reference k | the other references), over every image."""
    scores = []
    for k in range(min(len(r) for r in references)):
        captions = {i: refs[k] for i, refs in enumerate(references)}
        others = {i: [r for j, r in enumerate(refs) if j != k] for i, refs in enumerate(references)}
        scores.append(caption_scores(captions, others)["cider"])
    return float(np.mean(scores))


def _value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def _asr(metrics: dict):
    return {k: round(v, 1) for k, v in metrics.get("triggered", {}).items()
            if "asr" in k and isinstance(v, (int, float))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache-dir", default="/tmp/vbb-validate")
    ap.add_argument("--attacks", default="badnet,blended,trojvlm,vlood",
                    help="comma-separated; empty = clean model only")
    ap.add_argument("--datasets", default="coco,flickr30k")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a [profile.tiny] override, e.g. finetune_epochs=8")
    ap.add_argument("--attack-set", action="append", default=[], metavar="ATTACK.KEY=VALUE")
    ap.add_argument("--json", help="also write the numbers to this file")
    args = ap.parse_args(argv)

    attacks = [a for a in args.attacks.split(",") if a]
    attack_params: dict = {}
    for item in args.attack_set:
        key, value = item.split("=", 1)
        name, param = key.split(".", 1)
        attack_params.setdefault(name, {})[param] = _value(value)
    config = BenchmarkConfig(
        attacks=attacks or ["badnet"], defenses=["none"], datasets=args.datasets.split(","),
        seeds=[args.seed], cache_dir=Path(args.cache_dir), attack_params=attack_params,
        profile_params={k: _value(v) for k, v in (s.split("=", 1) for s in args.set)})
    runner = ValidationRunner(config, load_registry(), log=lambda m: print(m, file=sys.stderr))
    runner.check_data()
    report: dict = {"budget": runner.budget["params"], "datasets": {}}
    print("budget:", json.dumps(runner.budget["params"]))
    for dataset in config.datasets:
        val = runner.split(dataset, "val")
        out = {"n_val": len(val), "loo_reference_cider": round(leave_one_out_cider(val.references), 1)}
        started = time.perf_counter()
        clean = runner.run_cell(Cell("tiny", dataset, config.attacks[0], CLEAN_MODEL, config.poison_rate, args.seed))
        out["clean_cider"] = round(clean["metrics"]["clean"]["cider"], 1)
        out["clean_bleu4"] = round(clean["metrics"]["clean"]["bleu4"], 1)
        out["clean_model_seconds"] = round(clean["timings"]["clean_model"]["seconds"], 1)
        out["clean_cell_seconds"] = round(time.perf_counter() - started, 1)
        out["attacks"] = {}
        for attack in attacks:
            result = runner.run_cell(Cell("tiny", dataset, attack, "none", config.poison_rate, args.seed))
            out["attacks"][attack] = {"asr": _asr(result["metrics"]),
                                      "clean_cider": round(result["metrics"]["clean"]["cider"], 1),
                                      "backdoor_seconds": round(result["timings"]["backdoor"]["seconds"], 1)}
        report["datasets"][dataset] = out
        print(f"{dataset}: {json.dumps(out)}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
