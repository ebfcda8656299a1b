"""SRD (methods/srd.md): action geometry, reward tables, the masking environment, cleaning, and
the whole defense on deterministic fake victims whose captions depend on the pixels."""

from __future__ import annotations

import json
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

from vlmbackdoor_bench.errors import VbbError
from vlmbackdoor_bench.hookspecs import DefenseContext, StageContext
from vlmbackdoor_bench.types import Example, ImageBank, TrainingSet
from vlmbackdoor_bench_plugins.defenses import srd
from vlmbackdoor_bench_plugins.defenses.srd import cleaning, dqn, geometry, reward, settings
from vlmbackdoor_bench_plugins.defenses.srd.env import MaskingEnv, MaskingVectorEnv, MaskRewarder
from vlmbackdoor_bench_plugins.defenses.srd.state_set import StateSet, defender_data, paper_state_set

CLEAN = "a gray wall in a quiet room"
BACKDOOR = "banana banana banana banana"
BACKGROUND = 90


# --------------------------------------------------------------------------- fakes
class WordScorer:
    """SfsScorer's public interface with transparent numbers: cosine = word Jaccard, perplexity
    = 20 · (1 + repeated words)², so a repetitive caption is much less fluent."""

    def __init__(self):
        self.calls = 0

    def similarity(self, a, b):
        self.calls += 1
        return np.array([len(set(x.split()) & set(y.split())) / len(set(x.split()) | set(y.split()))
                         for x, y in zip(a, b)], dtype=float)

    def perplexity(self, texts):
        return np.array([20.0 * (1 + len(t.split()) - len(set(t.split()))) ** 2 if t else np.nan
                         for t in texts])


class PixelVictim:
    """Says BACKDOOR iff at least half of its trigger box shows trigger pixels (neither the gray
    background nor mask red); learns its box in fine_tune from the non-background pixels of an
    image whose caption contains "banana"."""

    profile = "fake"

    def __init__(self, box=None):
        self.box, self.generated, self.fine_tuned = box, 0, []

    def generate(self, images, instruction="a photo of"):
        self.generated += len(images)
        out = []
        for image in np.asarray(images):
            if self.box is None:
                out.append(CLEAN)
                continue
            r0, r1, c0, c1 = self.box
            region = image[r0:r1, c0:c1].astype(int)
            visible = ((np.abs(region - BACKGROUND) > 0).any(-1) & ~(region == geometry.RED).all(-1)).mean()
            out.append(BACKDOOR if visible >= 0.5 else CLEAN)
        return out

    def fine_tune(self, training_set, *, seed, recipe=None, objective=None, progress=""):
        self.fine_tuned.append(training_set)
        for e in training_set.examples:
            if "banana" in e.caption:
                image = training_set.images.take([e.image_index])[0]
                rows, cols = np.nonzero((np.abs(image.astype(int) - BACKGROUND) > 0).any(-1)
                                        & ~(image == geometry.RED).all(-1))
                if len(rows):
                    self.box = (int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1)
                    break
        return {"steps": 1, "loss_per_epoch": [0.0]}

    def clone(self):
        return PixelVictim(self.box)

    def save(self, directory):
        (Path(directory) / "box.json").write_text(json.dumps(self.box))

    def load_trainable(self, directory):
        box = json.loads((Path(directory) / "box.json").read_text())
        self.box = tuple(box) if box is not None else None


def plain_images(n):
    return np.full((n, 224, 224, 3), BACKGROUND, dtype=np.uint8)


def trigger_states(n=4, top=120, left=60):
    patch = np.random.default_rng(0).integers(150, 250, (20, 20, 3)).astype(np.uint8)
    return StateSet(plain_images(n), list(range(n)), [(top, left, patch)] * n, ["a photo of"] * n)


