"""benchmark.toml -> a typed, validated configuration (methods/design.md §6).

Every mistake is reported as one VbbError naming the key and the fix; unknown keys are errors
(a typo must never silently fall back to a default).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .device import EVAL_DTYPES, TRAIN_DTYPES, check_device_spec, check_dtype
from .errors import VbbError
from .results_schema import NO_DEFENSE

DEFAULT_CONFIG_NAME = "benchmark.toml"
EXECUTORS = ("local", "ray")  # grid.runner.GridRunner.run; "ray" needs the [ray] extra


@dataclass
class BenchmarkConfig:
    profile: str = "tiny"
    attacks: list[str] = field(default_factory=lambda: ["badnet"])
    defenses: list[str] = field(default_factory=lambda: [NO_DEFENSE])
    datasets: list[str] = field(default_factory=lambda: ["coco", "flickr30k"])
    poison_rate: float = 0.1  # methods/attacks.md §1: the default rate is 10 %
    seeds: list[int] = field(default_factory=lambda: [0])
    cache_dir: Path = Path(".vbb-cache")
    plugin_dirs: list[Path] = field(default_factory=list)
    attack_params: dict[str, dict[str, Any]] = field(default_factory=dict)  # [attack.<name>]
    defense_params: dict[str, dict[str, Any]] = field(default_factory=dict)  # [defense.<name>]
    profile_params: dict[str, Any] = field(default_factory=dict)  # [profile.<name>] overrides
    data_paths: dict[str, Path] = field(default_factory=dict)  # [data] provider name -> root
    world_seed: int = 0
    # Where and at which precision models run (vlmbackdoor_bench.device): "auto" = CUDA when
    # present (bfloat16), else the CPU (float32).
    device: str = "auto"
    eval_dtype: str = "auto"
    train_dtype: str = "auto"
    # How the grid's stages are run: "local" (this process, in order) or "ray" (grid.ray_executor),
    # with the [executor] table: the Ray cluster's address ("" starts one on this machine), the
    # retries of a stage whose worker died, and resources per stage kind ({kind: {num_cpus, num_gpus}}).
    executor: str = "local"
    executor_address: str = ""
    max_retries: int = 3
    stage_resources: dict[str, dict[str, float]] = field(default_factory=dict)
    source: Path | None = None

    @property
    def results_dir(self) -> Path:
        return self.cache_dir / "results"

    @property
    def store_dir(self) -> Path:
        return self.cache_dir / "store"


_SCALARS = {
    "profile": str, "poison_rate": float, "cache_dir": str, "world_seed": int,
    "device": str, "eval_dtype": str, "train_dtype": str, "executor": str,
}
_LISTS = {"attacks": str, "defenses": str, "datasets": str, "seeds": int, "plugin_dirs": str}
_TABLES = {"attack", "defense", "profile", "data", "executor"}


def _type_error(key: str, expected: str, value: Any, path: Path | None) -> VbbError:
    where = f" in {path}" if path else ""
    return VbbError(
        f"benchmark key '{key}'{where} must be {expected}, got {value!r}",
        f"write e.g. {key} = {_EXAMPLES.get(key, '...')}",
    )


_EXAMPLES = {
    "profile": '"tiny"', "poison_rate": "0.1", "cache_dir": '".vbb-cache"', "world_seed": "0",
    "attacks": '["badnet"]', "defenses": '["none"]', "datasets": '["coco", "flickr30k"]',
    "seeds": "[0]", "plugin_dirs": '["my_plugins"]',
    "device": '"auto"', "eval_dtype": '"auto"', "train_dtype": '"auto"', "executor": '"local"',
}


def parse_config(raw: dict[str, Any], source: Path | None = None) -> BenchmarkConfig:
    base = source.parent if source else Path.cwd()
    section = raw.get("benchmark", {})
    unknown_top = set(raw) - {"benchmark"} - _TABLES
    if unknown_top:
        raise VbbError(
            f"unknown section(s) {sorted(unknown_top)} in {source or 'config'}",
            "valid sections: [benchmark], [attack.<name>], [defense.<name>], [profile.<name>], [data], "
            "[executor]",
        )
    unknown = set(section) - set(_SCALARS) - set(_LISTS)
    if unknown:
        raise VbbError(
            f"unknown key(s) {sorted(unknown)} in [benchmark] of {source or 'config'}",
            f"valid keys: {', '.join(sorted(set(_SCALARS) | set(_LISTS)))}",
        )
    cfg = BenchmarkConfig(source=source)
    for key, typ in _SCALARS.items():
        if key not in section:
            continue
        value = section[key]
        if typ is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, typ) or isinstance(value, bool):
            raise _type_error(key, typ.__name__, value, source)
        setattr(cfg, key, value)
    for key, typ in _LISTS.items():
        if key not in section:
            continue
        value = section[key]
        if not isinstance(value, list) or not all(
            isinstance(v, typ) and not isinstance(v, bool) for v in value
        ):
            raise _type_error(key, f"a list of {typ.__name__}", value, source)
        if not value and key in ("attacks", "defenses", "datasets", "seeds"):
            raise VbbError(f"'{key}' in {source or 'config'} is empty", f"name at least one, e.g. {key} = {_EXAMPLES[key]}")
        repeated = sorted({v for v in value if value.count(v) > 1})
        if repeated:  # a repeated seed or name would run the same cells twice
            raise VbbError(f"'{key}' in {source or 'config'} names {repeated} more than once",
                           f"list each once, e.g. {key} = {_EXAMPLES[key]}")
        setattr(cfg, key, list(value))
    if not 0.0 < cfg.poison_rate <= 1.0:
        raise VbbError(
            f"poison_rate must be in (0, 1], got {cfg.poison_rate}",
            "write a fraction, e.g. poison_rate = 0.1 for 10 %",
        )
    check_device_settings(cfg)
    parse_executor(cfg, raw.get("executor", {}), source)
    cfg.cache_dir = (base / cfg.cache_dir).resolve() if not Path(cfg.cache_dir).is_absolute() else Path(cfg.cache_dir)
    cfg.plugin_dirs = [(base / p).resolve() for p in cfg.plugin_dirs]
    for table, target in (("attack", cfg.attack_params), ("defense", cfg.defense_params)):
        entries = raw.get(table, {})
        if not isinstance(entries, dict) or not all(isinstance(v, dict) for v in entries.values()):
            raise VbbError(f"[{table}] must contain sub-tables like [{table}.<name>]",
                           f"write e.g. [{table}.badnet] followed by key = value lines")
        target.update({name: dict(values) for name, values in entries.items()})
    profiles = raw.get("profile", {})
    cfg.profile_params = dict(profiles.get(cfg.profile, {})) if isinstance(profiles, dict) else {}
    data = raw.get("data", {})
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise VbbError("[data] must map dataset provider names to directories",
                       'write e.g. [data]\n  coco-karpathy = "/data/coco"')
    cfg.data_paths = {name: (base / path).resolve() for name, path in data.items()}
    return cfg


def parse_executor(cfg: BenchmarkConfig, table: Any, source: Path | None) -> None:
    """[benchmark] executor and the [executor] table (address, max_retries, resources.<stage kind>);
    the stage kinds are checked by the Ray executor, which defines them (grid.dag.STAGE_KINDS)."""
    where = source or "config"
    if cfg.executor not in EXECUTORS:
        raise VbbError(f"executor {cfg.executor!r} in {where} is not one of {', '.join(EXECUTORS)}",
                       'write executor = "local" (this process) or executor = "ray"')
    if not isinstance(table, dict) or set(table) - {"address", "max_retries", "resources"}:
        raise VbbError(f"[executor] in {where} may hold only address, max_retries and "
                       "[executor.resources.<stage>]",
                       'write e.g. [executor]\n  address = "auto"\n  max_retries = 3')
    address, retries = table.get("address", ""), table.get("max_retries", cfg.max_retries)
    if not isinstance(address, str):
        raise _type_error("address", "a string", address, source)
    if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
        raise VbbError(f"[executor] max_retries in {where} must be a whole number >= 0, got {retries!r}",
                       "write e.g. max_retries = 3")
    resources = table.get("resources", {})
    for kind, amounts in (resources.items() if isinstance(resources, dict) else [(None, None)]):
        if not isinstance(amounts, dict) or set(amounts) - {"num_cpus", "num_gpus"} or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in amounts.values()):
            raise VbbError(f"[executor.resources.{kind}] in {where} must map num_cpus / num_gpus to numbers >= 0",
                           "write e.g. [executor.resources.backdoor]\n  num_gpus = 1\n  num_cpus = 4")
    cfg.executor_address, cfg.max_retries = address, retries
    cfg.stage_resources = {kind: {k: float(v) for k, v in amounts.items()} for kind, amounts in resources.items()}


def check_device_settings(cfg: BenchmarkConfig) -> None:
    """The spelling of device / eval_dtype / train_dtype (whether this machine has the device is
    checked when the grid starts, vlmbackdoor_bench.device.resolve_device)."""
    check_device_spec(cfg.device)
    check_dtype("eval_dtype", cfg.eval_dtype, EVAL_DTYPES)
    check_dtype("train_dtype", cfg.train_dtype, TRAIN_DTYPES)


def load_config(path: Path | None) -> BenchmarkConfig:
    """Read ``path`` (default ./benchmark.toml; built-in defaults when it does not exist)."""
    if path is None:
        path = Path(DEFAULT_CONFIG_NAME)
        if not path.exists():
            return parse_config({}, None)
    path = Path(path)
    if not path.exists():
        raise VbbError(f"config file {path} does not exist",
                       "pass an existing file with --config, or omit --config to use ./benchmark.toml")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise VbbError(f"{path} is not valid TOML: {exc}",
                       "fix the syntax at the position named above (strings need quotes, lists brackets)") from None
    return parse_config(raw, path)
