"""ABL, Anti-Backdoor Learning (Li et al., NeurIPS 2021), adapted to captioning (methods/defenses.md §2).

A training-time defense that replaces the attack's fine-tuning run: from the base checkpoint,

1. isolation: T_te = 20 % of the schedule on the whole poisoned set with the flooding loss
   |ℓ − γ| + γ (local gradient ascent once the loss falls below γ);
2. rank ℓ per instance with the isolation model; the lowest 1 % are D̂_b, the rest D̂_c;
3. continue standard fine-tuning on D̂_c for the rest of the schedule;
4. unlearn: gradient ascent on D̂_b at 0.1 × lr, up to 5 passes, stopped early when the mean
   D̂_b NLL exceeds 10 nats/token or CIDEr on 500 D̂_c instances falls by > 20 %.

The isolated set D̂_b is reported as ``removed_sample_ids`` (flagged, then unlearned), so the
harness scores it for detection precision/recall.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any, Mapping

import numpy as np
import torch

from vlmbackdoor_bench.errors import VbbError
from vlmbackdoor_bench.hookspecs import DefenseContext, DefenseOutcome, TrainingStep, hookimpl
from vlmbackdoor_bench.plugin_api import caption_scores
from vlmbackdoor_bench.types import DefenseReport, TrainingSet

from ._baseline_common import finetune_recipe, histogram, per_sample_nll, scaled_recipe, subset

__version__ = "1.0.1"

DEFAULTS: dict[str, Any] = {
    "gamma": 0.5,  # methods/defenses.md §2: flooding level γ = 0.5 nats/token
    "per_sample_flooding": False,  # §2: both codes flood the batch-mean loss (per sample UNVERIFIED)
    "isolation_fraction": 0.2,  # methods/defenses.md §2: T_te = 20 % of the fine-tuning schedule (20 of 100 epochs)
    "isolation_ratio": 0.01,  # §2: isolate the lowest p = 1 % of instances
    "unlearning_lr_factor": 0.1,  # methods/defenses.md §2: AdamW at 0.1 × the fine-tuning learning rate
    "unlearning_passes": 5,  # §2: up to 5 passes over D̂_b
    "stop_nll": 10.0,  # methods/defenses.md §2: early stop when the mean D̂_b NLL exceeds 10 nats/token
    "stop_cider_drop": 0.2,  # §2: ... or CIDEr on the held-out D̂_c falls by > 20 % (relative)
    "cider_instances": 500,  # methods/defenses.md §2: 500 held-out D̂_c instances
}
PRESETS = {
    "default": DEFAULTS,
    "isolate-10pct": {**DEFAULTS, "isolation_ratio": 0.1},  # methods/defenses.md §2: the optional 10 % knob
    "gamma-1": {**DEFAULTS, "gamma": 1.0},  # §2: the optional γ sweep {0.5, 1.0}
}


def flooding(loss: torch.Tensor, gamma: float) -> torch.Tensor:
    """|ℓ − γ| + γ (methods/defenses.md §2): the value of ℓ above γ, its gradient's sign flipped below."""
    return (loss - gamma).abs() + gamma


class FloodingObjective:
    """The isolation-phase loss: flooding on the batch-mean caption loss (or per instance)."""

    name = "abl-flooding"

    def __init__(self, gamma: float, per_sample: bool = False):
        self.gamma, self.per_sample = float(gamma), bool(per_sample)
        self.settings = {"gamma": self.gamma, "per_sample": self.per_sample}

    def loss(self, step: TrainingStep) -> torch.Tensor:
        if not self.per_sample:
            return flooding(step.caption_loss, self.gamma)
        per_instance = step.token_losses.sum(1) / step.caption_mask.sum(1).clamp(min=1)
        return flooding(per_instance, self.gamma).mean()


class GradientAscentObjective:
    """Unlearning: minimise −ℓ on the isolated set (methods/defenses.md §2 step 4)."""

    name = "abl-unlearning"
    settings: Mapping[str, Any] = {"ascent": True}

    def loss(self, step: TrainingStep) -> torch.Tensor:
        return -step.caption_loss


def lowest_loss_positions(losses: np.ndarray, ratio: float) -> np.ndarray:
    """Positions of the ⌈ratio·n⌉ lowest losses (ties broken by position): D̂_b (methods/defenses.md §2 step 2)."""
    if not 0.0 < ratio < 1.0:
        raise VbbError(f"ABL isolation_ratio = {ratio} is not in (0, 1)",
                       "set isolation_ratio in [defense.abl] to e.g. 0.01 (methods/defenses.md §2)")
    count = max(1, math.ceil(ratio * len(losses)))
    return np.argsort(losses, kind="stable")[:count]


def phase_epochs(total_epochs: int, fraction: float) -> tuple[int, int]:
    """(isolation, continuation) epochs: T_te = fraction of the schedule, at least one each."""
    if not 0.0 < fraction < 1.0:
        raise VbbError(f"ABL isolation_fraction = {fraction} is not in (0, 1)",
                       "set isolation_fraction in [defense.abl] to e.g. 0.2 (methods/defenses.md §2)")
    isolation = max(1, round(fraction * total_epochs))
    return isolation, max(1, total_epochs - isolation)


