"""A defense's compact diagnostics for the cell record (``CellResult.diagnostics``).

The leaderboard's page and figures are rebuilt from ``results.csv`` alone, so whatever a figure
needs must be a handful of numbers per cell, not an artifact file: where a masking defense put
its masks (a coarse grid over the image frame) and, for SRD, its RL diagnostics and a binned
reward curve. Every part is a flat ``name -> number`` mapping, so that each number is one row of
the long form (leaderboard/results.py) and reads back unchanged (leaderboard/merge.py).
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

import numpy as np

from .types import IMAGE_SIZE

#: Cells per side of the mask grid: 8 x 8 blocks of 28 px over the 224 px frame (types.IMAGE_SIZE).
MASK_GRID = 8
#: Points the reward curve is reduced to (means of equal runs of the recorded steps).
REWARD_BINS = 20
#: The key under which SRD's defense report details carry its RL diagnostics (plugins/defenses/srd).
SRD_RL_KEY = "srd_rl"
#: The parts of ``CellResult.diagnostics``; each is a flat mapping of finite numbers.
MASK_GRID_PART, REWARD_CURVE_PART, SRD_RL_PART = "mask_grid", "reward_curve", "srd_rl"
PARTS: tuple[str, ...] = (MASK_GRID_PART, REWARD_CURVE_PART, SRD_RL_PART)


def grid_name(row: int, col: int) -> str:
    """The stored name of one mask-grid block, e.g. ``r0c7``."""
    return f"r{row}c{col}"


def bin_name(index: int) -> str:
    """The stored name of one reward-curve point, e.g. ``b07`` (sorts as text)."""
    return f"b{index:02d}"


def mask_grid(mask_boxes: Mapping[str, Iterable[int]], cells: int = MASK_GRID) -> dict[str, float]:
    """Per block of the frame, the mean share (%) of its pixels that the instances' masks covered.

    ``mask_boxes``: sample id -> [row0, row1, col0, col1], half-open in the 224 px frame
    (types.DefenseReport.mask_boxes). Empty when no box was reported.
    """
    if not mask_boxes:
        return {}
    heat = np.zeros((IMAGE_SIZE, IMAGE_SIZE))
    for box in mask_boxes.values():
        r0, r1, c0, c1 = (int(v) for v in box)
        heat[max(r0, 0):min(r1, IMAGE_SIZE), max(c0, 0):min(c1, IMAGE_SIZE)] += 1.0
    heat *= 100.0 / len(mask_boxes)
    edges = np.linspace(0, IMAGE_SIZE, cells + 1).round().astype(int)
    return {grid_name(i, j): float(heat[edges[i]:edges[i + 1], edges[j]:edges[j + 1]].mean())
            for i in range(cells) for j in range(cells)}


def grid_matrix(part: Mapping[str, float]) -> np.ndarray | None:
    """A stored mask grid back as a square matrix (None when absent or incomplete)."""
    side = math.isqrt(len(part))
    if not part or side * side != len(part):
        return None
    try:
        return np.array([[float(part[grid_name(i, j)]) for j in range(side)] for i in range(side)])
    except KeyError:
        return None


def _curve_values(curve: Any) -> list[float]:
    """Rewards of a curve given as numbers or as [step, reward] pairs (the last item of each)."""
    values = []
    for point in curve if isinstance(curve, (list, tuple)) else []:
        item = point[-1] if isinstance(point, (list, tuple)) and point else point
        if isinstance(item, (int, float)) and not isinstance(item, bool) and math.isfinite(item):
            values.append(float(item))
    return values


def binned_curve(curve: Any, bins: int = REWARD_BINS) -> dict[str, float]:
    """The curve's rewards as at most ``bins`` means of consecutive, equal-as-possible runs."""
    values = _curve_values(curve)
    if not values:
        return {}
    runs = np.array_split(np.asarray(values), min(bins, len(values)))
    return {bin_name(k): float(run.mean()) for k, run in enumerate(runs)}


def _scalars(details: Mapping, prefix: str = "") -> dict[str, float]:
    """The finite numbers of a (nested) mapping, nested names joined by ``.``; lists left out."""
    out: dict[str, float] = {}
    for key, value in details.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_scalars(value, f"{name}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[name] = float(value)
    return out


def defense_diagnostics(report: Mapping) -> dict[str, dict[str, float]]:
    """The diagnostics of one defense report (persist.report_to_dict's form): the mask grid when
    masks were reported, and SRD's RL numbers and binned ``reward_curve`` when its details carry
    :data:`SRD_RL_KEY`. Parts without numbers are left out."""
    rl = (report.get("details") or {}).get(SRD_RL_KEY)
    rl = rl if isinstance(rl, Mapping) else {}
    parts = {MASK_GRID_PART: mask_grid(report.get("mask_boxes") or {}),
             REWARD_CURVE_PART: binned_curve(rl.get("reward_curve")),
             SRD_RL_PART: _scalars(rl)}
    return {name: part for name, part in parts.items() if part}
