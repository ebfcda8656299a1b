"""Metrics of methods/metrics.md: post-processing, BLEU/CIDEr, the three ASR rules, SFS, file I/O.

Importing this package is cheap and silent: torch, transformers and the scorer models are only
loaded when an SFS value is first computed.
"""

from __future__ import annotations

from .asr import ASR_RULES, asr, asr_hits, concept_image_ids
from .captioning import caption_scores
from .io import load_references, load_results
from .postprocess import postprocess_caption
from .score import score_captions, score_files
from .sfs import SfsScorer, default_scorer

__all__ = [
    "ASR_RULES",
    "SfsScorer",
    "asr",
    "asr_hits",
    "caption_scores",
    "concept_image_ids",
    "default_scorer",
    "load_references",
    "load_results",
    "postprocess_caption",
    "score_captions",
    "score_files",
]
