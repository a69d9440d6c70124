"""What goes into the engine and what comes out: readings, per-reading outputs and fault events."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np


class Reading(NamedTuple):
    """One sample of one device: ``values`` [F] in raw units, in the model's feature order; NaN = missing.

    A NamedTuple rather than a frozen dataclass: the daemon builds one per MQTT reading, and a
    tuple is built ~5× faster (a frozen dataclass sets each field through ``object.__setattr__``).
    """

    device: str
    ts: float  # epoch seconds
    values: np.ndarray


@dataclass(frozen=True)
class FaultEvent:
    device: str
    state: str  # "raised" or "cleared"
    ts: float  # when it was raised or cleared
    started_ts: float
    peak_score: float
    threshold: float
    # The channels that drove the score at the raising reading, largest first:
    # {"channel", "reading", "forecast", "share"} with share = that channel's part of the score.
    top_channels: tuple[dict, ...] = ()


class Output(NamedTuple):
    """What the engine made of one reading. A NamedTuple, like :class:`Reading`: one is built per
    reading, and at a batch of 1,024 a frozen dataclass cost more than the model step."""

    device: str
    ts: float
    forecast: np.ndarray  # [K] raw units: the forecast of this device's next reading
    score: float  # smoothed anomaly score (0 while there is no earlier forecast to compare)
    anomalous: bool  # score above threshold, outside warm-up
    fault_active: bool
    event: FaultEvent | None = None
    imputed: tuple[str, ...] = ()  # channels that were missing and filled from the forecast
    threshold: float = float("nan")  # what the score was compared with (per device when dynamic)


__all__ = ["FaultEvent", "Output", "Reading"]
