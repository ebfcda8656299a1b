"""The leaderboard's figures, drawn with matplotlib from the cell records alone (PNG + SVG).

Every number comes from what ``results.csv`` carries (metrics, the defend stage's detection
numbers, the diagnostics), so ``vbb report --merge`` without a store redraws them. Files are
byte-stable for one matplotlib version: no dates in the SVG metadata, a fixed SVG hash salt.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..diagnostics import MASK_GRID_PART, REWARD_CURVE_PART, grid_matrix  # noqa: E402
from ..results_schema import CLEAN_MODEL, NO_DEFENSE  # noqa: E402
from ..types import IMAGE_SIZE  # noqa: E402
from .facts import Facts  # noqa: E402
from .implant import MARK, not_implanted  # noqa: E402
from .results import defense_values, finite_number, same_rate  # noqa: E402
from .stage_tables import NOT_RECORDED  # noqa: E402

FIGURE_DIR = "figures"
FORMATS: tuple[str, ...] = ("png", "svg")
DPI = 110
BEFORE_COLOR, AFTER_COLOR = "#9e9e9e", "#1f77b4"


@dataclass(frozen=True)
class Figure:
    """One drawn figure: its file stem under :data:`FIGURE_DIR`, title and caption."""

    name: str
    title: str
    caption: str

    def path(self, ext: str) -> str:
        """The figure's path relative to the board's folder, e.g. ``figures/tradeoff.svg``."""
        return f"{FIGURE_DIR}/{self.name}.{ext}"


class BoardMeans:
    """Means over seeds of the ok cells at one poison rate (the tables'), keyed by ids."""

    def __init__(self, records: Sequence[Mapping], poison_rate: float | None, facts: Facts):
        self.facts = facts
        kept = [r for r in records if r.get("status") == "ok" and r["defense"] != CLEAN_MODEL
                and (poison_rate is None or same_rate(finite_number(r.get("poison_rate")), poison_rate))]
        self.records = kept
        sums: dict[tuple, list[float]] = defaultdict(list)
        for r in kept:
            cell = (r["dataset"], r["attack"], r["defense"])
            metrics = r.get("metrics") or {}
            for name, value in (("asr", (metrics.get("triggered") or {}).get(facts.headline_metric(r["attack"]))),
                                ("clean_cider", (metrics.get("clean") or {}).get("cider"))):
                if finite_number(value) is not None:
                    sums[cell + (name,)].append(float(value))
            for name, value in defense_values(r).items():
                sums[cell + (name,)].append(value)
        self.values = {k: math.fsum(v) / len(v) for k, v in sums.items()}
        self.datasets = self._ordered("dataset", {r["dataset"] for r in kept})
        self.attacks = self._ordered("attack", {r["attack"] for r in kept})
        self.defenses = self._ordered("defense", {r["defense"] for r in kept} - {NO_DEFENSE})
        #: (attack, dataset) pairs whose attack was not implanted (:mod:`.implant`)
        self.not_implanted = not_implanted(records, facts, poison_rate)

    def attack_label(self, attack: str) -> str:
        """An attack's label, with :data:`.implant.MARK` where it was not implanted on a dataset."""
        marked = any((attack, d) in self.not_implanted for d in self.datasets)
        return self.label("attack", attack) + (f" {MARK}" if marked else "")

    def _ordered(self, kind: str, ids: set[str]) -> list[str]:
        return sorted(ids, key=lambda x: self.facts.rank(kind, x))

    def get(self, dataset: str, attack: str, defense: str, name: str) -> float | None:
        return self.values.get((dataset, attack, defense, name))

    def label(self, kind: str, value: str) -> str:
        return self.facts.label(kind, value)

    def diagnostics(self, attack: str, defense: str, part: str) -> Mapping | None:
        """One defended model's diagnostics part (the first dataset's record, lowest seed)."""
        for r in sorted(self.records, key=lambda r: (self.facts.rank("dataset", r["dataset"]),
                                                     str(r.get("seed")))):
            if r["attack"] == attack and r["defense"] == defense:
                value = (r.get("diagnostics") or {}).get(part)
                if isinstance(value, Mapping) and value:
                    return value
        return None

    def masking_defenses(self) -> list[str]:
        """Defenses that masked images: a mask grid or a trigger-coverage share is recorded."""
        return [d for d in self.defenses
                if any(self.diagnostics(a, d, MASK_GRID_PART) is not None
                       or any(self.get(ds, a, d, "trigger_masked") is not None for ds in self.datasets)
                       for a in self.attacks)]


def _not_recorded(ax, text: str = NOT_RECORDED) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=8, color="0.45",
            transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def _panels(rows: int, cols: int, width: float, height: float):
    fig, axes = plt.subplots(max(rows, 1), max(cols, 1), figsize=(width * max(cols, 1), height * max(rows, 1) + 0.6),
                             squeeze=False)
    return fig, axes


def asr_before_after(board: BoardMeans) -> plt.Figure:
    """Rows datasets, columns defenses; per attack the headline ASR without and with the defense."""
    fig, axes = _panels(len(board.datasets), len(board.defenses), 2.3, 2.4)
    x = np.arange(len(board.attacks))
    for i, dataset in enumerate(board.datasets):
        for j, defense in enumerate(board.defenses):
            ax = axes[i, j]
            before = [board.get(dataset, a, NO_DEFENSE, "asr") for a in board.attacks]
            after = [board.get(dataset, a, defense, "asr") for a in board.attacks]
            bars = (ax.bar(x - 0.2, [np.nan if v is None else v for v in before], 0.4,
                           color=BEFORE_COLOR, label="no defense"),
                    ax.bar(x + 0.2, [np.nan if v is None else v for v in after], 0.4,
                           color=AFTER_COLOR, label="defended"))
            for container, color in zip(bars, (BEFORE_COLOR, AFTER_COLOR)):
                for attack, patch in zip(board.attacks, container.patches):
                    if (attack, dataset) in board.not_implanted:  # hollow, hatched: not ranked
                        patch.set_facecolor("none")
                        patch.set_edgecolor(color)
                        patch.set_hatch("////")
            ax.set_ylim(0, 105)
            bottom = i == len(board.datasets) - 1  # attack names once, under the last row
            ax.set_xticks(x, [board.attack_label(a) for a in board.attacks] if bottom else [],
                          rotation=60, fontsize=7, ha="right")
            ax.tick_params(axis="y", labelsize=7)
            if i == 0:
                ax.set_title(board.label("defense", defense), fontsize=9)
            if j == 0:
                ax.set_ylabel(f"{board.label('dataset', dataset)}\nASR % (headline)", fontsize=8)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="upper right", ncol=2)
    if board.not_implanted:
        fig.text(0.01, 1.0, f"{MARK} hollow hatched bars: attack not implanted (no-defense ASR "
                 "< 50 %), not ranked", fontsize=7, va="bottom", color="0.3")
    return fig


