"""Table layouts: the paper's Tables 1-3, the clean-input table and the headline-ASR table.

A :class:`Table` is plain text cells (already formatted, one decimal as the paper prints them) with
index columns and column groups; :mod:`.render` turns it into Markdown, CSV, LaTeX and HTML.

Layouts (all values in %, methods/metrics.md §1):

* Table 1: rows dataset x attack; groups No Defense, SRD; B@4, C, SC, LF, SFS, ASR (triggered),
  then every other metric plugin's number (one not stored per ASR rule).
* Table 2: rows dataset x attack; groups No Defense, ABL, VDC, CT, SRD, then every other defense
  found in the results; C, SFS, ASR (triggered).
* Table 3: rows dataset x attack; groups No Defense, Random, PPO, SAC, DQN (= ``srd``); C, SFS, ASR.
* clean inputs (the paper's Figure 5a): clean-split C, B@4 and ``asr_strict`` as ASR_clean.
* headline ASR: ``asr_strict`` (trigger attacks) or ``asr_concept`` (Shadowcast), with n.

The ASR of Tables 1-3 is the reproduction rule ``asr_srd``. The clean reference model
(``defense == "clean-model"``) is a "Clean model" row group per dataset in Tables 1, 2, the
clean-input and headline tables, with its numbers under No Defense. For the paper profile each cell
prints ``ours (paper)``; for other profiles the paper's tables are built separately.
"""

from __future__ import annotations

import csv
import math
import os
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from ..errors import VbbError
from .defense_report import defense_report
from .facts import Facts, registry_facts
from .implant import csv_value, implant_status
from ..results_schema import CLEAN_MODEL, NO_DEFENSE
from .results import PAPER_PROFILE, metric_n, metric_values, same_rate
from .table_model import MISSING, ColumnGroup, Table, fmt

__all__ = ["MISSING", "ColumnGroup", "Table", "TableSet", "build_tables", "fmt", "load_paper_tables"]

DEFAULT_POISON_RATE = 0.1  # the paper's rate; the tables use it when the results have it
TABLE1_METRICS: tuple[str, ...] = ("bleu4", "cider", "sc", "lf", "sfs", "asr_srd")
TABLE23_METRICS: tuple[str, ...] = ("cider", "sfs", "asr_srd")
CLEAN_METRICS: tuple[tuple[str, str], ...] = (("cider", "C"), ("bleu4", "B@4"),
                                              ("asr_strict", "ASR_clean"))

PAPER_FILES: dict[int, str] = {1: "table1.csv", 2: "table2.csv", 3: "table3.csv"}
PAPER_COLUMNS: tuple[str, ...] = ("dataset", "attack", "defense", "metric", "value", "note")
PAPER_SOURCE = "SRD paper (Xu et al., AAAI 2026)"


def header(facts: Facts, metric: str, text: str | None = None) -> str:
    """Column header with the metric's direction arrow, e.g. ``C ↑``."""
    text = text if text is not None else facts.label("metric", metric)
    mark = facts.arrow(metric)
    return f"{text} {mark}" if mark else text


# ----------------------------------------------------------------------------- paper tables
@dataclass(frozen=True)
class PaperCell:
    """One printed cell of the paper: the text as printed ("" for '-'), its number, a note."""

    text: str
    value: float | None
    note: str


PaperKey = tuple[str, str, str, str]  # harness ids: dataset, attack, defense, metric
PaperTables = dict[int, dict[PaperKey, PaperCell]]

def _paper_id(ids: Mapping[str, str], text: str) -> str:
    """The harness id of a label the paper prints (unknown labels: lower case, ``_`` for spaces)."""
    return ids.get(text, text.lower().replace("-", "_").replace(" ", "_"))


def default_paper_dir() -> Path | None:
    """``$VBB_SHARED_DIR/paper_tables``, else ``<repo>/../shared/paper_tables``; None if absent."""
    env = os.environ.get("VBB_SHARED_DIR")
    if env:
        candidate = Path(env) / "paper_tables"
    else:
        repo = Path(__file__).resolve().parents[2]
        candidate = repo.parent / "shared" / "paper_tables"
    return candidate if candidate.is_dir() else None


