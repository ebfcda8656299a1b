"""`vbb run --executor ray`: the grid's stage DAG (grid.dag) on Ray (docs/cli.md, "Running on several GPUs or a Ray cluster").

The driver runs every distinct stage task once, each after the tasks it needs, so no two workers
ever build the same store entry and no lock spans hosts. The tasks run on a pool of long-lived
actors (StageWorker), as many as the cluster holds at the largest stage kind's resources: a worker
keeps its GridRunner, with the models, splits and SFS scorer it loaded, from task to task, as the
local executor's one process does (a fresh process per task reloaded them: a 17-45 s scores stage
where the local one took 0.3-4 s, issue 27). The driver hands each idle worker a ready task,
preferring one whose upstream models that worker already holds. A task builds its entry in the
store (on a filesystem every node sees) by atomic rename and returns the entry's key. A task whose
worker process died is run again on a fresh worker (``max_retries``); a plugin exception is caught
in the worker and returned as a ``Failure``, which every task downstream inherits without running,
so it fails only the cells that need it, with the reason in their result files.

Ray is imported only here, and this module only when the executor is chosen (GridRunner.run).
"""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

from ..config import BenchmarkConfig
from ..errors import VbbError
from .cells import Cell
from .dag import STAGE_KINDS, StageTask, plan, run_task
from .outcomes import RunSummary, error_message, failed_result, result_path
from .progress import GridProgress, recorded_seconds
from .store import write_json_atomic

POLL_SECONDS = 0.5
DRAIN_SECONDS = 0.2  # how stale a forwarded log line may be
AFFINITY_WINDOW = 64  # ready tasks weighed per assignment (assign)
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

        # Ray sizes a worker by its CPUs; PyTorch would use every core of the node otherwise.
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


class StageWorker:
    """A long-lived Ray actor: one process that runs stage task after stage task, keeping what
    they load (the GridRunner's models, splits and SFS scorer) for the next one, as the local
    executor's one process does."""

    def __init__(self, compute: Callable[[StageTask, Callable[[str], None]], Any], events):
        self.compute, self.events = compute, events

    def run(self, task: StageTask) -> Any:
        """``compute(task, log)``; a plugin exception becomes a Failure."""
        def log(message: str) -> None:
            import ray
            try:
                self.events.put(("log", task.name, message))
            except ray.exceptions.RayError:  # the queue is gone (e.g. killed for memory): Ray
                print(f"[{task.name}] {message}", flush=True)  # forwards the worker's output

        try:
            return self.compute(task, log)
        except Exception as exc:  # a plugin's bug fails the cells downstream, never the grid
            failure = Failure(task.name, error_message(exc), traceback.format_exc(limit=8))
            log(f"stage {task.name} FAILED: {failure.error}")
            return failure


# ---------------------------------------------------------------- in the driver
def worker_shape(tasks: list[StageTask], options: Callable[[StageTask], dict[str, float]]) -> dict[str, float]:
    """The resources of one worker: for each resource, the most any task asks for (every worker
    must be able to run every task)."""
    shape: dict[str, float] = {}
    for task in tasks:
        for resource, amount in options(task).items():
            shape[resource] = max(shape.get(resource, 0.0), float(amount))
    return shape


