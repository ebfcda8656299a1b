"""Re-fine-tune only: the control of SRD's and Random's stage 4 (issue 31).

SRD and Random masking end by re-fine-tuning the backdoored model on the training set with one
mask painted on every image, captions and instructions unchanged (methods/srd.md §7). This control
runs that re-fine-tune exactly (same start model M_bd, same examples, same recipe, same seed) on
the images as delivered, unmasked, so a masking defense's gain is read against what the extra
epochs alone do. Not a defense of the SRD paper: a Table 3 column marked as a control.

Preset ``clean-split`` instead re-fine-tunes on the unpoisoned fine-tuning split (the grid's
``extras["clean_split"]``, an analysis aid that no real defender has): the other reading of
"the clean images", what extra epochs on truly clean data do.
"""

from __future__ import annotations

import time
from typing import Any, Mapping

from vlmbackdoor_bench.errors import VbbError
from vlmbackdoor_bench.hookspecs import DefenseContext, DefenseOutcome, hookimpl
from vlmbackdoor_bench.types import DefenseReport, ImageBank, TrainingSet

__version__ = "1.0.0"

DATA_CHOICES = ("as-delivered", "clean-split")


def control_set(context: DefenseContext, data: str) -> TrainingSet:
    """SRD's re-fine-tune set without its masks (``as-delivered``), or the clean split's examples."""
    if data == "as-delivered":
        return context.training_set
    split = context.extras.get("clean_split")
    if split is None:
        raise VbbError("refinetune data = 'clean-split' needs the unpoisoned fine-tuning split, which "
                       "the grid did not pass", "use data = 'as-delivered', or run it inside the grid")
    return TrainingSet(ImageBank(split.images), split.caption_examples())


class RefinetuneControl:
    name = "refinetune"
    label, order = "Re-fine-tune only (control, not in SRD paper)", 55
    paper_tables = {3: 5}  # after Table 3's Random, PPO, SAC, DQN (1-4): a control column
    version = __version__
    presets = {"srd": {"data": "as-delivered"}, "clean-split": {"data": "clean-split"}}
    default_preset = "srd"

    def defend(self, context: DefenseContext, params: Mapping[str, Any]) -> DefenseOutcome:
        p = {**self.presets[self.default_preset], **params}
        if set(p) != {"data"} or p["data"] not in DATA_CHOICES:
            raise VbbError(f"refinetune parameters {dict(params)} are not valid",
                           f"the only parameter is data, one of {DATA_CHOICES}")
        data = control_set(context, p["data"])
        victim = context.backdoored  # SRD's stage 4 continues from M_bd (methods/srd.md §7)
        started = time.perf_counter()
        log = context.fine_tune(victim, data, progress="refinetune control")
        details = {"data": p["data"], "n_examples": len(data), "seconds": time.perf_counter() - started,
                   "recipe": context.recipe.to_dict() if context.recipe is not None else "victim default",
                   "steps": log.get("steps"), "loss_per_epoch": log.get("loss_per_epoch")}
        return DefenseOutcome(victim, DefenseReport(details=details))


@hookimpl
def register_defenses(register) -> None:
    register(RefinetuneControl())
