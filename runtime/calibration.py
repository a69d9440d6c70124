"""Measuring, with the deployed model itself, what normal forecast errors look like.

Export runs this on the held-out part of the training data with the exported
(possibly quantized) ONNX model, so the residual spread and the threshold
fit the numbers the edge will really compute.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .contract import Calibration
from .model import StepModel
from .scoring import smoothed_scores


def streamed_forecasts(model: StepModel, series: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Each scaled series [N, F] streamed one reading at a time → forecasts [N, K].

    Series of equal length share one batched call per step.
    """
    out: list[np.ndarray | None] = [None] * len(series)
    by_length: dict[int, list[int]] = {}
    for i, s in enumerate(series):
        by_length.setdefault(len(s), []).append(i)
    for length, members in by_length.items():
        batch = np.stack([series[i] for i in members]).astype(np.float32)  # [B, N, F]
        state = model.zero_state(len(members))
        forecasts = np.empty((len(members), length, len(model.contract.targets)), np.float32)
        for t in range(length):
            f, state = model.step(batch[:, t:t + 1], state)  # f: [B, 1, K]
            forecasts[:, t] = f[:, 0]
        for j, i in enumerate(members):
            out[i] = forecasts[j]
    return out  # type: ignore[return-value]


def held_out_residuals(
    series: Sequence[np.ndarray],
    splits: Sequence[int],
    forecasts: Sequence[np.ndarray],
    target_index: Sequence[int],
) -> list[np.ndarray]:
    """Residuals [N_i - split_i, K] of each series' held-out part.

    ``forecasts[i][t]`` is the forecast made at reading t for reading t + 1, streamed from
    a zero state at the start of the series: by the held-out part the state is as
    long-lived as a running daemon's.
    """
    idx = list(target_index)
    return [s[max(split, 1):, idx] - f[max(split, 1) - 1:-1]
            for s, split, f in zip(series, splits, forecasts, strict=True)]


def calibrate(
    residuals: Sequence[np.ndarray],
    *,
    span: int = 5,
    warmup: int = 30,
    quantile: float = 0.995,
    factor: float = 1.5,
) -> Calibration:
    """Residual spread per target and the static threshold on the smoothed score.

    threshold = ``factor`` × the ``quantile`` of smoothed scores on normal data.
    """
    stacked = np.concatenate(residuals)  # [sum N, K]
    if len(stacked) < 10:
        raise ValueError(f"need at least 10 held-out readings to calibrate, got {len(stacked)}")
    std = np.maximum(stacked.std(axis=0), 1e-6)
    scores = np.concatenate([smoothed_scores(r, std, span) for r in residuals])
    return Calibration(
        residual_std=tuple(float(v) for v in std),
        threshold=float(np.quantile(scores, quantile) * factor),
        quantile=quantile,
        factor=factor,
        score_span=span,
        warmup=warmup,
        n_scores=len(scores),
    )
