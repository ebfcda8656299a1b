"""Registry, config, store and grid expansion: real objects, tiny inputs."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from vlmbackdoor_bench.config import load_config, parse_config
from vlmbackdoor_bench.errors import VbbError
from vlmbackdoor_bench.grid.cells import CLEAN_MODEL, expand, resolve_params, validate_plugins
from vlmbackdoor_bench.grid.store import Store, content_key
from vlmbackdoor_bench.registry import load_registry

GOOD_PLUGIN = '''
from vlmbackdoor_bench import hookspecs
__version__ = "9.9"
class Shield:
    name = "shield"; version = "9.9"; presets = {"default": {"strength": 1}}; default_preset = "default"
    def defend(self, context, params):
        return hookspecs.DefenseOutcome(context.backdoored, None)
@hookspecs.hookimpl
def register_defenses(register):
    register(Shield())
'''


def write_plugins(directory: Path) -> Path:
    directory.mkdir()
    (directory / "shield.py").write_text(GOOD_PLUGIN)
    (directory / "broken_import.py").write_text("import does_not_exist_anywhere\n")
    (directory / "malformed.py").write_text(textwrap.dedent('''
        from vlmbackdoor_bench import hookspecs
        class Half:
            name = "half"
        @hookspecs.hookimpl
        def register_attacks(register):
            register(Half())
    '''))
    return directory


def test_builtins_register_through_entry_points():
    registry = load_registry()
    assert "badnet" in registry.items["attack"]
    assert "none" in registry.items["defense"]
    assert {"tiny", "openflamingo-3b"} <= set(registry.items["victim"])
    sources = {p.name: p.source for p in registry.plugins}
    assert sources["badnet"].startswith("entry point vlmbackdoor-bench")


def test_local_plugin_dir_broken_plugins_are_reported_and_skipped(tmp_path):
    registry = load_registry([write_plugins(tmp_path / "plugins")])
    assert registry.defense("shield").version == "9.9"
    errors = {p.name: p.error for p in registry.errors}
    assert "ModuleNotFoundError" in errors["broken_import"]
    assert "lacks" in errors["malformed"] and "poison" in errors["malformed"]
    assert "half" not in registry.items["attack"]
    info = next(p for p in registry.plugins if p.name == "shield")
    assert info.hooks == ["register_defenses"] and info.source.startswith("local ")


def test_strict_mode_makes_a_broken_plugin_fatal(tmp_path):
    with pytest.raises(VbbError, match="broken_import"):
        load_registry([write_plugins(tmp_path / "plugins")], strict=True)


def test_unknown_plugin_name_is_one_clear_error():
    registry = load_registry()
    with pytest.raises(VbbError) as err:
        registry.attack("badnett")
    assert "unknown attack 'badnett'" in str(err.value) and "badnet" in str(err.value)
    config = parse_config({"benchmark": {"defenses": ["nope"]}})
    with pytest.raises(VbbError, match="unknown defense 'nope'"):
        validate_plugins(config, registry)


def test_cli_list_shows_kind_version_source_hooks(tmp_path):
    (tmp_path / "benchmark.toml").write_text('[benchmark]\nplugin_dirs = ["plugins"]\n')
    write_plugins(tmp_path / "plugins")
    out = subprocess.run([sys.executable, "-m", "vlmbackdoor_bench.cli", "--config",
                          str(tmp_path / "benchmark.toml"), "list"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "attack:badnet" in out.stdout and "defense:shield" in out.stdout
    assert "register_defenses" in out.stdout and "9.9" in out.stdout
    assert "broken_import" in out.stderr  # reported, not fatal
    strict = subprocess.run([sys.executable, "-m", "vlmbackdoor_bench.cli", "--strict", "--config",
                             str(tmp_path / "benchmark.toml"), "list"],
                            capture_output=True, text=True, cwd=tmp_path)
    assert strict.returncode == 2 and "broken_import" in strict.stderr
    assert "Traceback (most recent call last)" not in strict.stderr


@pytest.mark.parametrize("text, message", [
    ("[benchmark\nprofile = 'tiny'", "not valid TOML"),
    ("[benchmark]\nprofle = 'tiny'", "unknown key(s) ['profle']"),
    ("[benchmark]\npoison_rate = 'ten'", "poison_rate"),
    ("[benchmark]\npoison_rate = 1.5", "poison_rate must be in (0, 1]"),
    ("[benchmark]\nseeds = [0, 'one']", "seeds"),
    ("[benchmark]\nattacks = []", "'attacks'"),
    ("[benchmrk]\nprofile = 'tiny'", "unknown section"),
])
def test_malformed_benchmark_toml(tmp_path, text, message):
    path = tmp_path / "benchmark.toml"
    path.write_text(text)
    with pytest.raises(VbbError) as err:
        load_config(path)
    assert message in str(err.value)
    assert "fix:" in str(err.value)


def test_config_resolves_paths_and_sections(tmp_path):
    path = tmp_path / "b.toml"
    path.write_text('[benchmark]\nattacks = ["badnet"]\ncache_dir = "c"\nseeds = [1, 2]\n'
                    '[attack.badnet]\npreset = "original"\n[data]\ncoco-karpathy = "coco"\n')
    config = load_config(path)
    assert config.cache_dir == tmp_path / "c"
    assert config.data_paths["coco-karpathy"] == tmp_path / "coco"
    assert config.seeds == [1, 2]
    preset, params = resolve_params("attack", load_registry().attack("badnet"),
                                    config.attack_params["badnet"])
    assert preset == "original" and params["pattern"] == "white"


def test_resolve_params_rejects_unknown_preset_and_parameter():
    badnet = load_registry().attack("badnet")
    with pytest.raises(VbbError, match="no preset 'paper'"):
        resolve_params("attack", badnet, {"preset": "paper"})
    with pytest.raises(VbbError, match="unknown parameter"):
        resolve_params("attack", badnet, {"alpha": 0.2})


def test_expand_adds_clean_model_rows():
    config = parse_config({"benchmark": {"attacks": ["badnet"], "defenses": ["none"],
                                         "datasets": ["coco", "flickr30k"], "seeds": [0, 1]}})
    cells = expand(config)
    assert len(cells) == 2 * 2 + 2 * 2
    assert sum(c.defense == CLEAN_MODEL for c in cells) == 4
    assert len({c.cell_id for c in cells}) == len(cells)


def test_store_is_content_addressed_atomic_and_skips_existing(tmp_path):
    store = Store(tmp_path)
    calls = []

    def build(directory: Path):
        calls.append(directory)
        (directory / "out.txt").write_text("x")
        return {"note": 1}

    first = store.get_or_build("stage", {"a": 1, "b": [1, 2]}, build)
    again = store.get_or_build("stage", {"b": [1, 2], "a": 1}, build)  # key ignores dict order
    assert len(calls) == 1 and not first.cached and again.cached
    assert first.key == content_key("stage", {"a": 1, "b": [1, 2]})
    assert (first.path / "out.txt").read_text() == "x" and first.meta["note"] == 1
    assert content_key("stage", {"a": 2}) != first.key

    def failing(directory: Path):
        (directory / "half.txt").write_text("partial")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        store.get_or_build("stage", {"a": 3}, failing)
    assert not store.has("stage", content_key("stage", {"a": 3}))
    leftovers = [p.name for p in (tmp_path / "stage").iterdir()]
    assert leftovers == [first.key]  # nothing half-written survives


def test_trigger_coverage_is_the_share_of_the_pixel_change_inside_the_mask():
    import numpy as np

    from vlmbackdoor_bench.grid.persist import trigger_coverage
    from vlmbackdoor_bench.types import (Example, ImageBank, PoisonRecord, PoisonedSet, Split,
                                         SplitManifest, TrainingSet)

    clean = np.full((2, 224, 224, 3), 100, np.uint8)
    train = Split("w", "train", [7, 8], clean, [["c"], ["c"]], [["7"], ["8"]],
                  SplitManifest("w", "train", 2, "", ""))
    patched = clean[:1].copy()
    patched[0, 200:220, 200:220] = 255  # a 20 px corner patch on image 7
    blended = clean[1:].copy()
    blended[0] += 10  # a uniform whole-frame blend on image 8
    examples = [Example("c0", 0, "c"), Example("p0", 2, "t"), Example("p1", 3, "t"), Example("p2", 2, "t")]
    records = [PoisonRecord("p0", 7, "c", "t", "patch"), PoisonRecord("p1", 8, "c", "t", "blend"),
               PoisonRecord("p2", 7, "c", "t", "patch"),
               PoisonRecord("c0", 7, "c", "c2", None)]  # caption-only: no image trigger to cover
    poisoned = PoisonedSet(TrainingSet(ImageBank(clean, np.concatenate([patched, blended])), examples), records)
    boxes = {"p0": [210, 224, 200, 220],  # half the patch
             "p1": [0, 112, 0, 224],  # half the frame
             "p2": [0, 20, 0, 20],  # misses it
             "c0": [0, 224, 0, 224]}
    coverage = trigger_coverage(boxes, poisoned, train)
    assert coverage["n_triggered"] == 3
    assert coverage["mean_coverage"] == pytest.approx(100 * (0.5 + 0.5 + 0.0) / 3)
    assert coverage["share_touched"] == pytest.approx(200 / 3)
    assert coverage["share_half_covered"] == pytest.approx(200 / 3)
    assert trigger_coverage({}, poisoned, train) is None


def test_detection_scores_what_was_removed_and_what_was_only_suspected():
    from vlmbackdoor_bench.grid.persist import detection

    poisoned = {"p0", "p1", "p2", "p3"}
    report = {"removed_sample_ids": ["p0", "c0"], "relabelled_sample_ids": ["p1"],
              "candidate_sample_ids": ["p0", "p1", "p2", "c0", "c1"]}
    found = detection(report, poisoned)
    assert (found["n_flagged"], found["n_true_positive"]) == (3, 2)
    assert found["precision"] == pytest.approx(200 / 3) and found["recall"] == 50.0
    assert found["candidates"] == {"precision": 60.0, "recall": 75.0, "n_candidates": 5,
                                   "n_poisoned": 4, "n_true_positive": 3}
    nothing = detection({"removed_sample_ids": []}, poisoned)
    assert nothing["precision"] is None and nothing["recall"] == 0.0 and "candidates" not in nothing


RACING_BUILD = """
import os, sys, time
from pathlib import Path
from vlmbackdoor_bench.grid.store import Store
root = Path(sys.argv[1])
def build(directory):
    with open(root / "builds.log", "a") as log:
        log.write(f"{os.getpid()}\\n")
    while not (root / "release").exists():  # hold the entry's lock until the test says so
        time.sleep(0.05)
    (directory / "out.txt").write_text(str(os.getpid()))
