"""`vbb bench` at the openflamingo-mini sizes on the CPU, and the full-size configs without weights."""

from __future__ import annotations

import json
import math
import os
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from vlmbackdoor_bench.bench import BenchOptions, build_victim, check_options, measure_captions, \
    synthetic_captions  # noqa: E402
from vlmbackdoor_bench.cli import main  # noqa: E402
from vlmbackdoor_bench.errors import VbbError  # noqa: E402
from vlmbackdoor_bench.fixtures.openflamingo_configs import FULL, mini_sizes, write_config_parts  # noqa: E402
from vlmbackdoor_bench.fixtures.openflamingo_mini import MiniConfig  # noqa: E402
from vlmbackdoor_bench.victims.neox_tokenizer import load_openflamingo_tokenizer  # noqa: E402

from attack_helpers import one_thread  # noqa: E402,F401  (a fixture)

# A global batch of 4 in micro-batches of 2: every optimiser step accumulates two passes.
CONFIG = """
[benchmark]
profile = "openflamingo-3b"
[profile.openflamingo-3b]
finetune_batch_size = 4
finetune_micro_batch_size = 2
decoding_batch_size = 2
"""


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("bench")
    (root / "bench.toml").write_text(CONFIG)
    out = root / "out" / "bench.json"
    code = main(["--config", str(root / "bench.toml"), "bench", "--random-weights", "--size", "mini",
                 "--device", "cpu", "--images", "4", "--finetune-samples", "6", "--json", str(out)])
    assert code == 0
    return json.loads(out.read_text())


def _numbers(record, path=""):
    for key, value in record.items():
        if isinstance(value, dict):
            yield from _numbers(value, f"{path}{key}.")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield f"{path}{key}", value


def test_mini_bench_record(bench_run):
    r = bench_run
    assert r["profile"] == "openflamingo-3b" and r["weights"] == "random (mini size)"
    assert r["device"]["name"] == "cpu" and r["device"]["torch"] == torch.__version__
    assert r["precision"] == {"weights": "float32", "train_autocast": None, "eval": "float32"}
    for name, value in _numbers(r):
        assert math.isfinite(value) and value >= 0, name
    assert 0 < r["parameters"]["trainable"] < r["parameters"]["total"]

    c = r["captions"]  # methods/metrics.md §2 decoding, length forced
    assert (c["num_beams"], c["max_new_tokens"], c["min_new_tokens"], c["length_penalty"]) == (3, 20, 20, 0.0)
    assert c["new_tokens"] == {"min": 20, "max": 20, "captions": 4}  # counted on generate's output
    assert c["captions_returned"] == c["images"] == 4 and c["batch_size"] == 2
    assert c["captions_per_min"] == pytest.approx(60 * 4 / c["seconds"]) and c["seconds"] > 0
    assert "min_new_tokens forced" in c["note"]

    f = r["finetune"]  # 6 samples -> two whole global batches of 4, each two micro-batches of 2
    assert (f["samples"], f["steps"], f["global_batch"], f["micro_batch"], f["micro_batches_per_step"]) == \
        (8, 2, 4, 2, 2)
    assert f["samples_per_s"] == pytest.approx(8 / f["seconds"]) and f["final_loss"] > 0
    assert f["label_tokens_per_sample"] > 11  # 10 words + "." + <|endofchunk|> + EOS at least
    assert f["peak_memory_gib"] > 0.1  # the process's peak RSS: at least the interpreter and torch

    p = r["projections"]
    assert p["captions_6000_images_s"] == pytest.approx(6000 * 60 / c["captions_per_min"])
    assert p["finetune_25k_steps_s"] == pytest.approx(25015 / f["samples_per_s"])
    assert p["finetune_25k_samples_1_epoch_s"] == pytest.approx(
        p["finetune_25k_steps_s"] + p["finetune_5k_images_encoding_s"])


