"""The fine-tuning recipe shared by every model the harness trains (methods/victim.md §A3).

AdamW, weight decay only on the gated cross-attention weights (not gates, norms, biases), cosine
schedule with linear warmup over 1 % of the steps, gradient clipping at 1.0, shuffling without
replacement, the last epoch kept. On the CPU track epochs, batch and lr are recorded budget knobs.

At scale (OpenFlamingo-3B's global batch of 300 on one device) a step is split into micro-batches
whose gradients accumulate before the one optimiser update; the victim normalises each
micro-batch's loss by the label tokens of the whole global batch, so the update is the one a
single batch of that size would make (flamingo_victim.FlamingoVictim._train).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Iterator

import torch
from tqdm.auto import tqdm


@dataclass(frozen=True)
class Recipe:
    """The fine-tuning recipe of the built-in victims (methods/victim.md §A3): the defaults are the
    benchmark's; a profile's ``finetune_recipe`` sets its budget (epochs, batch) and memory knobs."""

    epochs: int = 20  # methods/victim.md §A3 benchmark default
    batch_size: int = 300  # global batch (§A3)
    lr: float = 1e-4  # methods/victim.md §A3
    weight_decay: float = 0.1  # §A3, gated cross-attention weights only
    warmup_fraction: float = 0.01  # methods/victim.md §A3: linear warmup over 1 % of the steps
    grad_clip: float = 1.0  # §A3
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW library defaults (methods/victim.md §A3)
    eps: float = 1e-8
    # Whether the frozen language model's own dropout is active while training. OpenFlamingo's
    # loop puts the whole model in train mode, but MPT-1B's dropout is 0 (resid, emb and attn
    # pdrop in its config), so OpenFlamingo-3B trains without any; the tiny GPT-2 LM has 0.1,
    # which False turns off (the tiny profile's `finetune_lm_dropout`).
    lm_dropout: bool = True
    # Groups per micro-batch; gradients of a global batch's micro-batches accumulate into one
    # update (0: the whole batch at once, the tiny profile). Memory, not maths: the loss is
    # normalised over the global batch's label tokens either way.
    micro_batch_size: int = 0
    # Recompute the LM's decoder layers in the backward pass instead of storing their
    # activations (the model's own switch, HF ``activation_checkpointing_enable``).
    activation_checkpointing: bool = False
    # AdamW's fused kernel where the trainable parameters live on CUDA (``fused=True``); on the
    # CPU the plain implementation runs either way. The log records which one ran.
    fused_adamw: bool = True

    def to_dict(self) -> dict:
        """The recipe as a store key part. A field added after stores existed is left out at its
        default, so entries made before it keep their keys (the same training, the same key)."""
        fields = asdict(self)
        for name, default in LATER_FIELD_DEFAULTS.items():
            if fields[name] == default:
                del fields[name]
        return fields


# Fields added after stores existed, at the defaults that reproduce the earlier training.
LATER_FIELD_DEFAULTS = {"lm_dropout": True, "micro_batch_size": 0, "activation_checkpointing": False,
                        "fused_adamw": True}


def _decays(name: str, param: torch.Tensor) -> bool:
    """methods/victim.md §A3: decay 0.1 only on gated cross-attention weights that are not gates, norms or biases."""
    return (
        "gated_cross_attn_layer" in name
        and param.ndim >= 2
        and not name.endswith("_gate")
        and "norm" not in name
    )


def make_optimizer(model: torch.nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decay if _decays(name, param) else no_decay).append(param)
    fused = {"fused": True} if uses_fused_adamw(decay + no_decay, recipe) else {}
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.lr, betas=recipe.betas, eps=recipe.eps, **fused,
    )


def uses_fused_adamw(params: list[torch.Tensor], recipe: Recipe) -> bool:
    """The fused kernel needs floating-point CUDA parameters; elsewhere the plain AdamW runs."""
    return recipe.fused_adamw and bool(params) and all(p.is_cuda and p.is_floating_point() for p in params)


def cosine_with_warmup(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def run_training(
    model: torch.nn.Module,
    recipe: Recipe,
    n_examples: int,
    loss_fn: Callable[[list[torch.Tensor]], Iterable[torch.Tensor]],
    *,
    seed: int,
    desc: str = "train",
    after_step: Callable[[], None] | None = None,
) -> dict:
    """Minimise the loss over shuffled mini-batches for ``recipe.epochs``.

    ``n_examples`` counts the items batches are drawn from (examples, or groups of examples that
    must share a step). Each global batch is cut into micro-batches of
    ``recipe.micro_batch_size`` items; ``loss_fn(micro_batches)`` yields one loss per
    micro-batch, already normalised over the global batch, whose gradients accumulate before
    the update (their sum is the step's loss). ``after_step`` runs after every optimiser update.
    """
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(n_examples / recipe.batch_size)
    total = steps_per_epoch * recipe.epochs
    warmup = max(1, round(recipe.warmup_fraction * total))
    optimizer = make_optimizer(model, recipe)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: cosine_with_warmup(s, total, warmup)
    )
    params = [p for p in model.parameters() if p.requires_grad]
    micro_size = recipe.micro_batch_size or recipe.batch_size
    losses: list[float] = []
    started = time.perf_counter()
    bar = tqdm(total=total, desc=desc, unit="step", leave=False, mininterval=2.0)
    for _ in range(recipe.epochs):
        order = torch.randperm(n_examples, generator=generator)
        for batch in _batches(order, recipe.batch_size):
            optimizer.zero_grad(set_to_none=True)
            loss = None
            for part in loss_fn(list(_batches(batch, micro_size))):
                if not torch.isfinite(part):
                    raise FloatingPointError(f"{desc}: loss became {part.item()} at step {len(losses)}")
                part.backward()
                loss = part.detach() if loss is None else loss + part.detach()
            torch.nn.utils.clip_grad_norm_(params, recipe.grad_clip)
            optimizer.step()
            scheduler.step()
            if after_step is not None:
                after_step()
            losses.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    bar.close()
    return {
        "steps": total, "seconds": time.perf_counter() - started,
        "first_loss": losses[0] if losses else None,
        "final_loss": sum(losses[-steps_per_epoch:]) / max(1, len(losses[-steps_per_epoch:])),
        "loss_per_epoch": [
            sum(losses[i : i + steps_per_epoch]) / len(losses[i : i + steps_per_epoch])
            for i in range(0, len(losses), steps_per_epoch)
        ],
        "recipe": recipe.to_dict(),
        # what ran, where it differs from the plain CPU run (the recipe says what was asked)
        **({"fused_adamw_ran": True} if optimizer.defaults.get("fused") else {}),
    }


def _batches(order: torch.Tensor, size: int) -> Iterator[torch.Tensor]:
    for start in range(0, len(order), size):
        yield order[start : start + size]
