"""Stage 3: one red mask on every fine-tuning instance, best of up to 5 sampled actions
(methods/srd.md §6), and the masked training set for stage 4 (§7: captions unchanged).

A policy exposes ``probabilities(images) -> (B, |A|)``: the distribution it samples a cleaning
action from on the original image (DQN: ε-greedy with ε = 0.05; PPO, SAC: their categorical
policy; random masking: uniform). Instances are cleaned in batches of images so that each trial
of every instance on a batch is one ``generate`` call; a (image, mask) pair is captioned once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from vlmbackdoor_bench.types import DEFAULT_INSTRUCTION, Example, ImageBank, TrainingSet

from .env import MaskRewarder
from .geometry import apply_masks, n_actions
from .reward import BEST_REWARD

CLEANING_TRIALS = 5  # methods/srd.md §6: up to 5 trials per instance
CHUNK_IMAGES = 256  # images per cleaning batch (memory and batching only)


class UniformPolicy:
    """methods/srd.md §8 Random: one action uniform over the preset's discrete action space."""

    algorithm = "random"

    def __init__(self, sizes):
        self.n = n_actions(sizes)

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        return np.full((len(images), self.n), 1.0 / self.n)


@dataclass
class CleaningResult:
    training_set: TrainingSet
    actions: dict[str, int]  # sample id -> the action of its kept mask
    rewards: dict[str, float]  # sample id -> the reward of the kept mask (None: not scored)
    trials: dict[str, int]
    details: dict = field(default_factory=dict)


