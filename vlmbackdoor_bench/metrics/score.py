"""Scoring captions through the registered metrics: the engine of the grid's ``scores`` stage and
of ``vbb score`` (methods/metrics.md §2-§5).

    vbb score --captions RESULTS.json --references REFS.json --target banana --asr-rule srd --json

:func:`compute_metrics` runs every metric plugin on one :class:`MetricRequest`: a metric that
declares ``asr_rules`` once per rule asked for, its value stored as ``<name>_<rule>``
(:func:`vlmbackdoor_bench.results_schema.stored_key`). Captions are post-processed (methods/metrics.md §2,
idempotent), evaluated over the ids of the captions file only (references restricted to those
ids, so CIDEr's idf comes from the evaluated images, methods/metrics.md §3). Metrics that declare
``needs_clean_captions`` (SC / LF / SFS, §5.1) run only when the clean reference model's captions
are given. A Shadowcast-style file gets no special treatment: its own ids are the evaluated set.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping

from ..errors import VbbError
from ..hookspecs import MetricRequest
from ..results_schema import stored_key
from .asr import ASR_RULES, DEFAULT_TARGET
from .io import load_references, load_results
from .postprocess import postprocess_caption

__all__ = ["compute_metrics", "registered_metrics", "score_files", "score_captions"]


def compute_metrics(metrics: Mapping[str, Any], request: MetricRequest,
                    rules: Iterable[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(values, details)`` of every metric in ``metrics`` (name -> plugin, run in name order)
    on ``request``: values by stored key, and each metric's other outputs under the same key."""
    values: dict[str, Any] = {}
    details: dict[str, Any] = {}
    for name, metric in sorted(metrics.items()):
        for rule in (list(rules) if getattr(metric, "asr_rules", ()) else [None]):
            if rule is not None:
                request.asr_rule = rule
            result = dict(metric.compute(request))
            key = stored_key(name, rule)
            values[key] = result.pop("value")
            if result:
                details[key] = result
    return values, details


def registered_metrics() -> dict[str, Any]:
    """The metric plugins of the default registry (built-ins and installed plugins)."""
    from ..registry import load_registry
    return dict(load_registry().items["metric"])


def _check_rule(rule: str) -> None:
    if rule not in ASR_RULES:
        raise VbbError(
            f"unknown ASR rule {rule!r}", f"use one of: {', '.join(ASR_RULES)} (methods/metrics.md §4)"
        )


def _flat(values: Mapping[str, Any], details: Mapping[str, Any], asr_rule: str) -> dict:
    """The flat keys ``vbb score`` has always printed (see :func:`score_files`), then every
    other metric's value under its stored key."""
    out: dict[str, Any] = {}
    for key in ("bleu4", "cider"):  # both carry BLEU-1..3, ROUGE-L, SPICE and n_images
        out.update(details.get(key, {}))
    out.update(values)
    asr_key = stored_key("asr", asr_rule)
    if asr_key in values:
        a = details.get(asr_key, {})
        out.update(asr=values[asr_key], asr_rule=a.get("rule"), asr_n=a.get("n"),
                   asr_excluded=a.get("excluded"), asr_successes=a.get("successes"))
    if "sfs" in values:
        s = details["sfs"]
        out.update(sfs_n=s["n"], sfs_n_empty=s["n_empty"], sfs_n_clean_empty=s["n_clean_empty"],
                   sfs_scorer=s["scorer"])
    return out


def score_captions(
    captions: dict[int, str],
    references: dict[int, list[str]],
    *,
    target: str = DEFAULT_TARGET,
    asr_rule: str = "srd",
    clean_captions: dict[int, str] | None = None,
    scorer: Any = None,
    source: str = "the captions",
    metrics: Mapping[str, Any] | None = None,
) -> dict:
    """Score in-memory captions with ``metrics`` (None: :func:`registered_metrics`); see
    :func:`score_files` for the result's keys."""
    _check_rule(asr_rule)
    if not captions:
        raise VbbError(f"{source} contain no captions", "pass a file with at least one caption")
    unknown = [i for i in captions if i not in references]
    if unknown:
        examples = ", ".join(str(i) for i in sorted(unknown, key=str)[:5])
        raise VbbError(
            f"{len(unknown)} of {len(captions)} image ids in {source} are not in the references "
            f"(e.g. {examples})",
            "score against the references of the same dataset and split the captions were "
            "generated for (e.g. the Karpathy test set for COCO test captions)",
        )
    caps = {i: postprocess_caption(c) for i, c in captions.items()}  # methods/metrics.md §2
    refs = {i: list(references[i]) for i in caps}  # evaluate only the captioned images (§3)
    metrics = registered_metrics() if metrics is None else metrics
    if clean_captions is None:
        metrics = {n: m for n, m in metrics.items() if not getattr(m, "needs_clean_captions", False)}
    elif scorer is None:
        from .sfs import default_scorer

        scorer = default_scorer(None)
    request = MetricRequest(captions=caps, references=refs, target=target, asr_rule=asr_rule,
                            clean_captions=clean_captions, scorers=scorer)
    values, details = compute_metrics(metrics, request, [asr_rule])
    return {**_flat(values, details, asr_rule), "target": target}


def score_files(
    captions_path: str | Path,
    references_path: str | Path,
    *,
    target: str = DEFAULT_TARGET,
    asr_rule: str = "srd",
    clean_captions_path: str | Path | None = None,
    scorer: Any = None,
    references_split: str = "test",
    metrics: Mapping[str, Any] | None = None,
) -> dict:
    """Score a caption file against a reference file (formats: :mod:`vlmbackdoor_bench.metrics.io`).

    Returns (all scores x100, full precision):

    * ``bleu1`` .. ``bleu4``, ``cider``, ``rouge_l``, ``spice`` (None), ``n_images`` (methods/metrics.md §3);
    * ``asr``, ``asr_rule``, ``asr_n``, ``asr_excluded``, ``asr_successes``, ``target`` (§4),
      and the same ASR under its stored key ``asr_<rule>``;
    * with ``clean_captions_path``: ``sc``, ``lf``, ``sfs``, ``sfs_n``, ``sfs_n_empty``,
      ``sfs_n_clean_empty``, ``sfs_scorer`` (methods/metrics.md §5.1), using ``scorer`` (an
      :class:`~vlmbackdoor_bench.metrics.sfs.SfsScorer`; default: the process's shared one);
    * every other registered metric's value under its stored key;
    * ``captions_path``, ``references_path``, ``clean_captions_path``.

    ``metrics``: name -> metric plugin (None: :func:`registered_metrics`). Captions whose image
    ids are not in the references raise :class:`VbbError`.
    """
    _check_rule(asr_rule)  # fail before any file is parsed or any JVM starts
    captions = load_results(captions_path)
    references = load_references(references_path, split=references_split)
    clean = load_results(clean_captions_path) if clean_captions_path is not None else None
    out = score_captions(
        captions,
        references,
        target=target,
        asr_rule=asr_rule,
        clean_captions=clean,
        scorer=scorer,
        source=f"captions file {captions_path}",
        metrics=metrics,
    )
    out.update(
        captions_path=str(captions_path),
        references_path=str(references_path),
        clean_captions_path=str(clean_captions_path) if clean_captions_path is not None else None,
    )
    return out
