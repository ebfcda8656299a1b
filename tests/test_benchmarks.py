"""Speed benchmarks (pytest-benchmark): throughput of the hot paths of a grid cell.

They run as ordinary tests (a few rounds each); `pytest tests/test_benchmarks.py --benchmark-only`
prints the table, `--benchmark-json out.json` keeps it. Targets are recorded, never asserted on
wall time: the whole-grid timings live in every cell result (`timings`).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlmbackdoor_bench.types import Example, ImageBank, TrainingSet
from vlmbackdoor_bench.victims.tiny import TinyArch, TinyVictim, build_model
from vlmbackdoor_bench.victims.tokenizer import train_tokenizer
from vlmbackdoor_bench.victims.training import Recipe
from vlmbackdoor_bench_plugins.attacks.badnet import BadNet

CAPTIONS = ["A red apple next to a blue cup on a wooden table.", "Two bananas lying on the grass.",
            "A green book and a yellow ball on a tiled floor."]


@pytest.fixture(scope="module")
def victim() -> TinyVictim:
    torch.manual_seed(0)
    tokenizer = train_tokenizer(CAPTIONS * 100 + ["User:a photo of GPT:"] * 20, 1024)
    arch = TinyArch(vocab_size=1024)  # the tiny profile's real size
    return TinyVictim(build_model(arch, tokenizer, train_vision_encoder=False), tokenizer, arch,
                      Recipe(epochs=1, batch_size=64, lr=1e-3))


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (100, 224, 224, 3), dtype=np.uint8)


def test_bench_generate_100_images(benchmark, victim, images):
    """Beam search (3 beams, 20 new tokens) on 100 images: a 1,000-image test split is 10 of these."""
    victim.generate(images[:10])  # warm-up: first oneDNN call builds kernels
    captions = benchmark.pedantic(victim.generate, args=(images,), rounds=3, iterations=1)
    assert len(captions) == 100


@pytest.mark.parametrize("lm_dropout", [True, False], ids=["lm-dropout", "no-lm-dropout"])
def test_bench_fine_tune_64_steps_worth(benchmark, victim, images, lm_dropout):
    """One epoch over 640 examples at batch 64 = 10 optimiser steps on the trainable set, with
    and without the frozen LM's dropout (Recipe.lm_dropout; measured 1.25x faster without)."""
    data = TrainingSet(ImageBank(images), [Example(str(i), i % 100, CAPTIONS[i % 3]) for i in range(640)])
    recipe = Recipe(epochs=1, batch_size=64, lr=1e-3, lm_dropout=lm_dropout)
    log = benchmark.pedantic(victim.fine_tune, args=(data,), kwargs={"seed": 0, "recipe": recipe},
                             rounds=2, iterations=1)
    assert log["steps"] == 10


def test_bench_badnet_trigger_1000_images(benchmark):
    batch = np.random.default_rng(1).integers(0, 256, (1000, 224, 224, 3), dtype=np.uint8)
    attack = BadNet()
    out = benchmark.pedantic(attack.apply_trigger, args=(batch, list(range(1000))),
                             kwargs={"params": attack.presets["srd-code"], "seed": 0}, rounds=3, iterations=1)
    assert out.shape == batch.shape
