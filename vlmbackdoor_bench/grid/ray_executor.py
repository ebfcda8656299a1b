"""`vbb run --executor ray`: the grid's stage DAG (grid.dag) as Ray tasks (docs/cli.md, "Running on several GPUs or a Ray cluster").

The driver submits every distinct stage task once, with the tasks it needs as arguments, so Ray
starts it only after them and no two workers ever build the same store entry; no lock spans hosts.
A task builds its entry in the store (on a filesystem every node sees) by atomic rename and returns
the entry's key. Ray reruns a task whose worker process died (``max_retries``); a plugin exception
is caught in the task and returned as a ``Failure``, which every task downstream passes on without
running, so it fails only the cells that need it, with the reason in their result files.

Ray is imported only here, and this module only when the executor is chosen (GridRunner.run).
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass
from typing import Any, Callable

from tqdm.auto import tqdm

from ..config import BenchmarkConfig
from ..errors import VbbError
from .cells import Cell
from .dag import STAGE_KINDS, StageTask, plan, run_task
from .outcomes import RunSummary, error_message, failed_result, result_path
from .store import write_json_atomic

POLL_SECONDS = 0.5
# Set in every worker: progress bars of several workers would garble the driver's output (its one
# bar and the forwarded stage log lines say what runs), and nothing may download (README set-up).
WORKER_ENV = {"TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


@dataclass(frozen=True)
class Failure:
    """A task that raised (or one it needs did): the error as a cell's result reports it."""
    task: str
    error: str
    trace: str = ""


def import_ray():
    try:
        import ray
    except ImportError:
        raise VbbError("the Ray executor needs the 'ray' package, which is not installed",
                       "pip install 'vlmbackdoor-bench[ray]', or run with --executor local") from None
    return ray


