"""The built-in metric plugins: bleu4, cider, asr, sc, lf, sfs (methods/metrics.md §3-§5).

Each object satisfies :class:`vlmbackdoor_bench.hookspecs.Metric`; ``compute(request)`` returns
``{"value": <x100 float or None>, ...details}``. The ``asr`` metric declares ``asr_rules``: it is
computed once per rule and stored as ``asr_<rule>`` (e.g. ``asr_srd``, docs/CONTRACTS.md). Labels
and orders are the SRD paper's column headers and column order (its Table 1).

BLEU-4 and CIDEr share one pycocoevalcap run per (captions, references) pair, and SC / LF / SFS
share the SFS scorer's per-caption cache, so asking for several metrics costs one computation.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Mapping

from ..errors import VbbError
from ..hookspecs import MetricRequest, hookimpl
from .asr import ASR_RULES, asr
from .captioning import caption_scores
from .postprocess import postprocess_caption

__all__ = ["BUILTIN_METRICS", "register_metrics"]

METRIC_VERSION = "1.0.0"
UNIT = "%"  # methods/metrics.md §3-§5: every value is reported x100
_MEMO_SIZE = 4  # caption-score results kept (a cell asks for bleu4 and cider of the same split)
_memo: "OrderedDict[str, dict]" = OrderedDict()
_memo_lock = threading.Lock()


def _captions(request: MetricRequest) -> dict[int, str]:
    return {i: postprocess_caption(c) for i, c in request.captions.items()}  # methods/metrics.md §2, idempotent


def _digest(caps: Mapping[int, str], refs: Mapping[int, Any]) -> str:
    h = hashlib.sha256()
    for i in sorted(caps, key=str):
        h.update(json.dumps([str(i), caps[i], list(refs.get(i, []))]).encode("utf-8"))
    return h.hexdigest()


def _caption_scores(request: MetricRequest) -> dict:
    caps = _captions(request)
    key = _digest(caps, request.references)
    with _memo_lock:
        if key in _memo:
            _memo.move_to_end(key)
            return _memo[key]
    result = caption_scores(caps, request.references)
    with _memo_lock:
        _memo[key] = result
        while len(_memo) > _MEMO_SIZE:
            _memo.popitem(last=False)
    return result


def _sfs_scores(request: MetricRequest) -> dict:
    if request.clean_captions is None:
        raise VbbError(
            "SC / LF / SFS need the clean reference model's captions, and the request has none",
            "generate the clean reference model's captions of the same images and pass them as "
            "clean_captions (methods/metrics.md §5.1)",
        )
    scorer = request.scorers
    if scorer is None:
        from .sfs import default_scorer

        scorer = default_scorer(None)
    elif not hasattr(scorer, "score"):
        raise VbbError(
            f"request.scorers is a {type(scorer).__name__}, not an SFS scorer",
            "pass a vlmbackdoor_bench.metrics.sfs.SfsScorer (or None for the default one)",
        )
    clean = {i: postprocess_caption(c) for i, c in request.clean_captions.items()}
    return scorer.score(_captions(request), clean)


@dataclass(frozen=True)
class _CaptionMetric:
    """BLEU-4 or CIDEr (methods/metrics.md §3)."""

    name: str
    label: str
    order: int
    version: str = METRIC_VERSION
    unit: str = UNIT
    direction: str = "up"

    def compute(self, request: MetricRequest) -> dict[str, Any]:
        s = _caption_scores(request)
        details = {k: v for k, v in s.items() if k != self.name}
        return {"value": s[self.name], **details}


@dataclass(frozen=True)
class _AsrMetric:
    """Attack success rate under ``request.asr_rule`` (methods/metrics.md §4); lower is better."""

    name: str = "asr"
    label: str = "ASR"
    order: int = 60
    asr_rules: tuple[str, ...] = ASR_RULES
    version: str = METRIC_VERSION
    unit: str = UNIT
    direction: str = "down"

    def compute(self, request: MetricRequest) -> dict[str, Any]:
        a = asr(_captions(request), request.references, request.asr_rule, target=request.target)
        return {
            "value": a["asr"],
            "rule": a["rule"],
            "n": a["n"],
            "excluded": a["excluded"],
            "successes": a["successes"],
        }


@dataclass(frozen=True)
class _SfsMetric:
    """SC, LF or SFS (methods/metrics.md §5.1)."""

    name: str
    label: str
    order: int
    version: str = METRIC_VERSION
    unit: str = UNIT
    direction: str = "up"
    needs_clean_captions: bool = True

    def compute(self, request: MetricRequest) -> dict[str, Any]:
        s = _sfs_scores(request)
        return {
            "value": s[self.name],
            "n": s["n"],
            "n_empty": s["n_empty"],
            "n_clean_empty": s.get("n_clean_empty", 0),
            "scorer": s["scorer"],
        }


BUILTIN_METRICS: tuple[Any, ...] = (
    _CaptionMetric("bleu4", "B@4", 10),
    _CaptionMetric("cider", "C", 20),
    _AsrMetric(),
    _SfsMetric("sc", "SC", 30),
    _SfsMetric("lf", "LF", 40),
    _SfsMetric("sfs", "SFS", 50),
)


@hookimpl
def register_metrics(register) -> None:
    """Register the built-in metrics (bleu4, cider, asr, sc, lf, sfs)."""
    for metric in BUILTIN_METRICS:
        register(metric)
