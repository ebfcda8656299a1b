"""The Ray executor (grid.ray_executor) and the stage DAG it runs (grid.dag).

The DAG and configuration tests need no Ray. The others run on a local Ray cluster of 2 CPUs:
a very small tiny-profile grid against the local executor (same thread count: PyTorch's
reductions depend on it), a worker killed with SIGKILL in the middle of a stage, a defense that
raises, build counts per store key, and the scheduling overhead on a 2,000-cell grid of stub stages.
"""

from __future__ import annotations

import collections
import json
import re
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from vlmbackdoor_bench.config import load_config, parse_config
from vlmbackdoor_bench.errors import VbbError
from vlmbackdoor_bench.grid.cells import CLEAN_MODEL, Cell, expand
from vlmbackdoor_bench.grid.dag import plan
from vlmbackdoor_bench.grid.runner import GridRunner
from vlmbackdoor_bench.registry import load_registry

try:
    import ray
except ImportError:
    ray = None
needs_ray = pytest.mark.skipif(ray is None, reason="Ray is not installed: pip install 'vlmbackdoor-bench[ray]'")
needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="PTB tokenizer needs Java")

# ---------------------------------------------------------------- the DAG, without Ray


def _tasks_by_name(cells, attacks):
    return {t.name: t for t in plan(cells, lambda name: attacks.get(name, SimpleNamespace()))}


def test_plan_has_each_stage_once_after_what_it_needs():
    config = parse_config({"benchmark": {"attacks": ["badnet", "vlood", "vl_trojan"], "defenses": ["none", "srd"],
                                         "datasets": ["coco", "flickr30k"], "seeds": [0, 1]}})
    attacks = {"vlood": SimpleNamespace(fine_tune_from="clean_model"),
               "vl_trojan": SimpleNamespace(eval_uses_poison=True)}
    tasks = plan(expand(config), lambda name: attacks.get(name, SimpleNamespace()))
    names = [t.name for t in tasks]
    assert len(names) == len(set(names))
    position = {name: i for i, name in enumerate(names)}
    assert all(position[need] < position[t.name] for t in tasks for need in t.needs)
    counts = collections.Counter(t.kind for t in tasks)
    # 1 base; per seed a clean model; per (dataset, seed) a reference; per (attack, seed) a poison
    # and a backdoor; per (attack, defense, seed) a defend; every cell (3 x 2 x 2 x 2 + 3 x 2 x 2)
    assert counts == {"base": 1, "clean_model": 2, "reference": 4, "poison": 6, "backdoor": 6,
                      "defend": 12, "cell": 36}
    by_name = {t.name: t for t in tasks}
    assert by_name["backdoor vlood seed1"].needs == ("poison vlood seed1", "clean_model seed1")
    assert by_name["backdoor badnet seed1"].needs == ("poison badnet seed1", "base")
    assert by_name["defend badnet srd seed0"].needs == ("backdoor badnet seed0", "clean_model seed0")
    assert by_name["flickr30k__badnet__srd__rate0.1__seed0"].needs == ("defend badnet srd seed0",
                                                                       "reference flickr30k seed0")


def test_clean_model_rows_of_a_dataset_and_seed_run_one_after_another():
    """They may share caption and score entries (one model, the same clean inputs)."""
    cells = [Cell("tiny", "coco", attack, CLEAN_MODEL, 0.1, 0) for attack in ("badnet", "vl_trojan", "blended")]
    cells.append(Cell("tiny", "flickr30k", "badnet", CLEAN_MODEL, 0.1, 0))
    tasks = _tasks_by_name(cells, {"vl_trojan": SimpleNamespace(eval_uses_poison=True)})
    rows = [c.cell_id for c in cells]
    assert tasks[rows[0]].needs == ("reference coco seed0",)
    assert tasks[rows[1]].needs == ("reference coco seed0", "poison vl_trojan seed0", rows[0])
    assert tasks[rows[2]].needs == ("reference coco seed0", rows[1])
    assert tasks[rows[3]].needs == ("reference flickr30k seed0",)  # another dataset: its own chain
    assert "backdoor badnet seed0" not in tasks  # a clean-model row needs no backdoored model


