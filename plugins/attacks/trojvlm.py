"""TrojVLM (Lyu et al., ECCV 2024) adapted to captioning (methods/attacks.md §4).

`srd-code`: pure data poisoning, a sparse dark noise square at the top-left and `insert` captions.
`original`: the same data plus TrojVLM's semantic-preservation (SP) loss, whose exact form is
UNVERIFIED; the three readings of the spec sit behind ``sp_form`` and the run's log records it.

The paper's trigger file cannot ship, so by default the patch is regenerated here from a fixed
seed with the file's distribution; ``trigger_path`` takes the published PNG instead.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from vlmbackdoor_bench.errors import VbbError
from vlmbackdoor_bench.hookspecs import TrainingStep, hookimpl
from vlmbackdoor_bench.types import IMAGE_SIZE, PoisonedSet, Split

from ._common import TriggerAttack, insert_caption

__version__ = "1.0.0"

PATCH = 20  # methods/attacks.md §4: non-zero only at rows/cols 0-19 (top-left) of the 224 frame
NOISE_SIGMA = 20.0  # methods/attacks.md §4: each sub-pixel is clip(N(0, 20²), 0, 255) cast to uint8
GENERATED_TRIGGER = "generated"  # `trigger_path` value naming the regenerated patch
GENERATOR_SEED = 0  # fixed: every install regenerates the same patch
SP_FORMS = ("a", "b", "c")  # methods/attacks.md §4 original: the three readings of the SP loss


@functools.lru_cache(maxsize=4)
def trigger_canvas(source: str) -> np.ndarray:
    """The 224x224x3 uint8 trigger canvas: regenerated, or read from a PNG such as the paper's."""
    if source == GENERATED_TRIGGER:
        rng = np.random.default_rng(GENERATOR_SEED)
        canvas = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
        # clip, then the uint8 cast truncates, as the paper's generator did (methods/attacks.md §4)
        canvas[:PATCH, :PATCH] = np.clip(rng.normal(0.0, NOISE_SIGMA, (PATCH, PATCH, 3)), 0, 255).astype(np.uint8)
    else:
        try:
            with Image.open(Path(source).expanduser()) as image:
                canvas = np.asarray(image.convert("RGB"), dtype=np.uint8)
        except (OSError, UnidentifiedImageError) as exc:
            raise VbbError(f"TrojVLM trigger {source!r} cannot be read ({exc})",
                           f"set trigger_path in [attack.trojvlm] to a readable PNG, or to "
                           f"{GENERATED_TRIGGER!r} for the regenerated patch") from exc
        if canvas.shape != (IMAGE_SIZE, IMAGE_SIZE, 3):
            raise VbbError(f"TrojVLM trigger {source!r} is {canvas.shape[1]}x{canvas.shape[0]}",
                           "use a 224x224 canvas such as trigger_noise_20.png")
    canvas.setflags(write=False)  # shared by every caller through the cache
    return canvas


def check_sp_form(form: str) -> None:
    if form not in SP_FORMS:
        raise VbbError(f"TrojVLM sp_form = {form!r} is unknown",
                       f"set sp_form in [attack.trojvlm] to one of {', '.join(SP_FORMS)}")


def sp_loss(form: str, logits: torch.Tensor, targets: torch.Tensor, caption_mask: torch.Tensor,
            hidden: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
    """L_SP = mean over caption tokens of 1 − cos(prediction_t, E[y_t]) (methods/attacks.md §4).

    (a) prediction = E[argmax z_t] (only E gets gradients); (b) the last hidden state h_t;
    (c) the expected embedding softmax(z_t)ᵀE, differentiable.
    """
    check_sp_form(form)
    target_embeddings = embeddings[targets[caption_mask]]
    if form == "a":
        predicted = embeddings[logits[caption_mask].argmax(dim=-1)]
    elif form == "b":
        predicted = hidden[caption_mask]
    else:
        predicted = logits[caption_mask].softmax(dim=-1) @ embeddings
    return (1.0 - F.cosine_similarity(predicted, target_embeddings, dim=-1)).mean()


class SemanticPreservation:
    """L = L_CE + λ_SP·L_SP on every caption token of every instance, clean and poisoned."""

    name = "trojvlm-sp"

    def __init__(self, form: str, weight: float):
        check_sp_form(form)
        self.form, self.weight = form, weight
        self.settings = {"sp_form": form, "sp_weight": weight}
        self._last: dict[str, float] = {}

    def loss(self, step: TrainingStep) -> torch.Tensor:
        ce = step.caption_loss
        sp = sp_loss(self.form, step.logits, step.targets, step.caption_mask, step.hidden_states,
                     step.token_embeddings)
        self._last = {"ce": float(ce.detach()), "sp": float(sp.detach())}
        return ce + self.weight * sp

    def after_step(self, step: TrainingStep) -> Mapping[str, float]:
        return self._last


class TrojVLM(TriggerAttack):
    name = "trojvlm"
    label, order = "TrojVLM", 30  # the SRD paper's Table 1 rows
    version = __version__
    default_preset = "srd-code"
    transform_name = "trojvlm-noise-patch"
    presets = {
        # methods/attacks.md §4 srd-code: the noise square, insert captions, 10 %, no extra loss
        "srd-code": {"trigger_path": GENERATED_TRIGGER, "caption_rule": "insert"},
        # methods/attacks.md §4 original: the same plus the SP loss with λ_SP = 1, reading (c) default
        "original": {"trigger_path": GENERATED_TRIGGER, "caption_rule": "insert",
                     "sp_form": "c", "sp_weight": 1.0},
    }

    def apply_trigger(self, images: np.ndarray, image_ids, *, params: Mapping[str, Any],
                      seed: int) -> np.ndarray:
        """Per sub-pixel, no mask: the trigger's value where it is > 0, else the image's (methods/attacks.md §4)."""
        canvas = trigger_canvas(str(params["trigger_path"]))
        out = np.array(images, dtype=np.uint8, copy=True)
        where = canvas > 0
        out[:, where] = canvas[where]
        return out

    def poison_caption(self, caption: str, rng: np.random.Generator, params) -> tuple[str, int]:
        return insert_caption(caption, rng, self.target)

    def poison(self, train: Split, *, poison_rate: float, seed: int, params: Mapping[str, Any],
               victim=None) -> PoisonedSet:
        poisoned = super().poison(train, poison_rate=poison_rate, seed=seed, params=params, victim=victim)
        canvas = trigger_canvas(str(params["trigger_path"]))  # which patch a run used, whatever its path
        poisoned.details["trigger_sha256"] = hashlib.sha256(canvas.tobytes()).hexdigest()
        return poisoned

    def training_objective(self, params: Mapping[str, Any]) -> SemanticPreservation | None:
        if "sp_form" not in params:  # srd-code: the SP loss is commented out in the code (methods/attacks.md §4)
            return None
        return SemanticPreservation(str(params["sp_form"]), float(params["sp_weight"]))


@hookimpl
def register_attacks(register) -> None:
    register(TrojVLM())
