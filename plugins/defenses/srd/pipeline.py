"""One SRD defense run: stage 1 (state set, surrogate), stage 2 (policy), stage 3 (cleaning),
stage 4 (re-fine-tuning), with the interpretability figures (methods/srd.md §0)."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from vlmbackdoor_bench.hookspecs import DefenseContext, DefenseOutcome
from vlmbackdoor_bench.plugin_api import Recipe, run_payload
from vlmbackdoor_bench.types import DefenseReport

from . import artifacts, dqn
from .cache import cached_stage, srd_store, victim_identity
from .cleaning import UniformPolicy, clean_training_set
from .diagnostics import check_surrogate, heldout_states, mask_diagnostics, srd_rl_summary, surrogate_backdoor
from .env import MaskingVectorEnv, MaskRewarder
from .geometry import mask_box, n_actions
from .models import fine_tune, obtain_surrogate, reference_captioner
from .reward import FidelityScores
from .settings import PAPER_PRESET, resolve
from .state_set import StateSet, code_state_set, defender_data, paper_state_set

@contextlib.contextmanager
def torch_threads(n: int):
    """Run a block with ``n`` torch threads (0: unchanged), restoring the previous count."""
    previous = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def algorithms() -> dict:
    """algorithm -> its cleanrl-style module (config class, train, make_model, Policy)."""
    from . import ppo, sac
    return {"dqn": dqn, "ppo": ppo, "sac": sac}


def build_states(data, p: dict, seed: int):
    """(state set, surrogate training set) of the preset (methods/srd.md §1)."""
    n_instances = len(data.examples)
    if p["state_set"] == "paper":
        size = min(p["state_set_size"] or n_instances, int(p["max_state_fraction"] * n_instances))
        return paper_state_set(data, max(1, size), seed, p["surrogate_caption_rule"])
    # srd-code without the grid's TrojVLM cell model: the defender-owned surrogate of the paper
    # preset (its 3,000 / 12 % custom set), never one poisoned on every image
    size = min(PAPER_PRESET["state_set_size"], int(PAPER_PRESET["max_state_fraction"] * n_instances))
    _, surrogate_set = paper_state_set(data, max(1, size), seed, p["surrogate_caption_rule"])
    states = code_state_set(data, seed)
    if p["state_set_size"] and p["state_set_size"] < len(states):
        keep = sorted(np.random.default_rng([seed, 0x57A7]).choice(len(states), p["state_set_size"], replace=False))
        states = StateSet(states.source, [states.rows[i] for i in keep], [states.triggers[i] for i in keep],
                          [states.prompts[i] for i in keep], {**states.details, "n_states": len(keep)})
    return states, surrogate_set


def run(context: DefenseContext, params, *, algorithm: str, defaults: dict, name: str) -> DefenseOutcome:
    started = time.perf_counter()
    profile = getattr(context.backdoored, "profile", "")
    p, scaled = resolve(params, defaults, profile)
    sizes = tuple(p["mask_sizes"])
    recipe = context.recipe
    rl = algorithm != "random"
    fidelity = FidelityScores(context.scorers, clip=p["clip_scores"]) if rl else None
    reference_victim = None
    store = srd_store(context.stage)
    timings: dict = {}
    details: dict = {"algorithm": algorithm, "params": p, "budget_scaling": scaled,
                     "action_space": n_actions(sizes)}
    if scaled:
        details["budget_scaling_reason"] = ("tiny profile (2 CPU cores): RL budget scaled by the "
                                            "preset's tiny_* defaults, see settings.PAPER_PRESET")
    policy, train_log = UniformPolicy(sizes), None
    if rl:
        stage = time.perf_counter()
        data = defender_data(context)
        states, surrogate_set = build_states(data, p, context.seed)
        base_id = victim_identity(context.base_victim)
        details.update(defender_data=data.source, state_set=states.details)
        surrogate, surrogate_info = obtain_surrogate(context, p, surrogate_set, data, base_id, recipe, store)
        details["surrogate"] = surrogate_info
        heldout = heldout_states(data, states, p["heldout_states"], context.seed)
        backdoor = surrogate_backdoor(surrogate, heldout)
        print(f"srd surrogate: ASR {backdoor['surrogate_asr']:.1%} on {len(heldout)} held-out triggered state "
              f"images, {backdoor['surrogate_asr_clean']:.1%} clean", file=sys.stderr, flush=True)
        check_surrogate(backdoor, p)  # before RL (issue 31)
        timings["surrogate"] = time.perf_counter() - stage
        stage = time.perf_counter()
        reference_victim, reference_used, reference_info = reference_captioner(context, p, recipe, base_id, store)
        details.update(reference_captioner=reference_used, reference=reference_info)
        timings["reference"] = time.perf_counter() - stage
        stage = time.perf_counter()
        with torch_threads(p["rl_threads"]):
            policy, train_log, policy_info = obtain_policy(context, p, algorithm, states, surrogate, surrogate_info,
                                                           reference_victim, fidelity, data, base_id, store)
            masks = mask_diagnostics(policy, heldout, sizes)
        details["policy"] = policy_info
        details["srd_rl"] = srd_rl_summary(algorithm, train_log, backdoor, masks, reference_used)
        print("srd_rl: " + json.dumps({k: v for k, v in details["srd_rl"].items() if not isinstance(v, list)},
                                      default=str), file=sys.stderr, flush=True)
        timings["policy"] = time.perf_counter() - stage
    stage = time.perf_counter()
    # A single trial is kept whatever its reward (methods/srd.md §6 steps 3-4): scoring it would change nothing.
    select = rl and p["cleaning_trials"] > 1
    rewarder = MaskRewarder(context.backdoored, reference_victim, fidelity, p["reward_table"], sizes) if select else None
    with torch_threads(p.get("rl_threads", 0)):
        cleaned = clean_training_set(context.training_set, policy, rewarder, sizes=sizes, seed=context.seed,
                                     trials=p["cleaning_trials"] if select else 1, prompt=p.get("prompt", "default"),
                                     select=select)
    timings["cleaning"] = time.perf_counter() - stage
    details["cleaning"] = {**cleaned.details, **({"generations": rewarder.generations,
                                                  "generation_seconds": rewarder.seconds,
                                                  "reward_evaluations": rewarder.reward_evaluations}
                                                 if rewarder else {})}
    stage = time.perf_counter()
    refinetune_recipe = recipe
    if p["refinetune"] == "code":
        # methods/srd.md §7 srd-code: 20 epochs, lr 1e-4, batch 300, 1 % warmup; the victim's LM dropout kept
        refinetune_recipe = Recipe(lm_dropout=getattr(recipe, "lm_dropout", True))
    victim = context.backdoored
    ft_log = fine_tune(victim, cleaned.training_set, seed=context.seed, recipe=refinetune_recipe,
                       progress=f"{name} re-fine-tune")
    timings["refinetune"] = time.perf_counter() - stage
    details["refinetune"] = {"recipe": refinetune_recipe.to_dict() if refinetune_recipe is not None else "victim default",
                             "loss_per_epoch": ft_log.get("loss_per_epoch"), "steps": ft_log.get("steps")}
    stage = time.perf_counter()
    files = write_artifacts(Path(context.workdir), name, context.training_set, cleaned, sizes, train_log)
    timings["artifacts"] = time.perf_counter() - stage
    timings["total"] = time.perf_counter() - started
    details["timings"] = timings
    report = DefenseReport(masked_sample_ids=[e.sample_id for e in context.training_set.examples],
                           mask_boxes={sid: list(mask_box(a, sizes)) for sid, a in cleaned.actions.items()},
                           details=details, artifacts=files)
    return DefenseOutcome(victim, report)


def obtain_policy(context, p, algorithm, states, surrogate, surrogate_info, reference_victim, fidelity,
                  data, base_id, store):
    """Stage 2: train the policy on the masking environment (once, cached) and load it."""
    module = algorithms()[algorithm]
    config = module.config_from(p, context.seed)
    n_act = n_actions(p["mask_sizes"])
    payload = {"algorithm": algorithm, "config": asdict(config),
               "surrogate": surrogate_info.get("key", surrogate_info["source"]),
               "params": {k: p[k] for k in ("mask_sizes", "reward_table", "clip_scores", "state_set",
                                            "state_set_size", "max_state_fraction", "reference", "prompt",
                                            "episode_length", "n_envs")},
               "defender_data": data.fingerprint, "seed": context.seed, "base": base_id,
               "reference_captioner": victim_identity(reference_victim),
               **run_payload(context.stage.device, context.stage.precision)}  # {} on CPU fp32

    def build(tmp: Path) -> dict:
        rewarder = MaskRewarder(surrogate, reference_victim, fidelity, p["reward_table"], p["mask_sizes"])
        envs = MaskingVectorEnv(states, rewarder, num_envs=p["n_envs"], episode_length=p["episode_length"],
                                seed=context.seed)
        started = time.perf_counter()

        def progress(step: int, total: int) -> None:  # a line every ~10 % of training, to stderr
            if step * 10 // total > (step - p["n_envs"]) * 10 // total:
                print(f"srd {algorithm}: {step}/{total} steps, {time.perf_counter() - started:.0f} s, "
                      f"{rewarder.generations} generations", file=sys.stderr, flush=True)

        model, log = module.train(envs, config, progress, device=context.stage.device)
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                  str(tmp / "policy.safetensors"))
        log.update(generations=rewarder.generations, generation_seconds=rewarder.seconds,
                   reward_queries=rewarder.reward_queries, reward_evaluations=rewarder.reward_evaluations,
                   states_visited=len(envs.visited), episodes_finished=envs.episodes_finished,
                   observations=envs.steps, unmasked_observations=envs.unmasked_observations)
        (tmp / "train_log.json").write_text(json.dumps(log, default=float))
        return {"algorithm": algorithm, "timesteps": log["timesteps"], "seconds": log["seconds"],
                "steps_per_second": log["steps_per_second"], "generations": rewarder.generations}

    entry, info = cached_stage(store, f"policy-{algorithm}", payload, build)
    model = module.make_model(config.obs_size, n_act)
    model.load_state_dict(load_file(str(entry.path / "policy.safetensors")))
    model.to(context.stage.device)  # the cleaning policy runs where it trained
    log = json.loads((entry.path / "train_log.json").read_text())
    policy = module.make_policy(model, config, p)
    summary = {k: v for k, v in log.items() if k not in ("step_rewards", "episode_returns", "losses", "actions")}
    return policy, log, {**info, "train": summary}


def example_picks(examples, rewards: dict, n: int) -> list[int]:
    """Up to ``n`` instances of distinct images for the before/after figure (an image's captions
    are separate instances): the best-rewarded when cleaning scored its trials, else spread evenly
    over the set (a single trial has no reward)."""
    first_of_image: dict[int, int] = {}
    for k, example in enumerate(examples):
        first_of_image.setdefault(example.image_index, k)
    candidates = list(first_of_image.values())
    if any(rewards.get(examples[k].sample_id) is not None for k in candidates):
        return sorted(candidates, key=lambda k: -(rewards.get(examples[k].sample_id) or 0.0))[:n]
    return candidates[::max(1, len(candidates) // n)][:n]


def write_artifacts(workdir: Path, name: str, original, cleaned, sizes, train_log) -> dict[str, str]:
    """PNG figures under ``workdir``; returns name -> path relative to it."""
    workdir.mkdir(parents=True, exist_ok=True)
    files = {}
    actions = list(cleaned.actions.values())
    artifacts.mask_heatmap(workdir / "mask_heatmap.png", actions, sizes,
                           f"{name}: mask coverage over {len(actions)} cleaned instances")
    files["mask_heatmap"] = "mask_heatmap.png"
    examples = original.examples
    picks = example_picks(examples, cleaned.rewards, artifacts.N_EXAMPLES)
    before = original.images.take([examples[k].image_index for k in picks])
    after = cleaned.training_set.images.take([cleaned.training_set.examples[k].image_index for k in picks])
    labels = [f"{examples[k].sample_id}: a={cleaned.actions[examples[k].sample_id]}"
              + ("" if cleaned.rewards.get(examples[k].sample_id) is None
                 else f", r={cleaned.rewards[examples[k].sample_id]:.2f}") for k in picks]
    artifacts.before_after(workdir / "before_after.png", before, after, labels)
    files["before_after"] = "before_after.png"
    if train_log is not None:
        artifacts.reward_curve(workdir / "reward_curve.png", train_log, f"{name}: training reward")
        files["reward_curve"] = "reward_curve.png"
    (workdir / "cleaning_actions.json").write_text(json.dumps(cleaned.actions))
    files["cleaning_actions"] = "cleaning_actions.json"
    return files
