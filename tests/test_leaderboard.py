"""Leaderboard tables and the regression gate, on synthetic cell records (docs/CONTRACTS.md)."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
from pathlib import Path

import pytest

from vlmbackdoor_bench.errors import VbbError
from vlmbackdoor_bench.leaderboard import (
    LONG_FORM_COLUMNS, ResultFileWarning, build_leaderboards, check, check_against_baseline,
    load_paper_tables, load_results, long_form, make_baseline, tolerance_for, write_baseline,
)
from vlmbackdoor_bench.leaderboard.check import DEFAULT_TOLERANCES

PROFILE = "tiny"
DATASETS = ("coco", "flickr30k")
ATTACKS = ("badnet", "shadowcast")
DEFENSES = ("none", "srd", "abl")
FAILED = ("flickr30k", "shadowcast", "abl")  # the one failed cell
TRIGGERED = ("bleu4", "cider", "sc", "lf", "sfs", "asr_srd")
CLEAN = ("bleu4", "cider", "asr_strict")
FIXED_MTIME = 1_750_000_000  # 2025-06-15 15:06:40 UTC
SHARED_PAPER = Path(__file__).resolve().parents[1].parent / "shared" / "paper_tables"


def value(dataset: str, attack: str, defense: str, split: str, metric: str) -> float:
    """A distinct, deterministic number per cell and metric (x.04 or x.54, so rounding is clear)."""
    d = DATASETS.index(dataset)
    a = ATTACKS.index(attack)
    k = (DEFENSES + ("clean-model", "random_mask", "srd_ppo")).index(defense)
    m = (TRIGGERED + ("asr_strict", "asr_concept")).index(metric)
    return 1.04 + 40 * d + 12 * a + 3 * k + 0.5 * m + (20 if split == "clean" else 0)


def record(dataset: str, attack: str, defense: str, *, profile: str = PROFILE,
           seed: int = 0) -> dict:
    """A cell result following docs/CONTRACTS.md, schema 1."""
    failed = (dataset, attack, defense) == FAILED
    headline = "asr_concept" if attack == "shadowcast" else "asr_strict"
    metrics = {
        "triggered": {m: value(dataset, attack, defense, "triggered", m)
                      for m in TRIGGERED + (headline,)},
        "clean": {m: value(dataset, attack, defense, "clean", m) for m in CLEAN},
    }
    n_images = 1000 if dataset == "coco" else 500
    return {
        "schema": 1, "profile": profile, "dataset": dataset,
        "dataset_source": f"embedded-{dataset}",
        "attack": attack, "attack_preset": "srd-code", "attack_version": "1.0.0",
        "defense": defense, "defense_preset": "default", "defense_version": "1.2.0",
        "poison_rate": 0.0 if defense == "clean-model" else 0.1, "seed": seed,
        "status": "failed" if failed else "ok",
        "error": "RuntimeError: CUDA out of memory | in defend" if failed else None,
        "metrics": {} if failed else metrics,
        "metric_details": {} if failed else {
            "triggered": {"n_images": n_images,
                          headline: {"n": n_images - 10, "excluded": 10},
                          "sfs": {"scorer": "sfs[minilm-l6-v2, smollm2-135m-q4_1]", "n_empty": 0}},
            "clean": {"n_images": n_images, "asr_strict": {"n": n_images - 10, "excluded": 10}},
        },
        "detection": None,
        "timings": {"poison": 1.0, "backdoor": 2.0, "defend": 0.5, "captions": 1.0, "scores": 1.0},
        "artifacts": {},
        "provenance": {"cell_key": f"key-{dataset}-{attack}-{defense}-{seed}", "stage_keys": {},
                       "versions": {"scorer": "sfs-1"}, "git_commit": "abc1234",
                       "seeds": {"data": seed}, "manifests": {}, "decoding": {},
                       "dtype": "float32"},
    }


def all_records(profile: str = PROFILE) -> list[dict]:
    return [record(d, a, k, profile=profile) for d in DATASETS for a in ATTACKS
            for k in DEFENSES + ("clean-model",)]


def write_results(root: Path, records: list[dict], profile: str = PROFILE) -> Path:
    folder = root / profile
    folder.mkdir(parents=True, exist_ok=True)
    for r in records:
        path = folder / f"{r['dataset']}-{r['attack']}-{r['defense']}-s{r['seed']}.json"
        path.write_text(json.dumps(r, indent=1))
        os.utime(path, (FIXED_MTIME, FIXED_MTIME))
    return root


@pytest.fixture
def results(tmp_path: Path) -> Path:
    return write_results(tmp_path / "results", all_records())


def read_csv(path: Path) -> dict[tuple[str, str], dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as handle:
        return {(row["Dataset"], row["Attack"]): row for row in csv.DictReader(handle)}


# ----------------------------------------------------------------------------- long form
def test_long_form_rows_and_columns(results: Path) -> None:
    records = load_results(results, PROFILE)
    assert len(records) == 2 * 2 * 4
    frame = long_form(records)
    assert list(frame.columns) == list(LONG_FORM_COLUMNS)
    ok = frame[frame["status"] == "ok"]
    # each ok cell: its metrics, the defend stage's seconds (split "defense"), the other stages'
    # (split "timing": poison, backdoor, captions, scores)
    assert len(ok) == 15 * (len(TRIGGERED) + 1 + len(CLEAN) + 1 + 4)
    seconds = ok[ok["split"] == "defense"]
    assert set(seconds["metric"]) == {"seconds"} and set(seconds["value"]) == {0.5}
    timing = ok[ok["split"] == "timing"]
    assert set(timing["metric"]) == {"poison", "backdoor", "captions", "scores"}
    failed = frame[frame["status"] == "failed"]
    assert len(failed) == 1
    row = failed.iloc[0]
    assert (row["dataset"], row["attack"], row["defense"]) == FAILED
    assert "out of memory" in row["error"]
    cider = ok[(ok["dataset"] == "coco") & (ok["attack"] == "badnet") & (ok["defense"] == "abl")
               & (ok["split"] == "triggered") & (ok["metric"] == "cider")]
    assert cider["value"].tolist() == [value("coco", "badnet", "abl", "triggered", "cider")]
    assert cider["n"].tolist() == [1000]
    strict = ok[(ok["dataset"] == "coco") & (ok["attack"] == "badnet") & (ok["defense"] == "abl")
                & (ok["split"] == "triggered") & (ok["metric"] == "asr_strict")]
    assert strict["n"].tolist() == [990]
    lf = ok[(ok["metric"] == "lf")].iloc[0]
    assert lf["scorer"] == "sfs[minilm-l6-v2, smollm2-135m-q4_1]"
    assert lf["git_commit"] == "abc1234" and lf["profile"] == PROFILE
    assert frame.iloc[0]["dataset"] == "coco" and frame.iloc[0]["attack"] == "badnet"
    assert frame.iloc[0]["defense"] == "none"


def test_unreadable_file_is_skipped_with_warning(results: Path) -> None:
    (results / PROFILE / "broken.json").write_text("{not json")
    (results / PROFILE / "other.json").write_text(json.dumps({"schema": 99}))
    with pytest.warns(ResultFileWarning) as caught:
        records = load_results(results, PROFILE)
    assert len(records) == 16
    messages = " ".join(str(w.message) for w in caught)
    assert "broken.json" in messages and "other.json" in messages


def test_missing_profile_dir_is_vbb_error(tmp_path: Path) -> None:
    with pytest.raises(VbbError, match="no results"):
        load_results(tmp_path, "nope")


# ----------------------------------------------------------------------------- tables
def test_files_written(results: Path, tmp_path: Path) -> None:
    written = build_leaderboards(results, PROFILE, tmp_path / "lb", paper_dir=tmp_path / "none")
    folder = tmp_path / "lb" / PROFILE
    expected = ["README.md", "results.csv"] + [
        f"{stem}.{ext}"
        for stem in ("table1", "table2", "table3", "clean_inputs", "asr_headline", "defense_report")
        for ext in ("md", "csv", "tex", "html")] + ["index.html"]
    figures = [p for p in written if p.parent == folder / "figures"]  # tests/test_leaderboard_page.py
    assert sorted(p.name for p in written if p not in figures) == sorted(expected)  # no paper tables
    assert all(p.parent == folder for p in written if p not in figures) and figures


def test_table2_pivots_values(results: Path, tmp_path: Path) -> None:
    build_leaderboards(results, PROFILE, tmp_path / "lb", paper_dir=tmp_path / "none")
    table = read_csv(tmp_path / "lb" / PROFILE / "table2.csv")
    header = list(next(iter(table.values())).keys())
    assert header[:5] == ["Dataset", "Attack", "No Defense / C ↑", "No Defense / SFS ↑",
                          "No Defense / ASR ↓"]
    # RobustIT and its ablations are Table 2 columns (not in the SRD paper) even where they have no results
    assert [h.split(" / ")[0] for h in header[2:-1:3]] == [
        "No Defense", "ABL", "VDC", "CT", "SRD", "RobustIT (not in SRD paper)",
        "RobustIT IDR only (not in SRD paper)", "RobustIT AAR only (not in SRD paper)"]
    assert header[-1] == "implanted"  # leaderboard/implant.py: true / false / empty (unknown)
    row = table[("COCO", "BadNet")]
    assert row["ABL / C ↑"] == f"{value('coco', 'badnet', 'abl', 'triggered', 'cider'):.1f}"
    assert row["SRD / ASR ↓"] == f"{value('coco', 'badnet', 'srd', 'triggered', 'asr_srd'):.1f}"
    row = table[("Flickr30k", "Shadowcast")]
    assert row["No Defense / SFS ↑"] == "55.0"  # 1.04 + 40 + 12 + 0 + 2.0, one decimal
    want = value("flickr30k", "shadowcast", "srd", "triggered", "sfs")
    assert row["SRD / SFS ↑"] == f"{want:.1f}"
    # missing: the failed cell and a defense never run
    assert row["ABL / C ↑"] == "–" and row["ABL / ASR ↓"] == "–"
    assert all(r["VDC / C ↑"] == "–" for r in table.values())
    assert list(table) == [(d, a) for d in ("COCO", "Flickr30k")
                           for a in ("BadNet", "Shadowcast", "Clean model: BadNet",
                                     "Clean model: Shadowcast")]


def test_several_seeds_print_mean_and_spread(tmp_path: Path) -> None:
    second = record("coco", "badnet", "srd", seed=1)
    second["metrics"]["triggered"]["asr_srd"] += 10.0  # seed 0 has v, seed 1 v + 10
    build_leaderboards(write_results(tmp_path / "results", all_records() + [second]), PROFILE,
                       tmp_path / "lb", paper_dir=tmp_path / "none")
    table = read_csv(tmp_path / "lb" / PROFILE / "table2.csv")
    v = value("coco", "badnet", "srd", "triggered", "asr_srd")
    assert table[("COCO", "BadNet")]["SRD / ASR ↓"] == f"{v + 5:.1f} ± 7.1"  # sd of (v, v+10): 7.07
    assert table[("COCO", "BadNet")]["SRD / C ↑"] == f"{value('coco', 'badnet', 'srd', 'triggered', 'cider'):.1f} ± 0.0"
    assert table[("COCO", "BadNet")]["ABL / C ↑"] == f"{value('coco', 'badnet', 'abl', 'triggered', 'cider'):.1f}"
    text = (tmp_path / "lb" / PROFILE / "table2.md").read_text()
    assert "Mean over seeds 0, 1; ± the sample standard deviation" in text
    headline = read_csv(tmp_path / "lb" / PROFILE / "asr_headline.csv")
    assert " ± " in headline[("COCO", "BadNet")]["SRD / ASR ↓"]


def test_clean_model_rows(results: Path, tmp_path: Path) -> None:
    build_leaderboards(results, PROFILE, tmp_path / "lb", paper_dir=tmp_path / "none")
    folder = tmp_path / "lb" / PROFILE
    t1 = read_csv(folder / "table1.csv")
    clean = t1[("COCO", "Clean model: BadNet")]
    want = value("coco", "badnet", "clean-model", "triggered", "cider")
    assert clean["No Defense / C ↑"] == f"{want:.1f}"
    assert clean["SRD / C ↑"] == "–"
    inputs = read_csv(folder / "clean_inputs.csv")
    row = inputs[("Flickr30k", "Clean model: Shadowcast")]
    want = value("flickr30k", "shadowcast", "clean-model", "clean", "cider")
    assert row["No Defense / C ↑"] == f"{want:.1f}"
    assert row["No Defense / ASR_clean ↓"] == \
        f"{value('flickr30k', 'shadowcast', 'clean-model', 'clean', 'asr_strict'):.1f}"
    assert "| COCO      | Clean model: BadNet" in (folder / "table1.md").read_text()


def test_headline_asr_rules(results: Path, tmp_path: Path) -> None:
    build_leaderboards(results, PROFILE, tmp_path / "lb", paper_dir=tmp_path / "none")
    with (tmp_path / "lb" / PROFILE / "asr_headline.csv").open(encoding="utf-8") as handle:
        rows = {(r["Dataset"], r["Attack"]): r for r in csv.DictReader(handle)}
    badnet = rows[("COCO", "BadNet")]
    assert badnet["Rule"] == "strict"
    want = value("coco", "badnet", "srd", "triggered", "asr_strict")
    assert badnet["SRD / ASR ↓"] == f"{want:.1f}"
    assert badnet["SRD / n"] == "990"
    shadow = rows[("Flickr30k", "Shadowcast")]
    assert shadow["Rule"] == "concept"
    assert shadow["No Defense / ASR ↓"] == \
        f"{value('flickr30k', 'shadowcast', 'none', 'triggered', 'asr_concept'):.1f}"
    assert shadow["No Defense / n"] == "490"
    assert shadow["ABL / ASR ↓"] == "–" and shadow["ABL / n"] == "–"


def test_failed_cell_listed(results: Path, tmp_path: Path) -> None:
    build_leaderboards(results, PROFILE, tmp_path / "lb", paper_dir=tmp_path / "none")
    readme = (tmp_path / "lb" / PROFILE / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Failed cells", 1)[1].split("\n## ", 1)[0]
    assert "Flickr30k" in section and "Shadowcast" in section and "ABL" in section
    assert "CUDA out of memory \\| in defend" in section  # the pipe is escaped for Markdown
    assert "15 ok, 1 failed" in readme
    assert "2025-06-15 15:06:40 UTC" in readme
    assert "`abc1234` (16 cells)" in readme
    assert "sfs[minilm-l6-v2, smollm2-135m-q4_1]" in readme
    results_csv = (tmp_path / "lb" / PROFILE / "results.csv").read_text(encoding="utf-8")
    assert ",failed," in results_csv


def test_grid_coverage_lists_declared_cells_without_a_result(results: Path, tmp_path: Path) -> None:
    declared = [(r["dataset"], r["attack"], r["defense"], r["poison_rate"], r["seed"]) for r in all_records()]
    declared += [("coco", "badnet", "vdc", 0.1, 0), ("flickr30k", "badnet", "vdc", 0.1, 0),
                 ("coco", "shadowcast", "srd_sac", 0.1, 1)]
    build_leaderboards(results, PROFILE, tmp_path / "lb", paper_dir=tmp_path / "none", declared=declared)
    readme = (tmp_path / "lb" / PROFILE / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Grid coverage", 1)[1].split("\n## ", 1)[0]
    assert f"declares {len(declared)} cells; 3 have no result" in section
    lines = [line for line in section.splitlines() if line.startswith("| ") and "Attack" not in line]
    # the failed cell has a result (listed under Failed cells), so only the three unrun cells show
    assert [[c.strip() for c in line.strip("|").split("|")] for line in lines] == [
        ["BadNet", "VDC", "0.1", "0", "COCO, Flickr30k"], ["Shadowcast", "SAC", "0.1", "1", "COCO"]]
    build_leaderboards(results, PROFILE, tmp_path / "lb", paper_dir=tmp_path / "none", declared=declared[:-3])
    readme = (tmp_path / "lb" / PROFILE / "README.md").read_text(encoding="utf-8")
    assert f"All {len(declared) - 3} cells the grid declares have a result." in readme
    build_leaderboards(results, PROFILE, tmp_path / "lb", paper_dir=tmp_path / "none")
    assert "## Grid coverage" not in (tmp_path / "lb" / PROFILE / "README.md").read_text(encoding="utf-8")


def test_table3_written_when_it_has_data(tmp_path: Path) -> None:
    records = all_records() + [record("coco", "badnet", d) for d in ("random_mask", "srd_ppo")]
    for r in records[-2:]:  # explicit numbers, as the paper's COCO/BadNet/Random
        r["metrics"] = {"triggered": {"cider": 33.04, "sfs": 32.1, "asr_srd": 73.5}}
        r["metric_details"] = {}
    root = write_results(tmp_path / "results", records)
    build_leaderboards(root, PROFILE, tmp_path / "lb", paper_dir=tmp_path / "none")
    folder = tmp_path / "lb" / PROFILE
    t3 = read_csv(folder / "table3.csv")
    row = t3[("COCO", "BadNet")]
    assert row["Random / C ↑"] == "33.0" and row["PPO / ASR ↓"] == "73.5"
    assert row["SAC / C ↑"] == "–"
    assert row["DQN / C ↑"] == f"{value('coco', 'badnet', 'srd', 'triggered', 'cider'):.1f}"
    assert ("COCO", "Clean model: BadNet") not in t3
    # Table 2 grows a column group per extra defense, after SRD
    t2 = read_csv(folder / "table2.csv")
    groups = list(dict.fromkeys(h.split(" / ")[0] for h in t2[("COCO", "BadNet")] if " / " in h))
    assert groups == ["No Defense", "ABL", "VDC", "CT", "SRD", "RobustIT (not in SRD paper)",
                      "RobustIT IDR only (not in SRD paper)", "RobustIT AAR only (not in SRD paper)", "Random", "PPO"]
    # keep only cells Table 3 does not show (ABL, clean model): table3 disappears on rebuild
    for path in (root / PROFILE).glob("*.json"):
        if not any(f"-{d}-" in path.name for d in ("abl", "clean-model")):
            path.unlink()
    written = build_leaderboards(root, PROFILE, tmp_path / "lb", paper_dir=tmp_path / "none")
    assert not (folder / "table3.md").exists() and not (folder / "table3.csv").exists()
    assert "table1.md" in {p.name for p in written}


def test_unknown_plugin_shows_as_is(tmp_path: Path) -> None:
    extra = record("coco", "badnet", "none")
    extra.update(attack="my_attack", defense="my_defense")
    root = write_results(tmp_path / "results", all_records() + [extra])
    build_leaderboards(root, PROFILE, tmp_path / "lb", paper_dir=tmp_path / "none")
    t2 = read_csv(tmp_path / "lb" / PROFILE / "table2.csv")
    assert t2[("COCO", "my_attack")]["my_defense / C ↑"] == \
        f"{value('coco', 'badnet', 'none', 'triggered', 'cider'):.1f}"


def test_byte_identical_rebuild(results: Path, tmp_path: Path) -> None:
    first = build_leaderboards(results, PROFILE, tmp_path / "a", paper_dir=tmp_path / "none")
    copy = tmp_path / "copy"
    shutil.copytree(results, copy)  # copy2 keeps the modification times
    # write the files in another order: the output must not depend on it
    for path in sorted((copy / PROFILE).glob("*.json"), reverse=True):
        data = path.read_bytes()
        path.unlink()
        path.write_bytes(data)
        os.utime(path, (FIXED_MTIME, FIXED_MTIME))
    second = build_leaderboards(copy, PROFILE, tmp_path / "b", paper_dir=tmp_path / "none")
    assert [p.name for p in first] == [p.name for p in second]
    for a, b in zip(first, second):
        assert a.read_bytes() == b.read_bytes(), a.name
    again = build_leaderboards(results, PROFILE, tmp_path / "a", paper_dir=tmp_path / "none")
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in second]


def test_latex_and_html_escaped(results: Path, tmp_path: Path) -> None:
    build_leaderboards(results, PROFILE, tmp_path / "lb", paper_dir=tmp_path / "none")
    folder = tmp_path / "lb" / PROFILE
    tex = (folder / "table2.tex").read_text(encoding="utf-8")
    assert "\\toprule" in tex and "\\bottomrule" in tex and "\\multicolumn{3}{c}{No Defense}" in tex
    assert "C $\\uparrow$" in tex and "ASR $\\downarrow$" in tex and " -- " in tex
    assert "asr\\_srd" in tex  # underscores escaped
    assert "ASR\\_clean $\\downarrow$" in (folder / "clean_inputs.tex").read_text(encoding="utf-8")
    page = (folder / "table2.html").read_text(encoding="utf-8")
    assert '<th colspan="3">No Defense</th>' in page and "<td>–</td>" in page


# ----------------------------------------------------------------------------- paper values
@pytest.mark.skipif(not SHARED_PAPER.is_dir(), reason="shared/paper_tables not present")
def test_paper_values_beside_ours(tmp_path: Path) -> None:
    profile = "openflamingo-3b"
    records = [r for r in all_records(profile)  # BadNet run on COCO only
               if (r["dataset"], r["attack"]) != ("flickr30k", "badnet")]
    root = write_results(tmp_path / "results", records, profile)
    build_leaderboards(root, profile, tmp_path / "lb", paper_dir=SHARED_PAPER)
    folder = tmp_path / "lb" / profile
    t2 = read_csv(folder / "table2.csv")
    ours = value("coco", "badnet", "none", "triggered", "cider")
    assert t2[("COCO", "BadNet")]["No Defense / C ↑"] == f"{ours:.1f} (1.3)"
    assert t2[("COCO", "BadNet")]["CT / ASR ↓"] == "– (93.8)"
    # rows the paper has and we did not run, with the paper's '-' and its note marker
    vdc = t2[("COCO", "VL-Trojan")]["VDC / C ↑"]
    assert vdc.startswith("– (– [") and vdc.endswith("])")
    assert "printed as '-' (not reported)" in (folder / "table2.md").read_text(encoding="utf-8")
    assert t2[("Flickr30k", "BadNet")]["No Defense / C ↑"].startswith("– (1.2 [")
    t1 = read_csv(folder / "table1.csv")
    assert t1[("COCO", "BadNet")]["SRD / B@4 ↑"].endswith(" (16.2)")
    assert t1[("Flickr30k", "BadNet")]["SRD / ASR ↓"] == "– (55.6)"
    assert t1[("COCO", "Clean model: BadNet")]["No Defense / C ↑"] == \
        f"{value('coco', 'badnet', 'clean-model', 'triggered', 'cider'):.1f}"
    t3 = read_csv(folder / "table3.csv")  # our none/srd cells fill No Defense and DQN
    assert t3[("COCO", "BadNet")]["DQN / C ↑"].endswith(" (51.3)")
    assert not (folder / "paper_table1.md").exists()


@pytest.mark.skipif(not SHARED_PAPER.is_dir(), reason="shared/paper_tables not present")
def test_paper_tables_separate_for_other_profiles(results: Path, tmp_path: Path) -> None:
    written = build_leaderboards(results, PROFILE, tmp_path / "lb", paper_dir=SHARED_PAPER)
    names = {p.name for p in written}
    assert {"paper_table1.md", "paper_table2.md", "paper_table3.md"} <= names
    folder = tmp_path / "lb" / PROFILE
    assert "(1.3)" not in (folder / "table2.csv").read_text(encoding="utf-8")
    paper2 = (folder / "paper_table2.md").read_text(encoding="utf-8")
    assert "printed without a decimal ('98')" in paper2 and "| 98 [" in paper2
    assert "| DQN / C ↑" in (folder / "paper_table3.md").read_text(encoding="utf-8")
    assert "paper_table2.md" in (folder / "README.md").read_text(encoding="utf-8")


@pytest.mark.skipif(not SHARED_PAPER.is_dir(), reason="shared/paper_tables not present")
def test_load_paper_tables() -> None:
    paper = load_paper_tables(SHARED_PAPER)
    assert paper[1][("coco", "badnet", "none", "cider")].value == 1.3
    assert paper[3][("flickr30k", "vlood", "srd", "cider")].text == "44.3"
    missing = paper[2][("flickr30k", "badnet", "srd", "asr_srd")]
    assert missing.value is None and "55.6" in missing.note


def test_paper_dir_absent_is_not_an_error(tmp_path: Path) -> None:
    assert load_paper_tables(tmp_path / "absent") == {}


def test_malformed_paper_table(tmp_path: Path) -> None:
    (tmp_path / "table1.csv").write_text("a,b\n1,2\n")
    with pytest.raises(VbbError, match="table1.csv"):
        load_paper_tables(tmp_path)


# ----------------------------------------------------------------------------- check
def test_check_passes_against_own_baseline(results: Path, tmp_path: Path) -> None:
    path = write_baseline(results, PROFILE, tmp_path / "baseline.json")
    baseline = json.loads(path.read_text())
    assert baseline["schema"] == 1 and baseline["profile"] == PROFILE
    assert baseline["tolerances"] == DEFAULT_TOLERANCES
    assert set(baseline["values"][0]) == {"dataset", "attack", "defense", "split", "metric",
                                          "value"}
    assert check_against_baseline(results, PROFILE, path) == []


def test_check_detects_moves_and_missing_cells(results: Path, tmp_path: Path) -> None:
    records = load_results(results, PROFILE)
    baseline = make_baseline(records, DEFAULT_TOLERANCES)
    target = next(r for r in records if (r["dataset"], r["attack"], r["defense"])
                  == ("coco", "badnet", "none"))
    before = target["metrics"]["triggered"]["cider"]
    target["metrics"]["triggered"]["cider"] = before - 4.9  # within the 5.0 of cider
    assert check(records, baseline) == []
    target["metrics"]["triggered"]["cider"] = before - 5.2
    regressions = check(records, baseline)
    assert len(regressions) == 1
    assert regressions[0].message == (f"coco/badnet/none triggered cider: {before:.1f} -> "
                                      f"{before - 5.2:.1f} (tol 5)")
    target["metrics"]["triggered"]["cider"] = before + 6.0  # either direction
    assert [r.kind for r in check(records, baseline)] == ["moved"]
    target["metrics"]["triggered"]["cider"] = before
    # a missing cell: every one of its values is a regression
    kept = [r for r in records if r is not target]
    missing = check(kept, baseline)
    assert {r.kind for r in missing} == {"missing"}
    assert len(missing) == len(TRIGGERED) + 1 + len(CLEAN)
    assert "-> missing" in missing[0].message
    # a failed cell
    target["status"], target["error"], target["metrics"] = "failed", "boom", {}
    failed = check(records, baseline)
    assert {r.kind for r in failed} == {"failed"} and "boom" in failed[0].message


def test_check_prefix_tolerances(results: Path) -> None:
    records = load_results(results, PROFILE)
    tolerances = {"asr_*": 5.0, "asr_strict": 1.0, "default": 3.0}
    baseline = make_baseline(records, tolerances)
    assert tolerance_for("asr_srd", tolerances) == 5.0
    assert tolerance_for("asr_strict", tolerances) == 1.0
    assert tolerance_for("cider", tolerances) == 3.0
    assert tolerance_for("cider", {}) == 3.0
    assert tolerance_for("asr_x", {"asr_*": 5.0, "asr_x*": 0.5}) == 0.5  # longest prefix
    target = records[0]
    target["metrics"]["triggered"]["asr_srd"] += 4.0  # within asr_* 5.0 (default 3 would fail)
    assert check(records, baseline) == []
    target["metrics"]["triggered"]["asr_strict"] += 1.5  # exact key 1.0 beats the prefix
    regressions = check(records, baseline)
    assert [(r.metric, r.tolerance) for r in regressions] == [("asr_strict", 1.0)]
    assert regressions[0].message.endswith("(tol 1)")


def test_baseline_selectors_for_several_seeds(tmp_path: Path) -> None:
    records = all_records() + [record("coco", "badnet", "none", seed=1)]
    records[-1]["metrics"]["triggered"]["cider"] += 50.0
    baseline = make_baseline(records, DEFAULT_TOLERANCES)
    with_seed = [v for v in baseline["values"] if "seed" in v]
    assert {v["seed"] for v in with_seed} == {0, 1}
    assert check(records, baseline) == []
    records[-1]["metrics"]["triggered"]["cider"] -= 50.0
    assert [r.kind for r in check(records, baseline)] == ["moved"]


@pytest.mark.parametrize("content, needle", [
    ("{not json", "not readable JSON"),
    (json.dumps({"schema": 2, "profile": PROFILE, "values": []}), "schema"),
    (json.dumps({"schema": 1, "profile": PROFILE}), "'values'"),
    (json.dumps({"schema": 1, "profile": PROFILE, "values": [{"dataset": "coco"}]}), "values[0]"),
    (json.dumps({"schema": 1, "profile": PROFILE, "tolerances": {"cider": "x"}, "values": []}),
     "tolerances"),
])
def test_malformed_baseline(results: Path, tmp_path: Path, content: str, needle: str) -> None:
    path = tmp_path / "bad-baseline.json"
    path.write_text(content)
    with pytest.raises(VbbError) as info:
        check_against_baseline(results, PROFILE, path)
    assert str(path) in str(info.value) and needle in str(info.value)
    assert info.value.fix


def test_baseline_profile_mismatch(results: Path, tmp_path: Path) -> None:
    path = write_baseline(results, PROFILE, tmp_path / "baseline.json")
    data = json.loads(path.read_text())
    data["profile"] = "other"
    path.write_text(json.dumps(data))
    with pytest.raises(VbbError, match="profile 'other'"):
        check_against_baseline(results, PROFILE, path)


# ----------------------------------------------------------------------------- defense report
def test_defense_report_rows_detection_and_before_after(tmp_path: Path) -> None:
    from vlmbackdoor_bench.leaderboard import build_tables

    records = all_records()
    for r in records:
        if r["defense"] == "abl" and r["status"] == "ok":
            r["detection"] = {"precision": 80.0, "recall": 25.0, "n_flagged": 250,
                              "n_poisoned": 800, "n_true_positive": 200,
                              "candidates": {"precision": 97.5, "recall": 88.0, "n_candidates": 722}}
        if r["defense"] == "srd" and r["status"] == "ok":
            r["detection"] = {"precision": None, "recall": 0.0, "n_flagged": 0, "n_poisoned": 800,
                              "n_true_positive": 0, "trigger_coverage": {"mean_coverage": 12.25}}
        r["timings"]["defend"] = {"seconds": 61.4, "cached": False}
    tables = {t.key: t for t in build_tables(records, PROFILE, load_paper_tables(tmp_path)).tables}
    report = tables["defense_report"]
    assert report.flat_headers()[4:6] == ["ASR before ↓", "ASR after ↓"]  # its one group has no label
    rows = {labels[:3]: cells for labels, cells in report.rows}
    # every non-trivial defense cell that did not fail, none itself is the "before" column
    assert len(rows) == 2 * 2 * 2 - 1
    abl = rows[("COCO", "BadNet", "ABL")]
    before = value("coco", "badnet", "none", "triggered", "asr_strict")
    after = value("coco", "badnet", "abl", "triggered", "asr_strict")
    clean_c = value("coco", "badnet", "abl", "clean", "cider")
    assert abl == (f"{before:.1f}", f"{after:.1f}", f"{clean_c:.1f}", "80.0", "25.0", "250 / 800",
                   "97.5 / 88.0", "–", "61")
    srd = rows[("COCO", "Shadowcast", "SRD")]
    assert srd[0] == f"{value('coco', 'shadowcast', 'none', 'triggered', 'asr_concept'):.1f}"
    assert srd[3:8] == ("–", "0.0", "0 / 800", "–", "12.2")  # flags nothing; masks 12.25 % of the trigger
    labels = [labels for labels, _ in report.rows]
    assert labels[0][3] == "strict" and ("Flickr30k", "Shadowcast", "SRD", "concept") in labels


# ----------------------------------------------------------------------------- merging boards
def _with_detection(records: list[dict]) -> list[dict]:
    for r in records:
        if r["defense"] == "abl" and r["status"] == "ok":
            r["detection"] = {"precision": 80.123456789, "recall": 25.0, "n_flagged": 250,
                              "n_poisoned": 800, "candidates": {"precision": 97.5, "recall": 88.0}}
        if r["defense"] == "srd" and r["status"] == "ok":
            r["detection"] = {"precision": None, "recall": 0.0, "n_flagged": 0, "n_poisoned": 800,
                              "trigger_coverage": {"mean_coverage": 12.25}}
        r["timings"]["defend"] = {"seconds": 61.4, "cached": True}
    return records


def test_results_csv_alone_rebuilds_every_table(tmp_path: Path) -> None:
    """A board's results.csv read back gives the same long form and byte-identical tables
    (the defense report's detection and time included), with no store at all."""
    from vlmbackdoor_bench.leaderboard.merge import read_long_form

    store = write_results(tmp_path / "results", _with_detection(all_records()))
    build_leaderboards(store, PROFILE, tmp_path / "a", paper_dir=tmp_path)
    records = read_long_form(tmp_path / "a" / PROFILE / "results.csv", PROFILE, source="board-a")
    assert len(records) == 16 and sum(r["status"] == "failed" for r in records) == 1
    assert {r["provenance"]["imported_from"] for r in records} == {"board-a"}
    abl = next(r for r in records if (r["dataset"], r["attack"], r["defense"]) == ("coco", "badnet", "abl"))
    assert abl["detection"]["precision"] == 80.123456789  # full precision, not the table's 80.1
    assert abl["metric_details"]["triggered"]["asr_strict"] == {"n": 990}
    assert long_form(records).equals(long_form(load_results(store, PROFILE)))
    empty = tmp_path / "no-store"
    build_leaderboards(empty, PROFILE, tmp_path / "b", paper_dir=tmp_path, records=records)
    for name in ("results.csv", "table1.md", "table2.csv", "defense_report.md", "asr_headline.tex"):
        assert (tmp_path / "b" / PROFILE / name).read_text() == \
            (tmp_path / "a" / PROFILE / name).read_text(), name
    readme = (tmp_path / "b" / PROFILE / "README.md").read_text()
    assert "16 cell results, 0 stored and 16 merged from earlier boards" in readme
    assert "16 cells from `board-a`" in readme


def test_merge_keeps_stored_cells_and_fills_the_rest(tmp_path: Path) -> None:
    """The store wins for a cell both hold; the file's other cells fill the board's gaps."""
    from vlmbackdoor_bench.leaderboard.merge import merge_records, read_long_form

    published = write_results(tmp_path / "published", all_records())
    build_leaderboards(published, PROFILE, tmp_path / "board", paper_dir=tmp_path)
    board_csv = tmp_path / "board" / PROFILE / "results.csv"
    mine = record("coco", "badnet", "srd")
    mine["metrics"]["triggered"]["cider"] = 77.75  # a recomputed cell
    new_defense = record("coco", "badnet", "srd")
    new_defense.update(defense="mydefense", defense_version="0.1")
    stored = [mine, new_defense]
    merged = merge_records(stored, read_long_form(board_csv, PROFILE))
    assert len(merged) == 16 + 1
    cells = {(r["dataset"], r["attack"], r["defense"]): r for r in merged}
    assert cells[("coco", "badnet", "srd")] is mine
    assert cells[("coco", "badnet", "mydefense")] is new_defense
    assert cells[("flickr30k", "shadowcast", "abl")]["status"] == "failed"
    assert "out of memory" in cells[("flickr30k", "shadowcast", "abl")]["error"]
    imported = cells[("flickr30k", "badnet", "none")]
    assert imported["metrics"]["clean"]["cider"] == value("flickr30k", "badnet", "none", "clean", "cider")
    # a second file never overrides the first, nor the store
    again = merge_records(merged, read_long_form(board_csv, PROFILE, source="other"))
    assert again == merged


def test_report_cli_merges_a_board(tmp_path: Path, capsys) -> None:
    from vlmbackdoor_bench.cli import main

    published = write_results(tmp_path / "published", all_records())
    build_leaderboards(published, PROFILE, tmp_path / "board", paper_dir=tmp_path)
    board_csv = tmp_path / "board" / PROFILE / "results.csv"
    config = tmp_path / "benchmark.toml"
    config.write_text('[benchmark]\nattacks = ["badnet"]\ndefenses = ["none", "srd"]\n'
                      f'cache_dir = "{(tmp_path / "empty-cache").as_posix()}"\n')
    assert main(["--config", str(config), "report", "--merge", str(board_csv),
                 "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "16 cells merged from" in err
    table = (tmp_path / "out" / PROFILE / "table2.csv").read_text()
    assert f"{value('coco', 'shadowcast', 'abl', 'triggered', 'cider'):.1f}" in table
    assert main(["--config", str(config), "report", "--out", str(tmp_path / "out")]) == 2
    assert "no results for profile" in capsys.readouterr().err  # without --merge: a store is needed
    # the regression gate reads the same records: a baseline written from the merged board is
    # the one its store would give, and the merged board passes it
    baseline = tmp_path / "baseline.json"
    assert main(["--config", str(config), "check", "--write", "--merge", str(board_csv),
                 "--baseline", str(baseline)]) == 0
    write_baseline(published, PROFILE, tmp_path / "from-store.json")
    assert baseline.read_text() == (tmp_path / "from-store.json").read_text()
    assert main(["--config", str(config), "check", "--merge", str(board_csv),
                 "--baseline", str(baseline)]) == 0
    capsys.readouterr()
    # `vbb run` reads its merge files before the grid: a bad one costs no computation
    assert main(["--config", str(config), "run", "--merge", str(tmp_path / "typo.csv")]) == 2
    assert "merge file" in capsys.readouterr().err and not (tmp_path / "empty-cache").exists()


@pytest.mark.parametrize("content, needle", [
    (None, "does not exist"),
    ("a,b\n1,2\n", "lacks the column(s) dataset"),
    ("HEADER\ncoco,badnet,none,triggered,cider,lots,tiny,srd-code,default,0.1,0,1000,ok,k,c,1,1,,\n",
     "line 2: value is 'lots', not a finite number"),
    ("HEADER\ncoco,badnet,none,triggered,cider,3.5,other,srd-code,default,0.1,0,1000,ok,k,c,1,1,,\n",
     "a cell of profile 'other'"),
    ("HEADER\ncoco,badnet,none,defense,speed,3.5,tiny,srd-code,default,0.1,0,,ok,k,c,1,1,,\n",
     "unknown 'defense' number 'speed'"),
    ("HEADER\ncoco,badnet,none,triggered,cider,3.5,tiny,srd-code,default,0.1,0.5,1000,ok,k,c,1,1,,\n",
     "seed is '0.5', not a whole number"),
])
def test_bad_merge_file_is_one_clear_error(tmp_path: Path, content: str | None, needle: str) -> None:
    from vlmbackdoor_bench.leaderboard.merge import read_long_form

    path = tmp_path / "results.csv"
    if content is not None:
        path.write_text(content.replace("HEADER", ",".join(LONG_FORM_COLUMNS)))
    with pytest.raises(VbbError, match=re.escape(needle)):
        read_long_form(path, PROFILE)


@pytest.mark.skipif(not SHARED_PAPER.is_dir(), reason="shared/paper_tables not present")
def test_committed_board_is_its_results_csv(tmp_path: Path) -> None:
    """Every committed table of leaderboards/tiny/ is what its results.csv renders to: the board
    is in step with the code, and `vbb report --merge` can extend it without its store."""
    from vlmbackdoor_bench.leaderboard.merge import read_long_form

    board = Path(__file__).resolve().parents[1] / "leaderboards" / PROFILE
    records = read_long_form(board / "results.csv", PROFILE)
    written = build_leaderboards(tmp_path / "no-store", PROFILE, tmp_path / "lb",
                                 paper_dir=SHARED_PAPER, records=records)
    # figures: byte-stable for one matplotlib version only (tests/test_leaderboard_page.py checks them)
    tables = [p for p in written if p.name != "README.md" and p.parent.name != "figures"]
    assert len(tables) > 20
    for path in tables:
        assert path.read_bytes() == (board / path.name).read_bytes(), path.name
