"""Tables about how the results were computed rather than what they score: the per-stage timing
table (from each record's ``timings``) and SRD's RL diagnostics (``diagnostics.srd_rl``).

Both read only what ``results.csv`` carries (:mod:`.results`, :mod:`.merge`), so the page and the
README show them for a merged board too; numbers a record lacks are "not recorded".
"""

from __future__ import annotations

import statistics
from typing import Mapping, Sequence

from ..diagnostics import SRD_RL_PART
from ..results_schema import CLEAN_MODEL
from .facts import Facts
from .results import stage_seconds
from .table_model import MISSING, ColumnGroup, Table, fmt

#: The grid's stages in the order a cell runs them (grid/runner.py run_cell); others follow by name.
STAGE_ORDER: tuple[str, ...] = (
    "clean_model", "poison", "backdoor", "defend", "captions_triggered", "scores_triggered",
    "eval_triggered_wall", "captions_clean", "scores_clean", "eval_clean_wall",
)
NOT_RECORDED = "not recorded"


def _stage_rank(stage: str) -> tuple:
    return (STAGE_ORDER.index(stage), "") if stage in STAGE_ORDER else (len(STAGE_ORDER), stage)


def _seconds(value: float) -> str:
    return f"{value:.1f}" if value < 100 else f"{value:.0f}"


def timing_table(records: Sequence[Mapping]) -> Table:
    """Per stage: the cells that recorded it, its distinct builds and their total, median and
    longest wall seconds. A stage entry shared by several cells (one backdoored model under every
    defense) records the same build time in each, so equal times of one stage count once."""
    ok = [r for r in records if r.get("status") == "ok"]
    per_stage: dict[str, list[float]] = {}
    timed = 0
    for record in ok:
        seconds = stage_seconds(record)
        timed += bool(seconds)
        for stage, value in seconds.items():
            per_stage.setdefault(stage, []).append(value)
    table = Table(key="timings", title="Per-stage timing (wall seconds)", index=("Stage",),
                  groups=(ColumnGroup("", ("cells", "builds", "total s", "median s", "max s")),))
    for stage in sorted(per_stage, key=_stage_rank):
        builds = sorted(set(per_stage[stage]))
        table.rows.append(((stage,), (str(len(per_stage[stage])), str(len(builds)),
                                      _seconds(sum(builds)), _seconds(statistics.median(builds)),
                                      _seconds(builds[-1]))))
    table.has_data = bool(table.rows)
    table.footnotes = [
        "Seconds a stage took when it was built; a cell that found it in the store records that "
        "build's time, so equal times of one stage are counted once (builds). *_wall: the cell's "
        "own evaluation time, cache lookups included.",
        f"{timed} of {len(ok)} ok cells carry timings. Cells merged from a results.csv written "
        "before every stage's time was kept in it carry only the defend stage's.",
    ]
    return table


def srd_table(records: Sequence[Mapping], facts: Facts) -> Table:
    """SRD's RL diagnostics per defended model (dataset-independent: the first dataset's record
    of each attack x defense x preset x seed); columns: every number any record carries, by name."""
    seen: dict[tuple, Mapping] = {}
    for r in sorted((r for r in records if r.get("status") == "ok" and r["defense"] != CLEAN_MODEL),
                    key=lambda r: facts.rank("dataset", r["dataset"])):
        values = (r.get("diagnostics") or {}).get(SRD_RL_PART)
        key = (r["attack"], r["defense"], str(r.get("defense_preset")), r.get("seed"))
        if isinstance(values, Mapping) and values and key not in seen:
            seen[key] = values
    names = sorted({n for values in seen.values() for n in values})  # results.csv keeps no order
    table = Table(key="srd_diagnostics", title="SRD diagnostics (RL stage)",
                  index=("Attack", "Defense", "Seed"), groups=(ColumnGroup("", tuple(names)),))
    for (attack, defense, _preset, seed) in sorted(seen, key=lambda k: (
            facts.rank("attack", k[0]), facts.rank("defense", k[1]), k[2], str(k[3]))):
        values = seen[(attack, defense, _preset, seed)]
        table.rows.append(((facts.label("attack", attack), facts.label("defense", defense), str(seed)),
                           tuple(_number(values.get(n)) for n in names)))
    table.has_data = bool(table.rows)
    table.footnotes = ["From SRD's defense report (details.srd_rl), one row per defended model "
                       "(the model is shared by both test datasets). "
                       f"{MISSING}: not reported by that run."]
    return table


def _number(value: object) -> str:
    if not isinstance(value, (int, float)):
        return MISSING
    return str(int(value)) if float(value).is_integer() and abs(value) >= 10 else (
        fmt(float(value)) if abs(value) >= 1 else f"{value:.3g}")
