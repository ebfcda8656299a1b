"""A complete victim plugin: a retrieval captioner and the profile that builds it.

Guide: docs/guides/adding-a-victim-profile.md. The model is deliberately small but real: it
describes an image by the mean colour of each cell of an 8 x 8 grid (192 numbers) and scores
every caption it has been trained on with a linear softmax; ``generate`` returns the best one.
Fine-tuning is full-batch gradient descent on the cross-entropy, so a poisoned training set
teaches it a trigger exactly as it would a larger model, in well under a second.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from vlmbackdoor_bench import hookimpl
from vlmbackdoor_bench.errors import VbbError
from vlmbackdoor_bench.hookspecs import StageContext, TrainingObjective
from vlmbackdoor_bench.types import ImageBank, Split, TrainingSet

__version__ = "1.0.0"

GRID = 8  # cells per side of the colour grid the features are read from
UNSEEN = "<unseen>"  # row 0 of the caption table: the score of any caption never trained on


def features(images: np.ndarray) -> np.ndarray:
    """(B, 224, 224, 3) uint8 -> (B, 193) float: the mean colour of each grid cell, centred
    (-0.5 to 0.5, so that a grey background is near 0), then a constant 1 (the bias)."""
    images = np.asarray(images, dtype=np.float64) / 255.0 - 0.5
    b, h, w, c = images.shape
    cells = images.reshape(b, GRID, h // GRID, GRID, w // GRID, c).mean(axis=(2, 4))
    return np.concatenate([cells.reshape(b, -1), np.ones((b, 1))], axis=1)


@dataclass(frozen=True)
class Recipe:
    """The fine-tuning recipe: its ``to_dict`` is part of every trained model's store key."""

    steps: int = 300
    lr: float = 2.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Decoding:
    """How captions are chosen; its fields are part of every caption set's store key."""

    rule: str = "argmax"


@dataclass
class RetrievalVictim:
    """``captions[k]`` is scored by ``weights[:, k]``; column 0 is the unseen-caption row."""

    captions: list[str]
    weights: np.ndarray  # (193, len(captions))
    recipe: Recipe
    profile: str = "example-retrieval"
    decoding: Decoding = field(default_factory=Decoding)
    lineage: dict = field(default_factory=dict)

    # -------------------------------------------------------------- what the grid calls
    def generate(self, images: np.ndarray, instruction: str = "a photo of") -> list[str]:
        """The best caption of each image (the instruction plays no part in this model)."""
        scores = features(images) @ self.weights
        scores[:, 0] = -np.inf  # never answer "<unseen>"
        return [self.captions[k] for k in scores.argmax(axis=1)]

    def caption_nll(self, images: np.ndarray, captions: Sequence[str],
                    instructions: Sequence[str] | None = None) -> np.ndarray:
        """-log p(caption | image); a caption never trained on gets the unseen row's score."""
        log_p = self._log_probs(features(images))
        column = {c: k for k, c in enumerate(self.captions)}
        return np.array([-log_p[i, column.get(c, 0)] for i, c in enumerate(captions)])

    def fine_tune(self, training_set: TrainingSet, *, seed: int, recipe: Recipe | None = None,
                  objective: TrainingObjective | None = None, progress: str = "") -> dict:
        """Gradient descent on the mean cross-entropy of every example; new captions get new
        columns (initialised by ``seed``). Training objectives of attacks are not supported."""
        if objective is not None:
            raise VbbError(f"{self.profile} cannot train with the objective {objective.name!r}",
                           "use attacks without a training objective with this profile")
        recipe = recipe or self.recipe
        for caption in dict.fromkeys(e.caption for e in training_set.examples):
            if caption not in self.captions:
                self.captions.append(caption)
        rng = np.random.default_rng(seed)
        new = len(self.captions) - self.weights.shape[1]
        self.weights = np.concatenate(
            [self.weights, rng.normal(0.0, 0.01, size=(self.weights.shape[0], new))], axis=1)
        x = features(training_set.images.take([e.image_index for e in training_set.examples]))
        column = {c: k for k, c in enumerate(self.captions)}
        y = np.eye(len(self.captions))[[column[e.caption] for e in training_set.examples]]
        losses = []
        for _ in range(recipe.steps):
            p = np.exp(self._log_probs(x))
            losses.append(float(-(y * np.log(p + 1e-12)).sum(axis=1).mean()))
            self.weights -= recipe.lr * x.T @ (p - y) / len(x)
        return {"steps": recipe.steps, "first_loss": losses[0], "last_loss": losses[-1],
                "n_examples": len(x), "n_captions": len(self.captions) - 1}

    def clone(self) -> "RetrievalVictim":
        return RetrievalVictim(list(self.captions), self.weights.copy(), self.recipe, self.profile,
                               self.decoding, dict(self.lineage))

    def save(self, directory: Path) -> None:
        """Every weight is trainable here, so ``save`` and ``save_full`` write the same files."""
        np.save(Path(directory) / "weights.npy", self.weights)
        (Path(directory) / "victim.json").write_text(json.dumps(
            {"captions": self.captions, "recipe": self.recipe.to_dict(),
             "decoding": asdict(self.decoding), "lineage": self.lineage}, indent=1))

    save_full = save

    def load_trainable(self, directory: Path) -> None:
        meta = json.loads((Path(directory) / "victim.json").read_text())
        self.captions, self.lineage = meta["captions"], meta["lineage"]
        self.weights = np.load(Path(directory) / "weights.npy")

    # -------------------------------------------------------------- internals
    def _log_probs(self, x: np.ndarray) -> np.ndarray:
        scores = x @ self.weights
        scores -= scores.max(axis=1, keepdims=True)
        return scores - np.log(np.exp(scores).sum(axis=1, keepdims=True))


