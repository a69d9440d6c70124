"""The frame assembler: channels that arrive on separate topics become one reading.

With a per-channel topic (``sensors/{device}/{channel}``) a device's sample
arrives as one message per channel, at slightly different times. The
assembler keeps one open *frame* per device and closes it, handing it to the
engine, when

- every channel of the model has arrived (``complete``);
- ``max_wait_s`` has passed since its first channel arrived (``timeout``);
- a value arrives that belongs to the next sample: a channel already in the
  frame, or a timestamp more than ``tolerance_s`` away (``superseded``);
- ``max_pending`` frames are open and another device starts one: the oldest is
  closed early (``evicted``), so a flood of device IDs can't exhaust memory.

A frame closed with channels missing carries NaN for them: the engine imputes
them from the forecast and marks them in the output's ``imputed``. Each frame
also carries the acknowledgement tokens of its messages, so they are acked
only once the frame has been processed.

>>> fa = FrameAssembler(n_features=2, tolerance_s=0.5, max_wait_s=1.0, max_pending=10)
>>> fa.add("p1", 0, ts=10.0, value=1.5, ack=7, now=0.0)
[]
>>> [(f.device, f.ts, f.values.tolist(), f.acks, f.how) for f in fa.add("p1", 1, 10.1, 2.5, 8, 0.1)]
[('p1', 10.0, [1.5, 2.5], [7, 8], 'complete')]
>>> fa.add("p2", 1, ts=11.0, value=3.0, ack=9, now=0.2)
[]
>>> [(f.device, f.values.tolist(), f.how) for f in fa.expire(now=1.5)]
[('p2', [nan, 3.0], 'timeout')]
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Frame:
    device: str
    ts: float  # the timestamp of its first channel
    values: np.ndarray  # [F] raw units, NaN = not (yet) arrived
    opened: float  # monotonic time its first channel arrived
    acks: list = field(default_factory=list)
    filled: int = 0
    how: str = ""  # why it was closed: complete, timeout, superseded, evicted, flushed


class FrameAssembler:
    def __init__(self, n_features: int, tolerance_s: float, max_wait_s: float, max_pending: int):
        self.n_features = n_features
        self.tolerance_s = tolerance_s
        self.max_wait_s = max_wait_s
        self.max_pending = max(1, max_pending)
        self.pending: OrderedDict[str, Frame] = OrderedDict()  # oldest first: opened in this order
        self.counters: Counter = Counter()  # frames closed, by how

    def __len__(self) -> int:
        return len(self.pending)

    def _close(self, device: str, how: str) -> Frame:
        frame = self.pending.pop(device)
        frame.how = how
        self.counters[how] += 1
        return frame

    def add(self, device: str, index: int, ts: float, value: float, ack, now: float) -> list[Frame]:
        """Channel ``index`` of ``device`` at ``ts``; returns the frames this closes (oldest first)."""
        closed = []
        frame = self.pending.get(device)
        if frame is not None and (not np.isnan(frame.values[index])
                                  or abs(ts - frame.ts) > self.tolerance_s):
            closed.append(self._close(device, "superseded"))
            frame = None
        if frame is None:
            if len(self.pending) >= self.max_pending:
                closed.append(self._close(next(iter(self.pending)), "evicted"))
            frame = Frame(device, ts, np.full(self.n_features, np.nan), now)
            self.pending[device] = frame
        frame.values[index] = value
        frame.filled += 1
        if ack is not None:
            frame.acks.append(ack)
        if frame.filled >= self.n_features:
            closed.append(self._close(device, "complete"))
        return closed

    def close_device(self, device: str) -> Frame | None:
        """Close the device's open frame, if any (a whole reading of it arrived)."""
        return self._close(device, "superseded") if device in self.pending else None

    def expire(self, now: float) -> list[Frame]:
        """Frames whose wait is over, oldest first."""
        closed = []
        while self.pending:
            device, frame = next(iter(self.pending.items()))
            if now - frame.opened < self.max_wait_s:
                break
            closed.append(self._close(device, "timeout"))
        return closed

    def flush(self) -> list[Frame]:
        """Close every open frame (before a model with other channels takes over)."""
        return [self._close(device, "flushed") for device in list(self.pending)]

    def next_deadline(self) -> float | None:
        """Monotonic time at which the oldest open frame times out, or None."""
        if not self.pending:
            return None
        return next(iter(self.pending.values())).opened + self.max_wait_s
