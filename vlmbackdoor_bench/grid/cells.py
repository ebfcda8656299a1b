"""Cells of the grid and the resolution of plugin parameters (methods/design.md §6)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping, Sequence

from ..config import BenchmarkConfig
from ..errors import VbbError
from ..registry import Registry
from ..results_schema import CLEAN_MODEL

__all__ = ["CLEAN_MODEL", "Cell", "cell_selector", "expand", "resolve_params", "validate_plugins"]


@dataclass(frozen=True)
class Cell:
    profile: str
    dataset: str  # benchmark role: "coco" | "flickr30k"
    attack: str
    defense: str
    poison_rate: float
    seed: int

    @property
    def cell_id(self) -> str:
        return f"{self.dataset}__{self.attack}__{self.defense}__rate{self.poison_rate:g}__seed{self.seed}"

    @property
    def coordinates(self) -> tuple[str, str, str, float, int]:
        """What identifies the cell within its profile, in the order of the leaderboard's
        ``CellCoordinates`` (leaderboard.results.cell_coordinates reads it back from a result)."""
        return (self.dataset, self.attack, self.defense, self.poison_rate, self.seed)

    def to_dict(self) -> dict:
        return asdict(self)


def expand(config: BenchmarkConfig) -> list[Cell]:
    """Every attack x defense x dataset x seed, plus the clean-model rows per dataset x attack."""
    cells = [
        Cell(config.profile, dataset, attack, defense, config.poison_rate, seed)
        for seed in config.seeds for attack in config.attacks
        for defense in config.defenses for dataset in config.datasets
    ]
    cells += [
        Cell(config.profile, dataset, attack, CLEAN_MODEL, config.poison_rate, seed)
        for seed in config.seeds for attack in config.attacks for dataset in config.datasets
    ]
    return cells


def cell_selector(config: BenchmarkConfig, names: Sequence[str]) -> Callable[[Cell], bool]:
    """Which cells ``vbb run --cells NAME ...`` runs: those whose id, attack or defense is a NAME.
    A NAME that matches no cell of the grid is an error (a typo must not run nothing, quietly)."""
    cells = expand(config)
    known = {c.cell_id for c in cells} | {c.attack for c in cells} | {c.defense for c in cells}
    unknown = [name for name in names if name not in known]
    if unknown:
        examples = ", ".join(c.cell_id for c in cells[:4])
        raise VbbError(f"--cells names {unknown}, which match no cell of the grid",
                       f"name cell ids (e.g. {examples}), attacks ({', '.join(config.attacks)}) "
                       f"or defenses ({', '.join(config.defenses)})")
    wanted = set(names)
    return lambda cell: cell.cell_id in wanted or cell.attack in wanted or cell.defense in wanted


def resolve_params(kind: str, plugin: Any, overrides: Mapping[str, Any]) -> tuple[str, dict]:
    """Preset constants merged with [attack.<name>] / [defense.<name>] overrides.

    ``preset = "..."`` picks a named preset; every other key must be a constant of that preset.
    """
    overrides = dict(overrides)
    preset = overrides.pop("preset", plugin.default_preset)
    if preset not in plugin.presets:
        raise VbbError(
            f"{kind} '{plugin.name}' has no preset '{preset}'",
            f"use one of: {', '.join(plugin.presets)} in [{kind}.{plugin.name}] of benchmark.toml",
        )
    params = dict(plugin.presets[preset])
    unknown = set(overrides) - set(params)
    if unknown:
        raise VbbError(
            f"unknown parameter(s) {sorted(unknown)} for {kind} '{plugin.name}' (preset {preset})",
            f"valid parameters: {', '.join(sorted(params)) or 'none'}, and preset = one of "
            f"{', '.join(plugin.presets)}",
        )
    params.update(overrides)
    return preset, params


def validate_plugins(config: BenchmarkConfig, registry: Registry) -> None:
    """Fail before any computation when a name in benchmark.toml is unknown."""
    sources = registry.victim(config.profile).dataset_sources()
    unknown = [name for name in config.datasets if name not in sources]
    if unknown:
        raise VbbError(f"unknown dataset(s) {unknown} in datasets of {config.source or 'the config'}",
                       f"profile '{config.profile}' has the datasets: {', '.join(sources)}")
    for name in config.attacks:
        resolve_params("attack", registry.attack(name), config.attack_params.get(name, {}))
    for name in config.defenses:
        resolve_params("defense", registry.defense(name), config.defense_params.get(name, {}))
    for section, names, known in (("attack", config.attack_params, config.attacks),
                                  ("defense", config.defense_params, config.defenses)):
        stray = set(names) - set(known)
        for name in stray:  # a parameter table for a plugin not in the grid is still checked
            registry.get(section, name)