def load_paper_tables(paper_dir: Path | None = None, facts: Facts | None = None) -> PaperTables:
    """The paper's Tables 1-3 keyed by harness ids, in the paper's row order.

    ``paper_dir`` None means :func:`default_paper_dir`. A missing folder or file gives no paper
    values (not an error); a file with the wrong columns or a non-numeric value is a VbbError.
    The paper's labels are matched to ids through ``facts`` (None: the installed plugins').
    """
    facts = registry_facts() if facts is None else facts
    ids = {kind: facts.paper_ids(kind) for kind in ("dataset", "attack", "defense", "metric")}
    folder = paper_dir if paper_dir is not None else default_paper_dir()
    tables: PaperTables = {}
    if folder is None or not Path(folder).is_dir():
        return tables
    for number, name in PAPER_FILES.items():
        path = Path(folder) / name
        if not path.is_file():
            continue
        cells: dict[PaperKey, PaperCell] = {}
        with path.open(encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle)
            if tuple(reader.fieldnames or ()) != PAPER_COLUMNS:
                raise VbbError(
                    f"paper table {path} has columns {reader.fieldnames}, expected "
                    f"{list(PAPER_COLUMNS)}",
                    "restore the file from shared/paper_tables (see its README.md)",
                )
            for line, row in enumerate(reader, start=2):
                text = (row["value"] or "").strip()
                try:
                    value = float(text) if text else None
                except ValueError:
                    raise VbbError(
                        f"paper table {path} line {line}: value {text!r} is not a number",
                        "write the value as printed, or leave it empty with a note") from None
                key = tuple(_paper_id(ids[kind], row[kind])
                            for kind in ("dataset", "attack", "defense", "metric"))
                cells[key] = PaperCell(text=text, value=value, note=(row["note"] or "").strip())
        tables[number] = cells
    return tables


class _Notes:
    """Numbered footnotes for paper notes, one number per distinct text."""

    def __init__(self) -> None:
        self.numbers: dict[str, int] = {}

    def mark(self, note: str) -> str:
        if not note:
            return ""
        number = self.numbers.setdefault(note, len(self.numbers) + 1)
        return f" [{number}]"

    def lines(self) -> list[str]:
        return [f"[{n}] {text}" for text, n in self.numbers.items()]


# ----------------------------------------------------------------------------- aggregation
CellKey = tuple[str, str, str, str, str]  # dataset, attack key, defense key, split, metric


def table_poison_rate(records: Sequence[Mapping]) -> float | None:
    """The poison rate the tables show: the paper's 10 % when present, else the most common one
    (ties: the largest). The clean reference model is not poisoned and does not count."""
    rates = [r.get("poison_rate") for r in records if r["defense"] != CLEAN_MODEL]
    rates = [float(x) if isinstance(x, (int, float)) else None for x in rates]
    if not rates:
        return None
    if any(same_rate(x, DEFAULT_POISON_RATE) for x in rates):
        return DEFAULT_POISON_RATE
    counts = Counter(rates)
    return max(counts, key=lambda x: (counts[x], x is not None, x or 0.0))


