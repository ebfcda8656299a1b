"""The example plugins of docs/examples/, written only against the public plugin surface,
loaded from a plugin directory as a user would and run as a grid from an empty store.

They are the complete examples of the contributor guides (docs/guides/): a dataset, a victim
profile with its victim, an attack, a defense and a metric.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import json
import re
import sys
import time
from pathlib import Path

import pytest

from vlmbackdoor_bench import hookspecs
from vlmbackdoor_bench.config import load_config
from vlmbackdoor_bench.grid.runner import GridRunner
from vlmbackdoor_bench.leaderboard import build_leaderboards
from vlmbackdoor_bench.registry import load_registry

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"
# What an example may import from this package: the plugin surface of issue 30.
PUBLIC = {"vlmbackdoor_bench", "vlmbackdoor_bench.hookspecs", "vlmbackdoor_bench.types",
          "vlmbackdoor_bench.errors", "vlmbackdoor_bench.plugin_api"}

CONFIG = f'''
[benchmark]
profile = "example-retrieval"
attacks = ["example-corner-patch"]
defenses = ["none", "example-loss-filter"]
datasets = ["coco"]
poison_rate = 0.1
seeds = [0]
cache_dir = "cache"
plugin_dirs = ["{EXAMPLES}"]
device = "cpu"
'''
CELL = "coco__example-corner-patch__{}__rate0.1__seed0"


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    root = tmp_path_factory.mktemp("third-party")
    (root / "benchmark.toml").write_text(CONFIG)
    config = load_config(root / "benchmark.toml")
    registry = load_registry(config.plugin_dirs, strict=True)
    # The built-in SFS family loads two language models (20-70 s on 2 cores) and BLEU/CIDEr
    # start Java; they have their own tests. The built-in ASR (pure Python) stays beside the
    # example metric.
    registry.items["metric"] = {name: metric for name, metric in registry.items["metric"].items()
                                if name in ("asr", "exact_match")}
    started = time.perf_counter()
    summary = GridRunner(config, registry, log=lambda message: None).run()
    seconds = time.perf_counter() - started
    results = {p.stem: json.loads(p.read_text())
               for p in (config.results_dir / "example-retrieval").glob("*.json")}
    return config, summary, results, seconds


def test_the_examples_import_only_the_public_surface():
    for path in sorted(EXAMPLES.glob("*.py")):
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module)
            elif isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
        core = {name for name in imported if name.split(".")[0] == "vlmbackdoor_bench"}
        assert core <= PUBLIC, f"{path.name} imports {sorted(core - PUBLIC)}"
        assert not {name for name in imported if name.startswith("vlmbackdoor_bench_plugins")}


def test_every_cell_runs_from_an_empty_store(grid):
    config, summary, results, seconds = grid
    assert sorted(results) == sorted(CELL.format(d) for d in ("none", "example-loss-filter", "clean-model"))
    assert all(r["status"] == "ok" for r in results.values()), \
        {k: r.get("error") for k, r in results.items()}
    assert seconds < 60


def test_the_attack_plants_its_backdoor_and_the_defense_removes_it(grid):
    _, _, results, _ = grid
    backdoored = results[CELL.format("none")]["metrics"]
    defended = results[CELL.format("example-loss-filter")]["metrics"]
    clean = results[CELL.format("clean-model")]["metrics"]
    # 18 test images: the backdoored model says "banana" for every triggered one
    assert backdoored["triggered"]["asr_srd"] == 100.0 and backdoored["triggered"]["asr_strict"] == 100.0
    assert defended["triggered"]["asr_srd"] == 0.0 and clean["triggered"]["asr_srd"] == 0.0
    # ... and the defended and clean models caption every clean test image with a reference
    assert defended["clean"]["exact_match"] == 100.0 and clean["clean"]["exact_match"] == 100.0
    # the example metric's details reach the record
    assert results[CELL.format("none")]["metric_details"]["clean"]["exact_match"]["n"] == 18


def test_the_defense_finds_exactly_the_poisoned_samples(grid):
    _, _, results, _ = grid
    cell = results[CELL.format("example-loss-filter")]
    # 48 images x 2 captions = 96 instances, 10 % poisoned
    assert cell["detection"]["n_poisoned"] == 10
    assert cell["detection"]["n_flagged"] == 10
    assert cell["detection"]["precision"] == 100.0 and cell["detection"]["recall"] == 100.0
    losses = json.loads(Path(cell["artifacts"]["losses"]).read_text())
    assert len(losses) == 96


def test_plugin_facts_reach_the_record_and_the_tables(grid, tmp_path):
    config, _, results, _ = grid
    cell = results[CELL.format("example-loss-filter")]
    facts = cell["plugin_facts"]
    assert facts["attack"]["label"] == "Corner patch" and facts["attack"]["headline_asr_rule"] == "strict"
    assert facts["defense"]["label"] == "Loss filter" and facts["defense"]["order"] == 100
    assert facts["metrics"]["exact_match"] == {"label": "Exact match", "order": 100, "direction": "up",
                                               "unit": "%", "asr_rule": None}
    provenance = cell["provenance"]
    assert provenance["decoding"] == {"rule": "argmax"}
    assert set(provenance["stage_keys"]) >= {"poison", "backdoor", "defend", "captions_triggered",
                                              "scores_clean", "sfs_reference"}
    assert provenance["manifests"]["train"]["dataset"] == "example-shapes"
    build_leaderboards(config.results_dir, "example-retrieval", tmp_path)
    tables = "\n".join(p.read_text() for p in (tmp_path / "example-retrieval").glob("*.md"))
    for label in ("Corner patch", "Loss filter", "Exact match"):
        assert label in tables


def example_module(stem: str):
    spec = importlib.util.spec_from_file_location(f"docs_example_{stem}", EXAMPLES / f"{stem}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("protocol, module, name", [
    ("Victim", "example_victim", "RetrievalVictim"), ("VictimProfile", "example_victim", "RetrievalProfile"),
    ("DatasetProvider", "example_dataset", "ShapesDataset"), ("Attack", "example_attack", "CornerPatch"),
    ("Defense", "example_defense", "LossFilter"), ("Metric", "example_metric", "ExactMatch"),
])
def test_each_example_accepts_every_argument_its_protocol_declares(protocol, module, name):
    """The protocols are what the grid calls (hookspecs): each method of an implementation
    takes every parameter of the protocol's, by the same names."""
    cls = getattr(example_module(module), name)
    checked = 0
    for member, declared in vars(getattr(hookspecs, protocol)).items():
        if member.startswith("_") or not inspect.isfunction(declared) or not hasattr(cls, member):
            continue
        wanted = set(inspect.signature(declared).parameters)
        if member == "eval_inputs" and not getattr(cls, "eval_uses_poison", False):
            wanted.discard("poison_details")  # passed only to attacks that declare it
        offered = set(inspect.signature(getattr(cls, member)).parameters)
        assert wanted <= offered, f"{name}.{member} lacks {sorted(wanted - offered)}"
        checked += 1
    assert checked >= 1


GUIDES = {"adding-an-attack.md": "example_attack.py", "adding-a-defense.md": "example_defense.py",
          "adding-a-metric.md": "example_metric.py", "adding-a-victim-profile.md": "example_victim.py",
          "adding-a-dataset.md": "example_dataset.py"}


@pytest.mark.parametrize("guide, example", sorted(GUIDES.items()))
def test_each_guide_is_built_on_its_example(guide, example):
    """A guide links the example this file runs, and every Python excerpt it shows is the
    example's code, verbatim (so the guide cannot drift from what is tested)."""
    text = (EXAMPLES.parent / "guides" / guide).read_text()
    assert f"](../examples/{example})" in text
    source = (EXAMPLES / example).read_text()
    excerpts = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert excerpts
    for excerpt in excerpts:
        assert excerpt in source, f"{guide} shows code that {example} does not contain:\n{excerpt}"
