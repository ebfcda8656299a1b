"""Run the grid: shared stages once through the store, one result file per cell (methods/design.md §6).

world/data -> base victim -> poison(attack) -> backdoor(fine-tune) -> defend(defense)
-> captions(eval set, clean|triggered) -> scores. The clean reference model is one more shared
stage. A failing cell is recorded as failed and the grid goes on.
"""

from __future__ import annotations

import json
import time
import traceback
from collections import OrderedDict
from typing import Any, Callable

from .. import __version__
from ..config import BenchmarkConfig
from ..device import resolve_device, resolve_precision
from ..errors import VbbError
from ..hookspecs import StageContext
from ..leaderboard.results import budget_difference
from ..registry import Registry
from ..results_schema import CellResult
from ..types import Split
from .cells import CLEAN_MODEL, Cell, expand, resolve_params, validate_plugins
from .dag import plan
from .data_stages import DataStages
from .model_cache import LoadedModels
from .model_stages import ModelStages, checked_outcome
from .outcomes import RunSummary, error_message, failed_result, result_path
from .progress import GridProgress, recorded_seconds
from .record import budget_of, defense_findings, plugin_facts, provenance, stored_budget
from .scoring import EvaluationStages
from .store import Store, write_json_atomic

# What other modules import from here (the runner's helpers live in the modules above).
__all__ = ["GridRunner", "budget_of", "checked_outcome", "failed_result", "plugin_facts", "result_path"]


