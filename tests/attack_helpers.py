"""Shared by the attack tests: a toy caption split; for the encoder-gradient attacks (VL-Trojan,
Shadowcast) also a cheap tiny victim, distinct toy images, and one intra-op thread while they run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlmbackdoor_bench.types import Split, SplitManifest
from vlmbackdoor_bench.victims.tiny import TinyArch, TinyVictim, build_model
from vlmbackdoor_bench.victims.tokenizer import train_tokenizer
from vlmbackdoor_bench.victims.training import Recipe


def make_split(n_images: int = 10, captions_per_image: int = 5) -> Split:
    """Random-noise images with ids 100.., captions "a photo number i caption k.", ids "i-k"."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n_images, 224, 224, 3), dtype=np.uint8)
    refs = [[f"a photo number {i} caption {k}." for k in range(captions_per_image)] for i in range(n_images)]
    sids = [[f"{i}-{k}" for k in range(captions_per_image)] for i in range(n_images)]
    return Split("toy", "train", list(range(100, 100 + n_images)), images, refs, sids,
                 SplitManifest("toy", "train", n_images, "x", "y"))


def tiny_victim() -> TinyVictim:
    """A small tiny victim (64 px internal input) whose frozen encoder is cheap to differentiate."""
    torch.manual_seed(0)
    tokenizer = train_tokenizer(["a red apple on a table."] * 40 + ["User:a photo of GPT:"] * 5, 300)
    arch = TinyArch(vocab_size=300, lm_layers=1, input_size=64)
    return TinyVictim(build_model(arch, tokenizer, train_vision_encoder=False), tokenizer, arch, Recipe())


def scenes(n: int, seed: int = 0) -> np.ndarray:
    """Distinct uint8 224x224 images: a coloured square on a noisy background."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 60, (n, 224, 224, 3)).astype(np.uint8)
    for k in range(n):
        top, left = rng.integers(0, 120, 2)
        images[k, top:top + 100, left:left + 100] = rng.integers(80, 256, 3)
    return images


@pytest.fixture(scope="module")
def one_thread():
    """The machine's 2 cores are shared with other jobs; with 2 intra-op threads under a load of 4
    an encoder backward ran 10-30x slower than with one (measured), so these tests use one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
