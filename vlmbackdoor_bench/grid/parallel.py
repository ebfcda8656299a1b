"""`vbb run --jobs N`: the grid's cells in N worker processes that share one store (DESIGN.md §6).

Why processes: a tiny-profile step is small (64 captions x ~34 tokens x 128 dimensions), so more
PyTorch threads stop paying well before a many-core machine is busy, while independent cells,
another attack's backdoor or another defense, can run side by side (on 2 cores there is nothing to
gain: README "Running cells in parallel"). Each worker is a fresh (spawned) process with its own
GridRunner and cores // N threads. The store's per-entry lock builds a stage that several cells
need once while the others wait for it (grid.store), and cells are handed out so that consecutive
ones need different backdoored models.

Each worker talks to the parent over its own pipe, and the parent hands out one cell at a time:
nothing is shared between workers but the store, so a worker that dies (the out-of-memory
killer, a plugin that kills its process) fails only the cell it was running, and a new worker
takes over the rest.
"""

from __future__ import annotations

import collections
import contextlib
import json
import multiprocessing
import multiprocessing.connection
import os
import time
from typing import Callable, Iterator

from tqdm.auto import tqdm

from ..config import BenchmarkConfig
from .cells import CLEAN_MODEL, Cell
from .runner import RunSummary, failed_result, result_path
from .store import write_json_atomic

POLL_SECONDS = 1.0


def parallel_order(cells: list[Cell]) -> list[Cell]:
    """Seed, defense (clean-model rows last), dataset, then attack: N workers start N different
    attacks' backdoors instead of waiting for one, and the second dataset's cells find them built."""
    defenses = list(dict.fromkeys(c.defense for c in cells if c.defense != CLEAN_MODEL)) + [CLEAN_MODEL]
    datasets = list(dict.fromkeys(c.dataset for c in cells))
    attacks = list(dict.fromkeys(c.attack for c in cells))
    return sorted(cells, key=lambda c: (c.seed, defenses.index(c.defense), datasets.index(c.dataset),
                                        attacks.index(c.attack)))


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@contextlib.contextmanager
def _environment(**values: str) -> Iterator[None]:
    """Set variables for the processes started inside (spawn copies the environment at start)."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _worker(config: BenchmarkConfig, cells: list[Cell], connection, threads: int) -> None:
    """Run the cells the parent sends (indices into ``cells``) until it sends None."""
    import torch

    from ..allocator import keep_freed_memory
    from ..registry import load_registry
    from .runner import GridRunner

    torch.set_num_threads(threads)
    keep_freed_memory()

    def log(message: str) -> None:  # the parent prints it, so lines never cut into its progress bar
        connection.send(("log", message))

    runner = GridRunner(config, load_registry(config.plugin_dirs), log=log)
    connection.send(("ready", None))
    while (index := connection.recv()) is not None:
        started = time.perf_counter()
        error = runner.run_and_save(cells[index])
        connection.send(("done", (index, error, time.perf_counter() - started)))


def run_in_workers(config: BenchmarkConfig, cells: list[Cell], jobs: int,
                   log: Callable[[str], None]) -> RunSummary:
    """Run ``cells`` in ``jobs`` worker processes; every cell gets a result file, as in a
    sequential run (a cell whose worker died is recorded failed with the reason)."""
    order = parallel_order(cells)
    jobs = max(1, min(jobs, len(order)))
    threads = max(1, available_cores() // jobs)
    context = multiprocessing.get_context("spawn")  # no fork of a process with live thread pools
    pending = collections.deque(range(len(order)))
    summary = RunSummary()
    workers: dict[int, tuple[multiprocessing.process.BaseProcess, multiprocessing.connection.Connection]] = {}
    started_up: set[int] = set()  # jobs whose current worker got as far as its first cell
    running: dict[int, tuple[int, float]] = {}  # job -> (cell index, wall time it was handed out)

    def start(job: int) -> None:
        ours, theirs = context.Pipe()
        process = context.Process(target=_worker, name=f"vbb-job-{job}",
                                  args=(config, order, theirs, threads))
        # Several processes' progress bars would overwrite each other: workers send log lines instead.
        with _environment(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
                          TQDM_DISABLE="1", TOKENIZERS_PARALLELISM="false"):
            process.start()
        theirs.close()  # only the worker holds that end now: our recv ends in EOFError once it exits
        workers[job] = (process, ours)
        started_up.discard(job)

    def finish(index: int, error: str | None) -> None:
        summary.record(order[index], error)
        bar.update(1)

    def assign(job: int) -> None:
        index = pending.popleft() if pending else None
        try:
            workers[job][1].send(index)
        except OSError:  # it died meanwhile: the cell goes back to the queue
            if index is not None:
                pending.appendleft(index)
            return
        if index is not None:
            running[job] = (index, time.time())
            log(f"[job {job}] {order[index].cell_id}: started")

    def receive(job: int) -> bool:
        """Handle one message from ``job``'s worker; False once its end of the pipe has closed."""
        try:
            kind, payload = workers[job][1].recv()
        except (EOFError, OSError):
            return False
        if kind == "log":
            log(f"[job {job}] {payload}")
        elif kind == "ready":
            started_up.add(job)
            assign(job)
        else:
            index, error, seconds = payload
            running.pop(job, None)
            log(f"[job {job}] {order[index].cell_id}: {'ok' if error is None else 'FAILED'} in {seconds:.0f} s")
            finish(index, error)
            assign(job)
        return True

    def bury(job: int) -> None:
        """``job``'s worker exited: its running cell failed, unless it wrote the result first;
        a worker that had started up is replaced while cells are left."""
        process, connection = workers.pop(job)
        process.join()
        connection.close()
        if job in running:
            index, since = running.pop(job)
            path = result_path(config, order[index])
            if path.is_file() and path.stat().st_mtime >= since:  # died after writing its result
                result = json.loads(path.read_text())
                finish(index, None if result.get("status") == "ok" else result.get("error", "failed"))
            else:
                error = (f"the worker process running this cell died (exit code {process.exitcode}; -9 is "
                         "usually the out-of-memory killer): rerun the cell alone or with fewer --jobs")
                log(f"cell {order[index].cell_id} FAILED: {error}")
                write_json_atomic(path, failed_result(order[index], error))
                finish(index, error)
        if pending and job in started_up:  # one that never started up would fail again
            start(job)

    log(f"grid: {len(order)} cells in {jobs} worker processes with {threads} thread(s) each")
    bar = tqdm(total=len(order), desc="grid", unit="cell")
    try:
        for job in range(jobs):
            start(job)
        while workers:
            by_handle = {}
            for job, (process, connection) in workers.items():
                by_handle[connection] = by_handle[process.sentinel] = job
            for handle in multiprocessing.connection.wait(list(by_handle), timeout=POLL_SECONDS):
                job = by_handle[handle]
                process, connection = workers.get(job, (None, None))
                if process is None or handle not in (connection, process.sentinel):
                    continue  # that worker was already buried (and maybe replaced) in this round
                if handle is connection and receive(job):
                    continue
                while connection.poll() and receive(job):  # what it sent before it exited
                    pass
                bury(job)
        while pending:  # a cell handed out is finished by its worker or by bury; these never were
            index = pending.popleft()
            error = "not run: every worker process exited before it (see the messages above)"
            write_json_atomic(result_path(config, order[index]), failed_result(order[index], error))
            finish(index, error)
    except BaseException:
        for process, _ in workers.values():
            process.terminate()
        raise
    finally:
        bar.close()
    return summary
