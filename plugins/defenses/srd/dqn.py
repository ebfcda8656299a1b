"""DQN, cleanrl-style in one file, with SB3's DQN defaults written out (methods/srd.md §5).

Vanilla DQN (no double DQN): Huber loss between Q(s, a) and r + γ(1 − done) max_a' Q_target(s', a'),
hard target copy every ``target_update_interval`` transitions, ε-greedy with a linear decay.
With N vectorised environments one vector step adds N transitions; one gradient step is taken
per ``train_freq`` transitions, so the ratio of SB3's single-environment run is kept.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .networks import NatureCNN, device_of, resize_observations, to_tensor


@dataclass
class DQNConfig:
    learning_rate: float = 1e-4  # methods/srd.md §5: Adam, constant
    buffer_size: int = 1_000_000  # §5; capped at total_timesteps (it never fills)
    learning_starts: int = 100  # methods/srd.md §5: SB3 >= 2.3.0 (50,000 reproduces an old-SB3 run)
    batch_size: int = 32  # §5
    gamma: float = 0.99  # methods/srd.md §5
    tau: float = 1.0  # §5: hard target copy
    train_freq: int = 4  # methods/srd.md §5: every 4 environment steps ...
    gradient_steps: int = 1  # ... 1 gradient step
    target_update_interval: int = 10_000  # methods/srd.md §5
    exploration_fraction: float = 0.1  # §5: ε 1.0 -> 0.05 over the first 10 % ...
    exploration_initial_eps: float = 1.0
    exploration_final_eps: float = 0.05  # ... then 0.05
    max_grad_norm: float = 10.0  # methods/srd.md §5
    total_timesteps: int = 10_000  # §5: about 66 episodes of 150 steps
    obs_size: int = 224  # network input side (224 = the paper's frame)
    seed: int = 0


class QNetwork(nn.Module):
    """NatureCNN, then a linear Q head 512 -> |A| with no extra hidden layer (methods/srd.md §5)."""

    def __init__(self, obs_size: int, n_actions: int):
        super().__init__()
        self.features = NatureCNN(obs_size)
        self.q = nn.Linear(512, n_actions)

    def forward(self, obs_uint8: np.ndarray | torch.Tensor) -> torch.Tensor:
        x = obs_uint8 if isinstance(obs_uint8, torch.Tensor) else to_tensor(obs_uint8, device_of(self))
        return self.q(self.features(x))


class ReplayBuffer:
    """Uniform replay over (obs, action, reward, next_obs, done), uint8 observations."""

    def __init__(self, capacity: int, obs_shape: tuple, seed: int):
        self.capacity = int(capacity)
        self.obs = np.zeros((self.capacity,) + tuple(obs_shape), dtype=np.uint8)
        self.next_obs = np.zeros_like(self.obs)
        self.actions = np.zeros(self.capacity, dtype=np.int64)
        self.rewards = np.zeros(self.capacity, dtype=np.float32)
        self.dones = np.zeros(self.capacity, dtype=np.float32)
        self.position, self.full = 0, False
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return self.capacity if self.full else self.position

    def add(self, obs, next_obs, actions, rewards, dones) -> None:
        for k in range(len(actions)):
            p = self.position
            self.obs[p], self.next_obs[p] = obs[k], next_obs[k]
            self.actions[p], self.rewards[p], self.dones[p] = actions[k], rewards[k], dones[k]
            self.position = (p + 1) % self.capacity
            self.full = self.full or self.position == 0

    def sample(self, batch_size: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """A uniform batch (the buffer stays in host memory; the batch goes to ``device``)."""
        idx = self.rng.integers(len(self), size=batch_size)
        return {"obs": to_tensor(self.obs[idx], device), "next_obs": to_tensor(self.next_obs[idx], device),
                "actions": torch.from_numpy(self.actions[idx]).to(device),
                "rewards": torch.from_numpy(self.rewards[idx]).to(device),
                "dones": torch.from_numpy(self.dones[idx]).to(device)}


def linear_schedule(start: float, end: float, duration: float, t: int) -> float:
    slope = (end - start) / max(duration, 1.0)
    return max(slope * t + start, end)


def td_loss(q_network: QNetwork, target_network: QNetwork, batch: dict, gamma: float) -> torch.Tensor:
    with torch.no_grad():
        target_max = target_network(batch["next_obs"]).max(dim=1).values
        td_target = batch["rewards"] + gamma * target_max * (1.0 - batch["dones"])
    q_taken = q_network(batch["obs"]).gather(1, batch["actions"][:, None]).squeeze(1)
    return F.smooth_l1_loss(q_taken, td_target)  # methods/srd.md §5: Huber


def epsilon_greedy(q_network: QNetwork, obs: np.ndarray, epsilon: float, n_actions: int,
                   rng: np.random.Generator) -> np.ndarray:
    """ε-greedy actions for a batch of network-resolution observations."""
    with torch.no_grad():
        greedy = q_network(obs).argmax(dim=1).cpu().numpy()
    explore = rng.random(len(obs)) < epsilon
    return np.where(explore, rng.integers(n_actions, size=len(obs)), greedy)


class DQNPolicy:
    """The trained Q-network as a cleaning policy: ε-greedy at the final exploration rate (methods/srd.md §6)."""

    algorithm = "dqn"

    def __init__(self, q_network: QNetwork, obs_size: int, epsilon: float):
        self.q_network, self.obs_size, self.epsilon = q_network.eval(), obs_size, epsilon

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """ε/|A| everywhere plus 1 − ε on the greedy action, per image."""
        with torch.no_grad():
            greedy = self.q_network(resize_observations(images, self.obs_size)).argmax(dim=1).cpu().numpy()
        n = self.q_network.q.out_features
        probs = np.full((len(images), n), self.epsilon / n)
        probs[np.arange(len(images)), greedy] += 1.0 - self.epsilon
        return probs


def make_model(obs_size: int, n_actions: int) -> QNetwork:
    return QNetwork(obs_size, n_actions)


def train_dqn(envs, config: DQNConfig, progress=None, device: torch.device | str = "cpu") -> tuple[QNetwork, dict]:
    """cleanrl's dqn.py loop on a gymnasium vector env with same-step autoreset. The networks
    train on ``device``; they are initialised on the CPU first (the same start on any device)."""
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    n_envs, n_act = envs.num_envs, int(envs.single_action_space.n)
    q_network = QNetwork(config.obs_size, n_act).to(device)
    target_network = QNetwork(config.obs_size, n_act).to(device)
    target_network.load_state_dict(q_network.state_dict())
    optimizer = torch.optim.Adam(q_network.parameters(), lr=config.learning_rate)
    buffer = ReplayBuffer(min(config.buffer_size, config.total_timesteps),
                          (config.obs_size, config.obs_size, 3), config.seed)
    obs, _ = envs.reset(seed=config.seed)
    obs = resize_observations(obs, config.obs_size)
    log = {"config": asdict(config), "step_rewards": [], "episode_returns": [], "losses": [],
           "target_syncs": [], "actions": [], "epsilon_at_first_gradient_step": None}
    global_step, pending_updates, started = 0, 0.0, time.perf_counter()
    while global_step < config.total_timesteps:
        epsilon = linear_schedule(config.exploration_initial_eps, config.exploration_final_eps,
                                  config.exploration_fraction * config.total_timesteps, global_step)
        actions = epsilon_greedy(q_network, obs, epsilon, n_act, rng)
        next_obs, rewards, terminated, truncated, infos = envs.step(actions)
        next_obs = resize_observations(next_obs, config.obs_size)
        real_next = next_obs.copy()
        if "final_obs" in infos:  # same-step autoreset: store the true last observation
            done_rows = np.flatnonzero(infos["_final_obs"])
            real_next[done_rows] = resize_observations(np.stack([infos["final_obs"][i] for i in done_rows]), config.obs_size)
            if "episode_return" in infos:
                log["episode_returns"] += [[global_step + n_envs, float(infos["episode_return"][i])] for i in done_rows]
        buffer.add(obs, real_next, actions, rewards, terminated)
        obs = next_obs
        previous, global_step = global_step, global_step + n_envs
        log["step_rewards"].append([global_step, float(np.mean(rewards))])
        log["actions"] += actions.tolist()
        if global_step > config.learning_starts:  # SB3 trains once num_timesteps > learning_starts
            pending_updates += n_envs / config.train_freq * config.gradient_steps
            while pending_updates >= 1.0:
                pending_updates -= 1.0
                if log["epsilon_at_first_gradient_step"] is None:
                    log["epsilon_at_first_gradient_step"] = epsilon
                loss = td_loss(q_network, target_network, buffer.sample(config.batch_size, device), config.gamma)
                optimizer.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(q_network.parameters(), config.max_grad_norm)
                optimizer.step()
                log["losses"].append(float(loss.detach()))
        if global_step // config.target_update_interval > previous // config.target_update_interval:
            for target, online in zip(target_network.parameters(), q_network.parameters()):
                target.data.copy_(config.tau * online.data + (1.0 - config.tau) * target.data)
            log["target_syncs"].append(global_step)
        if progress is not None:
            progress(global_step, config.total_timesteps)
    seconds = time.perf_counter() - started
    log.update(timesteps=global_step, gradient_steps=len(log["losses"]), seconds=seconds,
               steps_per_second=global_step / max(seconds, 1e-9), final_epsilon=epsilon)
    return q_network.eval(), log


def config_from(params: dict, seed: int) -> DQNConfig:
    """The preset's DQN: SB3 defaults (methods/srd.md §5) with the preset's budget knobs."""
    return DQNConfig(learning_starts=params["learning_starts"], total_timesteps=params["total_timesteps"],
                     target_update_interval=params["target_update_interval"],
                     exploration_fraction=params["exploration_fraction"], obs_size=params["obs_size"], seed=seed)


def make_policy(model: QNetwork, config: DQNConfig, params: dict) -> DQNPolicy:
    return DQNPolicy(model, config.obs_size, params["cleaning_epsilon"])  # methods/srd.md §6: ε = 0.05


train = train_dqn