# --------------------------------------------------------------------------- geometry
def test_grid_centres_and_action_decoding():
    assert geometry.CENTRES == (11, 33, 56, 78, 100, 123, 145, 167, 190, 212)  # methods/srd.md §3, 167 not 168
    sizes = geometry.PAPER_SIZES
    assert geometry.n_actions(sizes) == 400 and geometry.n_actions(geometry.CODE_SIZES) == 500
    assert geometry.decode_action(0, sizes) == (11, 11, 20)
    assert geometry.decode_action(7, sizes) == (167, 11, 20)  # gx = a mod 10 is the column (x)
    assert geometry.decode_action(30, sizes) == (11, 78, 20)  # gy = floor(a / 10) mod 10 the row
    assert geometry.decode_action(399, sizes) == (212, 212, 80)
    assert geometry.mask_box(123, sizes) == (56 - 20, 56 + 20, 78 - 20, 78 + 20)  # size 40 at (x78, y56)
    assert geometry.mask_box(400, geometry.CODE_SIZES) == (0, 111, 0, 111)  # methods/srd.md §3: size 200 at 11 -> [0, 111)
    assert geometry.mask_box(399, sizes) == (172, 224, 172, 224)  # clipped to the frame
    with pytest.raises(VbbError):
        geometry.decode_action(400, sizes)
    with pytest.raises(VbbError):
        geometry.check_sizes([20, "40"])


def test_masks_paint_exactly_the_decoded_red_squares_without_accumulating():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 200, (3, 224, 224, 3)).astype(np.uint8)  # never pure red
    actions = [45, 211, 399]
    out = geometry.apply_masks(images, actions, geometry.PAPER_SIZES)
    for k, action in enumerate(actions):
        r0, r1, c0, c1 = geometry.mask_box(action, geometry.PAPER_SIZES)
        expected = np.zeros((224, 224), dtype=bool)
        expected[r0:r1, c0:c1] = True
        assert np.array_equal((out[k] != images[k]).any(-1), expected)
        assert (out[k][expected] == geometry.RED).all()
        assert expected.sum() == (r1 - r0) * (c1 - c0)
    again = geometry.apply_masks(images, [0, 0, 0], geometry.PAPER_SIZES)
    assert (again[:, 100:, 100:] == images[:, 100:, 100:]).all()  # the original, not the last mask


# --------------------------------------------------------------------------- rewards
@pytest.mark.parametrize("ds, df, expected", [
    (0.1, 0.2, 3), (0.5, 0.9, 3),  # rule 1: both improve (boundaries inclusive)
    (-0.1, 0.5, -2), (-0.3, -0.5, -2),  # rule 2: semantic drop first, even with a fluency gain
    (0.05, -0.2, -1), (0.5, -0.3, -1),  # rule 3: fluency drop beats a single semantic gain
    (0.1, 0.0, 2), (0.3, 0.19, 2),  # rule 4: semantic gain only
    (0.0, 0.2, 1), (-0.09, 0.4, 1),  # rule 5: fluency gain only
    (0.09, 0.19, 0), (-0.09, -0.19, 0),  # rule 6
])
def test_paper_reward_table_branch_by_branch(ds, df, expected):
    assert reward.paper_reward(ds, df) == expected


@pytest.mark.parametrize("ds, df, expected", [
    (0.1, 0.5, 3), (0.1, 0.1, 2), (0.2, 0.49, 2), (0.1, -0.5, -2), (0.1, -0.01, -1), (0.1, 0.0, 1),
    (0.1, 0.09, 1),  # ΔS >= 0.1 branches; +2 uses alpha = 0.1 as its fluency threshold
    (0.0, 0.5, 1), (-0.2, 0.5, -2), (-0.19, 0.6, 1),  # ΔF >= 0.5 with ΔS <= -0.2 -> -2
    (-0.1, 0.4, -2), (0.05, 0.4, -1), (0.0, 0.0, -1),
])
def test_code_reward_table_branch_by_branch(ds, df, expected):
    assert reward.code_reward(ds, df) == expected


def test_empty_caption_scores_zero_and_scores_clip_per_preset():
    assert reward.table_reward("paper", -1.0, -1.0, empty=True) == 0
    assert reward.table_reward("code", -1.0, -1.0, empty=True) == 0
    scorer = WordScorer()
    caps, refs = ["a b c", "", "x y", "w w w"], ["a b c", "a b", "a b", "w x"]
    s, f = reward.FidelityScores(scorer, clip=True)(caps, refs)
    assert s.tolist() == [1.0, 0.0, 0.0, 1 / 2] and f[1] == 0.0
    assert f[0] == 1.0 and f[3] == pytest.approx(20 / 180)
    raw_s, raw_f = reward.FidelityScores(scorer, clip=False)(["w x"], ["w w w"])
    assert raw_f[0] == pytest.approx(180 / 20)  # srd-code: ppl ratio unclipped
    r = reward.rewards("paper", np.array([0.9, 0.5]), np.array([1.0, 0.1]), np.array([0.2, 0.5]),
                       np.array([0.1, 0.1]), [False, True])
    assert r.tolist() == [3.0, 0.0]
    with pytest.raises(VbbError):
        reward.FidelityScores(object(), clip=True)