def test_executor_settings_are_read_and_checked():
    config = parse_config({"benchmark": {"executor": "ray"},
                           "executor": {"address": "ray://head:10001", "max_retries": 1,
                                        "resources": {"backdoor": {"num_gpus": 1, "num_cpus": 4}}}})
    assert (config.executor, config.executor_address, config.max_retries) == ("ray", "ray://head:10001", 1)
    assert config.stage_resources == {"backdoor": {"num_gpus": 1.0, "num_cpus": 4.0}}
    assert parse_config({}).executor == "local"
    for raw, message in (({"benchmark": {"executor": "dask"}}, "not one of local, ray"),
                         ({"executor": {"adress": "auto"}}, "may hold only address"),
                         ({"executor": {"max_retries": -1}}, "whole number >= 0"),
                         ({"executor": {"resources": {"defend": {"gpus": 1}}}}, r"\[executor.resources.defend\]")):
        with pytest.raises(VbbError, match=message):
            parse_config(raw)


def test_stage_options_default_to_one_cpu_and_one_gpu_on_a_gpu_cluster():
    from vlmbackdoor_bench.grid.ray_executor import stage_options
    config = parse_config({"executor": {"resources": {"poison": {"num_gpus": 0.25}}}})
    assert stage_options(config, "backdoor", gpu_cluster=False) == {"num_cpus": 1.0, "num_gpus": 0.0}
    assert stage_options(config, "backdoor", gpu_cluster=True) == {"num_cpus": 1.0, "num_gpus": 1.0}
    assert stage_options(config, "poison", gpu_cluster=True) == {"num_cpus": 1.0, "num_gpus": 0.25}
    with pytest.raises(VbbError, match=r"unknown stage kind\(s\) \['train'\]"):
        stage_options(parse_config({"executor": {"resources": {"train": {}}}}), "base", gpu_cluster=False)


def test_workers_are_sized_for_the_largest_stage_and_as_many_as_the_cluster_holds():
    from vlmbackdoor_bench.grid.ray_executor import pool_size, worker_shape
    tasks = plan([Cell("tiny", "coco", "badnet", "none", 0.1, 0)], lambda name: SimpleNamespace())
    asks = {"backdoor": {"num_cpus": 2.0, "num_gpus": 0.5}, "poison": {"num_cpus": 1.0, "num_gpus": 1.0}}
    shape = worker_shape(tasks, lambda task: asks.get(task.kind, {"num_cpus": 1.0, "num_gpus": 0.0}))
    assert shape == {"num_cpus": 2.0, "num_gpus": 1.0}
    assert pool_size({"CPU": 16.0, "GPU": 4.0}, shape, n_tasks=100) == 4  # the GPUs bound it
    assert pool_size({"CPU": 5.0, "GPU": 8.0}, shape, n_tasks=100) == 2  # the CPUs bound it
    assert pool_size({"CPU": 16.0}, {"num_cpus": 1.0, "num_gpus": 0.0}, n_tasks=3) == 3  # no idle workers
    assert pool_size({"CPU": 1.0}, {"num_cpus": 4.0}, n_tasks=3) == 1  # one worker, Ray waits for room


def test_an_idle_worker_gets_the_ready_task_whose_models_it_holds():
    from vlmbackdoor_bench.grid.ray_executor import assign
    needs = {"cell a": ("defend a", "reference"), "cell b": ("defend b", "reference"), "poison c": ("base",)}
    ran_on = {"defend a": 0, "defend b": 1, "reference": 1, "base": 1}
    ready, idle = ["poison c", "cell a", "cell b"], [0, 1]
    # worker 1 holds both of cell b's inputs; worker 0 then takes cell a (its defended model)
    assert assign(ready, idle, needs, ran_on) == [(1, "cell b"), (0, "cell a")]
    assert ready == ["poison c"] and idle == []
    ready, idle = ["poison c", "cell a"], [0]
    assert assign(ready, idle, needs, ran_on) == [(0, "cell a")]  # its defended model beats plan order
    assert assign(["poison c"], [0, 1], needs, {}) == [(0, "poison c")]  # no affinity: first worker


