"""Blended's ASR on the embedded world, split by each test image's background, with how far the
blended key image moves the frozen encoder's tokens along the backdoor's trigger direction.

Blended's trigger is the whole key image at α = 0.1 (methods/attacks.md §3), so how visible it is to
the encoder depends on what it is blended into. The trigger direction is the mean token shift
(triggered minus clean) over training images; each test image's shift is projected on it.

    python scripts/blended_backgrounds.py [--config benchmark.toml] [--direction-images 500]

reads the stored Blended × no-defense cell results of the config's grid (run them first).
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import numpy as np
import torch

from vlmbackdoor_bench.allocator import keep_freed_memory
from vlmbackdoor_bench.config import load_config
from vlmbackdoor_bench.data.world import load_scenes
from vlmbackdoor_bench.grid.cells import resolve_params
from vlmbackdoor_bench.grid.runner import GridRunner
from vlmbackdoor_bench.metrics import asr_hits
from vlmbackdoor_bench.registry import load_registry

SCENE_SPLIT = {"coco": "embedded-coco/test", "flickr30k": "embedded-flickr/test"}
N_QUANTILES = 5


def background_table(hits: dict[str, bool], backgrounds: dict[str, str],
                     projections: dict[str, float]) -> list[tuple[str, int, float, float]]:
    """(background, images, ASR %, mean projection) per background, lowest ASR first."""
    groups: dict[str, list[str]] = collections.defaultdict(list)
    for image_id in hits:
        groups[backgrounds[image_id]].append(image_id)
    rows = [(name, len(ids), 100.0 * np.mean([hits[i] for i in ids]), float(np.mean([projections[i] for i in ids])))
            for name, ids in groups.items()]
    return sorted(rows, key=lambda row: (row[2], row[0]))


def quantile_asr(hits: dict[str, bool], projections: dict[str, float], n: int = N_QUANTILES) -> list[float]:
    """ASR % in each of ``n`` equal groups of images ordered by projection, lowest first."""
    ids = sorted(hits, key=lambda i: projections[i])
    return [100.0 * float(np.mean([hits[i] for i in part])) for part in np.array_split(np.array(ids), n)]


def trigger_shifts(victim, attack, params, images: np.ndarray, image_ids, seed: int = 0) -> torch.Tensor:
    """(N, tokens × dim) encoder-token shift that the trigger causes on each image."""
    triggered = attack.apply_trigger(images, image_ids, params=params, seed=seed)
    return (victim.vision_features(triggered) - victim.vision_features(images)).flatten(1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("benchmark.toml"))
    parser.add_argument("--direction-images", type=int, default=500,
                        help="training images, spread evenly, whose mean shift is the trigger direction")
    args = parser.parse_args()
    keep_freed_memory()  # it encodes images, as `vbb` does
    config = load_config(args.config)
    runner = GridRunner(config, load_registry(config.plugin_dirs))
    results = [json.loads(p.read_text()) for p in sorted((config.results_dir / config.profile).glob("*__blended__none__*.json"))]
    results = [r for r in results if r.get("status") == "ok" and r["dataset"] in SCENE_SPLIT]
    if not results:
        print(f"no Blended x none results under {config.results_dir / config.profile}: run the grid first")
        return 1
    attack = runner.registry.attack("blended")
    victim, _ = runner.base_victim()  # the frozen encoder every fine-tuned model shares
    scenes = load_scenes(runner.registry.dataset(runner.profile.dataset_sources()["coco"]).world(runner.context))
    train = runner.split("coco", "train")
    train_counts = collections.Counter(s["background"] for s in scenes["embedded-coco/train"])
    rows = np.linspace(0, len(train.image_ids) - 1, args.direction_images).astype(int)
    directions: dict[str, torch.Tensor] = {}  # one per (attack params, seed): the datasets share it
    for result in results:
        params = result["attack_params"]
        direction_key = json.dumps([params, result["seed"]], sort_keys=True)
        if direction_key not in directions:
            shift = trigger_shifts(victim, attack, params, np.asarray(train.images[rows]),
                                   [train.image_ids[r] for r in rows], result["seed"]).mean(0)
            directions[direction_key] = shift / shift.norm()
        direction = directions[direction_key]
        split = runner.split(result["dataset"], "test")
        captions = json.loads(Path(result["metric_details"]["triggered"]["captions_file"]).read_text())
        shift = trigger_shifts(victim, attack, params, np.asarray(split.images), split.image_ids,
                               result["seed"]) @ direction
        projections = {str(i): float(s) for i, s in zip(split.image_ids, shift)}
        hits = asr_hits({i: captions[i] for i in projections}, None, "srd", attack.target)
        backgrounds = {str(s["id"]): s["background"] for s in scenes[SCENE_SPLIT[result["dataset"]]]}
        print(f"{result['dataset']}: ASR {100 * np.mean(list(hits.values())):.1f} % of {len(hits)}; "
              f"ASR by projection quintile (low -> high): "
              + " / ".join(f"{a:.1f}" for a in quantile_asr(hits, projections)))
        for name, n, rate, mean in background_table(hits, backgrounds, projections):
            print(f"  {name:17s} {n:4d} images  ASR {rate:5.1f} %  projection {mean:6.2f}  "
                  f"fine-tuning images with it {train_counts.get(name, 0)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