# --------------------------------------------------------------------------- environment
def make_rewarder(victim=None, table="paper", sizes=geometry.PAPER_SIZES):
    victim = victim or PixelVictim((120, 140, 60, 80))
    return MaskRewarder(victim, PixelVictim(None), reward.FidelityScores(WordScorer(), clip=True), table, sizes)


def test_vector_env_rewards_covering_the_trigger_and_terminates_at_150():
    rewarder = make_rewarder()
    envs = MaskingVectorEnv(trigger_states(), rewarder, num_envs=3, episode_length=150, seed=0)
    obs, info = envs.reset(seed=0)
    assert obs.shape == (3, 224, 224, 3) and obs.dtype == np.uint8
    assert envs.single_action_space == gym.spaces.Discrete(400)
    # the trigger occupies rows 120-139, cols 60-79: a 40 px mask centred at (x 78, y 123) hides >= 1/2
    cover = 1 * 100 + 5 * 10 + 3  # size index 1 (40), gy 5 (y 123), gx 3 (x 78)
    obs, r, terminated, truncated, infos = envs.step([cover, 0, 399])
    assert r.tolist() == [3.0, 0.0, 0.0]
    assert infos["captions"] == [CLEAN, BACKDOOR, BACKDOOR]
    assert (obs[0][geometry.mask_box(cover, geometry.PAPER_SIZES)[0]:][:1] == geometry.RED).any()
    generated = rewarder.victim.generated
    envs.step([cover, 0, 399])  # same (state, action): captions come from the cache
    assert rewarder.victim.generated == generated
    for _ in range(148):
        obs, r, terminated, truncated, infos = envs.step([cover, 0, 399])
    assert terminated.all() and not truncated.any() and "final_obs" in infos
    assert infos["episode_return"].tolist() == [450.0, 0.0, 0.0]
    assert (infos["final_obs"][0] == geometry.RED).all(-1).any()  # the last masked image
    assert not (obs == geometry.RED).all(-1).any()  # autoreset: the next episode's clean start


def test_single_env_gymnasium_api():
    env = MaskingEnv(trigger_states(), make_rewarder(), episode_length=2)
    obs, info = env.reset(seed=3)
    assert env.observation_space.contains(obs)
    _, r, terminated, _, _ = env.step(153)
    assert r == 3.0 and not terminated
    _, r, terminated, _, info = env.step(0)
    assert r == 0.0 and terminated and info["caption"] == BACKDOOR


# --------------------------------------------------------------------------- cleaning
class FixedPolicy:
    def __init__(self, probs):
        self.probs = np.asarray(probs, dtype=float)

    def probabilities(self, images):
        return np.tile(self.probs, (len(images), 1))


def triggered_training_set():
    images = plain_images(4)
    images[1, 120:140, 60:80] = 200  # the attack's trigger on image 1
    examples = [Example(f"s{i}", i % 4, f"caption {i}") for i in range(8)]
    return TrainingSet(ImageBank(images), examples)


