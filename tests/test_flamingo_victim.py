"""The generic Flamingo victim (victims/flamingo_victim.py) on a small tiny victim: micro-batching
with gradient accumulation, clones that share frozen tensors, device/precision, token cache."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from vlmbackdoor_bench.device import Precision
from vlmbackdoor_bench.types import Example, ImageBank, TrainingSet
from vlmbackdoor_bench.victims.flamingo import trainable_state_dict
from vlmbackdoor_bench.victims.token_cache import TokenCache
from vlmbackdoor_bench.victims.training import Recipe

from attack_helpers import one_thread, scenes, tiny_victim  # noqa: F401  (one_thread is a fixture)

# captions of very different lengths: a token mean differs from a mean of micro-batch means
CAPTIONS = ["a red apple.", "a red apple on a table next to a red apple on a table.",
            "a table.", "an apple on a red table next to a table."]
NO_CLIP = 1e9  # the tests read raw accumulated gradients: no clipping rescales them


@pytest.fixture(scope="module")
def base():
    return tiny_victim()


def caption_set(n: int = 8) -> TrainingSet:
    return TrainingSet(ImageBank(scenes(4)), [Example(str(i), i % 4, CAPTIONS[i % 4]) for i in range(n)])


def gradients(victim) -> dict[str, torch.Tensor]:
    return {k: p.grad.clone() for k, p in victim.model.named_parameters() if p.grad is not None}


def one_step(base, data, objective=None, **recipe) -> tuple[dict, dict]:
    """(gradients of the only step, log): one epoch, one global batch, the LM's dropout off."""
    victim = base.clone()
    recipe = Recipe(epochs=1, batch_size=len(data.examples), lr=1e-3, grad_clip=NO_CLIP, lm_dropout=False, **recipe)
    log = victim.fine_tune(data, seed=0, recipe=recipe, objective=objective)
    return gradients(victim), log