class CellValues:
    """Our numbers, averaged over seeds, keyed by dataset/attack/defense/split/metric.

    Only the selected poison rate is kept (the clean reference model at any rate). When one
    attack (defense) was run with several presets, each preset becomes its own row (column
    group), labelled ``BadNet [preset]``.
    """

    def __init__(self, records: Sequence[Mapping], facts: Facts | None = None):
        self.facts = Facts.of(records) if facts is None else facts
        # A failed cell has no numbers and, often, no presets: it is listed in the README's failed
        # cells and counted in the notes, never a row or a preset of its own here (issue 32).
        records = [r for r in records if r.get("status") == "ok"]
        self.poison_rate = table_poison_rate(records)
        #: (attack id, dataset) -> implanted, at the tables' poison rate (:mod:`.implant`)
        self.implant = implant_status(records, self.facts, self.poison_rate)
        kept = [r for r in records if r["defense"] == CLEAN_MODEL
                or same_rate(_rate(r), self.poison_rate)]
        self.seeds = sorted({r.get("seed") for r in kept if isinstance(r.get("seed"), int)})
        attack_presets: dict[str, set[str]] = defaultdict(set)
        defense_presets: dict[str, set[str]] = defaultdict(set)
        for r in kept:
            attack_presets[r["attack"]].add(str(r.get("attack_preset")))
            defense_presets[r["defense"]].add(str(r.get("defense_preset")))
        self._attack_multi = {a for a, p in attack_presets.items() if len(p) > 1}
        self._defense_multi = {d for d, p in defense_presets.items() if len(p) > 1}
        self.base: dict[str, str] = {}  # key -> harness id, for attacks and defenses alike
        self.attack_keys: dict[str, set[str]] = defaultdict(set)
        self.defense_keys: dict[str, set[str]] = defaultdict(set)
        self.rows: set[tuple[str, str]] = set()  # (dataset, attack key), backdoored models
        self.clean_rows: set[tuple[str, str]] = set()  # (dataset, attack key), clean model
        sums: dict[CellKey, list[float]] = defaultdict(list)
        ns: dict[CellKey, set[int]] = defaultdict(set)

        for r in kept:
            a_key, d_key = self.attack_key(r), self.defense_key(r)
            self.attack_keys[r["attack"]].add(a_key)
            self.defense_keys[r["defense"]].add(d_key)
            (self.clean_rows if r["defense"] == CLEAN_MODEL else self.rows).add(
                (r["dataset"], a_key))
            for split, metric, value in metric_values(r, self.facts):
                key = (r["dataset"], a_key, d_key, split, metric)
                sums[key].append(value)
                n = metric_n(r, split, metric)
                if n is not None:
                    ns[key].add(n)
        self.values = {k: math.fsum(v) / len(v) for k, v in sums.items()}
        # sample standard deviation over seeds: a single seed cannot rank partial removals
        self.spreads = {k: statistics.stdev(v) for k, v in sums.items() if len(v) > 1}
        self.ns = {k: tuple(sorted(v)) for k, v in ns.items()}

    def other_metrics(self, split: str, fixed: Sequence[str]) -> list[str]:
        """Metrics of ``split`` in the results beyond ``fixed``, in their declared order; one
        stored per ASR rule is left out (the tables show the rules they name)."""
        found = {k[4] for k in self.values if k[3] == split and k[4] not in fixed}
        return sorted((m for m in found if not self.facts.is_rule_metric(m)),
                      key=lambda m: self.facts.rank("metric", m))

    def attack_key(self, record: Mapping) -> str:
        attack = record["attack"]
        key = (f"{attack} [{record.get('attack_preset')}]" if attack in self._attack_multi
               else attack)
        self.base[key] = attack
        return key

    def defense_key(self, record: Mapping) -> str:
        defense = record["defense"]
        key = (f"{defense} [{record.get('defense_preset')}]" if defense in self._defense_multi
               else defense)
        self.base[key] = defense
        return key

    def keys_of_defense(self, defense: str) -> list[str]:
        """Column keys of one defense id (one per preset; the id itself when it has no data)."""
        return sorted(self.defense_keys.get(defense) or {defense})

    def key_label(self, kind: str, key: str, labels: Mapping[str, str] | None = None) -> str:
        base = self.base.get(key, key)
        text = (labels or {}).get(base) or self.facts.label(kind, base)
        return text + key[len(base):]

    def implanted(self, dataset: str, attack_key: str) -> str:
        """The ``implanted`` column of a backdoored row: "true", "false" or "" (unknown)."""
        return csv_value(self.implant, self.base.get(attack_key, attack_key), dataset)

    def get(self, key: CellKey) -> float | None:
        return self.values.get(key)

    def text(self, key: CellKey) -> str:
        """The printed value: the mean, with ``± sd`` when several seeds contributed."""
        spread = self.spreads.get(key)
        return fmt(self.values.get(key)) + (f" ± {fmt(spread)}" if spread is not None else "")

    def other_defenses(self, fixed: Sequence[str]) -> list[str]:
        """Defense ids in the results beyond ``fixed`` (not the clean model), in table order."""
        found = {d for d in self.defense_keys if d != CLEAN_MODEL and d not in fixed}
        return sorted(found, key=lambda d: self.facts.rank("defense", d))


def _rate(record: Mapping) -> float | None:
    value = record.get("poison_rate")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


# ----------------------------------------------------------------------------- builders
@dataclass(frozen=True)
class TableRow:
    dataset: str
    attack: str  # attack key (id, or "id [preset]")
    clean: bool  # a clean-reference-model row


