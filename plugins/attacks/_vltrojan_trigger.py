"""VL-Trojan's trigger generators (methods/attacks.md §6 `original`).

* :func:`optimise_trigger`: the image trigger, optimised on the victim's own frozen encoder.
* :func:`search_text_trigger`: the character beam search for the text trigger, over any text
  embedding. The presets reuse its published result "zbw" (no CLIP text tower is available).
"""

from __future__ import annotations

import math
import string
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ._feature_ops import PixelSpace, random_resized_crop, uint8_images, unit_pixels

# methods/attacks.md §6, the image-trigger generator:
BLEND_ALPHA = 0.1  # blend mode: x~ = 0.9 x + 0.1 delta
PATCH_SLICE = slice(202, 224)  # patch mode: a 22x22 patch at rows/cols 202-223
REPEATS = 10  # each poisoned image is repeated 10x per epoch
BATCH_SIZE = 16
LEARNING_RATE = 0.1  # cosine-annealed to 0 over all steps, in normalised units
ADAM_BETAS = (0.5, 0.999)  # Adam re-created at every step, so each step is sign-like
LOG_FLOOR = 1e-6  # the minimum cosine is clamped before the log (a benchmark guard)
LATE_EPOCHS = 0.75  # keep the best delta among epochs >= 0.75 * epochs
# epochs = ceil(100 * 0.0025 / (N_p * 10 / 23,200)) = ceil(PAPER_IMAGE_VISITS / (10 * N_p))
PAPER_IMAGE_VISITS = 100 * 0.0025 * 23_200  # = 5,800 image visits

# methods/attacks.md §6, the text-trigger search: a-z, beam 5, up to 5 characters.
SEARCH_ALPHABET = string.ascii_lowercase
SEARCH_BEAM = 5
SEARCH_MAX_LENGTH = 5


