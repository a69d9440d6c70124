"""Baseline detectors for ``faultwatch eval``: same protocol, same decisions, no neural network.

Each baseline turns a file's readings into one score per reading, causally
(reading t's score uses readings up to t only), learning from the training
rows first. ``faultwatch eval`` then calibrates a threshold on the training
rows' scores exactly as for the forecaster and runs the same
:class:`~faultwatch.runtime.engine.scoring.FaultDetector`, so the comparison is of
scores, not of decision rules.

- :func:`rolling_zscore` — each channel's signed distance from the mean of
  the readings before it, in units of their spread, over a trailing window:
  a forecaster that predicts the recent mean. ``faultwatch eval`` scores these
  z's with the same :class:`~faultwatch.runtime.engine.scoring.Scorer` (smoothing,
  long-run normalisation) as the LSTM's errors, so the comparison isolates
  what the network adds.
- :func:`half_space_trees` — River's ``HalfSpaceTrees`` (Tan et al. 2011),
  when ``river`` is installed (``pip install 'faultwatch[baselines]'``).
"""

from __future__ import annotations

from collections.abc import Hashable

import numpy as np


def rolling_zscore(values: np.ndarray, window: int = 120) -> np.ndarray:
    """values [N, F] (NaN = missing) → signed z [N, F]; NaN until ``window // 4`` readings are in.

    >>> x = np.r_[np.tile([[0.0], [1.0]], (50, 1)), [[10.0]]]
    >>> z = rolling_zscore(x, window=20)
    >>> bool(np.nanmax(np.abs(z[:-1])) < 2.0), round(float(z[-1, 0]), 1)
    (True, 19.0)
    """
    x = np.asarray(values, dtype=np.float64)
    n, f = x.shape
    ok = np.isfinite(x)
    filled = np.where(ok, x, 0.0)
    zeros = np.zeros((1, f))
    c1 = np.concatenate([zeros, np.cumsum(filled, axis=0)])  # [N + 1, F]
    c2 = np.concatenate([zeros, np.cumsum(filled**2, axis=0)])
    cn = np.concatenate([zeros, np.cumsum(ok, axis=0)])
    t = np.arange(n)
    lo = np.maximum(t - window, 0)
    count = cn[t] - cn[lo]  # readings before t in the window [t - window, t)
    mean = (c1[t] - c1[lo]) / np.maximum(count, 1)
    var = (c2[t] - c2[lo]) / np.maximum(count, 1) - mean**2
    std = np.sqrt(np.maximum(var, 0.0))
    floor = 1e-9 + 1e-6 * np.abs(mean)
    return np.where(ok & (count >= max(window // 4, 2)), (filled - mean) / np.maximum(std, floor), np.nan)


def river_available() -> bool:
    try:
        import river  # noqa: F401
    except ImportError:
        return False
    return True


def half_space_trees(values: np.ndarray, n_train: int, *, n_trees: int = 10, height: int = 8,
                     window_size: int = 250, seed: int = 0) -> np.ndarray:
    """River's HalfSpaceTrees over values [N, F] → score [N] in [0, 1].

    Features are min-max scaled with the training rows' range (HST expects [0, 1]) and
    clipped to [-0.5, 1.5] so a far-out reading stays in the trees' space. The model
    learns every reading after scoring it (it is an unsupervised streaming detector).
    """
    from river.anomaly import HalfSpaceTrees

    x = np.asarray(values, dtype=np.float64)
    train = x[:n_train]
    lo, hi = np.nanmin(train, axis=0), np.nanmax(train, axis=0)
    span = np.where(hi - lo > 1e-12, hi - lo, 1.0)
    scaled = np.clip((x - lo) / span, -0.5, 1.5)
    names = [f"x{j}" for j in range(x.shape[1])]
    limits: dict[Hashable, tuple[float, float]] = dict.fromkeys(names, (-0.5, 1.5))
    model = HalfSpaceTrees(n_trees=n_trees, height=height, window_size=window_size, seed=seed,
                           limits=limits)
    scores = np.zeros(len(x))
    for t, row in enumerate(scaled):
        sample = {k: float(v) for k, v in zip(names, row, strict=True) if np.isfinite(v)}
        scores[t] = model.score_one(sample)
        model.learn_one(sample)
    return scores
