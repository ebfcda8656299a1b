"""Writing tables as Markdown, CSV, LaTeX and HTML, the figures and the page (:mod:`.figures`,
:mod:`.page`), and the per-profile README, which stays small: Tables 1 and 2 as compact Markdown,
the per-stage timings and links (methods/design.md §7).

Everything written here is a pure function of the stored results (and the paper's tables): rows
and provenance lists are sorted, and the date printed is the newest result file's, not the clock,
so rebuilding from the same results gives byte-identical files.
"""

from __future__ import annotations

import csv
import html
import io
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import pandas as pd
from tabulate import tabulate

from .. import __version__
from ..atomic import write_text_atomic
from .results import (
    PAPER_PROFILE, CellCoordinates, failed_cells, imported_from, long_form, missing_cells,
)
from .facts import Facts
from .implant import CSS_CLASS, CSV_COLUMN, LEGEND
from .figures import FIGURE_DIR, Figure, write_figures
from .page import page
from .paper_layout import REFERENCE_NOTE, PaperLayout, columns, layout_rows, paper_layouts
from .stage_tables import srd_table, timing_table
from .table_model import fmt
from .tables import MISSING, PAPER_SOURCE, Table, TableSet

FORMATS: tuple[str, ...] = ("md", "csv", "tex", "html")
#: Files this module may write; the ones not produced by a build are removed (e.g. table3.*).
MANAGED_STEMS: tuple[str, ...] = ("table1", "table2", "table3", "clean_inputs", "asr_headline")
PAPER_STEMS: tuple[str, ...] = ("paper_table1", "paper_table2", "paper_table3")
PAGE = "index.html"
COMMIT_CHARS = 12  # a commit's abbreviation in the README (unique in this repository's history)
#: Tables of the page besides Tables 1-3 (which it lays out with the paper's values itself).
PAGE_TABLES: tuple[str, ...] = ("defense_report", "asr_headline")


def _summary(records: Sequence[Mapping]) -> str:
    ok = sum(1 for r in records if r.get("status") == "ok")
    merged = sum(1 for r in records if imported_from(r))
    return (f"{len(records)} cell results ({ok} ok, {len(records) - ok} failed"
            + (f"; {merged} merged from earlier boards" if merged else "") + ").")


# ----------------------------------------------------------------------------- Markdown
def _md_cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def markdown_grid(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A GitHub Markdown table of text cells (no number parsing, so text stays as given)."""
    return tabulate([[_md_cell(c) for c in row] for row in rows],
                    headers=[_md_cell(h) for h in headers], tablefmt="github",
                    disable_numparse=True)


def markdown(table: Table, level: int = 1) -> str:
    """A table with its title as a heading and its footnotes as a list below."""
    parts = [f"{'#' * level} {table.title}", "", markdown_grid(table.flat_headers(),
                                                              table.flat_rows())]
    if table.footnotes:
        parts += [""] + [f"- {_md_cell(note)}" for note in table.footnotes]
    return "\n".join(parts) + "\n"


# ----------------------------------------------------------------------------- CSV
def csv_text(table: Table) -> str:
    """One header row (``<group> / <column>``), then one row per table row, as displayed; a table
    that knows which attacks were implanted (:mod:`.implant`) ends each row with its
    ``implanted`` column (true / false / empty where unknown) instead of marking the label."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    extra = [CSV_COLUMN] if table.implanted else []
    writer.writerow(table.flat_headers() + extra)
    for i, (labels, cells) in enumerate(table.rows):
        writer.writerow(list(labels) + list(cells) + ([table.implanted[i]] if extra else []))
    return buffer.getvalue()


def results_csv(frame: pd.DataFrame) -> str:
    """The long form, full precision, one row per number (failed cells: one row each)."""
    return frame.to_csv(index=False, lineterminator="\n")


# ----------------------------------------------------------------------------- LaTeX
_LATEX_SPECIAL: dict[str, str] = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
    "↑": r"$\uparrow$", "↓": r"$\downarrow$", "–": "--", "<": r"\textless{}",
    ">": r"\textgreater{}", "§": r"\S{}", "`": "", "‡": r"\ddag{}",
}


def latex_escape(text: str) -> str:
    """Text safe for LaTeX text mode (special characters, arrows and the en dash)."""
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(text))


