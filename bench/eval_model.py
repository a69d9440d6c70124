"""The torch half of ``faultwatch eval``: train, export and calibrate one model per benchmark file.

``faultwatch.bench.evaluate`` imports this lazily, in its worker processes:
the runtime half (streaming, scoring, metrics, reports) never needs torch.

One call of :func:`fit_and_export` is the benchmark protocol's training step
for one file: train the forecaster on the training rows only, export it
(int8 by default, with export's own parity checks), then calibrate the
scorer on *all* the training rows with the exported model itself and write
that calibration into the file's contract. Export alone calibrates on the
held-out fifth of the training data, which is what a production model with
thousands of readings wants; a benchmark file gives 400 rows, and a
threshold estimated from 80 of them would mostly measure chance.

:func:`pretrain` + ``fit_and_export(..., init=...)`` is the ``--pretrain``
protocol: one model trained on long normal data, fine-tuned per file. Each
file keeps its own scaler (fitted on its training rows, as in the per-file
protocol): the base model learns the rig's dynamics in scaled units, and a
file recorded in another operating range (SKAB's anomaly-free run has other
flow, vibration and temperature levels than valve1) still lands in [0, 1].
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import onnx
import torch
from faultwatch.export.build import ExportOptions, export_model
from faultwatch.export.onnx_graph import ExportError, with_contract
from faultwatch.runtime.engine.calibration import calibrate, calibrate_detector, streamed_forecasts
from faultwatch.runtime.engine.detector import DetectorSettings
from faultwatch.runtime.engine.model import StepModel
from faultwatch.runtime.offline.csvdata import Table
from faultwatch.train.checkpoint import load_checkpoint, save_checkpoint
from faultwatch.train.data import Prepared, prepare
from faultwatch.train.fit import TrainConfig, TrainResult, fit
from faultwatch.train.model import ForecasterConfig
from faultwatch.train.options import TrainOptions

PARITY_ATTEMPTS = 5


@dataclass(frozen=True)
class BenchSpec:
    """The model, loop and calibration used for every file of a benchmark run.

    Small on purpose: a benchmark trains one model per file on a few hundred
    rows, and 34 files must train in minutes on two cores. Where it keeps the
    recipe's setting, the default is TrainOptions' (faultwatch.train.options).
    """

    hidden: tuple[int, ...] = (32,)
    dense: int = 0
    dropout: float = 0.0
    epochs: int = 80
    lr: float = 1e-2
    look_back: int = 20
    batch_size: int = 4
    patience: int = 20
    seed: int = TrainOptions.seed
    val_fraction: float = TrainOptions.val_fraction
    device: str = TrainOptions.device  # each worker process trains on it
    precision: str = TrainOptions.precision
    quantize: str = "int8"
    fine_tune_epochs: int = 20
    fine_tune_lr: float = 2e-3
    calibrate_on: str = "all"  # or "held-out": only the validation part

    def to_dict(self) -> dict:
        return asdict(self)


def head(table: Table, n: int) -> Table:
    """The first ``n`` rows of a table (in file order)."""
    return replace(table, timestamps=table.timestamps[:n], devices=table.devices[:n],
                   values=table.values[:n], labels={k: v[:n] for k, v in table.labels.items()})


def _train_config(spec: BenchSpec, epochs: int, lr: float) -> TrainConfig:
    return TrainConfig(mode="stateful", look_back=spec.look_back, batch_size=spec.batch_size,
                       epochs=epochs, lr=lr, patience=spec.patience, seed=spec.seed,
                       device=spec.device, precision=spec.precision)


def pretrain(table: Table, run_dir: Path, spec: BenchSpec, features: tuple[str, ...]) -> Path:
    """Train the ``--pretrain`` base model on a long normal recording; returns its run directory."""
    prepared = prepare(table, features=list(features), val_fraction=spec.val_fraction)
    config = ForecasterConfig(n_features=len(prepared.features),
                              target_index=tuple(range(len(prepared.features))),
                              hidden=spec.hidden, dense=spec.dense, dropout=spec.dropout)
    tconfig = _train_config(spec, spec.epochs, spec.lr)
    result = fit(prepared, config, tconfig)
    save_checkpoint(run_dir, result, prepared, tconfig,
                    {"data_path": table.path, "data_sha256": table.sha256, "protocol": "pretrain",
                     "best_epoch": result.best_epoch, "val_loss": result.best_val_loss})
    return run_dir


def recalibrate(model_path: Path, prepared: Prepared, spec: BenchSpec, detector: DetectorSettings) -> dict:
    """Calibrate the scorer with the exported model and rewrite its contract.

    ``held-out``: on the validation part only, the EWMA led in by the rows before it, so the
    spread and threshold are those of readings the model never trained on. ``all``: on every
    training row after the warm-up (in-sample: the spread comes out smaller than on new data).
    """
    model = StepModel(model_path)
    series = [s.scaled for s in prepared.series]
    forecasts = streamed_forecasts(model, series)
    idx = list(model.contract.target_index)
    # residuals[t] is reading t + 1 against the forecast made at reading t.
    residuals = [s[1:, idx] - f[:-1] for s, f in zip(series, forecasts, strict=True)]
    d = detector
    if spec.calibrate_on == "held-out":
        lead = 2 * d.score_span
        starts = [max(s.split - 1 - lead, d.warmup) for s in prepared.series]
        residuals = [r[a:] for r, a in zip(residuals, starts, strict=True)]
        settle = [s.split - 1 - a for s, a in zip(prepared.series, starts, strict=True)]
        calibration = calibrate(residuals, span=d.score_span, warmup=d.warmup,
                                quantile=d.quantile, factor=d.factor, settle=min(settle))
        detector_calibration = calibrate_detector(residuals, calibration, d, settle=min(settle))
    elif spec.calibrate_on == "all":
        calibration = calibrate([r[d.warmup:] for r in residuals], span=d.score_span,
                                warmup=d.warmup, quantile=d.quantile, factor=d.factor)
        detector_calibration = calibrate_detector([r[d.warmup:] for r in residuals], calibration, d)
    else:
        raise ValueError(f"calibrate_on must be 'held-out' or 'all', got {spec.calibrate_on!r}")
    # The contract carries the detector it was calibrated for (the one it was exported with, or
    # another one an ``eval --models`` run measures).
    contract = replace(model.contract, calibration=calibration, detector_calibration=detector_calibration,
                       detector=detector,
                       provenance=model.contract.provenance | {"calibrated_on": spec.calibrate_on})
    model_path.write_bytes(with_contract(onnx.load(model_path), contract))
    return asdict(calibration) | {"detector": asdict(detector_calibration)}


def reuse_and_calibrate(source: Path, train: Table, out: Path, spec: BenchSpec, features: tuple[str, ...],
                        detector: DetectorSettings, targets: tuple[str, ...] | None = None) -> dict:
    """``faultwatch eval --models``: the model an earlier run exported for this file, with
    ``detector`` written into it and calibrated on ``train`` as :func:`fit_and_export` would.

    The forecasts stay those of the earlier run, so only the decisions change: a detector
    setting is measured without retraining (and without a training seed moving the numbers).
    A model from other data, other training rows or other columns is refused (ValueError).
    """
    if not source.is_file():
        raise ValueError(f"{source}: no model for this file in the earlier run")
    prepared = prepare(train, features=list(features), targets=list(targets) if targets else None,
                       val_fraction=spec.val_fraction)
    contract = StepModel(source).contract
    if contract.provenance.get("data_sha256") != train.sha256:
        raise ValueError(f"{source} was trained on other data (sha256 differs)")
    if (contract.features, contract.targets) != (prepared.features, prepared.targets):
        raise ValueError(f"{source} forecasts {contract.targets} from {contract.features}, "
                         f"this run {prepared.targets} from {prepared.features}")
    if not (np.allclose(contract.scaler.offset, prepared.scaler.offset)
            and np.allclose(contract.scaler.scale, prepared.scaler.scale)):
        raise ValueError(f"{source} was trained on other rows of this file (its scaler differs)")
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, out)
    calibration = recalibrate(out, prepared, spec, detector)  # writes the detector in, calibrated
    return {"reused_model": str(source), "calibration": calibration}


def _train_once(prepared: Prepared, spec: BenchSpec, init: Path | None,
                seed: int) -> tuple[TrainResult, TrainConfig]:
    if init is None:
        config = ForecasterConfig(n_features=len(prepared.features),
                                  target_index=tuple(prepared.features.index(t) for t in prepared.targets),
                                  hidden=spec.hidden, dense=spec.dense, dropout=spec.dropout)
        tconfig = replace(_train_config(spec, spec.epochs, spec.lr), seed=seed)
        return fit(prepared, config, tconfig), tconfig
    base, _, base_prepared = load_checkpoint(init)
    if base_prepared.features != prepared.features:
        raise ValueError(f"features {prepared.features} differ from the pretrained model's "
                         f"{base_prepared.features}")
    tconfig = replace(_train_config(spec, spec.fine_tune_epochs, spec.fine_tune_lr), seed=seed)
    return fit(prepared, base.config, tconfig, init=base), tconfig


def fit_and_export(train: Table, out: Path, spec: BenchSpec, features: tuple[str, ...],
                   init: Path | None = None, detector: DetectorSettings | None = None,
                   targets: tuple[str, ...] | None = None) -> dict:
    """Train on ``train`` (from scratch, or fine-tuning the run at ``init``) to forecast
    ``targets`` (default: every feature), export to ``out`` with ``detector`` written into it,
    calibrate (:func:`recalibrate`). Returns what happened, for the report.

    Export refuses a quantized model whose streamed forecasts drift from torch's beyond its
    tolerance; the benchmark then trains again with the next seed (at most ``PARITY_ATTEMPTS``
    times), as an operator would, and records the attempts.
    """
    started = time.monotonic()
    torch.set_num_threads(1)  # benchmark workers run side by side, one per core
    detector = detector or DetectorSettings()
    prepared = prepare(train, features=list(features), targets=list(targets) if targets else None,
                       val_fraction=spec.val_fraction)
    refused = []
    for attempt in range(PARITY_ATTEMPTS):
        result, tconfig = _train_once(prepared, spec, init, spec.seed + attempt)
        trained = time.monotonic()
        with tempfile.TemporaryDirectory() as tmp:
            run_dir = Path(tmp)
            save_checkpoint(run_dir, result, prepared, tconfig,
                            {"data_path": train.path, "data_sha256": train.sha256,
                             "protocol": "fine-tune" if init else "per-file",
                             "best_epoch": result.best_epoch, "val_loss": result.best_val_loss})
            try:
                report = export_model(run_dir, out, ExportOptions(quantize=spec.quantize,
                                                                  detector=detector))
                break
            except ExportError as exc:
                if "parity" not in str(exc) or attempt == PARITY_ATTEMPTS - 1:
                    raise
                refused.append(str(exc))
    calibration = recalibrate(out, prepared, spec, detector)
    return {
        "train_seconds": round(trained - started, 2),
        "export_seconds": round(time.monotonic() - trained, 2),
        "epochs": result.epochs_run,
        "best_epoch": result.best_epoch,
        "seed": tconfig.seed,
        "refused_exports": refused,
        "val_loss": result.best_val_loss if math.isfinite(result.best_val_loss) else None,
        "parity_max_abs_diff": report["parity"]["max_abs_diff"],
        "calibration": calibration,
    }
