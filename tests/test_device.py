"""Device and precision: configuration, the resolver, what results record, and store keys.

No GPU here: the CUDA branches run with ``torch.cuda`` answers monkeypatched, and the GPU-only
store keys are computed from a context that names a CUDA device (computing a key runs nothing).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from vlmbackdoor_bench.cli import main as vbb
from vlmbackdoor_bench.config import load_config, parse_config
from vlmbackdoor_bench.device import (
    CPU_DEFAULT, Precision, device_record, evaluation_payload, resolve_device, resolve_precision,
    run_payload, training_payload, victim_device, victim_precision,
)
from vlmbackdoor_bench.errors import VbbError
from vlmbackdoor_bench.grid.cells import resolve_params
from vlmbackdoor_bench.grid.runner import GridRunner
from vlmbackdoor_bench.grid.store import Entry, content_key
from vlmbackdoor_bench.hookspecs import StageContext
from vlmbackdoor_bench.registry import load_registry
from vlmbackdoor_bench.types import EvalInputs

CPU = torch.device("cpu")
CUDA = torch.device("cuda", 0)


@pytest.fixture
def two_gpus(monkeypatch):
    """torch as it answers on a machine with two CUDA GPUs."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: f"Test GPU {torch.device(device).index}")


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


# --------------------------------------------------------------------------- configuration
def test_config_defaults_are_auto_and_the_keys_parse():
    config = parse_config({})
    assert (config.device, config.eval_dtype, config.train_dtype) == ("auto", "auto", "auto")
    config = parse_config({"benchmark": {"device": "cuda:1", "eval_dtype": "float16", "train_dtype": "float32"}})
    assert (config.device, config.eval_dtype, config.train_dtype) == ("cuda:1", "float16", "float32")


@pytest.mark.parametrize("key, value, named", [
    ("device", "gpu", "'gpu' is not a device"),
    ("device", "cuda:x", "'cuda:x' is not a device"),
    ("device", "CUDA", "'CUDA' is not a device"),
    ("eval_dtype", "fp16", "eval_dtype = 'fp16'"),
    ("train_dtype", "float16", "train_dtype = 'float16'"),  # training: fp32 or bf16 autocast only
    ("device", 0, "'device'"),
])
def test_bad_device_settings_are_one_clear_error(key, value, named):
    with pytest.raises(VbbError) as error:
        parse_config({"benchmark": {key: value}})
    assert named in error.value.problem and error.value.fix


def test_vbb_run_device_flag_is_checked_and_overrides_the_config(tmp_path, capsys, no_gpu):
    with pytest.raises(SystemExit) as exit_:
        vbb(["run", "--device", "gpu"])
    assert exit_.value.code == 2 and "'gpu' is not a device" in capsys.readouterr().err
    config = tmp_path / "benchmark.toml"
    config.write_text('[benchmark]\ndevice = "cpu"\ncache_dir = "cache"\n')
    # --device beats the file's "cpu"; this machine has no CUDA: one message, exit 2, nothing built
    assert vbb(["--config", str(config), "run", "--device", "cuda", "--no-report"]) == 2
    err = capsys.readouterr().err
    assert 'device "cuda" was asked for, but torch sees no CUDA GPU' in err and "Traceback" not in err
    assert not (tmp_path / "cache" / "store").exists()


# --------------------------------------------------------------------------- the resolver
def test_auto_is_the_cpu_without_cuda_and_cuda_is_refused(no_gpu):
    assert resolve_device("auto") == CPU and resolve_device("cpu") == CPU
    for spec in ("cuda", "cuda:0"):
        with pytest.raises(VbbError, match="no CUDA GPU") as error:
            resolve_device(spec)
        assert '"auto" or "cpu"' in error.value.fix


def test_cuda_branches_with_two_gpus(two_gpus):
    assert resolve_device("auto") == CUDA and resolve_device("cuda") == CUDA
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cpu") == CPU
    with pytest.raises(VbbError, match=r"has 2 CUDA GPU\(s\)") as error:
        resolve_device("cuda:2")
    assert "below 2" in error.value.fix
    assert device_record(torch.device("cuda", 1)) == {"name": "cuda:1", "gpu": "Test GPU 1"}
    assert device_record(CPU) == {"name": "cpu"}


def test_precision_defaults_per_device():
    assert resolve_precision(CPU) == CPU_DEFAULT == Precision("float32", None, "float32")
    assert resolve_precision(CPU).train_torch_dtype is None
    gpu = resolve_precision(CUDA)
    assert gpu.to_dict() == {"weights": "float32", "train_autocast": "bfloat16", "eval": "bfloat16"}
    assert (gpu.train_torch_dtype, gpu.eval_torch_dtype) == (torch.bfloat16, torch.bfloat16)
    # the SRD code's .half() at inference (methods/victim.md §A7); fp32 training = no autocast
    code = resolve_precision("cuda:1", eval_dtype="float16", train_dtype="float32")
    assert code.to_dict() == {"weights": "float32", "train_autocast": None, "eval": "float16"}
    assert code.eval_torch_dtype is torch.float16
    assert resolve_precision(CPU, "bfloat16", "bfloat16").to_dict() == \
        {"weights": "float32", "train_autocast": "bfloat16", "eval": "bfloat16"}
    with pytest.raises(VbbError, match="eval_dtype = 'half'"):
        resolve_precision(CPU, eval_dtype="half")


