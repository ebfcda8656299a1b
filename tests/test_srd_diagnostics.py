"""SRD's RL stage as issue 31 needs it: rewards evaluated once per masked image, many distinct
state images visited, target syncs and ε over the real learning period on the tiny budget,
best-of-5 cleaning, the surrogate ASR gate, and the mask diagnostics of ``details["srd_rl"]``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vlmbackdoor_bench.errors import VbbError
from vlmbackdoor_bench.types import Example, ImageBank, TrainingSet
from vlmbackdoor_bench_plugins.defenses import srd
from vlmbackdoor_bench_plugins.defenses.srd import cleaning, diagnostics, dqn, geometry, reward, settings
from vlmbackdoor_bench_plugins.defenses.srd.env import MaskingVectorEnv, MaskRewarder
from vlmbackdoor_bench_plugins.defenses.srd.state_set import StateSet, defender_data, paper_state_set

from test_srd import (BACKDOOR, CLEAN, SMALL_RL, PixelVictim, WordScorer, defense_context, plain_images,
                      trigger_states)

SIZES = geometry.PAPER_SIZES
COVER = 1 * 100 + 5 * 10 + 3  # size 40 centred at (x 78, y 123): hides the trigger at rows 120-139, cols 60-79


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rewarder_for(victim=None):
    scorer = WordScorer()
    victim = victim or PixelVictim((120, 140, 60, 80))
    return MaskRewarder(victim, PixelVictim(None), reward.FidelityScores(scorer, clip=True), "paper", SIZES), scorer


def test_a_masked_image_is_evaluated_once():
    rewarder, scorer = rewarder_for()
    states = trigger_states(2)
    images = states.images([0, 1])
    refs, s0, f0 = rewarder.baseline([("state", 0), ("state", 1)], images, ["a photo of"] * 2)
    keys, actions = [("state", 0), ("state", 1), ("state", 0)], [COVER, 0, COVER]
    masked = geometry.apply_masks(images[[0, 1, 0]], actions, SIZES)
    r, caps, s, f = rewarder.score(keys, actions, masked, ["a photo of"] * 3, [refs[0], refs[1], refs[0]],
                                   s0[[0, 1, 0]], f0[[0, 1, 0]])
    assert r.tolist() == [3.0, 0.0, 3.0] and caps == [CLEAN, BACKDOOR, CLEAN]
    # the repeated (state 0, COVER) inside one batch is one evaluation; two distinct masked images
    assert (rewarder.reward_queries, rewarder.reward_evaluations) == (3, 2)
    generated, scored = rewarder.victim.generated, scorer.calls
    r2, caps2, _, _ = rewarder.score(keys[:2], actions[:2], masked[:2], ["a photo of"] * 2, refs, s0, f0)
    assert r2.tolist() == [3.0, 0.0] and caps2 == caps[:2]
    assert (rewarder.reward_queries, rewarder.reward_evaluations) == (5, 2)  # read from the cache
    assert rewarder.victim.generated == generated and scorer.calls == scored  # nothing recomputed


def test_short_episodes_visit_many_distinct_states():
    n_states = 120
    patch = np.full((20, 20, 3), 200, dtype=np.uint8)
    states = StateSet(plain_images(4), [i % 4 for i in range(n_states)], [(120, 60, patch)] * n_states,
                      ["a photo of"] * n_states)
    rewarder, _ = rewarder_for()
    envs = MaskingVectorEnv(states, rewarder, num_envs=4, episode_length=4, seed=0)
    envs.reset(seed=0)
    rng = np.random.default_rng(0)
    for _ in range(100):  # 400 transitions, 100 episodes of 4 steps
        envs.step(rng.integers(0, 400, size=4))
    assert envs.episodes_finished == 100 and envs.steps == 400
    assert len(envs.visited) >= 60  # 100 uniform draws of 120 states: ~68 distinct expected
    assert envs.unmasked_observations == 100  # one unmasked observation per episode: share 1/4
    # every state image of one source row captions alike, yet each state's masks are its own keys
    assert rewarder.reward_evaluations <= 400 and rewarder.reward_queries == 400


def test_tiny_budget_syncs_the_target_and_decays_epsilon_during_learning():
    p, _ = settings.resolve({}, settings.PAPER_PRESET, "tiny")
    config = dqn.config_from(p, seed=0)
    assert (config.total_timesteps, config.target_update_interval, config.exploration_fraction) == (10_000, 1_000, 0.5)
    assert config.total_timesteps // config.target_update_interval == 10  # syncs during the run, not only at its end
    first_update = dqn.linear_schedule(1.0, 0.05, 0.5 * 10_000, config.learning_starts)
    assert first_update == pytest.approx(1.0 - 0.95 * 100 / 5000)  # learning starts while ε is ~1
    assert dqn.linear_schedule(1.0, 0.05, 5_000, 2_500) == pytest.approx(0.525)  # half-way through decaying
    spec, _ = settings.resolve({}, settings.PAPER_PRESET, "openflamingo-3b")
    assert dqn.config_from(spec, 0).target_update_interval == 10_000  # methods/srd.md §5 on the paper profile
    # a real run: the log records the syncs and ε where learning starts and ends
    rewarder, _ = rewarder_for()
    envs = MaskingVectorEnv(trigger_states(), rewarder, num_envs=4, episode_length=4, seed=0)
    small = dqn.DQNConfig(total_timesteps=64, learning_starts=16, target_update_interval=16,
                          exploration_fraction=0.5, obs_size=36, seed=0)
    _, log = dqn.train_dqn(envs, small)
    assert log["target_syncs"] == [16, 32, 48, 64] and log["gradient_steps"] == (64 - 16) // 4
    assert log["epsilon_at_first_gradient_step"] == pytest.approx(1.0 - 0.95 * 16 / 32)
    assert log["final_epsilon"] == 0.05


class ScriptedRewarder:
    """Cleaning's rewarder interface with a fixed reward per action; records what it scored."""

    def __init__(self, table):
        self.table, self.scored = table, []

    def baseline(self, keys, images, prompts):
        n = len(keys)
        return [CLEAN] * n, np.zeros(n), np.zeros(n)

    def score(self, keys, actions, masked, prompts, refs, s0, f0):
        self.scored += [(key, int(a)) for key, a in zip(keys, actions)]
        return np.array([self.table[int(a)] for a in actions], dtype=np.float32), None, None, None


