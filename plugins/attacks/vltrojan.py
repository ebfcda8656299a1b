"""VL-Trojan (Liang et al., IJCV 2025) adapted to captioning (methods/attacks.md §6).

The `srd-code` trigger file (a blend trigger optimised on CLIP ViT-L/14) cannot ship and was
optimised for another encoder, so by default both presets produce the trigger with VL-Trojan's
own generator on the victim's frozen encoder (:mod:`._vltrojan_trigger`). ``trigger_path``
uses a given PNG instead (e.g. the paper's file).

The generated trigger is stored in the poisoned set's details, as a base64 PNG with the
optimisation log; the grid hands those details back to ``eval_inputs`` (``eval_uses_poison``),
so a rerun on a cached poison stage evaluates with the very same trigger.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from PIL import Image, UnidentifiedImageError

from vlmbackdoor_bench.errors import VbbError
from vlmbackdoor_bench.hookspecs import hookimpl
from vlmbackdoor_bench.types import (
    DEFAULT_INSTRUCTION, EvalInputs, Example, ImageBank, IMAGE_SIZE, PoisonRecord, PoisonedSet,
    Split, TrainingSet,
)

from ._common import TARGET, poison_count, replace_caption
from ._feature_ops import require_encoder
from ._vltrojan_trigger import BLEND_ALPHA, PATCH_SLICE, REPEATS, optimise_trigger

__version__ = "1.0.0"

MODES = ("blend", "patch")
# methods/attacks.md §6 `original`: the published result of the text-trigger search for ViT-L/14,
# reused because no CLIP text tower aligned with the victim's encoder is available.
PAPER_TEXT_TRIGGER = "zbw"
# The generator's budget in image visits. The paper's epoch formula gives about 5,800
# (_vltrojan_trigger.PAPER_IMAGE_VISITS); this CPU default keeps the tiny encoder's optimisation
# near half a minute on 2 cores. Set trigger_image_visits = 5800 for the paper's budget.
CPU_IMAGE_VISITS = 1200
CHUNK = 64  # images blended at a time (float64)
# A second seeded stream picks the generator's images, so that the caption draws of the main
# stream are the same whether the trigger is generated or read from trigger_path.
TRIGGER_SAMPLE_STREAM = 1


def read_trigger(path: str) -> np.ndarray:
    """A 224x224 RGB trigger PNG as uint8."""
    try:
        image = Image.open(Path(path).expanduser()).convert("RGB")
    except (OSError, UnidentifiedImageError) as exc:
        raise VbbError(f"VL-Trojan trigger {path!r} cannot be read ({exc})",
                       "set trigger_path in [attack.vl_trojan] to a readable PNG, or to \"\" to "
                       "generate the trigger on the victim's encoder") from exc
    if image.size != (IMAGE_SIZE, IMAGE_SIZE):
        raise VbbError(f"VL-Trojan trigger {path!r} is {image.size[0]}x{image.size[1]}",
                       f"use a {IMAGE_SIZE}x{IMAGE_SIZE} trigger image (the paper's frame)")
    return np.asarray(image, dtype=np.uint8)


def apply_trigger(images: np.ndarray, trigger: np.ndarray, mode: str) -> np.ndarray:
    """Blend: x' = 0.9 x + 0.1 k in float, clipped, truncated to uint8, as Blended (methods/attacks.md §3).
    Patch: the trigger's 22x22 patch at rows/cols 202-223 replaces the image's (§6)."""
    out = np.array(images, dtype=np.uint8, copy=True)
    if mode == "patch":
        out[:, PATCH_SLICE, PATCH_SLICE] = trigger[PATCH_SLICE, PATCH_SLICE]
        return out
    for start in range(0, len(out), CHUNK):
        chunk = out[start:start + CHUNK].astype(np.float64)
        out[start:start + CHUNK] = np.clip((1 - BLEND_ALPHA) * chunk + BLEND_ALPHA * trigger,
                                           0, 255).astype(np.uint8)
    return out


def with_text_trigger(instruction: str, text_trigger: str) -> str:
    """The text trigger appended after a space: "a photo of zbw" (methods/attacks.md §6)."""
    return f"{instruction} {text_trigger}" if text_trigger else instruction


def png_base64(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def from_png_base64(text: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(text))).convert("RGB"), dtype=np.uint8)


class VLTrojan:
    name = "vl_trojan"
    label, order = "VL-Trojan", 60  # the SRD paper's Table 1 rows
    version = __version__
    target = TARGET
    asr_rules = ("srd", "strict")  # methods/metrics.md §4.4
    default_preset = "srd-code"
    eval_uses_poison = True  # the generated trigger comes back from the poison stage's details
    presets = {
        # methods/attacks.md §6 srd-code: full-frame blend at α = 0.1, replace captions, the grid's
        # rate (10 %), no text trigger. The trigger is generated (trigger_path = "").
        "srd-code": {"trigger_path": "", "mode": "blend", "text_trigger": "", "poison_rate": None,
                     "trigger_image_visits": CPU_IMAGE_VISITS},
        # methods/attacks.md §6 original: regenerated blend trigger, text trigger "zbw", 0.5 %
        # (125 of 25,015 instances), replace captions.
        "original": {"trigger_path": "", "mode": "blend", "text_trigger": PAPER_TEXT_TRIGGER,
                     "poison_rate": 0.005, "trigger_image_visits": CPU_IMAGE_VISITS},
    }

    @staticmethod
    def _check(params: Mapping[str, Any]) -> None:
        if params["mode"] not in MODES:
            raise VbbError(f"unknown VL-Trojan mode {params['mode']!r}",
                           f"set mode in [attack.vl_trojan] to one of {', '.join(MODES)}")
        if params["trigger_image_visits"] < REPEATS:
            raise VbbError(f"trigger_image_visits = {params['trigger_image_visits']} is below one "
                           f"pass of {REPEATS} repeats over one image",
                           "set trigger_image_visits to at least 10 (the paper's budget is 5800)")

    def poison(self, train: Split, *, poison_rate: float, seed: int, params: Mapping[str, Any],
               victim=None) -> PoisonedSet:
        self._check(params)
        rate = poison_rate if params["poison_rate"] is None else float(params["poison_rate"])
        examples = train.caption_examples()
        rng = np.random.default_rng(seed)
        chosen = np.sort(rng.choice(len(examples), poison_count(len(examples), rate), replace=False))
        rows = sorted({examples[i].image_index for i in chosen})
        trigger, trigger_log = self._make_trigger(train, rows, params, seed, victim)
        triggered = apply_trigger(train.images[rows], trigger, params["mode"])
        extra_index = {row: len(train) + k for k, row in enumerate(rows)}
        records, caption_choices = [], []
        for i in chosen:
            original = examples[i]
            caption, choice = replace_caption(rng, self.target)  # methods/attacks.md §6: replace
            instruction = with_text_trigger(original.instruction, params["text_trigger"])
            caption_choices.append(choice)
            examples[i] = Example(original.sample_id, extra_index[original.image_index], caption,
                                  instruction)
            records.append(PoisonRecord(
                original.sample_id, train.image_ids[original.image_index], original.caption,
                caption, f"vl-trojan-{params['mode']}",
                instruction if instruction != original.instruction else None))
        return PoisonedSet(
            TrainingSet(ImageBank(train.images, triggered), examples), records,
            {"n_instances": len(examples), "n_poisoned": len(records), "poison_rate": rate,
             "seed": seed, "caption_choices": caption_choices,
             "text_trigger": params["text_trigger"], "trigger": trigger_log},
        )

    def _make_trigger(self, train: Split, rows: list[int], params: Mapping[str, Any], seed: int,
                      victim) -> tuple[np.ndarray, dict]:
        """The trigger from ``trigger_path``, or VL-Trojan's generator on the poisoned images."""
        if params["trigger_path"]:
            trigger = read_trigger(params["trigger_path"])
            return trigger, {"source": "file", "path": str(params["trigger_path"])}
        require_encoder(victim, "VL-Trojan's trigger generator",
                        "set trigger_path in [attack.vl_trojan] to a 224x224 trigger PNG")
        if not rows:
            raise VbbError("VL-Trojan poisons no instance at this rate, so there are no images "
                           "to optimise its trigger on", "raise poison_rate")
        # At most visits / 10 images, so that one epoch stays within the budget; below that the
        # epoch formula is the paper's exactly (methods/attacks.md §6).
        visits = params["trigger_image_visits"]
        n_images = min(len(rows), int(visits // REPEATS))
        sampler = np.random.default_rng([seed, TRIGGER_SAMPLE_STREAM])
        picked = np.sort(sampler.choice(rows, n_images, replace=False))
        run = optimise_trigger(victim, train.images[picked], mode=params["mode"],
                               image_visits=visits, seed=seed)
        log = {"source": "generated", "n_poisoned_images": len(rows), "image_visits_budget": visits,
               "image_visits": run.epochs * REPEATS * run.n_images,
               **run.summary(), "png_base64": png_base64(run.trigger)}
        return run.trigger, log

    def eval_inputs(self, split: Split, *, kind: str, seed: int, params: Mapping[str, Any],
                    poison_details: Mapping[str, Any] | None = None) -> EvalInputs:
        """methods/metrics.md §1-§2: `triggered` = every test image with the trigger and the text
        trigger in the prompt ("a photo of zbw"); `clean` = the same images with the default
        prompt, neither trigger."""
        if kind == "clean":
            return EvalInputs(list(split.image_ids), split.images, split.references)
        if kind != "triggered":
            raise VbbError(f"unknown evaluation split kind {kind!r}", "use 'triggered' or 'clean'")
        self._check(params)
        if params["trigger_path"]:
            trigger = read_trigger(params["trigger_path"])
        else:
            stored = (poison_details or {}).get("trigger", {}).get("png_base64")
            if not stored:
                raise VbbError(
                    "VL-Trojan's generated trigger is not in the poison details handed to "
                    "eval_inputs",
                    "pass poison_details (the PoisonedSet.details of the same params and seed), or "
                    "set trigger_path in [attack.vl_trojan] to a trigger PNG")
            trigger = from_png_base64(stored)
        return EvalInputs(list(split.image_ids), apply_trigger(np.asarray(split.images), trigger,
                                                               params["mode"]),
                          split.references, with_text_trigger(DEFAULT_INSTRUCTION,
                                                              params["text_trigger"]))


@hookimpl
def register_attacks(register) -> None:
    register(VLTrojan())
