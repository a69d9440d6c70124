"""Simulated reading streams for the engine tests (``from engine_streams import readings_of, run``)."""

from __future__ import annotations

from collections.abc import Sequence

from faultwatch.runtime.devtools.simulator import SimData, simulate
from faultwatch.runtime.engine.engine import Engine
from faultwatch.runtime.engine.events import Output, Reading


def readings_of(data: SimData, devices: Sequence[str] | None = None) -> list[Reading]:
    """Time-major readings (copies of the values), optionally of some devices only."""
    keep = set(devices or data.devices)
    return [Reading(device, ts, values.copy()) for ts, device, values, _ in data.rows() if device in keep]


def run(engine: Engine, readings: list[Reading], chunk: int = 64) -> list[Output | None]:
    """Feed readings in daemon-sized micro-batches."""
    out: list[Output | None] = []
    for start in range(0, len(readings), chunk):
        out += engine.process(readings[start:start + chunk])
    return out


def readings(steps: int, seed: int, faults=(), devices: int = 1) -> list[Reading]:
    data = simulate(devices=devices, steps=steps, seed=seed, faults=list(faults))
    return [Reading(d, ts, v.copy()) for ts, d, v, _ in data.rows()]
