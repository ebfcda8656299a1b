"""The leaderboard's web page, ``leaderboards/<profile>/index.html``: one file that needs no
network to view (inline CSS and JS, figures as relative files in ``figures/``).

Tables 1-3 in the paper's layout with the paper's value and the difference beside each of ours
where the paper prints one, the clean reference model as one row per dataset, sortable columns,
the figures (:mod:`.figures`), the defense report, the headline ASR, the per-stage timing table and
SRD's RL diagnostics (:mod:`.stage_tables`). A pure function of the records, like every other file
of the board: no clock, sorted rows.
"""

from __future__ import annotations

import html
import re
from typing import Sequence

from .figures import Figure
from .implant import CSS_CLASS as UNRANKED, LEGEND
from .paper_layout import REFERENCE_NOTE, PaperLayout, columns, layout_rows, paper_layouts
from .results import PAPER_PROFILE
from .table_model import MISSING, Table, fmt
from .tables import PAPER_SOURCE, PaperCell, TableSet, header

_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px auto;max-width:1500px;
padding:0 16px;color:#222;line-height:1.4}
h1{font-size:1.6em;margin-bottom:4px}h2{margin-top:36px;border-bottom:1px solid #ddd;padding-bottom:4px}
nav a{margin-right:12px}.note{color:#555;font-size:13px;max-width:1100px}
.wrap{overflow-x:auto}
table{border-collapse:collapse;font-size:13px;margin:8px 0}
th,td{border:1px solid #d0d0d0;padding:3px 7px;vertical-align:top}
th{background:#f3f5f8;position:sticky;top:0}th.sort{cursor:pointer;user-select:none}
th.sort:hover{background:#e3e9f2}th[data-dir=asc]::after{content:" ▲"}th[data-dir=desc]::after{content:" ▼"}
td{text-align:right;white-space:nowrap}td.label{text-align:left}
tbody.ref td{background:#fbf7e9;font-style:italic}
td .paper{display:block;font-size:11px;color:#777}td .up{color:#1a7f37}td .down{color:#b42318}
th.notpaper{background:#eef0f3;color:#555}
figure{margin:16px 0 28px}figure img{max-width:100%;border:1px solid #e2e2e2}
tr.notimplanted td{color:#999;background:#f2f2f2}tr.notimplanted td .paper{color:#aaa}
figcaption{font-size:13px;color:#555;max-width:1100px}img.broken{min-height:40px;outline:2px solid #b42318}
"""

# Click a sortable header: sort the first body's rows by that column (numbers by data-v, missing
# last); rows of attacks not implanted (greyed, implant.py) and reference rows live in later bodies
# and stay put, so they never take a rank. A figure that does not load is marked.
_SCRIPT = """
document.querySelectorAll("table.sortable").forEach(function(table){
  table.querySelectorAll("th.sort").forEach(function(th){
    th.addEventListener("click", function(){
      var col = +th.dataset.col, dir = th.dataset.dir === "asc" ? "desc" : "asc";
      table.querySelectorAll("th.sort").forEach(function(o){ delete o.dataset.dir; });
      th.dataset.dir = dir;
      var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
      var key = function(r){ var c = r.cells[col]; if (!c) return null;
        if (c.dataset.v !== undefined) return parseFloat(c.dataset.v);
        return c.classList.contains("label") ? c.textContent : null; };
      rows.sort(function(a, b){
        var x = key(a), y = key(b);
        if (x === null || y === null) return (x === null) - (y === null);
        var s = typeof x === "number" ? x - y : String(x).localeCompare(String(y));
        return dir === "asc" ? s : -s; });
      rows.forEach(function(r){ body.appendChild(r); });
    });
  });
});
window.addEventListener("load", function(){
  var loaded = 0;
  document.querySelectorAll("figure img").forEach(function(img){
    if (img.naturalWidth > 0) { loaded += 1; } else { img.classList.add("broken"); }
  });
  document.body.dataset.figuresLoaded = loaded;
});
"""

_e = html.escape
_NUMBER = re.compile(r"^-?\d+(\.\d+)?")


def _value_cell(ours: float | None, paper: PaperCell | None) -> str:
    """ours, then (where the paper prints the cell) the paper's value and ours minus it."""
    attrs = "" if ours is None else f' data-v="{ours:.6g}"'
    inner = _e(fmt(ours))
    if paper is not None:
        title = f' title="{_e(paper.note)}"' if paper.note else ""
        if paper.value is None:
            inner += f'<span class="paper"{title}>{MISSING}</span>'
        else:
            delta = "" if ours is None else f" · {ours - paper.value:+.1f}"
            inner += f'<span class="paper"{title}>{_e(paper.text)}{delta}</span>'
    return f"<td{attrs}>{inner}</td>"


def _label_cells(labels: Sequence[str]) -> str:
    return "".join(f'<td class="label">{_e(x)}</td>' for x in labels)


def paper_layout_table(table_set: TableSet, layout: PaperLayout) -> str:
    """One of Tables 1-3 as a sortable HTML table (reference rows in a second body, unsorted)."""
    facts = table_set.cells.facts
    cols = columns(table_set, layout)
    out = [f'<table class="sortable" id="{layout.key}">', "<thead><tr>",
           '<th rowspan="2" class="sort" data-col="0">Dataset</th>',
           '<th rowspan="2" class="sort" data-col="1">Attack</th>']
    for group in dict.fromkeys((c.defense, c.group, c.outside_paper) for c in cols):
        _key, label, outside = group
        width = sum(1 for c in cols if c.defense == _key)
        out.append(f'<th colspan="{width}"'
                   + (' class="notpaper" title="not in the SRD paper: no paper values"' if outside else "")
                   + f">{_e(label)}{' †' if outside else ''}</th>")
    out.append("</tr><tr>")
    out += [f'<th class="sort" data-col="{2 + i}">{_e(header(facts, c.metric))}</th>'
            for i, c in enumerate(cols)]
    out += ["</tr></thead>", "<tbody>"]
    rows = layout_rows(table_set, layout)
    bodies = (("", [r for r in rows if not r.reference and not r.marked]),
              (UNRANKED, [r for r in rows if r.marked]),
              ("ref", [r for r in rows if r.reference]))
    for kind, chosen in bodies:
        if kind and chosen:
            out.append(f'<tbody class="{kind}">')
        for row in chosen:
            marked = f' class="{UNRANKED}"' if row.marked else ""
            out.append(f"<tr{marked}>" + _label_cells(row.labels)
                       + "".join(_value_cell(v, p) for v, p in zip(row.values, row.paper)) + "</tr>")
        if chosen or not kind:
            out.append("</tbody>")
    out.append("</table>")
    return "\n".join(out)


def _number_of(text: str) -> str:
    match = _NUMBER.match(text.strip())
    return f' data-v="{match.group(0)}"' if match else ""


def generic_table(table: Table) -> str:
    """Any :class:`Table` (already text) as a sortable HTML table; numbers sort as numbers."""
    n_index = len(table.index)
    out = [f'<table class="sortable" id="{_e(table.key)}">', "<thead>"]
    grouped = any(g.label for g in table.groups)
    if grouped:
        out.append("<tr>" + "".join(f'<th rowspan="2" class="sort" data-col="{i}">{_e(n)}</th>'
                                    for i, n in enumerate(table.index))
                   + "".join(f'<th colspan="{len(g.columns)}">{_e(g.label)}</th>' for g in table.groups)
                   + "</tr>")
    heads = [] if grouped else list(table.index)
    heads += [c for g in table.groups for c in g.columns]
    first = n_index if grouped else 0
    out.append("<tr>" + "".join(f'<th class="sort" data-col="{first + i}">{_e(h)}</th>'
                                for i, h in enumerate(heads)) + "</tr>")
    out += ["</thead>", "<tbody>"]
    marked = [i for i in range(len(table.rows)) if table.marked(i)]
    for i in [i for i in range(len(table.rows)) if not table.marked(i)] + marked:
        if marked and i == marked[0]:
            out += ["</tbody>", f'<tbody class="{UNRANKED}">']
        out.append((f'<tr class="{UNRANKED}">' if table.marked(i) else "<tr>")
                   + _label_cells(table.row_labels(i))
                   + "".join(f"<td{_number_of(t)}>{_e(t)}</td>" for t in table.rows[i][1]) + "</tr>")
    out += ["</tbody>", "</table>"]
    return "\n".join(out)


def _notes(lines: Sequence[str]) -> str:
    return "".join(f'<p class="note">{_e(line)}</p>' for line in lines)


def _section(anchor: str, title: str, body: str) -> list[str]:
    return [f'<h2 id="sec-{anchor}">{_e(title)}</h2>', body]


def page(profile: str, table_set: TableSet, figures: Sequence[Figure], extra: Sequence[Table],
         summary: str) -> str:
    """The whole page. ``extra``: the defense report, headline ASR, timing and SRD diagnostics
    tables (one without rows is shown as "not recorded"); ``summary``: one line on the results."""
    comparable = profile == PAPER_PROFILE
    paper_note = (f"Under each of our values, in grey: the {PAPER_SOURCE} value · Δ = ours − paper, "
                  "where the paper prints one (hover for its notes; † marks a defense the paper does "
                  "not have). ")
    if not comparable:
        paper_note += (f"Profile `{profile}` is not the paper's setup ({PAPER_PROFILE}): the paper's "
                       "values are shown for orientation, the differences are not a reproduction gap.")
    if not table_set.paper:
        paper_note = "No paper tables were found, so no paper values are shown."
    layouts = paper_layouts(table_set)
    by_key = {t.key: t for t in table_set.tables}
    nav = [(layout.key, f"Table {layout.number}") for layout in layouts] + [("figures", "Figures")]
    nav += [(t.key, t.title.split(":")[0].split("(")[0].strip()) for t in extra]
    body = [f"<h1>Leaderboard: profile <code>{_e(profile)}</code></h1>",
            f'<p class="note">{_e(summary)} Every number and figure is rebuilt by <code>vbb report</code> '
            'from <a href="results.csv">results.csv</a>; tables as Markdown, CSV, LaTeX and HTML are '
            'listed in <a href="README.md">README.md</a>.</p>',
            "<nav>" + "".join(f'<a href="#sec-{k}">{_e(text)}</a>' for k, text in nav) + "</nav>",
            f'<p class="note">{_e(paper_note)}</p>']
    for layout in layouts:
        notes = [n for n in by_key[layout.key].footnotes if not n.startswith(("Clean model:", "Cells read"))]
        if any(r.marked for r in layout_rows(table_set, layout)) and LEGEND not in notes:
            notes.append(LEGEND)
        body += _section(layout.key, layout.title,
                         f'<div class="wrap">{paper_layout_table(table_set, layout)}</div>'
                         + _notes(notes + ([REFERENCE_NOTE] if layout.reference_row else [])))
    body.append('<h2 id="sec-figures">Figures</h2>')
    for figure in figures:
        body.append(f'<figure id="fig-{figure.name}"><figcaption><b>{_e(figure.title)}.</b> '
                    f"{_e(figure.caption)} (<a href=\"{figure.path('png')}\">PNG</a>, "
                    f"<a href=\"{figure.path('svg')}\">SVG</a>)</figcaption>"
                    f'<img src="{figure.path("svg")}" alt="{_e(figure.title)}"></figure>')
    for table in extra:
        content = (f'<div class="wrap">{generic_table(table)}</div>' if table.rows
                   else f'<p class="note">Not recorded in these results.</p>')
        body += _section(table.key, table.title, content + _notes(table.footnotes))
    return "\n".join(["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
                      '<meta name="viewport" content="width=device-width, initial-scale=1">',
                      f"<title>vlmbackdoor-bench leaderboard: {_e(profile)}</title>",
                      f"<style>{_STYLE}</style>", "</head>", "<body>", *body,
                      f"<script>{_SCRIPT}</script>", "</body>", "</html>"]) + "\n"
