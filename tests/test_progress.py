"""grid.progress: the grid's one line (cells ok / failed / running) and its ETA, on a fake clock."""

from __future__ import annotations

import io
import json
from types import SimpleNamespace

import pytest

from vlmbackdoor_bench.grid.cells import CLEAN_MODEL, Cell
from vlmbackdoor_bench.grid.dag import plan
from vlmbackdoor_bench.grid.progress import GridProgress, format_seconds, recorded_seconds

# BadNet x none on two datasets: base, clean model, 2 references, poison, backdoor, defend, 4 cells
CELLS = [Cell("tiny", d, "badnet", defense, 0.1, 0) for d in ("coco", "flickr30k") for defense in (CLEAN_MODEL, "none")]
RECORDED = {"base": 100.0, "clean_model": 40.0, "poison": 2.0, "backdoor": 30.0, "defend": 1.0,
            "captions": 5.0, "scores": 3.0}


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def _progress(workers=1, recorded=RECORDED):
    clock = Clock()
    tasks = plan(CELLS, lambda name: SimpleNamespace())
    return GridProgress(tasks, workers, recorded, clock=clock, file=io.StringIO()), clock


def test_before_anything_runs_the_eta_is_the_recorded_work_over_the_workers():
    progress, _ = _progress()
    # base + clean + 2 references (captions) + poison + backdoor + defend + 4 cells x (2 captions + 2 scores)
    work = 100 + 40 + 2 * 5 + 2 + 30 + 1 + 4 * 16
    assert progress.eta() == pytest.approx(work)
    two, _ = _progress(workers=2)
    assert two.eta() == pytest.approx(work / 2)
    assert progress.status() == f"ok=0 failed=0 running=0 ETA {format_seconds(work)}"


def test_measured_times_replace_the_recorded_ones_and_a_running_task_is_charged_what_is_left():
    progress, clock = _progress()
    progress.started("base")
    clock.now += 60  # base recorded at 100 s: 40 s left
    assert progress.eta() == pytest.approx(40 + 40 + 10 + 2 + 30 + 1 + 64)
    clock.now += 60  # past its expectation: nothing left, never negative
    assert progress.eta() == pytest.approx(40 + 10 + 2 + 30 + 1 + 64)
    progress.finished("base")
    progress.started("clean_model seed0")
    clock.now += 10
    progress.finished("clean_model seed0")  # measured 10 s, recorded 40 s: 10 s from now on
    assert progress.measured == {"base": [120.0], "clean_model": [10.0]}
    assert progress.eta() == pytest.approx(10 + 2 + 30 + 1 + 64)
    progress.started("poison badnet seed0")
    assert progress.status().startswith("ok=0 failed=0 running=1 ")


def test_cells_are_counted_ok_and_failed_and_the_bar_shows_them():
    progress, clock = _progress()
    for task in list(progress.tasks.values())[:-4]:
        progress.finished(task.name, seconds=1.0)
    cells = [c.cell_id for c in CELLS]
    progress.started(cells[0])
    clock.now += 8
    progress.finished(cells[0], ok=True)
    progress.finished(cells[1], ok=False, seconds=4.0)
    assert (progress.cells_ok, progress.cells_failed) == (1, 1)
    assert progress.eta() == pytest.approx(2 * 6.0)  # two cells left at the mean of 8 s and 4 s
    progress.close()
    drawn = progress.bar.fp.getvalue()
    assert "2/4" in drawn and "ok=1 failed=1 running=0" in drawn


def test_a_local_cell_ends_its_upstream_tasks_with_the_stage_times_it_built():
    progress, _ = _progress()
    backdoored = CELLS[1].cell_id  # coco badnet none: needs defend <- backdoor <- poison, reference
    timings = {"poison": {"seconds": 3.0, "cached": False}, "backdoor": {"seconds": 20.0, "cached": False},
               "defend": {"seconds": 1.0, "cached": True}, "captions_clean": {"seconds": 2.0, "cached": False},
               "cell_wall": 50.0}
    progress.started(backdoored)
    progress.cell_finished_locally(backdoored, True, timings)
    assert progress.done >= {"base", "clean_model seed0", "reference coco seed0", "poison badnet seed0",
                             "backdoor badnet seed0", "defend badnet none seed0", backdoored}
    assert progress.measured["poison"] == [3.0] and progress.measured["backdoor"] == [20.0]
    assert "defend" not in progress.measured  # it was cached: no measurement
    assert progress.measured["cell"] == [2.0]  # the cell's own evaluation: the captions it built
    assert progress.measured["base"] == [50.0 - 3.0 - 20.0 - 2.0]  # the rest of its wall time
    assert progress.cells_ok == 1
    # left: the flickr reference (5 s recorded) and three cells at the measured 2 s
    assert progress.eta() == pytest.approx(5 + 3 * 2.0)


def test_without_any_time_to_go_by_the_eta_is_unknown():
    progress, _ = _progress(recorded={})
    assert progress.eta() is None and progress.status().endswith("ETA ?")
    progress.finished("base", seconds=12.0)  # one kind known: the others count at its mean
    assert progress.eta() == pytest.approx(12.0 * (len(progress.tasks) - 1))


def test_recorded_seconds_are_the_mean_build_time_of_each_stage_in_the_store(tmp_path):
    for stage, key, seconds in (("backdoor", "a1", 10.0), ("backdoor", "b2", 20.0), ("scores", "c3", 1.5)):
        (tmp_path / stage / key).mkdir(parents=True)
        (tmp_path / stage / key / "meta.json").write_text(json.dumps({"seconds": seconds}))
    (tmp_path / "poison" / "broken").mkdir(parents=True)
    (tmp_path / "poison" / "broken" / "meta.json").write_text("{not json")
    assert recorded_seconds(tmp_path) == {"backdoor": 15.0, "scores": 1.5}


def test_format_seconds():
    assert [format_seconds(s) for s in (None, 0, 59.6, 61, 3600 + 125)] == ["?", "0m00s", "1m00s", "1m01s", "1h02m"]
