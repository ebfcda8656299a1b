"""grid.flops: the fine-tune's counted FLOPs, its achieved FLOP/s and the fp32 matmul peak."""

from __future__ import annotations

import time
from dataclasses import replace

import torch
from torch.utils.flop_counter import FlopCounterMode

from vlmbackdoor_bench.grid import persist
from vlmbackdoor_bench.grid.flops import PROBE_SIZE, fine_tune_throughput, matmul_peak

from attack_helpers import make_split, one_thread, tiny_victim  # noqa: F401 (fixture)


def test_the_matmul_peak_is_measured_once_per_thread_count():
    started = time.perf_counter()
    peak = matmul_peak()
    first = time.perf_counter() - started
    assert 1e8 < peak < 1e14  # a CPU core to a large GPU, fp32
    started = time.perf_counter()
    assert matmul_peak("cpu") == peak  # cached: no second probe
    assert time.perf_counter() - started < first / 10 + 1e-3
    # a product of the probe's size takes at least what the peak says
    a = torch.ones(PROBE_SIZE, PROBE_SIZE)
    started = time.perf_counter()
    a @ a
    assert time.perf_counter() - started >= 0.5 * 2 * PROBE_SIZE ** 3 / peak


def test_the_scaled_count_matches_counting_the_whole_fine_tune(one_thread):
    victim = tiny_victim()
    training_set = persist.clean_training_set(make_split(n_images=4, captions_per_image=4))  # 16 examples
    recipe = replace(victim.recipe, epochs=1, batch_size=8)
    victim.encode_bank(training_set)  # the frozen encoder's tokens, cached as in the grid: not counted
    counter = FlopCounterMode(display=False)
    with counter:  # the reference: every step of the real fine-tune counted
        log = victim.fine_tune(training_set, seed=0, recipe=recipe)
    exact = counter.get_total_flops()
    weights = {k: v.clone() for k, v in victim.model.state_dict().items()}
    rng = torch.get_rng_state()
    out = fine_tune_throughput(victim, training_set, recipe, log, seed=0)
    # one global batch of 8 counted, scaled by 16 examples x 1 epoch; the captions are of one length
    assert abs(out["flops"] - exact) <= 0.02 * exact and exact > 0
    assert out["flop_per_s"] == out["flops"] / log["seconds"]
    assert out["peak_flop_per_s"] == matmul_peak("cpu")
    assert "FlopCounterMode" in out["flops_method"]
    # the count ran on a clone and left the run's random state alone
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, weights[k]) for k, v in victim.model.state_dict().items())


def test_a_third_party_recipe_is_not_counted():
    """hookspecs.FinetuneRecipe promises only ``to_dict()``: such a recipe gets no FLOP figures
    (and no error) even when the victim reports its training seconds."""
    class OwnRecipe:
        def to_dict(self):
            return {"epochs": 1}

    class NeverCloned:
        def clone(self):
            raise AssertionError("a third-party recipe must not be counted")

    assert fine_tune_throughput(NeverCloned(), None, OwnRecipe(), {"seconds": 3.0}, seed=0) == {}
