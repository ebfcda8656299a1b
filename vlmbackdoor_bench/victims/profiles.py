"""Victim profiles: `tiny` (CPU, embedded world) and `openflamingo-3b` (paper reproduction).

Registered through the entry-point group like any plugin (DESIGN.md §2).
"""

from __future__ import annotations

from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Mapping

from ..errors import VbbError
from ..hookspecs import StageContext, hookimpl
from ..types import ImageBank, TrainingSet
from .training import Recipe

__version__ = "0.1.0"


def _merge(defaults: dict[str, Any], overrides: Mapping[str, Any], profile: str) -> dict[str, Any]:
    unknown = set(overrides) - set(defaults)
    if unknown:
        raise VbbError(
            f"unknown key(s) {sorted(unknown)} in [profile.{profile}] of benchmark.toml",
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
    """The default profile: a toy Flamingo pretrained here on the embedded world (DESIGN.md §1)."""

    name = "tiny"
    version = __version__
    # Budget knobs for 2 CPU cores (spec/victim.md §A3: "on the CPU track, epochs and batch are
    # scaled budget knobs and are recorded"); every key can be overridden in [profile.tiny].
    DEFAULTS: dict[str, Any] = {
        "vocab_size": 1024,
        "pretrain_epochs": 4, "pretrain_batch_size": 64, "pretrain_lr": 2e-3,
        # OpenFlamingo starts its tanh gates at 0 to preserve a pretrained LM; the tiny LM is
        # pretrained jointly from scratch, and closed gates leave it a text-only model (measured:
        # gates stayed below 0.1 and the backdoor could not see its trigger), so they start open.
        "pretrain_gate_init": 1.0,
        "finetune_epochs": 2, "finetune_batch_size": 64, "finetune_lr": 1e-3,
        # The frozen GPT-2 LM's dropout (0.1) while fine-tuning: on, as the committed board was
        # made; false = OpenFlamingo-3B's setting (MPT-1B has none, training.Recipe) and 1.2x
        # faster steps (README, "Speed").
        "finetune_lm_dropout": True,
        "base_seed": 1234,
        # embedded world sizes (DESIGN.md §4); CI shrinks them for its small grid
        "world_train": 5000, "world_test": 1000, "world_pretrain": 8000, "world_flickr_test": 1000,
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
        import torch

        texts = [c for refs in pretrain.references for c in refs]
        texts += [c for refs in train.references for c in refs] + ["User:a photo of GPT:"] * 100
        tokenizer = train_tokenizer(texts, params["vocab_size"])
        arch = TinyArch(vocab_size=params["vocab_size"])
        torch.manual_seed(params["base_seed"])
        model = build_model(arch, tokenizer, train_vision_encoder=False,
                            gate_init=params["pretrain_gate_init"])
        victim = TinyVictim(model, tokenizer, arch, self.finetune_recipe(params))
        log = victim.pretrain(
            TrainingSet(ImageBank(pretrain.images), pretrain.caption_examples()),
            Recipe(epochs=params["pretrain_epochs"], batch_size=params["pretrain_batch_size"],
                   lr=params["pretrain_lr"]),
            seed=params["base_seed"],
        )
        return victim, log

    def load(self, directory: Path, context: StageContext):
        from .tiny import TinyVictim
        # One token directory per base model (its store key): the encoder is frozen from then on.
        return TinyVictim.load_full(directory, Path(context.cache_dir) / "tokens" / Path(directory).name)


class OpenFlamingo3BProfile:
    """The paper's victim (spec/victim.md Part A). Needs local weights; never downloads."""

    name = "openflamingo-3b"
    version = __version__
    DEFAULTS: dict[str, Any] = {
        "clip_vit_l14_dir": "",  # HF CLIPVisionModel directory (openai/clip-vit-large-patch14)
        "mpt_1b_dir": "",  # anas-awadalla/mpt-1b-redpajama-200b-dolly, local copy
        "tokenizer_dir": "",  # EleutherAI/gpt-neox-20b tokenizer, local copy
        "openflamingo_checkpoint": "",  # OpenFlamingo-3B checkpoint.pt (or .safetensors)
    }

    def params(self, overrides: Mapping[str, Any]) -> dict[str, Any]:
        return _merge(self.DEFAULTS, overrides, self.name)

    def check_available(self, params: Mapping[str, Any]) -> None:
        missing = [f"{key} = {params[key] or '(not set)'}" for key in self.DEFAULTS
                   if not params[key] or not Path(params[key]).exists()]
        if missing:
            raise VbbError(
                "profile openflamingo-3b needs local weights that are missing: " + "; ".join(missing),
                "provision OpenFlamingo-3B (CLIP ViT-L/14 + MPT-1B) locally and name the paths in "
                "[profile.openflamingo-3b] of benchmark.toml; nothing is downloaded "
                "(or use profile = \"tiny\")",
            )
        raise VbbError(
            "profile openflamingo-3b: the weights are present, but assembling the 3B victim from "
            "local parts is not implemented in this version",
            "run the tiny profile, or contribute the assembly in vlmbackdoor_bench/victims/",
        )

    def dataset_sources(self) -> Mapping[str, str]:
        return {"coco": "coco-karpathy", "flickr30k": "flickr30k-karpathy"}

    def finetune_recipe(self, params: Mapping[str, Any]) -> Recipe:
        return Recipe()  # spec/victim.md §A3 benchmark default: 20 epochs, batch 300, lr 1e-4

    def base_params(self, params: Mapping[str, Any]) -> dict[str, Any]:
        return dict(params)

    def build_base(self, context: StageContext, params, pretrain, train):
        self.check_available(params)

    def load(self, directory: Path, context: StageContext):
        self.check_available(self.params({}))


@hookimpl
def register_victims(register) -> None:
    register(TinyProfile())
    register(OpenFlamingo3BProfile())