def test_without_ray_the_error_names_the_extra(monkeypatch, tmp_path):
    from vlmbackdoor_bench.grid.ray_executor import import_ray
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(VbbError, match=re.escape("pip install 'vlmbackdoor-bench[ray]'")):
        import_ray()
    (tmp_path / "benchmark.toml").write_text('[benchmark]\nexecutor = "ray"\ncache_dir = "cache"\n')
    config = load_config(tmp_path / "benchmark.toml")
    with pytest.raises(VbbError, match="needs the 'ray' package"):
        GridRunner(config, load_registry(), log=lambda m: None).run(lambda cell: False)
    assert not (tmp_path / "cache" / "store" / "base").exists()


def test_an_address_without_the_ray_executor_is_refused(tmp_path, capsys):
    from vlmbackdoor_bench.cli import main
    (tmp_path / "benchmark.toml").write_text('[benchmark]\ncache_dir = "cache"\n')
    assert main(["--config", str(tmp_path / "benchmark.toml"), "run", "--address", "auto"]) == 2
    assert "--address names a Ray cluster, but the executor is local" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()


def test_the_local_executor_never_imports_ray(tmp_path):
    import subprocess
    code = ("import sys; from vlmbackdoor_bench.cli import main; "
            "main(['--config', sys.argv[1], 'run', '--cells', 'nothing', '--no-report']); "
            "print('ray' in sys.modules)")
    (tmp_path / "benchmark.toml").write_text('[benchmark]\ncache_dir = "cache"\n')
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "benchmark.toml")],
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "False", out.stderr


# ---------------------------------------------------------------- on a local Ray cluster

@pytest.fixture(scope="module")
def ray_cluster():
    if ray is None:
        pytest.skip("Ray is not installed: pip install 'vlmbackdoor-bench[ray]'")
    import os
    from vlmbackdoor_bench.grid.ray_executor import WORKER_ENV
    # Ray's memory monitor kills workers when the whole node is nearly full, which on a shared
    # test machine is other jobs' doing; these tests need ~2 GB.
    os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING",
             runtime_env={"env_vars": WORKER_ENV})
    yield ray
    ray.shutdown()


@needs_ray
def test_scheduling_overhead_per_stage_on_a_2000_cell_grid(ray_cluster, capsys):
    """Stub stages (no models): what the Ray executor adds per stage over calling them in order."""
    from vlmbackdoor_bench.grid.ray_executor import execute
    config = parse_config({"benchmark": {"attacks": [f"a{i}" for i in range(20)],
                                         "defenses": [f"d{i}" for i in range(10)],
                                         "datasets": ["coco", "flickr30k"], "seeds": [0, 1, 2, 3, 4]}})
    cells = expand(config)
    tasks = plan(cells, lambda name: SimpleNamespace())
    assert len([c for c in cells if c.defense != CLEAN_MODEL]) == 2000

    def compute(task, log):  # a stage that computes nothing (local to the test: Ray ships it by value)
        return None if task.kind == "cell" else task.name

    started = time.perf_counter()
    local = {task.name: compute(task, print) for task in tasks}
    local_seconds = time.perf_counter() - started
    started = time.perf_counter()
    outcomes = execute(tasks, compute, lambda task: {"num_cpus": 1.0}, max_retries=0, log=print)
    ray_seconds = time.perf_counter() - started
    assert outcomes == local
    per_stage_ms = 1000 * (ray_seconds - local_seconds) / len(tasks)
    with capsys.disabled():
        print(f"\nscheduling: {len(cells)} cells, {len(tasks)} stage tasks: local {local_seconds:.3f} s, "
              f"Ray {ray_seconds:.1f} s on 2 CPUs: {per_stage_ms:.2f} ms per stage")
    assert per_stage_ms < 50  # the aim


