"""Shadowcast's ASR on the embedded world, split by what each concept-set image shows.

The `concept` rule's test set holds every clean test image whose references name orange, apple
or carrot as a whole word (methods/metrics.md §4.3), so it includes images where "orange" is only a
colour ("an orange cup"). The embedded world knows each image's objects, so the ASR can be split
into images that show a source-concept object and images of the colour sense only.

    python scripts/shadowcast_senses.py [--config benchmark.toml]

reads the stored Shadowcast cell results of the config's grid (run them first).
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

from vlmbackdoor_bench.config import load_config
from vlmbackdoor_bench.data.world import load_scenes
from vlmbackdoor_bench.grid.runner import GridRunner
from vlmbackdoor_bench.registry import load_registry
from vlmbackdoor_bench_plugins.attacks.shadowcast import SOURCE_CONCEPTS, TARGET_WORD

SCENE_SPLIT = {"coco": "embedded-coco/test", "flickr30k": "embedded-flickr/test"}


def sense_table(captions: dict[str, str], scenes: list[dict]) -> dict[str, tuple[int, int]]:
    """group -> (images, images whose caption mentions banana)."""
    by_id = {str(scene["id"]): scene for scene in scenes}
    counts: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for image_id, caption in captions.items():
        shown = {g["category"] for g in by_id[image_id]["groups"]} & set(SOURCE_CONCEPTS)
        groups = [f"shows {c}" for c in sorted(shown)]
        groups.append("shows a source-concept object" if shown else "colour sense of orange only")
        for group in groups:
            counts[group][0] += 1
            counts[group][1] += bool(TARGET_WORD.search(caption))
    return {group: (n, hits) for group, (n, hits) in sorted(counts.items())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("benchmark.toml"))
    args = parser.parse_args()
    config = load_config(args.config)
    runner = GridRunner(config, load_registry(config.plugin_dirs))
    provider = runner.registry.dataset(runner.profile.dataset_sources()["coco"])
    scenes = load_scenes(provider.world(runner.context))
    results = sorted((config.results_dir / config.profile).glob("*__shadowcast__*.json"))
    if not results:
        print(f"no Shadowcast results under {config.results_dir / config.profile}: run the grid first")
        return 1
    for path in results:
        result = json.loads(path.read_text())
        if result.get("status") != "ok" or result["dataset"] not in SCENE_SPLIT:
            continue
        captions = json.loads(Path(result["metric_details"]["triggered"]["captions_file"]).read_text())
        print(f"{result['dataset']} / {result['defense']} ({result['attack_params']}):")
        for group, (n, hits) in sense_table(captions, scenes[SCENE_SPLIT[result['dataset']]]).items():
            print(f"  {group}: {hits}/{n} = {100 * hits / n:.1f} % mention banana")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