def held_out_images(training_set: TrainingSet, clean_positions: np.ndarray, n_instances: int,
                    seed: int) -> dict[int, list[str]]:
    """Image index -> its D̂_c captions, whole images drawn until ``n_instances`` are covered:
    the references of the CIDEr stop rule (methods/defenses.md §2)."""
    by_image: dict[int, list[str]] = {}
    for pos in clean_positions:
        example = training_set.examples[int(pos)]
        by_image.setdefault(example.image_index, []).append(example.caption)
    order = np.random.default_rng(seed).permutation(sorted(by_image))
    chosen, covered = {}, 0
    for index in order:
        if covered >= n_instances:
            break
        chosen[int(index)] = by_image[int(index)]
        covered += len(by_image[int(index)])
    return chosen


def held_out_cider(victim: Any, training_set: TrainingSet, references: dict[int, list[str]]) -> float:
    ids = list(references)
    captions = victim.generate(training_set.images.take(ids))
    return caption_scores(dict(zip(ids, captions)), references)["cider"]


def should_stop(isolated_nll: float, cider: float, cider_start: float, params: Mapping[str, Any]) -> str | None:
    """The benchmark's stop rule for unlearning (methods/defenses.md §2), or None to go on."""
    if isolated_nll > params["stop_nll"]:
        return f"mean isolated NLL {isolated_nll:.2f} > {params['stop_nll']}"
    if cider_start > 0 and cider < (1.0 - params["stop_cider_drop"]) * cider_start:
        return f"held-out CIDEr {cider:.1f} fell > {100 * params['stop_cider_drop']:.0f} % from {cider_start:.1f}"
    return None


class AntiBackdoorLearning:
    name = "abl"
    label, order = "ABL", 10
    paper_tables = {2: 1}  # the SRD paper's Table 2: table -> column
    version = __version__
    presets = PRESETS
    default_preset = "default"

    def defend(self, context: DefenseContext, params: Mapping[str, Any]) -> DefenseOutcome:
        params = {**DEFAULTS, **params}
        data, seed, timings = context.training_set, context.seed, {}
        recipe = finetune_recipe(context)
        iso_epochs, rest_epochs = phase_epochs(recipe.epochs, params["isolation_fraction"])
        victim = context.base_victim.clone()  # methods/defenses.md §2: ABL replaces the attack's fine-tuning run

        started = time.perf_counter()
        victim.fine_tune(data, seed=seed, objective=FloodingObjective(params["gamma"], params["per_sample_flooding"]),
                         recipe=scaled_recipe(recipe, epochs=iso_epochs), progress="abl isolation")
        timings["isolation"] = time.perf_counter() - started

        started = time.perf_counter()
        losses = per_sample_nll(victim, data)
        isolated = lowest_loss_positions(losses, params["isolation_ratio"])
        clean = np.setdiff1d(np.arange(len(data)), isolated)
        timings["ranking"] = time.perf_counter() - started

        started = time.perf_counter()
        victim.fine_tune(subset(data, clean), seed=seed + 1, recipe=scaled_recipe(recipe, epochs=rest_epochs),
                         progress="abl continue on clean")
        timings["continuation"] = time.perf_counter() - started

        started = time.perf_counter()
        unlearning = self.unlearn(victim, data, isolated, clean, recipe, params, seed)
        timings["unlearning"] = time.perf_counter() - started

        ids = [data.examples[int(i)].sample_id for i in isolated]
        (context.workdir / "isolation_losses.json").write_text(json.dumps(
            {e.sample_id: round(float(v), 5) for e, v in zip(data.examples, losses)}))
        details = {
            "flagged_as": "isolated (lowest-loss, unlearned; not dropped)",
            "epochs": {"isolation": iso_epochs, "continuation": rest_epochs, "recipe": recipe.epochs},
            "n_isolated": len(ids), "loss_threshold": float(losses[isolated].max()),
            "loss_histogram": histogram(losses), "unlearning": unlearning, "seconds": timings,
            "params": dict(params),
        }
        return DefenseOutcome(victim, DefenseReport(removed_sample_ids=ids, details=details,
                                                    artifacts={"isolation_losses": "isolation_losses.json"}))

    def unlearn(self, victim: Any, data: TrainingSet, isolated: np.ndarray, clean: np.ndarray,
                recipe: Any, params: Mapping[str, Any], seed: int) -> dict:
        """Gradient ascent on D̂_b, one recipe epoch per pass, the stop rule checked after each."""
        isolated_set = subset(data, isolated)
        references = held_out_images(data, clean, params["cider_instances"], seed)
        cider_start = held_out_cider(victim, data, references)
        ascent = scaled_recipe(recipe, epochs=1, lr=recipe.lr * params["unlearning_lr_factor"])
        log = {"cider_start": cider_start, "n_cider_images": len(references),
               "isolated_nll_start": float(per_sample_nll(victim, isolated_set).mean()), "passes": []}
        for done in range(int(params["unlearning_passes"])):
            victim.fine_tune(isolated_set, seed=seed + 2 + done, objective=GradientAscentObjective(),
                             recipe=ascent, progress=f"abl unlearning {done + 1}")
            isolated_nll = float(per_sample_nll(victim, isolated_set).mean())
            cider = held_out_cider(victim, data, references)
            log["passes"].append({"isolated_nll": isolated_nll, "cider": cider})
            reason = should_stop(isolated_nll, cider, cider_start, params)
            if reason:
                log["stopped"] = reason
                break
        return log


@hookimpl
def register_defenses(register) -> None:
    register(AntiBackdoorLearning())
