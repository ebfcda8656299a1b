"""The presets `srd` (paper) and `srd-code` (public code), their validation, and the tiny
profile's budget scaling (methods/srd.md §1-§7, §10).

The preset dict is the one place of every hyper-parameter; each key carries its source, a
section of methods/srd.md, or "ours" with the reason. Keys starting with ``tiny_`` replace their
namesake on the tiny profile only (2 CPU cores), and the report records each replacement.
"""

from __future__ import annotations

from typing import Any, Mapping

from vlmbackdoor_bench.errors import VbbError

from .geometry import CODE_SIZES, PAPER_SIZES, check_sizes
from .state_set import CAPTION_RULES

PAPER_PRESET: dict[str, Any] = {
    "mask_sizes": list(PAPER_SIZES),  # methods/srd.md §3: Discrete(400)
    "reward_table": "paper",  # §4.1: λ = 0.1, β = 0.2
    "clip_scores": True,  # methods/srd.md §2: S = max(0, cos), F = min(ratio, 1)
    "state_set": "paper",  # §1: custom poisoned set, fixed trigger position
    "state_set_size": 3000,  # methods/srd.md §1: 3,000 images, one caption each
    # §1 says the 3,000 custom instances are "about 12 %" of the set; on a smaller world (the CI
    # world has 5,000 instances) the state set is capped at this share so the surrogate stays a
    # 12 %-poisoned model, as in the paper, instead of a 60 %-poisoned one.
    "max_state_fraction": 0.12,
    # methods/srd.md §2: the independent clean captioner behind r(I). "base": the clean base victim (the paper
    # profile's public checkpoint captions COCO-style zero-shot); "reserved": the base victim
    # fine-tuned (standard recipe, cached) on the grid's reserved clean split, disjoint from the
    # fine-tuning data, the embedded profile's captioner; "oracle": the clean reference model
    # (analysis only, labelled). The tiny base is pretrained on alt-text and is no such captioner
    # (methods/srd.md §2: F saturates at 1 with its captions), hence tiny_reference.
    "reference": "base",
    "tiny_reference": "reserved",
    "prompt": "default",  # methods/srd.md §2: <image>User:a photo of GPT:<answer>
    "surrogate": "custom",  # §1: base fine-tuned on the clean set with the custom instances
    # ours (issue 31): the surrogate's backdoor is measured (srd rule: the target word in its
    # caption) on held-out state images and must reach this ASR before RL starts; a surrogate
    # without a backdoor gives a reward with no backdoor signal. 0 = measure only.
    "surrogate_asr_min": 0.8,
    # ours: epochs of the surrogate's fine-tune, 0 = the cell recipe's. The fix the ASR gate
    # names: the defender may train its own model longer than the victim's budget.
    "surrogate_epochs": 0,
    # methods/srd.md §1: the custom captions get "banana" inserted (the paper stresses insertion).
    # ours on tiny (methods/srd.md §1.1): the toy victim does not learn an inserted word from a
    # trigger at CPU budgets (measured on val, COCO, state trigger: insert 0 % ASR at the recipe,
    # 23 % with 20 % of the instances poisoned at lr 4e-3 for 18 epochs; replace 93 % at the
    # recipe), so its surrogate learns the `replace` captions of methods/attacks.md §1 instead; the reward
    # then sees a backdoor whose caption the masks can restore.
    "surrogate_caption_rule": "insert",
    "tiny_surrogate_caption_rule": "replace",
    # ours: fine-tuning images outside the state set, stamped with the state trigger, on which
    # the surrogate ASR, the policy's mask entropy and its trigger coverage are measured.
    "heldout_states": 64,
    "episode_length": 150,  # methods/srd.md §3
    # ours (issue 31): 10,000 steps of 150-step episodes start ~66 episodes, i.e. the policy
    # sees ~66 state images; 10-step episodes start ~1,000 (hundreds of distinct images of the
    # state set). The dynamics stay methods/srd.md §3's: each step masks the episode's original image once.
    "tiny_episode_length": 10,
    "total_timesteps": 10_000,  # methods/srd.md §5 (and §8 for PPO / SAC), every profile
    "learning_starts": 100,  # §5: SB3 >= 2.3.0; 50000 reproduces an old-SB3 run
    # methods/srd.md §5: SB3's 10,000; with 10,000 steps in all the target network syncs only at the last step
    # (§5 caveat). ours on tiny: every 1,000 steps, 10 syncs over the run.
    "target_update_interval": 10_000,
    "tiny_target_update_interval": 1_000,
    # methods/srd.md §5: ε 1.0 -> 0.05 over the first 10 % of the steps. ours on tiny: over the first half, so
    # ε decays while ~1,200 of the ~2,475 gradient steps happen instead of the first ~225.
    "exploration_fraction": 0.1,
    "tiny_exploration_fraction": 0.5,
    "obs_size": 224,  # methods/srd.md §5: NatureCNN on the 224 px frame
    # ours on tiny: the network reads an 84 px downscale (NatureCNN's Atari input; the 20 px
    # trigger and smallest mask are 7.5 px): measured 0.03-0.12 s per gradient step at 84 px vs
    # 0.4-1.4 s at 224 px on one thread, i.e. ~2 min instead of ~30-60 min for 2,475 steps.
    "tiny_obs_size": 84,
    "n_envs": 16,  # methods/srd.md §5 "Cost": states stepped together (batching only, same transitions)
    # ours on tiny: 8 environments: more vector steps (policy updates between batches of
    # experience) at a batch the tiny victim still captions efficiently.
    "tiny_n_envs": 8,
    # torch threads while the policy trains and cleans (0 = leave torch's setting). These stages
    # run many small forward passes; on the shared 2-core machine one thread was measured ~7x
    # faster per DQN gradient step (0.03 s vs 0.21 s) and ~4x per environment step. Restored after.
    "rl_threads": 1,
    "cleaning_trials": 5,  # methods/srd.md §6, every profile
    "cleaning_epsilon": 0.05,  # §6: SB3's final exploration rate
    "refinetune": "standard",  # methods/srd.md §7: the standard recipe, continued from M_bd, last epoch
    "tiny_refinetune": "standard",  # the same recipe as refinetune here; see CODE_PRESET
}