def tradeoff(board: BoardMeans) -> plt.Figure:
    """Per dataset: clean CIDEr lost to the defense (x) against the ASR left (y), one marker per
    defense and one point per attack."""
    fig, axes = _panels(1, len(board.datasets), 4.6, 3.8)
    markers = "osD^v<>pPX*h"
    for j, dataset in enumerate(board.datasets):
        ax = axes[0, j]
        for k, defense in enumerate(board.defenses):
            points = [(board.get(dataset, a, NO_DEFENSE, "clean_cider") - board.get(dataset, a, defense, "clean_cider"),
                       board.get(dataset, a, defense, "asr"))
                      for a in board.attacks
                      if (a, dataset) not in board.not_implanted  # nothing to remove: not ranked
                      and None not in (board.get(dataset, a, NO_DEFENSE, "clean_cider"),
                                      board.get(dataset, a, defense, "clean_cider"),
                                      board.get(dataset, a, defense, "asr"))]
            if points:
                xs, ys = zip(*points)
                ax.scatter(xs, ys, marker=markers[k % len(markers)], color=f"C{k % 10}", s=28,
                           alpha=0.85, label=board.label("defense", defense))
        ax.axvline(0, color="0.7", lw=0.8)
        ax.set_ylim(-3, 105)
        ax.set_xlabel("clean CIDEr drop vs no defense (points)", fontsize=8)
        ax.set_ylabel("ASR after defense, % (headline)", fontsize=8)
        ax.set_title(board.label("dataset", dataset), fontsize=9)
        ax.tick_params(labelsize=7)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=min(len(labels), 8))
        fig.subplots_adjust(bottom=0.28)
    left_out = sorted({a for a, _d in board.not_implanted}, key=lambda a: board.facts.rank("attack", a))
    if left_out:
        fig.text(0.5, 1.0, f"{MARK} left out, attack not implanted (no-defense ASR < 50 %): "
                 + ", ".join(board.label("attack", a) for a in left_out), fontsize=7, ha="center",
                 va="bottom", color="0.3")
    return fig


def detection(board: BoardMeans) -> plt.Figure:
    """Per defense: mean detection precision and recall and, for masking defenses, the share of
    the trigger masked (bars), with each attack's value as a dot."""
    measures = (("precision", "precision"), ("recall", "recall"), ("trigger_masked", "trigger masked"))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(board.defenses) + 2), 3.6))
    x = np.arange(len(board.defenses))
    width = 0.26
    for m, (name, text) in enumerate(measures):
        offset = (m - 1) * width
        means = []
        for k, defense in enumerate(board.defenses):
            # the defended model is shared by the datasets: its detection numbers are the first's
            values = [v for a in board.attacks for v in
                      [next((board.get(ds, a, defense, name) for ds in board.datasets
                             if board.get(ds, a, defense, name) is not None), None)] if v is not None]
            means.append(np.mean(values) if values else np.nan)
            ax.scatter(np.full(len(values), k + offset), values, s=9, color="k", zorder=3)
        ax.bar(x + offset, means, width, color=f"C{m}", label=text)
    ax.set_xticks(x, [board.label("defense", d) for d in board.defenses], rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 105)
    ax.set_ylabel("%", fontsize=8)
    ax.tick_params(axis="y", labelsize=7)
    ax.legend(fontsize=7, ncol=3, loc="upper left")
    ax.set_title("Detection against the poison set (bars: mean over attacks; dots: each attack)",
                 fontsize=9)
    return fig


