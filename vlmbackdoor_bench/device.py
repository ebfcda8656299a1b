"""Where models run and at which precision: one resolver for the whole benchmark.

``[benchmark] device`` / ``vbb run --device`` name a torch device ("auto", "cpu", "cuda",
"cuda:N"); ``eval_dtype`` and ``train_dtype`` name the precisions. :func:`resolve_device` and
:func:`resolve_precision` turn them into what the grid hands every stage through
``StageContext.device`` and ``StageContext.precision``.

Plugins reach :func:`victim_device` and the payload helpers through
:mod:`vlmbackdoor_bench.plugin_api` (the public surface): a tensor a plugin creates to combine with
a victim's outputs belongs on :func:`victim_device` of that victim.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .errors import VbbError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N")  # as written in benchmark.toml / --device
EVAL_DTYPES = ("auto", "float32", "bfloat16", "float16")
TRAIN_DTYPES = ("auto", "float32", "bfloat16")
_DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_device_spec(spec: str) -> str:
    """``spec`` when it is one of "auto", "cpu", "cuda", "cuda:N"; else one VbbError. Only the
    spelling is checked here: whether this machine has that device is :func:`resolve_device`'s."""
    if not isinstance(spec, str) or not _DEVICE_PATTERN.match(spec):
        raise VbbError(f"device {spec!r} is not a device this benchmark knows",
                       'write device = "auto" (CUDA when present, else CPU), "cpu", "cuda" or '
                       '"cuda:N" (N = a GPU index), in [benchmark] or as vbb run --device')
    return spec


def check_dtype(key: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise VbbError(f"{key} = {value!r} is not one of {', '.join(choices)}",
                       f'write e.g. {key} = "auto" in [benchmark] (bfloat16 on CUDA, float32 on CPU)')
    return value


def cpu_device() -> torch.device:
    """The device a context names when nothing was resolved (tests, third-party callers)."""
    return torch.device("cpu")


def resolve_device(spec: str = "auto") -> torch.device:
    """The torch device ``spec`` names on this machine: "auto" is cuda:0 when CUDA is available,
    else the CPU. A device this machine lacks is one VbbError naming the fix."""
    check_device_spec(spec)
    if spec == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return cpu_device()
    if not torch.cuda.is_available():
        raise VbbError(f'device "{spec}" was asked for, but torch sees no CUDA GPU on this machine '
                       f"(torch {torch.__version__})",
                       'use device = "auto" or "cpu", or install a CUDA build of torch on a GPU machine')
    index = int(spec.split(":")[1]) if ":" in spec else 0
    count = torch.cuda.device_count()
    if index >= count:
        raise VbbError(f'device "{spec}" was asked for, but this machine has {count} CUDA GPU(s) '
                       f"(cuda:0 to cuda:{count - 1})",
                       f'use a GPU index below {count}, e.g. device = "cuda:0"')
    return torch.device("cuda", index)


@dataclass(frozen=True)
class Precision:
    """Dtypes of a run; the same keys as ``victim.precision`` (what results record).

    ``weights``: the master weights (always float32: training keeps fp32 masters);
    ``train_autocast``: the autocast dtype of fine-tuning, or None for plain float32;
    ``eval``: the dtype generation and caption NLL run in (methods/victim.md §A7)."""

    weights: str = "float32"
    train_autocast: str | None = None
    eval: str = "float32"

    def to_dict(self) -> dict[str, str | None]:
        return asdict(self)

    @property
    def train_torch_dtype(self) -> torch.dtype | None:
        return None if self.train_autocast is None else _TORCH_DTYPES[self.train_autocast]

    @property
    def eval_torch_dtype(self) -> torch.dtype:
        return _TORCH_DTYPES[self.eval]


# What every CPU run of the tiny profile has used since the start; store keys stay unchanged for it.
CPU_DEFAULT = Precision()


def resolve_precision(device: torch.device | str, eval_dtype: str = "auto",
                      train_dtype: str = "auto") -> Precision:
    """``auto`` is bfloat16 on CUDA and float32 on the CPU, for evaluation and training alike
    (methods/victim.md §A7, methods/metrics.md §2 dtype row); "float16" evaluation is the SRD code's
    ``.half()``. Training in float32 means no autocast."""
    check_dtype("eval_dtype", eval_dtype, EVAL_DTYPES)
    check_dtype("train_dtype", train_dtype, TRAIN_DTYPES)
    on_cuda = torch.device(device).type == "cuda"
    if eval_dtype == "auto":
        eval_dtype = "bfloat16" if on_cuda else "float32"
    if train_dtype == "auto":
        train_dtype = "bfloat16" if on_cuda else "float32"
    return Precision(train_autocast=None if train_dtype == "float32" else train_dtype, eval=eval_dtype)


def device_record(device: torch.device) -> dict[str, Any]:
    """What a result records about where it ran: the device string, and the GPU's name on CUDA."""
    record: dict[str, Any] = {"name": str(device)}
    if device.type == "cuda":
        record["gpu"] = torch.cuda.get_device_name(device)
    return record


def victim_device(victim: Any) -> torch.device:
    """The device ``victim`` computes on: its ``device`` attribute, else the device of its
    ``model``'s first parameter, else the CPU (a victim that keeps no torch model)."""
    device = getattr(victim, "device", None)
    if device is not None:
        return torch.device(device)
    model = getattr(victim, "model", None)
    if isinstance(model, torch.nn.Module):
        for parameter in model.parameters():
            return parameter.device
    return torch.device("cpu")


def victim_precision(victim: Any) -> dict[str, Any]:
    """``victim.precision`` when the victim reports it; for a third-party victim that does not,
    the dtype of its model's parameters as the weights and "unreported" for the rest."""
    reported = getattr(victim, "precision", None)
    if isinstance(reported, dict):
        return dict(reported)
    if hasattr(reported, "to_dict"):
        return reported.to_dict()
    model = getattr(victim, "model", None)
    weights = "unreported"
    if isinstance(model, torch.nn.Module):
        for parameter in model.parameters():
            weights = str(parameter.dtype).removeprefix("torch.")
            break
    return {"weights": weights, "train_autocast": "unreported", "eval": "unreported"}


def _payload(device: torch.device, precision: Precision, dtypes: tuple[str, ...]) -> dict[str, Any]:
    values = {name: getattr(precision, name) for name in ("weights",) + dtypes}
    if device.type == "cpu" and values == {name: getattr(CPU_DEFAULT, name) for name in values}:
        return {}
    return {"precision": {"device_type": device.type, **values}}


def training_payload(device: torch.device, precision: Precision) -> dict[str, Any]:
    """What a trained model's store payload adds for ``device`` and ``precision``: nothing on the
    CPU at float32 (so every existing store entry keeps its key), else ``{"precision": ...}`` with
    the device type (GPU kernels round differently from the CPU's; the index does not matter) and
    the training dtypes."""
    return _payload(device, precision, ("train_autocast",))


def evaluation_payload(device: torch.device, precision: Precision) -> dict[str, Any]:
    """The same for a stage that evaluates a model (captions): the evaluation dtype."""
    return _payload(device, precision, ("eval",))


def run_payload(device: torch.device, precision: Precision) -> dict[str, Any]:
    """The same for a stage that both trains and evaluates (SRD's policy: rewards from captions)."""
    return _payload(device, precision, ("train_autocast", "eval"))
