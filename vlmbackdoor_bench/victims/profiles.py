"""Victim profiles: `tiny` (CPU, embedded world) and `openflamingo-3b` (paper reproduction).

Registered through the entry-point group like any plugin (methods/design.md §2).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping

import torch

from ..device import CPU_DEFAULT
from ..errors import VbbError
from ..hookspecs import StageContext, hookimpl
from ..types import ImageBank, TrainingSet
from .training import Recipe

__version__ = "0.1.0"


def _device_and_precision(context: StageContext):
    """The stage's device and precision (StageContext), the CPU at float32 where it names none."""
    return (torch.device(getattr(context, "device", None) or "cpu"),
            getattr(context, "precision", None) or CPU_DEFAULT)


def _merge(defaults: dict[str, Any], overrides: Mapping[str, Any], profile: str) -> dict[str, Any]:
    unknown = set(overrides) - set(defaults)
    if unknown:
        raise VbbError(
            f"unknown key(s) {sorted(unknown)} in [profile.{profile}]",
            f"valid keys: {', '.join(sorted(defaults))}",
        )
    merged = dict(defaults)
    for key, value in overrides.items():
        expected = type(defaults[key])
        if expected is float and isinstance(value, int):
            value = float(value)
        if not isinstance(value, expected) or isinstance(value, bool) != isinstance(defaults[key], bool):
            raise VbbError(f"[profile.{profile}] {key} must be {expected.__name__}, got {value!r}",
                           f"write e.g. {key} = {defaults[key]!r}")
        merged[key] = value
    return merged


class TinyProfile:
    """The default profile: a toy Flamingo pretrained here on the embedded world (methods/design.md §1)."""

    name = "tiny"
    version = __version__
    # Budget knobs for 2 CPU cores (methods/victim.md §A3: "on the CPU track, epochs and batch are
    # scaled budget knobs and are recorded"): set here, in this one place, for every grid of the
    # profile (recorded in each result's budget); [profile.tiny] may still override a key.
    # Chosen on the world's val split (scripts/validate_world.py), never on test (methods/victim.md §T1).
    DEFAULTS: dict[str, Any] = {
        "vocab_size": 1024,
        "pretrain_epochs": 4, "pretrain_batch_size": 64, "pretrain_lr": 2e-3,
        # OpenFlamingo starts its tanh gates at 0 to preserve a pretrained LM; the tiny LM is
        # pretrained jointly from scratch, and closed gates leave it a text-only model (measured:
        # gates stayed below 0.1 and the backdoor could not see its trigger), so they start open.
        "pretrain_gate_init": 1.0,
        "finetune_epochs": 6, "finetune_batch_size": 32, "finetune_lr": 1e-3,
        # The frozen GPT-2 LM's dropout (0.1) while fine-tuning: off, OpenFlamingo-3B's setting
        # (MPT-1B has none, training.Recipe), 1.2x faster steps (methods/victim.md §T1).
        "finetune_lm_dropout": False,
        "base_seed": 1234,
        # embedded world sizes (methods/design.md §4): per dataset train / val / test, + pretrain
        "world_train": 600, "world_val": 100, "world_test": 100, "world_pretrain": 1500,
        "world_flickr_val": 100, "world_flickr_test": 100,
    }

    def params(self, overrides: Mapping[str, Any]) -> dict[str, Any]:
        return _merge(self.DEFAULTS, overrides, self.name)

    def check_available(self, params: Mapping[str, Any]) -> None:
        """Everything the tiny profile needs is generated here; nothing to check."""

    def dataset_sources(self) -> Mapping[str, str]:
        return {"coco": "embedded-coco", "flickr30k": "embedded-flickr"}

    def finetune_recipe(self, params: Mapping[str, Any]) -> Recipe:
        return Recipe(epochs=params["finetune_epochs"], batch_size=params["finetune_batch_size"],
                      lr=params["finetune_lr"], lm_dropout=params["finetune_lm_dropout"])

    def base_params(self, params: Mapping[str, Any]) -> dict[str, Any]:
        from .tiny import TinyArch
        return {"arch": asdict(TinyArch(vocab_size=params["vocab_size"])),
                **{k: v for k, v in params.items() if k.startswith(("pretrain", "vocab", "base"))}}

    def build_base(self, context: StageContext, params: Mapping[str, Any], pretrain, train):
        """Train the tokenizer and pretrain the base model on the world's alt-text split."""
        from .tiny import TinyArch, TinyVictim, build_model
        from .tokenizer import train_tokenizer

        texts = [c for refs in pretrain.references for c in refs]
        texts += [c for refs in train.references for c in refs] + ["User:a photo of GPT:"] * 100
        tokenizer = train_tokenizer(texts, params["vocab_size"])
        arch = TinyArch(vocab_size=params["vocab_size"])
        torch.manual_seed(params["base_seed"])
        model = build_model(arch, tokenizer, train_vision_encoder=False,
                            gate_init=params["pretrain_gate_init"])
        device, precision = _device_and_precision(context)
        victim = TinyVictim(model, tokenizer, arch, self.finetune_recipe(params), device=device,
                            precision=precision)
        log = victim.pretrain(
            TrainingSet(ImageBank(pretrain.images), pretrain.caption_examples()),
            Recipe(epochs=params["pretrain_epochs"], batch_size=params["pretrain_batch_size"],
                   lr=params["pretrain_lr"]),
            seed=params["base_seed"],
        )
        return victim, log

    def load(self, directory: Path, context: StageContext):
        from .tiny import TinyVictim
        device, precision = _device_and_precision(context)
        # One token directory per base model (its store key): the encoder is frozen from then on.
        return TinyVictim.load_full(directory, Path(context.cache_dir) / "tokens" / Path(directory).name,
                                    device=device, precision=precision)


