"""Discrete-action SAC, cleanrl-style in one file (cleanrl's sac_atari), with SB3's SAC defaults
written out (methods/srd.md §8: Table 3's SAC ablation).

The spec allows a categorical policy over the same Discrete(400/500) action space instead of
the rounded continuous one; this file is that variant (recorded as ``sac_variant``). Twin soft
Q-networks with Polyak-averaged targets (τ = 0.005 every step), automatic entropy temperature;
the target entropy is cleanrl's 0.89 · log|A| (SB3 has no discrete SAC to take a default from).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .dqn import QNetwork, ReplayBuffer  # the soft Q-networks are DQN's NatureCNN + linear head
from .networks import NatureCNN, device_of, resize_observations, to_tensor

SAC_VARIANT = "discrete (categorical policy over the DQN action space)"


@dataclass
class SACConfig:
    learning_rate: float = 3e-4  # methods/srd.md §8 (SB3 default), actor, critics and temperature
    buffer_size: int = 1_000_000  # §8; capped at total_timesteps
    learning_starts: int = 100  # methods/srd.md §8
    batch_size: int = 256  # §8
    tau: float = 0.005  # methods/srd.md §8
    gamma: float = 0.99  # §8
    train_freq: int = 1  # methods/srd.md §8: every transition ...
    gradient_steps: int = 1  # ... one gradient step
    target_entropy_scale: float = 0.89  # cleanrl sac_atari
    initial_log_alpha: float = 0.0  # SB3 "auto": α starts at 1
    total_timesteps: int = 10_000  # methods/srd.md §8
    obs_size: int = 224
    seed: int = 0


class Actor(nn.Module):
    def __init__(self, obs_size: int, n_actions: int):
        super().__init__()
        self.features = NatureCNN(obs_size)
        self.logits = nn.Linear(512, n_actions)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(self.features(x))

    def distribution(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(probabilities, log-probabilities) of the categorical policy."""
        log_probs = F.log_softmax(self(x), dim=1)
        return log_probs.exp(), log_probs


class SACPolicy:
    """Cleaning samples from the stochastic policy (methods/srd.md §8)."""

    algorithm = "sac"

    def __init__(self, actor: Actor, obs_size: int):
        self.actor, self.obs_size = actor.eval(), obs_size

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            logits = self.actor(to_tensor(resize_observations(images, self.obs_size), device_of(self.actor)))
        return torch.softmax(logits.double(), dim=1).cpu().numpy()


