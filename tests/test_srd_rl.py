"""SRD's own cleanrl-style RL (methods/srd.md §5, §8): replay and target-network mechanics, and
DQN / PPO / discrete SAC learning small gymnasium tasks, including the masking environment
with a fake backdoored captioner whose trigger the policy must learn to cover."""

from __future__ import annotations

import copy

import gymnasium as gym
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gymnasium.vector import AutoresetMode, SyncVectorEnv

from vlmbackdoor_bench_plugins.defenses.srd import dqn, geometry, ppo, reward, sac
from vlmbackdoor_bench_plugins.defenses.srd.env import MaskingVectorEnv, MaskRewarder

from test_srd import PixelVictim, WordScorer, trigger_states

SIDE = 36  # NatureCNN's smallest input


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These networks are tiny: one thread avoids contention on the shared 2 cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class BrightQuadrant(gym.Env):
    """One-step task: the observation has one bright quadrant; reward 1 for naming it."""

    observation_space = gym.spaces.Box(0, 255, (SIDE, SIDE, 3), dtype=np.uint8)
    action_space = gym.spaces.Discrete(4)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.target = int(self.np_random.integers(4))
        return self._obs(), {}

    def _obs(self):
        obs = np.full((SIDE, SIDE, 3), 30, dtype=np.uint8)
        half = SIDE // 2
        r, c = divmod(self.target, 2)
        obs[r * half:(r + 1) * half, c * half:(c + 1) * half] = 220
        return obs

    def step(self, action):
        return self._obs(), float(int(action) == self.target), True, False, {}


def quadrant_envs(n=4):
    return SyncVectorEnv([BrightQuadrant for _ in range(n)], autoreset_mode=AutoresetMode.SAME_STEP)


def quadrant_accuracy(probabilities) -> float:
    env = BrightQuadrant()
    hits = []
    for seed in range(40):
        obs, _ = env.reset(seed=1000 + seed)
        hits.append(int(np.argmax(probabilities(obs[None])[0]) == env.target))
    return float(np.mean(hits))


def test_replay_buffer_stores_wraps_and_samples():
    buffer = dqn.ReplayBuffer(5, (2, 2, 3), seed=0)
    for step in range(7):
        obs = np.full((1, 2, 2, 3), step, dtype=np.uint8)
        buffer.add(obs, obs + 1, [step], [float(step)], [step == 6])
    assert len(buffer) == 5 and buffer.full and buffer.position == 2
    assert sorted(buffer.actions.tolist()) == [2, 3, 4, 5, 6]  # the two oldest were overwritten
    batch = buffer.sample(64)
    assert batch["obs"].shape == (64, 3, 2, 2) and batch["obs"].max() <= 1.0
    for k in range(64):  # every sampled transition is internally consistent
        step = int(batch["actions"][k])
        assert batch["rewards"][k] == step and batch["dones"][k] == float(step == 6)
        assert torch.allclose(batch["obs"][k], torch.full((3, 2, 2), step / 255.0))
        assert torch.allclose(batch["next_obs"][k], torch.full((3, 2, 2), (step + 1) / 255.0))


def test_td_loss_is_huber_against_the_frozen_target_max():
    torch.manual_seed(0)
    online = dqn.QNetwork(SIDE, 4)
    target = copy.deepcopy(online)
    with torch.no_grad():
        target.q.bias += torch.tensor([0.0, 5.0, 0.0, 0.0])
    obs = torch.rand(3, 3, SIDE, SIDE)
    batch = {"obs": obs, "next_obs": obs.flip(0), "actions": torch.tensor([0, 1, 3]),
             "rewards": torch.tensor([1.0, 0.0, -2.0]), "dones": torch.tensor([0.0, 1.0, 0.0])}
    with torch.no_grad():
        expected_target = batch["rewards"] + 0.99 * target(batch["next_obs"]).max(1).values * (1 - batch["dones"])
        taken = online(obs)[torch.arange(3), batch["actions"]]
    loss = dqn.td_loss(online, target, batch, 0.99)
    assert loss.item() == pytest.approx(F.smooth_l1_loss(taken, expected_target).item(), rel=1e-6)
    assert expected_target[1] == 0.0  # a terminal transition does not bootstrap


