"""The grid's evaluation stages (GridRunner's part): a model's captions of a split, every
registered metric on them, and the clean model's captions that SFS compares against."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np

from ..device import evaluation_payload
from ..types import EvalInputs, sha256_of_ids, sha256_of_images
from . import persist
from .cells import Cell
from .store import Entry, write_json_atomic


class EvaluationStages:
    """Mixin of :class:`~vlmbackdoor_bench.grid.runner.GridRunner`; reads its ``store``,
    ``registry``, ``config`` and ``context``, and keeps the SFS scorer in ``_scorer``."""

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
        """Every registered metric on one caption set; ASR once per rule (methods/metrics.md §4.4)."""
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
        """The clean model's captions of ``dataset``'s test images, the SFS reference (methods/metrics.md §5.1)."""
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
