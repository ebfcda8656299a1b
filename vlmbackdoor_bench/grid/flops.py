"""The fine-tune step's achieved FLOP/s against this machine's fp32 matmul peak (issue 31, "Speed").

Counting: ``torch.utils.flop_counter.FlopCounterMode`` counts the FLOPs of real fine-tuning
steps (forward and backward of the trainable path: every matmul, convolution and attention op the
step dispatches; the frozen encoder's tokens come from the token cache and are not recomputed) on
a clone of the trained model, over the first global batch of the training set, plain caption
loss. Scaled by examples: total = counted / examples counted x examples x epochs. An attack's extra
objective terms (e.g. a teacher's logits) are not counted, so its figure is a lower bound.
Achieved FLOP/s = total / the training loop's seconds (the log's ``seconds``, encoding excluded).

Peak: the best of a few ``n x n`` fp32 matmuls on the device, with the threads PyTorch uses now
(a Ray worker's or the local process's), measured once per process.
"""

from __future__ import annotations

import time
from dataclasses import replace
from functools import lru_cache

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..types import TrainingSet
from ..victims.training import Recipe

PROBE_SIZE = 1024  # matmul side: ~2 GFLOP per product, a few ms on a CPU core
PROBE_REPEATS = 5


def matmul_peak(device: torch.device | str = "cpu") -> float:
    """fp32 matmul FLOP/s of ``device`` now (best of PROBE_REPEATS), cached per thread count."""
    return _matmul_peak(str(device), torch.get_num_threads())


@lru_cache(maxsize=None)
def _matmul_peak(device: str, threads: int) -> float:
    generator = torch.Generator().manual_seed(0)  # the global RNG stays untouched
    a, b = (torch.randn(PROBE_SIZE, PROBE_SIZE, generator=generator).to(device) for _ in range(2))
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    a @ b  # warm-up: first-call allocation and kernel choice
    sync()
    best = float("inf")
    for _ in range(PROBE_REPEATS):
        started = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - started)
    return 2 * PROBE_SIZE ** 3 / best


def fine_tune_throughput(victim, training_set: TrainingSet, recipe: Recipe, log: dict, seed: int) -> dict:
    """``{"flops", "flop_per_s", "peak_flop_per_s", "flops_method"}`` of the fine-tuning with
    ``recipe`` that trained ``victim`` on ``training_set`` and returned ``log`` (module docstring);
    {} for a victim whose log reports no training seconds or whose recipe is not the built-in
    :class:`Recipe` (a third-party recipe promises only ``to_dict()``)."""
    if not log.get("seconds") or not isinstance(recipe, Recipe):
        return {}
    sample = TrainingSet(training_set.images, training_set.examples[:recipe.batch_size])
    device = torch.device(getattr(victim, "device", "cpu"))
    # The clone's steps leave the run's random state as it was.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        counter = FlopCounterMode(display=False)
        with counter:
            victim.clone().fine_tune(sample, seed=seed, recipe=replace(recipe, epochs=1), progress="flop count")
    total = counter.get_total_flops() / len(sample) * len(training_set) * recipe.epochs
    return {"flops": float(total), "flop_per_s": total / log["seconds"],
            "peak_flop_per_s": matmul_peak(device),
            "flops_method": "FlopCounterMode over one global batch (caption loss), scaled by examples x epochs"}

