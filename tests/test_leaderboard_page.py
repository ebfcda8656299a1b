"""The leaderboard page (issue 28): the defense diagnostics the figures need, their round trip
through results.csv, the page and figures rebuilt from that file alone, and the page rendered in
headless Chromium (every table and figure present and non-empty, sorting works)."""

from __future__ import annotations

import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlmbackdoor_bench.diagnostics import binned_curve, defense_diagnostics, grid_matrix, mask_grid
from vlmbackdoor_bench.leaderboard import build_leaderboards, long_form
from vlmbackdoor_bench.leaderboard.figures import FIGURES
from vlmbackdoor_bench.leaderboard.headline import headline_markdown
from vlmbackdoor_bench.leaderboard.merge import read_long_form
from vlmbackdoor_bench.leaderboard.tables import table_poison_rate
from vlmbackdoor_bench.results_schema import CellResult

REPO = Path(__file__).resolve().parents[1]
PROFILE = "tiny"
SHARED_PAPER = REPO.parent / "shared" / "paper_tables"
DATASETS = ("coco", "flickr30k")
ATTACKS = ("badnet", "blended")
DEFENSES = ("none", "srd", "abl", "clean-model")
BROWSER = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
needs_browser = pytest.mark.skipif(BROWSER is None, reason="no headless Chromium on this machine "
                                   "(Debian: apt-get install chromium; .ci/run installs it)")
SRD_BOX = [0, 56, 168, 224]  # rows 0-56, cols 168-224: the top-right 2 x 2 blocks of the 8 x 8 grid


# ----------------------------------------------------------------------------- diagnostics
def test_mask_grid_is_the_share_of_masks_covering_each_block():
    grid = mask_grid({"a": [0, 28, 0, 28], "b": [0, 28, 0, 56]})
    assert len(grid) == 64
    assert grid["r0c0"] == 100.0 and grid["r0c1"] == 50.0 and grid["r1c0"] == 0.0
    half = mask_grid({"a": [0, 14, 0, 28]})  # half of block r0c0's rows
    assert half["r0c0"] == 50.0 and sum(half.values()) == 50.0
    matrix = grid_matrix(grid)
    assert matrix.shape == (8, 8) and matrix[0, 1] == 50.0
    assert grid_matrix({"r0c0": 1.0, "r0c1": 2.0}) is None and mask_grid({}) == {}


def test_reward_curve_binned_and_srd_numbers_kept():
    assert binned_curve([[0, 1.0], [5, 3.0], [9, 5.0]], bins=2) == {"b00": 2.0, "b01": 5.0}
    assert binned_curve([1.0, 2.0]) == {"b00": 1.0, "b01": 2.0}  # fewer steps than bins
    assert binned_curve(None) == {} and binned_curve([["x"]]) == {}
    curve = list(np.linspace(-1.0, 1.0, 100))
    report = {"mask_boxes": {"s1": SRD_BOX},
              "details": {"srd_rl": {"reward_curve": curve, "states_visited": 40,
                                     "surrogate": {"asr": 97.5}, "converged": True, "name": "dqn"}}}
    found = defense_diagnostics(report)
    assert set(found) == {"mask_grid", "reward_curve", "srd_rl"}
    assert found["srd_rl"] == {"states_visited": 40.0, "surrogate.asr": 97.5}
    assert len(found["reward_curve"]) == 20
    assert found["reward_curve"]["b00"] == pytest.approx(np.mean(curve[:5]))
    assert found["reward_curve"]["b19"] == pytest.approx(np.mean(curve[95:]))
    assert defense_diagnostics({"details": {}, "mask_boxes": {}}) == {}


