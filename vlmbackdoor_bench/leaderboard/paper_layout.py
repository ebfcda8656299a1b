"""Tables 1-3 as the page and the README show them: the paper's rows and column groups, each of
our values with the paper's where it prints one, and the clean reference model as one row per
dataset (not one per attack, as the exported table files have it).

:mod:`.page` renders them as sortable HTML with ours / paper / Δ, :mod:`.render` as compact
Markdown in the leaderboard README.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

from ..results_schema import CLEAN_MODEL, NO_DEFENSE
from .facts import CLEAN_MODEL_LABEL
from .implant import MARK
from .tables import (TABLE1_METRICS, TABLE23_METRICS, CellValues, PaperCell, TableSet,
                     table2_defenses, table_rows)

#: The reference row's ASR: the clean model's triggered-input ASR differs per attack, so its one
#: row per dataset shows clean inputs, where the target word's rate is rule strict's
#: (methods/metrics.md §4.2).
REFERENCE_ASR = "asr_strict"
REFERENCE_LABEL = f"{CLEAN_MODEL_LABEL} (reference)"
REFERENCE_NOTE = (f"{REFERENCE_LABEL}, one row per dataset: the model fine-tuned on unpoisoned "
                  "data, on clean test inputs (the same images for every attack), under No "
                  f"Defense; its ASR is the target word's rate there (`{REFERENCE_ASR}`).")


@dataclass(frozen=True)
class PaperLayout:
    """One of the paper's tables: its number, title, defense column groups and metrics."""

    number: int
    key: str
    title: str
    groups: tuple[str, ...]
    metrics: tuple[str, ...]
    group_labels: Mapping[str, str]
    reference_row: bool


@dataclass(frozen=True)
class Column:
    """One value column: the defense key it reads, its group label, the metric, and whether the
    paper's table lacks that defense (no paper values)."""

    defense: str
    group: str
    metric: str
    outside_paper: bool


@dataclass(frozen=True)
class LayoutRow:
    labels: tuple[str, str]
    values: tuple[float | None, ...]
    paper: tuple[PaperCell | None, ...]
    reference: bool
    marked: bool = False  # an attack not implanted (:mod:`.implant`): labelled, greyed, unranked


def paper_layouts(table_set: TableSet) -> list[PaperLayout]:
    """Tables 1 and 2, and Table 3 when it holds results (as :func:`.tables.build_tables`)."""
    cells, facts = table_set.cells, table_set.cells.facts
    t1 = tuple(TABLE1_METRICS) + tuple(cells.other_metrics("triggered", TABLE1_METRICS))
    t3 = tuple(facts.paper_defenses(3))
    layouts = [PaperLayout(1, "table1", "Table 1: No Defense vs SRD (triggered inputs)",
                           tuple(facts.paper_defenses(1)), t1, {}, True),
               PaperLayout(2, "table2", "Table 2: defense comparison (triggered inputs)",
                           tuple(table2_defenses(cells)), tuple(TABLE23_METRICS), {}, True)]
    if "table3" in {t.key for t in table_set.tables}:
        layouts.append(PaperLayout(3, "table3", "Table 3: RL ablation (triggered inputs)", t3,
                                   tuple(TABLE23_METRICS), {d: facts.paper_label(3, d) for d in t3},
                                   False))
    return layouts


def columns(table_set: TableSet, layout: PaperLayout) -> list[Column]:
    cells = table_set.cells
    paper = table_set.paper.get(layout.number, {})
    in_paper = {d for (_ds, _a, d, _m) in paper}
    keys = [k for d in layout.groups for k in cells.keys_of_defense(d)]
    return [Column(key, cells.key_label("defense", key, layout.group_labels), metric,
                   bool(paper) and cells.base.get(key, key) not in in_paper)
            for key in keys for metric in layout.metrics]


def _reference_value(cells: CellValues, dataset: str, metric: str) -> float | None:
    """The clean model on clean test inputs (the same images for every attack: their mean)."""
    shown = REFERENCE_ASR if cells.facts.is_rule_metric(metric) else metric
    values = [cells.get((dataset, attack, CLEAN_MODEL, "clean", shown))
              for d, attack in sorted(cells.clean_rows) if d == dataset]
    values = [v for v in values if v is not None]
    return math.fsum(values) / len(values) if values else None


def layout_rows(table_set: TableSet, layout: PaperLayout) -> list[LayoutRow]:
    """The backdoored rows (ours, and the paper's rows we lack), then one reference row per
    dataset when the layout has them."""
    cells, facts = table_set.cells, table_set.cells.facts
    paper = table_set.paper.get(layout.number, {})
    cols = columns(table_set, layout)
    rows = []
    for row in table_rows(cells, paper, with_clean=False):
        attack = cells.base.get(row.attack, row.attack)
        marked = cells.implanted(row.dataset, row.attack) == "false"
        label = cells.key_label("attack", row.attack) + (f" {MARK}" if marked else "")
        rows.append(LayoutRow(
            (facts.label("dataset", row.dataset), label),
            tuple(cells.get((row.dataset, row.attack, c.defense, "triggered", c.metric)) for c in cols),
            tuple(paper.get((row.dataset, attack, cells.base.get(c.defense, c.defense), c.metric))
                  for c in cols), False, marked))
    if layout.reference_row and cells.clean_rows:
        first_none = next((c.defense for c in cols if cells.base.get(c.defense, c.defense) == NO_DEFENSE), None)
        for dataset in sorted({d for d, _a in cells.clean_rows}, key=lambda d: facts.rank("dataset", d)):
            rows.append(LayoutRow(
                (facts.label("dataset", dataset), REFERENCE_LABEL),
                tuple(_reference_value(cells, dataset, c.metric) if c.defense == first_none else None
                      for c in cols),
                (None,) * len(cols), True))
    return rows
