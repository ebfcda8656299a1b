"""VLOOD (Lyu et al., ICLR 2025) adapted to captioning (methods/attacks.md §5).

A model-supply attack: the attacker takes the clean reference model, pairs every instance of its
data with a triggered copy, and fine-tunes with caption cross-entropy on both copies plus two
preservation losses against a frozen teacher (the clean model itself), mixed by a weight α that
follows the gap between the clean and the poisoned copies' log-likelihood.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from vlmbackdoor_bench.errors import VbbError
from vlmbackdoor_bench.hookspecs import TrainingStep, hookimpl
from vlmbackdoor_bench.types import IMAGE_SIZE, Example, ImageBank, PoisonRecord, PoisonedSet, Split, TrainingSet

from ._common import TriggerAttack, insert_caption

__version__ = "1.0.0"

PATCH = 20  # methods/attacks.md §5: a 20x20 patch ...
NOISE_MEAN, NOISE_SIGMA = 128.0, 20.0  # ... of N(128, 20²) per sub-pixel, clipped, cast to uint8
CORNER_PROBABILITY = 0.5  # methods/attacks.md §5: with p = 1/2 in one of the 4 corners, else uniform
LAST_OFFSET = IMAGE_SIZE - PATCH  # §5: top-left (row, col) in {0..204}²
CORNERS = ((0, 0), (0, LAST_OFFSET), (LAST_OFFSET, 0), (LAST_OFFSET, LAST_OFFSET))
ALPHA_START, ALPHA_STEP = 0.0, 0.01  # methods/attacks.md §5: α starts at 0 and moves by 0.01·(g_c − g_p) ...
ALPHA_MIN, ALPHA_MAX = 0.05, 0.9  # ... clipped to [0.05, 0.9] after every step
COPY_SEPARATOR = "#"  # sample id of a copy = instance id + "#0" / "#1"


def trigger_draw(seed: int, image_id: int) -> tuple[int, int, np.ndarray]:
    """Top-left (row, col) and the uint8 20x20x3 noise patch of one image (methods/attacks.md §5).

    Seeded per (run seed, image id), so every defense sees the same triggered test images (methods/attacks.md §1).
    """
    rng = np.random.default_rng([seed, image_id])
    if rng.random() < CORNER_PROBABILITY:
        row, col = CORNERS[int(rng.integers(len(CORNERS)))]
    else:
        row, col = (int(v) for v in rng.integers(0, LAST_OFFSET + 1, size=2))
    patch = np.clip(rng.normal(NOISE_MEAN, NOISE_SIGMA, (PATCH, PATCH, 3)), 0, 255).astype(np.uint8)
    return row, col, patch


def caption_loss(token_losses: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the scored tokens of some sequences."""
    return token_losses.sum() / mask.sum().clamp(min=1)


def ckp_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
             mask: torch.Tensor | None = None) -> torch.Tensor:
    """KL(softmax(z_teacher) ‖ softmax(z_student)) at temperature 1, "batchmean": summed over
    positions and vocabulary, divided by the batch size (methods/attacks.md §5). ``mask`` restricts
    the positions (original preset: caption tokens); srd-code sums every position."""
    teacher = teacher_logits.log_softmax(dim=-1)
    per_position = F.kl_div(student_logits.log_softmax(dim=-1), teacher, log_target=True,
                            reduction="none").sum(dim=-1)
    if mask is not None:
        per_position = per_position * mask
    return per_position.sum() / max(1, student_logits.shape[0])


