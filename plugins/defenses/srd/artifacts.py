"""Interpretability figures of one SRD run (matplotlib, Agg): where the masks went over the
cleaned set, before/after examples, and the RL reward curve."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from vlmbackdoor_bench.types import IMAGE_SIZE  # noqa: E402

from .geometry import mask_box  # noqa: E402

N_EXAMPLES = 4
SMOOTH = 10  # vector steps in the reward curve's moving average


def coverage(actions, sizes) -> np.ndarray:
    """How many cleaned instances have each pixel masked (224 x 224)."""
    heat = np.zeros((IMAGE_SIZE, IMAGE_SIZE))
    values, counts = np.unique(np.asarray(list(actions), dtype=np.int64), return_counts=True)
    for action, count in zip(values, counts):
        r0, r1, c0, c1 = mask_box(int(action), sizes)
        heat[r0:r1, c0:c1] += count
    return heat


def mask_heatmap(path: Path, actions, sizes, title: str) -> None:
    heat = coverage(actions, sizes)
    fig, ax = plt.subplots(figsize=(5, 4.4))
    shown = ax.imshow(heat / max(len(actions), 1), cmap="inferno", vmin=0, extent=(0, IMAGE_SIZE, IMAGE_SIZE, 0))
    fig.colorbar(shown, ax=ax, label="share of cleaned instances masking the pixel")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("x (column)")
    ax.set_ylabel("y (row)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def before_after(path: Path, before: np.ndarray, after: np.ndarray, labels) -> None:
    n = len(before)
    fig, axes = plt.subplots(2, n, figsize=(2.4 * n, 5.0), squeeze=False)
    for k in range(n):
        for row, (images, name) in enumerate(((before, "as given"), (after, "cleaned"))):
            axes[row, k].imshow(images[k])
            axes[row, k].set_xticks([])
            axes[row, k].set_yticks([])
            axes[row, k].set_title(f"{name}\n{labels[k]}" if row else name, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def reward_curve(path: Path, log: dict, title: str) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.6))
    steps = np.array(log.get("step_rewards", []), dtype=float).reshape(-1, 2)
    if len(steps):
        kernel = np.ones(min(SMOOTH, len(steps))) / min(SMOOTH, len(steps))
        ax.plot(steps[:, 0], steps[:, 1], color="0.8", lw=0.8, label="mean reward per vector step")
        ax.plot(steps[len(kernel) - 1:, 0], np.convolve(steps[:, 1], kernel, mode="valid"), color="C0",
                label=f"moving average ({len(kernel)} steps)")
    episodes = np.array(log.get("episode_returns", []), dtype=float).reshape(-1, 2)
    if len(episodes):
        twin = ax.twinx()
        twin.scatter(episodes[:, 0], episodes[:, 1], color="C3", s=10, label="episode return")
        twin.set_ylabel("episode return", color="C3")
    ax.set_xlabel("environment steps (transitions)")
    ax.set_ylabel("reward")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
