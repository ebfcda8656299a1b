"""`vbb bench`: captions/min, fine-tune samples/s and peak memory of the openflamingo-3b victim.

Real work on deterministic synthetic inputs (uint8 noise images, COCO-like word captions):

* captions: the spec's decoding (methods/metrics.md §2: 3 beams, 20 new tokens, length penalty 0)
  with ``min_new_tokens`` forced to the 20 new tokens, so an early <|endofchunk|> (likely with
  random weights) cannot shorten the work; the new tokens of every caption are counted. One
  warm-up batch on other images first; the timed images are new to the token cache, so their
  encoding is timed too.
* fine-tuning: the profile's recipe (micro-batches accumulated into its global batch, its
  precision) for whole optimiser steps after one warm-up step; the images' encoder tokens are
  computed first (timed separately), as the grid's token cache keeps them once per image.
* peak memory: ``torch.cuda.max_memory_allocated`` per phase on CUDA; on the CPU the process's
  peak resident set, which includes building the model.

``random_weights`` builds the full-size architecture (or the openflamingo-mini sizes) from
configs written here (fixtures.openflamingo_configs): no file, no download, numbers only.
"""

from __future__ import annotations

import contextlib
import math
import platform
import resource
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .errors import VbbError

BENCH_SCHEMA = 1
PROFILE = "openflamingo-3b"
FINETUNE_PROJECTION_SAMPLES = 25015  # methods/victim.md §A3: the COCO 5k subset's caption instances
FINETUNE_PROJECTION_IMAGES = 5000  # ... on 5,000 images, each encoded once
CAPTION_PROJECTION_IMAGES = 6000  # COCO Karpathy test (5,000) + Flickr30k test (1,000), methods/design.md §1
CAPTIONS_PER_IMAGE = 5  # COCO's references per image (methods/design.md §4)
CAPTION_WORDS_PER_SAMPLE = 10  # about a COCO caption's length in words
FORCED_LENGTH_NOTE = ("min_new_tokens forced to max_new_tokens: every caption is {n} new tokens, "
                      "so an early end cannot flatter captions/min")


@dataclass(frozen=True)
class BenchOptions:
    """What ``vbb bench`` was asked for; None = the profile's own setting."""

    profile: str = PROFILE
    random_weights: bool = False
    size: str | None = None  # "full" | "mini", random weights only (default full)
    device: str = "auto"
    batch_size: int | None = None  # decoding batch and fine-tuning micro-batch
    images: int | None = None  # timed captions (default: two decoding batches)
    finetune_samples: int | None = None  # timed samples, whole global batches (default: two)
    allow_cpu_full: bool = False
    seed: int = 0


# --------------------------------------------------------------------------- inputs
def synthetic_images(n: int, seed: int) -> np.ndarray:
    """``n`` uint8 224x224 RGB noise images, the same for the same seed."""
    return np.random.default_rng(seed).integers(0, 256, size=(n, 224, 224, 3), dtype=np.uint8)


def synthetic_captions(n: int, seed: int) -> list[str]:
    """``n`` COCO-length captions of caption words, the same for the same seed."""
    from .fixtures.openflamingo_configs import CAPTION_WORDS
    rng = np.random.default_rng(seed)
    words = rng.choice(CAPTION_WORDS, size=(n, CAPTION_WORDS_PER_SAMPLE))
    return [" ".join(row).capitalize() + "." for row in words]


