"""The driver's one line for the grid: cells done / failed / running and an ETA (issue 27, 31).

The ETA is the work left over the workers: every stage task of the plan (grid.dag) that has not
finished is expected to take as long as the tasks of its kind measured so far in this run, or,
before one has finished, as long as that kind's entries took when they were built
(``meta.json`` seconds in the store, :func:`recorded_seconds`); a running task is charged what is
left of its expectation. A kind with neither counts at the mean of the kinds that have one; with
none at all the ETA is unknown. Both executors feed it: Ray with the wall time of every task, the
local loop with each cell's result timings (the stages the cell built, and the rest of its wall
time as its own evaluation).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from statistics import fmean
from typing import Callable, Iterable

from tqdm.auto import tqdm

from .dag import StageTask

# The store stage whose recorded build times stand for a task kind before one has run; a cell
# evaluates a clean and a triggered input set, each a captions and a scores entry.
RECORDED_AS = {"base": ("base",), "clean_model": ("clean_model",), "reference": ("captions",),
               "poison": ("poison",), "backdoor": ("backdoor",), "defend": ("defend",),
               "cell": ("captions", "scores", "captions", "scores")}
# The cell result timings (runner.run_cell) that are upstream tasks' build times.
TIMED_STAGES = ("clean_model", "poison", "backdoor", "defend")
EVALUATION_STAGES = ("captions_", "scores_")  # a cell's own work: captions_clean, scores_triggered, ...


def recorded_seconds(store_root: Path) -> dict[str, float]:
    """Mean build seconds of each stage's entries in the store (stage -> seconds)."""
    means: dict[str, float] = {}
    for stage in {s for stages in RECORDED_AS.values() for s in stages}:
        seconds = []
        for meta in (Path(store_root) / stage).glob("*/meta.json"):
            try:
                seconds.append(float(json.loads(meta.read_text())["seconds"]))
            except (OSError, ValueError, KeyError, TypeError):
                continue  # an unreadable record only weakens the estimate
        if seconds:
            means[stage] = fmean(seconds)
    return means


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class GridProgress:
    """Progress of one run of ``tasks`` on ``workers`` parallel workers.

    ``recorded``: store stage -> mean recorded build seconds (:func:`recorded_seconds`).
    ``clock``: seconds, monotonic (a fake one in tests). ``file``: where the bar is drawn
    (default stderr, as tqdm does)."""

    def __init__(self, tasks: Iterable[StageTask], workers: int, recorded: dict[str, float] | None = None,
                 clock: Callable[[], float] = time.monotonic, file=None):
        self.tasks = {task.name: task for task in tasks}
        self.workers = max(1, workers)
        self.recorded = dict(recorded or {})
        self.clock = clock
        self.measured: dict[str, list[float]] = {}  # kind -> seconds of its tasks that ended
        self._sums: dict[str, float] = {}  # kind -> sum of measured, so an estimate is O(1)
        self.running: dict[str, float] = {}  # task name -> when it started
        self.done: set[str] = set()
        self._left: dict[str, int] = {}  # kind -> tasks not done
        for task in self.tasks.values():
            self._left[task.kind] = self._left.get(task.kind, 0) + 1
        self.cells_ok = self.cells_failed = 0
        n_cells = sum(task.kind == "cell" for task in self.tasks.values())
        self.bar = tqdm(total=n_cells, desc="grid", unit="cell", file=file, dynamic_ncols=True)
        self._refresh()

    # ------------------------------------------------------------------ events
    def started(self, name: str) -> None:
        self.running.setdefault(name, self.clock())
        self._refresh()

    def finished(self, name: str, ok: bool = True, seconds: float | None = None) -> None:
        """Task ``name`` ended (``ok``: a cell's success). Its wall time (``seconds``, else the
        time since ``started``) becomes a measurement of its kind."""
        started = self.running.pop(name, None)
        if seconds is None and started is not None:
            seconds = self.clock() - started
        self._end(name, ok, seconds)
        self._refresh()

    def cell_finished_locally(self, name: str, ok: bool, timings: dict) -> None:
        """A cell of the local loop ended: the upstream tasks it needed are done too. Its result
        timings measure the stages it built, and its own evaluation (the captions and scores it
        built); what is left of its wall time is the base victim's build, when it built that."""
        started = self.running.pop(name, None)
        built = {stage: t["seconds"] for stage, t in timings.items()
                 if isinstance(t, dict) and not t.get("cached", True) and "seconds" in t}
        own = sum(seconds for stage, seconds in built.items() if stage.startswith(EVALUATION_STAGES))
        wall = timings.get("cell_wall")
        if wall is None and started is not None:
            wall = self.clock() - started
        measured = {kind: built[kind] for kind in TIMED_STAGES if kind in built}
        measured["base"] = None if wall is None else max(0.0, wall - sum(built.values()))
        for upstream in self._ancestors(name):
            if upstream not in self.done:
                self._end(upstream, True, measured.get(self.tasks[upstream].kind))
        self._end(name, ok, own)
        self._refresh()

    def close(self) -> None:
        self._refresh()
        self.bar.close()

    # ------------------------------------------------------------------ estimate
    def expected(self, kind: str) -> float | None:
        """Seconds a task of ``kind`` is expected to take (None: nothing to go by)."""
        if self.measured.get(kind):
            return self._sums[kind] / len(self.measured[kind])
        stages = RECORDED_AS[kind]
        if all(stage in self.recorded for stage in stages):
            return sum(self.recorded[stage] for stage in stages)
        return None

    def eta(self) -> float | None:
        """Seconds until every task has finished, or None when no kind has an estimate yet."""
        if not any(self._left.values()):
            return 0.0
        known = {kind: self.expected(kind) for kind in RECORDED_AS}
        fallback = [v for v in known.values() if v is not None]
        if not fallback:
            return None
        expected = {kind: fmean(fallback) if v is None else v for kind, v in known.items()}
        now = self.clock()
        work = sum(n * expected[kind] for kind, n in self._left.items())
        for name, started in self.running.items():  # charged only what is left of them
            work -= min(expected[self.tasks[name].kind], now - started)
        return work / self.workers

    def status(self) -> str:
        return (f"ok={self.cells_ok} failed={self.cells_failed} running={len(self.running)} "
                f"ETA {format_seconds(self.eta())}")

    # ------------------------------------------------------------------ internals
    def _end(self, name: str, ok: bool, seconds: float | None) -> None:
        if name in self.done:
            return
        self.done.add(name)
        kind = self.tasks[name].kind
        self._left[kind] -= 1
        if seconds is not None:
            self.measured.setdefault(kind, []).append(seconds)
            self._sums[kind] = self._sums.get(kind, 0.0) + seconds
        if kind == "cell":
            if ok:
                self.cells_ok += 1
            else:
                self.cells_failed += 1
            self.bar.update(1)

    def _ancestors(self, name: str) -> list[str]:
        """Every task ``name`` needs, directly or not, upstream first."""
        seen: dict[str, None] = {}

        def visit(task: str) -> None:
            for need in self.tasks[task].needs:
                if need not in seen:
                    visit(need)
                    seen[need] = None

        visit(name)
        return list(seen)

    def _refresh(self) -> None:
        self.bar.set_postfix_str(self.status(), refresh=True)