def train_sac(envs, config: SACConfig, progress=None, device: torch.device | str = "cpu") -> tuple[Actor, dict]:
    """cleanrl's sac_atari loop; the networks train on ``device`` (initialised on the CPU first)."""
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    n_envs, n_act = envs.num_envs, int(envs.single_action_space.n)
    actor = Actor(config.obs_size, n_act).to(device)
    q1, q2 = QNetwork(config.obs_size, n_act).to(device), QNetwork(config.obs_size, n_act).to(device)
    q1_target = QNetwork(config.obs_size, n_act).to(device)
    q2_target = QNetwork(config.obs_size, n_act).to(device)
    q1_target.load_state_dict(q1.state_dict())
    q2_target.load_state_dict(q2.state_dict())
    q_optimizer = torch.optim.Adam(list(q1.parameters()) + list(q2.parameters()), lr=config.learning_rate)
    actor_optimizer = torch.optim.Adam(actor.parameters(), lr=config.learning_rate)
    target_entropy = config.target_entropy_scale * math.log(n_act)
    log_alpha = torch.tensor([config.initial_log_alpha], requires_grad=True, device=device)
    alpha_optimizer = torch.optim.Adam([log_alpha], lr=config.learning_rate)
    buffer = ReplayBuffer(min(config.buffer_size, config.total_timesteps),
                          (config.obs_size, config.obs_size, 3), config.seed)
    obs, _ = envs.reset(seed=config.seed)
    obs = resize_observations(obs, config.obs_size)
    log = {"config": asdict(config), "variant": SAC_VARIANT, "step_rewards": [], "episode_returns": [],
           "losses": [], "alpha": [], "actions": []}
    global_step, pending, started = 0, 0.0, time.perf_counter()
    while global_step < config.total_timesteps:
        if global_step < config.learning_starts:
            actions = rng.integers(n_act, size=n_envs)
        else:
            with torch.no_grad():
                probs, _ = actor.distribution(to_tensor(obs, device))
            actions = torch.multinomial(probs, 1).squeeze(1).cpu().numpy()
        next_obs, rewards, terminated, truncated, infos = envs.step(actions)
        next_obs = resize_observations(next_obs, config.obs_size)
        real_next = next_obs.copy()
        if "final_obs" in infos:
            rows = np.flatnonzero(infos["_final_obs"])
            real_next[rows] = resize_observations(np.stack([infos["final_obs"][i] for i in rows]), config.obs_size)
            if "episode_return" in infos:
                log["episode_returns"] += [[global_step + n_envs, float(infos["episode_return"][i])] for i in rows]
        buffer.add(obs, real_next, actions, rewards, terminated)
        obs = next_obs
        global_step += n_envs
        log["step_rewards"].append([global_step, float(np.mean(rewards))])
        log["actions"] += np.asarray(actions).tolist()
        if global_step > config.learning_starts:
            pending += n_envs / config.train_freq * config.gradient_steps
            while pending >= 1.0:
                pending -= 1.0
                batch = buffer.sample(config.batch_size, device)
                alpha = log_alpha.exp().item()
                with torch.no_grad():
                    next_probs, next_log_probs = actor.distribution(batch["next_obs"])
                    next_q = torch.min(q1_target(batch["next_obs"]), q2_target(batch["next_obs"]))
                    next_v = (next_probs * (next_q - alpha * next_log_probs)).sum(dim=1)
                    target = batch["rewards"] + config.gamma * (1.0 - batch["dones"]) * next_v
                taken = batch["actions"][:, None]
                q_loss = (F.mse_loss(q1(batch["obs"]).gather(1, taken).squeeze(1), target)
                          + F.mse_loss(q2(batch["obs"]).gather(1, taken).squeeze(1), target))
                q_optimizer.zero_grad()
                q_loss.backward()
                q_optimizer.step()
                probs, log_probs = actor.distribution(batch["obs"])
                with torch.no_grad():
                    q_min = torch.min(q1(batch["obs"]), q2(batch["obs"]))
                actor_loss = (probs * (alpha * log_probs - q_min)).sum(dim=1).mean()
                actor_optimizer.zero_grad()
                actor_loss.backward()
                actor_optimizer.step()
                alpha_loss = (probs.detach() * (-log_alpha.exp() * (log_probs.detach() + target_entropy))).sum(1).mean()
                alpha_optimizer.zero_grad()
                alpha_loss.backward()
                alpha_optimizer.step()
                for online, tgt in ((q1, q1_target), (q2, q2_target)):  # Polyak, every step (SB3)
                    for p, tp in zip(online.parameters(), tgt.parameters()):
                        tp.data.mul_(1.0 - config.tau).add_(config.tau * p.data)
                log["losses"].append(float(q_loss.detach()))
                log["alpha"].append(float(log_alpha.detach().exp()))
        if progress is not None:
            progress(global_step, config.total_timesteps)
    seconds = time.perf_counter() - started
    log.update(timesteps=global_step, gradient_steps=len(log["losses"]), seconds=seconds,
               steps_per_second=global_step / max(seconds, 1e-9), target_entropy=target_entropy)
    return actor.eval(), log


def config_from(params: dict, seed: int) -> SACConfig:
    return SACConfig(learning_starts=params["learning_starts"], batch_size=params["batch_size"],
                     train_freq=params["train_freq"], total_timesteps=params["total_timesteps"],
                     obs_size=params["obs_size"], seed=seed)


def make_model(obs_size: int, n_actions: int) -> Actor:
    return Actor(obs_size, n_actions)


def make_policy(model: Actor, config: SACConfig, params: dict) -> SACPolicy:
    return SACPolicy(model, config.obs_size)


train = train_sac
