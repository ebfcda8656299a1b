"""The cell record's parts that the grid assembles (docs/CONTRACTS.md; the record itself is
:class:`vlmbackdoor_bench.results_schema.CellResult`): the plugins' facts, the budget, what a
defended model's store entry says about detection, and the provenance."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..config import BenchmarkConfig
from ..device import device_record, victim_precision
from ..diagnostics import defense_diagnostics
from ..registry import Registry
from ..results_schema import CLEAN_MODEL, attack_facts, defense_facts, metric_facts, stored_key
from ..types import Split
from . import persist
from .cells import Cell
from .outcomes import git_commit, versions
from .store import Entry, content_key


def plugin_facts(registry: Registry, attack: str, defense: str, metrics: dict) -> dict:
    """What the tables need to know about a cell's plugins (results_schema): the attack's and
    defense's labels and orders, and the label, order and direction of each number in
    ``metrics`` (split -> stored key -> value)."""
    facts: dict[str, Any] = {"attack": attack_facts(registry.attack(attack)), "metrics": {}}
    if defense != CLEAN_MODEL:
        facts["defense"] = defense_facts(registry.defense(defense))
    stored = {key for values in metrics.values() for key in values}
    for name, metric in registry.items["metric"].items():
        for rule in (getattr(metric, "asr_rules", ()) or [None]):
            if stored_key(name, rule) in stored:
                facts["metrics"][stored_key(name, rule)] = metric_facts(metric, rule)
    return facts


def budget_of(config: BenchmarkConfig, profile_params: dict) -> dict:
    """What a cell's numbers depend on beyond its coordinates: the profile with its resolved
    parameters (world sizes, training recipe) and the world seed; ``key`` is a short hash of it.
    Results of different keys never share a board (leaderboard.results.check_one_budget)."""
    params = {"profile": config.profile, "world_seed": config.world_seed, **profile_params}
    return {"key": content_key("budget", params)[:12], "params": params}


def stored_budget(path: Path) -> dict | None:
    """The budget of the result file at ``path``, or None (no file, or one without a budget)."""
    try:
        budget = json.loads(path.read_text()).get("budget")
    except (OSError, ValueError, AttributeError):
        return None
    return budget if isinstance(budget, dict) and "key" in budget else None


def defense_findings(model_entry: Entry, poison_entry: Entry) -> tuple[dict, dict, dict[str, str]]:
    """``(detection, diagnostics, artifacts)`` of a defended model: the precision/recall of what
    the defense flagged against the poison set (and, for a masking defense, its trigger
    coverage), the defense's diagnostics, and the stored paths of its artefacts."""
    report = json.loads((model_entry.path / "report.json").read_text())
    poisoned_ids = set(json.loads((poison_entry.path / "poisoned_ids.json").read_text()))
    detection = persist.detection(report, poisoned_ids)
    diagnostics = defense_diagnostics(report)
    coverage_file = model_entry.path / "trigger_coverage.json"
    if coverage_file.is_file():
        detection["trigger_coverage"] = json.loads(coverage_file.read_text())
    artifacts = {name: str(model_entry.path / "artifacts" / rel)
                 for name, rel in report.get("artifacts", {}).items()}
    return detection, diagnostics, artifacts


def provenance(cell: Cell, keys: dict[str, str], victim: Any, *, world_seed: int, profile_params: dict,
               train: Split, test: Split, device: Any) -> dict:
    """Where a cell's numbers come from: the store keys of its stages, code versions, seeds, the
    data's manifests, the decoding and the device and precision the victim ran at."""
    return {
        "cell_key": keys.get("defend") or keys.get("clean_model"), "stage_keys": keys,
        "versions": versions(), "git_commit": git_commit(),
        "seeds": {"poison": cell.seed, "train": cell.seed, "world": world_seed,
                  "base": profile_params.get("base_seed")},
        "manifests": {"train": train.manifest.to_dict(), "test": test.manifest.to_dict()},
        "decoding": victim.decoding.__dict__,
        "device": device_record(device), "precision": victim_precision(victim),
        "profile_params": profile_params,
    }