def table_rows(cells: CellValues, paper: Mapping[PaperKey, PaperCell] | None,
               with_clean: bool) -> list[TableRow]:
    """Backdoored rows (ours, plus the paper's when it is shown), then the clean-model group,
    per dataset."""
    backdoored = set(cells.rows)
    ours = {(dataset, cells.base.get(key, key)) for dataset, key in cells.rows}
    for dataset, attack, _defense, _metric in (paper or {}):
        if (dataset, attack) not in ours:
            backdoored.add((dataset, attack))
    rows = [TableRow(d, a, False) for d, a in backdoored]
    if with_clean:
        rows += [TableRow(d, a, True) for d, a in cells.clean_rows]

    def order(row: TableRow) -> tuple:
        return (cells.facts.rank("dataset", row.dataset), row.clean,
                cells.facts.rank("attack", cells.base.get(row.attack, row.attack)), row.attack)

    return sorted(rows, key=order)


def _row_labels(cells: CellValues, row: TableRow) -> tuple[str, str]:
    attack = cells.key_label("attack", row.attack)
    return (cells.facts.label("dataset", row.dataset), f"Clean model: {attack}" if row.clean else attack)


def _defense_for(cells: CellValues, row: TableRow, group_key: str, first_none: str) -> str | None:
    """The defense key whose numbers fill this row x group (clean rows: only under No Defense)."""
    if row.clean:
        return CLEAN_MODEL if group_key == first_none else None
    return group_key


def _general_notes(cells: CellValues, split_text: str, asr_text: str | None,
                   with_clean: bool, n_failed: int) -> list[str]:
    notes = [f"{split_text} All values in %."]
    if asr_text:
        notes.append(asr_text)
    if cells.poison_rate is not None:
        notes.append(f"Poison rate {cells.poison_rate:g}.")
    if len(cells.seeds) > 1:
        notes.append("Mean over seeds " + ", ".join(str(s) for s in cells.seeds)
                     + "; ± the sample standard deviation where a cell has results of several.")
    if with_clean and cells.clean_rows:
        notes.append("Clean model: the reference model fine-tuned on unpoisoned data, evaluated "
                     "on the same attack's inputs; its numbers are under No Defense.")
    missing = f"{MISSING}: no result."
    if n_failed:
        missing += f" {n_failed} cell(s) failed; see README.md, section Failed cells."
    notes.append(missing)
    return notes


_TRIGGERED = ("Triggered test inputs (every image carries the attack's trigger; Shadowcast: its "
              "source-concept subset).")
_ASR_SRD = ("ASR: the reproduction rule `asr_srd` (substring 'banana', methods/metrics.md §4.1); the "
            "headline rule is in asr_headline.")


def _grid_table(*, key: str, title: str, cells: CellValues, groups: Sequence[str],
                group_labels: Mapping[str, str] | None, metrics: Sequence[tuple[str, str, str]],
                paper: Mapping[PaperKey, PaperCell] | None, with_clean: bool,
                footnotes: list[str]) -> Table:
    """Rows dataset x attack, one column group per defense key, ``metrics`` = (split, metric,
    header) per column. ``paper`` given: cells print ``ours (paper)``."""
    group_keys = [k for d in groups for k in cells.keys_of_defense(d)]
    first_none = next((k for k in group_keys if cells.base.get(k, k) == NO_DEFENSE), "")
    notes = _Notes()
    table = Table(key=key, title=title, index=("Dataset", "Attack"),
                  groups=tuple(ColumnGroup(cells.key_label("defense", g, group_labels),
                                           tuple(h for _s, _m, h in metrics)) for g in group_keys))
    for row in table_rows(cells, paper, with_clean):
        texts: list[str] = []
        for group in group_keys:
            defense = _defense_for(cells, row, group, first_none)
            for split, metric, _header in metrics:
                key = (row.dataset, row.attack, defense or "", split, metric)
                ours = cells.get(key) if defense else None
                table.has_data |= ours is not None and not row.clean
                text = cells.text(key) if defense else MISSING
                if paper is not None and not row.clean:
                    cell = paper.get((row.dataset, cells.base.get(row.attack, row.attack),
                                      cells.base.get(group, group), metric))
                    if cell is not None:
                        text += f" ({cell.text or MISSING}{notes.mark(cell.note)})"
                texts.append(text)
        table.rows.append((_row_labels(cells, row), tuple(texts)))
        table.implanted.append("" if row.clean else cells.implanted(row.dataset, row.attack))
    table.footnotes = footnotes + table.implant_legend() + notes.lines()
    return table


