"""Attacks not implanted (methods/design.md §7.1): the 50 % rule on hand-built records, and its mark
in every table, the page and the README."""

from __future__ import annotations

import csv
import html
import re
from pathlib import Path

import pytest

from vlmbackdoor_bench.leaderboard import build_leaderboards
from vlmbackdoor_bench.leaderboard.facts import Facts
from vlmbackdoor_bench.leaderboard.headline import headline_markdown
from vlmbackdoor_bench.leaderboard.implant import (
    IMPLANT_THRESHOLD, LEGEND, MARK, implant_status, no_defense_asr, not_implanted,
)
from vlmbackdoor_bench.results_schema import NO_DEFENSE

PROFILE = "tiny"
#: no-defense headline ASR (asr_strict) per attack; blended's no-defense cell failed
NO_DEFENSE_ASR = {"badnet": 90.0, "trojvlm": 49.9, "vlood": 50.0, "blended": None}
DEFENSES = (NO_DEFENSE, "srd", "abl")


def record(dataset: str, attack: str, defense: str, asr: float | None = None, *,
           failed: bool = False, rate: float = 0.1) -> dict:
    """A schema-1 cell result (docs/CONTRACTS.md) with the given headline ASR (asr_strict)."""
    asr = 10.0 + DEFENSES.index(defense) if asr is None else asr
    metrics = {"triggered": {"bleu4": 5.0, "cider": 30.0, "sc": 40.0, "lf": 50.0, "sfs": 60.0,
                             "asr_srd": asr, "asr_strict": asr},
               "clean": {"bleu4": 20.0, "cider": 100.0 - DEFENSES.index(defense), "asr_strict": 0.5}}
    return {
        "schema": 1, "profile": PROFILE, "dataset": dataset, "dataset_source": f"embedded-{dataset}",
        "attack": attack, "attack_preset": "srd-code", "attack_version": "1.0.0",
        "defense": defense, "defense_preset": "default", "defense_version": "1.0.0",
        "poison_rate": rate, "seed": 0, "status": "failed" if failed else "ok",
        "error": "RuntimeError: boom | in backdoor" if failed else None,
        "metrics": {} if failed else metrics,
        "metric_details": {} if failed else {"triggered": {"n_images": 100, "asr_strict": {"n": 99}},
                                             "clean": {"n_images": 100}},
        "detection": None, "timings": {"poison": 1.0, "backdoor": 1.0, "defend": 1.0},
        "artifacts": {},
        "provenance": {"cell_key": f"k-{dataset}-{attack}-{defense}", "stage_keys": {},
                       "versions": {}, "git_commit": "abc1234", "seeds": {"data": 0},
                       "manifests": {}, "decoding": {}, "dtype": "float32"},
    }


def board_records() -> list[dict]:
    out = []
    for dataset in ("coco", "flickr30k"):
        for attack, before in NO_DEFENSE_ASR.items():
            out.append(record(dataset, attack, NO_DEFENSE, before, failed=before is None))
            out += [record(dataset, attack, d) for d in DEFENSES[1:]]
    return out


# ----------------------------------------------------------------------------- the rule
def test_threshold_is_fifty_percent_and_inclusive():
    facts = Facts()  # no plugin facts: headline rule strict for every attack
    records = [record("coco", "trojvlm", NO_DEFENSE, 49.9), record("coco", "vlood", NO_DEFENSE, 50.0),
               record("coco", "badnet", NO_DEFENSE, 100.0), record("coco", "trojvlm", "srd", 0.0)]
    assert IMPLANT_THRESHOLD == 50.0
    assert implant_status(records, facts) == {("trojvlm", "coco"): False, ("vlood", "coco"): True,
                                              ("badnet", "coco"): True}
    assert not_implanted(records, facts) == {("trojvlm", "coco")}


def test_failed_or_missing_no_defense_cell_is_unknown_not_marked():
    facts = Facts()
    records = [record("coco", "blended", NO_DEFENSE, failed=True),
               record("coco", "blended", "srd", 0.0),  # a defended cell alone decides nothing
               record("flickr30k", "trojvlm", "srd", 0.0)]
    assert implant_status(records, facts) == {}
    assert not_implanted(records, facts) == frozenset()


def test_headline_rule_of_the_attack_and_the_tables_poison_rate():
    facts = Facts()
    facts.by_kind["attack"]["shadowcast"] = {"headline_asr_rule": "concept"}
    shadow = record("coco", "shadowcast", NO_DEFENSE, 80.0)
    shadow["metrics"]["triggered"]["asr_concept"] = 20.0  # its headline rule, not asr_strict
    low_rate = record("coco", "badnet", NO_DEFENSE, 10.0, rate=0.01)
    records = [shadow, low_rate, record("coco", "badnet", NO_DEFENSE, 95.0)]
    assert no_defense_asr(records, facts, 0.1) == {("shadowcast", "coco"): 20.0, ("badnet", "coco"): 95.0}
    assert not_implanted(records, facts, 0.1) == {("shadowcast", "coco")}
    assert not_implanted(records, facts, 0.01) == {("badnet", "coco")}