def test_stage_context_defaults_to_the_cpu_at_float32():
    context = StageContext(cache_dir=Path("."), config=None)
    assert context.device == CPU and context.precision == CPU_DEFAULT


# --------------------------------------------------------------------------- victims
class _Module(torch.nn.Module):
    def __init__(self, dtype=torch.float32, device="cpu"):
        super().__init__()
        self.layer = torch.nn.Linear(2, 2, dtype=dtype, device=device)


def test_victim_device_and_precision_with_and_without_the_attributes():
    reporting = SimpleNamespace(device=torch.device("meta"),
                                precision={"weights": "float32", "train_autocast": "bfloat16", "eval": "float16"})
    assert victim_device(reporting) == torch.device("meta")
    assert victim_precision(reporting) == reporting.precision
    assert victim_precision(SimpleNamespace(precision=resolve_precision(CUDA))) == resolve_precision(CUDA).to_dict()
    # a third-party victim that names neither: its model's parameters tell the device and weights
    third_party = SimpleNamespace(model=_Module(torch.bfloat16, "meta"))
    assert victim_device(third_party) == torch.device("meta")
    assert victim_precision(third_party) == {"weights": "bfloat16", "train_autocast": "unreported",
                                             "eval": "unreported"}
    assert victim_device(SimpleNamespace()) == CPU
    assert victim_precision(SimpleNamespace())["weights"] == "unreported"


# --------------------------------------------------------------------------- store keys
def test_payload_additions_only_off_the_cpu_fp32_default():
    assert training_payload(CPU, CPU_DEFAULT) == evaluation_payload(CPU, CPU_DEFAULT) == {}
    assert run_payload(CPU, CPU_DEFAULT) == {}
    gpu = resolve_precision(CUDA)
    assert training_payload(torch.device("cuda", 3), gpu) == training_payload(CUDA, gpu) == \
        {"precision": {"device_type": "cuda", "weights": "float32", "train_autocast": "bfloat16"}}
    assert evaluation_payload(CUDA, gpu) == \
        {"precision": {"device_type": "cuda", "weights": "float32", "eval": "bfloat16"}}
    # GPU kernels at float32 still round differently from the CPU's: keyed by the device type
    assert training_payload(CUDA, CPU_DEFAULT)["precision"]["device_type"] == "cuda"
    # a CPU run evaluating in bfloat16 keeps its models' keys, not its captions'
    cpu_bf16_eval = resolve_precision(CPU, eval_dtype="bfloat16")
    assert training_payload(CPU, cpu_bf16_eval) == {} and evaluation_payload(CPU, cpu_bf16_eval)
    assert run_payload(CPU, cpu_bf16_eval)["precision"]["eval"] == "bfloat16"


CONFIG = """
[benchmark]
profile = "tiny"
attacks = ["badnet"]
defenses = ["none"]
datasets = ["coco"]
cache_dir = "cache"

[profile.tiny]
world_train = 40
world_test = 6
world_pretrain = 60
world_flickr_test = 6
world_val = 0
world_flickr_val = 0
pretrain_epochs = 1
finetune_epochs = 1
"""

# Stage keys of the config above: those of the code before devices existed (commit a013f75's
# runner), recomputed once when world v3 changed every payload (WORLD_VERSION 3, the profile's new
# budgets; methods/victim.md §T1). A CPU fp32 run must keep finding those store entries.
KEYS_BEFORE_DEVICES = {
    "base": "43fd9edc539e10d4aae98762dcc21b0e32614e27e274cd10b0a0cb935dca24d1",
    "clean_model": "dea3e80322ef163a1339f9ab853bca167eeabdd2690c2d520112d67df3974d04",
    "poison": "c53ad07b445d2c281a35dcd6caa010956996a53a67573eb1921820f4748f05ce",
    "backdoor": "65ec35719bdb1a88817f16dea67920f5ae3190ebd2500403e47f0c060e9b936f",
    "defend": "6bc40d0e3dcb531eafc5fba122611b12f6b930e0035f9aef96a31c9326a68a4f",
    "sfs_reference": "f695afab10a3b6e42ef9a06925a9b627a0e5bf931c54009173e6d7b9d21547ff",
    "captions_triggered": "a1d10fc6518cc29768fa2f23ee231ec9d48d75c403269ef620b96328d613d779",
    "captions_clean": "5e59e5fce2dcee14a1a213f9d61c019e5c924307666a778bc172ecab89623961",
}
# The tiny victim's decoding settings (methods/metrics.md §2), as its captions payload records them.
TINY_DECODING = {"batch_size": 100, "length_penalty": 0.0, "max_new_tokens": 20, "min_new_tokens": 0,
                 "num_beams": 3}


