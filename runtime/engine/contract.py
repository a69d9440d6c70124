"""The model contract: the one place that says what a faultwatch ONNX file holds.

Export writes it, the runtime checks it at load, tests read it. Nothing else
may spell an input name or a metadata key.

The step graph runs ``T`` time steps for ``B`` devices at once::

    inputs   readings      [B, T, F]   float32, scaled to the training range
             h_in_{i}      [1, B, H_i] float32, hidden state of recurrent layer i
             c_in_{i}      [1, B, H_i] float32, cell state of layer i (LSTM only)
    outputs  forecast      [B, T, K]   float32, scaled forecast of the *next* reading
             h_out_{i}     [1, B, H_i]
             c_out_{i}     [1, B, H_i]

``F`` is the number of input features, ``K`` the number of forecast targets
(a subset of the features, by name). Batch and time are dynamic.

Metadata (ONNX ``metadata_props``, all values are strings, JSON where
structured) carries everything else the runtime needs: the feature names,
the scaler, the residual spread per target, the threshold calibration, the
detector's decision settings (:class:`DetectorSettings`: a file without them
gets the settings the runtime used before they were stored) and the
provenance of the model.

Compatibility: a reader ignores keys it does not know and gives fields that a
file lacks their defaults, so optional fields (like ``architecture``) can be
added within a version. :data:`CONTRACT_VERSION` is bumped only for a change an
older runtime would misread (a new state layout, a changed input, ...), and a
runtime refuses a file with a newer version.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from faultwatch.runtime.engine.detector import DetectorSettings, DetectorSettingsError

#: Bumped when a change would make an older runtime misread a newer model.
CONTRACT_VERSION = 1

READINGS = "readings"
FORECAST = "forecast"

#: The ONNX metadata key holding the JSON-encoded :class:`ModelContract`.
METADATA_KEY = "faultwatch.contract"


def h_in(layer: int) -> str:
    return f"h_in_{layer}"


def c_in(layer: int) -> str:
    return f"c_in_{layer}"


def h_out(layer: int) -> str:
    return f"h_out_{layer}"


def c_out(layer: int) -> str:
    return f"c_out_{layer}"


class ContractError(ValueError):
    """A model file does not satisfy the contract; the message names the mismatch."""


@dataclass(frozen=True)
class Scaler:
    """Affine per-feature scaling fitted on the training part only.

    ``scaled = (raw - offset) / scale``; constant columns get ``scale = 1``.
    """

    kind: str  # "minmax" or "standard"
    offset: tuple[float, ...]
    scale: tuple[float, ...]

    @classmethod
    def fit(cls, values: np.ndarray, kind: str = "minmax") -> Scaler:
        """Fit on ``values`` [N, F] (NaN ignored); constant columns get scale 1."""
        if kind == "minmax":
            offset = np.nanmin(values, axis=0)
            scale = np.nanmax(values, axis=0) - offset
        elif kind == "standard":
            offset = np.nanmean(values, axis=0)
            scale = np.nanstd(values, axis=0)
        else:
            raise ValueError(f"unknown scaler {kind!r} (minmax or standard)")
        scale = np.where(np.isfinite(scale) & (scale > 1e-12), scale, 1.0)
        return cls(kind, tuple(float(v) for v in offset), tuple(float(v) for v in scale))

    def transform(self, raw: np.ndarray) -> np.ndarray:
        """raw [..., F] → scaled [..., F] float32."""
        return ((raw - np.asarray(self.offset)) / np.asarray(self.scale)).astype(np.float32)

    def inverse(self, scaled: np.ndarray, index: tuple[int, ...] | None = None) -> np.ndarray:
        """scaled [..., K] → raw units, for the features at ``index`` (all when None)."""
        offset, scale = np.asarray(self.offset), np.asarray(self.scale)
        if index is not None:
            offset, scale = offset[list(index)], scale[list(index)]
        return scaled * scale + offset


@dataclass(frozen=True)
class Calibration:
    """What the scorer and detector need, measured on held-out data with the exported model.

    ``residual_std`` is per target, in scaled units: the long-run spread, at
    the score's smoothing span ``score_span``, of (reading - forecast made one
    step earlier) on normal data (see ``runtime.calibration.calibrate``).
    ``threshold`` is on the score of ``runtime.scoring.Scorer``: the RMS over
    channels of each channel's EWMA-smoothed normalised error, about 1 on
    normal data. ``threshold = factor × quantile`` of the held-out scores.
    """

    residual_std: tuple[float, ...]
    threshold: float
    quantile: float
    factor: float
    score_span: int
    warmup: int
    n_scores: int


@dataclass(frozen=True)
class DetectorCalibration:
    """What the detector's spike score and likelihood threshold need, measured with the exported
    model on the same normal rows as :class:`Calibration` (``runtime.engine.calibration``).

    ``spike_residual_std`` [K]: each target's plain error RMS (scaled units), the spread of the
    unsmoothed score; ``spike_threshold``: factor × quantile of that score; ``ratio_mean`` and
    ``ratio_var``: mean and variance of ``x`` = the detector's score over the static threshold,
    where each device's likelihood estimate starts.
    """

    spike_residual_std: tuple[float, ...]
    spike_threshold: float
    ratio_mean: float
    ratio_var: float


@dataclass(frozen=True)
class ModelContract:
    """Everything the runtime needs to run and interpret a faultwatch model."""

    cell: str  # "lstm" (peephole or not: same state) or "gru" (no c state)
    hidden: tuple[int, ...]  # H_i per recurrent layer
    features: tuple[str, ...]  # F input channel names, in tensor order
    targets: tuple[str, ...]  # K forecast channel names, a subset of features
    scaler: Scaler
    calibration: Calibration
    quantization: str  # "none", "int8", "int8-static" or "fp16"; the graph's I/O is float32 in all
    sample_period_s: float  # median spacing of the training readings
    provenance: dict[str, Any] = field(default_factory=dict)
    #: Descriptive only (the runtime needs none of it): peephole, dense width, parameters per layer...
    architecture: dict[str, Any] = field(default_factory=dict)
    version: int = CONTRACT_VERSION
    #: Every decision the runtime makes from the score (None: the legacy settings of the calibration).
    detector: DetectorSettings | None = None
    #: The spike score's spread and threshold and where the likelihood starts (None: not measured).
    detector_calibration: DetectorCalibration | None = None

    @property
    def decisions(self) -> DetectorSettings:
        """The detector settings this model runs with (the legacy ones for an older file)."""
        if self.detector is not None:
            return self.detector
        c = self.calibration
        return DetectorSettings.legacy(c.score_span, c.warmup, c.quantile, c.factor)

    @property
    def has_cell_state(self) -> bool:
        return self.cell == "lstm"

    @property
    def target_index(self) -> tuple[int, ...]:
        """Position of each target in the feature vector."""
        return tuple(self.features.index(t) for t in self.targets)

    def input_names(self) -> list[str]:
        names = [READINGS]
        for i in range(len(self.hidden)):
            names.append(h_in(i))
            if self.has_cell_state:
                names.append(c_in(i))
        return names

    def output_names(self) -> list[str]:
        names = [FORECAST]
        for i in range(len(self.hidden)):
            names.append(h_out(i))
            if self.has_cell_state:
                names.append(c_out(i))
        return names

    def state_names(self) -> list[tuple[str, str, int]]:
        """(input name, output name, width) of every state tensor, in graph order."""
        pairs = []
        for i, width in enumerate(self.hidden):
            pairs.append((h_in(i), h_out(i), width))
            if self.has_cell_state:
                pairs.append((c_in(i), c_out(i), width))
        return pairs

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelContract:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ContractError(f"{METADATA_KEY} is not valid JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise ContractError(f"{METADATA_KEY} must be a JSON object")
        version = raw.get("version")
        if not isinstance(version, int):
            raise ContractError(f"{METADATA_KEY} has no integer 'version'")
        if version > CONTRACT_VERSION:
            raise ContractError(
                f"model uses contract version {version}, this faultwatch reads up to "
                f"{CONTRACT_VERSION}: upgrade faultwatch"
            )
        try:
            contract = cls(
                cell=raw["cell"],
                hidden=tuple(int(h) for h in raw["hidden"]),
                features=tuple(raw["features"]),
                targets=tuple(raw["targets"]),
                scaler=Scaler(
                    kind=raw["scaler"]["kind"],
                    offset=tuple(raw["scaler"]["offset"]),
                    scale=tuple(raw["scaler"]["scale"]),
                ),
                calibration=Calibration(**raw["calibration"]),
                quantization=raw["quantization"],
                sample_period_s=float(raw["sample_period_s"]),
                provenance=dict(raw.get("provenance", {})),
                architecture=dict(raw.get("architecture", {})),
                version=version,
                detector=(DetectorSettings.from_dict(raw["detector"])
                          if isinstance(raw.get("detector"), dict) else None),
                detector_calibration=_detector_calibration(raw.get("detector_calibration")),
            )
        except DetectorSettingsError as exc:
            raise ContractError(f"{METADATA_KEY}: {exc}") from None
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ContractError(f"{METADATA_KEY} is missing or has a malformed field: "
                                f"{type(exc).__name__} {exc}") from None
        contract.validate()
        return contract

    def validate(self) -> None:
        """Raise :class:`ContractError` naming the first inconsistency.

        Everything the runtime computes with is checked here, once, so a crafted or damaged
        file is refused at load (start, ``--check-config``, reload) instead of producing null
        forecasts (``scale: 0``) or a traceback later.
        """
        if self.cell not in ("lstm", "gru"):
            raise ContractError(f"unknown cell {self.cell!r}")
        if not self.hidden or any(not isinstance(h, int) or h <= 0 for h in self.hidden):
            raise ContractError(f"bad hidden sizes {self.hidden}")
        n = len(self.features)
        if n == 0 or len(set(self.features)) != n or not all(isinstance(f, str) and f for f in self.features):
            raise ContractError("features must be non-empty, unique strings")
        missing = [t for t in self.targets if t not in self.features]
        if not self.targets or missing or len(set(self.targets)) != len(self.targets):
            raise ContractError(f"targets not among features (or repeated): {missing or list(self.targets)}")
        if self.scaler.kind not in ("minmax", "standard"):
            raise ContractError(f"unknown scaler kind {self.scaler.kind!r}")
        if len(self.scaler.offset) != n or len(self.scaler.scale) != n:
            raise ContractError(f"scaler has the wrong width for {n} features")
        _finite("scaler.offset", self.scaler.offset)
        _positive("scaler.scale", self.scaler.scale)
        if not isinstance(self.quantization, str):
            raise ContractError(f"quantization must be a string, got {self.quantization!r}")
        _positive("sample_period_s", (self.sample_period_s,))
        cal = self.calibration
        if len(cal.residual_std) != len(self.targets):
            raise ContractError("calibration.residual_std must have one entry per target")
        _positive("calibration.residual_std", cal.residual_std)
        _positive("calibration.threshold", (cal.threshold,))
        for name, least in (("score_span", 1), ("warmup", 0), ("n_scores", 0)):
            value = getattr(cal, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ContractError(f"calibration.{name} must be a whole number >= {least}, got {value!r}")
        dc = self.detector_calibration
        if dc is not None:
            if len(dc.spike_residual_std) != len(self.targets):
                raise ContractError("detector_calibration.spike_residual_std must have one entry per target")
            _positive("detector_calibration.spike_residual_std", dc.spike_residual_std)
            _positive("detector_calibration.spike_threshold", (dc.spike_threshold,))
            _finite("detector_calibration.ratio_mean", (dc.ratio_mean,))
            _positive("detector_calibration.ratio_var", (dc.ratio_var,))
        if self.detector is not None and self.detector.score_span != self.calibration.score_span:
            raise ContractError(f"detector.score_span {self.detector.score_span} differs from the "
                                f"span the calibration was measured at ({self.calibration.score_span})")


def _numbers(name: str, values: tuple) -> np.ndarray:
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        raise ContractError(f"{name} must hold numbers, got {list(values)[:4]}")
    return np.asarray(values, dtype=np.float64)


def _finite(name: str, values: tuple) -> None:
    if not np.isfinite(_numbers(name, values)).all():
        raise ContractError(f"{name} must be finite, got {list(values)[:4]}")


def _positive(name: str, values: tuple) -> None:
    """Finite and > 0: a divisor (scale, spread, period) or a threshold."""
    a = _numbers(name, values)
    if not (np.isfinite(a) & (a > 0)).all():
        raise ContractError(f"{name} must be finite and > 0, got {list(values)[:4]}")


def _detector_calibration(raw: Any) -> DetectorCalibration | None:
    if not isinstance(raw, dict):
        return None
    return DetectorCalibration(spike_residual_std=tuple(float(v) for v in raw["spike_residual_std"]),
                               spike_threshold=float(raw["spike_threshold"]),
                               ratio_mean=float(raw["ratio_mean"]), ratio_var=float(raw["ratio_var"]))
