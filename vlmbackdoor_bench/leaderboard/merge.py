"""Cell records back from a leaderboard's ``results.csv``, to merge a published board with a store.

``vbb report --merge leaderboards/tiny/results.csv`` rebuilds the tables from the local store's
cells plus every cell of that file the store lacks: a user who runs only a new defense's column
(``vbb run --cells mydefense``) gets it beside the committed board instead of a board of that
column alone, and the committed board's tables can be re-rendered without its store. The long
form carries each number with its ``n``, scorer, versions and commit (:func:`.results.long_form`);
what it does not carry (per-image details, artifacts, whether a stage was cached) an imported
record lacks, and its provenance names the file it came from.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import pandas as pd

from ..errors import VbbError
from ..results_schema import SCHEMA_VERSION
from .results import (DEFENSE_SPLIT, DEFENSE_VALUES, DIAGNOSTIC_SPLITS, LONG_FORM_COLUMNS,
                      TIMING_SPLIT, provenance_imported_from, set_defense_value)

#: What makes two records the same cell: a store record replaces an imported one with this identity.
IDENTITY: tuple[str, ...] = ("dataset", "attack", "defense", "attack_preset", "defense_preset",
                             "poison_rate", "seed")


def _fix(path: Path) -> str:
    return (f"pass the results.csv that `vbb report` wrote (e.g. leaderboards/<profile>/"
            f"results.csv), or restore {path} from git")


def _number(text: str, what: str, path: Path, line: int) -> float | None:
    if text == "":
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise VbbError(f"{path} line {line}: {what} is {text!r}, not a finite number", _fix(path))
    return value


def _whole(text: str, what: str, path: Path, line: int) -> int | None:
    value = _number(text, what, path, line)
    if value is not None and value != int(value):
        raise VbbError(f"{path} line {line}: {what} is {text!r}, not a whole number", _fix(path))
    return None if value is None else int(value)


def read_long_form(path: Path, profile: str, source: str | None = None) -> list[dict]:
    """The cell records a ``results.csv`` of ``profile`` was written from (as far as it holds
    them), each with ``provenance.imported_from = source`` (default: the path as given)."""
    path = Path(path)
    if not path.is_file():
        raise VbbError(f"merge file {path} does not exist", _fix(path))
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise VbbError(f"merge file {path} is not a readable CSV: {exc}", _fix(path)) from None
    missing = [c for c in LONG_FORM_COLUMNS if c not in frame.columns]
    if missing:
        raise VbbError(f"merge file {path} is not a leaderboard results.csv: it lacks the "
                       f"column(s) {', '.join(missing)}", _fix(path))
    records: dict[tuple, dict] = {}
    for line, row in enumerate(frame.to_dict("records"), start=2):  # line 1 is the header
        if row["profile"] not in ("", profile):
            raise VbbError(f"{path} line {line}: a cell of profile {row['profile']!r}, not "
                           f"{profile!r}", f"merge the results.csv of profile {profile!r}")
        for column in ("dataset", "attack", "defense"):
            if not row[column]:
                raise VbbError(f"{path} line {line}: column {column!r} is empty", _fix(path))
        if row["status"] not in ("ok", "failed"):
            raise VbbError(f"{path} line {line}: status is {row['status']!r}, expected 'ok' or "
                           "'failed'", _fix(path))
        rate = _number(row["poison_rate"], "poison_rate", path, line)
        seed = _whole(row["seed"], "seed", path, line)
        key = (row["dataset"], row["attack"], row["defense"], row["attack_preset"],
               row["defense_preset"], rate, seed, row["cell_key"])
        record = records.get(key)
        if record is None:
            record = records[key] = _new_record(row, profile, rate, seed, source or str(path))
        elif record["status"] != row["status"]:
            raise VbbError(f"{path} line {line}: the cell {key[:3]} is both ok and failed",
                           _fix(path))
        if row["status"] == "ok":
            _add_number(record, row, path, line)
    return list(records.values())


def _new_record(row: Mapping[str, str], profile: str, rate: float | None, seed: int | None,
                source: str) -> dict:
    return {
        "schema": SCHEMA_VERSION, "profile": profile,
        "dataset": row["dataset"], "attack": row["attack"], "defense": row["defense"],
        "attack_preset": row["attack_preset"] or None, "defense_preset": row["defense_preset"] or None,
        "attack_version": row["attack_version"] or None,
        "defense_version": row["defense_version"] or None,
        "poison_rate": rate, "seed": seed, "status": row["status"],
        "error": (row["error"] or None) if row["status"] == "failed" else None,
        "metrics": {}, "metric_details": {},
        "provenance": {"cell_key": row["cell_key"] or None, "git_commit": row["git_commit"] or None,
                       **provenance_imported_from(source)},
    }


def _add_number(record: dict, row: Mapping[str, str], path: Path, line: int) -> None:
    split, metric = row["split"], row["metric"]
    value = _number(row["value"], "value", path, line)
    if not split or not metric or value is None:
        raise VbbError(f"{path} line {line}: an ok row needs split, metric and value", _fix(path))
    if split == DEFENSE_SPLIT:
        if metric not in DEFENSE_VALUES:
            raise VbbError(f"{path} line {line}: unknown {DEFENSE_SPLIT!r} number {metric!r}",
                           f"known: {', '.join(DEFENSE_VALUES)}")
        set_defense_value(record, metric, value)
        return
    if split == TIMING_SPLIT:
        record.setdefault("timings", {})[metric] = {"seconds": value}
        return
    if split in DIAGNOSTIC_SPLITS:
        record.setdefault("diagnostics", {}).setdefault(split, {})[metric] = value
        return
    record["metrics"].setdefault(split, {})[metric] = value
    detail: dict[str, Any] = {}
    n = _whole(row["n"], "n", path, line)
    if n is not None:
        detail["n"] = n
    if row["scorer"]:
        detail["scorer"] = row["scorer"]
    if detail:
        record["metric_details"].setdefault(split, {})[metric] = detail


def identity(record: Mapping) -> tuple:
    return tuple(record.get(k) for k in IDENTITY)


def merge_records(stored: Sequence[Mapping], imported: Iterable[Mapping]) -> list[Mapping]:
    """``stored`` plus each imported record whose cell (:data:`IDENTITY`) is neither stored nor
    imported earlier: the local store always wins, then the files in the order given."""
    seen = {identity(r) for r in stored}
    merged = list(stored)
    for record in imported:
        if identity(record) not in seen:
            seen.add(identity(record))
            merged.append(record)
    return merged
