"""Anomalous Activation Regularization: the adapters' sharpest output channels masked during
training, re-selected every step (methods/defenses.md §R3).

The sources give only "dynamically sparsify abnormally sharp adapter channels/weights" with a
sparsity γ and a momentum β; the unit, statistic, selection and delivery below are the
benchmark's reconstruction, each UNVERIFIED (methods/defenses.md §R3 "Benchmark reconstruction").
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch

EPS = 1e-6  # methods/defenses.md §R3: s_c = max|h| / (mean|h| + 1e-6)
STATISTICS = ("peak-to-mean", "max-zscore")  # §R3 statistic and its alternative knob


def position_rows(output: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
    """|h| of the real positions as (N, C): the rows where ``positions`` (B, T) is True for an
    output over text tokens, every position otherwise (methods/defenses.md §R3: non-padding positions)."""
    h = output.detach().abs().float()
    if positions is not None:
        return h[positions]
    return h.reshape(-1, h.shape[-1])


def channel_statistic(peak: torch.Tensor, total: torch.Tensor, count: int, statistic: str) -> torch.Tensor:
    """Per-channel sharpness of one layer over one step: the peak-to-mean ratio of |h|, or the
    per-layer z-score of the channel's peak |h| (methods/defenses.md §R3, UNVERIFIED both)."""
    if statistic == "peak-to-mean":
        return peak / (total / max(count, 1) + EPS)
    return (peak - peak.mean()) / (peak.std(unbiased=False) + EPS)


def top_fraction(scores: torch.Tensor, gamma: float) -> torch.Tensor:
    """Keep-mask (bool (C,)) masking the ⌈γ·C⌉ largest ``scores`` (methods/defenses.md §R3 selection, a quantile rule)."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    count = math.ceil(gamma * scores.numel())
    if count:
        keep[torch.topk(scores, count).indices] = False
    return keep


class ChannelMasks:
    """Sharpness S_ℓ tracked with momentum β per adapter layer and the keep-mask m_ℓ of each.

    Within a step ``observe`` accumulates each layer's statistics over its forwards (several with
    micro-batches); ``end_step`` folds them into S and, while masks are dynamic, re-selects m for
    the next step, so step t is masked by S after step t - 1 and step 0 runs unmasked (methods/defenses.md §R4)."""

    def __init__(self, params: Mapping[str, Any], steps_per_epoch: int):
        self.gamma, self.beta = float(params["aar_gamma"]), float(params["aar_beta"])
        self.statistic, self.dynamic = params["aar_statistic"], bool(params["aar_dynamic"])
        self.steps_per_epoch = steps_per_epoch
        self.sharpness: dict[str, torch.Tensor] = {}  # S_ℓ
        self.keep: dict[str, torch.Tensor] = {}  # m_ℓ, bool (C,)
        self.modules: dict[str, torch.nn.Module] = {}  # the layers seen, for the final mask
        self._step: dict[str, list] = {}  # layer -> [peak, sum, count] of the current step
        self.steps = 0

    def observe(self, name: str, output: torch.Tensor, positions: torch.Tensor | None) -> None:
        rows = position_rows(output, positions)
        peak, total = rows.amax(0), rows.sum(0)
        seen = self._step.get(name)
        if seen is None:
            self._step[name] = [peak, total, rows.shape[0]]
        else:
            seen[0], seen[1], seen[2] = torch.maximum(seen[0], peak), seen[1] + total, seen[2] + rows.shape[0]

    def apply(self, name: str, module: torch.nn.Module, output: torch.Tensor,
              positions: torch.Tensor | None) -> torch.Tensor:
        """TrainingObjective.adapter_output: record the pre-mask output, return it masked."""
        self.modules[name] = module
        self.observe(name, output, positions)
        keep = self.keep.get(name)
        if keep is None:
            return output
        return output * keep.to(device=output.device, dtype=output.dtype)

    def end_step(self) -> dict[str, float]:
        """Fold the step into S; re-select the masks unless they are frozen (static ablation:
        frozen after epoch 1). Returns the share of channels whose mask changed."""
        changed = total = 0
        reselect = self.dynamic or self.steps < self.steps_per_epoch
        for name, (peak, summed, count) in self._step.items():
            s = channel_statistic(peak, summed, count, self.statistic)
            previous = self.sharpness.get(name)
            self.sharpness[name] = s if previous is None else self.beta * previous + (1.0 - self.beta) * s
            if reselect:
                keep = top_fraction(self.sharpness[name], self.gamma)
                old = self.keep.get(name)
                changed += int((keep != old).sum()) if old is not None else int((~keep).sum())
                total += keep.numel()
                self.keep[name] = keep
        self._step.clear()
        self.steps += 1
        return {"aar_mask_changed": changed / total if total else 0.0}

    def penalty(self) -> torch.Tensor | float:
        """Σ over masked channels of ‖W_c‖₁ (methods/defenses.md §R3's optional loss term, R2's "penalise" reading)."""
        terms = [self.modules[name].weight[~keep.to(self.modules[name].weight.device)].abs().sum()
                 for name, keep in self.keep.items()]
        return torch.stack(terms).sum() if terms else 0.0

    @torch.no_grad()
    def write_into_weights(self) -> dict[str, int]:
        """The final masks as zero rows of W (and entries of b): ``aar_final_mask = keep`` (methods/defenses.md §R3).
        Returns the masked channels per layer."""
        masked = {}
        for name, keep in self.keep.items():
            module = self.modules[name]
            drop = ~keep.to(module.weight.device)
            module.weight[drop] = 0.0
            if getattr(module, "bias", None) is not None:
                module.bias[drop] = 0.0
            masked[name] = int(drop.sum())
        return masked
