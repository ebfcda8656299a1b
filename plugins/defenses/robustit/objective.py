"""RobustIT's training objective: the plain caption loss of the victim's fine-tuning, with IDR on
each step's inputs and AAR's masks on the adapters' outputs (methods/defenses.md §R4: "only two things
change" against the No Defense run). It uses the victim's optional TrainingObjective hooks
``batch_inputs`` and ``adapter_output`` (hookspecs.TrainingObjective)."""

from __future__ import annotations

from typing import Any, Mapping

from vlmbackdoor_bench.hookspecs import TrainingStep

from .aar import ChannelMasks
from .idr import InputDiversity


class RobustObjective:
    """The hooks exist only for the regularisers a preset enables: a victim calls a hook it finds."""

    name = "robustit"

    def __init__(self, params: Mapping[str, Any], *, seed: int, steps_per_epoch: int):
        self.settings = {k: v for k, v in params.items() if k != "cost_reference_steps"}
        self.penalty_weight = float(params["aar_penalty_weight"])
        self.diversity = InputDiversity(params, seed) if params["idr"] else None
        self.masks = ChannelMasks(params, steps_per_epoch) if params["aar"] else None
        if self.diversity is not None:
            self.batch_inputs = self.diversity.batch
        if self.masks is not None:
            self.adapter_output = self.masks.apply

    def loss(self, step: TrainingStep) -> Any:
        """The plain cross-entropy; with ``aar_penalty_weight`` > 0 plus λ·Σ‖W_c‖₁ of the masked rows."""
        if self.masks is None or not self.penalty_weight:
            return step.caption_loss
        return step.caption_loss + self.penalty_weight * self.masks.penalty()

    def after_step(self, step: TrainingStep) -> Mapping[str, float]:
        return self.masks.end_step() if self.masks is not None else {}
