"""Every section citation in the repository resolves to a page and anchor of docs/methods/.

Code and docs cite the methods as ``methods/<page>.md §<id>`` (``methods/`` = ``docs/methods/``);
a ``§<id>`` with no page in front of it belongs to the nearest page named before it on its line,
else to the last page named on the line above (a wrapped sentence), and inside a methods page to
that page. Each section of a methods page carries ``<a id="<id>"></a>``. The spec files the code once
cited live outside the repository, so any remaining reference to them is a dangling citation.
Only reads files: no package import, no computation beyond regular expressions.
"""

from __future__ import annotations

import os
import re
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
METHODS = REPO / "docs" / "methods"
SECTION_SIGN = "\u00a7"
TEXT_SUFFIXES = {".py", ".md", ".toml", ".txt", ".sh", ".cfg", ".ini", ".yml", ".yaml", ".tex", ".html", ".csv",
                 ".json", ".pyi"}
TEXT_NAMES = {"Makefile", "run"}
SKIP_DIRS = {".git", ".venv", "__pycache__", "node_modules", ".pytest_cache", ".vbb-cache", "build", "dist",
             ".mypy_cache", ".ruff_cache"}
MAX_BYTES = 4_000_000

# A section mark: the sign itself, or LaTeX's \S{} in generated .tex tables.
SECTION = re.compile("(?:" + SECTION_SIGN + r"|\\S\{\})\s?(?P<id>[A-Z]?\d+(?:\.\d+)*)")
PAGE = re.compile(r"(?<![\w/])(?:docs/)?methods/(?P<page>[a-z_]+)\.md")
# The out-of-repo sources (assembled so this file does not match itself).
DANGLING = re.compile(r"(?<![\w./-])(?:spec/[a-z_]+\.md|" + "DESIGN" + r"\.md|robustit\.md)")
ANCHOR = re.compile(r'<a id="([^"]+)"></a>')
LINK = re.compile(r"\]\((?P<target>[^)\s#]*(?:methods|findings)/[^)\s#]+\.md|[a-z_]+\.md)(?:#(?P<anchor>[^)\s]+))?\)")


def text_files() -> list[tuple[str, str]]:
    """(repo-relative path, text) of every text file outside build and VCS directories."""
    out = []
    for root, dirs, files in os.walk(REPO):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info")
                         and not (d.startswith(".") and d != ".ci"))
        for name in sorted(files):
            path = Path(root) / name
            if (path.suffix in TEXT_SUFFIXES or name in TEXT_NAMES) and path.stat().st_size <= MAX_BYTES:
                try:
                    out.append((path.relative_to(REPO).as_posix(), path.read_text(encoding="utf-8")))
                except UnicodeDecodeError:
                    continue
    return out


FILES = text_files()


def methods_anchors() -> dict[str, list[str]]:
    return {p.stem: ANCHOR.findall(p.read_text(encoding="utf-8")) for p in sorted(METHODS.glob("*.md"))}


ANCHORS = methods_anchors()


def unresolved_citations(rel: str, text: str, anchors: dict[str, list[str]]) -> list[str]:
    """``file:line: problem`` for every citation in ``text`` that does not resolve."""
    own_page = Path(rel).stem if rel.startswith("docs/methods/") else None
    problems = []
    above = None  # last page named on the previous line
    for number, line in enumerate(text.split("\n"), 1):
        for m in DANGLING.finditer(line):
            problems.append(f"{rel}:{number}: cites {m.group(0)}, which is not in this repository")
        pages = [(m.start(), m.group("page")) for m in PAGE.finditer(line)]
        for start, page in pages:
            if page not in anchors:
                problems.append(f"{rel}:{number}: methods/{page}.md does not exist")
        for m in SECTION.finditer(line):
            before = [page for start, page in pages if start < m.start()]
            page = before[-1] if before else above or own_page
            if page is None:
                problems.append(f"{rel}:{number}: {m.group(0)!r} names no methods page")
            elif page in anchors and m.group("id") not in anchors[page]:
                problems.append(f"{rel}:{number}: methods/{page}.md has no section {m.group('id')}")
        above = pages[-1][1] if pages else None
    return problems


def broken_links(rel: str, text: str, anchors: dict[str, list[str]]) -> list[str]:
    """Markdown links to methods or findings pages (and their anchors) that do not resolve."""
    if not rel.endswith(".md"):
        return []
    problems = []
    for m in LINK.finditer(text):
        target = (REPO / rel).parent / m.group("target")
        if not target.exists():
            if "/" in m.group("target") or rel.startswith(("docs/methods/", "docs/findings/")):
                problems.append(f"{rel}: link to {m.group('target')} that does not exist")
            continue
        resolved = target.resolve()
        if m.group("anchor") and resolved.parent == METHODS.resolve() and m.group("anchor") not in anchors.get(
                resolved.stem, []):
            problems.append(f"{rel}: link to {m.group('target')}#{m.group('anchor')}, no such anchor")
    return problems


def test_the_methods_pages_exist_with_unique_anchors():
    assert {"victim", "attacks", "defenses", "srd", "metrics", "design"} <= set(ANCHORS)
    for page, ids in ANCHORS.items():
        assert ids, f"docs/methods/{page}.md has no section anchors"
        assert len(ids) == len(set(ids)), f"docs/methods/{page}.md repeats an anchor"


def test_the_pages_hold_the_sections_the_code_cites_most():
    for page, ids in {"victim": ["A1", "A2", "A3", "A4", "B1", "T"], "srd": ["3", "4.1", "4.2", "5", "8"],
                      "metrics": ["2", "4.2", "4.3", "5.1"], "design": ["1", "6"], "defenses": ["2", "R2", "R7.6"],
                      "attacks": ["1", "5", "7"]}.items():
        assert set(ids) <= set(ANCHORS[page]), (page, sorted(set(ids) - set(ANCHORS[page])))


def test_the_resolver_accepts_good_citations_and_rejects_bad_ones():
    anchors = {"victim": ["A3", "A4"], "metrics": ["2", "4.3"]}
    good = ("x = 1  # methods/victim.md " + SECTION_SIGN + "A3, " + SECTION_SIGN + "A4\n"
            "# wrapped (methods/metrics.md\n#  " + SECTION_SIGN + "4.3)\n"
            "t = 'methods/metrics.md \\S{}2'\n")
    assert unresolved_citations("a.py", good, anchors) == []
    bad = ("# " + SECTION_SIGN + "A3 alone\n"
           "# methods/metrics.md " + SECTION_SIGN + "9\n"
           "# spec" "/victim.md " + SECTION_SIGN + "A3\n"
           "# meth" "ods/nothing.md\n")
    problems = unresolved_citations("a.py", bad, anchors)
    assert [p.split(":")[1] for p in problems] == ["1", "2", "3", "3", "4"], problems
    # inside a methods page a bare section cites that page
    assert unresolved_citations("docs/methods/metrics.md", SECTION_SIGN + "4.3", anchors) == []


def test_every_citation_in_the_repository_resolves():
    problems = [p for rel, text in FILES for p in unresolved_citations(rel, text, ANCHORS) + broken_links(rel, text, ANCHORS)]
    assert not problems, f"{len(problems)} unresolved citations or links:\n" + "\n".join(problems[:60])