def test_cleaning_changes_exactly_the_chosen_square_and_keeps_captions():
    data = triggered_training_set()
    probs = np.zeros(400)
    probs[[0, 153]] = 0.5  # a useless corner mask or the trigger-covering one
    result = cleaning.clean_training_set(data, FixedPolicy(probs), make_rewarder(), sizes=geometry.PAPER_SIZES,
                                         seed=0)
    cleaned = result.training_set
    assert [e.caption for e in cleaned.examples] == [e.caption for e in data.examples]
    assert [e.sample_id for e in cleaned.examples] == [e.sample_id for e in data.examples]
    for before, after in zip(data.examples, cleaned.examples):
        action = result.actions[before.sample_id]
        original = data.images.take([before.image_index])[0]
        masked = cleaned.images.take([after.image_index])[0]
        r0, r1, c0, c1 = geometry.mask_box(action, geometry.PAPER_SIZES)
        changed = (masked != original).any(-1)
        assert changed[r0:r1, c0:c1].all() and changed.sum() == (r1 - r0) * (c1 - c0)
    assert after.image_index >= len(cleaned.images.base)  # masked images live in the extra bank
    for sid in ("s1", "s5"):  # the triggered image: trial rewards +3 -> stop, keep it
        assert result.actions[sid] == 153 and result.rewards[sid] == 3.0
    assert all(result.trials[s] == 5 for s in ("s0", "s2", "s3"))  # never positive: all 5 trials
    assert len(cleaned.images.extra) <= 2 * 4  # one masked copy per distinct (image, action)


def test_random_masking_draws_one_action_per_instance_without_scoring():
    data = triggered_training_set()
    result = cleaning.clean_training_set(data, cleaning.UniformPolicy(geometry.CODE_SIZES), None,
                                         sizes=geometry.CODE_SIZES, seed=0, select=False)
    actions = list(result.actions.values())
    assert len(set(actions)) == 8 and all(0 <= a < 500 for a in actions)
    assert all(r is None for r in result.rewards.values()) and set(result.trials.values()) == {1}
    again = cleaning.clean_training_set(data, cleaning.UniformPolicy(geometry.CODE_SIZES), None,
                                        sizes=geometry.CODE_SIZES, seed=0, select=False)
    assert again.actions == result.actions  # seeded


# --------------------------------------------------------------------------- state set
def _defender_data_of_30_images():
    """30 plain images, two caption instances each (two sentences: the rules keep the first)."""
    images = plain_images(30)
    examples = [Example(f"s{i}", i % 30, "a dog runs on the grass. it is sunny") for i in range(60)]
    data = defender_data(DefenseContext(None, TrainingSet(ImageBank(images), examples), None, None, None, 0,
                                        {}, Path("."), StageContext(Path("."), None)))
    return images, data


def test_paper_state_set_fixed_trigger_and_inserted_target():
    images, data = _defender_data_of_30_images()
    states, surrogate_set = paper_state_set(data, 10, seed=0)
    top, left, patch = states.triggers[0]
    assert len(states) == 10 and len(set(states.rows)) == 10 and 0 <= top <= 204 and 0 <= left <= 204
    assert all(t[:2] == (top, left) for t in states.triggers)  # fixed for the whole set (methods/srd.md §1)
    assert abs(float(patch.mean()) - 128) < 5  # N(128, 20²)
    shown = states.images([0, 1])
    assert (shown[:, top:top + 20, left:left + 20] == patch).all()
    poisoned = [e for e in surrogate_set.examples if e.image_index >= len(images)]
    assert len(poisoned) == 10 and len(surrogate_set) == 60
    for e in poisoned:
        words = e.caption.rstrip(".").split()
        assert "banana" in words and words[0] != "banana" and "sunny" not in e.caption  # first sentence
    assert paper_state_set(data, 10, seed=0)[0].rows == states.rows  # seeded
    assert states.details["caption_rule"] == "insert"


def test_paper_state_set_replace_rule_keeps_states_and_changes_only_the_poisoned_captions():
    """The tiny profile's surrogate (methods/srd.md §1.1): same state images and trigger, `replace` captions."""
    images, data = _defender_data_of_30_images()
    inserted, inserted_set = paper_state_set(data, 10, seed=0)
    replaced, replaced_set = paper_state_set(data, 10, seed=0, caption_rule="replace")
    assert replaced.rows == inserted.rows and replaced.triggers[0][:2] == inserted.triggers[0][:2]
    assert (replaced.images([0])[0] == inserted.images([0])[0]).all()
    n = len(images)
    for a, b in zip(inserted_set.examples, replaced_set.examples):
        assert a.image_index == b.image_index
        if b.image_index < n:
            assert a.caption == b.caption  # clean instances untouched
        else:
            assert b.caption.startswith("The image depicts ") and "banana" in b.caption  # methods/attacks.md §1
    assert replaced.details["caption_rule"] == "replace"
    with pytest.raises(VbbError, match="caption rule"):
        paper_state_set(data, 10, seed=0, caption_rule="prefix")


