"""The project README's headline table: each attack x the paper's Table 2 defenses, headline ASR
and clean-input CIDEr on one test dataset, from a board's records; an attack not implanted on that
dataset carries :data:`.implant.MARK` (the README prints :data:`.implant.LEGEND` below the table).
The README quotes it verbatim and tests/test_leaderboard_page.py checks it against the committed
``results.csv``."""

from __future__ import annotations

from typing import Mapping, Sequence

from .facts import Facts
from .figures import BoardMeans
from .implant import MARK
from .render import compact_grid
from .table_model import fmt

HEADLINE_DATASET = "coco"


def headline_markdown(records: Sequence[Mapping], poison_rate: float | None,
                      dataset: str = HEADLINE_DATASET) -> str:
    """Rows attacks, columns the defenses of the paper's Table 2 that have results; each cell
    ``ASR / C`` (headline rule; C on clean inputs)."""
    facts = Facts.of(records)
    board = BoardMeans(records, poison_rate, facts)
    defenses = [d for d in facts.paper_defenses(2)
                if any(board.get(dataset, a, d, "asr") is not None for a in board.attacks)]
    rows = [[facts.label("attack", a) + (f" {MARK}" if (a, dataset) in board.not_implanted else "")]
            + [f"{fmt(board.get(dataset, a, d, 'asr'))} / {fmt(board.get(dataset, a, d, 'clean_cider'))}"
               for d in defenses] for a in board.attacks]
    return compact_grid(["Attack"] + [facts.label("defense", d) for d in defenses], rows) + "\n"
