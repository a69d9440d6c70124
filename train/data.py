"""Turning a sensor table into scaled training series, without leaking the validation part.

Each device is its own series: split chronologically (the first part trains,
the last ``val_fraction`` validates), the scaler is fitted on the training
parts only, and missing cells are interpolated along time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from faultwatch.runtime.engine.contract import Scaler
from faultwatch.runtime.offline.csvdata import LABEL_COLUMNS, CsvError, Table


@dataclass(frozen=True)
class Series:
    """One device's readings, scaled: ``scaled`` [N, F] float32, ``split`` = first validation row."""

    device: str
    scaled: np.ndarray
    split: int


@dataclass(frozen=True)
class Prepared:
    features: tuple[str, ...]
    targets: tuple[str, ...]
    scaler: Scaler
    series: list[Series]
    n_interpolated: int  # missing cells filled for training
    sample_period_s: float


def interpolate_missing(values: np.ndarray) -> tuple[np.ndarray, int]:
    """Fill NaN cells of ``values`` [N, F] linearly along time (edges: nearest); return the count."""
    out = values.copy()
    idx = np.arange(len(out))
    missing = np.isnan(out)
    for j in np.flatnonzero(missing.any(axis=0)):
        ok = ~missing[:, j]
        if not ok.any():
            raise CsvError(f"column {j} has no values at all")
        out[:, j] = np.interp(idx, idx[ok], out[ok, j])
    return out, int(missing.sum())


def choose_features(table: Table, features: list[str] | None, exclude: list[str]) -> tuple[str, ...]:
    """The model inputs: named ones, or every numeric column but labels and ``exclude``."""
    if features:
        table.select(features)  # raises naming a missing column
        chosen = tuple(features)
    else:
        chosen = tuple(c for c in table.columns if c.lower() not in LABEL_COLUMNS and c not in exclude)
    if not chosen:
        raise CsvError(f"{table.path}: no numeric feature columns")
    return chosen


def prepare(
    table: Table,
    *,
    features: list[str] | None = None,
    exclude: Sequence[str] = (),
    targets: list[str] | None = None,
    val_fraction: float = 0.2,
    scaler_kind: str = "minmax",
    min_rows: int = 20,
) -> Prepared:
    feats = choose_features(table, features, list(exclude))
    targs = tuple(targets) if targets else feats
    bad = [t for t in targs if t not in feats]
    if bad:
        raise CsvError(f"target {bad[0]!r} is not among the features")
    raw = table.select(feats)  # [N, F]
    per_device, train_parts, periods, n_missing = [], [], [], 0
    for device, rows in table.device_rows().items():
        order = rows[np.argsort(table.timestamps[rows], kind="stable")]
        if len(order) < min_rows:
            raise CsvError(f"{table.path}: device {device!r} has {len(order)} rows, need {min_rows}")
        values, filled = interpolate_missing(raw[order])
        n_missing += filled
        split = round(len(order) * (1.0 - val_fraction))
        per_device.append((device, values, split))
        train_parts.append(values[:split])
        periods.append(np.diff(table.timestamps[order]))
    scaler = Scaler.fit(np.concatenate(train_parts), scaler_kind)
    series = [Series(d, scaler.transform(v), s) for d, v, s in per_device]
    gaps = np.concatenate(periods)
    period = float(np.median(gaps[gaps > 0])) if (gaps > 0).any() else 1.0
    return Prepared(feats, targs, scaler, series, n_missing, period)
