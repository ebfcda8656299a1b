"""The grid's model stages (GridRunner's part): the clean reference model, the poisoned set, the
backdoored model and the defended model, each built once through the store (methods/design.md §6), and
what a defense receives."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from ..errors import VbbError
from ..hookspecs import FINE_TUNE_STARTS, OBJECTIVE_INPUTS, DefenseContext, DefenseOutcome
from . import persist
from .flops import fine_tune_throughput
from .store import Entry, write_json_atomic


class ModelStages:
    """Mixin of :class:`~vlmbackdoor_bench.grid.runner.GridRunner`: the stages that make models,
    on top of its data (grid.data_stages), loaded models (grid.model_cache) and scorer
    (grid.scoring)."""

    def clean_model(self, seed: int) -> tuple[Any, Entry]:
        """The clean reference model: base fine-tuned on the unpoisoned set (methods/design.md §6)."""
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
        """What a defender gets (methods/design.md §3): never the poison labels."""
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


def checked_outcome(defense: str, outcome: Any) -> DefenseOutcome:
    """``outcome`` if ``defend()`` returned a DefenseOutcome, else one error that says so."""
    if not isinstance(outcome, DefenseOutcome):
        raise VbbError(f"defense '{defense}' returned {type(outcome).__name__} from defend(), "
                       "not a DefenseOutcome",
                       "return hookspecs.DefenseOutcome(victim, DefenseReport(...)) from defend()")
    return outcome

