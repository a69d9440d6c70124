"""Measuring, with the deployed model itself, what normal forecast errors look like.

Export runs this on the held-out part of the training data with the exported
(possibly quantized) ONNX model, so the residual spread and the threshold
fit the numbers the edge will really compute.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from faultwatch.runtime.engine.contract import Calibration, DetectorCalibration
from faultwatch.runtime.engine.detector import DetectorSettings
from faultwatch.runtime.engine.hotpath import all_set
from faultwatch.runtime.engine.model import StepModel
from faultwatch.runtime.engine.scoring import ewma_variance, smoothed_scores


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


def ewma_rows(x: np.ndarray, span: int) -> np.ndarray:
    """EWMA along time of ``x`` [N, K], started at 0 like the scorer after a reset → [N, K]."""
    alpha = 2.0 / (span + 1.0)
    out = np.empty_like(x, dtype=np.float64)
    m = np.zeros(x.shape[1])
    for t, row in enumerate(x):
        m = alpha * row + (1.0 - alpha) * m
        out[t] = m
    return out


def long_run_spread(residuals: Sequence[np.ndarray], span: int, settle: int | None = None) -> np.ndarray:
    """Per target, the spread of the forecast error at the score's smoothing scale → [K].

    RMS of the EWMA-smoothed residuals divided by the noise width an EWMA of
    white noise would have: for white errors this is their plain RMS, for
    autocorrelated ones (a slow channel the model tracks with a lag) it is
    larger, as it must be for the smoothed score of such a channel to be about
    1 on normal data. The first ``settle`` readings of each series (default
    ``span - 1``: the EWMA settling from 0) are left out. With ``span=1`` it is
    the RMS of the residuals.
    """
    settled = []
    for r in residuals:
        smoothed = ewma_rows(np.asarray(r, dtype=np.float64), span)
        skip = min(span - 1 if settle is None else settle, len(r) // 2)
        settled.append(smoothed[skip:])
    stacked = np.concatenate(settled)
    return np.sqrt(np.mean(stacked**2, axis=0) / ewma_variance(span))


def calibrate(
    residuals: Sequence[np.ndarray],
    *,
    span: int = 5,
    warmup: int = 30,
    quantile: float = 0.995,
    factor: float = 1.5,
    settle: int | None = None,
) -> Calibration:
    """Residual spread per target and the static threshold on the score.

    ``residual_std`` is the long-run spread of each target's forecast error at the
    smoothing scale (:func:`long_run_spread`); threshold = ``factor`` × the
    ``quantile`` of the scores on normal data, streamed per series from a reset,
    leaving out each series' first ``warmup`` scores (never compared with it).
    With ``settle``, the first ``settle`` residuals of each series only bring the
    smoothing up to speed: they count neither in the spread nor in the quantile
    (for residuals of a held-out part, led in by the rows before it).
    """
    residuals = [np.asarray(r, dtype=np.float64) for r in residuals if len(r)]
    stacked = np.concatenate(residuals) if residuals else np.zeros((0, 0))
    if len(stacked) < 10:
        raise ValueError(f"need at least 10 held-out readings to calibrate, got {len(stacked)}")
    std = np.maximum(long_run_spread(residuals, span, settle), 1e-6)
    skip = warmup if settle is None else settle
    scores = np.concatenate([smoothed_scores(r, std, span)[min(skip, len(r) // 2):]
                             for r in residuals])
    return Calibration(
        residual_std=tuple(float(v) for v in std),
        threshold=float(np.quantile(scores, quantile) * factor),
        quantile=quantile,
        factor=factor,
        score_span=span,
        warmup=warmup,
        n_scores=len(scores),
    )


def spike_scores(residuals: np.ndarray, spread: np.ndarray) -> np.ndarray:
    """The unsmoothed score of residuals [N, K]: RMS over the measured channels of
    residual / spread → [N] (0 where nothing is measured)."""
    z2 = (np.asarray(residuals, dtype=np.float64) / spread) ** 2  # [N, K]
    measured = np.isfinite(z2)
    if all_set(measured):
        # Every channel measured (the usual reading): the sums below without the masks, same numbers.
        return np.sqrt(np.add.reduce(z2, axis=-1) / z2.shape[-1])
    count = measured.sum(axis=-1)
    return np.sqrt(np.where(measured, z2, 0.0).sum(axis=-1) / np.maximum(count, 1))


def calibrate_detector(residuals: Sequence[np.ndarray], calibration: Calibration,
                       detector: DetectorSettings, settle: int | None = None) -> DetectorCalibration:
    """The spike score's spread and threshold, and the distribution of the detector's score
    relative to the static threshold, on the same rows :func:`calibrate` used."""
    residuals = [np.asarray(r, dtype=np.float64) for r in residuals if len(r)]
    skip = calibration.warmup if settle is None else settle
    spread = np.maximum(long_run_spread(residuals, 1, settle=0), 1e-6)  # [K] plain RMS
    a = [smoothed_scores(r, calibration.residual_std, calibration.score_span)[min(skip, len(r) // 2):]
         for r in residuals]
    b = [spike_scores(r, spread)[min(skip, len(r) // 2):] for r in residuals]
    a_all, b_all = np.concatenate(a), np.concatenate(b)
    spike_threshold = max(float(np.quantile(b_all, detector.quantile) * detector.factor), 1e-9)
    ratio = a_all / calibration.threshold
    if detector.spike:
        ratio = np.maximum(ratio, b_all / spike_threshold)
    return DetectorCalibration(spike_residual_std=tuple(float(v) for v in spread),
                               spike_threshold=spike_threshold, ratio_mean=float(ratio.mean()),
                               ratio_var=float(ratio.var()))