class _Recorded:
    """A victim stand-in: the keys below need only its decoding settings (no model is built)."""

    decoding = SimpleNamespace(**TINY_DECODING)

    def clone(self):
        return _Recorded()

    def load_trainable(self, directory):
        pass


def stage_keys(runner: GridRunner, monkeypatch) -> tuple[dict[str, str], dict[str, dict]]:
    """The store keys and payloads of one badnet x none cell's stages, computed through the
    runner's own methods with the store answering every stage as built (nothing trains)."""
    payloads: dict[str, dict] = {}

    def as_built(stage, payload, build):
        key = content_key(stage, payload)
        payloads.setdefault(key, payload)
        return Entry(stage, key, Path("unused"), {"seconds": 0.0}, True)

    monkeypatch.setattr(runner.store, "get_or_build", as_built)
    monkeypatch.setattr(runner.profile, "load", lambda path, context: _Recorded())
    attack = runner.registry.attack("badnet")
    _, params = resolve_params("attack", attack, {})
    defense = runner.registry.defense("none")
    _, defense_params = resolve_params("defense", defense, {})
    keys = {"base": runner.base_victim()[1].key, "clean_model": runner.clean_model(0)[1].key}
    backdoored, backdoor, poison = runner.backdoored(attack, params, 0)
    defended, defend = runner.defended(defense, defense_params, backdoored, backdoor, poison, 0)
    keys.update(poison=poison.key, backdoor=backdoor.key, defend=defend.key)
    split = runner.split("coco", "test")
    clean_inputs = EvalInputs(list(split.image_ids), split.images, split.references)
    keys["sfs_reference"] = runner.captions(_Recorded(), Entry("clean_model", keys["clean_model"], Path("unused"), {}, True),
                                            clean_inputs).key
    for kind in ("triggered", "clean"):
        inputs = attack.eval_inputs(split, kind=kind, seed=0, params=params)
        keys[f"captions_{kind}"] = runner.captions(defended, defend, inputs).key
    return keys, payloads


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    root = tmp_path_factory.mktemp("device-keys")
    (root / "benchmark.toml").write_text(CONFIG)
    return load_config(root / "benchmark.toml")


def test_cpu_fp32_store_keys_are_the_ones_before_devices(tiny_config, monkeypatch):
    runner = GridRunner(tiny_config, load_registry([]), log=lambda m: None)
    assert runner.context.device == CPU and runner.context.precision == CPU_DEFAULT
    keys, payloads = stage_keys(runner, monkeypatch)
    assert keys == KEYS_BEFORE_DEVICES
    assert not any("precision" in p for p in payloads.values())


def test_other_devices_and_precisions_get_their_own_store_entries(tiny_config, monkeypatch):
    runner = GridRunner(tiny_config, load_registry([]), log=lambda m: None)
    runner.context = dataclasses.replace(runner.context, device=CUDA, precision=resolve_precision(CUDA))
    keys, payloads = stage_keys(runner, monkeypatch)
    assert all(keys[stage] != KEYS_BEFORE_DEVICES[stage] for stage in keys if stage != "poison")
    assert keys["poison"] == KEYS_BEFORE_DEVICES["poison"]  # the poisoned data set is device-free
    assert payloads[keys["base"]]["precision"] == {"device_type": "cuda", "weights": "float32",
                                                   "train_autocast": "bfloat16"}
    assert payloads[keys["captions_clean"]]["precision"]["eval"] == "bfloat16"
    # evaluating in bfloat16 on the CPU: the same models, captions of their own
    runner.context = dataclasses.replace(runner.context, device=CPU,
                                         precision=resolve_precision(CPU, eval_dtype="bfloat16"))
    keys, _ = stage_keys(runner, monkeypatch)
    for stage in ("base", "clean_model", "backdoor", "defend"):
        assert keys[stage] == KEYS_BEFORE_DEVICES[stage]
    for stage in ("sfs_reference", "captions_triggered", "captions_clean"):
        assert keys[stage] != KEYS_BEFORE_DEVICES[stage]


def test_the_grid_context_and_scorer_follow_the_configured_device(tiny_config, monkeypatch, two_gpus):
    gpu_config = dataclasses.replace(tiny_config, device="cuda:1", eval_dtype="float16")
    runner = GridRunner(gpu_config, load_registry([]), log=lambda m: None)
    assert runner.context.device == torch.device("cuda", 1)
    assert runner.context.precision.to_dict() == {"weights": "float32", "train_autocast": "bfloat16",
                                                  "eval": "float16"}
    scorer = runner.scorer()  # loads nothing until it scores
    assert scorer.device == "cuda:1" and scorer.cache_path.name.endswith("-cuda.sqlite")
    # "auto" is cuda:0 on this (patched) machine; "cpu" keeps the scorer and its cache on the CPU
    assert GridRunner(tiny_config, load_registry([]), log=lambda m: None).context.device == CUDA
    cpu_config = dataclasses.replace(tiny_config, device="cpu")
    cpu_scorer = GridRunner(cpu_config, load_registry([]), log=lambda m: None).scorer()
    assert cpu_scorer.device == "cpu" and cpu_scorer.cache_path.name.endswith("q4_1.sqlite")