def srd_masks(board: BoardMeans) -> plt.Figure:
    """Rows masking defenses, columns attacks: the share of instances masking each grid block."""
    defenses = board.masking_defenses()
    fig, axes = _panels(len(defenses), len(board.attacks), 1.9, 1.9)
    shown = None
    for i, defense in enumerate(defenses):
        for j, attack in enumerate(board.attacks):
            ax = axes[i, j]
            grid = grid_matrix(board.diagnostics(attack, defense, MASK_GRID_PART) or {})
            if grid is None:
                _not_recorded(ax)
            else:
                shown = ax.imshow(grid, cmap="inferno", vmin=0, vmax=100,
                                  extent=(0, IMAGE_SIZE, IMAGE_SIZE, 0))
                ax.set_xticks([])
                ax.set_yticks([])
            if i == 0:
                ax.set_title(board.label("attack", attack), fontsize=8)
            if j == 0:
                ax.set_ylabel(board.label("defense", defense), fontsize=8)
    if not defenses:
        _not_recorded(axes[0, 0], "no masking defense in these results")
    if shown is not None:
        fig.colorbar(shown, ax=axes, shrink=0.8, label="% of instances masking the block")
    return fig


def srd_rewards(board: BoardMeans) -> plt.Figure:
    """Per attack: each RL defense's reward curve (means of equal runs of its training steps)."""
    fig, axes = _panels(1, len(board.attacks), 2.3, 2.4)
    for j, attack in enumerate(board.attacks):
        ax = axes[0, j]
        drawn = False
        for k, defense in enumerate(board.defenses):
            curve = board.diagnostics(attack, defense, REWARD_CURVE_PART)
            if curve:
                values = [curve[name] for name in sorted(curve)]
                ax.plot(np.linspace(0, 1, len(values)), values, color=f"C{k % 10}", lw=1.2,
                        label=board.label("defense", defense))
                drawn = True
        if drawn:
            ax.set_xlabel("training progress", fontsize=7)
            ax.tick_params(labelsize=7)
            ax.legend(fontsize=6)
        else:
            _not_recorded(ax)
        ax.set_title(board.label("attack", attack), fontsize=8)
        if j == 0:
            ax.set_ylabel("mean reward", fontsize=8)
    return fig


FIGURES: tuple[tuple[Figure, Callable[[BoardMeans], plt.Figure]], ...] = (
    (Figure("asr_before_after", "ASR before → after, per defense and attack",
            "Headline ASR (rule strict; concept for Shadowcast) of the backdoored model without "
            "defense (grey) and after each defense (blue), per test dataset; hollow hatched bars: "
            f"an attack not implanted ({MARK}), not ranked."), asr_before_after),
    (Figure("tradeoff", "Efficacy vs stealth: clean CIDEr drop against ASR",
            "Each point is one attack: how much clean-input CIDEr the defense cost (x, points "
            "below the undefended model) and the ASR it left (y). Bottom-left is best. Attacks not "
            f"implanted on a dataset ({MARK}) are left out of its panel."), tradeoff),
    (Figure("detection", "Detection precision / recall per defense",
            "The poisoned training samples a defense removed or relabelled, against the poison "
            "set the harness holds; masking defenses flag none and show the share of the trigger "
            "their masks covered instead."), detection),
    (Figure("srd_masks", "Where the masks went (per masking defense and attack)",
            "Share of training instances whose mask covered each 28 px block of the 224 px frame; "
            f"'{NOT_RECORDED}': results written before the mask grid was kept."), srd_masks),
    (Figure("srd_rewards", "SRD's reward curves per attack",
            "Mean reward over the RL training steps (20 equal runs), per RL defense; "
            f"'{NOT_RECORDED}': results without SRD's RL diagnostics."), srd_rewards),
)


def _save(fig: plt.Figure, folder: Path, name: str) -> list[Path]:
    written = []
    for ext in FORMATS:
        path = folder / f"{name}.{ext}"
        partial = path.with_name(f".{path.name}.tmp")  # whole or not at all, as the tables
        metadata = {"Date": None} if ext == "svg" else {}
        fig.savefig(partial, format=ext, dpi=DPI, bbox_inches="tight", metadata=metadata)
        os.replace(partial, path)
        written.append(path)
    plt.close(fig)
    return written


def write_figures(board_dir: Path, records: Sequence[Mapping], poison_rate: float | None,
                  facts: Facts) -> tuple[list[Figure], list[Path]]:
    """Draw every figure of :data:`FIGURES` into ``<board_dir>/figures/``; returns the figures
    and the paths written."""
    folder = Path(board_dir) / FIGURE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    board = BoardMeans(records, poison_rate, facts)
    figures, written = [], []
    with plt.rc_context({"svg.hashsalt": "vlmbackdoor-bench", "font.family": "DejaVu Sans"}):
        for figure, draw in FIGURES:
            written += _save(draw(board), folder, figure.name)
            figures.append(figure)
    return figures, written
