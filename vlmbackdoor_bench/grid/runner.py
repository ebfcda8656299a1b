"""Run the grid: shared stages once through the store, one result file per cell (DESIGN.md §6).

world/data -> base victim -> poison(attack) -> backdoor(fine-tune) -> defend(defense)
-> captions(eval set, clean|triggered) -> scores. The clean reference model is one more shared
stage. A failing cell is recorded as failed and the grid goes on.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
import traceback
from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np

from .. import __version__
from ..config import BenchmarkConfig
from ..device import (device_record, evaluation_payload, resolve_device, resolve_precision,
                      training_payload, victim_precision)
from ..diagnostics import defense_diagnostics
from ..errors import VbbError
from ..hookspecs import FINE_TUNE_STARTS, OBJECTIVE_INPUTS, DefenseContext, DefenseOutcome, StageContext
from ..registry import Registry
from ..results_schema import CellResult, attack_facts, defense_facts, metric_facts, stored_key
from ..types import EvalInputs, Split, sha256_of_ids, sha256_of_images
from . import persist
from .cells import CLEAN_MODEL, Cell, expand, resolve_params, validate_plugins
from .dag import plan
from .flops import fine_tune_throughput
from .progress import GridProgress, recorded_seconds
from .outcomes import RunSummary, versions, error_message, failed_result, git_commit, result_path
from ..leaderboard.results import budget_difference
from .store import Entry, Store, content_key, write_json_atomic


class GridRunner:
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

    def _trained_here(self) -> dict:
        """What a model stage's payload adds for this run's device and precision ({} on CPU fp32)."""
        return training_payload(self.context.device, self.context.precision)

    def _data_config(self) -> SimpleNamespace:
        from ..data.world import WorldSizes
        p = self.profile_params
        sizes = WorldSizes(train=p["world_train"], test=p["world_test"],
                           pretrain=p["world_pretrain"], flickr_test=p["world_flickr_test"]) \
            if "world_train" in p else None
        return SimpleNamespace(world_seed=self.config.world_seed, world_sizes=sizes,
                               data_paths=self.config.data_paths)

    # ------------------------------------------------------------------ data
    def split(self, role: str, split: str) -> Split:
        key = (role, split)
        if key not in self._splits:
            source = self.profile.dataset_sources().get(role)
            if source is None:
                raise VbbError(f"profile '{self.profile.name}' has no dataset for role '{role}'",
                               f"use datasets from: {', '.join(self.profile.dataset_sources())}")
            self._splits[key] = self.registry.dataset(source).load(split, self.context)
        return self._splits[key]

    def reserved_clean_split(self) -> Split | None:
        """The COCO dataset's split disjoint from fine-tuning, the defenders' reserved clean set
        (hookspecs.DefenseContext): Karpathy ``restval`` or the embedded world's ``pretrain``."""
        provider = self.registry.dataset(self.profile.dataset_sources()["coco"])
        name = next((s for s in ("restval", "pretrain") if s in provider.splits), None)
        return None if name is None else self.split("coco", name)

    # ------------------------------------------------------------------ model stages
    def base_victim(self) -> tuple[Any, Entry]:
        train = self.split("coco", "train")
        provider = self.registry.dataset(self.profile.dataset_sources()["coco"])
        pretrain = self.split("coco", "pretrain") if "pretrain" in provider.splits else None
        payload = {"profile": self.profile.name, "version": self.profile.version,
                   "params": self.profile.base_params(self.profile_params),
                   "manifests": [s.manifest.to_dict() for s in (pretrain, train) if s is not None],
                   **self._trained_here()}

        def build(tmp: Path) -> dict:
            victim, log = self.profile.build_base(self.context, self.profile_params, pretrain, train)
            victim.save_full(tmp)
            return {"log": log}

        entry = self.store.get_or_build("base", payload, build)
        if entry.key not in self._victims:
            self._victims[entry.key] = self.profile.load(entry.path, self.context)
        self._base_key = entry.key
        return self._victims[entry.key], entry

    def derived_victim(self, stage: str, payload: dict, train_fn: Callable[[Path], dict]) -> tuple[Any, Entry]:
        """A model = base + trainable weights saved by ``train_fn`` (cached in memory too)."""
        entry = self.store.get_or_build(stage, payload, train_fn)
        if entry.key not in self._victims:
            base, _ = self.base_victim()
            victim = base.clone()
            victim.load_trainable(entry.path)
            self._victims[entry.key] = victim
            self._drop_least_recent_models()
        self._victims.move_to_end(entry.key)
        return self._victims[entry.key], entry

    def _drop_least_recent_models(self) -> None:
        """Forget the least recently used derived models beyond the profile's bound (they reload
        from the store when needed again)."""
        if self._max_loaded is None:
            return
        derived = [key for key in self._victims if key != self._base_key]
        for key in derived[:max(0, len(derived) - self._max_loaded)]:
            del self._victims[key]

    def clean_model(self, seed: int) -> tuple[Any, Entry]:
        """The clean reference model: base fine-tuned on the unpoisoned set (DESIGN.md §6)."""
        base, base_entry = self.base_victim()
        train = self.split("coco", "train")
        recipe = self.profile.finetune_recipe(self.profile_params)
        payload = {"base": base_entry.key, "train": train.manifest.to_dict(),
                   "recipe": recipe.to_dict(), "seed": seed, **self._trained_here()}

        def build(tmp: Path) -> dict:
            victim = base.clone()
            log = victim.fine_tune(persist.clean_training_set(train), seed=seed, recipe=recipe,
                                   progress="clean model")
            victim.lineage = {"stage": "clean_model", "base": base_entry.key}
            victim.save(tmp)
            return {"log": log, "throughput": fine_tune_throughput(victim, persist.clean_training_set(train),
                                                                   recipe, log, seed)}

        return self.derived_victim("clean_model", payload, build)

    def poisoned_set(self, attack, params: dict, seed: int) -> Entry:
        train = self.split("coco", "train")
        payload = {"attack": attack.name, "version": attack.version, "params": params,
                   "poison_rate": self.config.poison_rate, "seed": seed,
                   "train": train.manifest.to_dict()}

        def build(tmp: Path) -> dict:
            poisoned = attack.poison(train, poison_rate=self.config.poison_rate, seed=seed,
                                     params=params, victim=self.base_victim()[0])
            persist.save_poisoned(poisoned, tmp)
            return {"n_poisoned": len(poisoned.records), "n_instances": len(poisoned.training_set)}

        return self.store.get_or_build("poison", payload, build)

    def poison_details(self, attack, params: dict, seed: int) -> dict:
        """``{"poison_details": ...}`` for attacks whose test trigger is made while poisoning."""
        if not getattr(attack, "eval_uses_poison", False):
            return {}
        entry = self.poisoned_set(attack, params, seed)
        return {"poison_details": json.loads((entry.path / "details.json").read_text())}

    def backdoored(self, attack, params: dict, seed: int) -> tuple[Any, Entry, Entry]:
        """Fine-tune on the poisoned set with the attack's optional objective, from the base model
        or, for ``fine_tune_from = "clean_model"``, from the clean reference model (hookspecs.Attack)."""
        base, base_entry = self.base_victim()
        poison_entry = self.poisoned_set(attack, params, seed)
        recipe = self.profile.finetune_recipe(self.profile_params)
        start_from = getattr(attack, "fine_tune_from", "base")
        wanted = tuple(getattr(attack, "objective_inputs", ()))
        if start_from not in FINE_TUNE_STARTS or not set(wanted) <= set(OBJECTIVE_INPUTS):
            raise VbbError(f"attack '{attack.name}' asks for fine_tune_from={start_from!r}, "
                           f"objective_inputs={wanted!r}",
                           f"use fine_tune_from in {FINE_TUNE_STARTS} and objective_inputs from "
                           f"{OBJECTIVE_INPUTS}")
        payload = {"base": base_entry.key, "poison": poison_entry.key, "recipe": recipe.to_dict(),
                   "seed": seed, **self._trained_here()}
        start = base
        if start_from == "clean_model":
            start, start_entry = self.clean_model(seed)
            payload["start"] = start_entry.key

        def build(tmp: Path) -> dict:
            poisoned = persist.load_poisoned(poison_entry.path, self.split("coco", "train"))
            victim = start.clone()
            make_objective = getattr(attack, "training_objective", None)
            inputs = {"poisoned_set": poisoned, "start_model": start}
            objective = make_objective(params, **{k: inputs[k] for k in wanted}) if make_objective else None
            log = victim.fine_tune(poisoned.training_set, seed=seed, objective=objective, recipe=recipe,
                                   progress=f"backdoor {attack.name}")
            victim.lineage = {"stage": "backdoor", "base": base_entry.key, "poison": poison_entry.key,
                              **({"start": payload["start"]} if "start" in payload else {})}
            victim.save(tmp)
            return {"log": log, "throughput": fine_tune_throughput(victim, poisoned.training_set, recipe, log, seed)}

        victim, entry = self.derived_victim("backdoor", payload, build)
        return victim, entry, poison_entry

    def defense_context(self, backdoored, training_set, seed: int, workdir: Path) -> DefenseContext:
        """What a defender gets (DESIGN.md §3): never the poison labels."""
        source = self.profile.dataset_sources()["coco"]
        return DefenseContext(
            backdoored=backdoored, training_set=training_set,
            clean_reserved=self.reserved_clean_split(), base_victim=self.base_victim()[0],
            scorers=self.scorer(), seed=seed, budget=dict(self.profile_params), workdir=workdir,
            stage=self.context, dataset_source=source,
            recipe=self.profile.finetune_recipe(self.profile_params),
            lexicon=getattr(self.registry.dataset(source), "lexicon", None),
            # Documented simplifications a defense may use (hookspecs.DefenseContext.extras).
            extras={"clean_split": self.split("coco", "train"),
                    "clean_model": self.clean_model(seed)[0]},
        )

    def defended(self, defense, params: dict, backdoored, backdoor_entry: Entry,
                 poison_entry: Entry, seed: int) -> tuple[Any, Entry]:
        payload = {"defense": defense.name, "version": defense.version, "params": params,
                   "backdoor": backdoor_entry.key, "seed": seed, **self._trained_here()}
        # Built (or loaded) outside the defend stage's timer: every cell's evaluation needs it
        # anyway, so the first defended cell must not be charged for training it.
        self.clean_model(seed)

        def build(tmp: Path) -> dict:
            poisoned = persist.load_poisoned(poison_entry.path, self.split("coco", "train"))
            context = self.defense_context(backdoored.clone(), poisoned.training_set, seed, tmp / "artifacts")
            context.workdir.mkdir()
            # The images a defense encodes here (masked or relabelled copies) serve no later
            # stage: their encoder tokens stay out of the token cache's disk tier.
            one_off = getattr(backdoored, "one_off_images", None)
            with one_off() if one_off is not None else contextlib.nullcontext():
                outcome = checked_outcome(defense.name, defense.defend(context, params))
            outcome.victim.lineage = {"stage": "defend", "backdoor": backdoor_entry.key,
                                      "defense": defense.name}
            outcome.victim.save(tmp)
            write_json_atomic(tmp / "report.json", persist.report_to_dict(outcome.report))
            if outcome.report.mask_boxes:  # once per defended model, with the ground truth at hand
                write_json_atomic(tmp / "trigger_coverage.json", persist.trigger_coverage(
                    outcome.report.mask_boxes, poisoned, self.split("coco", "train")))
            return {}

        return self.derived_victim("defend", payload, build)

    # ------------------------------------------------------------------ evaluation stages
    def captions(self, victim, model_entry: Entry, inputs: EvalInputs) -> Entry:
        payload = {"model": [model_entry.stage, model_entry.key],
                   "ids": sha256_of_ids(inputs.image_ids), "images": sha256_of_images(inputs.images),
                   "instruction": inputs.instruction, "decoding": victim.decoding.__dict__,
                   **evaluation_payload(self.context.device, self.context.precision)}

        def build(tmp: Path) -> dict:
            started = time.perf_counter()
            captions = victim.generate(np.asarray(inputs.images), inputs.instruction)
            write_json_atomic(tmp / "captions.json",
                              {str(i): c for i, c in zip(inputs.image_ids, captions)})
            return {"n": len(captions), "images_per_second": len(captions) / (time.perf_counter() - started)}

        return self.store.get_or_build("captions", payload, build)

    def scorer(self):
        if self._scorer is None:
            from ..metrics.sfs import default_scorer
            self._scorer = default_scorer(self.config.cache_dir / "scorer-cache",
                                          device=str(self.context.device))
        return self._scorer

    def scores(self, captions_entry: Entry, reference_entry: Entry, inputs: EvalInputs,
               rules: list[str], target: str) -> Entry:
        """Every registered metric on one caption set; ASR once per rule (spec/metrics.md §4.4)."""
        from ..hookspecs import MetricRequest
        from ..metrics.score import compute_metrics

        metrics = dict(sorted(self.registry.items["metric"].items()))
        payload = {"captions": captions_entry.key, "sfs_reference": reference_entry.key,
                   "references": hashlib.sha256(json.dumps(inputs.references).encode()).hexdigest(), "rules": rules,
                   "target": target, "scorer": self.scorer().identity,
                   "metrics": {name: m.version for name, m in metrics.items()}}

        def build(tmp: Path) -> dict:
            captions = persist.read_captions(captions_entry.path)
            clean_refs = persist.read_captions(reference_entry.path)
            request = MetricRequest(captions=captions, references=dict(zip(inputs.image_ids, inputs.references)),
                                    target=target, clean_captions={i: clean_refs[i] for i in captions},
                                    scorers=self.scorer())
            values, details = compute_metrics(metrics, request, rules)
            details = {"n_images": len(captions), **details}
            write_json_atomic(tmp / "scores.json", {"metrics": values, "details": details})
            return {}

        return self.store.get_or_build("scores", payload, build)

    def reference_captions(self, dataset: str, seed: int) -> Entry:
        """The clean model's captions of ``dataset``'s test images, the SFS reference (spec/metrics.md §5.1)."""
        split = self.split(dataset, "test")
        clean_victim, clean_entry = self.clean_model(seed)
        inputs = EvalInputs(list(split.image_ids), split.images, split.references)
        return self.captions(clean_victim, clean_entry, inputs)

    def evaluate(self, victim, model_entry: Entry, cell: Cell, attack, attack_params: dict,
                 timings: dict) -> tuple[dict, dict, dict]:
        split = self.split(cell.dataset, "test")
        reference = self.reference_captions(cell.dataset, cell.seed)
        metrics, details, keys = {}, {}, {}
        for kind, rules in (("triggered", list(attack.asr_rules)), ("clean", ["strict"])):
            started = time.perf_counter()
            inputs = attack.eval_inputs(split, kind=kind, seed=cell.seed, params=attack_params,
                                        **self.poison_details(attack, attack_params, cell.seed))
            captions = self.captions(victim, model_entry, inputs)
            timings[f"captions_{kind}"] = {"seconds": captions.meta["seconds"], "cached": captions.cached}
            scored = self.scores(captions, reference, inputs, rules, attack.target)
            timings[f"scores_{kind}"] = {"seconds": scored.meta["seconds"], "cached": scored.cached}
            data = json.loads((scored.path / "scores.json").read_text())
            metrics[kind], details[kind] = data["metrics"], data["details"]
            details[kind]["captions_file"] = str(captions.path / "captions.json")
            keys[f"captions_{kind}"], keys[f"scores_{kind}"] = captions.key, scored.key
            timings[f"eval_{kind}_wall"] = time.perf_counter() - started
        keys["sfs_reference"] = reference.key
        return metrics, details, keys

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
            report = json.loads((model_entry.path / "report.json").read_text())
            poisoned_ids = set(json.loads((poison_entry.path / "poisoned_ids.json").read_text()))
            detection = persist.detection(report, poisoned_ids)
            diagnostics = defense_diagnostics(report)
            coverage_file = model_entry.path / "trigger_coverage.json"
            if coverage_file.is_file():
                detection["trigger_coverage"] = json.loads(coverage_file.read_text())
            artifacts = {name: str(model_entry.path / "artifacts" / rel)
                         for name, rel in report.get("artifacts", {}).items()}
        metrics, details, eval_keys = self.evaluate(victim, model_entry, cell, attack, attack_params, timings)
        keys.update(eval_keys)
        split = self.split(cell.dataset, "test")
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
            provenance={
                "cell_key": keys.get("defend") or keys.get("clean_model"), "stage_keys": keys,
                "versions": versions(), "git_commit": git_commit(),
                "seeds": {"poison": cell.seed, "train": cell.seed, "world": self.config.world_seed,
                          "base": self.profile_params.get("base_seed")},
                "manifests": {"train": self.split("coco", "train").manifest.to_dict(),
                              "test": split.manifest.to_dict()},
                "decoding": victim.decoding.__dict__,
                "device": device_record(self.context.device), "precision": victim_precision(victim),
                "profile_params": self.profile_params,
            },
        ).to_dict()

    def check_data(self) -> None:
        """Every local dataset the grid reads (fine-tuning and each eval role) is complete before
        anything is built: one VbbError naming each missing file (providers' check_available)."""
        sources = self.profile.dataset_sources()  # every role is known: validate_plugins ran
        for role in dict.fromkeys(["coco", *self.config.datasets]):
            check = getattr(self.registry.dataset(sources[role]), "check_available", None)
            if check is not None:
                check(self.context.config)

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
        except BaseException as exc:  # one failing cell never stops the grid (DESIGN.md §8),
            error = error_message(exc)  # not even a plugin's sys.exit()
            self.log(f"cell {cell.cell_id} FAILED: {error}")
            result = failed_result(cell, error, traceback.format_exc(limit=8))
        result["timings"] = {**result.get("timings", {}), "cell_wall": time.perf_counter() - cell_started}
        result["budget"] = self.budget
        path = result_path(self.config, cell)
        replaced = _stored_budget(path)
        if replaced is not None and replaced["key"] != self.budget["key"]:
            self.log(f"{path.name}: replacing a result of another budget "
                     f"({budget_difference(replaced, self.budget)}); the board refuses mixed budgets")
        write_json_atomic(path, result)
        return error


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


def _stored_budget(path: Path) -> dict | None:
    try:
        budget = json.loads(path.read_text()).get("budget")
    except (OSError, ValueError, AttributeError):
        return None
    return budget if isinstance(budget, dict) and "key" in budget else None


def checked_outcome(defense: str, outcome: Any) -> DefenseOutcome:
    """``outcome`` if ``defend()`` returned a DefenseOutcome, else one error that says so."""
    if not isinstance(outcome, DefenseOutcome):
        raise VbbError(f"defense '{defense}' returned {type(outcome).__name__} from defend(), "
                       "not a DefenseOutcome",
                       "return hookspecs.DefenseOutcome(victim, DefenseReport(...)) from defend()")
    return outcome
