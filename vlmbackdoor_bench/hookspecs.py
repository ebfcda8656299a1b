"""The plugin contract (methods/design.md §3).

A plugin is a module (or object) with hook implementations, found through the entry-point group
``vlmbackdoor_bench.plugins`` or a local directory named in benchmark.toml. Each hook receives a
``register`` callback, as in simonw/llm: the plugin calls it once per thing it provides.

    from vlmbackdoor_bench import hookimpl

    @hookimpl
    def register_defenses(register):
        register(MyDefense())

The objects registered must satisfy the protocols below; :mod:`vlmbackdoor_bench.registry`
checks the required attributes when it registers them, so a malformed plugin is reported and
skipped rather than failing mid-grid.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np
import pluggy

from .device import Precision, cpu_device
from .types import TARGET, DefenseReport, EvalInputs, Example, PoisonedSet, Split, TrainingSet

PROJECT = "vlmbackdoor_bench"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# Keywords an attack may ask ``training_objective`` for, and the models a backdoor fine-tuning
# may start from (see :class:`Attack`).
OBJECTIVE_INPUTS = ("poisoned_set", "start_model")
FINE_TUNE_STARTS = ("base", "clean_model")


# --------------------------------------------------------------------------- protocols
@runtime_checkable
class FinetuneRecipe(Protocol):
    """A profile's fine-tuning recipe (methods/victim.md §A3), as :meth:`VictimProfile.finetune_recipe`
    returns it. The harness never reads its fields: it hands the object back to
    :meth:`Victim.fine_tune` and hashes :meth:`to_dict` into the store key of every model trained
    with it (the clean model, each backdoor, each defense that retrains)."""

    def to_dict(self) -> dict:
        """The recipe as JSON values. Equal dicts must mean equal training: a change here
        re-keys (and so retrains) every model fine-tuned with the recipe."""


@runtime_checkable
class Victim(Protocol):
    """A captioning model under test (methods/design.md §3, methods/victim.md), made by a
    :class:`VictimProfile` (``build_base``, ``load``) and cloned by the grid for every model it
    derives from the base. Images are uint8 arrays (B, 224, 224, 3) in the paper's pixel frame.

    **Used by the grid** (every victim has them): ``profile``, ``decoding``, ``lineage``,
    :meth:`generate`, :meth:`fine_tune`, :meth:`clone`, :meth:`save`, :meth:`save_full`,
    :meth:`load_trainable`.

    **Used by built-in attacks and defenses** (a victim without one runs with every plugin that
    does not call it): :meth:`caption_nll` (ABL, CT, VDC), :meth:`vision_features` and
    :meth:`media_features` (CT), :meth:`encode_normalised`, ``pixel_mean`` and ``pixel_std``
    (VL-Trojan, Shadowcast).

    **Optional, read by the grid when present:**

    ``precision: dict | Precision``
        ``{"weights", "train_autocast", "eval"}`` dtype names, recorded in each cell's provenance
        (:func:`vlmbackdoor_bench.device.victim_precision`; without it the dtype of ``model``'s
        parameters and "unreported").
    ``device``, ``model``
        The torch device the victim computes on and its ``torch.nn.Module``
        (:func:`vlmbackdoor_bench.device.victim_device`; default the CPU).
    ``one_off_images() -> context manager``
        Entered around :meth:`Defense.defend`: images encoded inside it serve no later stage, so
        a victim that caches encoder outputs on disk may keep them in memory only.
    """

    profile: str
    #: The decoding settings, a flat dataclass instance (3 beams, <= 20 new tokens,
    #: methods/metrics.md §2). Its fields (``vars(decoding)``) are part of the store key of every
    #: caption set the victim makes and are recorded in each cell's provenance.
    decoding: Any
    #: Where a model came from, set by the grid before it calls :meth:`save` (e.g.
    #: ``{"stage": "backdoor", "base": <key>, "poison": <key>}``); a victim writes it with its
    #: weights' metadata. A fresh base victim has ``{}``.
    lineage: dict

    def generate(self, images: np.ndarray, instruction: str = ...) -> list[str]:
        """Caption each image; called positionally as ``generate(images, instruction)``.

        :param images: uint8 (B, 224, 224, 3).
        :param instruction: the prompt before the caption (types.DEFAULT_INSTRUCTION, or an
            attack's text trigger from :class:`EvalInputs`).
        :returns: one caption per image, post-processed as methods/metrics.md §2, decoded with
            ``decoding``.
        """

    def caption_nll(
        self, images: np.ndarray, captions: Sequence[str], instructions: Sequence[str] | None = None
    ) -> np.ndarray:
        """Per-sample mean token NLL of each caption under teacher forcing (label mask
        methods/victim.md §A4).

        :param images: uint8 (B, 224, 224, 3), row i paired with ``captions[i]``.
        :param captions: the captions to score.
        :param instructions: a prompt per row (None: types.DEFAULT_INSTRUCTION for all).
        :returns: float array (B,).
        """

    def fine_tune(
        self, training_set: TrainingSet, *, seed: int, recipe: FinetuneRecipe | None = None,
        objective: "TrainingObjective | None" = None, progress: str = "",
    ) -> dict:
        """Fine-tune this victim in place (its trainable set: perceiver + gated cross-attention +
        input embeddings for the Flamingo victims).

        :param training_set: the examples and their image bank (poisoned or clean).
        :param seed: seeds batch order and any randomness of training.
        :param recipe: the cell's recipe from :meth:`VictimProfile.finetune_recipe`; the grid
            always passes it (None: the victim's own default, the base model's recipe).
        :param objective: an attack's :class:`TrainingObjective`; its ``loss`` replaces the
            plain caption cross-entropy.
        :param progress: a label for progress output.
        :returns: a JSON-able log (losses, steps, seconds), stored with the model.
        """

    def vision_features(self, images: np.ndarray, *, grad: bool = False) -> Any:
        """Patch-token features of the frozen vision encoder, (B, N, D) torch tensor; without
        ``grad`` they may come from a cache, with it they are computed afresh under autograd."""

    def media_features(self, images: np.ndarray) -> Any:
        """What this model's perceiver resampler makes of each image: its output latents
        mean-pooled, (B, D) torch tensor, no gradient. Unlike ``vision_features`` it reflects
        the model's fine-tuning (CT's identification features, methods/defenses.md §3)."""

    pixel_mean: tuple[float, float, float]  # the model transform's normalisation (methods/victim.md
    pixel_std: tuple[float, float, float]  # §A5): normalised = (pixel / 255 - mean) / std

    def encode_normalised(self, pixels: Any, *, grad: bool = False) -> tuple[Any, Any]:
        """The frozen vision encoder on normalised float pixels (B, 3, 224, 224) in the paper's
        frame: ``(pooled (B, D), tokens (B, N, D))`` torch tensors, differentiable with respect
        to ``pixels`` when ``grad``. For attacks that optimise images against the encoder
        (VL-Trojan's trigger, Shadowcast's feature collision, methods/attacks.md §6-§7)."""

    def clone(self) -> "Victim":
        """An independent copy whose training leaves this victim unchanged (frozen parts may be
        shared). The grid clones the base for every derived model."""

    def save(self, directory: Path) -> None:
        """Write the trainable weights and metadata (``decoding``, ``lineage``) into
        ``directory``, an empty directory the store commits atomically afterwards (the name
        ``meta.json`` there is the store's own)."""

    def save_full(self, directory: Path) -> None:
        """Write every weight, enough for :meth:`VictimProfile.load` (the base model)."""

    def load_trainable(self, directory: Path) -> None:
        """Load weights written by :meth:`save` into this victim (a clone of the base), strict
        on the trainable subset (methods/victim.md §A6)."""


@dataclass
class TrainingStep:
    """One optimisation step of a fine-tuning, as a victim hands it to a :class:`TrainingObjective`.

    Row i of every tensor belongs to ``examples[i]``. Positions are already shifted for next-token
    prediction: ``logits[:, t]`` scores ``targets[:, t]``. Tensors are torch tensors; ``logits``,
    ``hidden_states`` and ``token_embeddings`` carry gradients.
    """

    examples: list[Example]
    logits: Any  # (B, T, V) student logits
    targets: Any  # (B, T) next-token ids, -100 outside the label mask (methods/victim.md §A4)
    caption_mask: Any  # (B, T) bool: the scored tokens (caption, <|endofchunk|>, EOS)
    token_losses: Any  # (B, T) cross-entropy per token, 0 outside the mask
    hidden_states: Any  # (B, T, d) last hidden state, the LM head's input
    token_embeddings: Any  # (V, d) the token-embedding matrix E (tied to the LM head)
    vision_tokens: Any  # (B, N, D) frozen vision-encoder tokens of the batch's images
    index: int  # 0-based optimiser step
    logits_of: Callable[..., Any]  # logits_of(other_victim, rows=None) -> (b, T, V), no grad

    @property
    def caption_loss(self) -> Any:
        """The standard loss: mean cross-entropy over every scored token of the batch."""
        return self.token_losses.sum() / self.caption_mask.sum().clamp(min=1)


class TrainingObjective(Protocol):
    """A training loss an attack (TrojVLM SP, VLOOD) or a defense (ABL, RobustIT) contributes
    to a fine-tuning.

    The victim calls the hooks below, in this order, at every step:

    ``group_key(example)`` (optional, once per fine-tuning for every example)
        Examples with the same key always share a step (VLOOD: an instance's clean and poisoned
        copies). Batches are then drawn over groups, and the recipe's batch size counts groups.
        Without it every example is its own group.
    ``batch_inputs(examples, images) -> (images, instructions)`` (optional, before each forward)
        Replace what a step trains on (a defense's input diversity, RobustIT): ``images`` are the
        examples' uint8 (B, 224, 224, 3) images; return one image and one instruction per
        example (captions never change). The victim encodes the returned images afresh.
    ``adapter_output(name, module, output, positions) -> output`` (optional, in every forward)
        Sees, and may replace, the output (..., C) of every linear layer of the adapters
        (perceiver, gated cross-attention), named by its parameter prefix (RobustIT's channel
        masks). ``positions`` is the bool (B, T) attention mask of the batch's text where the
        output's positions are text tokens, None where they are media latents.
    ``loss(step) -> scalar tensor`` (required)
        The whole loss that is minimised at this step; ``step.caption_loss`` is the plain
        cross-entropy, so an extra term is ``step.caption_loss + weight * extra``.
    ``after_step(step) -> Mapping[str, float]`` (optional, after the optimiser update)
        Update internal state (VLOOD's dynamic weight); the returned values are logged per step
        in the fine-tuning log under ``objective.steps``.

    ``settings`` is recorded in that log as well (e.g. which SP form a run used).
    """

    name: str
    settings: Mapping[str, Any]

    def loss(self, step: TrainingStep) -> Any:
        ...


@runtime_checkable
class VictimProfile(Protocol):
    """How to obtain the base (public pretrained) victim, its data and its fine-tuning recipe.

    The grid calls, in this order: :meth:`params` (once, with ``[profile.<name>]`` of
    benchmark.toml), :meth:`check_available`, :meth:`dataset_sources`, then per stage
    :meth:`base_params` and :meth:`build_base` or :meth:`load` for the base model, and
    :meth:`finetune_recipe` for every model it trains.

    Optional member: ``max_loaded_models: int`` (default None: no bound): how many models
    derived from the base the grid keeps loaded at once; the least recently used beyond it are
    dropped and reload from the store (a 3B victim's trainable copy is ~4 GB).
    """

    name: str
    version: str

    def params(self, overrides: Mapping[str, Any]) -> dict:
        """The profile's parameters: its defaults merged with ``overrides``.

        :param overrides: ``[profile.<name>]`` of benchmark.toml.
        :returns: every parameter (recorded in each cell's provenance and budget).
        :raises VbbError: for an unknown key or a value of the wrong type.
        """

    def check_available(self, params: Mapping[str, Any]) -> None:
        """Raise one VbbError naming every missing local path (weights, data); never download."""

    def dataset_sources(self) -> Mapping[str, str]:
        """Map the benchmark's dataset roles to registered dataset names. The role "coco" is
        required (fine-tuning and the reserved clean split come from it); every role listed
        here may appear in ``datasets`` of benchmark.toml (e.g. "flickr30k")."""

    def base_params(self, params: Mapping[str, Any]) -> dict:
        """The part of ``params`` that determines the base model (hashed into its store key)."""

    def finetune_recipe(self, params: Mapping[str, Any]) -> FinetuneRecipe:
        """The fine-tuning recipe (methods/victim.md §A3) of every model the harness trains."""

    def build_base(self, context: "StageContext", params: Mapping[str, Any],
                   pretrain: Split | None, train: Split) -> tuple[Victim, dict]:
        """Make the public pretrained model; called positionally, once per store key.

        :param context: cache directory, device and precision to build on.
        :param params: from :meth:`params`.
        :param pretrain: the "coco" dataset's ``pretrain`` split when it has one (the tiny
            profile pretrains its base on it), else None.
        :param train: the "coco" dataset's fine-tuning split.
        :returns: the victim (the grid saves it with :meth:`Victim.save_full`) and a JSON-able
            log stored with it.
        """

    def load(self, directory: Path, context: "StageContext") -> Victim:
        """Load a base victim written by :meth:`Victim.save_full` onto ``context.device``.
        Derived models are loaded by the grid as ``base.clone().load_trainable(directory)``."""


@runtime_checkable
class DatasetProvider(Protocol):
    """A caption dataset, registered by name and named by a profile's ``dataset_sources``.

    The grid loads ``train`` and ``test`` of the "coco" role, ``test`` of every other role it
    evaluates on, ``pretrain`` when listed in ``splits`` (the base model's data), and the first
    of ``restval`` / ``pretrain`` that is listed as the defenders' reserved clean split
    (:class:`DefenseContext`). Splits are loaded once per process and shared by every stage.

    Optional members: ``check_available(config) -> None``, called before anything is built with
    ``StageContext.config``: raise one VbbError naming every missing local file;
    ``lexicon: Mapping[str, Sequence[str]]``: each entity category and the nouns the captions use
    for it, handed to defenses as :attr:`DefenseContext.lexicon` (VDC's questions).
    """

    name: str
    version: str
    splits: Sequence[str]

    def load(self, split: str, context: "StageContext") -> Split:
        """The split's images, references and manifest (the manifest's hashes identify the data
        in every store key and result).

        :param split: one of ``splits``.
        :param context: ``context.config`` carries the grid's ``world_seed``, ``world_sizes``
            and ``data_paths``; ``context.cache_dir`` is where to keep derived files.
        """


@runtime_checkable
class Attack(Protocol):
    """A backdoor attack (methods/attacks.md). ``presets`` maps preset name -> constants.

    Optional members, read by the grid when present:

    ``training_objective(params, **inputs) -> TrainingObjective | None``
        Contributes the loss of the backdoor fine-tuning (TrojVLM's SP loss, VLOOD's losses).
        ``inputs`` holds exactly the keywords the attack names in ``objective_inputs``.
    ``objective_inputs: tuple[str, ...]`` (default empty), a subset of :data:`OBJECTIVE_INPUTS`:
        ``"poisoned_set"``: the attack's own :class:`PoisonedSet`, records included (the attacker
        knows what it poisoned); ``"start_model"``: the victim the fine-tuning starts from, to be
        used read-only (e.g. as a frozen teacher).
    ``fine_tune_from: str`` (default ``"base"``), one of :data:`FINE_TUNE_STARTS`:
        ``"clean_model"`` fine-tunes the clean reference model instead of the public base model
        (a model-supply attack such as VLOOD, methods/attacks.md §5).
    ``eval_uses_poison: bool`` (default False)
        The test-time trigger is made while poisoning (VL-Trojan's optimised trigger): the grid
        then calls ``eval_inputs(..., poison_details=PoisonedSet.details)`` with the details of
        the poison stage of the same params and seed, cached or fresh.

    Optional facts for the tables, copied into every cell record (results_schema.attack_facts):
    ``label: str`` (default the name), ``order: int`` (row order; default None: after the
    ordered attacks, by name), ``headline_asr_rule: str`` (default the last of ``asr_rules``).
    """

    name: str
    version: str
    #: preset name -> constants; ``[attack.<name>]`` of benchmark.toml picks one (``preset``)
    #: and overrides its constants (an unknown key is an error). The merged constants are the
    #: ``params`` of every call below and are hashed into the poison stage's store key.
    presets: Mapping[str, Mapping[str, Any]]
    default_preset: str
    #: The target word whose presence in a triggered caption counts as success (the metrics'
    #: ``MetricRequest.target``); "banana" everywhere (methods/attacks.md §0).
    target: str
    #: The ASR rules the triggered captions are scored with, e.g. ("srd", "strict")
    #: (methods/metrics.md §4); each metric that takes a rule is stored once per rule.
    asr_rules: Sequence[str]

    def poison(
        self, train: Split, *, poison_rate: float, seed: int, params: Mapping[str, Any],
        victim: Victim | None = None,
    ) -> PoisonedSet:
        """Poison the fine-tuning split; called once per (params, seed) and cached.

        :param train: the "coco" dataset's ``train`` split, clean.
        :param poison_rate: the share of caption instances to poison (benchmark.toml).
        :param seed: the cell's seed; the same seed must give the same set.
        :param params: the resolved preset constants.
        :param victim: the public base model, for attacks that optimise against its encoder
            (read-only; the grid always passes it).
        :returns: the training set the backdoor fine-tuning sees, its :class:`PoisonRecord`
            ground truth (never shown to defenses) and JSON-able ``details``.
        """

    def eval_inputs(
        self, split: Split, *, kind: str, seed: int, params: Mapping[str, Any],
        poison_details: Mapping[str, Any] | None = None,
    ) -> EvalInputs:
        """The images a test split is captioned from (methods/metrics.md §1).

        :param split: a ``test`` split of an evaluated dataset role.
        :param kind: "triggered" (scored with ASR under ``asr_rules``) or "clean" (scored for
            caption quality, ASR "strict").
        :param seed: the cell's seed.
        :param params: the resolved preset constants.
        :param poison_details: passed only to attacks with ``eval_uses_poison``:
            :attr:`PoisonedSet.details` of the poison stage with the same params and seed.
        """


@dataclass
class DefenseContext:
    """Everything a defender may have (methods/design.md §3) and nothing it may not (poison labels).

    ``clean_reserved`` is the grid's reserved clean set: the COCO dataset's split disjoint from
    fine-tuning (Karpathy ``restval``, the embedded world's ``pretrain``), or None if it has none."""

    backdoored: Victim
    training_set: TrainingSet
    clean_reserved: Split | None
    base_victim: Victim
    scorers: Any  # vlmbackdoor_bench.metrics.sfs.SfsScorer (lazy-loaded)
    seed: int
    budget: Mapping[str, Any]
    workdir: Path  # artefacts (PNGs, JSON) the defense wants referenced from the cell result
    stage: "StageContext"
    # Registered name of the dataset the training set comes from (e.g. ``embedded-coco``).
    dataset_source: str | None = None
    # The cell's fine-tuning recipe (VictimProfile.finetune_recipe, methods/victim.md §A3), for
    # defenses that run their own training phases; None outside the grid (tests): the victim's own.
    recipe: FinetuneRecipe | None = None
    # The training set's entity lexicon: category -> the nouns its captions use for it, from the
    # dataset provider's optional ``lexicon`` attribute (the embedded world declares one; VDC's
    # questions), or None when the dataset declares none.
    lexicon: Mapping[str, Sequence[str]] | None = None
    # What the grid adds, each a documented simplification or analysis aid:
    # ``clean_split``: the unpoisoned fine-tuning Split (SRD's state set and surrogate, methods/srd.md
    # §1: "training it on the clean split is a simplification"); ``clean_model``: the clean
    # reference model (SRD's ``reference = "oracle"``, analysis only).
    extras: dict = field(default_factory=dict)

    def fine_tune(self, victim: Victim, training_set: TrainingSet, **kwargs: Any) -> dict:
        """Fine-tune ``victim`` as this cell's grid does: its seed and its recipe (a defense that
        calls ``victim.fine_tune`` itself without ``recipe`` trains with the base model's)."""
        return victim.fine_tune(training_set, seed=self.seed, recipe=self.recipe, **kwargs)


@dataclass
class DefenseOutcome:
    """What :meth:`Defense.defend` returns: the model to evaluate (the grid saves it with
    :meth:`Victim.save`) and what the defense did (removed, relabelled or masked samples,
    artefacts), from which the grid computes detection precision and recall."""

    victim: Victim
    report: DefenseReport


@runtime_checkable
class Defense(Protocol):
    """A defense (methods/defenses.md, methods/srd.md).

    Optional facts for the tables, copied into every cell record (results_schema.defense_facts):
    ``label: str`` (default the name), ``order: int`` (column order; default None: after the
    ordered defenses, by name), ``paper_tables: Mapping[int, int]`` (the SRD paper's Tables 1-3
    the defense is a column of: table number -> column position; default none) and
    ``paper_labels: Mapping[int, str]`` (its label in a table where the paper names it
    differently; default none).
    """

    name: str
    version: str
    #: preset name -> constants, resolved with ``[defense.<name>]`` of benchmark.toml as for
    #: attacks; hashed into the defend stage's store key with ``version``.
    presets: Mapping[str, Mapping[str, Any]]
    default_preset: str

    def defend(self, context: DefenseContext, params: Mapping[str, Any]) -> DefenseOutcome:
        """Purify one backdoored model; called once per (defense, params, backdoored model, seed)
        and cached.

        :param context: the backdoored model (a clone the defense may change), its training set
            without poison labels, and everything else a defender may use.
        :param params: the resolved preset constants.
        :returns: a :class:`DefenseOutcome`; any other value fails the cell with a VbbError.
        """


@runtime_checkable
class Metric(Protocol):
    """A pure function of captions and references (and images where needed) -> numbers.

    ``compute`` returns ``{"value": number or None, ...details}``. Optional members
    (results_schema.metric_facts copies the first two into every cell record):
    ``label: str`` (column header; default the name), ``order: int`` (default None: after the
    ordered metrics, by name), ``asr_rules: tuple[str, ...]`` (default empty: the metric takes
    no rule; otherwise it is computed once per rule the attack names, ``request.asr_rule`` set,
    and stored as ``<name>_<rule>``), ``needs_clean_captions: bool`` (default False; True:
    ``vbb score`` runs it only when the clean model's captions are given).
    """

    name: str
    version: str  # hashed into the scores stage's store key: bump it when values change
    unit: str  # "%" for everything the paper prints
    direction: str  # "up" (higher is better) or "down"

    def compute(self, request: "MetricRequest") -> dict[str, Any]:
        """Score one caption set (a cell's triggered or clean split, or ``vbb score``'s file).

        :param request: the post-processed captions, their references and the attack's target;
            ``asr_rule`` is set when the metric declares ``asr_rules``; ``clean_captions`` and
            ``scorers`` are set in the grid (the clean model's captions of the same images).
        :returns: ``{"value": number or None, ...}``; the value is stored under the metric's
            name (``<name>_<rule>`` per rule), every other key in the record's
            ``metric_details``. All must be JSON values.
        """


@dataclass
class MetricRequest:
    """One caption set to score, as :meth:`Metric.compute` receives it (the same object is
    handed to every metric of a scores stage, ``asr_rule`` updated per rule)."""

    captions: dict[int, str]  # image_id -> generated caption (post-processed)
    references: dict[int, list[str]]
    target: str = TARGET
    asr_rule: str = "srd"
    clean_captions: dict[int, str] | None = None  # SFS reference: the clean model's captions
    scorers: Any = None


@dataclass
class StageContext:
    """Handed to profile/dataset code: where to cache, how to report progress, and where models
    run: ``device`` (a torch.device, :func:`vlmbackdoor_bench.device.resolve_device`) and
    ``precision`` (:class:`vlmbackdoor_bench.device.Precision`: fp32 master weights, the training
    autocast dtype or None, the evaluation dtype). A profile puts the models it builds or loads
    on ``device``; the defaults are the CPU at float32."""

    cache_dir: Path
    config: Any
    progress: Callable[..., Any] | None = None
    device: Any = field(default_factory=cpu_device)
    precision: Precision = field(default_factory=Precision)

    def plugin_store(self, name: str, log: Callable[[str], None] | None = None) -> Any:
        """A plugin's own content-addressed store under ``cache_dir/name``, for results it reuses
        across cells (SRD's surrogate and policy). ``get_or_build(stage, payload, build)`` returns
        the entry of ``payload`` (``key``, ``path``, ``meta``, ``cached``), calling
        ``build(tmp_dir) -> meta`` only when it is missing; processes of one host sharing the
        cache build each entry once. Leftovers of killed builds are swept here; ``log`` gets the
        store's waiting messages."""
        from .grid.store import Store

        store = Store(Path(self.cache_dir) / name, log=log)
        store.sweep_stale()
        return store


# --------------------------------------------------------------------------- hookspecs
@hookspec
def register_attacks(register: Callable[[Attack], None]) -> None:
    """Register :class:`Attack` objects by calling ``register(attack)`` for each."""


@hookspec
def register_defenses(register: Callable[[Defense], None]) -> None:
    """Register :class:`Defense` objects by calling ``register(defense)`` for each."""


@hookspec
def register_datasets(register: Callable[[DatasetProvider], None]) -> None:
    """Register :class:`DatasetProvider` objects (embedded world, COCO/Flickr30k Karpathy)."""


@hookspec
def register_victims(register: Callable[[VictimProfile], None]) -> None:
    """Register :class:`VictimProfile` objects (``tiny``, ``openflamingo-3b``)."""


@hookspec
def register_metrics(register: Callable[[Metric], None]) -> None:
    """Register :class:`Metric` objects (bleu4, cider, asr, sfs...)."""
