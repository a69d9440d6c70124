"""``faultwatch bench`` sections (1) model step, (2) its floor and (6) artifacts, and the models
they time: trained on simulator data (or ``--run-dir``) and exported in every precision."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path
from typing import Any

import numpy as np
from faultwatch.bench.speed_common import (
    BATCHES,
    EXPORTS,
    ONE_THREAD,
    STEP_MODES,
    WINDOW,
    BenchOptions,
    CallFloor,
    Counts,
    OrtStepper,
    TorchStepper,
    identity_session,
    label,
    say,
    time_interleaved,
)
from faultwatch.runtime.devtools.simulator import simulate, write_csv
from faultwatch.runtime.engine.engine import Engine, Reading
from faultwatch.runtime.engine.model import StepModel

# -- models ------------------------------------------------------------------------------


@dataclass
class Models:
    torch_model: Any  # faultwatch.train.model.Forecaster, eval mode (torch is imported lazily)
    paths: dict[str, Path]  # EXPORTS' names ("ort_fp32", "ort_int8", ...) → .onnx
    steps: dict[str, StepModel]
    export_reports: dict[str, dict]
    torch_bytes: int  # serialized state_dict
    train_seconds: float
    run_dir: Path


def prepare_models(options: BenchOptions, counts: Counts, workdir: Path) -> Models:
    """Train (unless ``--run-dir``) and export every precision into ``workdir``."""
    import torch
    from faultwatch.export.build import ExportOptions, export_model
    from faultwatch.train.checkpoint import load_checkpoint
    from faultwatch.train.command import train_run
    from faultwatch.train.fit import TrainConfig

    started = time.monotonic()
    run_dir = options.run_dir
    if run_dir is None:
        run_dir = workdir / "run"
        csv = workdir / "train.csv"
        write_csv(simulate(devices=counts.train_devices, steps=counts.train_steps, seed=options.seed), csv)
        say(f"training {options.hidden} / dense {options.dense} for {counts.epochs} epoch(s) "
            f"on {counts.train_devices}×{counts.train_steps} simulated readings")
        train_run(csv, run_dir, hidden=options.hidden, dense=options.dense,
                  train_config=TrainConfig(epochs=counts.epochs, patience=counts.epochs, seed=options.seed),
                  quiet=True)
    train_seconds = time.monotonic() - started
    paths, reports = {}, {}
    for mode, quantize in EXPORTS.items():
        paths[mode] = workdir / f"model-{label(mode)}.onnx"
        say(f"exporting {paths[mode].name}")
        reports[mode] = export_model(Path(run_dir), paths[mode], ExportOptions(quantize=quantize))
    model, payload, _ = load_checkpoint(run_dir)
    buffer = io.BytesIO()
    torch.save(payload["state_dict"], buffer)
    steps = {mode: StepModel(path, threads=1) for mode, path in paths.items()}
    return Models(model, paths, steps, reports, len(buffer.getvalue()), train_seconds, Path(run_dir))


def scaled_readings(models: Models, devices: int, steps: int, seed: int) -> np.ndarray:
    """Fresh simulator readings (another seed than training), scaled: [D, T, F] float32."""
    contract = models.steps["ort_int8"].contract
    data = simulate(devices=devices, steps=steps, seed=seed)
    return contract.scaler.transform(data.values)


# -- (1) step, (2) floor ---------------------------------------------------------------


class EngineStepper:
    """The daemon's whole step for ``rows`` [B, F] (raw readings of B devices): Reading objects in,
    scaling, scoring, thresholds, fault logic and the model step, Output objects out."""

    def __init__(self, model: StepModel, rows: np.ndarray):
        self.engine = Engine(model)
        self.devices = [f"bench-{i}" for i in range(len(rows))]
        self.rows, self.period = rows, model.contract.sample_period_s or 1.0
        self.ts = 1.7e9

    def __call__(self) -> None:
        self.ts += self.period  # one sample period on: no gap to bridge, nothing seen twice
        # The Reading tuples built in C (tuple.__new__, as the engine builds its Outputs): a
        # Python-level Reading(...) per reading was ~1 µs, 15 % of what was timed at batch 1,024,
        # and it is the caller's work, not the engine step's.
        readings = list(map(tuple.__new__, repeat(Reading), zip(self.devices, repeat(self.ts), self.rows)))
        self.engine.process(readings)


def bench_engine(models: Models, counts: Counts, seed: int) -> dict[str, float]:
    """Microseconds per reading of the whole engine step (int8) at each batch."""
    data = simulate(devices=BATCHES[-1], steps=1, seed=seed)
    calls = {str(b): EngineStepper(models.steps["ort_int8"], data.values[:b, 0]) for b in BATCHES}
    seconds = time_interleaved(calls, counts.rounds, counts.block_s)
    out = {b: sec / int(b) * 1e6 for b, sec in seconds.items()}
    say("engine, whole step per reading (int8): "
        + ", ".join(f"batch {b} {us:.1f} µs" for b, us in out.items()))
    return out


def bench_steps(models: Models, counts: Counts, readings: np.ndarray) -> tuple[dict, dict]:
    """Microseconds per reading (= per device per step) of each mode at each batch, and the
    per-call floor (µs per call of the identity graph), timed in the same alternating blocks."""
    import torch

    out: dict[str, dict[str, float]] = {mode: {} for mode in STEP_MODES}
    floor: dict[str, float] = {}
    identity = identity_session(models.steps["ort_int8"].contract)
    with torch.inference_mode():
        for batch in BATCHES:
            rows = readings.reshape(-1, readings.shape[-1])
            x = np.ascontiguousarray(rows[np.arange(batch) % len(rows)][:, None, :])  # [B, 1, F]
            calls: dict[str, Callable[[], object]] = {"torch": TorchStepper(models.torch_model, x),
                     **{mode: OrtStepper(models.steps[mode], x) for mode in EXPORTS},
                     "call_floor": CallFloor(identity, models.steps["ort_int8"], x)}
            seconds = time_interleaved(calls, counts.rounds, counts.block_s)
            for mode in STEP_MODES:
                out[mode][str(batch)] = seconds[mode] / batch * 1e6
            floor[str(batch)] = seconds["call_floor"] * 1e6
            say(f"step batch {batch:5d}: " + ", ".join(
                f"{m} {out[m][str(batch)]:.2f}" for m in STEP_MODES) + " µs/reading"
                + f"; identity-graph call {floor[str(batch)]:.1f} µs")
    return out, floor


def gemm_shapes(n_features: int, hidden: tuple[int, ...], dense: int, n_targets: int,
                batch: int) -> list[tuple[int, int, int]]:
    """(M, K, N) of every matrix product in one step of ``batch`` devices.

    Per LSTM layer: the input and the recurrent gate projections, x·W_ihᵀ [B, I]×[I, 4H]
    and h·W_hhᵀ [B, H]×[H, 4H] (onnxruntime's LSTM computes them as two GEMMs); then
    the dense head. Elementwise gate math is left out on both sides of the comparison.
    """
    shapes, width = [], n_features
    for h in hidden:
        shapes += [(batch, width, 4 * h), (batch, h, 4 * h)]
        width = h
    if dense > 0:
        shapes += [(batch, width, dense), (batch, dense, n_targets)]
    else:
        shapes.append((batch, width, n_targets))
    return shapes


def gemm_flops(shapes: list[tuple[int, int, int]]) -> int:
    return sum(2 * m * k * n for m, k, n in shapes)


def gemm_worker() -> None:
    """Child process (one BLAS thread): time the GEMM shapes read from stdin as JSON."""
    spec = json.loads(sys.stdin.read())
    shapes, rounds, block_s = spec["shapes"], spec["rounds"], spec["block_s"]
    rng = np.random.default_rng(0)
    operands = [(rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32),
                 np.empty((m, n), np.float32)) for m, k, n in shapes]

    def all_products() -> None:
        for a, b, c in operands:
            np.matmul(a, b, out=c)

    seconds = time_interleaved({"gemm": all_products}, rounds, block_s)["gemm"]
    config: Any = np.show_config(mode="dicts") if hasattr(np, "show_config") else {}
    blas = config.get("Build Dependencies", {}).get("blas", {}) if isinstance(config, dict) else {}
    name = f"{blas.get('name', '?')} {blas.get('version', '')}".strip()
    print(json.dumps({"seconds": seconds, "blas": name}))


def bench_floor(models: Models, counts: Counts, step_us: dict[str, dict[str, float]],
                call_floor_us: dict[str, float]) -> dict:
    c = models.steps["ort_int8"].contract
    dense = models.torch_model.config.dense
    batch = BATCHES[-1]
    per_device = gemm_flops(gemm_shapes(len(c.features), c.hidden, dense, len(c.targets), 1))
    shapes = gemm_shapes(len(c.features), c.hidden, dense, len(c.targets), batch)
    env = dict(os.environ) | ONE_THREAD
    proc = subprocess.run(
        [sys.executable, "-c", "from faultwatch.bench.speed_model import gemm_worker; gemm_worker()"],
        input=json.dumps({"shapes": shapes, "rounds": counts.rounds, "block_s": counts.block_s}),
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"GEMM timing child failed:\n{proc.stderr[-2000:]}")
    child = json.loads(proc.stdout.strip().splitlines()[-1])
    gemm_gflops = gemm_flops(shapes) / child["seconds"] / 1e9
    model_gflops = {mode: per_device / (step_us[mode][str(batch)] * 1e-6) / 1e9 for mode in STEP_MODES}
    say(f"floor: {per_device:,} FLOPs/step/device; int8 {model_gflops['ort_int8']:.1f} GFLOP/s "
        f"vs numpy GEMM {gemm_gflops:.1f} GFLOP/s ({child['blas']}, 1 thread)")
    return {
        "flops_per_step": per_device,
        "batch": batch,
        "model_gflops": model_gflops["ort_int8"],
        "model_gflops_by_mode": model_gflops,
        "gemm_gflops": gemm_gflops,
        "gemm_us_per_reading": child["seconds"] / batch * 1e6,
        "int8_vs_gemm": model_gflops["ort_int8"] / gemm_gflops,
        "gemm_shapes": shapes,
        "blas": child["blas"],
        # One session.run of an identity graph with the step's inputs and outputs, µs per call:
        # what a step costs before any kernel runs. At batch 1 it is most of the step.
        "call_floor_us": call_floor_us,
        "kernel_us_batch1": {m: step_us[m]["1"] - call_floor_us["1"] for m in ("ort_fp32", "ort_int8")},
    }


# -- (6) artifacts -----------------------------------------------------------------------


def bench_artifacts(models: Models, counts: Counts, seed: int) -> dict:
    """File sizes, and forecast RMSE (scaled units) of each mode on fresh data, vs fp32."""
    import torch
    from faultwatch.runtime.engine.calibration import streamed_forecasts

    series = scaled_readings(models, counts.rmse_devices, counts.rmse_steps, seed)
    idx = list(models.steps["ort_int8"].contract.target_index)
    forecasts = {m: streamed_forecasts(models.steps[m], list(series)) for m in EXPORTS}
    with torch.inference_mode():
        forecasts["torch"] = [models.torch_model(torch.from_numpy(s[None]))[0][0].numpy() for s in series]
    skip = WINDOW  # leave the warm-up from the zero state out

    def rmse(fc: list[np.ndarray]) -> float:
        err = np.concatenate([s[skip + 1:, idx] - f[skip:-1] for s, f in zip(series, fc, strict=True)])
        return float(np.sqrt(np.mean(err**2)))

    def rms_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
        diff = np.concatenate([x[skip:] - y[skip:] for x, y in zip(a, b, strict=True)])
        return float(np.sqrt(np.mean(diff**2)))

    errors = {mode: rmse(fc) for mode, fc in forecasts.items()}
    return {
        "size_bytes": {"torch": models.torch_bytes,
                       **{mode: path.stat().st_size for mode, path in models.paths.items()}},
        "rmse": errors,
        "rmse_rel_vs_fp32": {mode: e / errors["ort_fp32"] - 1 for mode, e in errors.items()},
        "rms_diff_vs_fp32": {mode: rms_diff(fc, forecasts["ort_fp32"]) for mode, fc in forecasts.items()},
        "rmse_readings": int(sum(len(s) - skip - 1 for s in series)),
    }