def pool_size(cluster: dict[str, float], shape: dict[str, float], n_tasks: int) -> int:
    """How many workers of ``shape`` the cluster holds at once (at least one, at most one per task)."""
    ray_names = {"num_cpus": "CPU", "num_gpus": "GPU"}
    fits = [int(cluster.get(ray_names[r], 0.0) // amount) for r, amount in shape.items() if amount > 0]
    return max(1, min([n_tasks, *fits]))


def assign(ready: list[str], idle: list[int], needs: dict[str, tuple[str, ...]],
           ran_on: dict[str, int]) -> list[tuple[int, str]]:
    """Pairs (worker, task) for the idle workers: each time the pair whose worker ran most of the
    task's needed tasks (their models are loaded in it), so a cell follows its defended model;
    ties go to the task first in plan order. Only the first AFFINITY_WINDOW ready tasks are
    weighed, which keeps a 2,000-cell grid's scheduling cheap. Takes what it pairs from
    ``ready`` and ``idle``."""
    pairs = []
    while ready and idle:
        window = ready[:AFFINITY_WINDOW]
        worker, name = max(((w, n) for w in idle for n in window),
                           key=lambda pair: (sum(ran_on.get(n) == pair[0] for n in needs[pair[1]]),
                                             -window.index(pair[1]), -idle.index(pair[0])))
        ready.remove(name)
        idle.remove(worker)
        pairs.append((worker, name))
    return pairs


def execute(tasks: list[StageTask], compute: Callable[[StageTask, Callable[[str], None]], Any],
            options: Callable[[StageTask], dict[str, float]], max_retries: int,
            log: Callable[[str], None], progress: GridProgress | None = None) -> dict[str, Any]:
    """Run ``tasks`` (each after those it needs) on a pool of StageWorker actors on the connected
    cluster; the outcome of each by name: what ``compute`` returned, or a Failure. The driver
    hands a worker a task whose needs have finished, preferring one whose upstream models that
    worker holds. A task whose worker died is run again on a new worker up to ``max_retries``
    times. ``progress`` (default: a new GridProgress) gets every start and end."""
    import ray
    from ray.util.queue import Empty, Queue

    shape = worker_shape(tasks, options)
    size = pool_size(ray.cluster_resources(), shape, len(tasks))
    progress = progress or GridProgress(tasks, size)
    events = Queue(actor_options={"num_cpus": 0})
    actor_class = ray.remote(StageWorker).options(max_restarts=0, **shape)
    shared_compute = ray.put(compute)
    workers = [actor_class.remote(shared_compute, events) for _ in range(size)]
    needs = {task.name: task.needs for task in tasks}
    by_name = {task.name: task for task in tasks}
    waiting = {task.name: set(task.needs) for task in tasks}
    dependents: dict[str, list[str]] = {}
    for task in tasks:
        for need in task.needs:
            dependents.setdefault(need, []).append(task.name)
    ready = [name for name, left in waiting.items() if not left]
    outcomes: dict[str, Any] = {}
    ran_on: dict[str, int] = {}
    attempts: dict[str, int] = {}
    in_flight: dict[Any, tuple[str, int]] = {}  # ref -> (task, worker)
    idle = list(range(size))

    def settle(name: str, outcome: Any) -> None:
        """Record ``outcome``; a task all of whose needs are settled becomes ready, or, when one
        of them failed, settles with that Failure without running."""
        outcomes[name] = outcome
        progress.finished(name, ok=outcome is None)  # a cell's outcome: None or its error
        for dependent in dependents.get(name, ()):
            waiting[dependent].discard(name)
            if not waiting[dependent]:
                failed = next((outcomes[n] for n in needs[dependent] if isinstance(outcomes[n], Failure)), None)
                if failed is not None:
                    settle(dependent, failed)
                else:
                    ready.append(dependent)

    last_drain = [0.0]

    def drain(at_once: bool = False) -> None:
        """Forward the workers' log lines (every DRAIN_SECONDS: each look is a call to the queue)."""
        if not at_once and time.monotonic() - last_drain[0] < DRAIN_SECONDS:
            return
        last_drain[0] = time.monotonic()
        while True:
            try:
                batch = events.get_nowait_batch(max(1, events.qsize()))
            except Empty:
                return
            except ray.exceptions.RayError:  # the queue was killed: workers print instead
                last_drain[0] = float("inf")
                return
            for _, name, message in batch:
                log(f"[{name}] {message}")

    try:
        while ready or in_flight:
            for worker, name in assign(ready, idle, needs, ran_on):
                attempts[name] = attempts.get(name, 0) + 1
                in_flight[workers[worker].run.remote(by_name[name])] = (name, worker)
                progress.started(name)
            done, _ = ray.wait(list(in_flight), num_returns=1, timeout=POLL_SECONDS)
            drain()
            for ref in done:
                name, worker = in_flight.pop(ref)
                try:
                    outcome = ray.get(ref)
                except ray.exceptions.RayError as exc:  # the worker process died (killed, out of memory)
                    workers[worker] = actor_class.remote(shared_compute, events)
                    idle.append(worker)
                    if attempts[name] <= max_retries:
                        log(f"[{name}] its worker died ({type(exc).__name__}); running it again "
                            f"({attempts[name]} of {max_retries} retries)")
                        progress.running.pop(name, None)
                        ready.insert(0, name)
                        continue
                    outcome = Failure(name, f"a Ray worker died running this task {attempts[name]} times "
                                            f"({type(exc).__name__}): rerun to resume from the store", str(exc))
                idle.append(worker)
                ran_on[name] = worker
                settle(name, outcome)
        drain(at_once=True)
    finally:
        progress.close()
        for ref in in_flight:  # interrupted: leave nothing running on the cluster
            ray.cancel(ref, force=True)
        for worker in workers:
            ray.kill(worker)
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
        shape = worker_shape(tasks, lambda task: options[task.kind])
        progress = GridProgress(tasks, pool_size(cluster, shape, len(tasks)), recorded_seconds(config.store_dir))
        outcomes = execute(tasks, GridStage(config, type(runner)), lambda task: options[task.kind], config.max_retries,
                           runner.log, progress)
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