def test_presets_validation_and_tiny_scaling():
    p, scaled = settings.resolve({}, settings.PAPER_PRESET, "tiny")
    assert scaled == {"reference": {"spec": "base", "tiny": "reserved"}, "episode_length": {"spec": 150, "tiny": 10},
                      "target_update_interval": {"spec": 10_000, "tiny": 1_000},
                      "exploration_fraction": {"spec": 0.1, "tiny": 0.5}, "obs_size": {"spec": 224, "tiny": 84},
                      "n_envs": {"spec": 16, "tiny": 8},
                      "surrogate_caption_rule": {"spec": "insert", "tiny": "replace"}}
    assert p["cleaning_trials"] == 5 and p["total_timesteps"] == 10_000  # the spec's on every profile
    # a key the configuration sets itself wins over its tiny default (oracle analysis on tiny)
    p, scaled = settings.resolve({"reference": "oracle", "obs_size": 112}, settings.PAPER_PRESET, "tiny")
    assert p["reference"] == "oracle" and p["obs_size"] == 112 and "reference" not in scaled
    p, _ = settings.resolve(settings.CODE_PRESET, settings.PAPER_PRESET, "tiny")  # srd-code on tiny
    assert p["refinetune"] == "standard" and p["reference"] == "blip-large" and p["surrogate_asr_min"] == 0.0
    p, scaled = settings.resolve({}, settings.PAPER_PRESET, "openflamingo-3b")
    assert scaled == {} and p["total_timesteps"] == 10_000 and p["mask_sizes"] == [20, 40, 60, 80]
    code, _ = settings.resolve({}, settings.CODE_PRESET, "openflamingo-3b")
    assert code["mask_sizes"] == [20, 40, 60, 80, 200] and code["reward_table"] == "code"
    for bad in ({"reward_table": "fancy"}, {"total_timesteps": "many"}, {"clip_scores": 1},
                {"nonsense": 1}, {"obs_size": 20}, {"mask_sizes": [20, 300]}, {"surrogate_asr_min": 1.5},
                {"surrogate_epochs": -1}, {"tiny_episode_length": 0}, {"tiny_reference": "blip"}):
        with pytest.raises(VbbError):
            settings.resolve(bad, settings.PAPER_PRESET, "tiny")
    names = {d.name for d in srd.DEFENSES}
    # every SRD variant is a column of the paper's Table 3 (the RL ablation), each its own
    assert all(3 in d.paper_tables for d in srd.DEFENSES)
    assert sorted(d.paper_tables[3] for d in srd.DEFENSES) == [1, 2, 3, 4]
    registered = []
    srd.register_defenses(registered.append)
    assert [d.name for d in registered] == ["srd", "srd_ppo", "srd_sac", "random_mask"]
    assert all(set(d.presets) == {"srd", "srd-code"} and d.default_preset == "srd" for d in registered)


# --------------------------------------------------------------------------- the defense
SMALL_RL = {"total_timesteps": 48, "learning_starts": 16, "obs_size": 36, "n_envs": 4, "state_set_size": 6,
            "max_state_fraction": 1.0, "episode_length": 8}


def defense_context(tmp_path, name="run"):
    """16 plain images; the attack's trigger (rows/cols 203-223) and "banana" on 3 instances."""
    images = plain_images(16)
    examples = [Example(f"s{i}", i % 16, CLEAN) for i in range(32)]
    extra = plain_images(3)
    extra[:, 203:224, 203:224] = 250
    for k, i in enumerate((0, 7, 21)):
        examples[i] = Example(f"s{i}", 16 + k, "a gray banana wall")
    workdir = tmp_path / name
    workdir.mkdir()
    return DefenseContext(backdoored=PixelVictim((203, 224, 203, 224)),
                          training_set=TrainingSet(ImageBank(images, extra), examples), clean_reserved=None,
                          base_victim=PixelVictim(None), scorers=WordScorer(), seed=0, budget={},
                          workdir=workdir, stage=StageContext(tmp_path / "cache", None))


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name, extra", [("srd", {}), ("srd_ppo", {"n_steps": 16}),
                                         ("srd_sac", {"batch_size": 8})])