def test_runner_report_form_with_srds_own_summary():
    """What the runner reads back (persist.report_to_dict of the defense's report) with SRD's own
    ``srd_rl`` summary: its numbers kept, its strings and lists left out, its curve binned."""
    diagnostics = pytest.importorskip("vlmbackdoor_bench_plugins.defenses.srd.diagnostics",
                                      reason="SRD plugin not installed")
    from vlmbackdoor_bench.grid.persist import report_to_dict
    from vlmbackdoor_bench.types import DefenseReport

    log = {"step_rewards": [[4 * i, -1.0 + 0.05 * i] for i in range(60)], "timesteps": 240,
           "states_visited": 37, "observations": 0}
    summary = diagnostics.srd_rl_summary("dqn", log, {}, {"mask_entropy_bits": 2.5}, "clean model")
    report = report_to_dict(DefenseReport(mask_boxes={"s1": SRD_BOX}, details={"srd_rl": summary}))
    found = defense_diagnostics(report)
    assert found["srd_rl"]["states_visited"] == 37.0 and found["srd_rl"]["mask_entropy_bits"] == 2.5
    assert "algorithm" not in found["srd_rl"] and "reward_curve" not in found["srd_rl"]
    assert list(found["reward_curve"].values()) == pytest.approx(summary["reward_curve"])
    assert grid_matrix(found["mask_grid"])[0, 6:].tolist() == [100.0, 100.0]


# ----------------------------------------------------------------------------- a small board
def _record(dataset: str, attack: str, defense: str) -> dict:
    """A schema-2 cell record with numbers that differ per cell, timings and (SRD) diagnostics."""
    a, k, d = ATTACKS.index(attack), DEFENSES.index(defense), DATASETS.index(dataset)
    asr = 95.0 - 40 * (defense == "srd") - 20 * (defense == "abl") + a if defense != "clean-model" else 0.2
    triggered = {"bleu4": 5.0 + k, "cider": 10.0 + 3 * k + d, "sc": 20.0, "lf": 40.0, "sfs": 30.0 + k,
                 "asr_srd": asr, "asr_strict": asr - 0.5}
    clean = {"bleu4": 30.0 - k, "cider": 90.0 - 5 * k - d, "sc": 80.0, "lf": 85.0, "sfs": 82.0,
             "asr_strict": 0.1 * k}
    record = CellResult(profile=PROFILE, dataset=dataset, attack=attack, defense=defense,
                        poison_rate=0.0 if defense == "clean-model" else 0.1, seed=0, status="ok",
                        attack_preset="srd-code", defense_preset="default",
                        metrics={"triggered": triggered, "clean": clean},
                        timings={"poison": {"seconds": 2.0 + a, "cached": False},
                                 "backdoor": {"seconds": 30.0 + a, "cached": True},
                                 "eval_triggered_wall": 4.0 + k},
                        provenance={"cell_key": f"{dataset}-{attack}-{defense}", "git_commit": "abc1234"})
    if defense == "clean-model":
        record.timings = {"clean_model": {"seconds": 25.0, "cached": True}}
    else:
        record.timings["defend"] = {"seconds": 10.0 * (k + 1) + a, "cached": False}
        record.detection = {"precision": 60.0 + a if defense == "abl" else None,
                            "recall": 20.0 if defense == "abl" else 0.0, "n_flagged": 5, "n_poisoned": 10}
    if defense == "srd":
        record.detection["trigger_coverage"] = {"mean_coverage": 12.5 + a}
        record.diagnostics = defense_diagnostics({
            "mask_boxes": {"s1": SRD_BOX, "s2": SRD_BOX},
            "details": {"srd_rl": {"reward_curve": [[i, -1.0 + i / 10] for i in range(40)],
                                   "states_visited": 300 + a, "mask_entropy": 1.25}}})
    return record.to_dict()


@pytest.fixture(scope="module")
def board(tmp_path_factory) -> Path:
    """The board of the synthetic records, then rebuilt from its own results.csv alone."""
    root = tmp_path_factory.mktemp("page")
    records = [_record(d, a, k) for d in DATASETS for a in ATTACKS for k in DEFENSES]
    first = root / "from-records"
    build_leaderboards(root / "no-store", PROFILE, first, paper_dir=SHARED_PAPER, records=records)
    merged = read_long_form(first / PROFILE / "results.csv", PROFILE)
    build_leaderboards(root / "no-store", PROFILE, root / "from-csv", paper_dir=SHARED_PAPER,
                       records=merged)
    return root


