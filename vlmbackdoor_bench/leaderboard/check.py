"""The regression gate: stored results against a committed baseline (methods/design.md §7).

A baseline is JSON::

    {"schema": 1, "profile": "tiny",
     "tolerances": {"bleu4": 2.0, "cider": 5.0, "sc": 3.0, "lf": 5.0, "sfs": 3.0,
                    "asr_*": 5.0, "default": 3.0},
     "values": [{"dataset": "coco", "attack": "badnet", "defense": "none",
                 "split": "triggered", "metric": "cider", "value": 95.1}, ...]}

Tolerances are absolute, in points (the values are percentages). A tolerance key is a metric id,
or a prefix pattern ending in ``*``; the exact key wins, then the longest matching prefix, then
``default``. A value may also carry ``attack_preset``, ``defense_preset``, ``poison_rate`` and
``seed``: they narrow which cells it is compared with (:func:`make_baseline` adds them only where
the results hold several such cells for one value); otherwise the matching cells are averaged.

A regression is a value that moved beyond its tolerance, in either direction, or that is missing
or failed in the current results.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import VbbError
from .facts import Facts
from .results import finite_number, metric_values, row_sort_key

BASELINE_SCHEMA = 1
# Above the noise of rerunning the same code on another machine of the same kind (the full tiny
# BadNet x no-defense cells from an empty store: CIDEr moved up to 4.7, BLEU-4 1.5, LF 3.8 -- on
# the degenerate triggered captions --, SFS 1.9, SC 1.1, ASR 0.2 points).
DEFAULT_TOLERANCES: dict[str, float] = {
    "bleu4": 2.0, "cider": 5.0, "sc": 3.0, "lf": 5.0, "sfs": 3.0, "asr_*": 5.0, "default": 3.0,
}
FALLBACK_TOLERANCE = DEFAULT_TOLERANCES["default"]  # when a baseline has no "default" key
VALUE_KEYS: tuple[str, ...] = ("dataset", "attack", "defense", "split", "metric")
SELECTOR_KEYS: tuple[str, ...] = ("attack_preset", "defense_preset", "poison_rate", "seed")
_FIX = ("rewrite it from known-good results with vlmbackdoor_bench.leaderboard.write_baseline "
        "(the CLI's baseline writer), or correct the JSON by hand")


@dataclass(frozen=True)
class Regression:
    """One baseline value that the current results no longer reproduce."""

    dataset: str
    attack: str
    defense: str
    split: str
    metric: str
    baseline: float
    current: float | None  # None when missing or failed
    tolerance: float
    kind: str  # "moved", "missing" or "failed"
    detail: str = ""  # the failed cell's error message

    @property
    def message(self) -> str:
        """e.g. ``coco/badnet/none triggered cider: 95.1 -> 80.3 (tol 5.0)``."""
        where = f"{self.dataset}/{self.attack}/{self.defense} {self.split} {self.metric}"
        base, now = _pair(self.baseline, self.current)
        if self.kind == "moved":
            return f"{where}: {base} -> {now} (tol {self.tolerance:g})"
        if self.kind == "failed":
            reason = f": {_short(self.detail)}" if self.detail else ""
            return f"{where}: {base} -> failed (cell failed{reason})"
        return f"{where}: {base} -> missing (no result)"

    def __str__(self) -> str:
        return self.message


def _pair(base: float, now: float | None) -> tuple[str, str]:
    """Both numbers to one decimal, more if that would make them look equal."""
    a = f"{base:.1f}"
    if now is None:
        return a, "missing"
    b = f"{now:.1f}"
    if a == b:
        a, b = f"{base:.4g}", f"{now:.4g}"
    return a, b


def _short(text: str, limit: int = 160) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def tolerance_for(metric: str, tolerances: Mapping[str, float]) -> float:
    """Exact key, else the longest ``prefix*`` that matches, else ``default``."""
    if metric in tolerances:
        return float(tolerances[metric])
    prefixes = [k for k in tolerances if k.endswith("*") and metric.startswith(k[:-1])]
    if prefixes:
        return float(tolerances[max(prefixes, key=len)])
    return float(tolerances.get("default", FALLBACK_TOLERANCE))


# ----------------------------------------------------------------------------- validation
def validate_baseline(baseline: Any, source: str = "baseline") -> dict:
    """The baseline if well formed, else a VbbError naming ``source`` (the file) and the fix."""
    def bad(problem: str) -> VbbError:
        return VbbError(f"malformed baseline {source}: {problem}", _FIX)

    if not isinstance(baseline, dict):
        raise bad("the top level is not a JSON object")
    if baseline.get("schema") != BASELINE_SCHEMA:
        raise bad(f"schema is {baseline.get('schema')!r}, expected {BASELINE_SCHEMA}")
    if not isinstance(baseline.get("profile"), str):
        raise bad("'profile' is missing or not a string")
    tolerances = baseline.get("tolerances", {})
    if not isinstance(tolerances, dict) or not all(
            isinstance(k, str) and finite_number(v) is not None and float(v) >= 0 for k, v in tolerances.items()):
        raise bad("'tolerances' must map metric ids or 'prefix*' patterns to numbers >= 0")
    values = baseline.get("values")
    if not isinstance(values, list):
        raise bad("'values' is missing or not a list")
    for i, entry in enumerate(values):
        if not isinstance(entry, dict):
            raise bad(f"values[{i}] is not an object")
        for key in VALUE_KEYS:
            if not isinstance(entry.get(key), str) or not entry[key]:
                raise bad(f"values[{i}] has no string {key!r}")
        if finite_number(entry.get("value")) is None:
            raise bad(f"values[{i}] ({_where(entry)}) has no numeric 'value'")
    return baseline


def _where(entry: Mapping) -> str:
    return "/".join(str(entry.get(k)) for k in ("dataset", "attack", "defense")) + \
        f" {entry.get('split')} {entry.get('metric')}"


def load_baseline(path: Path) -> dict:
    """Read and validate a baseline file; any problem is a VbbError naming the file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise VbbError(f"baseline {path} does not exist", _FIX) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise VbbError(f"malformed baseline {path}: not readable JSON ({exc})", _FIX) from None
    return validate_baseline(data, str(path))


