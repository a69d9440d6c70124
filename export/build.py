"""``faultwatch export RUN_DIR --out model.onnx``: checkpoint → one deployable ONNX file.

Steps: export the fp32 step graph, convert it to the precision asked for,
calibrate the scorer with the exported model on the held-out data, write the
contract into the file's metadata, then prove it: the ONNX checker passes, the
model runs under onnxruntime's default session options and with full graph
optimisation alike, and streamed one reading at a time it matches torch run
over the whole sequence at once. The report (printed by the CLI, saved as
``<model>.report.json``) gives parity, the forecast RMSE change, the file size
and the per-step latency at batch 1.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from faultwatch.export.onnx_graph import (
    OPSET,
    ExportError,
    op_types,
    quantize_int8,
    quantize_int8_static,
    to_fp16,
    to_onnx,
    with_contract,
)
from faultwatch.runtime.engine.calibration import (
    calibrate,
    calibrate_detector,
    held_out_residuals,
    streamed_forecasts,
)
from faultwatch.runtime.engine.contract import READINGS, Calibration, ModelContract
from faultwatch.runtime.engine.detector import DetectorSettings
from faultwatch.runtime.engine.model import StepModel
from faultwatch.runtime.version import VERSION
from faultwatch.train.checkpoint import load_checkpoint

MODES = ("none", "int8", "int8-static", "fp16")
#: Streamed forecasts may differ from torch fp32 by at most this much, in scaled units
#: (the training range is [0, 1]).
TOLERANCE = {"none": 1e-4, "int8": 0.02, "int8-static": 0.02, "fp16": 2e-3}
#: What an int8 file should achieve against fp32 (reported; met on the reference 128/64 model,
#: not by tiny models, whose files are mostly graph and metadata).
INT8_TARGETS = {"max_size_ratio": 0.30, "max_rmse_rel_change": 0.02}
LATENCY_STEPS = 300


@dataclass(frozen=True)
class ExportOptions:
    quantize: str = "int8"
    # Every decision the runtime will make from this model's scores; written into the file.
    detector: DetectorSettings = field(default_factory=DetectorSettings)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _atomic_write(path: Path, data: bytes) -> None:
    """Write, fsync, rename; readable like any file the user writes (0644 under umask 022).

    mkstemp makes 0600 files: copied to an edge device as they are, the service user
    could not read the model.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.fchmod(fd, 0o644 & ~_umask())
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


def step_latency_us(model: StepModel, steps: int = LATENCY_STEPS) -> float:
    """Median wall time of one step at batch 1 (one reading of one device), in µs."""
    x = np.full((1, 1, len(model.contract.features)), 0.5, np.float32)
    state = model.zero_state(1)
    for _ in range(20):
        model.step(x, state)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        _, state = model.step(x, state)
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e6)


def _session_check(data: bytes, contract: ModelContract, series: np.ndarray, expected: np.ndarray) -> dict:
    """Stream ``series`` [N, F] through sessions with default options, full optimisation and none;
    max |forecast - expected| per setting."""
    levels = {"default": None, "full_optimisation": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
              "no_optimisation": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}
    out = {}
    for label, level in levels.items():
        options = ort.SessionOptions()
        if level is not None:
            options.graph_optimization_level = level
        session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        names = [i for i, _, _ in contract.state_names()]
        state = {n: np.zeros((1, 1, w), np.float32) for n, _, w in contract.state_names()}
        got = []
        for t in range(len(series)):
            result = session.run(contract.output_names(), {READINGS: series[None, t:t + 1], **state})
            got.append(result[0][0, 0])
            state = dict(zip(names, result[1:], strict=True))
        out[label] = float(np.abs(np.stack(got) - expected).max())
    return out


def _convert(proto: onnx.ModelProto, mode: str, prepared, contract: ModelContract) -> onnx.ModelProto:
    if mode == "int8":
        return quantize_int8(proto)
    if mode == "int8-static":
        # One calibration feed per device: its training readings in one call, from a zero state.
        zeros = {n: np.zeros((1, 1, w), np.float32) for n, _, w in contract.state_names()}
        feeds = [{READINGS: s.scaled[None, : s.split], **zeros} for s in prepared.series]
        return quantize_int8_static(proto, feeds)
    if mode == "fp16":
        return to_fp16(proto)
    return proto