def latex(table: Table) -> str:
    """A booktabs ``table`` environment: grouped headers with cmidrules, a midrule between
    datasets, footnotes below. Needs ``\\usepackage{booktabs}``."""
    n_index = len(table.index)
    n_values = sum(len(g.columns) for g in table.groups)
    lines = [f"% {latex_escape(table.title)}",
             "% generated by vbb report from stored results; needs \\usepackage{booktabs}",
             "\\begin{table}[ht]", "\\centering", f"\\caption{{{latex_escape(table.title)}}}",
             f"\\begin{{tabular}}{{{'l' * n_index}{'r' * n_values}}}", "\\toprule"]
    top = [""] * n_index
    rules = []
    column = n_index + 1
    for group in table.groups:
        width = len(group.columns)
        top.append(f"\\multicolumn{{{width}}}{{c}}{{{latex_escape(group.label)}}}")
        rules.append(f"\\cmidrule(lr){{{column}-{column + width - 1}}}")
        column += width
    lines.append(" & ".join(top) + " \\\\")
    lines.append(" ".join(rules))
    second = [latex_escape(n) for n in table.index]
    second += [latex_escape(c) for g in table.groups for c in g.columns]
    lines += [" & ".join(second) + " \\\\", "\\midrule"]
    previous: tuple[str, ...] | None = None
    for i, (labels, cells) in enumerate(table.rows):
        if previous is not None and labels[0] != previous[0]:
            lines.append("\\midrule")
        shown = list(table.row_labels(i))
        if previous is not None and labels[0] == previous[0]:
            shown[0] = ""
        lines.append(" & ".join([latex_escape(x) for x in shown]
                                + [latex_escape(c) for c in cells]) + " \\\\")
        previous = labels
    lines += ["\\bottomrule", "\\end{tabular}"]
    if table.footnotes:
        lines += ["\\par\\smallskip", "{\\footnotesize"]
        lines += [latex_escape(note) + "\\par" for note in table.footnotes]
        lines.append("}")
    lines.append("\\end{table}")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- HTML
_STYLE = ("table{border-collapse:collapse;font-family:sans-serif;font-size:14px}"
          "th,td{border:1px solid #ccc;padding:2px 8px}td{text-align:right}"
          "td.label{text-align:left}caption{font-weight:bold;padding:4px}"
          f"tr.{CSS_CLASS} td{{color:#888;background:#f2f2f2}}")


def html_table(table: Table) -> str:
    """A standalone HTML page: the table with two header rows and its footnotes."""
    e = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
           f"<title>{e(table.title)}</title>", f"<style>{_STYLE}</style>", "</head>", "<body>",
           "<table>", f"<caption>{e(table.title)}</caption>", "<thead>"]
    top = [f'<th rowspan="2">{e(name)}</th>' for name in table.index]
    top += [f'<th colspan="{len(g.columns)}">{e(g.label)}</th>' for g in table.groups]
    out.append("<tr>" + "".join(top) + "</tr>")
    out.append("<tr>" + "".join(f"<th>{e(c)}</th>" for g in table.groups for c in g.columns)
               + "</tr>")
    out += ["</thead>", "<tbody>"]
    for i, (_labels, cells) in enumerate(table.rows):
        marked = f' class="{CSS_CLASS}"' if table.marked(i) else ""
        out.append(f"<tr{marked}>" + "".join(f'<td class="label">{e(x)}</td>' for x in table.row_labels(i))
                   + "".join(f"<td>{e(c)}</td>" for c in cells) + "</tr>")
    out += ["</tbody>", "</table>"]
    out += [f"<p>{e(note)}</p>" for note in table.footnotes]
    out += ["</body>", "</html>"]
    return "\n".join(out) + "\n"


RENDERERS = {"md": markdown, "csv": csv_text, "tex": latex, "html": html_table}