# ----------------------------------------------------------------------------- make / check
def _identity(record: Mapping) -> tuple:
    return tuple(record.get(k) for k in SELECTOR_KEYS)


def _profile_of(records: Sequence[Mapping]) -> str:
    profiles = sorted({str(r.get("profile")) for r in records if r.get("profile") is not None})
    if len(profiles) > 1:
        raise VbbError(f"the results mix profiles {profiles}",
                       "build a baseline from one profile's results at a time")
    return profiles[0] if profiles else ""


def make_baseline(records: Sequence[Mapping], tolerances: Mapping[str, float]) -> dict:
    """A baseline holding every number of every ok cell (failed cells hold none).

    Values are sorted like the long form; duplicate cells are averaged. Selectors (presets,
    poison rate, seed) are added to a value only when several cells share its
    dataset/attack/defense/split/metric.
    """
    ok = [r for r in records if r.get("status") == "ok"]
    if not ok:
        raise VbbError("no successful cell results to make a baseline from",
                       "run the grid first and check that its cells succeed")
    facts = Facts.of(ok)
    grouped: dict[tuple, list[float]] = {}
    for r in ok:
        for split, metric, value in metric_values(r, facts):
            key = (r["dataset"], r["attack"], r["defense"], split, metric)
            grouped.setdefault((key, _identity(r)), []).append(value)
    cells_per_value = Counter(key for key, _identity in grouped)
    entries: list[dict[str, Any]] = []
    for (key, identity), found in grouped.items():
        entry: dict[str, Any] = dict(zip(VALUE_KEYS, key))
        if cells_per_value[key] > 1:
            entry.update(zip(SELECTOR_KEYS, identity))
        entry["value"] = math.fsum(found) / len(found)
        entries.append(entry)
    entries.sort(key=lambda e: row_sort_key({**e, "cell_key": ""}, facts))
    return {"schema": BASELINE_SCHEMA, "profile": _profile_of(ok),
            "tolerances": {k: float(v) for k, v in tolerances.items()}, "values": entries}


def _matches(record: Mapping, entry: Mapping) -> bool:
    if any(record.get(k) != entry[k] for k in ("dataset", "attack", "defense")):
        return False
    for key in SELECTOR_KEYS:
        if key not in entry:
            continue
        want, have = entry[key], record.get(key)
        if key == "poison_rate" and finite_number(want) is not None and finite_number(have) is not None:
            if not math.isclose(float(want), float(have), rel_tol=0.0, abs_tol=1e-12):
                return False
        elif want != have:
            return False
    return True


def check(records: Sequence[Mapping], baseline: Mapping) -> list[Regression]:
    """Every baseline value the current results do not reproduce within tolerance.

    The current value is the mean over the matching ok cells (several seeds, say); a matching
    failed cell, or no matching number at all, is a regression too.
    """
    baseline = validate_baseline(dict(baseline))
    tolerances = baseline.get("tolerances", {})
    regressions: list[Regression] = []
    for entry in baseline["values"]:
        split, metric, base = entry["split"], entry["metric"], float(entry["value"])
        tol = tolerance_for(metric, tolerances)
        cells = [r for r in records if _matches(r, entry)]
        failed = [r for r in cells if r.get("status") != "ok"]
        found = [v for r in cells for s, m, v in metric_values(r) if (s, m) == (split, metric)]
        ids = {k: entry[k] for k in VALUE_KEYS}
        if failed:
            detail = str(failed[0].get("error") or "")
            regressions.append(Regression(**ids, baseline=base, current=None, tolerance=tol,
                                          kind="failed", detail=detail))
        elif not found:
            regressions.append(Regression(**ids, baseline=base, current=None, tolerance=tol,
                                          kind="missing"))
        else:
            current = math.fsum(found) / len(found)
            if abs(current - base) > tol + 1e-9:
                regressions.append(Regression(**ids, baseline=base, current=current,
                                              tolerance=tol, kind="moved"))
    return regressions
