"""The model's side of a batch step: each device's recurrent state, stepped in one onnxruntime call.

:class:`RecurrentState` declares, in the engine's per-device arrays, what stepping the model
needs per device (the LSTM/GRU state of each layer, the forecast made for the next reading, the
last scaled reading) and steps the model for a batch of devices: gather their rows, one call,
scatter back. It also bridges a short silence (the readings that never came are the model's
own forecasts) and fills in missing values; what the forecasts are scored against, and what is
decided from them, is :mod:`.decider`'s.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
from faultwatch.runtime.engine.devices import SlotArrays
from faultwatch.runtime.engine.hotpath import rows_of
from faultwatch.runtime.engine.model import ModelStep


class RecurrentState:
    """``model`` stepped over the per-device arrays it declares in ``per_device``.

    ``isolate`` (lo, hi): a device with a scaled value outside it steps in a call of its own
    (int8 activations are quantized over the whole batch). ``counters`` are the engine's.
    """

    def __init__(self, model: ModelStep, per_device: SlotArrays, isolate: tuple[float, float],
                 counters: Counter):
        c = model.contract
        self.model, self.per_device, self.isolate, self.counters = model, per_device, isolate, counters
        self.target_index = np.asarray(c.target_index)
        self.n_targets = len(c.targets)
        # The recurrent state [cap, H_i] per layer (and cell/hidden part), zero at a reset.
        self.state_names = [f"state_{i}" for i in range(len(model.state_widths))]
        for name, width in zip(self.state_names, model.state_widths, strict=True):
            per_device.declare(name, (width,), np.float32, on_reset=0.0)
        # [cap, K] the scaled forecast of each device's next reading; valid where has_prev.
        per_device.declare("prev_forecast", (len(c.targets),), np.float32)
        # [cap, F] the last scaled reading, for imputing non-target features: mid-range at first.
        per_device.declare("last_scaled", (len(c.features),), np.float32, initial=0.5)
        per_device.declare("has_prev", dtype=bool, initial=False, on_reset=False)

    def impute(self, scaled: np.ndarray, missing: np.ndarray, slots: np.ndarray, has_prev: np.ndarray,
               prev_forecast: np.ndarray) -> np.ndarray:
        """``scaled`` [B, F] with its ``missing`` [B, F] values filled: a target from the forecast
        made for it (``prev_forecast`` [B, K], where ``has_prev`` [B]), anything else from its last
        value."""
        fill = self.per_device["last_scaled"][slots]  # [B, F]
        fill[:, self.target_index] = np.where(has_prev[:, None], prev_forecast,
                                              fill[:, self.target_index])
        self.counters["imputed_values"] += int(missing.sum())
        return np.where(missing, fill, scaled)

    def advance(self, slots: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Step the model for ``slots`` on scaled readings ``x`` [B, F]; returns the forecast of the
        next reading [B, K] (scaled). Devices with a reading outside the isolate range step apart,
        in one call of their own, so their values cannot set the int8 quantization range of the
        others (one call for all of them, not one each: a fleet model meeting many devices
        beyond its training range costs two calls a batch, not hundreds)."""
        lo, hi = self.isolate
        wild = np.flatnonzero(((x < lo) | (x > hi)).any(axis=1)) if len(slots) > 1 else ()
        if not len(wild):
            return self._run(slots, x)
        self.counters["isolated_steps"] += len(wild)
        forecast = np.empty((len(slots), self.n_targets), np.float32)
        tame = np.setdiff1d(np.arange(len(slots)), wild)
        if len(tame):
            forecast[tame] = self._run(slots[tame], x[tame])
        forecast[wild] = self._run(slots[wild], x[wild])
        return forecast

    def _run(self, slots: np.ndarray, x: np.ndarray) -> np.ndarray:
        """One onnxruntime call: gather the state rows [1, B, H_i] of ``slots``, step on ``x``
        [B, F], scatter back; returns the forecast [B, K] (scaled)."""
        pd = self.per_device.arrays
        states = [pd[name] for name in self.state_names]
        # take: a third of the cost of states[slots] on a few rows. (Keeping the four states in
        # one array, gathered and scattered whole, saved ~2 % of an engine step at batch 1 and
        # cost ~3 % at 1,024, where the joined rows are copied once more.)
        forecast, new_state = self.model.step(x[:, None, :], [s.take(slots, axis=0)[None] for s in states])
        rows = rows_of(slots)
        # (zip without strict=: the keyword costs 2 µs a call; the model returns one per state.)
        for s, new in zip(states, new_state):  # noqa: B905
            s[rows] = new[0]
        forecast = forecast[:, 0]  # [B, 1, K] → [B, K]
        pd["prev_forecast"][rows] = forecast
        pd["last_scaled"][rows] = x
        pd["has_prev"][slots] = True
        return forecast

    def bridge(self, slots: np.ndarray, skipped: np.ndarray) -> None:
        """Step ``slots`` over ``skipped`` [B] missing readings each, feeding the model its forecasts.

        Targets take the forecast made for them, other features their last value; nothing is
        scored. Round r steps the devices that miss more than r readings, in one call.
        """
        pd = self.per_device.arrays
        for r in range(int(skipped.max())):
            sel = slots[skipped > r]
            x = pd["last_scaled"][sel]  # [b, F] (a copy: fancy indexing)
            x[:, self.target_index] = pd["prev_forecast"][sel]
            self.advance(sel, x)
            self.counters["bridged_readings"] += len(sel)
