"""What SRD's RL stage did, measured: the surrogate's backdoor (gated before RL starts) and the
policy's masks on held-out state images, summarised with the training log into the flat
``details["srd_rl"]`` dict documented in the package docstring."""

from __future__ import annotations

import math

import numpy as np

from vlmbackdoor_bench.errors import VbbError
from vlmbackdoor_bench.types import DEFAULT_INSTRUCTION, TARGET
from vlmbackdoor_bench_plugins.attacks.vlood import PATCH, trigger_draw

from .geometry import mask_box, n_actions
from .state_set import DefenderData, StateSet

HELDOUT_SALT = 0x4E1D  # separates the held-out draw from the state-set draw of the same seed
REWARD_CURVE_BINS = 20  # points of the reward curve (equal spans of training steps)


def heldout_states(data: DefenderData, states: StateSet, n: int, seed: int) -> StateSet:
    """Up to ``n`` fine-tuning images outside the state set, each with the trigger it would carry
    as a state (`srd`: the set's fixed patch; `srd-code`: its image's VLOOD draw). When the state
    set holds every image (`srd-code`), ``n`` of the state images themselves (recorded)."""
    rng = np.random.default_rng([seed, HELDOUT_SALT])
    used = set(states.rows)
    free = sorted({e.image_index for e in data.examples} - used)
    if free:
        rows = sorted(int(r) for r in rng.choice(free, min(n, len(free)), replace=False))
        if states.details.get("kind") == "paper":
            triggers = [states.triggers[0]] * len(rows)
        else:
            triggers = [trigger_draw(seed, data.image_ids[r]) for r in rows]
        source = "fine-tuning images outside the state set"
    else:
        picks = sorted(int(i) for i in rng.choice(len(states), min(n, len(states)), replace=False))
        rows, triggers = [states.rows[i] for i in picks], [states.triggers[i] for i in picks]
        source = "state images (every fine-tuning image is a state)"
    return StateSet(states.source, rows, triggers, [DEFAULT_INSTRUCTION] * len(rows),
                    {"source": source, "n": len(rows)})


def target_rate(victim, images: np.ndarray) -> float:
    """Share of captions containing the target word (the srd ASR rule of methods/metrics.md §4.1:
    case-sensitive substring; the state set's captions carry it by insertion)."""
    captions = victim.generate(images, DEFAULT_INSTRUCTION)
    return float(np.mean([TARGET in c for c in captions])) if len(captions) else 0.0


def surrogate_backdoor(surrogate, heldout: StateSet) -> dict:
    """The surrogate's ASR on held-out triggered state images, and on the same images clean."""
    triggered = heldout.images(range(len(heldout)))
    clean = np.asarray(heldout.source[heldout.rows], dtype=np.uint8)
    return {"surrogate_asr": target_rate(surrogate, triggered), "surrogate_asr_clean": target_rate(surrogate, clean),
            "heldout_images": len(heldout), "heldout_source": heldout.details["source"]}


def check_surrogate(measured: dict, p: dict) -> None:
    """Issue 31: RL starts only on a surrogate whose backdoor fires (ASR >= surrogate_asr_min)."""
    asr, floor = measured["surrogate_asr"], p["surrogate_asr_min"]
    if asr >= floor:
        return
    epochs = p.get("surrogate_epochs") or "0 (the cell recipe's)"
    raise VbbError(
        f"SRD's surrogate has no usable backdoor: ASR {asr:.1%} on {measured['heldout_images']} held-out "
        f"triggered state images ({measured['surrogate_asr_clean']:.1%} on the same images clean), below "
        f"surrogate_asr_min = {floor:.0%}; its rewards would carry no backdoor signal",
        f"raise surrogate_epochs (now {epochs}) or max_state_fraction (now {p['max_state_fraction']}), or "
        f"set surrogate_caption_rule = \"replace\" (now {p.get('surrogate_caption_rule', 'insert')!r}) in "
        "[defense.srd] of benchmark.toml, or set surrogate_asr_min = 0 to train on it anyway")


