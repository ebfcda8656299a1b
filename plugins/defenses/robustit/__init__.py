"""RobustIT, Robust Instruction Tuning (Xun et al., arXiv 2506.05401; methods/defenses.md).

A training-time defense that replaces the attack's fine-tuning run, like ABL: from the clean base
victim, on the training set as delivered (possibly poisoned), with the standard trainable set
(perceiver + gated cross-attention = the adapters, LM input embeddings = the text-embedding
layer; methods/defenses.md §R5, methods/victim.md §A2) and the cell's recipe, plus

* Input Diversity Regularization (:mod:`.idr`): fresh random crop/flip, colour jitter and
  instruction perturbations of every sample at every step;
* Anomalous Activation Regularization (:mod:`.aar`): the top γ sharpest output channels of every
  adapter linear masked, sharpness tracked with momentum β, re-selected every step, the final
  mask written into the delivered weights.

The method section is unreadable; everything beyond one sentence per regulariser is the spec's
reconstruction, marked UNVERIFIED in :mod:`.settings`. The defender never reads the reserved
clean set, the backdoored model or poison ids (methods/defenses.md §R1, §R7.6). Its cost against a
plain fine-tune of the same recipe is measured in the run (§R4).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import replace
from typing import Any, Mapping

import numpy as np

from vlmbackdoor_bench.errors import VbbError
from vlmbackdoor_bench.hookspecs import DefenseContext, DefenseOutcome, hookimpl
from vlmbackdoor_bench.types import DefenseReport, TrainingSet

from .objective import RobustObjective
from .settings import COST_WARNING_RATIO, PRESETS, resolve

__version__ = "1.0.0"


def cell_recipe(context: DefenseContext) -> Any:
    """The cell's fine-tuning recipe: RobustIT trains with the No Defense run's (methods/defenses.md §R4)."""
    if context.recipe is None:
        raise VbbError("RobustIT needs the cell's fine-tuning recipe, and the DefenseContext has none",
                       "pass recipe= (VictimProfile.finetune_recipe) when building the DefenseContext")
    return context.recipe


def plain_step_seconds(context: DefenseContext, recipe: Any, steps: int) -> dict:
    """Seconds per optimiser step of a plain fine-tune with ``recipe`` from the base victim on
    ``steps`` global batches of the training set (a seeded draw), the reference of the cost
    ratio (methods/defenses.md §R4). Its model is thrown away."""
    data = context.training_set
    n = min(len(data), steps * recipe.batch_size)
    rows = np.sort(np.random.default_rng([context.seed, 0xC057]).choice(len(data), n, replace=False))
    sample = TrainingSet(data.images, [data.examples[i] for i in rows])
    log = context.base_victim.clone().fine_tune(sample, seed=context.seed, recipe=replace(recipe, epochs=1),
                                                progress="robustit cost reference")
    return {"steps": log["steps"], "seconds": log["seconds"], "encoder_seconds": log.get("encoder_seconds"),
            "seconds_per_step": log["seconds"] / max(log["steps"], 1)}


class RobustInstructionTuning:
    name = "robustit"
    label, order = "RobustIT (not in SRD paper)", 80
    # An extra column of Table 2 beside the paper's defenses (No Defense, ABL, VDC, CT, SRD at
    # 0-4); the SRD paper has no RobustIT column, so its paper cells stay empty (methods/defenses.md §R6).
    paper_tables = {2: 5}
    version = __version__
    presets = PRESETS
    default_preset = "paper"

    def defend(self, context: DefenseContext, params: Mapping[str, Any]) -> DefenseOutcome:
        p = resolve(params)
        recipe = cell_recipe(context)
        data = context.training_set
        steps_per_epoch = math.ceil(len(data) / recipe.batch_size)
        objective = RobustObjective(p, seed=context.seed, steps_per_epoch=steps_per_epoch)
        victim = context.base_victim.clone()  # methods/defenses.md §R1: RobustIT replaces the attack's fine-tuning run
        started = time.perf_counter()
        log = victim.fine_tune(data, seed=context.seed, objective=objective, recipe=recipe, progress="robustit")
        seconds = time.perf_counter() - started
        details: dict[str, Any] = {
            "params": p, "epochs": recipe.epochs, "steps": log["steps"], "fine_tune_seconds": seconds,
            "step_seconds": log["seconds"], "input_seconds": log.get("input_seconds"),
            "final_loss": log.get("final_loss"), "loss_per_epoch": log.get("loss_per_epoch"),
        }
        if objective.diversity is not None:
            details["idr_counts"] = dict(objective.diversity.counts)
        if objective.masks is not None:
            changed = [s.get("aar_mask_changed", 0.0) for s in log.get("objective", {}).get("steps", [])]
            details["aar"] = {"layers": len(objective.masks.keep),
                              "mean_mask_changed": float(np.mean(changed)) if changed else None}
            if p["aar_final_mask"] == "keep":
                details["aar"]["masked_channels"] = objective.masks.write_into_weights()
        if p["cost_reference_steps"]:
            idr_seconds = objective.diversity.seconds if objective.diversity is not None else 0.0
            details["cost"] = self.cost(context, recipe, int(p["cost_reference_steps"]), log, idr_seconds)
        return DefenseOutcome(victim, DefenseReport(details=details))

    @staticmethod
    def cost(context: DefenseContext, recipe: Any, steps: int, log: Mapping[str, Any], idr_seconds: float) -> dict:
        """The regularised run's seconds per step over the plain fine-tune's (methods/defenses.md §R4, same device,
        same process): ``ratio``. The plain run trains on cached encoder tokens, while IDR encodes
        each step's fresh images; ``ratio_uncached`` charges the plain run that encoder pass too,
        as a training loop without a token cache (OpenFlamingo's, the paper's) pays it anyway."""
        plain = plain_step_seconds(context, recipe, steps)
        n_steps = max(log["steps"], 1)
        per_step, idr_per_step = log["seconds"] / n_steps, idr_seconds / n_steps
        encoding_per_step = (log.get("input_seconds") or 0.0) / n_steps - idr_per_step
        ratio = per_step / plain["seconds_per_step"] if plain["seconds_per_step"] > 0 else None
        if ratio is not None and ratio > COST_WARNING_RATIO:
            warnings.warn(f"RobustIT's training cost is {ratio:.2f}x the plain fine-tune's per step "
                          f"(the paper claims < {COST_WARNING_RATIO:.2f}x, methods/defenses.md §R4)", stacklevel=2)
        return {"ratio": ratio, "ratio_uncached": per_step / (plain["seconds_per_step"] + encoding_per_step),
                "seconds_per_step": per_step, "idr_seconds_per_step": idr_per_step,
                "encoding_seconds_per_step": encoding_per_step, "plain": plain}


class RobustITAblation(RobustInstructionTuning):
    """One of the paper's ablations (methods/defenses.md §R6) as its own defense, so that its
    cells sit beside RobustIT's in one store and one Table 2 (a cell is keyed by defense name)."""

    def __init__(self, name: str, preset: str, label: str, column: int):
        self.name, self.label, self.order = name, label, RobustInstructionTuning.order + column
        self.paper_tables = {2: RobustInstructionTuning.paper_tables[2] + column}  # after RobustIT
        self.presets, self.default_preset = {preset: PRESETS[preset]}, preset


ABLATIONS = (RobustITAblation("robustit_idr", "idr-only", "RobustIT IDR only (not in SRD paper)", 1),
             RobustITAblation("robustit_aar", "aar-only", "RobustIT AAR only (not in SRD paper)", 2))


@hookimpl
def register_defenses(register) -> None:
    register(RobustInstructionTuning())
    for ablation in ABLATIONS:
        register(ablation)