def export_model(run_dir: Path, out: Path, options: ExportOptions) -> dict:
    if options.quantize not in MODES:
        raise ExportError(f"unknown --quantize {options.quantize!r} (choose from {', '.join(MODES)})")
    model, payload, prepared = load_checkpoint(run_dir)
    if model.config.bidirectional:
        raise ExportError(
            f"{run_dir} is a bidirectional model: it cannot stream, because its backward pass needs "
            "the readings after the one being forecast; retrain without --bidirectional to deploy")
    provenance = dict(payload["provenance"]) | {
        "opset": OPSET, "exported_with": VERSION,
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    # The draft only streams forecasts to calibrate on; a valid contract needs a finite threshold.
    detector = options.detector
    placeholder = Calibration((1.0,) * len(prepared.targets), 1.0, detector.quantile,
                              detector.factor, detector.score_span, detector.warmup, 0)
    architecture = {
        "peephole": model.config.peephole, "dense": model.config.dense,
        "parameters": [[name, count] for name, count in model.parameter_table()],  # in layer order
        "parameters_total": sum(p.numel() for p in model.parameters()),
        "train_mode": payload.get("train_config", {}).get("mode"),
    }
    contract = ModelContract(
        cell=model.config.cell, hidden=model.config.hidden, features=prepared.features,
        targets=prepared.targets, scaler=prepared.scaler, calibration=placeholder,
        quantization=options.quantize, sample_period_s=prepared.sample_period_s,
        provenance=provenance, architecture=architecture, detector=detector,
    )
    fp32 = to_onnx(model, contract)
    proto = _convert(fp32, options.quantize, prepared, contract)

    series = [s.scaled for s in prepared.series]
    splits = [s.split for s in prepared.series]
    with tempfile.TemporaryDirectory() as tmp:
        draft, reference = Path(tmp) / "draft.onnx", Path(tmp) / "fp32.onnx"
        draft.write_bytes(with_contract(proto, contract))
        reference.write_bytes(with_contract(fp32, contract))
        step_model = StepModel(draft)
        ort_forecasts = streamed_forecasts(step_model, series)
        latency = {"model": step_latency_us(step_model), "fp32": step_latency_us(StepModel(reference))}
    idx = list(model.config.target_index)
    residuals = held_out_residuals(series, splits, ort_forecasts, idx)
    calibration = calibrate(residuals, span=detector.score_span, warmup=detector.warmup,
                            quantile=detector.quantile, factor=detector.factor)
    detector_calibration = calibrate_detector(residuals, calibration, detector)
    # Parity on the held-out parts: torch, whole sequence vs ONNX, one reading per call.
    torch_forecasts = _torch_forecasts(model, series)
    max_diff = float(max(np.abs(tf[sp:] - of[sp:]).max()
                         for sp, tf, of in zip(splits, torch_forecasts, ort_forecasts, strict=True)))
    rmse_torch = _rmse(held_out_residuals(series, splits, torch_forecasts, idx))
    rmse_onnx = _rmse(residuals)
    contract = replace(contract, calibration=calibration, detector_calibration=detector_calibration)
    data = with_contract(proto, contract)
    fp32_data = with_contract(fp32, replace(contract, quantization="none"))
    final = onnx.load_from_string(data)
    onnx.checker.check_model(final)  # raises on an invalid graph
    check_len = min(len(series[0]), 200)
    sessions = _session_check(data, contract, series[0][:check_len], ort_forecasts[0][:check_len])

    tolerance = TOLERANCE[options.quantize]
    size_ratio = len(data) / len(fp32_data)
    rel_change = (rmse_onnx - rmse_torch) / rmse_torch if rmse_torch else 0.0
    report = {
        "model": str(out),
        "quantize": options.quantize,
        "cell": model.config.cell,
        "peephole": model.config.peephole,
        "hidden": list(model.config.hidden),
        "ops": sorted(op_types(proto)),
        "opset": OPSET,
        "onnx_checker": "passed",
        "size_bytes": len(data),
        "fp32_size_bytes": len(fp32_data),
        "size_ratio": size_ratio,
        "parity": {
            "held_out_steps": int(sum(len(s) - sp for s, sp in zip(series, splits, strict=True))),
            "max_abs_diff": max_diff,
            "tolerance": tolerance,
            "rmse_torch": rmse_torch,
            "rmse_onnx": rmse_onnx,
            "rmse_rel_change": rel_change,
        },
        "latency_us_per_step_batch1": latency,
        # max |forecast - the runtime's forecast| over the first readings of the first device, per
        # session setting (int8: a fused kernel may round differently from the unfused one)
        "sessions": sessions,
        "calibration": asdict(calibration),
        "detector": detector.to_dict(),
    }
    if options.quantize in ("int8", "int8-static"):
        report["int8_targets"] = INT8_TARGETS | {
            "size_met": size_ratio <= INT8_TARGETS["max_size_ratio"],
            "rmse_met": abs(rel_change) <= INT8_TARGETS["max_rmse_rel_change"]}
    if max_diff > tolerance:
        raise ExportError(f"parity failed, nothing written: streamed ONNX differs from torch by "
                          f"{max_diff:.3g} (tolerance {tolerance:g})")
    worst = max(sessions, key=lambda name: sessions[name])
    if sessions[worst] > tolerance:
        raise ExportError(f"session check failed, nothing written: with {worst.replace('_', ' ')} the "
                          f"forecasts differ by {sessions[worst]:.3g} (tolerance {tolerance:g})")
    _atomic_write(out, data)
    _atomic_write(out.with_suffix(".report.json"), (json.dumps(report, indent=2) + "\n").encode())
    return report
