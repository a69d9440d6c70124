"""``faultwatch replay``: a CSV through the same engine the daemon runs, no broker."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from faultwatch.runtime.engine.engine import Engine, EngineSettings, Output, Reading
from faultwatch.runtime.engine.model import StepModel
from faultwatch.runtime.offline.csvdata import Table, read_csv

CHUNK = 4096  # readings handed to the engine per call, like a busy daemon's micro-batches


def readings_of(table: Table, features: tuple[str, ...]) -> tuple[np.ndarray, list[Reading]]:
    """The table's rows as readings in time order (stable across devices) and that order."""
    values = table.select(features)  # [N, F]
    order = np.argsort(table.timestamps, kind="stable")
    return order, [Reading(str(table.devices[i]), float(table.timestamps[i]), values[i]) for i in order]


def replay(engine: Engine, readings: list[Reading]) -> Iterator[Output | None]:
    for start in range(0, len(readings), CHUNK):
        yield from engine.process(readings[start:start + CHUNK])


def replay_csv(model_path: Path, data_path: Path, out_path: Path,
               settings: EngineSettings | None = None) -> dict:
    model = StepModel(model_path)
    engine = Engine(model, settings)
    table = read_csv(data_path, evenly_spaced=True)  # no timestamp column: rows 1 s apart
    targets = model.contract.targets
    order, readings = readings_of(table, model.contract.features)
    labels = table.labels.get("anomaly")
    anomalous = 0
    confusion = {"tp": 0, "fp": 0, "fn": 0, "tn": 0}  # fault active vs the file's anomaly label
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with out_path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["timestamp", "device", *[f"forecast_{t}" for t in targets], "score",
                         "anomalous", "fault", "event", "label"])
        for row, reading, out in zip(order, readings, replay(engine, readings), strict=True):
            label = "" if labels is None else int(labels[row])
            if out is None:  # dropped (out of order): still a row, so the file lines up with the input
                writer.writerow([reading.ts, reading.device, *[""] * len(targets), "", "", "",
                                 "dropped", label])
                continue
            anomalous += out.anomalous
            if labels is not None:
                key = ("t" if out.fault_active == bool(labels[row]) else "f") + (
                    "p" if out.fault_active else "n")
                confusion[key] += 1
            writer.writerow([out.ts, out.device, *[f"{v:.6g}" for v in out.forecast],
                             f"{out.score:.6g}", int(out.anomalous), int(out.fault_active),
                             out.event.state if out.event else "", label])
    summary = {"readings": len(readings), "devices": len(engine.devices), "anomalous": anomalous,
               "faults_raised": engine.counters["faults_raised"], "counters": dict(engine.counters)}
    if labels is not None:
        summary["labels"] = confusion | point_metrics(**confusion)
    return summary


def point_metrics(tp: int, fp: int, fn: int, tn: int) -> dict:
    """Point-wise F1, false-alarm rate and missed-alarm rate (the SKAB definitions)."""
    return {
        "f1": tp / (tp + (fp + fn) / 2) if tp + fp + fn else 1.0,
        "far": fp / (fp + tn) if fp + tn else 0.0,
        "mar": fn / (fn + tp) if fn + tp else 0.0,
    }
