"""Attacks that were never implanted (methods/design.md §7.1).

An attack x dataset whose no-defense cell has a headline ASR (the attack's own rule,
:meth:`.facts.Facts.headline_metric`) below :data:`IMPLANT_THRESHOLD` on triggered inputs left no
backdoor to remove: a defense's low ASR there says nothing about the defense. Every table marks
such rows with :data:`MARK` and :data:`LEGEND` instead of ranking them; a CSV table carries the
``implanted`` column instead. A missing or failed no-defense cell leaves the attack unknown, never
marked.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Iterable, Mapping

from ..results_schema import NO_DEFENSE
from .facts import Facts
from .results import finite_number, same_rate

#: Percent. Issue 31: "a cell whose no-defense ASR is below 50 % is marked attack not implanted"
#: (methods/design.md §7.1); exactly 50.0 counts as implanted.
IMPLANT_THRESHOLD = 50.0
MARK = "‡"
LEGEND = (f"{MARK} attack not implanted: no-defense ASR < {IMPLANT_THRESHOLD:g} % on its headline "
          "rule; its defense cells are not ranked.")
CSV_COLUMN = "implanted"
CSS_CLASS = "notimplanted"  # the HTML rows (and page table body) of attacks not implanted

Key = tuple[str, str]  # (attack id, dataset)


def no_defense_asr(records: Iterable[Mapping], facts: Facts | None = None,
                   poison_rate: float | None = None) -> dict[Key, float]:
    """(attack, dataset) -> the mean over seeds (and presets) of the headline ASR of the ok
    no-defense cells, in %; ``poison_rate`` given: only the cells at that rate. A pair without
    an ok no-defense cell holding the number is absent (unknown)."""
    records = list(records)
    facts = Facts.of(records) if facts is None else facts
    values: dict[Key, list[float]] = defaultdict(list)
    for r in records:
        if r.get("status") != "ok" or r.get("defense") != NO_DEFENSE:
            continue
        if poison_rate is not None and not same_rate(finite_number(r.get("poison_rate")), poison_rate):
            continue
        triggered = (r.get("metrics") or {}).get("triggered") or {}
        value = finite_number(triggered.get(facts.headline_metric(r["attack"])))
        if value is not None:
            values[(r["attack"], r["dataset"])].append(value)
    return {k: math.fsum(v) / len(v) for k, v in values.items()}


def implant_status(records: Iterable[Mapping], facts: Facts | None = None,
                   poison_rate: float | None = None) -> dict[Key, bool]:
    """(attack, dataset) -> whether the attack was implanted (no-defense headline ASR
    >= :data:`IMPLANT_THRESHOLD`); unknown pairs are absent."""
    return {k: v >= IMPLANT_THRESHOLD for k, v in no_defense_asr(records, facts, poison_rate).items()}


def not_implanted(records: Iterable[Mapping], facts: Facts | None = None,
                  poison_rate: float | None = None) -> frozenset[Key]:
    """The (attack, dataset) pairs whose attack was not implanted (to be marked, not ranked)."""
    return frozenset(k for k, ok in implant_status(records, facts, poison_rate).items() if not ok)


def csv_value(status: Mapping[Key, bool], attack: str, dataset: str) -> str:
    """The ``implanted`` column: ``true``, ``false``, or empty where unknown."""
    known = status.get((attack, dataset))
    return "" if known is None else ("true" if known else "false")