def _paper_note(number: int, profile: str, show_paper: bool, available: bool) -> list[str]:
    if show_paper:
        return [f"Cells read `ours (paper)`; paper values from {PAPER_SOURCE}, Table {number}, "
                "as printed. Bracketed numbers point to the paper's notes below."]
    if available:
        return [f"The paper's Table {number} is in paper_table{number}.md, for reference; profile "
                f"`{profile}` is not the paper's setup, so its numbers are not comparable."]
    return []


def table1(cells: CellValues, profile: str, paper: PaperTables, n_failed: int = 0) -> Table:
    show = profile == PAPER_PROFILE and 1 in paper
    shown = list(TABLE1_METRICS) + cells.other_metrics("triggered", TABLE1_METRICS)
    metrics = [("triggered", m, header(cells.facts, m)) for m in shown]
    notes = (_general_notes(cells, _TRIGGERED, _ASR_SRD, True, n_failed)
             + _paper_note(1, profile, show, 1 in paper))
    return _grid_table(key="table1", title="Table 1: No Defense vs SRD (triggered inputs)",
                       cells=cells, groups=cells.facts.paper_defenses(1), group_labels=None, metrics=metrics,
                       paper=paper.get(1) if show else None, with_clean=True, footnotes=notes)


def table2_defenses(cells: CellValues) -> list[str]:
    """The paper's Table 2 defenses (No Defense, ABL, VDC, CT, SRD), then every other defense in
    the results."""
    paper = cells.facts.paper_defenses(2)
    return paper + cells.other_defenses(paper)


def table2(cells: CellValues, profile: str, paper: PaperTables, n_failed: int = 0) -> Table:
    show = profile == PAPER_PROFILE and 2 in paper
    metrics = [("triggered", m, header(cells.facts, m)) for m in TABLE23_METRICS]
    notes = (_general_notes(cells, _TRIGGERED, _ASR_SRD, True, n_failed)
             + _paper_note(2, profile, show, 2 in paper))
    return _grid_table(key="table2", title="Table 2: defense comparison (triggered inputs)",
                       cells=cells, groups=table2_defenses(cells), group_labels=None,
                       metrics=metrics, paper=paper.get(2) if show else None, with_clean=True,
                       footnotes=notes)


def table3(cells: CellValues, profile: str, paper: PaperTables, n_failed: int = 0) -> Table:
    show = profile == PAPER_PROFILE and 3 in paper
    groups = cells.facts.paper_defenses(3)
    metrics = [("triggered", m, header(cells.facts, m)) for m in TABLE23_METRICS]
    notes = (_general_notes(cells, _TRIGGERED, _ASR_SRD, False, n_failed)
             + ["DQN is SRD itself (defense `srd`); Random is `random_mask`, PPO `srd_ppo`, "
                "SAC `srd_sac`."]
             + _paper_note(3, profile, show, 3 in paper))
    return _grid_table(key="table3", title="Table 3: RL ablation (triggered inputs)",
                       cells=cells, groups=groups,
                       group_labels={d: cells.facts.paper_label(3, d) for d in groups},
                       metrics=metrics, paper=paper.get(3) if show else None, with_clean=False,
                       footnotes=notes)


def clean_inputs(cells: CellValues, n_failed: int = 0) -> Table:
    metrics = [("clean", m, header(cells.facts, m, text)) for m, text in CLEAN_METRICS]
    notes = _general_notes(
        cells, "Clean test inputs, no trigger (the paper's Figure 5a; Shadowcast: the whole "
        "test set).", "ASR_clean: rule `strict` on clean inputs (`asr_strict`, methods/metrics.md "
        "§4.2), the target word's false-positive rate.", True, n_failed)
    return _grid_table(key="clean_inputs", title="Clean inputs: C, B@4 and ASR_clean",
                       cells=cells, groups=table2_defenses(cells), group_labels=None,
                       metrics=metrics, paper=None, with_clean=True, footnotes=notes)