def test_epsilon_schedule_and_target_sync_interval():
    assert dqn.linear_schedule(1.0, 0.05, 1000, 0) == 1.0
    assert dqn.linear_schedule(1.0, 0.05, 1000, 500) == pytest.approx(0.525)
    assert dqn.linear_schedule(1.0, 0.05, 1000, 5000) == 0.05
    config = dqn.DQNConfig(total_timesteps=96, learning_starts=16, target_update_interval=32,
                           obs_size=SIDE, seed=0)
    _, log = dqn.train_dqn(quadrant_envs(4), config)
    assert log["target_syncs"] == [32, 64, 96] and log["timesteps"] == 96
    assert log["gradient_steps"] == (96 - 16) // 4  # one gradient step per 4 transitions after the start
    _, log = dqn.train_dqn(quadrant_envs(4), dqn.DQNConfig(total_timesteps=40, obs_size=SIDE))
    assert log["target_syncs"] == []  # methods/srd.md §5 caveat: 10,000-step interval, never synced before the end


def test_dqn_learns_a_toy_gymnasium_task():
    config = dqn.DQNConfig(learning_rate=1e-3, total_timesteps=600, learning_starts=64, train_freq=1,
                           target_update_interval=64, exploration_fraction=0.3, obs_size=SIDE, seed=0)
    q_network, log = dqn.train_dqn(quadrant_envs(4), config)
    policy = dqn.DQNPolicy(q_network, SIDE, epsilon=0.05)
    assert quadrant_accuracy(policy.probabilities) >= 0.9
    probs = policy.probabilities(np.zeros((2, SIDE, SIDE, 3), dtype=np.uint8))
    assert np.allclose(probs.sum(1), 1.0) and probs.max() == pytest.approx(0.95 + 0.05 / 4)


def test_dqn_learns_to_cover_the_trigger_in_the_masking_env():
    sizes = (80,)  # 100 actions; an 80 px mask hides the trigger when centred within ~30 px of it
    victim = PixelVictim((120, 140, 60, 80))
    rewarder = MaskRewarder(victim, PixelVictim(None), reward.FidelityScores(WordScorer(), clip=True),
                            "paper", sizes)
    envs = MaskingVectorEnv(trigger_states(), rewarder, num_envs=8, episode_length=150, seed=0)
    config = dqn.DQNConfig(learning_rate=1e-3, total_timesteps=1200, learning_starts=64, train_freq=2,
                           exploration_fraction=0.5, obs_size=SIDE, seed=0)
    q_network, log = dqn.train_dqn(envs, config)
    states = trigger_states().images([0])
    action = int(dqn.DQNPolicy(q_network, SIDE, 0.0).probabilities(states).argmax())
    masked = geometry.apply_masks(states, [action], sizes)
    assert victim.generate(masked) == ["a gray wall in a quiet room"]  # the backdoor no longer fires
    rewards = np.array(log["step_rewards"])[:, 1]
    assert rewards[-20:].mean() > rewards[:10].mean() + 1.0  # ε-greedy reward climbs from random


def test_ppo_learns_a_toy_gymnasium_task():
    config = ppo.PPOConfig(learning_rate=1e-3, n_steps=128, batch_size=32, n_epochs=4, total_timesteps=1536,
                           ent_coef=0.01, obs_size=SIDE, seed=0)
    model, log = ppo.train_ppo(quadrant_envs(4), config)
    assert log["timesteps"] == 1536 and log["gradient_steps"] == 12 * 4 * 4
    assert quadrant_accuracy(ppo.PPOPolicy(model, SIDE).probabilities) >= 0.9


def test_gae_matches_a_hand_computation():
    rewards = torch.tensor([[1.0], [0.0], [2.0]])
    values = torch.tensor([[0.5], [0.2], [0.1]])
    dones = torch.tensor([[0.0], [0.0], [1.0]])  # the episode ends after step 1 (done flag of step 2)
    adv, ret = ppo.gae(rewards, values, dones, torch.tensor([0.3]), torch.tensor([0.0]), 0.9, 0.5)
    d2 = 2.0 + 0.9 * 0.3 - 0.1
    d1 = 0.0 - 0.2  # no bootstrap across the boundary
    d0 = 1.0 + 0.9 * 0.2 - 0.5
    assert adv[:, 0].tolist() == pytest.approx([d0 + 0.45 * d1, d1, d2])
    assert torch.allclose(ret, adv + values)


def test_discrete_sac_learns_a_toy_gymnasium_task():
    config = sac.SACConfig(learning_rate=1e-3, batch_size=32, train_freq=2, total_timesteps=480,
                           learning_starts=64, obs_size=SIDE, seed=0)
    actor, log = sac.train_sac(quadrant_envs(4), config)
    assert log["gradient_steps"] == (480 - 64) // 2 and log["alpha"][-1] != 1.0
    assert quadrant_accuracy(sac.SACPolicy(actor, SIDE).probabilities) >= 0.9
