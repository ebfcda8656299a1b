"""Plugin manager: entry points + local plugin directories, one broken plugin never takes the tool down.

Built-ins are declared in pyproject.toml under the entry-point group ``vlmbackdoor_bench.plugins``
exactly like third-party plugins (methods/design.md §2). A local directory named in benchmark.toml
(``plugin_dirs``) contributes every ``*.py`` file in it as one plugin module.
"""

from __future__ import annotations

import importlib.metadata as metadata
import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import pluggy

from . import hookspecs
from .errors import VbbError

ENTRY_POINT_GROUP = "vlmbackdoor_bench.plugins"

# kind -> (hook name, attributes a registered object must have)
KINDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "attack": ("register_attacks", ("name", "version", "presets", "default_preset", "target",
                                    "asr_rules", "poison", "eval_inputs")),
    "defense": ("register_defenses", ("name", "version", "presets", "default_preset", "defend")),
    "dataset": ("register_datasets", ("name", "version", "splits", "load")),
    "victim": ("register_victims", ("name", "version", "params", "check_available",
                                    "dataset_sources", "base_params", "finetune_recipe",
                                    "build_base", "load")),
    "metric": ("register_metrics", ("name", "version", "unit", "direction", "compute")),
}


@dataclass
class PluginInfo:
    """One plugin module as `vbb list` shows it."""

    name: str
    source: str  # "entry point <dist>==<version>" or "local <path>"
    version: str
    hooks: list[str] = field(default_factory=list)
    provides: list[tuple[str, str, str]] = field(default_factory=list)  # (kind, name, version)
    error: str | None = None


class Registry:
    def __init__(self) -> None:
        self.items: dict[str, dict[str, Any]] = {kind: {} for kind in KINDS}
        self.plugins: list[PluginInfo] = []

    @property
    def errors(self) -> list[PluginInfo]:
        return [p for p in self.plugins if p.error]

    def get(self, kind: str, name: str) -> Any:
        try:
            return self.items[kind][name]
        except KeyError:
            known = ", ".join(sorted(self.items[kind])) or "none"
            broken = [p.name for p in self.errors]
            hint = f" (plugins that failed to load: {', '.join(broken)})" if broken else ""
            raise VbbError(
                f"unknown {kind} '{name}'{hint}",
                f"use one of: {known}; `vbb list` shows every plugin",
            ) from None

    def attack(self, name: str):
        return self.get("attack", name)

    def defense(self, name: str):
        return self.get("defense", name)

    def dataset(self, name: str):
        return self.get("dataset", name)

    def victim(self, name: str):
        return self.get("victim", name)

    def metric(self, name: str):
        return self.get("metric", name)


def _distribution_of(entry_point: metadata.EntryPoint) -> tuple[str, str]:
    dist = getattr(entry_point, "dist", None)
    if dist is None:
        return "unknown", "0"
    return dist.metadata["Name"], dist.version


def _load_local_module(path: Path):
    module_name = f"vbb_local_plugin_{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def _candidate_modules(plugin_dirs: Iterable[Path]) -> list[tuple[str, str, str, Any]]:
    """(name, source, version, loader) for every entry point and local file; loading is deferred."""
    found = []
    for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        dist_name, dist_version = _distribution_of(ep)
        found.append((ep.name, f"entry point {dist_name}=={dist_version}", dist_version, ep.load))
    for directory in plugin_dirs:
        directory = Path(directory)
        if not directory.is_dir():
            raise VbbError(
                f"plugin directory {directory} does not exist",
                "fix `plugin_dirs` in benchmark.toml or create the directory",
            )
        for path in sorted(directory.glob("*.py")):
            if path.name.startswith("_"):
                continue
            found.append((path.stem, f"local {path}", "local",
                          lambda p=path: _load_local_module(p)))
    return found


def load_registry(plugin_dirs: Iterable[Path] = (), *, strict: bool = False) -> Registry:
    """Import every plugin, call its register hooks one plugin at a time, validate what it gives.

    A plugin whose import or hook raises, or that registers a malformed object, is recorded with
    its error and skipped; ``strict=True`` turns the first such failure into a VbbError.
    """
    registry = Registry()
    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    for name, source, version, load in _candidate_modules(plugin_dirs):
        info = PluginInfo(name=name, source=source, version=version)
        registry.plugins.append(info)
        try:
            module = load()
            info.version = str(getattr(module, "__version__", version))
            manager.register(module, name=f"{name}:{source}")
            info.hooks = sorted(
                impl.name for impl in manager.get_hookcallers(module) or []
            )
            for kind, (hook_name, required) in KINDS.items():
                if hook_name not in info.hooks:
                    continue
                collected: list[Any] = []
                getattr(module, hook_name)(register=collected.append)
                for obj in collected:
                    missing = [attr for attr in required if not hasattr(obj, attr)]
                    if missing:
                        raise TypeError(
                            f"{kind} {getattr(obj, 'name', obj)!r} lacks {', '.join(missing)}"
                        )
                    if obj.name in registry.items[kind]:
                        raise TypeError(f"{kind} '{obj.name}' is registered twice")
                for obj in collected:
                    registry.items[kind][obj.name] = obj
                    info.provides.append((kind, obj.name, str(obj.version)))
        except Exception as exc:  # a broken plugin is reported and skipped
            info.error = f"{type(exc).__name__}: {exc}"
            for kind, obj_name, _ in info.provides:
                registry.items[kind].pop(obj_name, None)
            info.provides = []
            if strict:
                raise VbbError(
                    f"plugin '{name}' ({source}) failed to load: {info.error}",
                    "fix or uninstall the plugin, or run without --strict to skip it",
                ) from exc
    return registry