def asr_headline(cells: CellValues, n_failed: int = 0) -> Table:
    group_keys = [k for d in table2_defenses(cells) for k in cells.keys_of_defense(d)]
    first_none = next((k for k in group_keys if cells.base.get(k, k) == NO_DEFENSE), "")
    table = Table(key="asr_headline", title="Headline ASR (rule strict, or concept for Shadowcast)",
                  index=("Dataset", "Attack", "Rule"),
                  groups=tuple(ColumnGroup(cells.key_label("defense", g), ("ASR ↓", "n"))
                               for g in group_keys))
    for row in table_rows(cells, None, with_clean=True):
        attack = cells.base.get(row.attack, row.attack)
        metric = cells.facts.headline_metric(attack)
        texts: list[str] = []
        for group in group_keys:
            defense = _defense_for(cells, row, group, first_none)
            key = (row.dataset, row.attack, defense or "", "triggered", metric)
            value = cells.get(key) if defense else None
            table.has_data |= value is not None and not row.clean
            ns = cells.ns.get(key, ()) if value is not None else ()
            texts += [cells.text(key) if defense else MISSING,
                      "/".join(str(n) for n in ns) if ns else MISSING]
        table.rows.append((_row_labels(cells, row) + (metric.removeprefix("asr_"),),
                           tuple(texts)))
        table.implanted.append("" if row.clean else cells.implanted(row.dataset, row.attack))
    table.footnotes = _general_notes(
        cells, _TRIGGERED, "ASR: rule `strict` (`asr_strict`: whole word, images whose references "
        "show bananas excluded) for trigger attacks, `concept` (`asr_concept`) for Shadowcast "
        "(methods/metrics.md §4.2-4.4). n: images evaluated after exclusions.", True, n_failed)
    table.footnotes += table.implant_legend()
    return table


def paper_table(number: int, paper: PaperTables, facts: Facts) -> Table | None:
    """The paper's table as printed (labels and values), its notes as footnotes."""
    cells = paper.get(number)
    if not cells:
        return None
    raw: dict[tuple[str, str], dict[tuple[str, str], PaperCell]] = {}
    defenses: list[str] = []
    metrics: list[str] = []
    for (dataset, attack, defense, metric), cell in cells.items():
        raw.setdefault((dataset, attack), {})[(defense, metric)] = cell
        if defense not in defenses:
            defenses.append(defense)
        if metric not in metrics:
            metrics.append(metric)
    notes = _Notes()
    table = Table(key=f"paper_table{number}",
                  title=f"Paper Table {number}, as printed ({PAPER_SOURCE})",
                  index=("Dataset", "Attack"),
                  groups=tuple(ColumnGroup(facts.paper_label(number, d),
                                           tuple(header(facts, m) for m in metrics)) for d in defenses))
    for (dataset, attack), row in raw.items():
        texts = []
        for defense in defenses:
            for metric in metrics:
                cell = row.get((defense, metric))
                texts.append(MISSING if cell is None
                             else (cell.text or MISSING) + notes.mark(cell.note))
        table.rows.append(((facts.label("dataset", dataset), facts.label("attack", attack)), tuple(texts)))
    table.has_data = True
    table.footnotes = ["Triggered test inputs. All values in %, as printed in the paper "
                       f"({MISSING}: printed as '-' or not reported). Notes from "
                       "shared/paper_tables."] + notes.lines()
    return table


@dataclass
class TableSet:
    """Every table of one profile, in README order (Table 3 left out when it holds none of our
    numbers), and the paper's own tables for profiles other than the paper's."""

    tables: list[Table]
    paper_tables: list[Table]  # written separately, only for profiles other than the paper's
    cells: CellValues
    paper: PaperTables = field(default_factory=dict)  # the paper's values, for ours / paper / Δ


def build_tables(records: Sequence[Mapping], profile: str, paper: PaperTables,
                 facts: Facts | None = None) -> TableSet:
    """All leaderboard tables of one profile, from its cell records, the plugins' facts (None:
    :meth:`Facts.of` the records) and the paper's tables."""
    cells = CellValues(records, facts)
    n_failed = sum(1 for r in records if r.get("status") != "ok")
    t3 = table3(cells, profile, paper, n_failed)
    tables = [table1(cells, profile, paper, n_failed), table2(cells, profile, paper, n_failed)]
    tables += [t3] if t3.has_data else []
    tables += [clean_inputs(cells, n_failed), asr_headline(cells, n_failed)]
    report = defense_report(records, cells.poison_rate, cells.facts)
    tables += [report] if report.has_data else []
    papers: list[Table] = []
    if profile != PAPER_PROFILE:
        papers = [t for t in (paper_table(n, paper, cells.facts) for n in sorted(paper)) if t is not None]
    return TableSet(tables=tables, paper_tables=papers, cells=cells, paper=paper)
