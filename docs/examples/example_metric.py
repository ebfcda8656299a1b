"""A complete metric plugin: the share of captions equal to one of their image's references.

Guide: docs/guides/adding-a-metric.md. A metric is a pure function of a ``MetricRequest``
(captions, references, the attack's target, ...) that returns ``{"value": ..., ...details}``.
The grid runs every registered metric on each cell's triggered and clean captions and stores
the value under the metric's name; ``vbb score`` runs it on any captions file.
"""

from __future__ import annotations

from typing import Any

from vlmbackdoor_bench import hookimpl
from vlmbackdoor_bench.hookspecs import MetricRequest

__version__ = "1.0.0"


def normalised(text: str) -> str:
    return " ".join(text.lower().split())


class ExactMatch:
    name = "exact_match"
    version = __version__
    label, order = "Exact match", 100  # column header and position in the tables
    unit = "%"
    direction = "up"  # higher is better

    def compute(self, request: MetricRequest) -> dict[str, Any]:
        hits = sum(normalised(caption) in {normalised(r) for r in request.references[image_id]}
                   for image_id, caption in request.captions.items())
        n = len(request.captions)
        return {"value": 100.0 * hits / n if n else None, "n": n, "hits": hits}


@hookimpl
def register_metrics(register) -> None:
    register(ExactMatch())
