"""`vbb run --jobs N`: the grid's cells in N worker processes that share one store (DESIGN.md §6).

Why processes: the tiny profile's tensors are small, so PyTorch's threads scale poorly (on 2 cores
a fine-tuning step is only ~1.5x faster with 2 threads than with 1), while independent cells,
another attack's backdoor or another defense, can run side by side. Each worker is a fresh
(spawned) process with its own GridRunner and cores // N threads. The store's per-entry lock
builds a stage that several cells need once while the others wait for it (grid.store), and cells
are handed out so that consecutive ones need different backdoored models.

A worker that dies (out of memory, a plugin that kills its process) fails only the cell it was
running; a new worker takes over the rest of the queue.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import queue
import sys
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


def _worker(config: BenchmarkConfig, cells: list[Cell], tasks, events, threads: int, job: int) -> None:
    import torch

    from ..allocator import keep_freed_memory
    from ..registry import load_registry
    from .runner import GridRunner

    torch.set_num_threads(threads)
    keep_freed_memory()

    def log(message: str) -> None:
        print(f"[job {job}] {message}", file=sys.stderr, flush=True)

    runner = GridRunner(config, load_registry(config.plugin_dirs), log=log)
    while (index := tasks.get()) is not None:
        events.put(("start", job, index, None))
        log(f"{cells[index].cell_id}: started")
        started = time.perf_counter()
        error = runner.run_and_save(cells[index])
        log(f"{cells[index].cell_id}: {'ok' if error is None else 'FAILED'} "
            f"in {time.perf_counter() - started:.0f} s")
        events.put(("done", job, index, error))


def run_in_workers(config: BenchmarkConfig, cells: list[Cell], jobs: int,
                   log: Callable[[str], None]) -> RunSummary:
    """Run ``cells`` in ``jobs`` worker processes; every cell gets a result file, as in a
    sequential run (a cell whose worker died is recorded failed with the reason)."""
    order = parallel_order(cells)
    jobs = max(1, min(jobs, len(order)))
    threads = max(1, available_cores() // jobs)
    context = multiprocessing.get_context("spawn")  # no fork of a process with live thread pools
    tasks, events = context.Queue(), context.Queue()
    for index in range(len(order)):
        tasks.put(index)
    for _ in range(jobs):
        tasks.put(None)  # one stop sign per worker; a worker that dies mid-cell leaves its own
    summary = RunSummary()
    workers: dict[int, multiprocessing.process.BaseProcess] = {}
    running: dict[int, tuple[int, float]] = {}  # job -> (cell index, wall time it started)
    finished: set[int] = set()
    bar = tqdm(total=len(order), desc="grid", unit="cell")

    def start(job: int) -> None:
        process = context.Process(target=_worker, name=f"vbb-job-{job}",
                                  args=(config, order, tasks, events, threads, job))
        # Interleaved progress bars of several processes are unreadable: workers log a line per cell.
        with _environment(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
                          TQDM_DISABLE="1", TOKENIZERS_PARALLELISM="false"):
            process.start()
        workers[job] = process

    def finish(index: int, error: str | None) -> None:
        finished.add(index)
        summary.record(order[index], error)
        bar.update(1)

    def handle(event: tuple) -> None:
        kind, job, index, error = event
        if kind == "start":
            running[job] = (index, time.time())
        else:
            running.pop(job, None)
            finish(index, error)

    def bury(job: int, exitcode: int) -> None:
        """A worker exited: its running cell (if any) failed, unless it wrote the result first."""
        del workers[job]
        if job not in running:
            return
        index, since = running.pop(job)
        path = result_path(config, order[index])
        if path.is_file() and path.stat().st_mtime >= since:  # died after writing its result
            result = json.loads(path.read_text())
            finish(index, None if result.get("status") == "ok" else result.get("error", "failed"))
        else:
            error = (f"the worker process running this cell died (exit code {exitcode}; -9 is "
                     "usually the out-of-memory killer): rerun the cell alone or with fewer --jobs")
            log(f"cell {order[index].cell_id} FAILED: {error}")
            write_json_atomic(path, failed_result(order[index], error))
            finish(index, error)
        if len(finished) < len(order):
            start(job)  # the rest of the queue still needs this worker

    log(f"grid: {len(order)} cells in {jobs} worker processes with {threads} thread(s) each")
    try:
        for job in range(jobs):
            start(job)
        while workers and len(finished) < len(order):
            with contextlib.suppress(queue.Empty):
                handle(events.get(timeout=POLL_SECONDS))
            for job, process in list(workers.items()):
                if process.exitcode is None:
                    continue
                with contextlib.suppress(queue.Empty):  # read what it sent before it exited
                    while True:
                        handle(events.get_nowait())
                bury(job, process.exitcode)
    except BaseException:
        for process in workers.values():
            process.terminate()
        raise
    finally:
        bar.close()
    for process in workers.values():
        process.join()
    for index in sorted(set(range(len(order))) - finished):
        error = "not run: every worker process exited before it (see the messages above)"
        write_json_atomic(result_path(config, order[index]), failed_result(order[index], error))
        finish(index, error)
    return summary
