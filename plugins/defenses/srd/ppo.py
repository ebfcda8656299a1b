"""PPO, cleanrl-style in one file, with SB3's PPO defaults written out (methods/srd.md §8:
Table 3's PPO ablation on the same discrete masking environment).

Shared NatureCNN features with a policy head (gain 0.01) and a value head (gain 1), orthogonal
initialisation, GAE, clipped surrogate, advantage normalisation per minibatch (SB3 defaults).
``n_steps`` counts transitions per rollout over all vectorised environments, as in SB3's
single-environment run.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn
from torch.distributions import Categorical

from .networks import NatureCNN, device_of, resize_observations, to_tensor


@dataclass
class PPOConfig:
    learning_rate: float = 3e-4  # methods/srd.md §8 (SB3 default)
    n_steps: int = 2048  # §8: transitions per rollout
    batch_size: int = 64  # methods/srd.md §8: minibatch
    n_epochs: int = 10  # §8
    gamma: float = 0.99  # methods/srd.md §8
    gae_lambda: float = 0.95  # §8
    clip_range: float = 0.2  # methods/srd.md §8
    ent_coef: float = 0.0  # §8
    vf_coef: float = 0.5  # methods/srd.md §8
    max_grad_norm: float = 0.5  # §8
    normalize_advantage: bool = True  # SB3 default
    total_timesteps: int = 10_000  # methods/srd.md §8: same as DQN
    obs_size: int = 224
    seed: int = 0


def layer_init(layer: nn.Linear, gain: float) -> nn.Linear:
    nn.init.orthogonal_(layer.weight, gain)
    nn.init.zeros_(layer.bias)
    return layer


class ActorCritic(nn.Module):
    def __init__(self, obs_size: int, n_actions: int):
        super().__init__()
        self.features = NatureCNN(obs_size)
        for module in self.features.modules():  # SB3 ortho_init: sqrt(2) on the extractor
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.orthogonal_(module.weight, math.sqrt(2))
                nn.init.zeros_(module.bias)
        self.actor = layer_init(nn.Linear(512, n_actions), 0.01)
        self.critic = layer_init(nn.Linear(512, 1), 1.0)

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.features(obs)
        return self.actor(hidden), self.critic(hidden).squeeze(-1)


class PPOPolicy:
    """Cleaning samples from the stochastic policy (methods/srd.md §8)."""

    algorithm = "ppo"

    def __init__(self, model: ActorCritic, obs_size: int):
        self.model, self.obs_size = model.eval(), obs_size

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            logits, _ = self.model(to_tensor(resize_observations(images, self.obs_size), device_of(self.model)))
        return torch.softmax(logits.double(), dim=1).cpu().numpy()


def gae(rewards, values, dones, next_value, next_done, gamma: float, lam: float):
    """cleanrl's generalised advantage estimation over a (T, N) rollout."""
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(next_value)
    for t in reversed(range(len(rewards))):
        not_done = 1.0 - (next_done if t == len(rewards) - 1 else dones[t + 1])
        following = next_value if t == len(rewards) - 1 else values[t + 1]
        delta = rewards[t] + gamma * following * not_done - values[t]
        last = delta + gamma * lam * not_done * last
        advantages[t] = last
    return advantages, advantages + values


def train_ppo(envs, config: PPOConfig, progress=None, device: torch.device | str = "cpu") -> tuple[ActorCritic, dict]:
    """cleanrl's ppo.py loop; the model trains on ``device`` (initialised on the CPU first)."""
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    n_envs, n_act = envs.num_envs, int(envs.single_action_space.n)
    steps_per_env = max(1, config.n_steps // n_envs)
    model = ActorCritic(config.obs_size, n_act).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate, eps=1e-5)
    obs_np, _ = envs.reset(seed=config.seed)
    next_obs = to_tensor(resize_observations(obs_np, config.obs_size), device)
    next_done = torch.zeros(n_envs, device=device)
    log = {"config": asdict(config), "step_rewards": [], "episode_returns": [], "losses": [], "actions": []}
    iterations = math.ceil(config.total_timesteps / (steps_per_env * n_envs))
    global_step, started = 0, time.perf_counter()
    for _ in range(iterations):
        obs_b, act_b, logp_b, rew_b, done_b, val_b = [], [], [], [], [], []
        for _ in range(steps_per_env):
            with torch.no_grad():
                logits, value = model(next_obs)
            dist = Categorical(logits=logits)
            action = dist.sample()
            obs_b.append(next_obs), act_b.append(action), logp_b.append(dist.log_prob(action))
            val_b.append(value), done_b.append(next_done)
            obs_np, reward, terminated, truncated, infos = envs.step(action.cpu().numpy())
            global_step += n_envs
            rew_b.append(torch.as_tensor(reward, dtype=torch.float32, device=device))
            next_obs = to_tensor(resize_observations(obs_np, config.obs_size), device)
            next_done = torch.as_tensor(np.logical_or(terminated, truncated), dtype=torch.float32, device=device)
            log["step_rewards"].append([global_step, float(np.mean(reward))])
            log["actions"] += action.tolist()
            if "episode_return" in infos:
                log["episode_returns"] += [[global_step, float(infos["episode_return"][i])]
                                           for i in np.flatnonzero(infos["_episode_return"])]
            if progress is not None:
                progress(global_step, config.total_timesteps)
        with torch.no_grad():
            _, next_value = model(next_obs)
        values = torch.stack(val_b)
        advantages, returns = gae(torch.stack(rew_b), values, torch.stack(done_b), next_value, next_done,
                                  config.gamma, config.gae_lambda)
        b_obs, b_act = torch.cat(obs_b), torch.cat(act_b)
        b_logp, b_adv, b_ret = torch.cat(logp_b), advantages.flatten(), returns.flatten()
        size = len(b_obs)
        for _ in range(config.n_epochs):
            order = rng.permutation(size)
            for start in range(0, size, config.batch_size):
                mb = torch.from_numpy(order[start:start + config.batch_size]).to(device)
                logits, value = model(b_obs[mb])
                dist = Categorical(logits=logits)
                ratio = (dist.log_prob(b_act[mb]) - b_logp[mb]).exp()
                adv = b_adv[mb]
                if config.normalize_advantage and len(mb) > 1:
                    adv = (adv - adv.mean()) / (adv.std() + 1e-8)
                policy_loss = torch.max(-adv * ratio, -adv * ratio.clamp(1 - config.clip_range,
                                                                          1 + config.clip_range)).mean()
                value_loss = ((value - b_ret[mb]) ** 2).mean()  # SB3: no value clipping by default
                loss = policy_loss - config.ent_coef * dist.entropy().mean() + config.vf_coef * value_loss
                optimizer.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                optimizer.step()
                log["losses"].append(float(loss.detach()))
    seconds = time.perf_counter() - started
    log.update(timesteps=global_step, gradient_steps=len(log["losses"]), seconds=seconds,
               steps_per_second=global_step / max(seconds, 1e-9), rollout_transitions=steps_per_env * n_envs)
    return model.eval(), log


def config_from(params: dict, seed: int) -> PPOConfig:
    return PPOConfig(n_steps=params["n_steps"], total_timesteps=params["total_timesteps"],
                     obs_size=params["obs_size"], seed=seed)


def make_model(obs_size: int, n_actions: int) -> ActorCritic:
    return ActorCritic(obs_size, n_actions)


def make_policy(model: ActorCritic, config: PPOConfig, params: dict) -> PPOPolicy:
    return PPOPolicy(model, config.obs_size)


train = train_ppo