@needs_ray
def test_stage_tasks_run_in_long_lived_workers(ray_cluster):
    """Every task runs in one of the pool's 2 processes (what they load stays loaded)."""
    import os
    from vlmbackdoor_bench.grid.ray_executor import execute
    config = parse_config({"benchmark": {"attacks": ["a0", "a1"], "defenses": ["d0", "d1"],
                                         "datasets": ["coco", "flickr30k"]}})
    tasks = plan(expand(config), lambda name: SimpleNamespace())

    def compute(task, log):
        return os.getpid()

    outcomes = execute(tasks, compute, lambda task: {"num_cpus": 1.0}, max_retries=0, log=print)
    assert set(outcomes) == {t.name for t in tasks} and len(set(outcomes.values())) == 2
    assert os.getpid() not in outcomes.values()


PLUGINS = '''
import os, signal
from pathlib import Path
from vlmbackdoor_bench import hookspecs
from vlmbackdoor_bench_plugins.attacks.badnet import BadNet

class Dying(BadNet):
    """BadNet whose first poisoning kills its process, as the out-of-memory killer would."""
    name = "dying"
    version = "0.0.1"
    def poison(self, train, **kwargs):
        marker = Path(__file__).with_name("killed-once")
        if not marker.exists():
            marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return super().poison(train, **kwargs)

class Crashing:
    name = "crashing"
    version = "0.0.1"
    presets = {"default": {}}
    default_preset = "default"
    def defend(self, context, params):
        raise RuntimeError("this defense always fails")

@hookspecs.hookimpl
def register_attacks(register):
    register(Dying())

@hookspecs.hookimpl
def register_defenses(register):
    register(Crashing())
'''

CONFIG = '''
[benchmark]
profile = "tiny"
attacks = {attacks}
defenses = {defenses}
datasets = ["coco", "flickr30k"]
cache_dir = "cache"
plugin_dirs = ["plugins"]
executor = "{executor}"

[profile.tiny]
world_train = 40
world_test = 6
world_pretrain = 60
world_flickr_test = 6
world_val = 0
world_flickr_val = 0
pretrain_epochs = 1
finetune_epochs = 1
'''


def _grid_config(root, executor, attacks, defenses):
    (root / "plugins").mkdir()
    (root / "plugins" / "faulty.py").write_text(PLUGINS)
    (root / "benchmark.toml").write_text(CONFIG.format(executor=executor, attacks=json.dumps(attacks),
                                                       defenses=json.dumps(defenses)))
    return load_config(root / "benchmark.toml")


def _results(config) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in (config.results_dir / "tiny").glob("*.json")}