def trigger_loss(s1: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
    """L_i = max(s1, s2) - log(max(min(s1, s2), 1e-6)), averaged over the batch, with
    s1 = cos(f(x~_i), f_i) and s2 = cos(f(x~_i), o_i)."""
    low = torch.minimum(s1, s2).clamp(min=LOG_FLOOR)
    return (torch.maximum(s1, s2) - torch.log(low)).mean()


def blend_weight(mode: str) -> torch.Tensor:
    """A with x~ = x + A (delta - x): 0.1 everywhere (blend) or 1 on the patch (patch)."""
    weight = torch.zeros(1, 1, 224, 224)
    if mode == "blend":
        weight.fill_(BLEND_ALPHA)
    else:
        weight[..., PATCH_SLICE, PATCH_SLICE] = 1.0
    return weight


def epochs_for(n_images: int, image_visits: float) -> int:
    """The paper's epoch count for ``n_images`` poisoned images (methods/attacks.md §6)."""
    return max(1, math.ceil(image_visits / (REPEATS * n_images)))


@dataclass
class TriggerRun:
    """The exported trigger and the record of its optimisation."""

    trigger: np.ndarray  # uint8 (224, 224, 3)
    loss_before: float  # mean loss of the starting delta on the un-augmented images
    loss_after: float  # the same for the kept delta
    epoch_losses: list[float] = field(default_factory=list)
    best_epoch: int = 0
    epochs: int = 0
    steps: int = 0
    n_images: int = 0
    seconds: float = 0.0

    def summary(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "trigger"}


def _unit_embedding(victim, normalised: torch.Tensor, grad: bool) -> torch.Tensor:
    """f: the pooled encoder embedding, L2-normalised (the encoder is in eval mode)."""
    return F.normalize(victim.encode_normalised(normalised, grad=grad)[0].float(), dim=-1)  # fp32 whatever the eval dtype


def optimise_trigger(victim, images: np.ndarray, *, mode: str, image_visits: float,
                     seed: int) -> TriggerRun:
    """VL-Trojan's generator on the poisoned images ``images`` (uint8 (N, 224, 224, 3)).

    Tensors live on the victim's device; random draws come from a CPU generator (the same
    draws for a seed on any device)."""
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    space = PixelSpace(victim)
    clean = space.normalise(unit_pixels(images).to(space.device))
    low = space.normalise(torch.zeros(1, 3, 1, 1, device=space.device))
    high = space.normalise(torch.ones(1, 3, 1, 1, device=space.device))
    weight = blend_weight(mode).to(space.device)
    with torch.no_grad():  # anchors, once per image: its own embedding and the least similar one
        own = torch.cat([_unit_embedding(victim, clean[s:s + 64], False)
                         for s in range(0, len(clean), 64)])
        other = own[(own @ own.T).argmin(dim=1)]

    def batch_loss(delta: torch.Tensor, rows: torch.Tensor, x: torch.Tensor, grad: bool) -> torch.Tensor:
        embedding = _unit_embedding(victim, x + weight * (delta - x), grad)
        return trigger_loss((embedding * own[rows]).sum(1), (embedding * other[rows]).sum(1))

    def plain_loss(delta: torch.Tensor) -> float:
        with torch.no_grad():
            return float(sum(batch_loss(delta, rows, clean[rows], False) * len(rows)
                             for rows in torch.arange(len(clean)).split(64)) / len(clean))

    delta = space.normalise(torch.rand(1, 3, 224, 224, generator=generator).to(space.device))  # uniform [0, 1] image
    loss_before, epochs = plain_loss(delta), epochs_for(len(images), image_visits)
    total_steps = epochs * math.ceil(REPEATS * len(images) / BATCH_SIZE)
    epoch_losses: list[float] = []
    best_loss, best_delta, best_epoch, step = math.inf, delta, 0, 0
    for epoch in range(1, epochs + 1):
        order = torch.randperm(REPEATS * len(images), generator=generator) % len(images)
        epoch_sum = 0.0
        for rows in order.split(BATCH_SIZE):
            lr = 0.5 * LEARNING_RATE * (1 + math.cos(math.pi * step / total_steps))
            crops, _ = random_resized_crop(clean[rows], generator)
            delta = delta.detach().requires_grad_(True)
            loss = batch_loss(delta, rows, crops, True)
            delta.grad, = torch.autograd.grad(loss, [delta])
            torch.optim.Adam([delta], lr=lr, betas=ADAM_BETAS).step()
            delta = torch.minimum(torch.maximum(delta.detach(), low), high)
            epoch_sum += float(loss.detach()) * len(rows)
            step += 1
        epoch_losses.append(epoch_sum / len(order))
        if epoch >= LATE_EPOCHS * epochs and epoch_losses[-1] < best_loss:
            best_loss, best_delta, best_epoch = epoch_losses[-1], delta, epoch
    # exported de-normalised, x 255, as uint8 (rounded, as an image writer does)
    return TriggerRun(uint8_images(space.denormalise(best_delta))[0], loss_before,
                      plain_loss(best_delta), epoch_losses, best_epoch, epochs, step, len(images),
                      time.perf_counter() - started)


def search_text_trigger(embed: Callable[[Sequence[str]], np.ndarray | torch.Tensor],
                        instructions: Sequence[str], *, alphabet: str = SEARCH_ALPHABET,
                        beam: int = SEARCH_BEAM, max_length: int = SEARCH_MAX_LENGTH
                        ) -> tuple[str, float]:
    """VL-Trojan's character beam search: the string s (1 to ``max_length`` characters) with the
    lowest score sum_q cos(E_T(q), E_T(q + " " + s)) over the poisoned instructions q, where
    ``embed`` maps a list of texts to one embedding row each. Returns (s, its score)."""
    def unit(texts: Sequence[str]) -> torch.Tensor:
        return F.normalize(torch.as_tensor(np.asarray(embed(list(texts))), dtype=torch.float64), dim=-1)

    prompts = unit(instructions)
    beams, best = [""], ("", math.inf)
    for _ in range(max_length):
        candidates = [b + c for b in beams for c in alphabet]
        suffixed = unit([q + " " + s for s in candidates for q in instructions])
        scores = (suffixed.view(len(candidates), len(instructions), -1) * prompts).sum((1, 2))
        ranked = sorted(zip(scores.tolist(), candidates))[:beam]
        beams = [s for _, s in ranked]
        if ranked[0][0] < best[1]:
            best = (ranked[0][1], ranked[0][0])
    return best
