"""Intake: the inbox's items of one batch become readings for the engine, and the message ids
to acknowledge once those readings' outputs are queued.

A whole reading (:class:`.inbox.ReadingItem`) is stepped as it came; per-channel values
(:class:`.inbox.ChannelItem`) are assembled into readings (:mod:`.frames`); rejected
messages and other partitions' devices are counted here and acknowledged all the same
(a message that can never be processed must not be redelivered forever). Runs on the
engine thread.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from faultwatch.runtime.daemon.config import Config
from faultwatch.runtime.daemon.frames import Frame, FrameAssembler
from faultwatch.runtime.daemon.inbox import (
    ChannelItem,
    ForgetItem,
    InboxItem,
    OtherPartitionItem,
    ReadingItem,
    RejectItem,
)
from faultwatch.runtime.daemon.payload import REJECTED
from faultwatch.runtime.engine.contract import ModelContract
from faultwatch.runtime.engine.engine import Reading


def in_time_order(readings: list[Reading], received: list[float]) -> tuple[list[Reading], list[float]]:
    """Each device's readings of one batch in time order, ``received`` (arrival times) alike.

    The engine drops a reading older than one already stepped for its device, so an older
    reading resent after a newer one (as a broker may when a session resumes) would be lost.
    Sorting is stable: equal timestamps keep their order (the second is a duplicate).

    >>> r = [Reading("a", 2.0, None), Reading("b", 1.0, None), Reading("a", 1.0, None)]
    >>> [(x.device, x.ts) for x in in_time_order(r, [0.0, 0.1, 0.2])[0]]
    [('b', 1.0), ('a', 1.0), ('a', 2.0)]
    """
    last: dict[str, float] = {}
    for r in readings:
        if r.ts < last.get(r.device, -np.inf):
            break
        last[r.device] = r.ts
    else:
        return readings, received  # the usual case: nothing to do
    order = sorted(range(len(readings)), key=lambda i: readings[i].ts)
    return [readings[i] for i in order], [received[i] for i in order]


@dataclass
class Collected:
    """What one batch of messages gives the engine: readings, and what to acknowledge after them."""

    readings: list[Reading] = field(default_factory=list)
    acks: list[int] = field(default_factory=list)  # mids of the QoS 1 messages these readings came in
    received: list[float] = field(default_factory=list)  # time.monotonic() each reading arrived
    forget: list[str] = field(default_factory=list)  # devices withdrawn by a forget command

    def add_frame(self, frame: Frame) -> None:
        self.readings.append(Reading(frame.device, frame.ts, frame.values))
        self.acks.extend(mid for mid, qos in frame.acks if qos)
        self.received.append(frame.opened)


class Intake:
    """Items in, readings out; owns the frames being assembled (per-channel topics)."""

    def __init__(self, config: Config, contract: ModelContract, counters: Counter):
        self.config = config
        self.counters = counters  # the daemon's engine-thread counters
        self.adopt(contract)

    def adopt(self, contract: ModelContract) -> None:
        """The per-model parts: feature order, and a frame assembler for its channels."""
        self.features = contract.features
        self.feature_index = {name: i for i, name in enumerate(contract.features)}
        self.frames = FrameAssembler(len(contract.features), tolerance_s=contract.sample_period_s / 2,
                                     max_wait_s=self.config.input.frame_max_wait_s,
                                     max_pending=self.config.input.max_open_frames)

    def _remap(self, values: np.ndarray, features: tuple[str, ...]) -> np.ndarray:
        """A reading parsed for the previous model, in this model's feature order."""
        index = {name: i for i, name in enumerate(features)}
        return np.array([values[index[f]] if f in index else np.nan for f in self.features])

    def collect(self, batch: list[InboxItem]) -> Collected:
        """The readings of ``batch`` and of the frames it closes or that timed out."""
        out = Collected()
        readings, acks, received = out.readings, out.acks, out.received
        frames = self.frames
        add_frame = out.add_frame
        for item in batch:
            if type(item) is ReadingItem:
                values = item.values
                if item.features is not self.features:
                    values = self._remap(values, item.features)
                if frames.pending and item.device in frames.pending:
                    closed = frames.close_device(item.device)
                    if closed is not None:  # it is: the device has a frame pending
                        add_frame(closed)
                readings.append(Reading(item.device, item.ts, values))
                if item.qos:
                    acks.append(item.mid)
                received.append(item.received)
            elif type(item) is ChannelItem:
                index = self.feature_index.get(item.channel)
                if index is None:
                    self.counters["ignored_channel"] += 1
                    if item.qos:
                        acks.append(item.mid)
                    continue
                for frame in frames.add(item.device, index, item.ts, item.value, (item.mid, item.qos),
                                        item.received):
                    add_frame(frame)
            elif type(item) is OtherPartitionItem:
                self.counters["other_partition"] += 1
                if item.qos:
                    acks.append(item.mid)
            elif type(item) is RejectItem:
                self.counters[REJECTED + item.reason] += 1
                if item.qos:
                    acks.append(item.mid)
            elif type(item) is ForgetItem:
                out.forget.append(item.device)
        for frame in frames.expire(time.monotonic()):
            add_frame(frame)
        return out

    def flush(self) -> Collected:
        """Every open frame, closed now (before a reload changes the channels)."""
        out = Collected()
        for frame in self.frames.flush():
            out.add_frame(frame)
        return out
