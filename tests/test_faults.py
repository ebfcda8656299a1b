"""Fault injection (issue 32): kills, full and read-only disks, crashing plugins, bad inputs.

Each test injects the fault for real (SIGKILL by pid, a 64 KiB tmpfs, a read-only mount, a plugin
raising SystemExit) on tiny inputs; see docs/faults.md for what the user sees in each case.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from vlmbackdoor_bench.cli import main as vbb
from vlmbackdoor_bench.config import load_config, parse_config
from vlmbackdoor_bench.data.world import WorldSizes, generate_world, world_dir_name
from vlmbackdoor_bench.errors import VbbError
from vlmbackdoor_bench.grid.cells import Cell, resolve_params
from vlmbackdoor_bench.grid.runner import GridRunner, failed_result, result_path
from vlmbackdoor_bench.grid.store import write_json_atomic
from vlmbackdoor_bench.hookspecs import DefenseContext, DefenseOutcome
from vlmbackdoor_bench.leaderboard import build_tables, load_results
from vlmbackdoor_bench.registry import load_registry
from vlmbackdoor_bench.types import DefenseReport

REPO = Path(__file__).resolve().parents[1]
SMALL_WORLD = WorldSizes(train=20, test=4, pretrain=0, flickr_test=4, val=0, flickr_val=0)


def _config(tmp_path: Path, body: str = "", name: str = "benchmark.toml", profile: str = ""):
    path = tmp_path / name
    path.write_text('[benchmark]\nattacks = ["badnet"]\ndefenses = ["none"]\n'
                    f'cache_dir = "cache"\n{body}\n{profile}')
    return load_config(path)


def _runner(config, log=None) -> GridRunner:
    return GridRunner(config, load_registry(config.plugin_dirs), log=log or (lambda m: None))


def _ok_result(cell: Cell) -> dict:
    """What run_cell returns, reduced to what the board reads (the stages are not under test)."""
    return {"schema": 1, **cell.to_dict(), "attack_preset": "srd-code", "defense_preset": "default",
            "status": "ok", "error": None, "metrics": {"triggered": {"cider": 100.0},
                                                       "clean": {"cider": 110.0}}}


@pytest.fixture
def mount_tmpfs(tmp_path):
    """Mount a tmpfs of ``size`` on a fresh folder (root only); unmounted afterwards."""
    mounted = []

    def mount(size: str = "64k", read_only: bool = False) -> Path:
        target = tmp_path / f"mnt{len(mounted)}"
        target.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN): {done.stderr.strip()}")
        mounted.append(target)
        return target

    yield mount
    for target in mounted:
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _wait_for(predicate, seconds: float) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


# ----------------------------------------------------------------------------- item 1: world
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds worker processes through /proc")
def test_a_killed_world_generation_leaves_no_workers_no_lock_and_no_leftover(tmp_path):
    root = tmp_path / "world"
    big = WorldSizes(train=4000, test=0, pretrain=0, flickr_test=0, val=0, flickr_val=0)  # ~20 s on 2 workers
    script = ("import sys; from vlmbackdoor_bench.data.world import generate_world, WorldSizes; "
              f"generate_world(sys.argv[1], sizes=WorldSizes(*{tuple(vars(big).values())}), "
              "workers=2, chunk=20)")
    parent = subprocess.Popen([sys.executable, "-c", script, str(root)], cwd=REPO)
    try:
        assert _wait_for(lambda: any(root.glob(".world-*.tmp-*/images/coco-train/*.png")), 60)
        workers = _children(parent.pid)
        assert len(workers) >= 2  # the pool's workers (the resource tracker, if any, is extra)
    finally:
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
    assert _wait_for(lambda: not any(_alive(p) for p in workers), 10), "workers outlived their parent"
    lock = root / f".{world_dir_name(0, big)}.lock"
    with open(lock, "a") as handle:  # the lock is free again: taken without waiting
        assert _wait_for(lambda: _try_lock(handle), 5)
    leftovers = list(root.glob(".world-*.tmp-*"))
    assert leftovers
    generate_world(root, sizes=SMALL_WORLD, workers=1)  # the next run sweeps a dead run's leftover
    assert not any(p.exists() for p in leftovers)


def _try_lock(handle) -> bool:
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    fcntl.flock(handle, fcntl.LOCK_UN)
    return True


def test_waiting_for_the_world_lock_says_so(tmp_path):
    root = tmp_path / "world"
    root.mkdir()
    messages: list[str] = []
    with open(root / f".{world_dir_name(0, SMALL_WORLD)}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # another process generating the same world
        worker = threading.Thread(target=generate_world, args=(root,), daemon=True,
                                  kwargs={"sizes": SMALL_WORLD, "workers": 1, "progress": messages.append})
        worker.start()
        assert _wait_for(lambda: any("waiting" in m for m in messages), 10), messages
        fcntl.flock(handle, fcntl.LOCK_UN)
    worker.join(60)
    assert (root / world_dir_name(0, SMALL_WORLD) / "world.json").is_file()


# ----------------------------------------------------------------------------- item 2: tables
def test_failed_cells_never_reshape_or_blank_the_tables():
    ok = [_ok_result(Cell("tiny", "coco", "badnet", d, 0.1, 0)) for d in ("none", "clean-model")]
    ok[1]["metrics"] = {"triggered": {"cider": 123.4}, "clean": {"cider": 123.4}}
    failed = [failed_result(Cell("tiny", "cocoo", "badnet", d, 0.1, 0), "no dataset cocoo")
              for d in ("none", "clean-model")]
    failed.append(failed_result(Cell("tiny", "coco", "badnet", "none", 0.1, 1), "SystemExit: 3"))
    tables = {t.key: t for t in build_tables(ok + failed, "tiny", {}).tables}
    table2 = tables["table2"]
    text = json.dumps([table2.flat_headers(), table2.flat_rows()])
    assert "[None]" not in text and "[default]" not in text and "[srd-code]" not in text
    assert "cocoo" not in text
    clean_rows = [row for row in table2.flat_rows() if "Clean" in " ".join(row)]
    assert clean_rows and "123.4" in " ".join(clean_rows[0])
    assert any("3 cell(s) failed" in note for note in table2.footnotes)


# ----------------------------------------------------------------------------- item 3: disks
def test_a_result_on_a_full_disk_is_one_clear_error_and_leaves_nothing(mount_tmpfs):
    full = mount_tmpfs("64k")
    with pytest.raises(VbbError, match="could not write"):
        write_json_atomic(full / "cell.json", {"values": list(range(50_000))})
    assert list(full.iterdir()) == []


def test_a_result_in_a_read_only_cache_is_one_clear_error(tmp_path, mount_tmpfs):
    config = _config(tmp_path)
    runner = _runner(config)
    read_only = mount_tmpfs("1m", read_only=True)
    config.cache_dir = read_only
    runner.run_cell = _ok_result
    with pytest.raises(VbbError, match="read-only|could not write") as caught:
        runner.run_and_save(Cell("tiny", "coco", "badnet", "none", 0.1, 0))
    assert "cache" in caught.value.fix


# ----------------------------------------------------------------------------- item 4: SystemExit
def test_system_exit_in_a_plugin_fails_only_that_cell(tmp_path):
    config = _config(tmp_path)
    runner = _runner(config)

    def run_cell(cell):
        if cell.dataset == "coco" and cell.defense == "none":
            sys.exit(3)  # what a plugin's defend() did
        return _ok_result(cell)

    runner.run_cell = run_cell
    summary = runner.run()
    assert list(summary.failed) == ["coco__badnet__none__rate0.1__seed0"]
    assert "SystemExit" in summary.failed["coco__badnet__none__rate0.1__seed0"]
    assert len(summary.ok) == 3
    stored = json.loads(result_path(config, Cell("tiny", "coco", "badnet", "none", 0.1, 0)).read_text())
    assert stored["status"] == "failed"

    def interrupted(cell):
        raise KeyboardInterrupt

    runner.run_cell = interrupted  # the user's Ctrl-C still stops the grid
    with pytest.raises(KeyboardInterrupt):
        runner.run_and_save(Cell("tiny", "coco", "badnet", "none", 0.1, 0))


# ----------------------------------------------------------------------------- item 5: bad inputs
def test_an_unknown_dataset_is_refused_before_any_work(tmp_path):
    config = _config(tmp_path, 'datasets = ["coco", "cocoo"]')
    runner = _runner(config)
    ran = []
    runner.run_cell = lambda cell: ran.append(cell) or _ok_result(cell)
    with pytest.raises(VbbError, match="cocoo") as caught:
        runner.run()
    assert "flickr30k" in caught.value.fix and ran == []


@pytest.mark.parametrize("key", ["world_train", "world_val", "world_test", "world_pretrain", "world_flickr_val", "world_flickr_test"])
def test_negative_world_sizes_are_refused(tmp_path, key):
    config = _config(tmp_path, profile=f"[profile.tiny]\n{key} = -5\n")
    with pytest.raises(VbbError, match=key):
        _runner(config)


# ----------------------------------------------------------------------------- item 6: budgets
def test_results_of_different_budgets_never_share_a_board(tmp_path):
    messages: list[str] = []
    three = _runner(_config(tmp_path, profile="[profile.tiny]\nfinetune_epochs = 3\n"), messages.append)
    one = _runner(_config(tmp_path, profile="[profile.tiny]\nfinetune_epochs = 1\n",
                          name="one.toml"), messages.append)
    three.run_cell = one.run_cell = _ok_result
    for dataset in ("coco", "flickr30k"):
        assert three.run_and_save(Cell("tiny", dataset, "badnet", "none", 0.1, 0)) is None
    records = load_results(three.config.results_dir, "tiny")
    assert len({r["budget"]["key"] for r in records}) == 1  # one budget: the board is built
    assert one.run_and_save(Cell("tiny", "coco", "badnet", "none", 0.1, 0)) is None
    assert any("replac" in m and "finetune_epochs" in m for m in messages), messages
    with pytest.raises(VbbError, match="finetune_epochs") as caught:
        load_results(three.config.results_dir, "tiny")
    assert "cache_dir" in caught.value.fix


# ----------------------------------------------------------------------------- item 7: recipe
def test_a_defense_fine_tunes_with_the_cells_recipe():
    calls = []
    victim = SimpleNamespace(fine_tune=lambda data, **kwargs: calls.append((data, kwargs)) or {"ok": 1})
    recipe = object()
    context = DefenseContext(backdoored=victim, training_set=None, clean_reserved=None,
                             base_victim=victim, scorers=None, seed=7, budget={}, workdir=Path("."),
                             stage=None, recipe=recipe)
    assert context.fine_tune(victim, "filtered", progress="mine") == {"ok": 1}
    assert calls == [("filtered", {"seed": 7, "recipe": recipe, "progress": "mine"})]
    example = (REPO / "README.md").read_text().split("## Adding a defense", 1)[1].split("```", 2)[1]
    assert "context.fine_tune(" in example and "victim.fine_tune(" not in example


# ----------------------------------------------------------------------------- item 8: smaller
def test_cells_that_match_nothing_are_an_error(tmp_path, capsys):
    _config(tmp_path)
    assert vbb(["--config", str(tmp_path / "benchmark.toml"), "run", "--no-report",
                "--cells", "badnet", "typo"]) == 2
    err = capsys.readouterr().err
    assert "typo" in err and "coco__badnet__none__rate0.1__seed0" in err


@pytest.mark.parametrize("key,value", [("seeds", "[0, 0]"), ("attacks", '["badnet", "badnet"]'),
                                       ("datasets", '["coco", "coco"]')])
def test_duplicates_in_the_grid_are_refused(key, value):
    import tomllib
    with pytest.raises(VbbError, match="more than once"):
        parse_config(tomllib.loads(f"[benchmark]\n{key} = {value}\n"))


def test_an_unknown_profile_key_names_the_config_file(tmp_path):
    config = _config(tmp_path, name="my-grid.toml", profile="[profile.tiny]\nfinetune_epoch = 3\n")
    with pytest.raises(VbbError) as caught:
        _runner(config)
    assert "my-grid.toml" in str(caught.value) and "benchmark.toml" not in str(caught.value)


def test_the_unknown_parameter_hint_names_preset():
    plugin = SimpleNamespace(name="x", presets={"default": {"a": 1}}, default_preset="default")
    with pytest.raises(VbbError) as caught:
        resolve_params("attack", plugin, {"b": 2})
    assert "preset" in caught.value.fix


def test_score_warns_about_repeated_image_ids(tmp_path):
    from vlmbackdoor_bench.metrics.io import load_results as load_captions
    path = tmp_path / "captions.json"
    path.write_text(json.dumps([{"image_id": 1, "caption": "a"}, {"image_id": 1, "caption": "b"},
                                {"image_id": 2, "caption": "c"}]))
    with pytest.warns(UserWarning, match="image id 1 .*2 times.*first"):
        assert load_captions(path) == {1: "a", 2: "c"}


@pytest.mark.parametrize("returned", [None, {"victim": 1}])
def test_a_defense_returning_no_outcome_names_defense_outcome(returned):
    from vlmbackdoor_bench.grid.runner import checked_outcome
    with pytest.raises(VbbError, match="DefenseOutcome"):
        checked_outcome("mine", returned)
    outcome = DefenseOutcome(victim=object(), report=DefenseReport())
    assert checked_outcome("mine", outcome) is outcome


def test_sigterm_while_waiting_for_the_world_says_so(tmp_path):
    config = _config(tmp_path, 'datasets = ["coco"]', profile=(
        "[profile.tiny]\nworld_train = 20\nworld_test = 4\nworld_pretrain = 8\nworld_flickr_test = 4\nworld_val = 0\nworld_flickr_val = 0\n"))
    root = config.cache_dir / "world"
    root.mkdir(parents=True)
    sizes = WorldSizes(20, 4, 8, 4, 0, 0)
    with open(root / f".{world_dir_name(0, sizes)}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # the world is being generated by someone else
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        run = subprocess.Popen([sys.executable, "-m", "vlmbackdoor_bench.cli", "--config",
                                str(config.source), "run", "--no-report"], cwd=REPO, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        stderr = []
        reader = threading.Thread(target=lambda: stderr.extend(run.stderr), daemon=True)
        reader.start()
        try:
            assert _wait_for(lambda: any("waiting" in line for line in stderr), 120), stderr
        finally:
            run.send_signal(signal.SIGTERM)
            run.wait(30)
        reader.join(5)
    assert run.returncode == 143
    assert any("terminated" in line for line in stderr), stderr


def test_sfs_scores_are_stored_rounded():
    from vlmbackdoor_bench.metrics.sfs import SfsScorer

    class Scorer(SfsScorer):  # the scoring arithmetic, with model outputs that need all digits
        def similarity(self, a, b):
            return np.full(len(a), 1 / 3)

        def perplexity(self, texts):
            return np.linspace(1.1, 7.7, len(texts)) ** 1.5

    result = Scorer().score({1: "a cat", 2: "two dogs", 3: "a bird"}, {1: "a cat", 2: "a dog", 3: "x"})
    for key in ("sc", "lf", "sfs"):
        assert result[key] == round(result[key], 6)
    assert result["sc"] == pytest.approx(100 / 3, abs=1e-6)