def test_local_files_bench_matches_random_mini(bench_run, tmp_path, one_thread):
    """Without --random-weights the victim comes from the config's local files (here the
    openflamingo-mini fixture in its real formats, checkpoint imported); the configs-only mini
    parts build exactly its architecture."""
    from vlmbackdoor_bench.fixtures.openflamingo_mini import write_openflamingo_mini
    paths = write_openflamingo_mini(tmp_path / "mini")
    keys = "\n".join(f'{key} = "{value}"' for key, value in paths.profile_params().items())
    (tmp_path / "local.toml").write_text(CONFIG + keys + "\n")
    out = tmp_path / "local.json"
    assert main(["--config", str(tmp_path / "local.toml"), "bench", "--device", "cpu", "--images", "2",
                 "--finetune-samples", "4", "--json", str(out)]) == 0
    local = json.loads(out.read_text())
    assert local["weights"] == "local files ([profile.openflamingo-3b])"
    assert local["parameters"] == bench_run["parameters"]
    assert local["captions"]["new_tokens"] == {"min": 20, "max": 20, "captions": 2}
    assert local["finetune"]["steps"] == 1 and local["finetune"]["samples"] == 4


def test_new_tokens_are_counted_on_the_output(tmp_path, one_thread):
    """The count follows the decoding actually run (here 3 new tokens), not a constant."""
    from dataclasses import replace
    victim, _, _ = build_victim("mini", {}, torch.device("cpu"), None, tmp_path)
    spec = replace(victim.decoding, max_new_tokens=3)
    victim.decoding = spec
    measured = measure_captions(victim, n_images=2, batch_size=2, seed=1)
    assert measured["new_tokens"] == {"min": 3, "max": 3, "captions": 2}
    assert victim.decoding == spec and "generate" not in vars(victim.model)  # both restored


def test_full_size_refused_on_cpu(tmp_path, capsys):
    code = main(["bench", "--random-weights", "--device", "cpu", "--json", str(tmp_path / "b.json")])
    err = capsys.readouterr().err
    assert code == 2 and "--size full on the CPU" in err and "--allow-cpu-full" in err
    assert not (tmp_path / "b.json").exists()
    cpu = torch.device("cpu")
    assert check_options(BenchOptions(random_weights=True, allow_cpu_full=True), cpu) == "full"
    assert check_options(BenchOptions(random_weights=True, size="mini"), cpu) == "mini"
    with pytest.raises(VbbError, match="add --random-weights"):
        check_options(BenchOptions(size="mini"), cpu)
    with pytest.raises(VbbError, match="measures the openflamingo-3b profile"):
        check_options(BenchOptions(profile="tiny", random_weights=True, size="mini"), cpu)


def test_local_weights_need_the_profile_files(tmp_path, capsys):
    code = main(["bench", "--device", "cpu"])  # no config: no local paths
    err = capsys.readouterr().err
    assert code == 2 and "clip_vit_l14_dir is not set" in err


def test_full_size_configs_build_openflamingo_3b_on_meta(tmp_path):
    """The configs-only parts at full size give OpenFlamingo-3B's shapes (methods/victim.md §A1),
    built on the meta device (no memory) through the victim's own assembly."""
    from vlmbackdoor_bench.victims.openflamingo import LocalParts, assemble
    parts = LocalParts.from_params(write_config_parts(tmp_path, FULL))
    model, tokenizer, tokens = assemble(parts, tokens_after_post_ln=False, device=torch.device("meta"),
                                        frozen_dtype=torch.bfloat16, random_weights=True)
    assert (tokens.base_length, tokens.eoc_id, tokens.length) == (50277, 50277, 50281)  # methods/victim.md §A4 ids
    assert (model.vis_dim, model.vision_encoder.num_tokens) == (1024, 256)
    lm = model.lang_encoder
    assert lm.get_input_embeddings().weight.shape == (50281, 2048) and len(lm.transformer.blocks) == 24
    assert len(lm.gated_cross_attn_layers) == 24  # cross-attention before every layer
    parameters = list(model.parameters())
    # pinned from this build (2.56 B total, 1.05 B trainable): any config change moves them
    assert sum(p.numel() for p in parameters) == 2_559_119_408
    assert sum(p.numel() for p in parameters if p.requires_grad) == 1_046_994_992
    words = synthetic_captions(1, seed=0)[0].split()[1:]  # after the first: GPT-NeoX-like, one token each
    assert len(tokenizer.tokenize(" " + " ".join(words))) == len(words) + 1  # and the final "."


