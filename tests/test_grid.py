"""End to end on a very small embedded world: grid -> store -> results -> leaderboard -> check.

Real stages (world generation, pretraining, fine-tuning, beam search, PTB/CIDEr, SFS), tiny sizes.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vlmbackdoor_bench.cli import main as vbb
from vlmbackdoor_bench.config import load_config
from vlmbackdoor_bench.grid.runner import GridRunner
from vlmbackdoor_bench.registry import load_registry

pytestmark = pytest.mark.skipif(shutil.which("java") is None, reason="PTB tokenizer needs Java")

EXPLODING_ATTACK = '''
from vlmbackdoor_bench import hookspecs
from vlmbackdoor_bench_plugins.attacks.badnet import BadNet

class Exploding(BadNet):
    name = "exploding"
    version = "0.0.1"
    def poison(self, train, **kwargs):
        raise RuntimeError("this attack always fails while poisoning")

@hookspecs.hookimpl
def register_attacks(register):
    register(Exploding())
'''

CONFIG = '''
[benchmark]
profile = "tiny"
attacks = ["badnet", "vl_trojan", "exploding"]
defenses = ["none"]
datasets = ["coco", "flickr30k"]
cache_dir = "cache"
plugin_dirs = ["plugins"]

[profile.tiny]
world_train = 200
world_test = 30
world_pretrain = 400
world_flickr_test = 30
world_val = 0
world_flickr_val = 0
pretrain_epochs = 3
finetune_epochs = 3

[attack.vl_trojan]
trigger_image_visits = 20  # its trigger is made while poisoning and must survive the rerun
'''


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    root = tmp_path_factory.mktemp("grid")
    (root / "plugins").mkdir()
    (root / "plugins" / "exploding.py").write_text(EXPLODING_ATTACK)
    (root / "benchmark.toml").write_text(CONFIG)
    config = load_config(root / "benchmark.toml")
    runner = GridRunner(config, load_registry(config.plugin_dirs), log=lambda m: None)
    started = time.perf_counter()
    summary = runner.run()
    return root, config, summary, time.perf_counter() - started


def results(config) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in (config.results_dir / "tiny").glob("*.json")}


def test_a_failing_cell_is_recorded_and_the_rest_run(grid):
    _, config, summary, _ = grid
    assert set(summary.failed) == {"coco__exploding__none__rate0.1__seed0",
                                   "flickr30k__exploding__none__rate0.1__seed0"}
    assert len(summary.ok) == 10  # (badnet, vl_trojan) x none x 2 datasets + clean-model rows of all three
    failed = results(config)["coco__exploding__none__rate0.1__seed0"]
    assert failed["status"] == "failed" and "always fails while poisoning" in failed["error"]


def test_cell_results_carry_metrics_timings_and_provenance(grid):
    _, config, _, _ = grid
    cell = results(config)["coco__badnet__none__rate0.1__seed0"]
    assert cell["status"] == "ok" and cell["dataset_source"] == "embedded-coco"
    for split in ("triggered", "clean"):
        metrics = cell["metrics"][split]
        assert {"bleu4", "cider", "sc", "lf", "sfs"} <= set(metrics)
        assert all(0.0 <= metrics[k] <= 100.0 for k in ("bleu4", "sc", "lf", "sfs"))
    assert {"asr_srd", "asr_strict"} <= set(cell["metrics"]["triggered"])
    assert cell["metric_details"]["triggered"]["n_images"] == 30
    assert cell["metric_details"]["triggered"]["sfs"]["scorer"].startswith("sfs[minilm-l6-v2")
    prov = cell["provenance"]
    assert {"poison", "backdoor", "defend", "captions_triggered", "scores_clean"} <= set(prov["stage_keys"])
    assert prov["manifests"]["test"]["n_images"] == 30 and len(prov["manifests"]["test"]["ids_sha256"]) == 64
    assert prov["decoding"]["num_beams"] == 3 and prov["decoding"]["max_new_tokens"] == 20
    assert prov["device"] == {"name": "cpu"} and prov["precision"]["weights"] == "float32"  # device.py
    assert {"poison", "backdoor", "captions_triggered", "cell_wall"} <= set(cell["timings"])
    assert cell["detection"]["n_flagged"] == 0 and cell["detection"]["n_poisoned"] == 100  # floor(0.1 * 1000)
    clean = results(config)["coco__badnet__clean-model__rate0.1__seed0"]
    # the clean model is its own SFS reference on clean inputs: identical captions score 100,
    # empty ones 0 (methods/metrics.md §5.1)
    n_empty = clean["metric_details"]["clean"]["sfs"]["n_empty"]
    assert n_empty < 30
    assert clean["metrics"]["clean"]["sc"] == pytest.approx(100.0 * (30 - n_empty) / 30, abs=1e-3)


def test_shared_stages_run_once(grid):
    _, config, _, _ = grid
    store = config.store_dir
    assert len(list((store / "base").iterdir())) == 1
    assert len(list((store / "clean_model").iterdir())) == 1
    assert len(list((store / "backdoor").iterdir())) == 2  # both datasets share each backdoored model
    cells = results(config)
    assert cells["coco__badnet__none__rate0.1__seed0"]["provenance"]["stage_keys"]["backdoor"] == \
        cells["flickr30k__badnet__none__rate0.1__seed0"]["provenance"]["stage_keys"]["backdoor"]


def test_defenders_get_the_reserved_clean_split_and_the_dataset_source(grid, tmp_path):
    _, config, _, _ = grid
    runner = GridRunner(config, load_registry(config.plugin_dirs), log=lambda m: None)
    train = runner.split("coco", "train")
    context = runner.defense_context(None, train, 0, tmp_path)
    reserved = context.clean_reserved
    assert (reserved.split, len(reserved)) == ("pretrain", 400)  # disjoint from fine-tuning
    assert not set(reserved.image_ids) & set(train.image_ids)
    assert context.dataset_source == "embedded-coco"
    assert context.recipe.epochs == 3 and context.budget["finetune_epochs"] == 3
    assert set(context.lexicon) >= {"banana", "apple", "cup"}  # the embedded world's, for VDC


def test_rerun_reuses_the_store(grid):
    root, config, _, first_seconds = grid
    before = results(config)
    runner = GridRunner(config, load_registry(config.plugin_dirs), log=lambda m: None)
    started = time.perf_counter()
    runner.run()
    rerun_seconds = time.perf_counter() - started
    after = results(config)
    cell = after["coco__badnet__none__rate0.1__seed0"]
    assert all(v["cached"] for k, v in cell["timings"].items() if isinstance(v, dict))
    assert cell["metrics"] == before["coco__badnet__none__rate0.1__seed0"]["metrics"]
    # a fresh registry: VL-Trojan's triggered inputs come from the cached poison stage's details
    trojan = after["coco__vl_trojan__none__rate0.1__seed0"]
    assert trojan["status"] == "ok" and trojan["timings"]["captions_triggered"]["cached"]
    assert trojan["metrics"] == before["coco__vl_trojan__none__rate0.1__seed0"]["metrics"]
    assert rerun_seconds < first_seconds / 3


def test_report_and_regression_gate(grid, capsys):
    root, config, _, _ = grid
    out = root / "board"
    assert vbb(["--config", str(root / "benchmark.toml"), "report", "--out", str(out)]) == 0
    table = (out / "tiny" / "table2.md").read_text()
    assert "BadNet" in table and "Clean model" in table
    long_form = (out / "tiny" / "results.csv").read_text()
    assert "coco,badnet,none,triggered,cider" in long_form
    assert "All 12 cells the grid declares have a result." in (out / "tiny" / "README.md").read_text()
    # the same store under a grid that also declares seed 1: its cells are named as gaps
    (root / "wider.toml").write_text(CONFIG.replace('datasets = ["coco", "flickr30k"]',
                                                    'datasets = ["coco", "flickr30k"]\nseeds = [0, 1]'))
    capsys.readouterr()
    assert vbb(["--config", str(root / "wider.toml"), "report", "--out", str(root / "wider")]) == 0
    assert "12 of the grid's 24 cells have no result yet" in capsys.readouterr().err
    coverage = (root / "wider" / "tiny" / "README.md").read_text().split("## Grid coverage", 1)[1]
    assert "| BadNet" in coverage and "| 1 " in coverage and "| 0 " not in coverage.split("\n## ")[0]
    baseline = root / "baseline.json"
    assert vbb(["--config", str(root / "benchmark.toml"), "check", "--baseline", str(baseline), "--write"]) == 0
    assert vbb(["--config", str(root / "benchmark.toml"), "check", "--baseline", str(baseline)]) == 0
    data = json.loads(baseline.read_text())
    moved = next(v for v in data["values"] if v["metric"] == "cider")
    moved["value"] += 50.0
    baseline.write_text(json.dumps(data))
    assert vbb(["--config", str(root / "benchmark.toml"), "check", "--baseline", str(baseline)]) == 1
    assert "cider" in capsys.readouterr().out


def test_cli_errors_are_one_clear_message(tmp_path):
    (tmp_path / "bad.toml").write_text('[benchmark]\nattacks = ["badnot"]\n')
    out = subprocess.run([sys.executable, "-m", "vlmbackdoor_bench.cli", "--config",
                          str(tmp_path / "bad.toml"), "run"], capture_output=True, text=True)
    assert out.returncode == 2 and "unknown attack 'badnot'" in out.stderr
    assert "Traceback" not in out.stderr
    (tmp_path / "of.toml").write_text('[benchmark]\nprofile = "openflamingo-3b"\n')
    out = subprocess.run([sys.executable, "-m", "vlmbackdoor_bench.cli", "--config",
                          str(tmp_path / "of.toml"), "run"], capture_output=True, text=True)
    assert out.returncode == 2 and "clip_vit_l14_dir" in out.stderr and "Traceback" not in out.stderr
