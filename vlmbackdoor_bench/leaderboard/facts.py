"""What the tables know about attacks, defenses and metrics: labels, orders, headline ASR rules,
directions and the paper tables' columns, as the plugins declare them (hookspecs) and the runner
copies them into each record's ``plugin_facts`` (results_schema).

:meth:`Facts.of` reads them from the records; what the records lack (results written before
schema 2, or merged from a ``results.csv``) comes from the installed plugins (:func:`registry_facts`).
Datasets are the harness's roles, not plugins, so their labels and order live here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Iterable, Mapping

from ..results_schema import (CLEAN_MODEL, attack_facts, defense_facts, metric_facts,
                              stored_key)

DATASET_ORDER: tuple[str, ...] = ("coco", "flickr30k")
DATASET_LABELS: dict[str, str] = {"coco": "COCO", "flickr30k": "Flickr30k"}
CLEAN_MODEL_LABEL = "Clean model"
#: The headline rule of an attack that declares none (methods/metrics.md §4.4: trigger attacks).
DEFAULT_HEADLINE_ASR_RULE = "strict"
ARROWS: dict[str, str] = {"up": "↑", "down": "↓"}
KINDS = ("attack", "defense", "metric")


def _order_key(order: Any) -> tuple:
    """An order of the facts (a number, or [number, sub-number] for a rule of a metric) as a
    comparable tuple; None sorts after every ordered id."""
    if order is None:
        return (1, 0, 0)
    main, sub = (order + [0])[:2] if isinstance(order, list) else (order, 0)
    return (0, main, sub)


@dataclass
class Facts:
    """Per kind ("attack", "defense", "metric"), harness id (a metric's stored key) -> facts."""

    by_kind: dict[str, dict[str, dict]] = field(default_factory=lambda: {k: {} for k in KINDS})

    @classmethod
    def of(cls, records: Iterable[Mapping], fallback: "Facts | None" = None) -> "Facts":
        """The facts the records carry over ``fallback`` (None: :func:`registry_facts`)."""
        base = registry_facts() if fallback is None else fallback
        facts = cls({k: dict(v) for k, v in base.by_kind.items()})
        for record in records:
            carried = record.get("plugin_facts") or {}
            if not isinstance(carried, Mapping):
                continue
            for kind in ("attack", "defense"):
                if isinstance(carried.get(kind), Mapping):
                    facts.by_kind[kind][record[kind]] = dict(carried[kind])
            for key, value in (carried.get("metrics") or {}).items():
                if isinstance(value, Mapping):
                    facts.by_kind["metric"][key] = dict(value)
        return facts

    def _get(self, kind: str, value: str) -> Mapping:
        return self.by_kind.get(kind, {}).get(value, {})

    def label(self, kind: str, value: str) -> str:
        """The display label of a harness id; an id nothing declares is shown as it is."""
        if kind == "dataset":
            return DATASET_LABELS.get(value, value)
        if kind == "defense" and value == CLEAN_MODEL:
            return CLEAN_MODEL_LABEL
        return str(self._get(kind, value).get("label") or value)

    def rank(self, kind: str, value: Any) -> tuple:
        """Sort key: declared orders first, then the others by id; the clean reference model
        after every defense."""
        text = "" if value is None else str(value)
        if kind == "dataset":
            order = DATASET_ORDER.index(text) if text in DATASET_ORDER else None
        elif kind == "defense" and text == CLEAN_MODEL:
            return (2, 0, 0, text)
        else:
            order = self._get(kind, text).get("order")
        return (*_order_key(order), text)

    def is_rule_metric(self, metric: str) -> bool:
        """Whether a stored key is one ASR rule of a metric computed per rule."""
        return self._get("metric", metric).get("asr_rule") is not None

    def headline_metric(self, attack: str) -> str:
        """The stored key of an attack's headline ASR (methods/metrics.md §4.4)."""
        rule = self._get("attack", attack).get("headline_asr_rule") or DEFAULT_HEADLINE_ASR_RULE
        return stored_key("asr", rule)

    def arrow(self, metric: str) -> str:
        """↑ where higher is better, ↓ where lower is, nothing for an undeclared direction."""
        return ARROWS.get(str(self._get("metric", metric).get("direction")), "")

    def paper_defenses(self, table: int) -> list[str]:
        """The defenses that are columns of the paper's Table ``table``, in its column order."""
        placed = {d: (f.get("paper_tables") or {}).get(str(table)) for d, f in self.by_kind["defense"].items()}
        return sorted((d for d, p in placed.items() if p is not None), key=lambda d: placed[d])

    def paper_label(self, table: int, defense: str) -> str:
        """A defense's label in the paper's Table ``table`` (SRD is "DQN" in Table 3)."""
        return (self._get("defense", defense).get("paper_labels") or {}).get(str(table)) \
            or self.label("defense", defense)

    def paper_ids(self, kind: str) -> dict[str, str]:
        """Label as the paper prints it -> harness id (every table's labels of a defense)."""
        if kind == "dataset":
            return {v: k for k, v in DATASET_LABELS.items()}
        ids = {self.label(kind, k): k for k in self.by_kind[kind]}
        if kind == "defense":
            for defense, f in self.by_kind["defense"].items():
                ids.update({text: defense for text in (f.get("paper_labels") or {}).values()})
        return ids


@lru_cache(maxsize=1)
def registry_facts() -> Facts:
    """The facts of the installed plugins (entry points), read once per process."""
    from ..registry import load_registry

    registry = load_registry()
    facts = Facts()
    for name, attack in registry.items["attack"].items():
        facts.by_kind["attack"][name] = attack_facts(attack)
    for name, defense in registry.items["defense"].items():
        facts.by_kind["defense"][name] = defense_facts(defense)
    for name, metric in registry.items["metric"].items():
        for rule in (getattr(metric, "asr_rules", ()) or [None]):
            facts.by_kind["metric"][stored_key(name, rule)] = metric_facts(metric, rule)
    return facts
