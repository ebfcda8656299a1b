"""The cell result record: one JSON file per grid cell, written by the runner, read by the
leaderboard (methods/design.md §6-§7; its documented form is docs/CONTRACTS.md, checked against
:class:`CellResult` by tests/test_contract.py).

It also turns a plugin's optional metadata (hookspecs: label, order, headline ASR rule, paper
tables, metric direction/unit) into the record's ``plugin_facts`` part, so that the tables are
laid out from what the plugins declare and a new attack, defense or metric needs no core edit.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Mapping

#: Version 2 added ``plugin_facts``; version 1 files (without it) are still read.
SCHEMA_VERSION = 2
READABLE_SCHEMAS = (1, 2)
STATUSES = ("ok", "failed")
CLEAN_MODEL = "clean-model"  # pseudo-defense id of the clean reference model's cells (methods/design.md §6)
NO_DEFENSE = "none"  # the defense id of the backdoored model left undefended (the No Defense column)
#: The ASR rule whose column the paper's tables print (methods/metrics.md §4.1, §4.4).
REPRODUCTION_ASR_RULE = "srd"


def stored_key(metric: str, rule: str | None = None) -> str:
    """The name a metric's value is stored under in a record: the metric's name, with
    ``_<rule>`` for a metric computed per ASR rule (``asr_srd``, methods/metrics.md §4.4)."""
    return metric if rule is None else f"{metric}_{rule}"


# ----------------------------------------------------------------------------- plugin facts
def attack_facts(attack: Any) -> dict:
    """Label, order and headline ASR rule of an attack (hookspecs.Attack's optional members):
    the label defaults to the name, the order to None (after the ordered ones, by name), the
    headline rule to the last of ``asr_rules``."""
    rules = tuple(getattr(attack, "asr_rules", ()))
    return {"label": str(getattr(attack, "label", attack.name)), "order": getattr(attack, "order", None),
            "headline_asr_rule": getattr(attack, "headline_asr_rule", rules[-1] if rules else None)}


def defense_facts(defense: Any) -> dict:
    """Label, order and place in the SRD paper's tables of a defense (hookspecs.Defense)."""
    return {"label": str(getattr(defense, "label", defense.name)),
            "order": getattr(defense, "order", None),
            "paper_tables": {str(n): int(p) for n, p in dict(getattr(defense, "paper_tables", {})).items()},
            "paper_labels": {str(n): str(t) for n, t in dict(getattr(defense, "paper_labels", {})).items()}}


def metric_facts(metric: Any, rule: str | None = None) -> dict:
    """Label, order, direction and unit of the number ``metric`` stores (under ``rule`` for a
    metric that takes an ASR rule: the rule's position refines the order, and every rule other
    than the reproduction one carries its name in the label)."""
    order = getattr(metric, "order", None)
    text = str(getattr(metric, "label", metric.name))
    if rule is not None:
        rules = tuple(getattr(metric, "asr_rules", ()))
        order = None if order is None else [order, rules.index(rule) if rule in rules else len(rules)]
        text = text if rule == REPRODUCTION_ASR_RULE else f"{text} ({rule})"
    return {"label": text, "order": order, "direction": getattr(metric, "direction", None),
            "unit": getattr(metric, "unit", None), "asr_rule": rule}


# ----------------------------------------------------------------------------- the record
@dataclass
class CellResult:
    """One cell's result (docs/CONTRACTS.md). ``status`` "failed" records carry ``error`` and
    ``traceback`` and no metrics. Keys this version does not know are kept in ``extra``."""

    profile: str
    dataset: str
    attack: str
    defense: str
    poison_rate: float | None
    seed: int | None
    status: str
    schema: int = SCHEMA_VERSION
    error: str | None = None
    traceback: str | None = None
    dataset_source: str | None = None
    attack_preset: str | None = None
    attack_version: str | None = None
    attack_params: dict = field(default_factory=dict)
    defense_preset: str | None = None
    defense_version: str | None = None
    metrics: dict = field(default_factory=dict)  # split -> stored metric key -> value (x100)
    metric_details: dict = field(default_factory=dict)
    detection: dict | None = None
    timings: dict = field(default_factory=dict)
    artifacts: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    budget: dict | None = None
    # {"attack": attack_facts, "defense": defense_facts (absent for the clean model),
    #  "metrics": {stored key: metric_facts}}
    plugin_facts: dict = field(default_factory=dict)
    # compact numbers for the leaderboard's figures (vlmbackdoor_bench.diagnostics): absent in
    # records written before it, which the board shows as "not recorded"
    diagnostics: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        return {**self.extra, **out}

    @classmethod
    def from_dict(cls, record: Any) -> "CellResult":
        """A record read back (schema 1 or 2); ``ValueError`` says what is wrong with it."""
        if not isinstance(record, Mapping):
            raise ValueError("the top level is not a JSON object")
        if record.get("schema") not in READABLE_SCHEMAS:
            raise ValueError(f"schema is {record.get('schema')!r}, this reader knows schemas "
                             f"{', '.join(map(str, READABLE_SCHEMAS))}")
        for key in ("dataset", "attack", "defense"):
            if not isinstance(record.get(key), str) or not record.get(key):
                raise ValueError(f"field {key!r} is missing or not a string")
        if record.get("status") not in STATUSES:
            raise ValueError(f"status is {record.get('status')!r}, expected 'ok' or 'failed'")
        if record["status"] == "ok" and not isinstance(record.get("metrics"), dict):
            raise ValueError("status is 'ok' but 'metrics' is not an object")
        known = {f.name for f in fields(cls)} - {"extra"}
        values = {k: v for k, v in record.items() if k in known and v is not None}
        values.setdefault("profile", record.get("profile"))
        for key in ("poison_rate", "seed"):
            values.setdefault(key, None)
        return cls(**values, extra={k: v for k, v in record.items() if k not in known})