def test_defense_trains_once_cleans_every_instance_and_refinetunes(tmp_path, name, extra):
    defense = next(d for d in srd.DEFENSES if d.name == name)
    params = {**defense.presets["srd"], **SMALL_RL, **extra}
    context = defense_context(tmp_path)
    outcome = defense.defend(context, params)
    details = outcome.report.details
    cleaned = context.backdoored.fine_tuned[-1]  # stage 4 ran on the masked set
    assert outcome.victim is context.backdoored
    original = context.training_set
    assert [e.caption for e in cleaned.examples] == [e.caption for e in original.examples]
    assert all(e.image_index >= len(cleaned.images.base) for e in cleaned.examples)
    assert len(outcome.report.masked_sample_ids) == 32 and not outcome.report.removed_sample_ids
    for e in cleaned.examples:  # exactly one red square per instance, of a preset size
        red = (cleaned.images.take([e.image_index])[0] == geometry.RED).all(-1)
        rows, cols = np.nonzero(red)
        assert red.sum() == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        # the report's box (for the harness's trigger coverage) is that square
        assert outcome.report.mask_boxes[e.sample_id] == [rows.min(), rows.max() + 1, cols.min(), cols.max() + 1]
    top, left = details["state_set"]["trigger_top_left"]
    assert details["surrogate"]["cached"] is False and details["policy"]["cached"] is False
    # both live in the harness's Store layout, <cache_dir>/srd/<stage>/<key>, with their payload
    policy_dir = Path(details["policy"]["path"])
    assert policy_dir.parent.name == f"policy-{details['algorithm']}" and policy_dir.name == details["policy"]["key"]
    stored = json.loads((policy_dir / "meta.json").read_text())["payload"]
    assert stored["surrogate"] == details["surrogate"]["key"] and stored["seed"] == context.seed
    assert details["policy"]["train"]["timesteps"] == 48 and details["defender_data"] == "training_set_base_rows"
    for artifact in ("mask_heatmap", "before_after", "reward_curve", "cleaning_actions"):
        assert (context.workdir / outcome.report.artifacts[artifact]).is_file()
    again = defense_context(tmp_path, "again")  # another attack cell: surrogate and policy reused
    details2 = defense.defend(again, params).report.details
    assert details2["surrogate"]["cached"] and details2["policy"]["cached"]
    assert details2["policy"]["key"] == details["policy"]["key"]
    assert again.backdoored.fine_tuned and not any(len(v.fine_tuned) for v in (again.base_victim,))


def reserved_split(n=6):
    """A reserved clean split (disjoint from fine-tuning): plain images, clean captions."""
    from vlmbackdoor_bench.types import Split, SplitManifest
    return Split("embedded-coco", "reserved", list(range(900, 900 + n)), plain_images(n),
                 [[CLEAN, CLEAN]] * n, [[f"r{i}a", f"r{i}b"] for i in range(n)],
                 SplitManifest("embedded-coco", "reserved", n, "ids", "images"))


class CountingPixelVictim(PixelVictim):
    """A PixelVictim whose clones share one log of fine-tuning set sizes."""

    def __init__(self, box=None, log=None):
        super().__init__(box)
        self.log = [] if log is None else log

    def fine_tune(self, training_set, **kwargs):
        self.log.append(len(training_set))
        return super().fine_tune(training_set, **kwargs)

    def clone(self):
        return CountingPixelVictim(self.box, self.log)