class GridRunner(DataStages, LoadedModels, ModelStages, EvaluationStages):
    """The grid of one config: its stages come from the mixins (data, loaded models, model
    stages, evaluation); here the cell that ties them into a record, and the run."""

    def __init__(self, config: BenchmarkConfig, registry: Registry,
                 log: Callable[[str], None] = print):
        self.config = config
        self.registry = registry
        self.log = log
        self.store = Store(config.store_dir, log=log)
        self.profile = registry.victim(config.profile)
        try:
            self.profile_params = self.profile.params(config.profile_params)
        except VbbError as error:  # the profile knows its keys, the config knows its file
            raise VbbError(f"{error.problem} (in {config.source or 'the built-in config'})",
                           error.fix) from None
        self.budget = budget_of(config, self.profile_params)
        self.context = self._stage_context()
        self._splits: dict[tuple[str, str], Split] = {}
        # Loaded models by store key, least recently used first. A profile may bound how many
        # derived models stay loaded (``max_loaded_models``: a 3B model's trainable copy is ~4 GB);
        # the base is never dropped, since every clone shares its frozen modules.
        self._victims: OrderedDict[str, Any] = OrderedDict()
        self._max_loaded = getattr(self.profile, "max_loaded_models", None)
        self._base_key: str | None = None
        self._scorer = None

    def _stage_context(self) -> StageContext:
        """The context every stage gets, with the resolved device and precision (a device this
        machine lacks fails here, before anything is built)."""
        device = resolve_device(self.config.device)
        return StageContext(cache_dir=self.config.cache_dir, config=self._data_config(), device=device,
                            precision=resolve_precision(device, self.config.eval_dtype, self.config.train_dtype))

    # ------------------------------------------------------------------ cells
    def run_cell(self, cell: Cell) -> dict:
        attack = self.registry.attack(cell.attack)
        attack_preset, attack_params = resolve_params("attack", attack, self.config.attack_params.get(cell.attack, {}))
        timings: dict[str, Any] = {}
        keys: dict[str, str] = {}
        artifacts: dict[str, str] = {}
        detection, diagnostics = None, {}
        defense_version, defense_preset = __version__, "default"
        if cell.defense == CLEAN_MODEL:
            victim, model_entry = self.clean_model(cell.seed)
            keys["clean_model"] = model_entry.key
            timings["clean_model"] = {"seconds": model_entry.meta["seconds"], "cached": model_entry.cached,
                                      **model_entry.meta.get("throughput", {})}
        else:
            defense = self.registry.defense(cell.defense)
            defense_preset, defense_params = resolve_params("defense", defense, self.config.defense_params.get(cell.defense, {}))
            defense_version = defense.version
            backdoored, backdoor_entry, poison_entry = self.backdoored(attack, attack_params, cell.seed)
            timings["poison"] = {"seconds": poison_entry.meta["seconds"], "cached": poison_entry.cached}
            timings["backdoor"] = {"seconds": backdoor_entry.meta["seconds"], "cached": backdoor_entry.cached,
                                   **backdoor_entry.meta.get("throughput", {})}
            victim, model_entry = self.defended(defense, defense_params, backdoored, backdoor_entry,
                                                poison_entry, cell.seed)
            timings["defend"] = {"seconds": model_entry.meta["seconds"], "cached": model_entry.cached}
            keys.update(poison=poison_entry.key, backdoor=backdoor_entry.key, defend=model_entry.key)
            detection, diagnostics, artifacts = defense_findings(model_entry, poison_entry)
        metrics, details, eval_keys = self.evaluate(victim, model_entry, cell, attack, attack_params, timings)
        keys.update(eval_keys)
        return CellResult(
            profile=cell.profile, dataset=cell.dataset,
            dataset_source=self.profile.dataset_sources()[cell.dataset],
            attack=cell.attack, attack_preset=attack_preset, attack_version=attack.version,
            attack_params=attack_params,
            defense=cell.defense, defense_preset=defense_preset, defense_version=defense_version,
            poison_rate=cell.poison_rate, seed=cell.seed, status="ok",
            metrics=metrics, metric_details=details, detection=detection,
            timings=timings, artifacts=artifacts, diagnostics=diagnostics,
            plugin_facts=plugin_facts(self.registry, cell.attack, cell.defense, metrics),
            provenance=provenance(cell, keys, victim, world_seed=self.config.world_seed,
                                  profile_params=self.profile_params, train=self.split("coco", "train"),
                                  test=self.split(cell.dataset, "test"), device=self.context.device),
        ).to_dict()

    def run(self, only: Callable[[Cell], bool] | None = None) -> RunSummary:
        """Every cell of the grid (those ``only`` accepts), in this process in order (executor
        "local") or as a DAG of stage tasks on a Ray cluster (executor "ray", grid.ray_executor)."""
        started = time.perf_counter()
        validate_plugins(self.config, self.registry)
        self.profile.check_available(self.profile_params)
        self.check_data()
        cells = [c for c in expand(self.config) if only is None or only(c)]
        stale = self.store.sweep_stale()
        if stale:
            self.log(f"store: removed {len(stale)} half-built entries of killed runs")
        if self.config.executor == "ray":
            from .ray_executor import run_on_ray  # Ray is imported only when it is chosen
            summary = run_on_ray(self, cells)
        else:
            summary = RunSummary()
            progress = GridProgress(plan(cells, self.registry.attack), 1, recorded_seconds(self.store.root))
            for cell in cells:
                progress.started(cell.cell_id)
                error = self.run_and_save(cell)
                progress.cell_finished_locally(cell.cell_id, error is None,
                                               json.loads(result_path(self.config, cell).read_text())["timings"])
                summary.record(cell, error)
            progress.close()
        summary.seconds = time.perf_counter() - started
        return summary

    def run_and_save(self, cell: Cell) -> str | None:
        """Run one cell and write its result file; returns None, or the error of a failed cell."""
        cell_started = time.perf_counter()
        error = None
        try:
            result = self.run_cell(cell)
        except KeyboardInterrupt:  # the user's Ctrl-C (and SIGTERM, cli.Terminated) stops the grid
            raise
        except BaseException as exc:  # one failing cell never stops the grid (methods/design.md §8),
            error = error_message(exc)  # not even a plugin's sys.exit()
            self.log(f"cell {cell.cell_id} FAILED: {error}")
            result = failed_result(cell, error, traceback.format_exc(limit=8))
        result["timings"] = {**result.get("timings", {}), "cell_wall": time.perf_counter() - cell_started}
        result["budget"] = self.budget
        path = result_path(self.config, cell)
        replaced = stored_budget(path)
        if replaced is not None and replaced["key"] != self.budget["key"]:
            self.log(f"{path.name}: replacing a result of another budget "
                     f"({budget_difference(replaced, self.budget)}); the board refuses mixed budgets")
        write_json_atomic(path, result)
        return error
