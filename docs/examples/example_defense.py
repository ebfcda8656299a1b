"""A complete defense plugin: drop the training samples the public base model finds unlikely,
then fine-tune the base model again on the rest.

Guide: docs/guides/adding-a-defense.md. Everything a defense may use arrives in its
``DefenseContext``: the backdoored model, its training set (no poison labels), the public base
model, the cell's seed and fine-tuning recipe (``context.fine_tune``) and a work directory for
artefacts. It returns the model to evaluate and a report of what it removed, from which the
grid computes detection precision and recall.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

import numpy as np

from vlmbackdoor_bench import hookimpl
from vlmbackdoor_bench.hookspecs import DefenseContext, DefenseOutcome
from vlmbackdoor_bench.types import DefenseReport, TrainingSet

__version__ = "1.0.0"

BATCH = 64  # images per caption_nll call (memory only)


def caption_losses(victim, training_set: TrainingSet) -> np.ndarray:
    """Each example's caption NLL under ``victim``, batch by batch."""
    examples = training_set.examples
    out = []
    for start in range(0, len(examples), BATCH):
        chunk = examples[start:start + BATCH]
        images = training_set.images.take([e.image_index for e in chunk])
        out.append(victim.caption_nll(images, [e.caption for e in chunk], [e.instruction for e in chunk]))
    return np.concatenate(out)


class LossFilter:
    name = "example-loss-filter"
    version = __version__
    label, order = "Loss filter", 100  # column label and position in the tables
    # A caption the base model gives less than e^-5 (0.7 %) is treated as planted.
    presets = {"default": {"max_nll": 5.0}}
    default_preset = "default"

    def defend(self, context: DefenseContext, params: Mapping[str, Any]) -> DefenseOutcome:
        losses = caption_losses(context.base_victim, context.training_set)
        examples = context.training_set.examples
        suspicious = losses > params["max_nll"]
        kept = TrainingSet(context.training_set.images, [e for e, s in zip(examples, suspicious) if not s])
        victim = context.base_victim.clone()
        log = context.fine_tune(victim, kept, progress=self.name)
        (context.workdir / "losses.json").write_text(json.dumps(
            {e.sample_id: float(v) for e, v in zip(examples, losses)}))
        report = DefenseReport(
            removed_sample_ids=[e.sample_id for e, s in zip(examples, suspicious) if s],
            details={"n_kept": len(kept), "max_nll": params["max_nll"], "retrain": log},
            artifacts={"losses": "losses.json"})
        return DefenseOutcome(victim, report)


@hookimpl
def register_defenses(register) -> None:
    register(LossFilter())
