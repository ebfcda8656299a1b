"""SRD (Semantic Reward Defense) and its Table 3 ablations (spec/srd.md).

Four defenses share one pipeline and differ only in the policy (spec/srd.md §8):

* ``srd``: DQN (SRD itself, Table 3's DQN column);
* ``srd_ppo``: PPO on the same discrete environment;
* ``srd_sac``: discrete-action SAC (categorical policy over the same Discrete(400/500) space);
* ``random_mask``: one uniformly drawn mask per instance, no RL, no reward-based selection.

Each has the presets ``srd`` (the paper, default) and ``srd-code`` (the public code), see
:mod:`.settings`. Pipeline: state set + surrogate (§1) -> policy on the masking environment
(§3-§5) -> one red mask on every fine-tuning instance, best of 5 (§6) -> re-fine-tune M_bd on the
masked images with the captions unchanged (§7). The surrogate and the policy are cached under
``context.stage.cache_dir/srd`` and reused across attacks (§0).
"""

from __future__ import annotations

from vlmbackdoor_bench.hookspecs import DefenseContext, DefenseOutcome, hookimpl

from .settings import CODE_PRESET, PAPER_PRESET

__version__ = "1.0.0"

# Algorithm-specific preset keys (SB3 defaults live in each algorithm's config dataclass).
PPO_PARAMS = {
    "n_steps": 2048,  # spec/srd.md §8: 2,048 of 10,000 steps = ~5 PPO updates, every profile
}
SAC_TINY = {
    # spec/srd.md §8: batch 256 with a gradient step per transition is ~60x the DQN's gradient
    # work; on 2 cores the tiny budget takes batch 64 every 4 transitions (the DQN's ratio).
    "batch_size": 256, "train_freq": 1, "tiny_batch_size": 64, "tiny_train_freq": 4,
}


class SrdDefense:
    version = __version__
    default_preset = "srd"

    def __init__(self, name: str, algorithm: str, label: str, order: int,
                 paper_tables: dict[int, int], extra: dict | None = None):
        self.name, self.algorithm = name, algorithm
        self.label, self.order, self.paper_tables = label, order, paper_tables
        extra = extra or {}
        self.presets = {"srd": {**PAPER_PRESET, **extra}, "srd-code": {**CODE_PRESET, **extra}}
        if algorithm == "random":  # no RL: only the mask space, cleaning and re-fine-tuning apply
            drop = ("total_timesteps", "learning_starts", "obs_size", "n_envs", "episode_length",
                    "tiny_obs_size", "tiny_n_envs", "tiny_episode_length", "state_set", "state_set_size",
                    "max_state_fraction", "surrogate", "surrogate_asr_min", "surrogate_epochs",
                    "heldout_states", "cleaning_trials", "cleaning_epsilon", "rl_threads",
                    "target_update_interval", "tiny_target_update_interval", "exploration_fraction",
                    "tiny_exploration_fraction", "reward_table", "clip_scores", "reference",
                    "tiny_reference", "prompt")
            self.presets = {k: {n: v for n, v in preset.items() if n not in drop} for k, preset in self.presets.items()}

    def defend(self, context: DefenseContext, params) -> DefenseOutcome:
        from .pipeline import run
        preset = next((k for k, v in self.presets.items() if v == dict(params)), "custom")
        outcome = run(context, params, algorithm=self.algorithm, name=self.name,
                      defaults=self.presets[self.default_preset])
        outcome.report.details["preset_match"] = preset
        return outcome


# Labels and columns as the SRD paper prints them (Tables 1-3: table -> column); in Table 3, the
# RL ablation, SRD itself is "DQN".
SRD = SrdDefense("srd", "dqn", "SRD", 40, {1: 1, 2: 4, 3: 4})
SRD.paper_labels = {3: "DQN"}
DEFENSES = (
    SRD,
    SrdDefense("srd_ppo", "ppo", "PPO", 60, {3: 2}, PPO_PARAMS),
    SrdDefense("srd_sac", "sac", "SAC", 70, {3: 3}, SAC_TINY),
    SrdDefense("random_mask", "random", "Random", 50, {3: 1}),
)


@hookimpl
def register_defenses(register) -> None:
    for defense in DEFENSES:
        register(defense)
