"""Helpers a plugin may import, beside the contract itself.

A plugin (an attack, a defense, a victim profile, a metric, a dataset) imports from the core only
:mod:`vlmbackdoor_bench.hookspecs` (hooks, protocols, contexts), :mod:`vlmbackdoor_bench.types`,
:mod:`vlmbackdoor_bench.errors`, this module, and ``from vlmbackdoor_bench import hookimpl``
(tests/test_plugin_surface.py checks the built-in plugins). What belongs to the run (the
victims, the recipe, the scorers, the data, a cache) arrives in the plugin's context
(:class:`~vlmbackdoor_bench.hookspecs.DefenseContext`,
:class:`~vlmbackdoor_bench.hookspecs.StageContext`); what is here is stateless: pure functions
and types, re-exported so that the core modules behind them can move without breaking plugins.

The names, each documented by its own docstring:

``victim_device(victim) -> torch.device``
    Where a victim computes; a tensor a plugin combines with the victim's outputs goes there.
``training_payload(device, precision) / run_payload(device, precision) -> dict``
    What a plugin's cache key adds for a run's StageContext.device and .precision ({} on the
    CPU at float32): a model trained (or trained and evaluated) elsewhere is another entry.
``concept_image_ids(references, mode) / source_words(captions, concepts)``
    Shadowcast's source-concept images and words, as the ASR metric counts them
    (methods/metrics.md §4.3), so an attack poisons exactly what the metric scores.
``caption_scores(captions, references) -> {"bleu4", "cider", ...}``
    BLEU, CIDEr and ROUGE-L of one caption per image (methods/metrics.md §3), e.g. a defense's
    held-out check.
``pretrained_efficientnet_lite0() -> torch.nn.Module``
    The ImageNet-1k classifier that ships offline (methods/victim.md §B2), e.g. an image-text
    matching proxy.
``Recipe``
    The built-in profiles' fine-tuning recipe type (what DefenseContext.recipe is for ``tiny``
    and ``openflamingo-3b``); ``Recipe()`` is methods/victim.md §A3's benchmark recipe.
"""

from __future__ import annotations

from .device import run_payload, training_payload, victim_device
from .metrics.asr import concept_image_ids, source_words
from .metrics.captioning import caption_scores
from .victims.efficientnet import pretrained_efficientnet_lite0
from .victims.training import Recipe

__all__ = [
    "victim_device", "training_payload", "run_payload",
    "concept_image_ids", "source_words", "caption_scores",
    "pretrained_efficientnet_lite0", "Recipe",
]
