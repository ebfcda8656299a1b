"""Leaderboards and regression gates from stored cell results (methods/design.md §7).

The CLI's ``vbb report`` calls :func:`build_leaderboards`; ``vbb check`` calls
:func:`check_against_baseline` (and :func:`write_baseline` to record a new baseline).

Modules: :mod:`.results` (loading, long form), :mod:`.facts` (the plugins' labels, orders and
directions, from the records), :mod:`.table_model` (the table every layout fills), :mod:`.tables`
(layouts, paper values), :mod:`.defense_report`, :mod:`.stage_tables` (per-stage timings, SRD's
RL diagnostics), :mod:`.paper_layout` (Tables 1-3 with paper values and reference rows),
:mod:`.figures` (matplotlib), :mod:`.page` (``index.html``), :mod:`.render` (Markdown/CSV/LaTeX/HTML,
README, and writing it all), :mod:`.headline` (the project README's table), :mod:`.check`
(baselines), :mod:`.merge` (``results.csv`` back into records).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

from ..errors import VbbError
from ..results_schema import CLEAN_MODEL
from .check import (
    DEFAULT_TOLERANCES, Regression, check, load_baseline, make_baseline, tolerance_for,
    validate_baseline,
)
from .facts import Facts
from .render import write_leaderboards
from .results import (
    LONG_FORM_COLUMNS, PAPER_PROFILE, CellCoordinates, ResultFileWarning, load_results,
    long_form, missing_cells, newest_result_mtime,
)
from .tables import Table, TableSet, build_tables, default_paper_dir, load_paper_tables

__all__ = [
    "CLEAN_MODEL", "DEFAULT_TOLERANCES", "LONG_FORM_COLUMNS", "PAPER_PROFILE", "Regression",
    "ResultFileWarning", "Table", "TableSet", "build_leaderboards", "build_tables", "check",
    "check_against_baseline", "default_paper_dir", "load_baseline", "load_paper_tables",
    "load_results", "long_form", "make_baseline", "missing_cells", "tolerance_for", "validate_baseline",
    "write_baseline",
]


def profile_dir(out_dir: Path, profile: str) -> Path:
    """``<out_dir>/<profile>``; an ``out_dir`` already named after the profile is used as is."""
    out_dir = Path(out_dir)
    return out_dir if out_dir.name == profile else out_dir / profile


def build_leaderboards(results_dir: Path, profile: str, out_dir: Path,
                       paper_dir: Path | None = None,
                       declared: Sequence[CellCoordinates] | None = None,
                       records: Sequence[Mapping] | None = None) -> list[Path]:
    """Rebuild every table of ``profile`` from ``<results_dir>/<profile>/*.json``.

    Files go to ``<out_dir>/<profile>/`` (``out_dir`` is the ``leaderboards`` folder):
    ``results.csv``, ``table1``/``table2``/``table3`` (table3 only when it holds results),
    ``clean_inputs``, ``asr_headline`` as ``.md/.csv/.tex/.html``, ``paper_table{1,2,3}.md``
    for profiles other than the paper's, ``figures/*.png|svg``, the page ``index.html`` and
    ``README.md``. ``paper_dir`` None means
    ``$VBB_SHARED_DIR/paper_tables`` or ``<repo>/../shared/paper_tables``; absent, no paper
    values are shown. ``declared``: the cells of the grid the results belong to, as
    (dataset, attack, defense, poison rate, seed); those without a result are listed in the README.
    ``records``: the results already loaded by the caller with :func:`load_results` (None: load
    them here). Returns the paths written. Same results in, byte-identical files out (figures: for
    one matplotlib version).
    """
    if records is None:
        records = load_results(Path(results_dir), profile)
    if not records:
        raise VbbError(f"no readable cell results for profile {profile!r} under "
                       f"{Path(results_dir) / profile}",
                       f"run the grid for profile {profile!r} first (unreadable files were "
                       "reported above as warnings)")
    facts = Facts.of(records)
    paper = load_paper_tables(paper_dir, facts)
    table_set = build_tables(records, profile, paper, facts)
    return write_leaderboards(profile_dir(out_dir, profile), profile, records, table_set,
                              newest_result_mtime(Path(results_dir), profile), declared)


def _check_profile(baseline: Mapping, profile: str, path: Path) -> None:
    if baseline["profile"] != profile:
        raise VbbError(f"baseline {path} is for profile {baseline['profile']!r}, not {profile!r}",
                       f"pass the baseline of profile {profile!r}, or check profile "
                       f"{baseline['profile']!r}")


def check_against_baseline(results_dir: Path, profile: str, baseline_path: Path,
                           records: Sequence[Mapping] | None = None) -> list[Regression]:
    """Regressions of the stored results of ``profile`` (or of ``records``, e.g. a merged board)
    against the baseline file (empty: pass)."""
    baseline = load_baseline(Path(baseline_path))
    _check_profile(baseline, profile, Path(baseline_path))
    return check(load_results(Path(results_dir), profile) if records is None else records, baseline)


def write_baseline(results_dir: Path, profile: str, path: Path,
                   tolerances: Mapping[str, float] | None = None,
                   records: Sequence[Mapping] | None = None) -> Path:
    """Record the current results of ``profile`` (or ``records``) as the baseline at ``path``
    (sorted, stable)."""
    if records is None:
        records = load_results(Path(results_dir), profile)
    baseline = make_baseline(records, dict(tolerances or DEFAULT_TOLERANCES))
    baseline["profile"] = profile
    validate_baseline(baseline, str(path))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(baseline, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path
