"""``faultwatch export RUN_DIR --out model.onnx``: checkpoint → one deployable ONNX file.

Steps: export the fp32 step graph, quantize it if asked, calibrate the
scorer with the exported model on the held-out data, write the contract
into the file's metadata, then prove parity: the ONNX model streamed one
reading at a time matches torch run over the whole sequence at once.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from faultwatch.runtime.calibration import calibrate, held_out_residuals, streamed_forecasts
from faultwatch.runtime.contract import Calibration, ModelContract
from faultwatch.runtime.model import StepModel
from faultwatch.train.checkpoint import load_checkpoint

from .onnx_graph import OPSET, ExportError, op_types, quantize_int8, to_onnx, with_contract

MODES = ("none", "int8")
#: Streamed int8 forecasts may differ from torch fp32 by at most this much (scaled units,
#: where the training range is [0, 1]); fp32 by at most 1e-4.
TOLERANCE = {"none": 1e-4, "int8": 0.02}


@dataclass(frozen=True)
class ExportOptions:
    quantize: str = "int8"
    quantile: float = 0.995
    factor: float = 1.5
    score_span: int = 5
    warmup: int = 30


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@torch.no_grad()
def _torch_forecasts(model, series) -> list[np.ndarray]:
    """Torch over each whole series in one call from a zero state → [N, K]."""
    model.eval()
    return [model(torch.from_numpy(s)[None])[0][0].numpy() for s in series]


def _rmse(residuals: list[np.ndarray]) -> float:
    return float(np.sqrt(np.mean(np.concatenate(residuals) ** 2)))


def export_model(run_dir: Path, out: Path, options: ExportOptions) -> dict:
    if options.quantize not in MODES:
        raise ExportError(f"unknown --quantize {options.quantize!r} (choose from {', '.join(MODES)})")
    model, payload, prepared = load_checkpoint(run_dir)
    provenance = dict(payload["provenance"]) | {"opset": OPSET, "exported_at": time.strftime(
        "%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    placeholder = Calibration((1.0,) * len(prepared.targets), float("inf"), options.quantile,
                              options.factor, options.score_span, options.warmup, 0)
    contract = ModelContract(
        cell=model.config.cell, hidden=model.config.hidden, features=prepared.features,
        targets=prepared.targets, scaler=prepared.scaler, calibration=placeholder,
        quantization=options.quantize, sample_period_s=prepared.sample_period_s,
        provenance=provenance,
    )
    proto = to_onnx(model, contract)
    fp32_bytes = len(proto.SerializeToString())
    if options.quantize == "int8":
        proto = quantize_int8(proto)

    series = [s.scaled for s in prepared.series]
    splits = [s.split for s in prepared.series]
    with tempfile.TemporaryDirectory() as tmp:
        draft = Path(tmp) / "draft.onnx"
        draft.write_bytes(with_contract(proto, contract))
        ort_forecasts = streamed_forecasts(StepModel(draft), series)
    idx = list(model.config.target_index)
    residuals = held_out_residuals(series, splits, ort_forecasts, idx)
    calibration = calibrate(residuals, span=options.score_span, warmup=options.warmup,
                            quantile=options.quantile, factor=options.factor)
    # Parity on the held-out parts: torch, whole sequence vs ONNX, one reading per call.
    torch_forecasts = _torch_forecasts(model, series)
    max_diff = float(max(np.abs(tf[sp:] - of[sp:]).max()
                         for sp, tf, of in zip(splits, torch_forecasts, ort_forecasts, strict=True)))
    rmse_torch = _rmse(held_out_residuals(series, splits, torch_forecasts, idx))
    rmse_onnx = _rmse(residuals)
    contract = replace(contract, calibration=calibration)
    data = with_contract(proto, contract)

    report = {
        "model": str(out),
        "quantize": options.quantize,
        "ops": sorted(op_types(proto)),
        "opset": OPSET,
        "size_bytes": len(data),
        "fp32_size_bytes": fp32_bytes,
        "parity": {
            "held_out_steps": int(sum(len(s) - sp for s, sp in zip(series, splits, strict=True))),
            "max_abs_diff": max_diff,
            "tolerance": TOLERANCE[options.quantize],
            "rmse_torch": rmse_torch,
            "rmse_onnx": rmse_onnx,
            "rmse_rel_change": (rmse_onnx - rmse_torch) / rmse_torch if rmse_torch else 0.0,
        },
        "calibration": asdict(calibration),
    }
    if max_diff > TOLERANCE[options.quantize]:
        raise ExportError(
            f"parity failed, nothing written: streamed ONNX differs from torch by {max_diff:.3g} "
            f"(tolerance {TOLERANCE[options.quantize]:g})"
        )
    _atomic_write(out, data)
    out.with_suffix(".report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