@pytest.fixture(scope="module")
def local_grid(tmp_path_factory):
    """BadNet x no defense with the local executor, on one PyTorch thread as each Ray task has."""
    import torch
    config = _grid_config(tmp_path_factory.mktemp("local"), "local", ["badnet"], ["none"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = GridRunner(config, load_registry(config.plugin_dirs), log=lambda m: None).run()
    finally:
        torch.set_num_threads(threads)
    assert not summary.failed
    return config


@pytest.fixture(scope="module")
def ray_grid(ray_cluster, local_grid, tmp_path_factory):
    """BadNet and Dying x no defense and Crashing on Ray; the world is copied from the local run."""
    root = tmp_path_factory.mktemp("ray")
    config = _grid_config(root, "ray", ["badnet", "dying"], ["none", "crashing"])
    shutil.copytree(local_grid.cache_dir / "world", config.cache_dir / "world")
    lines = []
    started = time.perf_counter()
    summary = GridRunner(config, load_registry(config.plugin_dirs), log=lines.append).run()
    return config, summary, lines, time.perf_counter() - started


def _without_paths(details: dict) -> dict:
    return {kind: {k: v for k, v in values.items() if k != "captions_file"} for kind, values in details.items()}


@needs_ray
@needs_java
def test_ray_gives_the_local_executors_results_byte_for_byte(local_grid, ray_grid):
    config, _, _, _ = ray_grid
    local, remote = _results(local_grid), _results(config)
    assert len(local) == 4
    for cell_id, expected in local.items():
        got = remote[cell_id]
        assert got["status"] == "ok"
        assert json.dumps(got["metrics"], sort_keys=True) == json.dumps(expected["metrics"], sort_keys=True)
        assert _without_paths(got["metric_details"]) == _without_paths(expected["metric_details"])
        for kind, details in expected["metric_details"].items():  # the same captions, in another store
            assert Path(got["metric_details"][kind]["captions_file"]).read_bytes() == \
                Path(details["captions_file"]).read_bytes()
        assert got["provenance"]["stage_keys"] == expected["provenance"]["stage_keys"]
        assert got["detection"] == expected["detection"]


@needs_ray
@needs_java
def test_a_crashing_defense_fails_only_its_cells(ray_grid):
    config, summary, _, _ = ray_grid
    crashing = {f"{d}__{a}__crashing__rate0.1__seed0" for d in ("coco", "flickr30k") for a in ("badnet", "dying")}
    assert set(summary.failed) == crashing
    assert len(summary.ok) == 12 - 4
    results = _results(config)
    for cell_id in crashing:
        assert results[cell_id]["status"] == "failed"
        assert results[cell_id]["error"] == "RuntimeError: this defense always fails"
        assert "this defense always fails" in results[cell_id]["traceback"]
    assert all(results[c]["status"] == "ok" for c in summary.ok)


@needs_ray
@needs_java
def test_a_worker_killed_mid_stage_is_retried_and_the_grid_completes(ray_grid):
    config, summary, lines, _ = ray_grid
    killer = int((config.plugin_dirs[0] / "killed-once").read_text())
    poison = _results(config)["coco__dying__none__rate0.1__seed0"]["provenance"]["stage_keys"]["poison"]
    attempts = [line for line in lines if f"store: building poison {poison[:12]}" in line]
    assert len(attempts) == 2  # the killed one and its retry
    assert {"coco__dying__none__rate0.1__seed0", "flickr30k__dying__none__rate0.1__seed0"} <= set(summary.ok)
    # the killed build's temporary directory stays until the next run sweeps it (grid.store)
    leftover = list((config.store_dir / "poison").glob(f".{poison}.*-{killer}.tmp"))
    assert len(leftover) == 1
    assert GridRunner(config, load_registry(config.plugin_dirs), log=lambda m: None).store.sweep_stale() == leftover


@needs_ray
@needs_java
def test_each_stage_key_is_built_exactly_once(ray_grid):
    config, _, lines, _ = ray_grid
    built = collections.Counter(re.search(r"store: built (\w+ \w{12}) in", line).group(1)
                                for line in lines if "store: built " in line)
    assert built and set(built.values()) == {1}
    per_stage = collections.Counter(name.split()[0] for name in built)
    for stage in ("base", "clean_model", "poison", "backdoor", "defend", "captions", "scores"):
        assert per_stage[stage] == len(list((config.store_dir / stage).glob("[0-9a-f]*"))), stage
    assert (per_stage["base"], per_stage["clean_model"], per_stage["poison"], per_stage["backdoor"],
            per_stage["defend"]) == (1, 1, 2, 2, 2)


@needs_ray
@needs_java
def test_a_rerun_on_ray_resumes_from_the_store(ray_grid):
    config, _, _, first_seconds = ray_grid
    before = _results(config)
    lines = []
    summary = GridRunner(config, load_registry(config.plugin_dirs), log=lines.append).run(
        lambda cell: cell.attack == "badnet")
    # only the crashing defense starts a build again (it never finishes one)
    assert {line.split("store: building ")[1].split()[0] for line in lines if "store: building" in line} == {"defend"}
    assert not [line for line in lines if "store: built" in line]
    assert len(summary.ok) == 4 and len(summary.failed) == 2  # crashing fails again
    after = _results(config)
    assert all(after[c]["metrics"] == before[c]["metrics"] for c in summary.ok)