def test_micro_batches_accumulate_the_global_token_mean(base, one_thread):
    data = caption_set()
    whole, log_whole = one_step(base, data)
    micro, log_micro = one_step(base, data, micro_batch_size=3)  # 3 + 3 + 2
    assert set(whole) == set(micro) and len(whole) > 10
    for name in whole:
        torch.testing.assert_close(micro[name], whole[name], rtol=1e-5, atol=1e-6, msg=name)
    assert log_micro["first_loss"] == pytest.approx(log_whole["first_loss"], rel=1e-6)
    assert log_micro["recipe"]["micro_batch_size"] == 3 and "micro_batch_size" not in log_whole["recipe"]

    # the reference: one teacher-forced pass over the whole set, loss = sum of token NLL / tokens
    reference = base.clone()
    tokens = reference.vision_features(data.images.take([e.image_index for e in data.examples]))
    reference.model.train()
    reference.model.lang_encoder.eval()
    reference.model.lang_encoder.gated_cross_attn_layers.train()
    fwd = reference.token_losses(None, [e.caption for e in data.examples], [e.instruction for e in data.examples],
                                 vision_tokens=tokens)
    token_mean = fwd.losses.sum() / fwd.mask.sum()
    token_mean.backward()
    assert log_whole["first_loss"] == pytest.approx(float(token_mean.detach()), rel=1e-6)
    expected = gradients(reference)
    for name in whole:
        torch.testing.assert_close(whole[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
    # a mean of per-micro-batch means would be another number here (the test could tell them apart)
    losses = fwd.losses.detach()
    per_row = losses.sum(1) / fwd.mask.sum(1)
    mean_of_means = torch.stack([losses[s:s + 3].sum() / fwd.mask[s:s + 3].sum() for s in (0, 3, 6)]).mean()
    assert abs(float(mean_of_means) - float(token_mean.detach())) > 1e-3 and float(per_row.std()) > 0


class CaptionLossObjective:
    """The plain loss through the objective hooks, recording what each TrainingStep held."""

    name, settings = "caption-loss", {}

    def __init__(self):
        self.seen: list[tuple[int, int]] = []  # (optimiser step index, rows)

    def loss(self, step):
        self.seen.append((step.index, len(step.examples)))
        return step.caption_loss

    def after_step(self, step):
        return {"rows": len(step.examples)}


def test_an_objective_sees_micro_batches_and_keeps_the_global_normaliser(base, one_thread):
    data = caption_set()
    whole, _ = one_step(base, data)
    objective = CaptionLossObjective()
    micro, log = one_step(base, data, objective=objective, micro_batch_size=3)
    assert objective.seen == [(0, 3), (0, 3), (0, 2)]  # one optimiser step, three micro-batches
    assert log["objective"]["steps"] == [{"rows": 2}]  # after_step gets the step's last micro-batch
    for name in whole:  # caption_loss weighted by its token share accumulates to the token mean
        torch.testing.assert_close(micro[name], whole[name], rtol=1e-5, atol=1e-6, msg=name)


def test_clones_share_frozen_tensors_and_train_apart(base, one_thread):
    clone = base.clone()
    original = dict(base.model.named_parameters())
    trainable = set(trainable_state_dict(base.model))
    shared = copied = 0
    for name, param in clone.model.named_parameters():
        if name in trainable or name == "lang_encoder.lm_head.weight":  # the head is tied to wte
            assert param.data_ptr() != original[name].data_ptr(), name
            copied += 1
        else:
            assert param.data_ptr() == original[name].data_ptr(), name
            shared += 1
    assert shared > 50 and copied > 10
    for a, b in zip(clone.model.buffers(), base.model.buffers()):
        assert a.data_ptr() == b.data_ptr()
    lm = clone.model.lang_encoder
    assert lm.get_output_embeddings().weight is lm.get_input_embeddings().weight  # the tie survives

    images = scenes(4)
    before = base.caption_nll(images, CAPTIONS)
    clone.fine_tune(caption_set(), seed=0, recipe=Recipe(epochs=2, batch_size=4, lr=1e-2))
    assert not np.allclose(clone.caption_nll(images, CAPTIONS), before)
    np.testing.assert_array_equal(base.caption_nll(images, CAPTIONS), before)  # the original is untouched


def test_a_clone_trains_to_the_weights_a_deep_copy_trains_to(base, one_thread):
    # sharing frozen tensors changes no number: the same fine-tuning of a full deep copy
    # (what clone() did before) ends at bit-identical trainable weights
    recipe = Recipe(epochs=1, batch_size=4, lr=1e-2)
    clone = base.clone()
    deep = base.clone()
    deep.model = copy.deepcopy(base.model)
    for victim in (clone, deep):
        victim.fine_tune(caption_set(), seed=5, recipe=recipe)
    for (name, a), (_, b) in zip(trainable_state_dict(clone.model).items(), trainable_state_dict(deep.model).items()):
        assert torch.equal(a, b), name


def test_device_and_precision_are_reported_and_applied(base, one_thread):
    assert base.device == torch.device("cpu")
    assert base.precision == {"weights": "float32", "train_autocast": None, "eval": "float32"}
    mixed = base.clone()
    mixed._precision = Precision(train_autocast="bfloat16", eval="bfloat16")
    assert mixed.precision == {"weights": "float32", "train_autocast": "bfloat16", "eval": "bfloat16"}
    images = scenes(4)
    exact, bf16 = base.caption_nll(images, CAPTIONS), mixed.caption_nll(images, CAPTIONS)
    assert bf16.dtype == np.float32 and not np.array_equal(exact, bf16)  # evaluated in bfloat16 ...
    np.testing.assert_allclose(bf16, exact, rtol=0.05)  # ... close to float32
    log = mixed.fine_tune(caption_set(4), seed=0, recipe=Recipe(epochs=1, batch_size=4, lr=1e-3))
    assert np.isfinite(log["first_loss"])
    assert all(p.dtype == torch.float32 for p in mixed.model.parameters())  # fp32 master weights


def test_recipe_keys_keep_their_old_form_at_the_new_defaults():
    assert set(Recipe().to_dict()) == {"epochs", "batch_size", "lr", "weight_decay", "warmup_fraction",
                                       "grad_clip", "betas", "eps"}
    changed = Recipe(micro_batch_size=25, activation_checkpointing=True, fused_adamw=False).to_dict()
    assert (changed["micro_batch_size"], changed["activation_checkpointing"], changed["fused_adamw"]) == (25, True, False)


def test_activation_checkpointing_gives_the_same_gradients(base, one_thread):
    data = caption_set(4)
    plain, _ = one_step(base, data)
    victim = base.clone()
    recipe = Recipe(epochs=1, batch_size=4, lr=1e-3, grad_clip=NO_CLIP, activation_checkpointing=True)
    victim.fine_tune(data, seed=0, recipe=recipe)  # the LM in train mode: its layers recompute
    assert not any(getattr(m, "gradient_checkpointing", False) for m in victim.model.modules())  # switched off after
    recomputed = gradients(victim)
    reference = base.clone()  # the same recipe without checkpointing (dropout on: same seed, same masks)
    reference.fine_tune(data, seed=0, recipe=Recipe(epochs=1, batch_size=4, lr=1e-3, grad_clip=NO_CLIP))
    for name, grad in gradients(reference).items():
        torch.testing.assert_close(recomputed[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    assert set(plain) == set(recomputed)


def test_token_cache_keeps_bfloat16_bits_on_disk_and_skips_transient_images(tmp_path):
    cache = TokenCache(directory=tmp_path, dtype=torch.bfloat16, max_bytes=3 * 4 * 8 * 2)  # three entries
    images = scenes(5)
    tokens = torch.randn(5, 4, 8)
    for image, t in zip(images[:4], tokens):
        kept = cache.put(TokenCache.key(image), t)
        assert kept.dtype == torch.bfloat16 and torch.equal(kept, t.to(torch.bfloat16))
    assert len(cache._tokens) == 3  # the oldest left memory ...
    fresh = TokenCache(directory=tmp_path, dtype=torch.bfloat16)
    assert torch.equal(fresh.get(TokenCache.key(images[0])), tokens[0].to(torch.bfloat16))  # ... not the disk
    with cache.transient():
        cache.put(TokenCache.key(images[4]), tokens[4])
    assert cache.get(TokenCache.key(images[4])) is not None  # in memory
    assert TokenCache(directory=tmp_path, dtype=torch.bfloat16).get(TokenCache.key(images[4])) is None
    assert len(list(tmp_path.rglob("*.npy"))) == 4


def test_one_off_images_stay_off_the_disk(base, tmp_path, one_thread):
    victim = base.clone()
    victim.token_cache = TokenCache(directory=tmp_path)
    images = scenes(3)
    victim.vision_features(images[:1])
    with victim.one_off_images():
        masked = victim.vision_features(images[1:])
    assert len(list(tmp_path.rglob("*.npy"))) == 1  # only the image outside the block
    assert torch.equal(victim.vision_features(images[1:]), masked)  # still served from memory


def test_vlood_trains_on_micro_batches_that_keep_its_pairs_together(base, one_thread):
    # VLOOD's group key puts an instance's clean and poisoned copies in one step; micro-batches
    # are cut between groups, so every micro-batch still has both kinds for its four losses
    from vlmbackdoor_bench_plugins.attacks.vlood import VloodObjective, pair_key

    images = scenes(4)
    examples = []
    for i in range(4):
        examples += [Example(f"s{i}#0", i, CAPTIONS[i]), Example(f"s{i}#1", i, "a banana. " + CAPTIONS[i])]
    poisoned = {f"s{i}#1" for i in range(4)}
    objective = VloodObjective(base, poisoned, ccp_form="argmax", ckp_masked=True)
    seen = []
    inner = objective.loss
    objective.loss = lambda step: (seen.append([e.sample_id for e in step.examples]), inner(step))[1]
    log = base.clone().fine_tune(TrainingSet(ImageBank(images), examples), seed=0, objective=objective,
                                 recipe=Recipe(epochs=1, batch_size=4, lr=1e-3, micro_batch_size=2))
    assert len(seen) == 2 and all(len(ids) == 4 for ids in seen)  # 2 pairs of copies per micro-batch
    for ids in seen:
        pairs = [pair_key(Example(s, 0, "")) for s in ids]
        assert all(pairs.count(p) == 2 for p in pairs) and sum(s in poisoned for s in ids) == 2
    steps = log["objective"]["steps"]
    assert len(steps) == 1 and all(np.isfinite(v) for v in steps[0].values())
