"""The table model every layout fills and :mod:`.render` writes: plain text cells (one decimal,
as the paper prints) with index columns and column groups."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .implant import LEGEND, MARK

MISSING = "–"  # printed for a cell with no value


def fmt(value: float | None) -> str:
    """One decimal, as the paper prints; :data:`MISSING` when there is no value."""
    if value is None or not math.isfinite(value):
        return MISSING
    text = f"{value:.1f}"
    return "0.0" if text == "-0.0" else text


@dataclass(frozen=True)
class ColumnGroup:
    """A column group (usually a defense) and the headers of its columns."""

    label: str
    columns: tuple[str, ...]


@dataclass
class Table:
    """A rendered-ready table: every cell is already text."""

    key: str  # file stem, e.g. "table2"
    title: str
    index: tuple[str, ...]  # names of the row-label columns
    groups: tuple[ColumnGroup, ...]
    rows: list[tuple[tuple[str, ...], tuple[str, ...]]] = field(default_factory=list)
    footnotes: list[str] = field(default_factory=list)
    has_data: bool = False  # whether any cell holds one of our numbers (not only the paper's)
    #: Per row, whether its attack was implanted (:mod:`.implant`): "true", "false", or "" where
    #: unknown or not a backdoored model's row; empty: the table has no such column.
    implanted: list[str] = field(default_factory=list)

    def marked(self, i: int) -> bool:
        """Whether row ``i`` is an attack not implanted (shown with :data:`MARK`, never ranked)."""
        return bool(self.implanted) and self.implanted[i] == "false"

    def implant_legend(self) -> list[str]:
        """The footnote explaining :data:`MARK`, when a row carries it."""
        return [LEGEND] if any(self.marked(i) for i in range(len(self.rows))) else []

    def row_labels(self, i: int) -> tuple[str, ...]:
        """Row ``i``'s labels as displayed: :data:`MARK` after the attack of a marked row."""
        labels = self.rows[i][0]
        if not self.marked(i) or "Attack" not in self.index:
            return labels
        at = self.index.index("Attack")
        return labels[:at] + (f"{labels[at]} {MARK}",) + labels[at + 1:]

    def flat_headers(self) -> list[str]:
        """Single-row headers: the index names, then ``<group> / <column>`` (the bare column
        when the group has no label)."""
        return list(self.index) + [f"{g.label} / {c}" if g.label else c for g in self.groups for c in g.columns]

    def flat_rows(self) -> list[list[str]]:
        """Displayed rows: labels (marked where not implanted), then the cells."""
        return [list(self.row_labels(i)) + list(cells) for i, (_l, cells) in enumerate(self.rows)]
