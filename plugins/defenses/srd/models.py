"""The models SRD's reward queries besides the model under defense: the surrogate M_s (methods/srd.md
§1) and the reference captioner behind r(I) (§2). Both are attack-independent and cached in SRD's
store (cache.srd_store) like the policy."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from vlmbackdoor_bench.errors import VbbError
from vlmbackdoor_bench.hookspecs import DefenseContext
from vlmbackdoor_bench.plugin_api import training_payload
from vlmbackdoor_bench.types import ImageBank, TrainingSet

from .cache import cached_stage

STATE_SET_VERSION = 1  # bump when the state-set or surrogate construction changes


def fine_tune(victim, training_set, *, seed: int, recipe, progress: str) -> dict:
    # Victim.fine_tune takes recipe=None as "the base model's own recipe" (hookspecs.Victim).
    return victim.fine_tune(training_set, seed=seed, recipe=recipe, progress=progress)


def surrogate_recipe(recipe, epochs: int):
    """The cell recipe, with ``epochs`` epochs when the preset's ``surrogate_epochs`` sets them."""
    if not epochs or recipe is None:
        return recipe
    return dataclasses.replace(recipe, epochs=epochs)


def obtain_surrogate(context: DefenseContext, p: dict, surrogate_set, data, base_id: str, recipe,
                     store):
    """methods/srd.md §1: the grid's TrojVLM srd-code cell model when it passes one, else the
    defender-owned surrogate trained (once, cached) on the custom set."""
    given = context.extras.get("srd_code_surrogate") if p["surrogate"] == "trojvlm-cell" else None
    if given is not None:
        return given, {"source": "grid: TrojVLM srd-code cell model"}
    recipe = surrogate_recipe(recipe, p.get("surrogate_epochs", 0))
    payload = {"state_set_version": STATE_SET_VERSION, "state_set_size": p["state_set_size"],
               "max_state_fraction": p["max_state_fraction"],
               "caption_rule": p.get("surrogate_caption_rule", "insert"), "defender_data": data.fingerprint,
               "seed": context.seed, "base": base_id, "recipe": recipe.to_dict() if recipe is not None else None,
               **training_payload(context.stage.device, context.stage.precision)}  # {} on CPU fp32

    def build(tmp: Path) -> dict:
        victim = context.base_victim.clone()
        log = fine_tune(victim, surrogate_set, seed=context.seed, recipe=recipe, progress="srd surrogate")
        victim.save(tmp)
        return {"loss_per_epoch": log.get("loss_per_epoch"), "steps": log.get("steps")}

    entry, info = cached_stage(store, "surrogate", payload, build)
    victim = context.base_victim.clone()
    victim.load_trainable(entry.path)
    source = "custom poisoned set (defender-owned)"
    if p["surrogate"] == "trojvlm-cell":
        source += "; the TrojVLM srd-code cell model is not in DefenseContext.extras"
    return victim, {"source": source, "epochs": getattr(recipe, "epochs", None), **info}


def reserved_captioner(context: DefenseContext, recipe, base_id: str, store):
    """The base victim fine-tuned (standard recipe, once, cached) on every caption of the grid's
    reserved clean split, which is disjoint from the fine-tuning data (methods/srd.md §2, embedded
    profile)."""
    split = context.clean_reserved
    if split is None:
        raise VbbError("SRD reference = 'reserved' needs the grid's reserved clean split "
                       "(DefenseContext.clean_reserved) and this dataset has none",
                       "use a COCO dataset with a restval/pretrain split, or set reference = 'base' "
                       "(or tiny_reference = 'base' on the tiny profile) in [defense.srd]")
    examples = split.caption_examples()
    payload = {"split": split.manifest.to_dict(), "seed": context.seed, "base": base_id,
               "recipe": recipe.to_dict() if recipe is not None else None,
               **training_payload(context.stage.device, context.stage.precision)}

    def build(tmp: Path) -> dict:
        victim = context.base_victim.clone()
        log = fine_tune(victim, TrainingSet(ImageBank(split.images), examples), seed=context.seed,
                        recipe=recipe, progress="srd reference captioner")
        victim.save(tmp)
        return {"loss_per_epoch": log.get("loss_per_epoch"), "steps": log.get("steps")}

    entry, info = cached_stage(store, "reference", payload, build)
    victim = context.base_victim.clone()
    victim.load_trainable(entry.path)
    label = (f"base victim fine-tuned on the reserved clean split {split.dataset}:{split.split} "
             f"({len(split)} images, {len(examples)} captions)")
    return victim, label, {"key": info["key"], "cached": info["cached"], "split": split.split}


def reference_captioner(context: DefenseContext, p: dict, recipe, base_id: str, store):
    """methods/srd.md §2: (victim, label, cache info) of the captioner behind r(I): the clean base
    victim (``base``), the base fine-tuned on the reserved clean split (``reserved``), the clean
    reference model (``oracle``, analysis only), or BLIP-large (`srd-code`), never local offline."""
    clean_model = context.extras.get("clean_model")
    if p["reference"] == "base":
        return context.base_victim, "base victim (public pretrained checkpoint)", None
    if p["reference"] == "reserved":
        return reserved_captioner(context, recipe, base_id, store)
    if p["reference"] == "oracle":
        if clean_model is None:
            raise VbbError("SRD reference = 'oracle' needs the clean reference model, which the grid "
                           "does not pass", "use reference = 'base', or have the grid put the clean "
                           "model in DefenseContext.extras['clean_model']")
        return clean_model, "ORACLE: clean reference model (analysis only)", None
    if clean_model is not None:
        return clean_model, "clean reference model (BLIP-large not available offline)", None
    return context.base_victim, ("base victim (BLIP-large not available offline and the grid passes "
                                 "no clean reference model)"), None