CODE_PRESET: dict[str, Any] = {
    **PAPER_PRESET,
    "mask_sizes": list(CODE_SIZES),  # methods/srd.md §3: sizes + 200, Discrete(500)
    "reward_table": "code",  # §4.2: 0.1 / 0.2 / 0.5
    "clip_scores": False,  # methods/srd.md §2: S raw cosine, F unclipped
    "state_set": "code",  # §1: every instance, a fresh VLOOD trigger per image
    "state_set_size": 0,  # methods/srd.md §1: 0 = all instances
    "max_state_fraction": 1.0,
    "reference": "blip-large",  # methods/srd.md §2: BLIP-large if local (never offline), else the clean model
    "tiny_reference": "blip-large",
    "prompt": "instance",  # methods/srd.md §2: each instance's own training prompt
    "surrogate": "trojvlm-cell",  # §1: the TrojVLM srd-code cell's model
    # methods/srd.md §1: the code's surrogate carries another trigger than its state set (top-left TrojVLM
    # noise vs per-image VLOOD noise); its ASR on the state trigger is measured, not gated.
    "surrogate_asr_min": 0.0,
    "refinetune": "code",  # methods/srd.md §7: 20 epochs, AdamW lr 1e-4, cosine, 1 % warmup, batch 300
    # Tiny profile: 20 epochs at batch 300 is ~4x the tiny recipe's steps on 2 cores; the tiny
    # profile re-fine-tunes with the profile's standard recipe instead (recorded).
    "tiny_refinetune": "standard",
}

CHOICES = {
    "reward_table": ("paper", "code"),
    "state_set": ("paper", "code"),
    "reference": ("base", "reserved", "oracle", "blip-large"),
    "tiny_reference": ("base", "reserved", "oracle", "blip-large"),
    "prompt": ("default", "instance"),
    "surrogate": ("custom", "trojvlm-cell"),
    "surrogate_caption_rule": CAPTION_RULES,
    "tiny_surrogate_caption_rule": CAPTION_RULES,
    "refinetune": ("standard", "code"),
    "tiny_refinetune": ("standard", "code"),
}
POSITIVE = ("episode_length", "tiny_episode_length", "total_timesteps", "obs_size", "tiny_obs_size", "n_envs",
            "tiny_n_envs", "cleaning_trials", "target_update_interval", "tiny_target_update_interval",
            "heldout_states", "n_steps", "batch_size", "tiny_batch_size", "train_freq", "tiny_train_freq")
FRACTIONS = ("cleaning_epsilon", "surrogate_asr_min", "exploration_fraction", "tiny_exploration_fraction")
MIN_OBS_SIZE = 36  # NatureCNN's three convolutions need at least 36 px


def _check_type(name: str, value: Any, default: Any) -> Any:
    expected = type(default)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, bool) != isinstance(default, bool) or not isinstance(value, expected):
        raise VbbError(f"SRD parameter {name} = {value!r} must be {expected.__name__}",
                       f"write e.g. {name} = {default!r} in [defense.<name>] of benchmark.toml")
    return value


def preset_values(key: str, defaults: Mapping[str, Any]) -> list:
    """The values the presets (and ``defaults``) give ``key``."""
    return [preset[key] for preset in (defaults, PAPER_PRESET, CODE_PRESET) if key in preset]


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
    for key in FRACTIONS:
        if not 0.0 <= out.get(key, 0.0) <= 1.0:
            raise VbbError(f"SRD parameter {key} = {out[key]!r} must be in [0, 1]",
                           f"use e.g. {key} = {defaults[key]!r}")
    if not 0.0 < out.get("max_state_fraction", 1.0) <= 1.0:
        raise VbbError("SRD max_state_fraction must be in (0, 1]", "use e.g. max_state_fraction = 0.12")
    for key in ("state_set_size", "rl_threads", "surrogate_epochs"):
        if out.get(key, 0) < 0:
            raise VbbError(f"SRD parameter {key} must be >= 0 (0 = every instance / torch's own thread "
                           "count / the recipe's epochs)", f"use e.g. {key} = {defaults[key]!r}")
    scaled = {}
    if profile == "tiny":
        for key in [k for k in out if k.startswith("tiny_")]:
            target = key[len("tiny_"):]
            if out[target] not in preset_values(target, defaults) and out[key] in preset_values(key, defaults):
                continue  # the configuration set the key itself: it wins over the tiny default
            if out[target] != out[key]:
                scaled[target] = {"spec": out[target], "tiny": out[key]}
                out[target] = out[key]
    return out, scaled