# --------------------------------------------------------------------------- device helpers
def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, work: Callable[[], Any]) -> tuple[Any, float]:
    """``work()``'s result and its wall-clock seconds, CUDA work included (synchronised)."""
    _synchronise(device)
    started = time.perf_counter()
    result = work()
    _synchronise(device)
    return result, time.perf_counter() - started


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float:
    """CUDA: the tensors' peak since the last reset; CPU: the process's peak RSS (Linux KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def peak_memory_kind(device: torch.device) -> str:
    return ("torch.cuda.max_memory_allocated, per phase" if device.type == "cuda"
            else "process peak RSS (ru_maxrss), since start")


# --------------------------------------------------------------------------- victim
def check_options(options: BenchOptions, device: torch.device) -> str | None:
    """The random-weights size (None for local weights); a VbbError for a combination that
    cannot be meant."""
    if options.profile != PROFILE:
        raise VbbError(f"vbb bench measures the {PROFILE} profile, not {options.profile!r}",
                       f"use --profile {PROFILE} (the tiny profile's cells record their own timings)")
    if not options.random_weights:
        if options.size is not None:
            raise VbbError("--size chooses the architecture of --random-weights; local weights have their own",
                           "add --random-weights, or drop --size")
        return None
    size = options.size or "full"
    if size == "full" and device.type == "cpu" and not options.allow_cpu_full:
        raise VbbError("--random-weights --size full on the CPU builds OpenFlamingo-3B's 2.6 B parameters in "
                       "float32 (about 10 GB) and runs minutes per step",
                       "run it with --device cuda on a GPU machine, use --size mini for a CPU smoke run, "
                       "or add --allow-cpu-full if you mean it")
    return size


def build_victim(size: str | None, overrides: dict, device: torch.device, precision, workdir: Path):
    """(victim, params, recipe): from the config's ``[profile.openflamingo-3b]``, or with random
    weights at ``size`` on configs written under ``workdir``."""
    from .victims.profiles import OpenFlamingo3BProfile
    profile = OpenFlamingo3BProfile()
    params = profile.params(overrides)
    if size is not None:
        from .fixtures.openflamingo_configs import SIZES, write_config_parts
        params.update(write_config_parts(workdir, SIZES[size]))
    victim = profile.build_victim(params, device, precision, random_weights=size is not None)
    return victim, params, profile.finetune_recipe(params)


@contextlib.contextmanager
def counting_new_tokens(victim, counts: list[int]):
    """Record how many tokens each caption's generate call added (beam padding excluded)."""
    model = victim.model
    original = model.generate
    pad = victim.tokenizer.pad_token_id

    def generate(vision_x, lang_x, *args, **kwargs):
        out = original(vision_x, lang_x, *args, **kwargs)
        counts.extend((out[:, lang_x.shape[1]:] != pad).sum(dim=1).tolist())
        return out

    model.generate = generate
    try:
        yield counts
    finally:
        del model.generate


# --------------------------------------------------------------------------- phases
def measure_captions(victim, n_images: int, batch_size: int, seed: int) -> dict:
    """Beam-search captions of ``n_images`` new images after one warm-up batch."""
    device = victim.device
    spec = victim.decoding
    victim.decoding = replace(spec, min_new_tokens=spec.max_new_tokens, batch_size=batch_size)
    counts: list[int] = []
    try:
        with counting_new_tokens(victim, counts):
            victim.generate(synthetic_images(batch_size, seed + 1))  # warm-up: kernels, allocator
            counts.clear()
            images = synthetic_images(n_images, seed + 2)
            reset_peak_memory(device)
            captions, seconds = timed(device, lambda: victim.generate(images))
    finally:
        victim.decoding = spec
    return {"images": n_images, "batch_size": batch_size, "num_beams": spec.num_beams,
            "max_new_tokens": spec.max_new_tokens, "min_new_tokens": spec.max_new_tokens,
            "length_penalty": spec.length_penalty,
            "note": FORCED_LENGTH_NOTE.format(n=spec.max_new_tokens),
            "new_tokens": {"min": min(counts), "max": max(counts), "captions": len(counts)},
            "captions_returned": len(captions), "seconds": seconds,
            "captions_per_min": 60.0 * n_images / seconds, "peak_memory_gib": peak_memory_gib(device)}


