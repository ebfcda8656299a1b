"""The presets `srd` (paper) and `srd-code` (public code), their validation, and the tiny
profile's budget scaling (spec/srd.md §1-§7, §10).

Every preset key is a constant of the spec; keys starting with ``tiny_`` replace their
namesake on the tiny profile only (2 CPU cores), and the report records each replacement.
"""

from __future__ import annotations

from typing import Any, Mapping

from vlmbackdoor_bench.errors import VbbError

from .geometry import CODE_SIZES, PAPER_SIZES, check_sizes

PAPER_PRESET: dict[str, Any] = {
    "mask_sizes": list(PAPER_SIZES),  # spec/srd.md §3: Discrete(400)
    "reward_table": "paper",  # §4.1: λ = 0.1, β = 0.2
    "clip_scores": True,  # §2: S = max(0, cos), F = min(ratio, 1)
    "state_set": "paper",  # §1: custom poisoned set, fixed trigger position
    "state_set_size": 3000,  # §1: 3,000 images, one caption each
    # §1 says the 3,000 custom instances are "about 12 %" of the set; on a smaller world (the CI
    # world has 5,000 instances) the state set is capped at this share so the surrogate stays a
    # 12 %-poisoned model, as in the paper, instead of a 60 %-poisoned one.
    "max_state_fraction": 0.12,
    "reference": "base",  # §2: the clean base victim; "oracle" = the clean reference model
    "prompt": "default",  # §2: <image>User:a photo of GPT:<answer>
    "surrogate": "custom",  # §1: base fine-tuned on the clean set with the custom instances
    "episode_length": 150,  # §3
    "total_timesteps": 10_000,  # §5 (and §8 for PPO / SAC)
    "learning_starts": 100,  # §5: SB3 >= 2.3.0; 50000 reproduces an old-SB3 run
    "obs_size": 224,  # §5: NatureCNN on the 224 px frame
    "n_envs": 16,  # §5 "Cost": states stepped together (batching only, same transitions)
    # torch threads while the policy trains and cleans (0 = leave torch's setting). These stages
    # run many small forward passes; on the shared 2-core machine one thread was measured ~7x
    # faster per DQN gradient step (0.03 s vs 0.21 s) and ~4x per environment step. Restored after.
    "rl_threads": 1,
    "cleaning_trials": 5,  # §6
    "cleaning_epsilon": 0.05,  # §6: SB3's final exploration rate
    "refinetune": "standard",  # §7: the standard recipe, continued from M_bd, last epoch
    # Tiny-profile budget (2 shared CPU cores): 10,000 steps at 224 px cost about 1 s per gradient
    # step plus one victim generation and one SmolLM2 perplexity per step, hours per policy;
    # 640 steps (40 vector steps of 16 states, ~135 gradient steps) at 84 px (NatureCNN's native
    # Atari input, where a 20 px mask is still 7 px) train in a few minutes.
    "tiny_total_timesteps": 640,
    "tiny_obs_size": 84,
    # §6's best-of-5 costs up to 6 generations per instance (~45k on the tiny world's 7,500
    # images, ~30 min on 2 cores). One trial keeps its mask whatever the reward (§6 steps 3-4),
    # so the tiny profile cleans with one ε-greedy policy action per instance and no generation.
    "tiny_cleaning_trials": 1,
    "tiny_refinetune": "standard",  # the same recipe as refinetune here; see CODE_PRESET
}

CODE_PRESET: dict[str, Any] = {
    **PAPER_PRESET,
    "mask_sizes": list(CODE_SIZES),  # §3: sizes + 200, Discrete(500)
    "reward_table": "code",  # §4.2: 0.1 / 0.2 / 0.5
    "clip_scores": False,  # §2: S raw cosine, F unclipped
    "state_set": "code",  # §1: every instance, a fresh VLOOD trigger per image
    "state_set_size": 0,  # §1: 0 = all instances
    "max_state_fraction": 1.0,
    "reference": "blip-large",  # §2: BLIP-large if local (never offline), else the clean model
    "prompt": "instance",  # §2: each instance's own training prompt
    "surrogate": "trojvlm-cell",  # §1: the TrojVLM srd-code cell's model
    "refinetune": "code",  # §7: 20 epochs, AdamW lr 1e-4, cosine, 1 % warmup, batch 300
    # Tiny profile: 20 epochs at batch 300 is ~4x the tiny recipe's steps on 2 cores; the tiny
    # profile re-fine-tunes with the profile's standard recipe instead (recorded).
    "tiny_refinetune": "standard",
}