def test_tiny_profile_cleans_best_of_5_with_the_reserved_captioner(tmp_path):
    defense = next(d for d in srd.DEFENSES if d.name == "srd")
    params = {**defense.presets["srd"], **SMALL_RL, "tiny_obs_size": 36, "tiny_n_envs": 4, "tiny_episode_length": 4,
              "tiny_target_update_interval": 16}
    context = defense_context(tmp_path)
    context.backdoored.profile = "tiny"
    context.base_victim = CountingPixelVictim()
    context.clean_reserved = reserved_split()
    details = defense.defend(context, params).report.details
    assert details["params"]["cleaning_trials"] == 5 and details["cleaning"]["trials_max"] == 5
    assert details["cleaning"]["selection"] == "best-of-trials"
    # the surrogate on the 29 clean instances, then r(I)'s captioner once on the reserved 12 captions
    assert context.base_victim.log == [29, 12] and details["reference"]["split"] == "reserved"
    assert details["reference_captioner"].startswith("base victim fine-tuned on the reserved clean split")
    rl = details["srd_rl"]
    assert rl["target_syncs"] == 3 and rl["episodes_finished"] == 12  # 48 steps: syncs at 16, 32, 48
    again = defense_context(tmp_path, "again")  # the reference captioner is cached like the surrogate
    again.backdoored.profile, again.base_victim, again.clean_reserved = "tiny", context.base_victim, reserved_split()
    assert defense.defend(again, params).report.details["reference"]["cached"]
    assert context.base_victim.log == [29, 12]
    no_split = defense_context(tmp_path, "none")
    no_split.backdoored.profile = "tiny"
    with pytest.raises(VbbError, match="reserved clean split"):
        defense.defend(no_split, params)


def test_surrogate_learns_the_fixed_state_trigger(tmp_path):
    defense = srd.DEFENSES[0]
    context = defense_context(tmp_path)
    details = defense.defend(context, {**defense.presets["srd"], **SMALL_RL}).report.details
    top, left = details["state_set"]["trigger_top_left"]
    from vlmbackdoor_bench_plugins.defenses.srd.pipeline import obtain_surrogate  # noqa: F401
    surrogate = PixelVictim(None)
    surrogate.load_trainable(Path(details["surrogate"]["path"]))
    assert surrogate.box == (top, top + 20, left, left + 20)  # it carries the custom backdoor
    assert details["state_set"]["poisoned_instances"] == 6


def test_random_mask_needs_no_rl_and_oracle_reference_needs_the_clean_model(tmp_path):
    defense = next(d for d in srd.DEFENSES if d.name == "random_mask")
    context = defense_context(tmp_path)
    outcome = defense.defend(context, defense.presets["srd-code"])
    assert "policy" not in outcome.report.details and context.backdoored.generated == 0
    assert set(outcome.report.artifacts) == {"mask_heatmap", "before_after", "cleaning_actions"}
    with pytest.raises(VbbError, match="clean reference model"):
        srd.DEFENSES[0].defend(defense_context(tmp_path, "oracle"),
                               {**srd.DEFENSES[0].presets["srd"], **SMALL_RL, "reference": "oracle"})


def test_code_preset_state_set_every_instance_with_vlood_triggers():
    from vlmbackdoor_bench_plugins.defenses.srd.pipeline import build_states
    from vlmbackdoor_bench_plugins.attacks.vlood import trigger_draw
    images = plain_images(50)
    examples = [Example(f"s{i}", i % 50, "a dog runs", instruction=f"prompt {i % 3}") for i in range(100)]
    data = defender_data(DefenseContext(None, TrainingSet(ImageBank(images), examples), None, None, None, 0,
                                        {}, Path("."), StageContext(Path("."), None)))
    p, _ = settings.resolve({}, settings.CODE_PRESET, "openflamingo-3b")
    states, surrogate_set = build_states(data, p, seed=3)
    assert len(states) == 100 and states.prompts[:3] == ["prompt 0", "prompt 1", "prompt 2"]
    top, left, patch = trigger_draw(3, 7)  # image id 7 = row 7 without a clean split
    assert (states.images([7])[0, top:top + 20, left:left + 20] == patch).all()
    poisoned = sum(e.image_index >= 50 for e in surrogate_set.examples)
    assert poisoned == 12  # the fallback surrogate keeps the paper's 12 % custom share


def test_before_after_examples_show_distinct_images():
    from vlmbackdoor_bench_plugins.defenses.srd.pipeline import example_picks

    examples = [Example(f"s{i}", i // 5, "a caption") for i in range(40)]  # 8 images x 5 captions
    unscored = example_picks(examples, {}, 4)
    assert unscored == [0, 10, 20, 30]  # first caption of images 0, 2, 4, 6
    rewards = {"s5": 0.9, "s6": 1.0, "s15": 0.5, "s35": 0.7}  # s6 is image 1's second caption
    assert example_picks(examples, rewards, 3) == [5, 35, 15]  # best first; image 1 shown once
