"""The defense report: what each defense did to each backdoored model (a table the paper lacks).

One row per (dataset, attack, defense) with the headline ASR on triggered inputs before (No
Defense) and after, clean-input CIDEr after, the detection precision/recall the harness computed
from the samples the defense removed or relabelled (methods/design.md §3) and, where a defense reports
them, from the candidates it suspected (a group its own gate may reject), for masking defenses the share
of the trigger their masks covered, and the defense's own time.
The defended model is shared by both datasets, so detection and time repeat on the Flickr row.
Values are means over seeds; a defense that flags nothing has no precision (printed as missing).
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Mapping, Sequence

from .facts import Facts
from .implant import csv_value, implant_status
from ..results_schema import CLEAN_MODEL, NO_DEFENSE
from .results import defense_values, finite_number
from .table_model import MISSING, ColumnGroup, Table, fmt

COLUMNS = ("ASR before ↓", "ASR after ↓", "clean C ↑", "precision ↑", "recall ↑",
           "flagged / poisoned", "suspected P / R", "trigger masked", "defense s")


def _mean(values: Sequence[float]) -> float | None:
    return math.fsum(values) / len(values) if values else None


def defense_report(records: Sequence[Mapping], poison_rate: float | None, facts: Facts) -> Table:
    """The table (``has_data`` False when no real defense ran); labels, orders and headline ASR
    rules from ``facts``."""
    kept = [r for r in records if r.get("status") == "ok" and r.get("defense") != CLEAN_MODEL
            and (poison_rate is None or finite_number(r.get("poison_rate")) == poison_rate)]
    values: dict[tuple, list[float]] = defaultdict(list)
    for r in kept:
        key = (r["dataset"], r["attack"], r["defense"])
        metric = facts.headline_metric(r["attack"])
        metrics = r.get("metrics") or {}
        for name, value in (("asr", (metrics.get("triggered") or {}).get(metric)),
                            ("cider", (metrics.get("clean") or {}).get("cider"))):
            if finite_number(value) is not None:
                values[key + (name,)].append(float(value))
        for name, value in defense_values(r).items():
            values[key + (name,)].append(value)

    table = Table(key="defense_report", title="Defense report: ASR before/after, detection, time",
                  index=("Dataset", "Attack", "Defense", "ASR rule"),
                  groups=(ColumnGroup("", COLUMNS),))
    status = implant_status(records, facts, poison_rate)
    cells = sorted({(d, a, f) for d, a, f in (k[:3] for k in values) if f != NO_DEFENSE},
                   key=lambda k: (facts.rank("dataset", k[0]), facts.rank("attack", k[1]),
                                  facts.rank("defense", k[2])))
    for dataset, attack, defense in cells:
        def get(name: str, which: str = defense) -> float | None:
            return _mean(values.get((dataset, attack, which, name), []))

        flagged, poisoned = get("n_flagged"), get("n_poisoned")
        counts = (f"{flagged:.0f} / {poisoned:.0f}" if flagged is not None and poisoned is not None
                  else MISSING)
        seconds = get("seconds")
        suspected_recall = get("suspected_recall")
        suspected = MISSING if suspected_recall is None else \
            f"{fmt(get('suspected_precision'))} / {fmt(suspected_recall)}"
        texts = (fmt(get("asr", NO_DEFENSE)), fmt(get("asr")), fmt(get("cider")), fmt(get("precision")),
                 fmt(get("recall")), counts, suspected, fmt(get("trigger_masked")),
                 MISSING if seconds is None else f"{seconds:.0f}")
        table.rows.append(((facts.label("dataset", dataset), facts.label("attack", attack),
                            facts.label("defense", defense),
                            facts.headline_metric(attack).removeprefix("asr_")),
                           texts))
        table.implanted.append(csv_value(status, attack, dataset))
        table.has_data = True
    table.footnotes = [
        "Triggered test inputs for ASR (rule `strict`, or `concept` for Shadowcast, methods/metrics.md "
        "§4.4), clean test inputs for C. Before = the same backdoored model without defense.",
        "Detection: the samples a defense removed, isolated or relabelled, against the poison set "
        "the harness holds (precision/recall in %; a defense that flags nothing has no precision). "
        "Suspected P / R: the same for the candidates a defense reports whether or not it acted on "
        "them (CT's fitted group, which its likelihood-ratio gate may reject). "
        "Masking defenses (SRD, random masks) change every image and flag none; for them, trigger "
        "masked = the mean share (%) of each poisoned image's trigger (its pixel change from the "
        "clean image) that the instance's mask covered.",
        "defense s: wall seconds of the defend stage when it was computed; the defended model is "
        "shared by both datasets, so its detection and time repeat on the Flickr row.",
    ] + table.implant_legend()
    return table
