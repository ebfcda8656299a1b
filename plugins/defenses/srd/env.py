"""The masking environment (methods/srd.md §3) with a batched reward model (§2, §5 "Cost").

Every environment step masks the episode's original image once (masks do not accumulate),
captions it with the queried model, and scores the caption against the reference caption.
:class:`MaskingVectorEnv` steps N states together so that one ``generate`` call captions N
images; captions are cached per (image, action, prompt), scores per caption text (SfsScorer).
"""

from __future__ import annotations

import time
from typing import Sequence

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from vlmbackdoor_bench.types import IMAGE_SIZE

from .geometry import apply_masks, n_actions
from .reward import FidelityScores, rewards
from .state_set import StateSet

EPISODE_LENGTH = 150  # methods/srd.md §3: terminated=True at step 150 (gymnasium 1.4.0)
UNMASKED = -1  # action key of the image as given (S0, F0)


class MaskRewarder:
    """The reward of masked images for one queried model and one reference captioner (methods/srd.md §2)."""

    def __init__(self, victim, reference_victim, fidelity: FidelityScores, table: str,
                 sizes: Sequence[int]):
        self.victim, self.reference_victim = victim, reference_victim
        self.fidelity, self.table, self.sizes = fidelity, table, tuple(sizes)
        self._captions: dict[tuple, str] = {}
        self._references: dict[tuple, str] = {}
        self._rewards: dict[tuple, tuple[float, str, float, float]] = {}  # (r, caption, S, F)
        self.generations = 0
        self.seconds = 0.0
        self.reward_queries = 0  # rewards asked for
        self.reward_evaluations = 0  # rewards computed (the rest came from the cache)

    def _generate(self, model, cache: dict, keys: list[tuple], images: np.ndarray,
                  prompts: Sequence[str]) -> list[str]:
        missing: dict[str, list[int]] = {}
        for k, key in enumerate(keys):
            if key not in cache:
                missing.setdefault(prompts[k], []).append(k)
        started = time.perf_counter()
        for prompt, rows in missing.items():
            unique = list({keys[k]: k for k in rows}.values())  # one generation per distinct key
            for k, caption in zip(unique, model.generate(images[unique], prompt)):
                cache[keys[k]] = caption
            self.generations += len(unique)
        self.seconds += time.perf_counter() - started
        return [cache[key] for key in keys]

    def references(self, keys: Sequence, images: np.ndarray, prompts: Sequence[str]) -> list[str]:
        """r(I), produced on I as given (possibly triggered) by the reference captioner (methods/srd.md §2)."""
        return self._generate(self.reference_victim, self._references,
                              [(key, p) for key, p in zip(keys, prompts)], images, prompts)

    def captions(self, keys: Sequence, actions: Sequence[int], masked: np.ndarray,
                 prompts: Sequence[str]) -> list[str]:
        """The queried model's captions of ``masked`` (the image ``keys[k]`` under ``actions[k]``)."""
        return self._generate(self.victim, self._captions,
                              [(key, int(a), p) for key, a, p in zip(keys, actions, prompts)], masked, prompts)

    def baseline(self, keys: Sequence, images: np.ndarray, prompts: Sequence[str]):
        """(r, S0, F0) of unmasked images (methods/srd.md §1 precomputation)."""
        refs = self.references(keys, images, prompts)
        plain = self.captions(keys, [UNMASKED] * len(keys), images, prompts)
        s0, f0 = self.fidelity(plain, refs)
        return refs, s0, f0

    def score(self, keys: Sequence, actions: Sequence[int], masked: np.ndarray, prompts: Sequence[str],
              refs: Sequence[str], s0: np.ndarray, f0: np.ndarray):
        """(rewards, captions, S, F) of masked images against their baselines. Each masked image,
        (``keys[k]``, ``actions[k]``, prompt), is evaluated once: its baseline is fixed per image and
        prompt, so a repeated mask reads its reward from the cache."""
        reward_keys = [(key, int(a), p) for key, a, p in zip(keys, actions, prompts)]
        todo = list({rk: k for k, rk in enumerate(reward_keys) if rk not in self._rewards}.values())
        if todo:
            caps = self.captions([keys[k] for k in todo], [actions[k] for k in todo], masked[todo],
                                 [prompts[k] for k in todo])
            s, f = self.fidelity(caps, [refs[k] for k in todo])
            r = rewards(self.table, s, f, np.asarray(s0)[todo], np.asarray(f0)[todo], [not c.strip() for c in caps])
            for j, k in enumerate(todo):
                self._rewards[reward_keys[k]] = (float(r[j]), caps[j], float(s[j]), float(f[j]))
            self.reward_evaluations += len(todo)
        self.reward_queries += len(keys)
        r, caps, s, f = zip(*(self._rewards[rk] for rk in reward_keys)) if keys else ((), (), (), ())
        return np.array(r, dtype=np.float32), list(caps), np.array(s), np.array(f)