def sample_actions(probabilities: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    cumulative = probabilities.cumsum(axis=1)
    draws = rng.random(len(probabilities))[:, None] * cumulative[:, -1:]
    return np.minimum((draws > cumulative).sum(axis=1), probabilities.shape[1] - 1)


def clean_training_set(training_set: TrainingSet, policy, rewarder: MaskRewarder | None, *,
                       sizes, seed: int, trials: int = CLEANING_TRIALS, prompt: str = "default",
                       select: bool = True) -> CleaningResult:
    """Every instance exactly once, keyed by sample id (methods/srd.md §6).

    ``select``: the best-of-``trials`` procedure scored by ``rewarder`` (keep the highest strictly
    positive reward, first on ties, stop at +3, else the last trial; a mask is scored once per
    image, and an instance whose trials all drew one mask keeps it unscored); without it (random
    masking, methods/srd.md §8, or a single trial, which is kept whatever it scores) one sampled action per
    instance is kept and nothing is captioned."""
    rng = np.random.default_rng([seed, 0xC1EA])
    examples = training_set.examples
    prompts = [DEFAULT_INSTRUCTION if prompt == "default" else e.instruction for e in examples]
    by_row: dict[int, list[int]] = {}
    for k, e in enumerate(examples):
        by_row.setdefault(e.image_index, []).append(k)
    rows = sorted(by_row)
    chosen = np.zeros(len(examples), dtype=np.int64)
    kept_reward = [None] * len(examples)
    used_trials = np.zeros(len(examples), dtype=np.int64)
    unscored = 0  # instances whose trials all drew the same mask
    for start in range(0, len(rows), CHUNK_IMAGES):
        chunk = rows[start:start + CHUNK_IMAGES]
        images = training_set.images.take(chunk)
        position = {row: p for p, row in enumerate(chunk)}
        probs = policy.probabilities(images)
        members = [k for row in chunk for k in by_row[row]]
        at = np.array([position[examples[k].image_index] for k in members])
        if not select:
            chosen[members] = sample_actions(probs[at], rng)
            used_trials[members] = 1
            continue
        # every trial's action, drawn up front on the original image (methods/srd.md §6 step 2)
        draws = np.stack([sample_actions(probs[at], rng) for _ in range(trials)], axis=1)
        used_trials[members] = trials
        # an instance whose trials all drew one mask keeps that mask whatever it scores (methods/srd.md §6 steps
        # 3-4), so it is not captioned; only instances with a real choice are scored
        one_mask = (draws == draws[:, :1]).all(axis=1)
        chosen[[members[i] for i in np.flatnonzero(one_mask)]] = draws[one_mask, 0]
        unscored += int(one_mask.sum())
        scored_rows = np.flatnonzero(~one_mask)
        if not len(scored_rows):
            continue
        members, at, draws = [members[i] for i in scored_rows], at[scored_rows], draws[scored_rows]
        keys = [("image", examples[k].image_index) for k in members]
        member_prompts = [prompts[k] for k in members]
        refs, s0, f0 = rewarder.baseline(keys, images[at], member_prompts)  # methods/srd.md §6 step 1 with M_bd
        best = np.full(len(members), -np.inf)
        active = np.ones(len(members), dtype=bool)
        for trial in range(trials):
            live = np.flatnonzero(active)
            if not len(live):
                break
            actions = draws[live, trial]
            masked = apply_masks(images[at[live]], actions, sizes)
            r, _, _, _ = rewarder.score([keys[i] for i in live], actions, masked,
                                        [member_prompts[i] for i in live], [refs[i] for i in live],
                                        s0[live], f0[live])
            for j, i in enumerate(live):
                k = members[i]
                if r[j] > 0 and r[j] > best[i]:  # highest strictly positive, first on ties (methods/srd.md §6 step 3)
                    best[i], chosen[k], kept_reward[k] = r[j], actions[j], float(r[j])
                elif best[i] <= 0:  # nothing positive yet: the last trial's mask (methods/srd.md §6 step 4)
                    chosen[k], kept_reward[k] = actions[j], float(r[j])
                if r[j] >= BEST_REWARD:  # stop early at +3 (methods/srd.md §6 step 3)
                    active[i] = False
                    used_trials[k] = trial + 1
    cleaned = masked_training_set(training_set, chosen, sizes)
    ids = [e.sample_id for e in examples]
    scored = [r for r in kept_reward if r is not None]
    details = {"n_instances": len(examples), "n_images": len(rows),
               "n_masked_images": len(cleaned.images.extra), "selection": "best-of-trials" if select else "none",
               "trials_max": trials if select else 1, "mean_trials": float(used_trials.mean()) if len(examples) else 0.0,
               "single_mask_instances": unscored if select else None,
               "positive_fraction": float(np.mean([r > 0 for r in scored])) if scored else None,
               "reward_counts": {str(v): int(c) for v, c in zip(*np.unique(scored, return_counts=True))} if scored else {}}
    return CleaningResult(cleaned, dict(zip(ids, chosen.tolist())), dict(zip(ids, kept_reward)),
                          dict(zip(ids, used_trials.tolist())), details)


class MaskedImages:
    """Each distinct (image, action) pair's masked image, painted when it is read.

    The random and stochastic policies give nearly every one of 25,000 instances its own masked
    image: held as one array they were 3.7 GB (the ablations' peak), though the re-fine-tune
    reads each once, to encode it (its frozen-encoder tokens are what it trains on)."""

    def __init__(self, images: ImageBank, pairs: list[tuple[int, int]], sizes):
        self.images, self.pairs, self.sizes = images, pairs, sizes

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, k: int) -> np.ndarray:
        row, action = self.pairs[k]
        return apply_masks(self.images.take([row]), [action], self.sizes)[0]


def masked_training_set(training_set: TrainingSet, actions: np.ndarray, sizes) -> TrainingSet:
    """A new ImageBank whose ``extra`` holds each distinct (image, mask) once (painted on
    demand); every example points at its masked image, captions and prompts unchanged
    (methods/srd.md §7)."""
    examples = training_set.examples
    pairs = sorted({(e.image_index, int(a)) for e, a in zip(examples, actions)})
    slot = {pair: k for k, pair in enumerate(pairs)}
    base = training_set.images.base
    new_examples = [Example(e.sample_id, len(base) + slot[(e.image_index, int(a))], e.caption, e.instruction)
                    for e, a in zip(examples, actions)]
    return TrainingSet(ImageBank(base, MaskedImages(training_set.images, pairs, sizes)), new_examples)