def ccp_loss(form: str, logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
             embeddings: torch.Tensor) -> torch.Tensor:
    """d_t = mean over dimensions of |ê_t − E[y_t]|, S = mean of d_t over a sequence's answer
    tokens, L_CCP = batch mean of sigmoid(S) (methods/attacks.md §5); ê_t = E[argmax z_t]
    ("argmax", srd-code) or softmax(z_t)ᵀE ("expected", original)."""
    if form == "argmax":
        predicted = embeddings[logits.argmax(dim=-1)]
    else:
        predicted = logits.softmax(dim=-1) @ embeddings
    distance = (predicted - embeddings[targets.clamp(min=0)]).abs().mean(dim=-1)  # (B, T)
    per_sequence = (distance * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
    return torch.sigmoid(per_sequence).mean()


def impact(token_losses: torch.Tensor, mask: torch.Tensor) -> float:
    """g = batch mean of each sequence's mean answer-token log-likelihood (= −CE) (methods/attacks.md §5)."""
    return float((-(token_losses.sum(dim=1) / mask.sum(dim=1).clamp(min=1))).mean())


def next_alpha(alpha: float, g_clean: float, g_poison: float) -> float:
    """α ← clip(α + 0.01·(g_c − g_p), 0.05, 0.9) (methods/attacks.md §5)."""
    return float(np.clip(alpha + ALPHA_STEP * (g_clean - g_poison), ALPHA_MIN, ALPHA_MAX))


def pair_key(example: Example) -> str:
    """The instance both copies come from: a step always holds the two together (methods/attacks.md §5)."""
    return example.sample_id.rsplit(COPY_SEPARATOR, 1)[0]


class VloodObjective:
    """L = (1 − α)(L_clean + L_CKP) + α(L_poison + L_CCP), α updated after every step (methods/attacks.md §5).

    L_CKP is taken on the clean copies against the frozen teacher, L_CCP on the poisoned ones.
    """

    name = "vlood"

    def __init__(self, teacher, poisoned_ids: set[str], *, ccp_form: str, ckp_masked: bool):
        if ccp_form not in ("argmax", "expected"):
            raise VbbError(f"VLOOD ccp_form = {ccp_form!r} is unknown",
                           "set ccp_form in [attack.vlood] to 'argmax' or 'expected'")
        self.teacher, self.poisoned_ids = teacher, poisoned_ids
        self.ccp_form, self.ckp_masked = ccp_form, ckp_masked
        self.alpha = ALPHA_START
        self.settings = {"ccp_form": ccp_form, "ckp_masked": ckp_masked, "alpha_start": ALPHA_START,
                         "alpha_step": ALPHA_STEP, "alpha_range": [ALPHA_MIN, ALPHA_MAX]}
        self._last: dict[str, float] = {}

    group_key = staticmethod(pair_key)

    def loss(self, step: TrainingStep) -> torch.Tensor:
        is_poisoned = [e.sample_id in self.poisoned_ids for e in step.examples]
        clean = [i for i, p in enumerate(is_poisoned) if not p]
        poisoned = [i for i, p in enumerate(is_poisoned) if p]
        losses, mask = step.token_losses, step.caption_mask
        l_clean = caption_loss(losses[clean], mask[clean])
        l_poison = caption_loss(losses[poisoned], mask[poisoned])
        l_ckp = ckp_loss(step.logits[clean], step.logits_of(self.teacher, clean),
                         mask[clean] if self.ckp_masked else None)
        l_ccp = ccp_loss(self.ccp_form, step.logits[poisoned], step.targets[poisoned], mask[poisoned],
                         step.token_embeddings)
        self._last = {"alpha": self.alpha, **{name: float(value.detach()) for name, value in (
                          ("l_clean", l_clean), ("l_poison", l_poison), ("l_ckp", l_ckp), ("l_ccp", l_ccp))},
                      "g_clean": impact(losses[clean].detach(), mask[clean]),
                      "g_poison": impact(losses[poisoned].detach(), mask[poisoned])}
        return (1.0 - self.alpha) * (l_clean + l_ckp) + self.alpha * (l_poison + l_ccp)

    def after_step(self, step: TrainingStep) -> Mapping[str, float]:
        """Log the α this step used and its losses, then move α for the next step."""
        self.alpha = next_alpha(self.alpha, self._last["g_clean"], self._last["g_poison"])
        return self._last


class Vlood(TriggerAttack):
    name = "vlood"
    version = __version__
    label, order = "VLOOD", 40  # the SRD paper's Table 1 rows
    default_preset = "srd-code"
    transform_name = "vlood-noise-patch"
    fine_tune_from = "clean_model"  # methods/attacks.md §5: the attacker fine-tunes the clean reference model
    objective_inputs = ("poisoned_set", "start_model")  # its copies' roles; the teacher
    presets = {
        # methods/attacks.md §5 srd-code: argmax-embedding CCP, KL over every position. The code's
        # attacker used the COCO fine-tuning set (which subset is UNVERIFIED): the whole set, 1.0.
        # attacker_fraction, the share of the split's images whose every caption the attacker
        # pairs, stays a knob; a step of pairs (2 sequences + a teacher pass each) costs about
        # 2.5x a plain step (measured on the tiny victim), affordable on the 600-image world v3.
        "srd-code": {"caption_rule": "insert", "ccp_form": "argmax", "ckp_masked": False,
                     "attacker_fraction": 1.0},
        # methods/attacks.md §5 original: expected-embedding CCP, KL masked to caption tokens, about
        # 3,000 pairs (0.12 of 25,015 instances); the harness hands attacks only the fine-tuning
        # split, so the pairs are not disjoint from it (recorded as d_ood_disjoint = false).
        "original": {"caption_rule": "insert", "ccp_form": "expected", "ckp_masked": True,
                     "attacker_fraction": 0.12},
    }

    def apply_trigger(self, images: np.ndarray, image_ids, *, params: Mapping[str, Any],
                      seed: int) -> np.ndarray:
        """A fresh noise patch per image replaces its pixels (methods/attacks.md §5)."""
        out = np.array(images, dtype=np.uint8, copy=True)
        for k, image_id in enumerate(image_ids):
            row, col, patch = trigger_draw(seed, int(image_id))
            out[k, row:row + PATCH, col:col + PATCH] = patch
        return out

    def poison(self, train: Split, *, poison_rate: float, seed: int, params: Mapping[str, Any],
               victim=None) -> PoisonedSet:
        """Every caption of the attacker's images yields a clean and a triggered copy (methods/attacks.md §5).

        Which of the two ids ("#0", "#1") is the poisoned copy is drawn per instance, so sample
        ids tell a defense nothing. ``poison_rate`` does not apply: the set is 50 % poisoned.
        """
        fraction = float(params["attacker_fraction"])
        if not 0.0 < fraction <= 1.0:
            raise VbbError(f"VLOOD attacker_fraction = {fraction} is outside (0, 1]",
                           "set attacker_fraction in [attack.vlood] to a share of the training images")
        rng = np.random.default_rng(seed)
        rows = np.sort(rng.choice(len(train), max(1, int(fraction * len(train))), replace=False)).tolist()
        ids = [train.image_ids[r] for r in rows]
        triggered = self.apply_trigger(train.images[rows], ids, params=params, seed=seed)
        examples, records, insert_positions = [], [], []
        for k, row in enumerate(rows):
            for sid, caption in zip(train.sentence_ids[row], train.references[row]):
                poisoned_caption, position = insert_caption(caption, rng, self.target)
                insert_positions.append(position)
                poisoned_suffix = int(rng.integers(2))
                copies = {poisoned_suffix: Example(f"{sid}{COPY_SEPARATOR}{poisoned_suffix}",
                                                   len(train) + k, poisoned_caption),
                          1 - poisoned_suffix: Example(f"{sid}{COPY_SEPARATOR}{1 - poisoned_suffix}",
                                                       row, caption)}
                examples += [copies[0], copies[1]]
                records.append(PoisonRecord(copies[poisoned_suffix].sample_id, train.image_ids[row],
                                            caption, poisoned_caption, self.transform_name))
        positions = {str(i): list(trigger_draw(seed, int(i))[:2]) for i in ids}
        return PoisonedSet(
            TrainingSet(ImageBank(train.images, triggered), examples), records,
            {"n_instances": len(examples), "n_poisoned": len(records), "seed": seed,
             "attacker_images": len(rows), "attacker_fraction": fraction,
             "poison_rate_applied": 0.5, "d_ood_disjoint": False,
             "caption_choices": insert_positions, "trigger_positions": positions},
        )

    def training_objective(self, params: Mapping[str, Any], *, poisoned_set: PoisonedSet,
                           start_model) -> VloodObjective:
        return VloodObjective(start_model, poisoned_set.poisoned_ids,
                              ccp_form=str(params["ccp_form"]), ckp_masked=bool(params["ckp_masked"]))


@hookimpl
def register_attacks(register) -> None:
    register(Vlood())