def connect(config: BenchmarkConfig, num_cpus: int | None = None) -> bool:
    """Join the cluster at ``config.executor_address``, or start one on this machine when it is
    empty (with ``num_cpus`` CPUs, default all). True when this call started or joined Ray (the
    caller then shuts it down), False when this process was connected already."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    runtime_env = {"env_vars": WORKER_ENV}
    if config.executor_address:
        ray.init(address=config.executor_address, runtime_env=runtime_env, logging_level="WARNING")
    else:
        ray.init(num_cpus=num_cpus, runtime_env=runtime_env, include_dashboard=False,
                 logging_level="WARNING")
    return True


def stage_options(config: BenchmarkConfig, kind: str, gpu_cluster: bool) -> dict[str, float]:
    """Ray resources of a task of ``kind``: [executor.resources.<kind>] over the defaults, one CPU
    and, where the grid runs on GPUs, one GPU for every kind: the device a worker resolves enters
    the model stages' keys (vlmbackdoor_bench.device), so a stage run without a GPU would rebuild
    the base victim on the CPU under another key."""
    unknown = set(config.stage_resources) - set(STAGE_KINDS)
    if unknown:
        raise VbbError(f"[executor.resources] names unknown stage kind(s) {sorted(unknown)}",
                       f"use stage kinds from: {', '.join(STAGE_KINDS)}")
    return {"num_cpus": 1.0, "num_gpus": 1.0 if gpu_cluster else 0.0, **config.stage_resources.get(kind, {})}


# ---------------------------------------------------------------- in the worker processes
_RUNNERS: dict[str, Any] = {}  # one GridRunner per configuration and worker process
_LOG: dict[str, Callable[[str], None]] = {}  # where the running task's log lines go


def _log_of_running_task(message: str) -> None:
    _LOG["to"](message)


@dataclass(frozen=True)
class GridStage:
    """What a grid task computes (dag.run_task), with this worker process's GridRunner (the
    class is handed over, not imported, so that runner.py and this module import no cycle)."""
    config: BenchmarkConfig
    runner_class: type

    def __call__(self, task: StageTask, log: Callable[[str], None]) -> Any:
        import ray
        import torch

        # Ray sizes a task by its CPUs; PyTorch would use every core of the node otherwise.
        torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
        _LOG["to"] = log
        key = repr(self.config)
        if key not in _RUNNERS:
            from ..allocator import keep_freed_memory
            from ..registry import load_registry
            keep_freed_memory()  # as `vbb run` does (allocator.py)
            _RUNNERS[key] = self.runner_class(self.config, load_registry(self.config.plugin_dirs),
                                       log=_log_of_running_task)
        return run_task(_RUNNERS[key], task)


def _run_stage(compute: Callable[[StageTask, Callable[[str], None]], Any], task: StageTask, events,
               *upstream: Any) -> Any:
    """One Ray task: ``compute(task, log)`` unless a task it needs failed (then that Failure)."""
    failed = next((u for u in upstream if isinstance(u, Failure)), None)
    if failed is not None:
        return failed
    events.put(("start", task.name, ""))

    def log(message: str) -> None:
        events.put(("log", task.name, message))

    try:
        return compute(task, log)
    except Exception as exc:  # a plugin's bug fails the cells downstream, never the grid
        failure = Failure(task.name, error_message(exc), traceback.format_exc(limit=8))
        log(f"stage {task.name} FAILED: {failure.error}")
        return failure


# ---------------------------------------------------------------- in the driver
def execute(tasks: list[StageTask], compute: Callable[[StageTask, Callable[[str], None]], Any],
            options: Callable[[StageTask], dict[str, float]], max_retries: int,
            log: Callable[[str], None]) -> dict[str, Any]:
    """Run ``tasks`` (each after those it needs) on the connected cluster; the outcome of each by
    name: what ``compute`` returned, or a Failure. One progress bar counts the cells, ok and
    failed, and the tasks running (started, outcome not yet collected)."""
    import ray
    from ray.util.queue import Empty, Queue

    events = Queue(actor_options={"num_cpus": 0})
    shared_compute = ray.put(compute)
    on_cpus = ray.remote(_run_stage)
    on_gpus = ray.remote(max_calls=1)(_run_stage)  # a process keeps the first GPU CUDA saw
    refs: dict[str, Any] = {}
    for task in tasks:
        resources = options(task)
        function = on_gpus if resources.get("num_gpus") else on_cpus
        refs[task.name] = function.options(name=task.name, max_retries=max_retries, **resources).remote(
            shared_compute, task, events, *(refs[name] for name in task.needs))
    kind_of = {task.name: task.kind for task in tasks}
    pending = {ref: name for name, ref in refs.items()}
    outcomes: dict[str, Any] = {}
    running: set[str] = set()
    counts = {"ok": 0, "failed": 0}
    bar = tqdm(total=sum(kind == "cell" for kind in kind_of.values()), desc="grid", unit="cell")

    def drain() -> None:
        while True:
            try:
                batch = events.get_nowait_batch(max(1, events.qsize()))
            except Empty:
                return
            for kind, name, message in batch:
                if kind == "log":
                    log(f"[{name}] {message}")
                elif name not in outcomes:
                    running.add(name)

    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=POLL_SECONDS)
            drain()
            for ref in ready:
                name = pending.pop(ref)
                running.discard(name)
                try:
                    outcomes[name] = ray.get(ref)
                except ray.exceptions.RayError as exc:  # its worker (or a needed task's) died max_retries + 1 times
                    outcomes[name] = Failure(name, f"a Ray worker died running this task or one it needs, "
                                                   f"{max_retries + 1} times ({type(exc).__name__}): rerun to "
                                                   "resume from the store", str(exc))
                if kind_of[name] == "cell":
                    counts["ok" if outcomes[name] is None else "failed"] += 1
                    bar.update(1)
            bar.set_postfix(ok=counts["ok"], failed=counts["failed"], running=len(running))
        drain()
    finally:
        bar.close()
        for ref in pending:  # interrupted: leave nothing running on the cluster
            ray.cancel(ref, force=True)
        events.shutdown()
    return outcomes


def run_on_ray(runner, cells: list[Cell]) -> RunSummary:
    """Run ``cells`` as stage tasks on Ray (joining or starting the cluster of ``runner.config``);
    every cell gets a result file, as in a local run."""
    config = runner.config
    tasks = plan(cells, runner.registry.attack)
    ray = import_ray()
    started_here = connect(config)
    try:
        cluster = ray.cluster_resources()
        gpu_cluster = config.device != "cpu" and cluster.get("GPU", 0) > 0
        options = {kind: stage_options(config, kind, gpu_cluster) for kind in STAGE_KINDS}
        runner.log(f"grid: {len(cells)} cells as {len(tasks)} stage tasks on Ray "
                   f"({cluster.get('CPU', 0):g} CPUs, {cluster.get('GPU', 0):g} GPUs)")
        outcomes = execute(tasks, GridStage(config, type(runner)), lambda task: options[task.kind], config.max_retries,
                           runner.log)
    finally:
        if started_here:
            ray.shutdown()
    summary = RunSummary()
    for cell in cells:
        outcome = outcomes[cell.cell_id]
        if isinstance(outcome, Failure):  # the cell never ran: say why in its result file
            runner.log(f"cell {cell.cell_id} FAILED in {outcome.task}: {outcome.error}")
            write_json_atomic(result_path(config, cell), failed_result(cell, outcome.error, outcome.trace))
            summary.record(cell, outcome.error)
        else:
            summary.record(cell, outcome)
    return summary
