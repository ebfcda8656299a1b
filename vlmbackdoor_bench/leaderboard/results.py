"""Reading stored cell results and flattening them to one row per number (methods/design.md §7).

A cell result is one JSON file ``<results_dir>/<profile>/<cell_id>.json`` following the schema in
``docs/CONTRACTS.md``. This module knows nothing about table layouts: it loads the records, checks
their shape, and turns them into a *long form* DataFrame (one row per dataset x attack x defense x
split x metric, plus provenance), which every table, the ``results.csv`` export and the regression
gate are built from.

Orders and labels come from the plugins' facts (:mod:`.facts`), so that every output sorts the
same way and a new plugin needs no edit here.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import pandas as pd

from ..diagnostics import PARTS
from ..errors import VbbError
from ..results_schema import CellResult
from .facts import Facts, registry_facts

PAPER_PROFILE = "openflamingo-3b"  # the profile whose numbers are compared with the paper's
SPLIT_ORDER: tuple[str, ...] = ("triggered", "clean")

#: The long form's split for numbers about the defend stage rather than a test split: what the
#: defense report shows, so that a ``results.csv`` alone rebuilds every table (``vbb report --merge``).
DEFENSE_SPLIT = "defense"
#: Its metrics and where each lives in a cell record (docs/CONTRACTS.md).
DEFENSE_VALUES: dict[str, tuple[str, ...]] = {
    "precision": ("detection", "precision"),
    "recall": ("detection", "recall"),
    "n_flagged": ("detection", "n_flagged"),
    "n_poisoned": ("detection", "n_poisoned"),
    "suspected_precision": ("detection", "candidates", "precision"),
    "suspected_recall": ("detection", "candidates", "recall"),
    "trigger_masked": ("detection", "trigger_coverage", "mean_coverage"),
    "seconds": ("timings", "defend"),  # the defend stage's wall time when it was computed
}

#: The long form's split for the other stages' wall seconds (``timings``; the defend stage's are
#: :data:`DEFENSE_VALUES` ``seconds``), one metric per stage name.
TIMING_SPLIT = "timing"
#: The long form's splits for the record's ``diagnostics`` (one split per part, one metric per name).
DIAGNOSTIC_SPLITS: tuple[str, ...] = PARTS

#: Columns of :func:`long_form`, in order. The first six identify a number; the rest are provenance.
LONG_FORM_COLUMNS: tuple[str, ...] = (
    "dataset", "attack", "defense", "split", "metric", "value",
    "profile", "attack_preset", "defense_preset", "poison_rate", "seed", "n", "status",
    "cell_key", "git_commit", "attack_version", "defense_version", "scorer", "error",
)


class ResultFileWarning(UserWarning):
    """A result file was skipped because it could not be read or does not follow the schema."""


def split_rank(split: str) -> tuple[int, str]:
    text = "" if split is None else str(split)
    return (SPLIT_ORDER.index(text), "") if text in SPLIT_ORDER else (len(SPLIT_ORDER), text)


# ----------------------------------------------------------------------------- loading
def _problem_with(record: Any, profile: str) -> str | None:
    """Why a parsed JSON value is not a usable cell record (None when it is)."""
    try:
        result = CellResult.from_dict(record)
    except ValueError as exc:
        return str(exc)
    if result.profile not in (None, profile):
        return f"it belongs to profile {result.profile!r}, not {profile!r}"
    return None


#: (dataset, attack, defense, poison rate, seed): what identifies a cell within one profile
CellCoordinates = tuple[str, str, str, float, int]


def cell_coordinates(record: Mapping) -> tuple:
    """A stored result's cell (loaded records have the three names; a rate or seed that is not a
    number is kept as None, so that record matches no declared cell)."""
    rate, seed = finite_number(record.get("poison_rate")), _int_or_none(record.get("seed"))
    return (record["dataset"], record["attack"], record["defense"], rate, seed)


def missing_cells(records: Sequence[Mapping], declared: Iterable[CellCoordinates]) -> list[CellCoordinates]:
    """The declared cells (deduplicated, in the order given) that no record belongs to."""
    stored = {cell_coordinates(r) for r in records}
    return [c for c in dict.fromkeys(declared) if c not in stored]


def result_files(results_dir: Path, profile: str) -> list[Path]:
    """The cell result files of one profile, sorted by name."""
    return sorted(Path(results_dir, profile).glob("*.json"))


def load_results(results_dir: Path, profile: str) -> list[dict]:
    """Every readable cell record under ``<results_dir>/<profile>/*.json``, sorted by file name.

    A file that is not valid JSON or does not follow the schema is skipped with a
    :class:`ResultFileWarning` naming it; it never stops the report. A missing profile directory
    is a :class:`VbbError`.
    """
    folder = Path(results_dir, profile)
    if not folder.is_dir():
        raise VbbError(
            f"no results for profile {profile!r}: {folder} does not exist",
            f"run the grid for profile {profile!r} first, or point at the results directory "
            "that holds it",
        )
    records: list[dict] = []
    for path in result_files(results_dir, profile):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            warnings.warn(f"skipping unreadable result file {path}: {exc}", ResultFileWarning,
                          stacklevel=2)
            continue
        problem = _problem_with(record, profile)
        if problem:
            warnings.warn(f"skipping result file {path}: {problem}", ResultFileWarning,
                          stacklevel=2)
            continue
        records.append(CellResult.from_dict(record).to_dict())
    check_one_budget(records, folder)
    return records


def budget_difference(a: Mapping, b: Mapping) -> str:
    """``name: value_a vs value_b`` for each parameter in which two cell budgets differ (a
    result's ``budget``: ``{"key", "params"}``, grid.runner.budget_of)."""
    pa, pb = a.get("params") or {}, b.get("params") or {}
    return ", ".join(f"{k}: {pa.get(k, '(unset)')} vs {pb.get(k, '(unset)')}"
                     for k in sorted(set(pa) | set(pb)) if pa.get(k) != pb.get(k)) or "same parameters"


def check_one_budget(records: Sequence[Mapping], folder: Path) -> None:
    """Refuse results computed under different budgets (world sizes, recipe, profile
    parameters): their numbers are not comparable. Results without a budget (written before it was
    recorded, or merged from a results.csv) go with any."""
    budgets: dict[str, Mapping] = {}
    counts: dict[str, int] = {}
    for record in records:
        budget = record.get("budget")
        if isinstance(budget, Mapping) and isinstance(budget.get("key"), str):
            budgets.setdefault(budget["key"], budget)
            counts[budget["key"]] = counts.get(budget["key"], 0) + 1
    if len(budgets) > 1:
        (first, a), *others = sorted(budgets.items(), key=lambda kv: -counts[kv[0]])
        described = "; ".join(f"{key} ({counts[key]} cells) differs from {first} ({counts[first]} "
                              f"cells) in {budget_difference(a, b)}" for key, b in others)
        raise VbbError(
            f"the results in {folder} were computed with {len(budgets)} different budgets: {described}",
            "rerun the odd cells with the grid's settings (they overwrite their result files), or "
            "give each budget its own cache_dir in the config")


def newest_result_mtime(results_dir: Path, profile: str) -> float | None:
    """Modification time of the newest result file (the reports' date, so rebuilds are stable)."""
    times = [p.stat().st_mtime for p in result_files(results_dir, profile)]
    return max(times) if times else None


# ----------------------------------------------------------------------------- long form
def finite_number(value: Any) -> float | None:
    """A finite float, or None for anything else (missing, null, NaN, text)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def same_rate(a: float | None, b: float | None) -> bool:
    """Whether two poison rates are the same one (None only equals None)."""
    if a is None or b is None:
        return a is b
    return math.isclose(a, b, rel_tol=0.0, abs_tol=1e-12)


def metric_values(record: Mapping, facts: Facts | None = None) -> Iterator[tuple[str, str, float]]:
    """(split, metric, value) for every finite number of an ok record, in split/metric order
    (``facts`` None: the installed plugins'); anything malformed (a split that is not an object,
    a value that is not a number) is skipped."""
    facts = registry_facts() if facts is None else facts
    if record.get("status") != "ok":
        return
    metrics = record.get("metrics")
    if not isinstance(metrics, Mapping):
        return
    for split, values in sorted(metrics.items(), key=lambda kv: split_rank(kv[0])):
        if not isinstance(values, Mapping):
            continue
        for metric, raw in sorted(values.items(), key=lambda kv: facts.rank("metric", kv[0])):
            value = finite_number(raw)
            if value is not None:
                yield str(split), str(metric), value


def defense_values(record: Mapping) -> dict[str, float]:
    """The finite :data:`DEFENSE_VALUES` of an ok record."""
    if record.get("status") != "ok":
        return {}
    found: dict[str, float] = {}
    for name, path in DEFENSE_VALUES.items():
        node: Any = record
        for key in path:
            node = node.get(key) if isinstance(node, Mapping) else None
        if isinstance(node, Mapping):  # a timing entry {"seconds", "cached"}
            node = node.get("seconds")
        value = finite_number(node)
        if value is not None:
            found[name] = value
    return found


def stage_seconds(record: Mapping) -> dict[str, float]:
    """Each recorded stage's wall seconds (a timing entry ``{"seconds", "cached"}`` or a plain
    number), ``defend`` included, in the record's order."""
    timings = record.get("timings")
    found: dict[str, float] = {}
    for stage, entry in (timings.items() if isinstance(timings, Mapping) else ()):
        value = finite_number(entry.get("seconds") if isinstance(entry, Mapping) else entry)
        if value is not None:
            found[str(stage)] = value
    return found


def diagnostic_values(record: Mapping) -> Iterator[tuple[str, str, float]]:
    """(part, name, value) for every finite number of an ok record's ``diagnostics``."""
    diagnostics = record.get("diagnostics") if record.get("status") == "ok" else None
    if not isinstance(diagnostics, Mapping):
        return
    for part in DIAGNOSTIC_SPLITS:
        values = diagnostics.get(part)
        for name, raw in sorted(values.items()) if isinstance(values, Mapping) else ():
            value = finite_number(raw)
            if value is not None:
                yield part, str(name), value


def set_defense_value(record: dict, name: str, value: float) -> None:
    """Put one :data:`DEFENSE_VALUES` number where :func:`defense_values` reads it (what a
    ``results.csv`` row restores); a timing entry becomes ``{"seconds": value}``."""
    *parents, leaf = DEFENSE_VALUES[name]
    node = record
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = {"seconds": value} if parents == ["timings"] else value


def provenance_imported_from(source: str) -> dict:
    """The provenance entry that marks a record as merged from ``source`` (read by
    :func:`imported_from`)."""
    return {"imported_from": source}


def imported_from(record: Mapping) -> str | None:
    """The results.csv a merged record came from (``vbb report --merge``); None for a stored one."""
    source = (record.get("provenance") or {}).get("imported_from")
    return str(source) if source else None


def _int_or_none(value: Any) -> int | None:
    number = finite_number(value)
    return int(number) if number is not None and number == int(number) else None


def _details(record: Mapping, split: str) -> Mapping:
    details = (record.get("metric_details") or {}).get(split) or {}
    return details if isinstance(details, Mapping) else {}


def metric_n(record: Mapping, split: str, metric: str) -> int | None:
    """Images a number was computed on: the metric's own ``n`` (ASR rules with exclusions), else
    the split's ``n_images``."""
    details = _details(record, split)
    own = details.get(metric)
    if isinstance(own, Mapping) and _int_or_none(own.get("n")) is not None:
        return _int_or_none(own.get("n"))
    return _int_or_none(details.get("n_images"))


def metric_scorer(record: Mapping, split: str, metric: str) -> str | None:
    """The scorer identity recorded for a number (SC and LF share SFS's scorer)."""
    details = _details(record, split)
    for key in (metric, "sfs") if metric in ("sc", "lf", "sfs") else (metric,):
        own = details.get(key)
        if isinstance(own, Mapping) and isinstance(own.get("scorer"), str):
            return own["scorer"]
    return None


def _provenance(record: Mapping) -> Mapping:
    prov = record.get("provenance") or {}
    return prov if isinstance(prov, Mapping) else {}


def _base_row(record: Mapping) -> dict[str, Any]:
    prov = _provenance(record)
    return {
        "profile": record.get("profile"),
        "attack_preset": record.get("attack_preset"),
        "defense_preset": record.get("defense_preset"),
        "poison_rate": finite_number(record.get("poison_rate")),
        "seed": _int_or_none(record.get("seed")),
        "status": record.get("status"),
        "cell_key": prov.get("cell_key"),
        "git_commit": prov.get("git_commit"),
        "attack_version": record.get("attack_version"),
        "defense_version": record.get("defense_version"),
        "error": record.get("error") if record.get("status") == "failed" else None,
    }


def row_sort_key(row: Mapping[str, Any], facts: Facts | None = None) -> tuple:
    facts = registry_facts() if facts is None else facts

    def text(key: str) -> str:
        return "" if row.get(key) is None else str(row[key])

    rate = row.get("poison_rate")
    seed = row.get("seed")
    return (
        facts.rank("dataset", row["dataset"]), facts.rank("attack", row["attack"]),
        facts.rank("defense", row["defense"]),
        text("attack_preset"), text("defense_preset"),
        (rate is None, rate if rate is not None else 0.0),
        (seed is None, seed if seed is not None else 0),
        split_rank(text("split")), facts.rank("metric", text("metric")), text("cell_key"),
    )


def long_form(records: Iterable[Mapping]) -> pd.DataFrame:
    """One row per stored number, columns :data:`LONG_FORM_COLUMNS`, sorted deterministically:
    the test splits' metrics, then the defend stage's numbers (split :data:`DEFENSE_SPLIT`), the
    other stages' seconds (:data:`TIMING_SPLIT`) and the diagnostics (:data:`DIAGNOSTIC_SPLITS`).

    A failed cell contributes a single row with status ``"failed"``, empty split/metric/value and
    its error message, so it is still listed; a value that is not a finite number is left out.
    """
    records = list(records)
    facts = Facts.of(records)
    rows: list[dict[str, Any]] = []
    for record in records:
        base = {"dataset": record["dataset"], "attack": record["attack"],
                "defense": record["defense"], **_base_row(record)}
        if record.get("status") != "ok":
            rows.append({**base, "split": None, "metric": None, "value": None, "n": None,
                         "scorer": None})
            continue
        for split, metric, value in metric_values(record, facts):
            rows.append({**base, "split": split, "metric": metric, "value": value,
                         "n": metric_n(record, split, metric),
                         "scorer": metric_scorer(record, split, metric)})
        extra = [(DEFENSE_SPLIT, metric, value) for metric, value in defense_values(record).items()]
        extra += [(TIMING_SPLIT, stage, value) for stage, value in stage_seconds(record).items()
                  if stage != "defend"]  # the defend stage's: DEFENSE_VALUES "seconds"
        extra += list(diagnostic_values(record))
        rows += [{**base, "split": split, "metric": metric, "value": value, "n": None, "scorer": None}
                 for split, metric, value in extra]
    rows.sort(key=lambda row: row_sort_key(row, facts))
    frame = pd.DataFrame(rows, columns=list(LONG_FORM_COLUMNS))
    frame["value"] = frame["value"].astype("float64")
    frame["poison_rate"] = frame["poison_rate"].astype("float64")
    frame["seed"] = frame["seed"].astype("Int64")
    frame["n"] = frame["n"].astype("Int64")
    return frame.reset_index(drop=True)


def failed_cells(records: Iterable[Mapping], facts: Facts) -> list[dict[str, Any]]:
    """The failed cells, sorted like the tables, with their identity and error message."""
    rows = [{"dataset": r["dataset"], "attack": r["attack"], "defense": r["defense"],
             **_base_row(r)} for r in records if r.get("status") != "ok"]
    return sorted(rows, key=lambda row: row_sort_key(row, facts))