def measure_finetune(victim, recipe, samples: int, seed: int) -> dict:
    """Whole optimiser steps of ``recipe`` (one epoch over ``samples`` rounded up to global
    batches) after one warm-up step; encoder tokens computed beforehand and timed apart."""
    from .types import DEFAULT_INSTRUCTION, Example, ImageBank, TrainingSet
    device = victim.device
    global_batch = recipe.batch_size
    steps = max(1, math.ceil(samples / global_batch))
    n = (steps + 1) * global_batch  # the warm-up step's samples first
    captions = synthetic_captions(n, seed)
    bank = ImageBank(synthetic_images(math.ceil(n / CAPTIONS_PER_IMAGE), seed + 3))
    examples = [Example(sample_id=str(i), image_index=i // CAPTIONS_PER_IMAGE, caption=caption)
                for i, caption in enumerate(captions)]
    warm_up, measured = (TrainingSet(bank, examples[:global_batch]), TrainingSet(bank, examples[global_batch:]))
    one_epoch = replace(recipe, epochs=1)
    victim.fine_tune(warm_up, seed=seed, recipe=one_epoch, progress="bench warm-up")
    fresh = len({e.image_index for e in measured.examples} - {e.image_index for e in warm_up.examples})
    _, encoder_seconds = timed(device, lambda: victim.encode_bank(measured))
    reset_peak_memory(device)
    log, seconds = timed(device, lambda: victim.fine_tune(measured, seed=seed, recipe=one_epoch,
                                                         progress="bench fine-tune"))
    _, _, labels = victim.encode_texts(captions[global_batch:], [DEFAULT_INSTRUCTION] * len(measured))
    micro = recipe.micro_batch_size or global_batch
    return {"samples": len(measured), "steps": log["steps"], "global_batch": global_batch,
            "micro_batch": micro, "micro_batches_per_step": math.ceil(global_batch / micro),
            "activation_checkpointing": recipe.activation_checkpointing,
            "label_tokens_per_sample": float((labels[:, 1:] != -100).sum()) / len(measured),
            "seconds": seconds, "samples_per_s": len(measured) / seconds,
            "final_loss": log["final_loss"], "peak_memory_gib": peak_memory_gib(device),
            "encoder_images": fresh, "encoder_seconds": encoder_seconds,
            "encoder_images_per_s": fresh / encoder_seconds if fresh and encoder_seconds > 0 else None}


def projections(captions: dict, finetune: dict) -> dict:
    """What the measured rates mean for the paper's grid (one epoch, one caption pass)."""
    encode = (FINETUNE_PROJECTION_IMAGES / finetune["encoder_images_per_s"]
              if finetune["encoder_images_per_s"] else 0.0)
    steps = FINETUNE_PROJECTION_SAMPLES / finetune["samples_per_s"]
    return {"finetune_25k_samples_1_epoch_s": steps + encode,
            "finetune_25k_steps_s": steps, "finetune_5k_images_encoding_s": encode,
            "captions_6000_images_s": 60.0 * CAPTION_PROJECTION_IMAGES / captions["captions_per_min"]}


# --------------------------------------------------------------------------- the command
def device_description(device: torch.device) -> dict:
    from .device import device_record
    record = device_record(device)
    record.update(torch=torch.__version__, cuda=torch.version.cuda,
                  cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    return record


def run_bench(options: BenchOptions, config) -> dict:
    """Build the victim and measure; the JSON-ready record."""
    from .device import resolve_device, resolve_precision
    device = resolve_device(options.device)
    size = check_options(options, device)
    precision = resolve_precision(device, config.eval_dtype, config.train_dtype)
    overrides = config.profile_params if config.profile == options.profile else {}
    with tempfile.TemporaryDirectory(prefix="vbb-bench-") as workdir:
        (victim, params, recipe), build_seconds = timed(
            device, lambda: build_victim(size, overrides, device, precision, Path(workdir)))
    parameters = list(victim.model.parameters())
    total = sum(p.numel() for p in parameters)
    trainable = sum(p.numel() for p in parameters if p.requires_grad)
    decoding_batch = options.batch_size or params["decoding_batch_size"]
    if options.batch_size:
        recipe = replace(recipe, micro_batch_size=0 if options.batch_size >= recipe.batch_size
                         else options.batch_size)
    captions = measure_captions(victim, options.images or 2 * decoding_batch, decoding_batch, options.seed)
    finetune = measure_finetune(victim, recipe, options.finetune_samples or 2 * recipe.batch_size,
                                options.seed)
    return {"schema": BENCH_SCHEMA, "profile": options.profile,
            "weights": f"random ({size} size)" if size
            else "local files ([profile.openflamingo-3b])",
            "device": device_description(device), "precision": victim.precision,
            "parameters": {"total": total, "trainable": trainable}, "build_seconds": build_seconds,
            "peak_memory_kind": peak_memory_kind(device), "captions": captions, "finetune": finetune,
            "projections": projections(captions, finetune)}


def format_table(result: dict) -> str:
    from tabulate import tabulate
    c, f, p, dev = result["captions"], result["finetune"], result["projections"], result["device"]
    where = dev.get("gpu") or f"{dev['cpu']} ({dev['threads']} threads)"
    rows = [
        ("device", f"{dev['name']}: {where}"),
        ("weights / precision", f"{result['weights']}; {result['precision']}"),
        ("parameters", f"{result['parameters']['total'] / 1e9:.3f} B total, "
                       f"{result['parameters']['trainable'] / 1e9:.3f} B trainable"),
        ("captions/min", f"{c['captions_per_min']:.1f} ({c['images']} images, batch {c['batch_size']}, "
                         f"{c['num_beams']} beams, {c['new_tokens']['min']}-{c['new_tokens']['max']} new tokens)"),
        ("fine-tune samples/s", f"{f['samples_per_s']:.1f} ({f['steps']} step(s) of {f['global_batch']} = "
                                f"{f['micro_batches_per_step']} x micro-batch {f['micro_batch']})"),
        ("encoder images/s", "-" if f["encoder_images_per_s"] is None else f"{f['encoder_images_per_s']:.1f}"),
        ("peak memory (GiB)", f"captions {c['peak_memory_gib']:.2f}, fine-tune {f['peak_memory_gib']:.2f} "
                              f"[{result['peak_memory_kind']}]"),
        ("25k samples x 1 epoch", f"{p['finetune_25k_samples_1_epoch_s']:.0f} s"),
        ("captions for 6,000 test images", f"{p['captions_6000_images_s']:.0f} s"),
    ]
    return tabulate(rows, tablefmt="simple") + f"\nnote: {c['note']}"