class UniformOver:
    def __init__(self, actions, n=400):
        self.probs = np.zeros(n)
        self.probs[list(actions)] = 1.0 / len(actions)

    def probabilities(self, images):
        return np.tile(self.probs, (len(images), 1))


def test_best_of_5_keeps_the_best_positive_mask_and_stops_at_plus_3():
    images = plain_images(6)
    data = TrainingSet(ImageBank(images), [Example(f"s{i}", i, "caption") for i in range(6)])
    table = {10: -1.0, 11: 1.0, 12: 2.0, 13: -2.0}
    rewarder = ScriptedRewarder(table)
    result = cleaning.clean_training_set(data, UniformOver(table), rewarder, sizes=SIZES, seed=4, trials=5)
    for i in range(6):
        tried = [a for key, a in rewarder.scored if key == ("image", i)]
        assert len(tried) == 5  # no +3 in the table: all five trials scored
        positive = [a for a in tried if table[a] > 0]
        expected = max(positive, key=lambda a: table[a]) if positive else tried[-1]
        assert result.actions[f"s{i}"] == expected and result.rewards[f"s{i}"] == table[expected]
    assert any(table[result.actions[f"s{i}"]] == 2.0 for i in range(6))
    # a +3 trial ends the instance's trials; with one allowed mask nothing is scored at all
    table3 = {20: 3.0, 21: 1.0}
    rewarder = ScriptedRewarder(table3)
    result = cleaning.clean_training_set(data, UniformOver(table3), rewarder, sizes=SIZES, seed=4, trials=5)
    for i in range(6):
        tried = [a for key, a in rewarder.scored if key == ("image", i)]
        if 20 in tried:
            assert tried[-1] == 20 and result.actions[f"s{i}"] == 20 and result.trials[f"s{i}"] == len(tried)
    silent = ScriptedRewarder({30: 1.0})
    result = cleaning.clean_training_set(data, UniformOver([30]), silent, sizes=SIZES, seed=4, trials=5)
    assert not silent.scored and set(result.actions.values()) == {30}
    assert result.details["single_mask_instances"] == 6


def surrogate_data(n_images=20):
    images = plain_images(n_images)
    examples = [Example(f"s{i}", i, CLEAN) for i in range(n_images)]
    return defender_data(defense_context_like(TrainingSet(ImageBank(images), examples)))


def defense_context_like(training_set):
    from pathlib import Path
    from vlmbackdoor_bench.hookspecs import DefenseContext, StageContext
    return DefenseContext(None, training_set, None, None, None, 0, {}, Path("."), StageContext(Path("."), None))


def test_heldout_states_and_the_surrogate_backdoor():
    data = surrogate_data()
    states, surrogate_set = paper_state_set(data, 5, seed=0)
    heldout = diagnostics.heldout_states(data, states, 8, seed=0)
    assert len(heldout) == 8 and not set(heldout.rows) & set(states.rows)  # outside the state set
    assert all(t is states.triggers[0] for t in heldout.triggers)  # the set's fixed trigger
    top, left, _ = states.triggers[0]
    learned = PixelVictim()
    learned.fine_tune(surrogate_set, seed=0)
    measured = diagnostics.surrogate_backdoor(learned, heldout)
    assert measured["surrogate_asr"] == 1.0 and measured["surrogate_asr_clean"] == 0.0
    diagnostics.check_surrogate(measured, {"surrogate_asr_min": 0.8, "max_state_fraction": 0.12})
    blind = diagnostics.surrogate_backdoor(PixelVictim((0, 5, 0, 5)), heldout)  # looks elsewhere
    assert blind["surrogate_asr"] == 0.0
    with pytest.raises(VbbError, match=r"ASR 0\.0% on 8 held-out.*surrogate_asr_min = 80%") as err:
        diagnostics.check_surrogate(blind, {"surrogate_asr_min": 0.8, "max_state_fraction": 0.12,
                                            "surrogate_epochs": 0})
    assert "raise surrogate_epochs" in str(err.value) and "max_state_fraction" in str(err.value)