def coverage(box: tuple[int, int, int, int], top: int, left: int) -> float:
    """Share of the PATCH x PATCH trigger at (top, left) that the mask box (r0, r1, c0, c1) hides."""
    r0, r1, c0, c1 = box
    rows = max(0, min(r1, top + PATCH) - max(r0, top))
    cols = max(0, min(c1, left + PATCH) - max(c0, left))
    return rows * cols / (PATCH * PATCH)


def entropy_bits(actions: np.ndarray) -> float:
    counts = np.bincount(actions)
    share = counts[counts > 0] / len(actions)
    return float(-(share * np.log2(share)).sum()) + 0.0  # + 0.0: no -0.0


def mask_diagnostics(policy, heldout: StateSet, sizes) -> dict:
    """The policy's modal mask on every held-out image: the entropy of those masks across images
    (0 bits = one mask for all; log2(images) = a different mask per image), and the share of each
    image's trigger that it hides, against a uniformly random mask's expected share."""
    if not len(heldout):
        return {}
    images = heldout.images(range(len(heldout)))
    modes = policy.probabilities(images).argmax(axis=1)
    boxes = [mask_box(a, sizes) for a in range(n_actions(sizes))]
    covered = [coverage(boxes[a], top, left) for a, (top, left, _) in zip(modes, heldout.triggers)]
    random = [np.mean([coverage(b, top, left) for b in boxes]) for top, left, _ in heldout.triggers]
    return {"mask_entropy_bits": entropy_bits(modes),
            "mask_entropy_max_bits": math.log2(min(len(heldout), len(boxes))),
            "mask_distinct": int(len(set(modes.tolist()))),
            "trigger_coverage": float(np.mean(covered)),
            "trigger_half_covered_share": float(np.mean([c >= 0.5 for c in covered])),
            "random_trigger_coverage": float(np.mean(random))}


def reward_curve(step_rewards: list, bins: int = REWARD_CURVE_BINS) -> tuple[list[float], list[int]]:
    """Mean per-step reward over ``bins`` equal spans of the training log's vector steps, and each
    span's last environment step."""
    if not step_rewards:
        return [], []
    steps, values = np.array(step_rewards, dtype=float).T
    spans = np.array_split(np.arange(len(values)), min(bins, len(values)))
    return ([round(float(values[s].mean()), 4) for s in spans], [int(steps[s[-1]]) for s in spans])


def srd_rl_summary(algorithm: str, train_log: dict, backdoor: dict, masks: dict, reference: str) -> dict:
    """``details["srd_rl"]``: the flat diagnostics dict (names in the package docstring)."""
    curve, curve_steps = reward_curve(train_log.get("step_rewards", []))
    observations = train_log.get("observations") or 0
    syncs = train_log.get("target_syncs")
    return {
        "algorithm": algorithm,
        "timesteps": train_log.get("timesteps"),
        "states_visited": train_log.get("states_visited"),
        "episodes_finished": train_log.get("episodes_finished"),
        "gradient_steps": train_log.get("gradient_steps"),
        "target_syncs": len(syncs) if syncs is not None else None,
        "epsilon_at_first_gradient_step": train_log.get("epsilon_at_first_gradient_step"),
        "final_epsilon": train_log.get("final_epsilon"),
        "unmasked_observation_share": (train_log.get("unmasked_observations", 0) / observations
                                       if observations else None),
        "reward_queries": train_log.get("reward_queries"),
        "reward_evaluations": train_log.get("reward_evaluations"),
        "generations": train_log.get("generations"),
        "train_seconds": train_log.get("seconds"),
        **backdoor,
        "reference_captioner": reference,
        "reward_curve": curve,
        "reward_curve_steps": curve_steps,
        **masks,
    }