CHOICES = {
    "reward_table": ("paper", "code"),
    "state_set": ("paper", "code"),
    "reference": ("base", "oracle", "blip-large"),
    "prompt": ("default", "instance"),
    "surrogate": ("custom", "trojvlm-cell"),
    "refinetune": ("standard", "code"),
    "tiny_refinetune": ("standard", "code"),
}
NON_NEGATIVE = ("rl_threads",)
POSITIVE = ("episode_length", "total_timesteps", "obs_size", "n_envs", "cleaning_trials",
            "tiny_total_timesteps", "tiny_obs_size", "tiny_cleaning_trials", "n_steps", "tiny_n_steps", "batch_size",
            "tiny_batch_size", "train_freq", "tiny_train_freq")
MIN_OBS_SIZE = 36  # NatureCNN's three convolutions need at least 36 px


def _check_type(name: str, value: Any, default: Any) -> Any:
    expected = type(default)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, bool) != isinstance(default, bool) or not isinstance(value, expected):
        raise VbbError(f"SRD parameter {name} = {value!r} must be {expected.__name__}",
                       f"write e.g. {name} = {default!r} in [defense.<name>] of benchmark.toml")
    return value


def resolve(params: Mapping[str, Any], defaults: Mapping[str, Any], profile: str) -> tuple[dict, dict]:
    """Validated parameters in effect on ``profile``, and the tiny replacements applied."""
    unknown = set(params) - set(defaults)
    if unknown:
        raise VbbError(f"unknown SRD parameter(s) {sorted(unknown)}", f"valid: {', '.join(sorted(defaults))}")
    merged = {**defaults, **params}
    out = {k: _check_type(k, merged[k], defaults[k]) for k in defaults}
    out["mask_sizes"] = list(check_sizes(out["mask_sizes"]))
    for key, allowed in CHOICES.items():
        if key in out and out[key] not in allowed:
            raise VbbError(f"SRD parameter {key} = {out[key]!r} is unknown", f"use one of {allowed}")
    for key in POSITIVE:
        if key in out and out[key] <= 0:
            raise VbbError(f"SRD parameter {key} = {out[key]!r} must be positive", "use a positive integer")
    for key in ("obs_size", "tiny_obs_size"):
        if out.get(key, MIN_OBS_SIZE) < MIN_OBS_SIZE:
            raise VbbError(f"SRD parameter {key} = {out[key]} is below {MIN_OBS_SIZE} px",
                           f"NatureCNN needs obs_size >= {MIN_OBS_SIZE}")
    if not 0.0 <= out.get("cleaning_epsilon", 0.0) <= 1.0 or not 0.0 < out.get("max_state_fraction", 1.0) <= 1.0:
        raise VbbError("SRD cleaning_epsilon must be in [0, 1] and max_state_fraction in (0, 1]",
                       "use e.g. cleaning_epsilon = 0.05, max_state_fraction = 0.12")
    if out.get("state_set_size", 0) < 0 or out.get("rl_threads", 0) < 0:
        raise VbbError("SRD state_set_size and rl_threads must be >= 0 (0 = every instance / "
                       "torch's own thread count)", "use e.g. state_set_size = 3000, rl_threads = 1")
    scaled = {}
    if profile == "tiny":
        for key in [k for k in out if k.startswith("tiny_")]:
            target = key[len("tiny_"):]
            if out[target] != out[key]:
                scaled[target] = {"spec": out[target], "tiny": out[key]}
                out[target] = out[key]
    return out, scaled