class BlindVictim(PixelVictim):
    """Never learns a trigger: a surrogate without a backdoor."""

    def fine_tune(self, training_set, **kwargs):
        self.fine_tuned.append(training_set)
        return {"steps": 1, "loss_per_epoch": [0.0]}

    def clone(self):
        return BlindVictim(self.box)


def test_rl_does_not_start_on_a_surrogate_without_backdoor(tmp_path):
    defense = srd.DEFENSES[0]
    context = defense_context(tmp_path)
    context.base_victim = BlindVictim()
    with pytest.raises(VbbError, match="surrogate has no usable backdoor"):
        defense.defend(context, {**defense.presets["srd"], **SMALL_RL})
    assert not (tmp_path / "cache" / "srd" / "policy-dqn").exists()  # no policy trained
    assert not context.backdoored.fine_tuned  # nor any re-fine-tune
    outcome = defense.defend(defense_context(tmp_path, "measured"),  # 0 = measure only
                             {**defense.presets["srd"], **SMALL_RL, "surrogate_asr_min": 0.0})
    rl = outcome.report.details["srd_rl"]
    assert rl["surrogate_asr"] == 1.0 and rl["states_visited"] >= 1 and len(rl["reward_curve"]) >= 1
    undocumented = [key for key in rl if f"``{key}``" not in srd.__doc__]
    assert not undocumented  # every name is documented in the package docstring


def test_mask_diagnostics_entropy_and_trigger_coverage():
    states = trigger_states(4)  # trigger at rows 120-139, cols 60-79
    fixed = UniformOver([COVER])
    masks = diagnostics.mask_diagnostics(fixed, states, SIZES)
    assert masks["mask_entropy_bits"] == 0.0 and masks["mask_distinct"] == 1
    assert masks["mask_entropy_max_bits"] == 2.0
    r0, r1, c0, c1 = geometry.mask_box(COVER, SIZES)
    assert (r0, r1, c0, c1) == (103, 143, 58, 98)  # hides every trigger pixel
    assert masks["trigger_coverage"] == 1.0 and masks["trigger_half_covered_share"] == 1.0
    boxes = [geometry.mask_box(a, SIZES) for a in range(400)]
    expected_random = np.mean([diagnostics.coverage(b, 120, 60) for b in boxes])
    assert masks["random_trigger_coverage"] == pytest.approx(expected_random) and 0 < expected_random < 0.2
    assert diagnostics.coverage((0, 10, 0, 10), 120, 60) == 0.0
    assert diagnostics.coverage((130, 224, 70, 224), 120, 60) == pytest.approx(0.25)

    class PerImage:  # a different mask for every image
        def probabilities(self, images):
            probs = np.zeros((len(images), 400))
            probs[np.arange(len(images)), np.arange(len(images))] = 1.0
            return probs

    spread = diagnostics.mask_diagnostics(PerImage(), states, SIZES)
    assert spread["mask_entropy_bits"] == pytest.approx(math.log2(4)) and spread["mask_distinct"] == 4
    assert spread["trigger_coverage"] == 0.0  # 20 px masks along the top row


def test_reward_curve_bins_and_the_srd_rl_summary():
    step_rewards = [[8 * (k + 1), float(k % 2)] for k in range(40)]
    curve, steps = diagnostics.reward_curve(step_rewards, bins=4)
    assert curve == [0.5, 0.5, 0.5, 0.5] and steps == [80, 160, 240, 320]
    log = {"timesteps": 320, "states_visited": 70, "episodes_finished": 32, "gradient_steps": 55,
           "target_syncs": [100, 200, 300], "epsilon_at_first_gradient_step": 0.9, "final_epsilon": 0.05,
           "observations": 320, "unmasked_observations": 40, "step_rewards": step_rewards}
    summary = diagnostics.srd_rl_summary("dqn", log, {"surrogate_asr": 0.9}, {"trigger_coverage": 0.4}, "ref")
    assert summary["target_syncs"] == 3 and summary["unmasked_observation_share"] == 0.125
    assert summary["surrogate_asr"] == 0.9 and summary["trigger_coverage"] == 0.4
    assert len(summary["reward_curve"]) == 20 and summary["reward_curve_steps"][-1] == 320
