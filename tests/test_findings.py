"""Every number in docs/findings/ matches the committed board, leaderboards/tiny/results.csv.

A findings page writes each number followed by a marker naming its row of results.csv,
``72.1<!--r:coco/shadowcast/none/triggered/asr_concept-->`` (dataset/attack/defense/split/metric),
with ``:field`` when the number is another column of that row (``:n``, ``:seed``, ``:poison_rate``).
The number must equal the row's value rounded to the decimals written. Any other number in a page's
prose is an error: method constants go in code spans (`α = 0.1`), and "Table 2" or a section mark
name documents, not results. When the board is regenerated, this test names every stale number.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FINDINGS = REPO / "docs" / "findings"
BOARD = REPO / "leaderboards" / "tiny" / "results.csv"
PAGES = ("attacks", "baselines", "srd", "robustit", "reproducibility")
KEY = ("dataset", "attack", "defense", "split", "metric")

NUMBER = r"(?P<num>[−-]?\d[\d,]*(?:\.\d+)?)"
MARKED = re.compile(NUMBER + r"<!--r:(?P<key>[^:>\s]+)(?::(?P<field>[a-z_]+))?-->")
# Text that may hold digits without being a result: code spans, link targets, HTML comments and
# anchors, section marks, and names of the paper's tables and figures.
EXEMPT = re.compile(r"`[^`]*`|\]\([^)]*\)|<!--.*?-->|<a id=\"[^\"]*\"></a>|\u00a7\s?[A-Z]?\d+(?:\.\d+)*"
                    r"|\b(?:Tables?|Figures?|Fig\.)\s\d+(?:[–-]\d+)?[a-d]?", re.S)
DIGIT = re.compile(r"\d")


def load_board(path: Path = BOARD) -> dict[tuple[str, ...], dict[str, str]]:
    with path.open(newline="") as f:
        return {tuple(row[k] for k in KEY): row for row in csv.DictReader(f)}


def decimals(text: str) -> int:
    return len(text.split(".")[1]) if "." in text else 0


def check_page(text: str, board: dict[tuple[str, ...], dict[str, str]], name: str = "page") -> tuple[int, list[str]]:
    """(numbers checked, problems) of one findings page against ``board``."""
    problems, checked = [], 0
    for m in MARKED.finditer(text):
        key, field = tuple(m.group("key").split("/")), m.group("field") or "value"
        row = board.get(key)
        if len(key) != len(KEY) or row is None:
            problems.append(f"{name}: {m.group(0)} names no row of the board")
            continue
        if row.get("status", "ok") != "ok" or row.get(field) in (None, ""):
            problems.append(f"{name}: {m.group(0)}: the row has no {field} (status {row.get('status')})")
            continue
        written = m.group("num")
        value = float(written.replace(",", "").replace("−", "-"))
        tolerance = 0.5 * 10 ** -decimals(written) + 1e-9
        if abs(value - float(row[field])) > tolerance:
            problems.append(f"{name}: {written} for {'/'.join(key)} {field}, the board has {float(row[field]):.6g}")
        checked += 1
    prose = EXEMPT.sub(" ", MARKED.sub(" ", text))
    for line in prose.splitlines():
        if DIGIT.search(line):
            problems.append(f"{name}: a number without a board marker in: {line.strip()[:120]!r}")
    return checked, problems


BOARD_ROWS = load_board()


def test_the_checker_catches_stale_and_unmarked_numbers():
    board = {("coco", "badnet", "none", "triggered", "asr_strict"):
             {"value": "99.89909182643794", "n": "991", "status": "ok"}}
    key = "coco/badnet/none/triggered/asr_strict"
    assert check_page(f"ASR 99.9<!--r:{key}--> on 991<!--r:{key}:n--> images.", board) == (2, [])
    assert check_page(f"ASR 99.90<!--r:{key}-->", board)[0] == 1  # two decimals written: 99.899 -> 99.90
    _, problems = check_page(f"ASR 99.8<!--r:{key}-->, 98<!--r:{key}-->", board)
    assert len(problems) == 2 and "the board has 99.899" in problems[0]
    _, problems = check_page("ASR fell by 12 points, see Table 2, `α = 0.1` and \u00a74.", board)
    assert len(problems) == 1 and "without a board marker" in problems[0]
    _, problems = check_page("1.0<!--r:coco/badnet/srd/triggered/asr_strict-->", board)
    assert "names no row" in problems[0]


def test_the_topic_pages_exist_and_the_narrative_page_is_gone():
    names = {p.stem for p in FINDINGS.glob("*.md")}
    assert set(PAGES) <= names and "tiny-board" not in names


def test_every_number_in_the_findings_matches_the_board():
    total, problems = 0, []
    for path in sorted(FINDINGS.glob("*.md")):
        page = path.stem
        checked, found = check_page(path.read_text(encoding="utf-8"), BOARD_ROWS, page)
        assert checked >= 10, f"docs/findings/{page}.md states fewer than 10 board numbers"
        total += checked
        problems += found
    assert not problems, f"{len(problems)} of {total} findings numbers are stale or unmarked:\n" + "\n".join(problems[:60])