# ----------------------------------------------------------------------------- README
def compact_grid(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A GitHub Markdown table without padding (the README's size limit)."""
    lines = ["| " + " | ".join(_md_cell(h) for h in headers) + " |",
             "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _one_line(text: object, limit: int = 300) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _failed_section(records: Sequence[Mapping], facts: Facts) -> list[str]:
    label = facts.label
    failed = failed_cells(records, facts)
    lines = ["## Failed cells", ""]
    if not failed:
        return lines + ["None.", ""]
    headers = ["Dataset", "Attack", "Defense", "Attack preset", "Defense preset", "Poison rate",
               "Seed", "Error"]
    rows = [[label("dataset", f["dataset"]), label("attack", f["attack"]),
             label("defense", f["defense"]), f["attack_preset"] or "", f["defense_preset"] or "",
             "" if f["poison_rate"] is None else f"{f['poison_rate']:g}",
             "" if f["seed"] is None else str(f["seed"]), _one_line(f["error"] or "(no message)")]
            for f in failed]
    return lines + [f"{len(failed)} cell(s) failed; they print {MISSING} in the tables.", "",
                    compact_grid(headers, rows), ""]


def _coverage_section(records: Sequence[Mapping], declared: Sequence[CellCoordinates] | None,
                      facts: Facts) -> list[str]:
    """The cells the grid declares that have no stored result at all (a partial run, or an older
    store), so that a table with gaps says which runs would fill them."""
    if declared is None:
        return []
    label = facts.label
    declared = sorted(set(declared), key=lambda c: (facts.rank("attack", c[1]), facts.rank("defense", c[2]),
                                                    c[3], c[4], facts.rank("dataset", c[0])))
    missing = missing_cells(records, declared)
    lines = ["## Grid coverage", ""]
    if not missing:
        return lines + [f"All {len(declared)} cells the grid declares have a result.", ""]
    groups: dict[tuple, list[str]] = {}
    for dataset, attack, defense, rate, seed in missing:
        groups.setdefault((attack, defense, rate, seed), []).append(label("dataset", dataset))
    rows = [[label("attack", a), label("defense", d), f"{rate:g}", str(seed), ", ".join(datasets)]
            for (a, d, rate, seed), datasets in groups.items()]
    return lines + [f"The grid declares {len(declared)} cells; {len(missing)} have no result and print "
                    f"{MISSING} in the tables (`vbb run` computes them):", "",
                    compact_grid(["Attack", "Defense", "Poison rate", "Seed", "Datasets"], rows), ""]


def _counted(values: Iterable[str]) -> str:
    counts = Counter(v for v in values if v)
    if not counts:
        return "(not recorded)"
    return ", ".join(f"`{v}` ({n} cells)" for v, n in sorted(counts.items()))


def _provenance_section(records: Sequence[Mapping], newest_mtime: float | None) -> list[str]:
    ok = sum(1 for r in records if r.get("status") == "ok")
    commits = [str((r.get("provenance") or {}).get("git_commit") or "")[:COMMIT_CHARS] for r in records]
    attacks = sorted({f"{r['attack']} {r.get('attack_version')}" for r in records})
    defenses = sorted({f"{r['defense']} {r.get('defense_version')}" for r in records})
    other: set[str] = set()
    scorers: set[str] = set()
    for r in records:
        versions = (r.get("provenance") or {}).get("versions") or {}
        if isinstance(versions, Mapping):
            other |= {f"{k} {v}" for k, v in versions.items() if isinstance(v, (str, int, float))}
        for split_details in (r.get("metric_details") or {}).values():
            if not isinstance(split_details, Mapping):
                continue
            for detail in split_details.values():
                if isinstance(detail, Mapping) and isinstance(detail.get("scorer"), str):
                    scorers.add(detail["scorer"])
    when = None if newest_mtime is None else \
        datetime.fromtimestamp(newest_mtime, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    lines = ["---", "", "## Provenance", "",
             f"- Cells: {ok} ok, {len(records) - ok} failed.",
             f"- Git commits: {_counted(commits)}.",
             f"- Attack versions: {', '.join(attacks) or '(none)'}.",
             f"- Defense versions: {', '.join(defenses) or '(none)'}."]
    if other:
        lines.append(f"- Other versions: {', '.join(sorted(other))}.")
    imported = Counter(source for source in map(imported_from, records) if source)
    if imported:
        lines.append("- Merged from earlier boards (`vbb report --merge`): "
                     + ", ".join(f"{n} cells from `{source}`" for source, n in sorted(imported.items()))
                     + " (numbers, n, scorers, plugin versions and commit; no per-image details "
                     "or artifacts).")
    lines += [f"- Scorers: {', '.join(f'`{s}`' for s in sorted(scorers)) or '(not recorded)'}.",
              f"- Report code: vlmbackdoor-bench {__version__}.",
              f"- Results as of {when} (the newest result file; the build time is not recorded, "
              "so rebuilds are byte-identical)." if when else
              "- No stored result file (merged cells keep no date; the build time is not "
              "recorded, so rebuilds are byte-identical)."]
    return lines


def _layout_markdown(table_set: TableSet, layout: PaperLayout) -> list[str]:
    facts = table_set.cells.facts
    cols = columns(table_set, layout)
    headers = ["Dataset", "Attack"] + [f"{c.group} {facts.label('metric', c.metric)}" for c in cols]
    rows = [list(r.labels) + [fmt(v) for v in r.values] for r in layout_rows(table_set, layout)]
    return [f"## {layout.title}", "", compact_grid(headers, rows), ""]


def readme(profile: str, records: Sequence[Mapping], table_set: TableSet,
           newest_mtime: float | None, declared: Sequence[CellCoordinates] | None = None,
           timings: Table | None = None, figures: Sequence[Figure] = ()) -> str:
    """The board's index in Markdown: Tables 1-3 (values; the paper's beside them are on the
    page), the per-stage timings, links to the page, figures and table files, failed cells, the
    declared cells without a result (when ``declared`` is given) and a provenance footer."""
    ok = sum(1 for r in records if r.get("status") == "ok")
    merged = sum(1 for r in records if imported_from(r))
    counts = f"{ok} ok, {len(records) - ok} failed"
    source = (f"{len(records)} stored cell results ({counts})" if not merged else
              f"{len(records)} cell results, {len(records) - merged} stored and {merged} merged "
              f"from earlier boards (Provenance names them); {counts}")
    lines = [f"# Leaderboards: profile `{profile}`", "",
             f"Rebuilt by `vbb report` from {source}; do not edit by hand. "
             f"**[The leaderboard page]({PAGE})**: these tables with the paper's values and Δ "
             "beside ours, sortable, and the figures. Every number: `results.csv`.", ""]
    if profile != PAPER_PROFILE and not table_set.paper_tables:
        lines += ["No paper tables were found, so no paper values are shown.", ""]
    for layout in paper_layouts(table_set):
        if layout.number == 3:  # its defenses are all columns of Table 2 (table2_defenses)
            shown = ", ".join(table_set.cells.facts.paper_label(3, d) for d in layout.groups)
            lines += [f"## {layout.title}", "",
                      f"Its columns ({shown}) are Table 2's defenses; in the paper's layout on "
                      f"[the page]({PAGE}#sec-table3) and in [table3.md](table3.md).", ""]
        else:
            lines += _layout_markdown(table_set, layout)
    lines += ["Triggered test inputs, values in %, ASR rule `asr_srd` (lower is better; higher for "
              "the others). " + REFERENCE_NOTE, ""]
    if any(r.marked for layout in paper_layouts(table_set) for r in layout_rows(table_set, layout)):
        lines += [LEGEND, ""]
    if timings is not None and timings.rows:
        lines += [f"## {timings.title}", "", compact_grid(timings.flat_headers(), timings.flat_rows()),
                  "", timings.footnotes[-1], ""]
    lines += ["## Files", ""]
    if figures:
        lines += ["Figures (SVG; PNG beside each): "
                  + ", ".join(f"[{f.name}]({f.path('svg')})" for f in figures) + ".", ""]
    lines += ["Tables as Markdown (CSV, LaTeX `.tex` and HTML beside each): "
              + ", ".join(f"[{t.key}]({t.key}.md)" for t in table_set.tables) + ".", ""]
    lines += _failed_section(records, table_set.cells.facts)
    lines += _coverage_section(records, declared, table_set.cells.facts)
    if table_set.paper_tables:
        lines += ["## Paper tables (for reference)", "",
                  f"Profile `{profile}` is not the paper's setup ({PAPER_PROFILE}); the paper's "
                  f"tables as printed ({PAPER_SOURCE}): "
                  + ", ".join(f"[{t.key}]({t.key}.md)" for t in table_set.paper_tables) + ".", ""]
    lines += _provenance_section(records, newest_mtime)
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- writing
def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(path, text)


def write_leaderboards(folder: Path, profile: str, records: Sequence[Mapping],
                       table_set: TableSet, newest_mtime: float | None,
                       declared: Sequence[CellCoordinates] | None = None) -> list[Path]:
    """Write every file of one profile into ``folder``; remove managed files not rebuilt (e.g.
    a table3 that no longer has data). Returns the paths written, in writing order."""
    written = [_write(folder / "results.csv", results_csv(long_form(records)))]
    for table in table_set.tables:
        written += [_write(folder / f"{table.key}.{ext}", RENDERERS[ext](table))
                    for ext in FORMATS]
    written += [_write(folder / f"{t.key}.md", markdown(t)) for t in table_set.paper_tables]
    facts = table_set.cells.facts
    figures, drawn = write_figures(folder, records, table_set.cells.poison_rate, facts)
    timings = timing_table(records)
    page_tables = [t for t in table_set.tables if t.key in PAGE_TABLES]
    page_tables += [timings, srd_table(records, facts)]
    written += drawn
    written.append(_write(folder / PAGE, page(profile, table_set, figures, page_tables,
                                              _summary(records))))
    written.append(_write(folder / "README.md",
                          readme(profile, records, table_set, newest_mtime, declared, timings, figures)))
    keep = set(written)
    for stem in MANAGED_STEMS:
        for ext in FORMATS:
            stale = folder / f"{stem}.{ext}"
            if stale not in keep and stale.is_file():
                stale.unlink()
    for stem in PAPER_STEMS:
        stale = folder / f"{stem}.md"
        if stale not in keep and stale.is_file():
            stale.unlink()
    for stale in sorted((folder / FIGURE_DIR).glob("*")):
        if stale not in keep and stale.is_file():
            stale.unlink()
    return written