# ----------------------------------------------------------------------------- the board
@pytest.fixture(scope="module")
def board(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("implant")
    (root / "paper").mkdir()  # no paper values
    build_leaderboards(root / "results", PROFILE, root / "out", paper_dir=root / "paper",
                       records=board_records())
    return root / "out" / PROFILE


def _attack_cells(path: Path, column: str = "Attack") -> list[str]:
    with path.open(newline="", encoding="utf-8") as handle:
        return [row[column] for row in csv.DictReader(handle)]


@pytest.mark.parametrize("stem", ["table1", "table2", "clean_inputs", "asr_headline", "defense_report"])
def test_tables_mark_the_attack_not_implanted(board: Path, stem: str):
    md = (board / f"{stem}.md").read_text(encoding="utf-8")
    rows = [line for line in md.splitlines() if line.startswith("|") and "TrojVLM" in line]
    backdoored = [line for line in rows if "Clean model" not in line]
    assert backdoored and all(f"TrojVLM {MARK}" in line for line in backdoored)
    assert f"VLOOD {MARK}" not in md and f"BadNet {MARK}" not in md  # 50.0 %, 90 %: implanted
    assert f"Blended {MARK}" not in md  # failed no-defense cell: unknown
    assert f"- {LEGEND}" in md
    with (board / f"{stem}.csv").open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert rows and all(MARK not in v for row in rows for v in row.values())  # a column instead
    implanted = {(r["Dataset"], r["Attack"]): r["implanted"] for r in rows
                 if not r["Attack"].startswith("Clean model")}
    assert {k: v for k, v in implanted.items() if k[1] == "TrojVLM"} == \
        {("COCO", "TrojVLM"): "false", ("Flickr30k", "TrojVLM"): "false"}
    assert implanted[("COCO", "VLOOD")] == implanted[("COCO", "BadNet")] == "true"
    assert implanted[("COCO", "Blended")] == ""
    tex = (board / f"{stem}.tex").read_text(encoding="utf-8")
    assert "TrojVLM \\ddag{}" in tex
    page = (board / f"{stem}.html").read_text(encoding="utf-8")
    assert re.search(r'<tr class="notimplanted"><td class="label">COCO</td><td class="label">TrojVLM ‡',
                     page)


def test_page_greys_marked_rows_and_keeps_them_out_of_the_ranking(board: Path):
    page = (board / "index.html").read_text(encoding="utf-8")
    assert "tr.notimplanted td{" in page
    for key in ("table1", "table2", "asr_headline", "defense_report"):
        table = re.search(rf'<table class="sortable" id="{key}">(.*?)</table>', page, re.S).group(1)
        bodies = re.findall(r"<tbody( class=\"[a-z]+\")?>(.*?)</tbody>", table, re.S)
        ranked = bodies[0][1]  # the body the sort script reorders
        assert bodies[0][0] == "" and "TrojVLM" not in ranked and "VLOOD" in ranked
        unranked = dict(bodies)[' class="notimplanted"']
        assert unranked.count('<tr class="notimplanted">') == unranked.count("<tr") >= 2
        assert f"TrojVLM {MARK}" in unranked
    assert html.escape(LEGEND) in page


def test_readmes_and_figures_carry_the_mark(board: Path):
    readme = (board / "README.md").read_text(encoding="utf-8")
    assert f"| COCO | TrojVLM {MARK} |" in readme and LEGEND in readme
    assert readme.count(LEGEND) == 1
    records = board_records()
    headline = headline_markdown(records, 0.1)
    assert f"| TrojVLM {MARK} |" in headline and f"| VLOOD |" in headline
    from vlmbackdoor_bench.leaderboard.figures import BoardMeans, tradeoff
    means = BoardMeans(records, 0.1, Facts.of(records))
    assert means.not_implanted == {("trojvlm", "coco"), ("trojvlm", "flickr30k")}
    assert means.attack_label("trojvlm") == f"TrojVLM {MARK}"
    fig = tradeoff(means)
    texts = [t.get_text() for t in fig.texts]
    assert any(t.startswith(f"{MARK} left out") and "TrojVLM" in t for t in texts)
    points = sum(len(c.get_offsets()) for ax in fig.axes for c in ax.collections)
    assert points == 2 * 2 * 2  # datasets x defenses x BadNet, VLOOD (Blended: no no-defense C)


def test_committed_readme_headline_carries_the_legend():
    """The project README quotes headline_markdown (tests/test_leaderboard_page.py); where that
    table marks an attack, the legend follows it."""
    repo = Path(__file__).resolve().parents[1]
    readme = (repo / "README.md").read_text(encoding="utf-8")
    table = readme[readme.index("| Attack | No Defense |"):]
    table = table[:table.index("\n\n")]
    if MARK in table:
        assert LEGEND in readme[readme.index("| Attack | No Defense |"):]
