"""Scoring caption files: the engine behind ``vbb score`` (spec/metrics.md §2-§5).

    vbb score --captions RESULTS.json --references REFS.json --target banana --asr-rule srd --json

Captions are post-processed (§2, idempotent), evaluated over the ids of the captions file only
(references restricted to those ids, so CIDEr's idf comes from the evaluated images, §3), and
scored with BLEU-1..4, CIDEr, ROUGE-L (§3), the chosen ASR rule (§4) and, when the clean
reference model's captions are given, SC / LF / SFS (§5.1). A Shadowcast-style file gets no special
treatment: its own ids are the evaluated set.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import VbbError
from .asr import ASR_RULES, DEFAULT_TARGET, asr
from .captioning import caption_scores
from .io import load_references, load_results
from .postprocess import postprocess_caption

__all__ = ["score_files", "score_captions"]


def _check_rule(rule: str) -> None:
    if rule not in ASR_RULES:
        raise VbbError(
            f"unknown ASR rule {rule!r}", f"use one of: {', '.join(ASR_RULES)} (metrics.md §4)"
        )


def score_captions(
    captions: dict[int, str],
    references: dict[int, list[str]],
    *,
    target: str = DEFAULT_TARGET,
    asr_rule: str = "srd",
    clean_captions: dict[int, str] | None = None,
    scorer: Any = None,
    source: str = "the captions",
) -> dict:
    """Score in-memory captions; see :func:`score_files` for the result's keys."""
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
    caps = {i: postprocess_caption(c) for i, c in captions.items()}  # §2
    refs = {i: list(references[i]) for i in caps}  # evaluate only the captioned images (§3)
    out: dict[str, Any] = dict(caption_scores(caps, refs))
    a = asr(caps, refs, asr_rule, target=target)
    out.update(
        asr=a["asr"],
        asr_rule=a["rule"],
        asr_n=a["n"],
        asr_excluded=a["excluded"],
        asr_successes=a["successes"],
        target=target,
    )
    if clean_captions is not None:
        if scorer is None:
            from .sfs import default_scorer

            scorer = default_scorer(None)
        clean = {i: postprocess_caption(c) for i, c in clean_captions.items()}
        s = scorer.score(caps, clean)
        out.update(
            sc=s["sc"],
            lf=s["lf"],
            sfs=s["sfs"],
            sfs_n=s["n"],
            sfs_n_empty=s["n_empty"],
            sfs_n_clean_empty=s.get("n_clean_empty", 0),
            sfs_scorer=s["scorer"],
        )
    return out


def score_files(
    captions_path: str | Path,
    references_path: str | Path,
    *,
    target: str = DEFAULT_TARGET,
    asr_rule: str = "srd",
    clean_captions_path: str | Path | None = None,
    scorer: Any = None,
    references_split: str = "test",
) -> dict:
    """Score a caption file against a reference file (formats: :mod:`vlmbackdoor_bench.metrics.io`).

    Returns (all scores x100, full precision):

    * ``bleu1`` .. ``bleu4``, ``cider``, ``rouge_l``, ``spice`` (None), ``n_images`` (§3);
    * ``asr``, ``asr_rule``, ``asr_n``, ``asr_excluded``, ``asr_successes``, ``target`` (§4);
    * with ``clean_captions_path``: ``sc``, ``lf``, ``sfs``, ``sfs_n``, ``sfs_n_empty``,
      ``sfs_n_clean_empty``, ``sfs_scorer`` (§5.1), using ``scorer`` (an
      :class:`~vlmbackdoor_bench.metrics.sfs.SfsScorer`; default: the process's shared one);
    * ``captions_path``, ``references_path``, ``clean_captions_path``.

    Captions whose image ids are not in the references raise :class:`VbbError`.
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
    )
    out.update(
        captions_path=str(captions_path),
        references_path=str(references_path),
        clean_captions_path=str(clean_captions_path) if clean_captions_path is not None else None,
    )
    return out