class StateBaselines:
    """r, S0, F0 of every state, computed the first time a state is drawn (same values as a full
    precomputation, methods/srd.md §1, without captioning states no episode visits)."""

    def __init__(self, states: StateSet, rewarder: MaskRewarder):
        self.states, self.rewarder = states, rewarder
        self.refs: dict[int, str] = {}
        self.s0: dict[int, float] = {}
        self.f0: dict[int, float] = {}

    def ensure(self, indices: Sequence[int]) -> None:
        todo = sorted({int(i) for i in indices} - set(self.refs))
        if not todo:
            return
        refs, s0, f0 = self.rewarder.baseline([("state", i) for i in todo], self.states.images(todo),
                                              [self.states.prompts[i] for i in todo])
        for k, i in enumerate(todo):
            self.refs[i], self.s0[i], self.f0[i] = refs[k], float(s0[k]), float(f0[k])


def observation_space() -> gym.spaces.Box:
    """methods/srd.md §3: the 224x224x3 uint8 RGB image."""
    return gym.spaces.Box(0, 255, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)


class MaskingVectorEnv(VectorEnv):
    """N masking environments stepping together (same-step autoreset: a finished episode's last
    observation is in ``infos["final_obs"]`` and ``obs`` already holds the next episode's start)."""

    metadata = {"autoreset_mode": AutoresetMode.SAME_STEP}

    def __init__(self, states: StateSet, rewarder: MaskRewarder, *, num_envs: int,
                 episode_length: int = EPISODE_LENGTH, seed: int = 0):
        self.states, self.rewarder = states, rewarder
        self.baselines = StateBaselines(states, rewarder)
        self.num_envs, self.episode_length = int(num_envs), int(episode_length)
        self.single_observation_space = observation_space()
        self.single_action_space = gym.spaces.Discrete(n_actions(rewarder.sizes))  # methods/srd.md §3: 400 / 500
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self._rng = np.random.default_rng(seed)
        self.state = np.zeros(self.num_envs, dtype=np.int64)
        self.t = np.zeros(self.num_envs, dtype=np.int64)
        self.returns = np.zeros(self.num_envs)
        self.originals = np.zeros((self.num_envs, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
        self.steps = 0
        self.visited: set[int] = set()  # states stepped at least once
        self.episodes_finished = 0
        # observations the agent acted on that were the unmasked state image (an episode's
        # first step); cleaning queries unmasked images only, so this share is reported
        self.unmasked_observations = 0

    def _start(self, envs: Sequence[int]) -> None:
        """methods/srd.md §3 reset: a state index uniformly at random; its image, S0, F0, r and prompt."""
        picks = self._rng.integers(len(self.states), size=len(envs))
        self.baselines.ensure(picks)
        self.state[list(envs)] = picks
        self.originals[list(envs)] = self.states.images(picks)
        self.t[list(envs)] = 0
        self.returns[list(envs)] = 0.0

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        self._start(range(self.num_envs))
        return self.originals.copy(), {"state": self.state.copy()}

    def step(self, actions):
        actions = np.asarray(actions, dtype=np.int64).reshape(self.num_envs)
        masked = apply_masks(self.originals, actions, self.rewarder.sizes)  # on the original image
        idx = self.state.tolist()
        r, caps, s, f = self.rewarder.score(
            [("state", i) for i in idx], actions, masked, [self.states.prompts[i] for i in idx],
            [self.baselines.refs[i] for i in idx], np.array([self.baselines.s0[i] for i in idx]),
            np.array([self.baselines.f0[i] for i in idx]))
        self.visited.update(idx)
        self.unmasked_observations += int((self.t == 0).sum())
        self.t += 1
        self.steps += self.num_envs
        self.returns += r
        terminated = self.t >= self.episode_length
        infos = {"captions": caps, "state": self.state.copy(), "s": s, "f": f}
        obs = masked
        if terminated.any():
            done = np.flatnonzero(terminated).tolist()
            self.episodes_finished += len(done)
            infos["final_obs"], infos["_final_obs"] = masked.copy(), terminated.copy()
            infos["episode_return"], infos["_episode_return"] = self.returns.copy(), terminated.copy()
            self._start(done)
            obs = masked.copy()
            obs[done] = self.originals[done]
        return obs, r, terminated, np.zeros(self.num_envs, dtype=bool), infos


class MaskingEnv(gym.Env):
    """The single-environment form of methods/srd.md §3 (one state per episode)."""

    metadata: dict = {}

    def __init__(self, states: StateSet, rewarder: MaskRewarder, *,
                 episode_length: int = EPISODE_LENGTH, seed: int = 0):
        self._vector = MaskingVectorEnv(states, rewarder, num_envs=1, episode_length=episode_length, seed=seed)
        self.observation_space = self._vector.single_observation_space
        self.action_space = self._vector.single_action_space

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        obs, info = self._vector.reset(seed=seed)
        return obs[0], {"state": int(info["state"][0])}

    def step(self, action):
        obs, r, terminated, truncated, infos = self._vector.step([int(action)])
        final = infos["final_obs"][0] if terminated[0] else obs[0]  # no autoreset in a single env
        return final, float(r[0]), bool(terminated[0]), False, {"caption": infos["captions"][0]}
