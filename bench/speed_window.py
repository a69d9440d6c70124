"""``faultwatch bench`` sections (3) streaming vs re-windowing and (4) peers per reading."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from faultwatch.bench.speed_common import (
    BATCHES,
    DAEMON_BATCH,
    MODES,
    WINDOW,
    Counts,
    Cycle,
    OrtStepper,
    OrtWindow,
    TorchStepper,
    say,
    time_interleaved,
)
from faultwatch.bench.speed_model import Models
from faultwatch.runtime.engine.model import StepModel

# -- (3) streaming vs re-windowing -----------------------------------------------------


def streamed_vs_windowed(model: StepModel, series: np.ndarray, checks: int) -> float:
    """Max |forecast| difference between streaming ``series`` [N, F] one reading per call and
    re-running the last 60 readings from the state the stream had 60 readings earlier."""
    x = series[None].astype(np.float32)  # [1, N, F]
    state, states, forecasts = model.zero_state(1), [], []
    for t in range(len(series)):
        states.append(state)
        f, state = model.step(x[:, t:t + 1], state)
        forecasts.append(f[0, 0])
    ends = np.linspace(WINDOW - 1, len(series) - 1, checks).astype(int)
    diffs = []
    for t in ends:
        f, _ = model.step(x[:, t - WINDOW + 1:t + 1], states[t - WINDOW + 1])
        diffs.append(float(np.abs(f[0, -1] - forecasts[t]).max()))
    return max(diffs)


def torch_streamed_vs_windowed(model, series: np.ndarray, checks: int) -> float:
    import torch

    with torch.inference_mode():
        x = torch.from_numpy(series[None].astype(np.float32))
        state, states, forecasts = model.zero_state(1), [], []
        for t in range(len(series)):
            states.append(state)
            f, state = model(x[:, t:t + 1], state)
            forecasts.append(f[0, 0].numpy())
        ends = np.linspace(WINDOW - 1, len(series) - 1, checks).astype(int)
        return max(float(np.abs(model(x[:, t - WINDOW + 1:t + 1], states[t - WINDOW + 1])[0][0, -1].numpy()
                                - forecasts[t]).max()) for t in ends)


def bench_window(models: Models, counts: Counts, readings: np.ndarray, call_floor_us: float) -> dict:
    """Per reading: one step from the carried state vs re-running the last 60 readings.

    ``call_floor_us`` is one ``session.run`` of the identity graph at batch 1: with it and
    the per-step cost inside a call, the result also says how far batch 1 could go at all.
    """
    import torch

    timings: dict[str, dict[str, float]] = {}
    for batch in (1, DAEMON_BATCH):
        rows = np.arange(batch) % readings.shape[0]
        window = np.ascontiguousarray(readings[rows, :WINDOW])  # [B, 60, F]
        step = np.ascontiguousarray(window[:, -1:])  # [B, 1, F]
        calls: dict[str, Callable[[], object]] = {}
        for mode in ("ort_int8", "ort_fp32"):
            calls[f"{mode}_stream"] = OrtStepper(models.steps[mode], step)
            calls[f"{mode}_window"] = OrtWindow(models.steps[mode], window)
        calls["torch_stream"] = TorchStepper(models.torch_model, step)
        calls["torch_window"] = TorchStepper(models.torch_model, window, carry=False)
        with torch.inference_mode():
            seconds = time_interleaved(calls, counts.rounds, counts.block_s)
        timings[str(batch)] = {name: s / batch * 1e6 for name, s in seconds.items()}
    checks = 8 if counts.rounds < 5 else 24
    series = readings[0, : 4 * WINDOW if counts.rounds < 5 else 10 * WINDOW]
    diffs = {m: streamed_vs_windowed(models.steps[m], series, checks) for m in ("ort_fp32", "ort_int8")}
    diffs["torch"] = torch_streamed_vs_windowed(models.torch_model, series, checks)
    b1 = timings["1"]
    # A call of T steps costs fixed + T × per_step; two lengths give both, per mode at batch 1.
    per_step = {m: (b1[f"{m}_window"] - b1[f"{m}_stream"]) / (WINDOW - 1) for m in MODES}
    ratio = {b: t["ort_int8_window"] / t["ort_int8_stream"] for b, t in timings.items()}
    result: dict[str, Any] = {
        "window": WINDOW,
        "ratio_batch1": ratio["1"],
        f"ratio_batch{DAEMON_BATCH}": ratio[str(DAEMON_BATCH)],
        "ratio_by_mode": {m: {b: t[f"{m}_window"] / t[f"{m}_stream"] for b, t in timings.items()}
                          for m in MODES},
        "us_per_reading": timings,
        "batch1_per_step_us": per_step,
        "batch1_fixed_us": {m: b1[f"{m}_stream"] - per_step[m] for m in MODES},
        "batch1_call_floor_us": call_floor_us,
        "batch1_bound": batch1_bounds(call_floor_us, per_step),
        "max_abs_diff": diffs,
        # fp32 is the same arithmetic either way; int8 quantizes activations per call,
        # so a 60-step call and 60 one-step calls may round differently.
        "equal": diffs["ort_fp32"] <= 1e-5 and diffs["torch"] <= 1e-5,
        "int8_within_export_tolerance": diffs["ort_int8"] <= 0.02,
    }
    say(f"streaming vs re-windowing ({WINDOW}), int8: ×{ratio['1']:.1f} per reading at batch 1 "
        f"(at most ×{result['batch1_bound']['stream_vs_window']:.1f} through session.run), "
        f"×{ratio[str(DAEMON_BATCH)]:.1f} at batch {DAEMON_BATCH}; "
        f"max |diff| fp32 {diffs['ort_fp32']:.1e}, int8 {diffs['ort_int8']:.1e}, torch {diffs['torch']:.1e}")
    return result


def batch1_bounds(call_floor_us: float, per_step_us: dict[str, float]) -> dict[str, float]:
    """The best batch-1 ratios any step graph could reach through one ``session.run`` per call.

    A call costs at least the identity graph's ``call_floor_us`` (binding the step's inputs
    and outputs, no kernel) plus the per-step compute measured inside a call (slope over T).
    Granting the model graph zero fixed cost of its own::

        streaming / re-windowing <= (floor + 60 k_int8) / (floor + k_int8)
        int8 / fp32              <= (floor + k_fp32) / (floor + k_int8)

    For example (floor 7 µs, per step 3 µs fp32 and 1.5 µs int8): ×11.2 and ×1.18.
    """
    k8, k32 = per_step_us["ort_int8"], per_step_us["ort_fp32"]
    return {"stream_vs_window": (call_floor_us + WINDOW * k8) / (call_floor_us + k8),
            "int8_vs_fp32": (call_floor_us + k32) / (call_floor_us + k8)}


# -- (4) peers ---------------------------------------------------------------------------


class RollingZ:
    """Rolling z-score over the last ``window`` readings of each device, O(F) per reading.

    Score = RMS over channels of (x - mean) / std; 0 until ``window`` readings were seen.
    """

    def __init__(self, devices: int, n_features: int, window: int = WINDOW):
        self.window = window
        self.buffer = np.zeros((devices, window, n_features))
        self.sum = np.zeros((devices, n_features))
        self.sumsq = np.zeros((devices, n_features))
        self.seen = np.zeros(devices, np.int64)

    def score_learn(self, slots: np.ndarray, x: np.ndarray) -> np.ndarray:
        """slots [B] (distinct), x [B, F] → scores [B]; then learns x."""
        n = np.minimum(self.seen[slots], self.window)[:, None]
        mean = self.sum[slots] / np.maximum(n, 1)
        var = self.sumsq[slots] / np.maximum(n, 1) - mean**2
        z = (x - mean) / np.sqrt(np.maximum(var, 1e-12))
        score = np.where(n[:, 0] >= self.window, np.sqrt(np.mean(z**2, axis=1)), 0.0)
        pos = self.seen[slots] % self.window
        old = self.buffer[slots, pos]
        self.sum[slots] += x - old
        self.sumsq[slots] += x**2 - old**2
        self.buffer[slots, pos] = x
        self.seen[slots] += 1
        return score


def bench_peers(models: Models, counts: Counts, readings: np.ndarray) -> dict:
    """Per reading, timed side by side on the same (scaled) readings: River's HalfSpaceTrees
    (score_one + learn_one, what ``faultwatch eval``'s baseline calls), a streaming rolling
    z-score, and the int8 step, at batch 1 and batched."""
    rows = readings.reshape(-1, readings.shape[-1])[: counts.peer_readings].astype(np.float64)
    batch = BATCHES[-1]
    int8 = models.steps["ort_int8"]
    features = int8.contract.features
    one, many = RollingZ(1, rows.shape[1]), RollingZ(batch, rows.shape[1])
    slot, slots = np.zeros(1, np.int64), np.arange(batch)
    many_rows = rows[np.arange(batch) % len(rows)]
    calls: dict[str, Callable[[], object]] = {
        "rolling_zscore": Cycle(lambda row: one.score_learn(slot, row), list(rows[:, None])),
        "rolling_zscore_batched": lambda: many.score_learn(slots, many_rows),
        "ort_int8_batch1": OrtStepper(int8, rows[:1, None].astype(np.float32)),
        "ort_int8_batched": OrtStepper(int8, many_rows[:, None].astype(np.float32)),
    }
    out: dict = {"readings": len(rows), "batched_at": batch}
    try:
        import river
        from river.anomaly import HalfSpaceTrees
    except ImportError:
        out["half_space_trees"] = None
        out["half_space_trees_note"] = "river not installed (pip install river)"
    else:
        hst = HalfSpaceTrees(seed=42)  # River's defaults: 10 trees, height 8, window 250
        dicts = [dict(zip(features, np.clip(r, 0, 1).tolist(), strict=True)) for r in rows]
        for d in dicts[:250]:  # past the first window, so scores are live
            hst.learn_one(d)

        def hst_one(d: dict) -> None:
            hst.score_one(d)
            hst.learn_one(d)

        calls["half_space_trees"] = Cycle(hst_one, dicts)
        out["river_version"] = river.__version__
    seconds = time_interleaved(calls, counts.rounds, counts.block_s)
    for name, sec in seconds.items():
        out[name] = sec * 1e6 / (batch if name.endswith("batched") else 1)
    hst_us = out["half_space_trees"]
    say(f"peers per reading: HalfSpaceTrees {'n/a' if hst_us is None else f'{hst_us:.1f} µs'}, "
        f"rolling z {out['rolling_zscore']:.1f} µs (batched {out['rolling_zscore_batched']:.2f} µs), "
        f"int8 step {out['ort_int8_batch1']:.1f} µs (batched {out['ort_int8_batched']:.2f} µs)")
    return out
