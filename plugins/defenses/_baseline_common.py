"""What the three classification baselines (ABL, CT, VDC) share (methods/defenses.md §0).

* the fine-tuning recipe the harness trains every model with (methods/victim.md §A3), so a
  baseline's phases are fractions of the same schedule;
* the per-sample loss ℓ = mean caption-token NLL under teacher forcing (methods/defenses.md §0);
* "retrain after filtering": fine-tune the clean base victim on the kept instances (§0).
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any, Iterable, Sequence

import numpy as np

from vlmbackdoor_bench.errors import VbbError
from vlmbackdoor_bench.hookspecs import DefenseContext
from vlmbackdoor_bench.types import Example, TrainingSet

NLL_CHUNK = 512  # instances whose images are gathered at once (a 224 px uint8 image is 150 kB)


def finetune_recipe(context: DefenseContext) -> Any:
    """The recipe of the cell's fine-tunings: ``context.recipe`` (the grid always passes it),
    else the base victim's own (a context built outside the grid, e.g. in a test)."""
    if context.recipe is not None:
        return context.recipe
    recipe = getattr(context.base_victim, "recipe", None)
    if recipe is None:
        raise VbbError("the defense cannot find the fine-tuning recipe of this cell",
                       "pass it as DefenseContext.recipe or use a victim with .recipe")
    return recipe


def scaled_recipe(recipe: Any, **changes: Any) -> Any:
    """The recipe with some knobs changed (epochs of a phase, an unlearning lr)."""
    return replace(recipe, **changes)


def per_sample_nll(victim: Any, training_set: TrainingSet,
                   examples: Sequence[Example] | None = None) -> np.ndarray:
    """ℓ of every example (methods/defenses.md §0): eval mode, no augmentation, one value per
    instance; images are gathered in chunks so 25k instances never sit in memory at once."""
    examples = list(training_set.examples if examples is None else examples)
    out = []
    for start in range(0, len(examples), NLL_CHUNK):
        chunk = examples[start:start + NLL_CHUNK]
        images = training_set.images.take([e.image_index for e in chunk])
        out.append(np.asarray(victim.caption_nll(images, [e.caption for e in chunk],
                                                 [e.instruction for e in chunk]), dtype=np.float64))
    values = np.concatenate(out) if out else np.zeros(0)
    if not np.all(np.isfinite(values)):
        raise VbbError("the per-sample caption NLL is not finite for some instances",
                       "check the victim's weights (a diverged model gives NaN/inf losses)")
    return values


def subset(training_set: TrainingSet, keep: Iterable[int]) -> TrainingSet:
    """The same image bank with the examples at positions ``keep`` (in their original order)."""
    return TrainingSet(training_set.images, [training_set.examples[i] for i in sorted(set(keep))])


def retrain_base(context: DefenseContext, kept: TrainingSet, progress: str) -> tuple[Any, dict]:
    """methods/defenses.md §0: fine-tune the base victim on the kept instances, standard recipe."""
    if len(kept) == 0:
        raise VbbError("the defense removed every training instance; nothing is left to retrain on",
                       "relax the defense's thresholds in [defense.<name>] of benchmark.toml")
    started = time.perf_counter()
    victim = context.base_victim.clone()
    log = victim.fine_tune(kept, seed=context.seed, recipe=finetune_recipe(context), progress=progress)
    return victim, {"n_kept": len(kept), "seconds": time.perf_counter() - started,
                    "final_loss": log.get("final_loss")}


def histogram(values: np.ndarray, bins: int = 20) -> dict:
    """A JSON-able histogram of a per-sample statistic (for the report's details)."""
    counts, edges = np.histogram(values, bins=bins)
    return {"counts": counts.tolist(), "edges": [round(float(e), 4) for e in edges]}
