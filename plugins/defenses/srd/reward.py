"""The SFS inside SRD's reward and the two reward tables (methods/srd.md §2, §4).

S(I_a) = cos(e(c), e(r)) and F(I_a) = ppl(r) / ppl(c) from the configured SfsScorer (MiniLM with
masked mean pooling; the LF model of methods/metrics.md §5-6), c = M(I_a), r the reference caption.
`srd` clips S at 0 and F at 1; `srd-code` leaves both raw (methods/srd.md §2, §10 #7-8).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from vlmbackdoor_bench.errors import VbbError

# methods/srd.md §4.1: the paper's thresholds (semantic λ, fluency β)
PAPER_LAMBDA = 0.1
PAPER_BETA = 0.2
# methods/srd.md §4.2: the code's constants alpha, alpha_2, beta
CODE_ALPHA = 0.1
CODE_ALPHA_2 = 0.2
CODE_BETA = 0.5
EMPTY_REWARD = 0  # methods/srd.md §2: an empty caption scores 0 in both presets
BEST_REWARD = 3  # methods/srd.md §4 / §6: the top of both tables (cleaning stops early on it)
REWARD_TABLES = ("paper", "code")


def paper_reward(delta_s: float, delta_f: float) -> int:
    """methods/srd.md §4.1: rules checked in order, the first match wins."""
    if delta_s >= PAPER_LAMBDA and delta_f >= PAPER_BETA:
        return 3
    if delta_s <= -PAPER_LAMBDA:
        return -2
    if delta_f <= -PAPER_BETA:
        return -1
    if delta_s >= PAPER_LAMBDA:
        return 2
    if delta_f >= PAPER_BETA:
        return 1
    return 0


def code_reward(delta_s: float, delta_f: float) -> int:
    """methods/srd.md §4.2, the code's rule exactly (note the +2 branch's 0.1 fluency threshold)."""
    if delta_s >= CODE_ALPHA:
        if delta_f >= CODE_BETA:
            return 3
        if delta_f >= CODE_ALPHA:
            return 2
        if delta_f <= -CODE_BETA:
            return -2
        if delta_f < 0:
            return -1
        return 1
    if delta_f >= CODE_BETA:
        return -2 if delta_s <= -CODE_ALPHA_2 else 1
    if delta_s <= -CODE_ALPHA:
        return -2
    return -1


def table_reward(table: str, delta_s: float, delta_f: float, empty: bool) -> int:
    if empty:
        return EMPTY_REWARD
    if table == "paper":
        return paper_reward(delta_s, delta_f)
    if table == "code":
        return code_reward(delta_s, delta_f)
    raise VbbError(f"SRD reward_table {table!r} is unknown", f"use one of {REWARD_TABLES}")


class FidelityScores:
    """Per-image S and F of captions against reference captions, through the SfsScorer's public
    ``similarity`` and ``perplexity`` (both cached per caption text)."""

    def __init__(self, scorer, *, clip: bool):
        for method in ("similarity", "perplexity"):
            if not callable(getattr(scorer, method, None)):
                raise VbbError(f"the SRD reward needs a scorer with .{method}(), got {type(scorer).__name__}",
                               "pass vlmbackdoor_bench.metrics.sfs.SfsScorer as context.scorers")
        self.scorer, self.clip = scorer, clip

    def __call__(self, captions: Sequence[str], references: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(S, F) arrays. An empty caption gets S = F = 0 (its reward is 0 anyway, methods/srd.md §2). An empty
        reference has no perplexity: F = 1, as the SfsScorer does for an empty clean caption."""
        captions = [str(c).strip() for c in captions]
        references = [str(r).strip() for r in references]
        s = np.zeros(len(captions))
        f = np.zeros(len(captions))
        live = [k for k, c in enumerate(captions) if c]
        if not live:
            return s, f
        cos = self.scorer.similarity([captions[k] for k in live], [references[k] for k in live])
        texts = sorted({captions[k] for k in live} | {references[k] for k in live if references[k]})
        ppl = dict(zip(texts, self.scorer.perplexity(texts)))
        for j, k in enumerate(live):
            s[k] = max(0.0, float(cos[j])) if self.clip else float(cos[j])
            if not references[k]:
                f[k] = 1.0
                continue
            ratio = float(ppl[references[k]]) / float(ppl[captions[k]])
            f[k] = min(ratio, 1.0) if self.clip else ratio
        return s, f


def rewards(table: str, s: np.ndarray, f: np.ndarray, s0: np.ndarray, f0: np.ndarray,
            empty: Sequence[bool]) -> np.ndarray:
    """The table's reward for each (S, F) against its unmasked (S0, F0) (methods/srd.md §2)."""
    return np.array([table_reward(table, float(s[k] - s0[k]), float(f[k] - f0[k]), bool(empty[k]))
                     for k in range(len(s))], dtype=np.float32)