def test_mini_configs_have_the_fixture_sizes(tmp_path):
    sizes = mini_sizes(MiniConfig())
    paths = write_config_parts(tmp_path, sizes)
    _, tokens = load_openflamingo_tokenizer(paths["tokenizer_dir"])
    assert tokens.base_length == MiniConfig().tokenizer_vocab
    assert sizes.lm_vocab % MiniConfig().lm_vocab_multiple == 0 and sizes.lm_vocab >= tokens.base_length
    mpt = json.loads((tmp_path / "mpt-1b" / "config.json").read_text())
    assert (mpt["d_model"], mpt["n_layers"], mpt["attn_qk_ln"], mpt["alibi"], mpt["no_bias"]) == \
        (MiniConfig().lm_width, MiniConfig().lm_layers, True, True, True)


def test_baseline_delta_rows(tmp_path):
    """scripts/baseline_delta.py (gpu_check.sh's comparison): the mean of the matching ok cells,
    its delta to the baseline and whether that is within the baseline's tolerance."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "scripts" / "baseline_delta.py"
    spec = importlib.util.spec_from_file_location("baseline_delta", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cell = {"status": "ok", "dataset": "coco", "attack": "badnet", "defense": "none"}
    records = [{**cell, "seed": 0, "metrics": {"clean": {"cider": 100.0}, "triggered": {"asr_srd": 90.0}}},
               {**cell, "seed": 1, "metrics": {"clean": {"cider": 104.0}}},
               {**cell, "status": "failed", "metrics": {"clean": {"cider": 0.0}}}]
    baseline = {"tolerances": {"cider": 5.0, "default": 3.0}, "values": [
        {**{k: cell[k] for k in ("dataset", "attack", "defense")}, "split": "clean", "metric": "cider", "value": 95.0},
        {**{k: cell[k] for k in ("dataset", "attack", "defense")}, "split": "triggered", "metric": "asr_srd",
         "value": 100.0},
        {"dataset": "flickr30k", "attack": "badnet", "defense": "none", "split": "clean", "metric": "cider",
         "value": 50.0}]}
    cider, asr, flickr = module.deltas(records, baseline)
    assert (cider["ours"], cider["delta"], cider["tolerance"], cider["within"]) == (102.0, 7.0, 5.0, False)
    assert (asr["ours"], asr["delta"], asr["tolerance"], asr["within"]) == (90.0, -10.0, 3.0, False)
    assert (flickr["ours"], flickr["delta"], flickr["within"]) == (None, None, False)
    records[1]["metrics"]["clean"]["cider"] = 90.0  # mean 95.0: on the baseline
    assert module.deltas(records, baseline)[0]["within"] is True


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the script runs its whole GPU check (minutes)")
def test_gpu_check_stops_without_cuda(tmp_path):
    """scripts/gpu_check.sh on a machine without CUDA: the environment is printed, then one
    clear stop (exit 3) before any model is built."""
    import subprocess
    from pathlib import Path
    script = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"
    # PYTHON: this interpreter (the script's default, python3 on the PATH, may be one without torch)
    done = subprocess.run(["bash", str(script)], env={**os.environ, "OUT": str(tmp_path / "out"),
                                                      "PYTHON": sys.executable},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, done.stdout + done.stderr
    env = (tmp_path / "out" / "env.txt").read_text()
    assert f"torch {torch.__version__}" in env and "CUDA available: False" in env
    assert "STOP: this torch sees no CUDA GPU" in env
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["env.txt"]