def test_diagnostics_and_timings_survive_results_csv(board: Path):
    merged = {(r["dataset"], r["attack"], r["defense"]): r
              for r in read_long_form(board / "from-records" / PROFILE / "results.csv", PROFILE)}
    original = _record("coco", "blended", "srd")
    back = merged[("coco", "blended", "srd")]
    assert back["diagnostics"] == original["diagnostics"]
    assert back["diagnostics"]["srd_rl"] == {"states_visited": 301.0, "mask_entropy": 1.25}
    assert {k: v["seconds"] for k, v in back["timings"].items()} == {
        "poison": 3.0, "backdoor": 31.0, "eval_triggered_wall": 5.0, "defend": 21.0}
    assert "diagnostics" not in merged[("coco", "blended", "none")]
    frame = long_form([original])
    assert set(frame["split"]) == {"triggered", "clean", "defense", "timing", "mask_grid",
                                   "reward_curve", "srd_rl"}


def test_page_and_figures_regenerate_from_results_csv(board: Path):
    first, again = board / "from-records" / PROFILE, board / "from-csv" / PROFILE
    def page(folder: Path) -> str:  # the summary line alone says the cells were merged
        return re.sub(r"\d+ cell results \([^)]*\)\.", "", (folder / "index.html").read_text("utf-8"), count=1)

    assert page(first) == page(again) and "merged from earlier boards" in (again / "index.html").read_text()
    assert (first / "README.md").stat().st_size <= 10_000
    names = sorted(p.name for p in (again / "figures").iterdir())
    assert names == sorted(f"{f.name}.{ext}" for f, _draw in FIGURES for ext in ("png", "svg"))
    for name in names:
        assert (again / "figures" / name).read_bytes() == (first / "figures" / name).read_bytes(), name
    html = (again / "index.html").read_text(encoding="utf-8")
    assert "http://" not in html and "https://" not in html  # nothing fetched at view time
    # SRD's mask grid and reward curve were recorded: no "not recorded" panel in their figures
    assert "not recorded" not in (again / "figures" / "srd_masks.svg").read_text()
    assert "not recorded" not in (again / "figures" / "srd_rewards.svg").read_text()


def test_page_lays_out_paper_tables_with_reference_rows(board: Path):
    html = (board / "from-csv" / PROFILE / "index.html").read_text(encoding="utf-8")
    table1 = html.split('id="table1"', 1)[1].split("</table>", 1)[0]
    body, reference = table1.split("<tbody>", 1)[1].split('<tbody class="ref">')
    paper_rows = set()
    if SHARED_PAPER.is_dir():  # the paper's rows that we lack are rows too (its values only)
        lines = (SHARED_PAPER / "table1.csv").read_text(encoding="utf-8").splitlines()[1:]
        paper_rows = {tuple(line.split(",")[:2]) for line in lines}
    ours = {(label, attack) for label in ("COCO", "Flickr30k") for attack in ("BadNet", "Blended")}
    assert body.count("<tr>") == len(ours | paper_rows)
    assert reference.count("<tr>") == len(DATASETS) and "Clean model (reference)" in reference
    # COCO reference: the clean model's clean-input CIDEr (90 - 5 * 3), its ASR = asr_strict there
    assert '<td data-v="75">75.0</td>' in reference and '<td data-v="0.3">0.3</td>' in reference
    if SHARED_PAPER.is_dir():  # COCO BadNet No Defense ASR: ours 95.0, the paper prints 99.9
        assert re.search(r'data-v="95">95\.0<span class="paper"[^>]*>99\.9 · -4\.9</span>', table1)
    assert "Per-stage timing" in html and "SRD diagnostics" in html