class OpenFlamingo3BProfile:
    """The paper's victim (methods/victim.md Part A), from local weights; never downloads.

    ``[profile.openflamingo-3b]`` keys (DEFAULTS): the four local paths; the fine-tuning recipe
    (methods/victim.md §A3: 20 epochs, global batch 300 by gradient accumulation on one device, lr
    1e-4); ``finetune_micro_batch_size`` the groups per forward pass (memory only; 0 = the whole
    batch at once); ``finetune_activation_checkpointing`` recomputes MPT's blocks in backward;
    ``finetune_lm_dropout`` stays on (MPT-1B's dropout is 0, and HF checkpointing recomputes
    only in train mode); ``tokens_after_post_ln`` the open_clip >= 2.23 token order (methods/victim.md §A1, off);
    ``decoding_batch_size`` images per beam-search batch; ``token_cache_gib`` the memory the
    bf16 encoder tokens of seen images may hold (256 x 1024 x 2 bytes = 0.5 MiB each; on disk
    they persist per base model). The last two are recorded in the base entry when it is built
    and kept by every model loaded from it (as the tiny profile's decoding). A small grid (CI,
    the openflamingo-mini fixture) scales the recipe and sizes down with these keys.

    Outside the grid: ``build_victim(params, device, precision)`` gives the victim directly
    (``random_weights=True``: the full-size architecture from the configs, for benchmarks only).
    """

    name = "openflamingo-3b"
    # Derived models a grid keeps loaded (GridRunner): each holds its own ~1.05 B trainable
    # parameters (~4.2 GB in fp32) beside the shared frozen 1.5 B; more reload from the store.
    max_loaded_models = 4
    version = __version__
    DEFAULTS: dict[str, Any] = {
        "clip_vit_l14_dir": "",  # HF CLIPModel directory (openai/clip-vit-large-patch14)
        "mpt_1b_dir": "",  # anas-awadalla/mpt-1b-redpajama-200b remote-code directory, local copy
        "tokenizer_dir": "",  # EleutherAI/gpt-neox-20b tokenizer, local copy
        "openflamingo_checkpoint": "",  # OpenFlamingo-3B checkpoint.pt (or .safetensors)
        "tokens_after_post_ln": False,  # methods/victim.md §A1: open_clip 2.16-2.22 order by default
        "finetune_epochs": 20, "finetune_batch_size": 300, "finetune_lr": 1e-4,  # methods/victim.md §A3
        "finetune_micro_batch_size": 25,  # the SRD code's batch per GPU (methods/victim.md §A3)
        "finetune_activation_checkpointing": False,
        "finetune_lm_dropout": True,
        "decoding_batch_size": 100,  # Decoding's default
        "token_cache_gib": 8.0,
    }
    # The files each directory must hold ("a|b": one of them), methods/victim.md §B1's local layouts.
    REQUIRED_FILES: dict[str, tuple[str, ...]] = {
        "clip_vit_l14_dir": ("config.json", "model.safetensors|model.safetensors.index.json|pytorch_model.bin|"
                             "pytorch_model.bin.index.json"),
        "mpt_1b_dir": ("config.json", "model.safetensors|model.safetensors.index.json|pytorch_model.bin|"
                       "pytorch_model.bin.index.json"),
        "tokenizer_dir": ("tokenizer.json",),
    }

    def params(self, overrides: Mapping[str, Any]) -> dict[str, Any]:
        merged = _merge(self.DEFAULTS, overrides, self.name)
        for key in ("finetune_epochs", "finetune_batch_size", "decoding_batch_size"):
            if merged[key] < 1:
                raise VbbError(f"[profile.{self.name}] {key} = {merged[key]} must be at least 1",
                               f"write e.g. {key} = {self.DEFAULTS[key]}")
        if merged["finetune_micro_batch_size"] < 0:
            raise VbbError(f"[profile.{self.name}] finetune_micro_batch_size = "
                           f"{merged['finetune_micro_batch_size']} is negative",
                           "write a positive number of samples per forward pass, or 0 for the whole batch")
        return merged

    def check_available(self, params: Mapping[str, Any]) -> None:
        """One VbbError naming every missing path and the file expected inside it."""
        from .openflamingo import PART_KEYS
        problems = []
        for key in PART_KEYS:
            value = params[key]
            if not value:
                problems.append(f"{key} is not set")
            elif key == "openflamingo_checkpoint":
                if not Path(value).is_file():
                    problems.append(f"{key} = {value}: no checkpoint file (checkpoint.pt) there")
            elif not Path(value).is_dir():
                problems.append(f"{key} = {value}: no such directory")
            else:
                for expected in self.REQUIRED_FILES[key]:
                    if not any((Path(value) / name).is_file() for name in expected.split("|")):
                        problems.append(f"{key} = {value}: no {expected.replace('|', ' or ')} inside")
        if problems:
            raise VbbError(
                "profile openflamingo-3b needs local files that are missing: " + "; ".join(problems),
                "provision OpenFlamingo-3B (CLIP ViT-L/14 HF directory, MPT-1B remote-code directory, "
                "GPT-NeoX-20B tokenizer, OpenFlamingo checkpoint.pt) locally and name the paths in "
                "[profile.openflamingo-3b] of benchmark.toml; nothing is downloaded (or use profile = \"tiny\")",
            )

    def dataset_sources(self) -> Mapping[str, str]:
        return {"coco": "coco-karpathy", "flickr30k": "flickr30k-karpathy"}

    def finetune_recipe(self, params: Mapping[str, Any]) -> Recipe:
        micro = params["finetune_micro_batch_size"]
        return Recipe(epochs=params["finetune_epochs"], batch_size=params["finetune_batch_size"],
                      lr=params["finetune_lr"], lm_dropout=params["finetune_lm_dropout"],
                      micro_batch_size=0 if micro >= params["finetune_batch_size"] else micro,
                      activation_checkpointing=params["finetune_activation_checkpointing"])

    def base_params(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """The local parts and the token order; the files' hashes are checked when the base loads."""
        from .openflamingo import PART_KEYS
        return {key: params[key] for key in (*PART_KEYS, "tokens_after_post_ln")}

    def build_victim(self, params: Mapping[str, Any], device=None, precision=None, *,
                     random_weights: bool = False):
        """The victim from ``params`` without the grid: assembled on ``device`` (default the CPU)
        and the checkpoint imported; ``random_weights`` skips every weight file (benchmarks)."""
        from .flamingo_victim import Decoding
        from .openflamingo import LocalParts, OpenFlamingoVictim
        if not random_weights:
            self.check_available(params)
        return OpenFlamingoVictim.from_parts(
            LocalParts.from_params(params), recipe=self.finetune_recipe(params),
            decoding=Decoding(batch_size=params["decoding_batch_size"]), device=device or "cpu",
            precision=precision, tokens_after_post_ln=params["tokens_after_post_ln"],
            token_cache_bytes=int(params["token_cache_gib"] * 2**30), random_weights=random_weights)

    def build_base(self, context: StageContext, params: Mapping[str, Any], pretrain, train):
        """Assemble from the local parts and import the checkpoint; nothing is trained here."""
        import time
        started = time.perf_counter()
        device, precision = _device_and_precision(context)
        victim = self.build_victim(params, device, precision)
        return victim, {"seconds": time.perf_counter() - started, "checkpoint": victim.imported.as_dict()}

    def load(self, directory: Path, context: StageContext):
        """The base saved by ``build_base``; recipe, decoding and token-cache size are the ones it
        was built with (its manifest), as the tiny profile's victim.json keeps them."""
        from .openflamingo import OpenFlamingoVictim
        device, precision = _device_and_precision(context)
        return OpenFlamingoVictim.load_base(directory, device=device, precision=precision,
                                            token_dir=Path(context.cache_dir) / "tokens" / Path(directory).name)


@hookimpl
def register_victims(register) -> None:
    register(TinyProfile())
    register(OpenFlamingo3BProfile())