class RetrievalProfile:
    name = "example-retrieval"
    version = __version__
    DEFAULTS = {"pretrain_steps": 300, "finetune_steps": 300, "lr": 2.0, "base_seed": 0}

    def params(self, overrides: Mapping[str, Any]) -> dict:
        unknown = sorted(set(overrides) - set(self.DEFAULTS))
        if unknown:
            raise VbbError(f"unknown key(s) {unknown} in [profile.{self.name}]",
                           f"valid keys: {', '.join(self.DEFAULTS)}")
        return {**self.DEFAULTS, **overrides}

    def check_available(self, params: Mapping[str, Any]) -> None:
        """Nothing to check: the model is built here and its data are drawn."""

    def dataset_sources(self) -> Mapping[str, str]:
        return {"coco": "example-shapes"}

    def base_params(self, params: Mapping[str, Any]) -> dict:
        return {k: params[k] for k in ("pretrain_steps", "lr", "base_seed")}

    def finetune_recipe(self, params: Mapping[str, Any]) -> Recipe:
        return Recipe(steps=params["finetune_steps"], lr=params["lr"])

    def build_base(self, context: StageContext, params: Mapping[str, Any], pretrain: Split | None,
                   train: Split) -> tuple[RetrievalVictim, dict]:
        """The "public pretrained" model: trained on the pretrain split's captions only."""
        if pretrain is None:
            raise VbbError(f"profile {self.name} needs a dataset with a 'pretrain' split",
                           "name such a dataset under 'coco' in dataset_sources()")
        victim = RetrievalVictim([UNSEEN], np.zeros((GRID * GRID * 3 + 1, 1)),
                                 self.finetune_recipe(params))
        examples = pretrain.caption_examples()
        log = victim.fine_tune(TrainingSet(ImageBank(pretrain.images), examples),
                               seed=params["base_seed"],
                               recipe=Recipe(steps=params["pretrain_steps"], lr=params["lr"]))
        return victim, log

    def load(self, directory: Path, context: StageContext) -> RetrievalVictim:
        meta = json.loads((Path(directory) / "victim.json").read_text())
        victim = RetrievalVictim([], np.zeros((0, 0)), Recipe(**meta["recipe"]),
                                 decoding=Decoding(**meta["decoding"]))
        victim.load_trainable(directory)
        return victim


@hookimpl
def register_victims(register) -> None:
    register(RetrievalProfile())