# ----------------------------------------------------------------------------- Chromium
class _Dom(HTMLParser):
    """Tables (id -> body rows of cell texts) and images of a dumped DOM."""

    def __init__(self):
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.images: list[str] = []
        self.body: dict[str, str] = {}
        self._table, self._row, self._cell, self._in_body = None, None, None, False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "body":
            self.body = attrs
        elif tag == "table":
            self._table = attrs.get("id")
            self.tables[self._table] = []
        elif tag == "tbody":
            self._in_body = True
        elif tag == "tr" and self._in_body:
            self._row = []
            self.tables[self._table].append(self._row)
        elif tag == "td" and self._row is not None:
            self._cell = ""
        elif tag == "img":
            self.images.append(attrs.get("src"))

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self._row.append(self._cell.strip())
            self._cell = None
        elif tag == "tbody":
            self._in_body, self._row = False, None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def _chromium(page: Path, *args: str) -> str:
    done = subprocess.run([BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--virtual-time-budget=10000", *args, page.as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@needs_browser
def test_chromium_renders_every_table_and_figure(board: Path, tmp_path: Path):
    folder = board / "from-csv" / PROFILE
    dom = _Dom()
    dom.feed(_chromium(folder / "index.html", "--dump-dom"))
    for key in ("table1", "table2", "defense_report", "asr_headline", "timings", "srd_diagnostics"):
        rows = dom.tables[key]
        assert rows and all(rows), key
        assert any(re.fullmatch(r"-?\d+(\.\d+)?", cell) for row in rows for cell in row), key
    assert sorted(dom.images) == sorted(f.path("svg") for f, _draw in FIGURES)
    assert dom.body.get("data-figures-loaded") == str(len(FIGURES))  # every <img> decoded
    shot = tmp_path / "page.png"
    _chromium(folder / "index.html", f"--screenshot={shot}", "--window-size=1200,3000")
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.std() > 10 and (pixels < 128).mean() > 0.005  # text, rules and plots drawn
    for figure, _draw in FIGURES:
        drawn = np.asarray(Image.open(folder / figure.path("png")).convert("L"), dtype=float)
        assert drawn.std() > 5, figure.name


@needs_browser
def test_chromium_sorts_a_column(board: Path, tmp_path: Path):
    """The page's own script sorts Table 2 by a clicked column: numbers ascending, then descending."""
    folder = board / "from-csv" / PROFILE
    probe = folder / "probe.html"  # beside index.html, so that its relative figures still load
    clicks = """<script>
      var th = document.querySelector('#table2 th.sort[data-col="4"]'), out = [];
      var read = function(){ return Array.prototype.map.call(document.querySelector('#table2').tBodies[0].rows,
        function(r){ return r.cells[4].dataset.v || "-"; }).join(","); };
      th.click(); out.push(read()); th.click(); out.push(read());
      document.body.dataset.sorted = out.join("|");
    </script></body>"""
    probe.write_text((folder / "index.html").read_text(encoding="utf-8").replace("</body>", clicks))
    try:
        dom = _Dom()
        dom.feed(_chromium(probe, "--dump-dom"))
    finally:
        probe.unlink()
    ascending, descending = (part.split(",") for part in dom.body["data-sorted"].split("|"))
    numbers = [float(v) for v in ascending if v != "-"]
    assert numbers == sorted(numbers) and len(set(numbers)) > 1
    assert ascending[len(numbers):] == ["-"] * (len(ascending) - len(numbers))  # missing last
    assert [float(v) for v in descending if v != "-"] == sorted(numbers, reverse=True)


def test_committed_board_readme_headline_and_sizes():
    """Both READMEs stay small; the project README's headline table and picture are the committed
    board's (every number read back from its results.csv)."""
    board = REPO / "leaderboards" / PROFILE
    assert (board / "README.md").stat().st_size <= 10_000
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(readme.encode()) <= 10_000
    names = {p.name for p in (board / "figures").iterdir()}
    assert names == {f"{f.name}.{ext}" for f, _draw in FIGURES for ext in ("png", "svg")}
    records = read_long_form(board / "results.csv", PROFILE)
    table = headline_markdown(records, table_poison_rate(records))
    assert table.count("\n") == 2 + 6 and table in readme
    pictures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", readme)
    assert pictures and all((REPO / p).is_file() for p in pictures)
