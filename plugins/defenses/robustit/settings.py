"""RobustIT's presets and their validation (methods/defenses.md §R2-§R4, §R7).

Every value is the spec's reconstruction: the paper body is unreadable, so each operation,
magnitude, probability and AAR choice is UNVERIFIED (methods/defenses.md §R0 "Consequence") and a
knob here. ``paper`` is the reconstruction; ``idr-only`` and ``aar-only`` the ablations R1/R3
report (methods/defenses.md §R6); ``beta-0`` the run with β = 0 that R2 reports as best (§R3).
"""

from __future__ import annotations

from typing import Any, Mapping

from vlmbackdoor_bench.errors import VbbError

from .aar import STATISTICS

PAPER: dict[str, Any] = {
    "idr": True,  # methods/defenses.md §R2
    "idr_crop_p": 1.0,  # §R2 spatial: RandomResizedCrop always (UNVERIFIED)
    "idr_crop_scale": [0.6, 1.0],  # methods/defenses.md §R2 (UNVERIFIED)
    "idr_crop_ratio": [0.75, 4.0 / 3.0],  # §R2: 3/4 to 4/3 (UNVERIFIED)
    "idr_flip_p": 0.5,  # methods/defenses.md §R2: horizontal flip (UNVERIFIED)
    "idr_color_p": 0.8,  # §R2 colour: ColorJitter with p = 0.8 (UNVERIFIED)
    "idr_brightness": 0.4,  # methods/defenses.md §R2 (UNVERIFIED)
    "idr_contrast": 0.4,  # §R2 (UNVERIFIED)
    "idr_saturation": 0.4,  # methods/defenses.md §R2 (UNVERIFIED)
    "idr_hue": 0.1,  # §R2 (UNVERIFIED)
    "idr_text_p": 0.5,  # methods/defenses.md §R2 textual: one operation with p = 0.5, instruction only (UNVERIFIED)
    "idr_word_drop_p": 0.1,  # §R2 textual (a): drop each word with p = 0.1 (UNVERIFIED)
    "aar": True,  # methods/defenses.md §R3
    "aar_gamma": 0.1,  # §R3: top γ = 0.1 of the channels per layer (UNVERIFIED; sweep 0.05-0.2)
    "aar_beta": 0.9,  # methods/defenses.md §R3: momentum β = 0.9 (UNVERIFIED; β = 0 in preset beta-0)
    "aar_statistic": "peak-to-mean",  # §R3: max|h| / mean|h| per channel (UNVERIFIED)
    "aar_dynamic": True,  # methods/defenses.md §R3: re-selected every step; False freezes after epoch 1 (UNVERIFIED)
    "aar_final_mask": "keep",  # §R3: the final mask written into the weights; "drop" (UNVERIFIED)
    "aar_penalty_weight": 0.0,  # methods/defenses.md §R3: no loss term by default; λ of the L1 option (UNVERIFIED)
    # Cost (§R4): a plain fine-tune of the same recipe for this many steps on the same data is
    # timed beside the regularised run (0: not measured); the ratio of seconds per step is the
    # cost ratio, warned about above 1.15 (methods/defenses.md §R4, the paper's "< 15 %").
    "cost_reference_steps": 10,
}
PRESETS: dict[str, dict[str, Any]] = {
    "paper": PAPER,
    "idr-only": {**PAPER, "aar": False},  # methods/defenses.md §R6 ablation (R1, R3)
    "aar-only": {**PAPER, "idr": False},  # §R6 ablation (R1, R3)
    "beta-0": {**PAPER, "aar_beta": 0.0},  # methods/defenses.md §R3: the required β = 0 run (R2: best defense)
}
CHOICES = {"aar_statistic": STATISTICS, "aar_final_mask": ("keep", "drop")}
PROBABILITIES = ("idr_crop_p", "idr_flip_p", "idr_color_p", "idr_text_p", "idr_word_drop_p")
COST_WARNING_RATIO = 1.15  # methods/defenses.md §R4: a ratio above 1.15 warns, it does not fail


def resolve(params: Mapping[str, Any]) -> dict[str, Any]:
    """The preset's constants with ``params`` applied, checked: one VbbError per bad value."""
    unknown = set(params) - set(PAPER)
    if unknown:
        raise VbbError(f"unknown RobustIT parameter(s) {sorted(unknown)}",
                       f"use the keys of a preset in [defense.robustit]: {', '.join(sorted(PAPER))}")
    p = {**PAPER, **params}
    for key, allowed in CHOICES.items():
        if p[key] not in allowed:
            raise VbbError(f"RobustIT {key} = {p[key]!r} is unknown", f"use one of {allowed}")
    for key in PROBABILITIES + ("aar_gamma", "aar_beta"):
        if not 0.0 <= float(p[key]) <= 1.0:
            raise VbbError(f"RobustIT {key} = {p[key]} is not in [0, 1]", f"write e.g. {key} = {PAPER[key]}")
    for key in ("idr_crop_scale", "idr_crop_ratio"):
        low, high = (float(v) for v in p[key])
        if not 0.0 < low <= high or (key == "idr_crop_scale" and high > 1.0):
            raise VbbError(f"RobustIT {key} = {p[key]} is not an increasing positive pair"
                           + (" within (0, 1]" if key == "idr_crop_scale" else ""),
                           f"write e.g. {key} = {PAPER[key]}")
    for key in ("idr_brightness", "idr_contrast", "idr_saturation", "aar_penalty_weight", "cost_reference_steps"):
        if float(p[key]) < 0:
            raise VbbError(f"RobustIT {key} = {p[key]} is negative", f"write e.g. {key} = {PAPER[key]}")
    if not 0.0 <= float(p["idr_hue"]) <= 0.5:
        raise VbbError(f"RobustIT idr_hue = {p['idr_hue']} is not in [0, 0.5]", "write e.g. idr_hue = 0.1")
    if not (p["idr"] or p["aar"]):
        raise VbbError("RobustIT with idr = false and aar = false is a plain fine-tune",
                       "enable at least one regulariser (or use the `none` defense)")
    return p