entry = Store(root / "store", log=lambda m: print(m, flush=True)).get_or_build("stage", {"a": 1}, build)
print("cached" if entry.cached else "built", (entry.path / "out.txt").read_text(), flush=True)
"""


def test_store_builds_an_entry_once_when_processes_race(tmp_path):
    import time

    def launch():
        return subprocess.Popen([sys.executable, "-c", RACING_BUILD, str(tmp_path)],
                                stdout=subprocess.PIPE, text=True)

    first = launch()
    deadline = time.monotonic() + 120
    while not (tmp_path / "builds.log").exists():  # the first process is inside its build
        assert time.monotonic() < deadline and first.poll() is None
        time.sleep(0.05)
    second = launch()
    waiting = second.stdout.readline()
    assert "another process is building stage" in waiting and "waiting" in waiting
    (tmp_path / "release").touch()
    out_first, out_second = first.communicate(timeout=120)[0], second.communicate(timeout=120)[0]
    builder = (tmp_path / "builds.log").read_text().split()
    assert builder == [str(first.pid)]  # built once, by the process that took the lock
    assert out_first.splitlines()[0].startswith("store: building stage")  # the store says what it builds
    assert out_first.splitlines()[-1].split() == ["built", str(first.pid)]
    assert out_second.split() == ["cached", str(first.pid)]  # the waiter read the builder's entry


def test_store_sweeps_half_built_entries_of_dead_processes_only(tmp_path):
    import os
    import socket
    import subprocess
    import sys

    store = Store(tmp_path)
    host = socket.gethostname().replace(".", "_")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()  # exited: its pid is free
    killed = tmp_path / "stage" / f".{'a' * 64}.{host}-{dead}.tmp"
    live = tmp_path / "stage" / f".{'b' * 64}.{host}-{os.getpid()}.tmp"
    elsewhere = tmp_path / "stage" / f".{'c' * 64}.other-host-{dead}.tmp"
    for directory in (killed, live, elsewhere):
        directory.mkdir(parents=True)
        (directory / "half.txt").write_text("partial")
    assert store.sweep_stale() == [killed]
    assert not killed.exists() and live.exists() and elsewhere.exists()
    # a build names its temporary directory so that a later sweep can tell whose it is
    seen = []
    store.get_or_build("stage", {"a": 1}, lambda directory: seen.append(directory.name))
    assert seen[0].endswith(f".{host}-{os.getpid()}.tmp")
