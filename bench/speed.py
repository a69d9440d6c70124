"""``faultwatch bench``: side-by-side performance numbers, and how far they are from the limit.

Run it as::

    faultwatch bench                      # full run, < 10 min on 2 cores
    faultwatch bench --quick --json b.json   # CI smoke, < 1 min

Everything is measured in one run and, where two things are compared, in
alternating blocks (A B C, C B A, ...), so a ratio holds on a noisy machine.
Every contender runs on one thread: torch ``set_num_threads(1)``, the
onnxruntime session the daemon uses (``threads=1``), and numpy's BLAS in a
child process with ``OPENBLAS_NUM_THREADS=1``.

Sections: (1) model step per reading at batch 1/64/1024, torch eager vs
onnxruntime in every precision export offers (fp32, int8, int8-static, fp16);
(2) the floor: FLOPs per step and achieved GFLOP/s beside numpy on the same
GEMM shapes; (3) streaming vs re-windowing over 60 readings; (4) peers per
reading (River's HalfSpaceTrees, a rolling z-score); (5) the daemon end to end
through a private Mosquitto (``bench_daemon``); (6) artifact size and forecast
RMSE of every precision. The bench trains its own model of the reference size
on simulator data (a few epochs: speed doesn't depend on the weights) unless
given ``--run-dir``.

torch is imported lazily: the GEMM child process imports this module without it.
"""

from __future__ import annotations

import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from faultwatch.runtime.devtools.simulator import simulate, write_csv
from faultwatch.runtime.engine.engine import Engine, Reading
from faultwatch.runtime.engine.model import StepModel, session_options

BATCHES = (1, 64, 1024)
#: Every precision ``faultwatch export`` offers, by bench name → its ``--quantize`` mode.
EXPORTS = {"ort_fp32": "none", "ort_int8": "int8", "ort_int8_static": "int8-static", "ort_fp16": "fp16"}
STEP_MODES = ("torch", *EXPORTS)  # section 1 and 6: everything
MODES = ("torch", "ort_fp32", "ort_int8")  # section 3: the deployed int8 beside its references
WINDOW = 60  # the reference recipe's look-back
DAEMON_BATCH = 64  # a micro-batch of a daemon serving many devices (it steps up to max_batch at once)
ONE_THREAD = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@dataclass(frozen=True)
class BenchOptions:
    quick: bool = False
    run_dir: Path | None = None  # an existing training run; default: train one here
    hidden: tuple[int, ...] = (128, 64)
    dense: int = 32
    workdir: Path | None = None  # keep the models, logs and broker files here
    daemon: bool = True
    profile: bool = False  # py-spy the daemon during the throughput drain (needs py-spy)
    seed: int = 0


@dataclass(frozen=True)
class Counts:
    """How much of everything; ``--quick`` shrinks it for CI smoke use."""

    train_devices: int
    train_steps: int
    epochs: int
    rounds: int  # alternating blocks per comparison
    block_s: float  # seconds per block
    peer_readings: int
    rmse_devices: int
    rmse_steps: int

    @classmethod
    def of(cls, quick: bool) -> Counts:
        if quick:
            return cls(2, 800, 1, 3, 0.04, 300, 2, 400)
        return cls(4, 3000, 3, 9, 0.15, 3000, 8, 1500)


def say(text: str) -> None:
    """Progress goes to stderr; stdout gets only the table."""
    print(text, file=sys.stderr, flush=True)


# -- timing ------------------------------------------------------------------------------


def time_interleaved(calls: dict[str, Callable[[], object]], rounds: int, block_s: float) -> dict[str, float]:
    """Seconds per call of each function: the median of ``rounds`` blocks, run in alternating order.

    Each function is warmed up and given a repeat count that fills ``block_s``; then
    the blocks go A B C, C B A, ..., so a slow patch of the machine hits all alike.
    """
    repeats = {}
    for name, fn in calls.items():
        fn()
        n = 1
        while True:
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            took = time.perf_counter() - t0
            if took >= block_s / 4 or n >= 1 << 20:
                break
            n *= 2
        repeats[name] = max(1, round(n * block_s / max(took, 1e-9)))
    samples: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            fn, n = calls[name], repeats[name]
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            samples[name].append((time.perf_counter() - t0) / n)
    return {name: statistics.median(v) for name, v in samples.items()}


class OrtStepper:
    """One stateful step per call with a carried state: what the engine does per batch."""

    def __init__(self, model: StepModel, x: np.ndarray):
        self.model, self.x = model, x  # x [B, T, F]
        self.state = model.zero_state(x.shape[0])

    def __call__(self) -> None:
        _, self.state = self.model.step(self.x, self.state)


class OrtWindow:
    """Re-windowing: every call re-runs the whole window ``x`` [B, 60, F] from a fixed state."""

    def __init__(self, model: StepModel, x: np.ndarray):
        self.model, self.x = model, x
        self.state = model.zero_state(x.shape[0])

    def __call__(self) -> None:
        self.model.step(self.x, self.state)


def identity_session(contract) -> ort.InferenceSession:
    """A graph with the step's inputs and outputs wired straight through (Identity), in the
    session options the daemon uses: the cost of one call before any kernel does work."""
    import onnx
    from onnx import TensorProto, helper

    shapes = [["batch", "time", len(contract.features)],
              *([1, "batch", w] for *_, w in contract.state_names())]
    pairs = list(zip(contract.input_names(), contract.output_names(), shapes, strict=True))
    graph = helper.make_graph(
        [helper.make_node("Identity", [i], [o]) for i, o, _ in pairs],
        "call_floor",
        [helper.make_tensor_value_info(i, TensorProto.FLOAT, shape) for i, _, shape in pairs],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, shape) for _, o, shape in pairs],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(proto)
    return ort.InferenceSession(proto.SerializeToString(), session_options(1),
                                providers=["CPUExecutionProvider"])


class CallFloor:
    """``session.run`` of the identity graph with the step's feed (the step's fixed cost)."""

    def __init__(self, session: ort.InferenceSession, model: StepModel, x: np.ndarray):
        self.session, self.outputs = session, model.contract.output_names()
        self.feed = dict(zip(model.contract.input_names(), [x, *model.zero_state(x.shape[0])], strict=True))

    def __call__(self) -> None:
        self.session.run(self.outputs, self.feed)


class TorchStepper:
    """torch eager, the same stateful step (call it under ``torch.inference_mode()``)."""

    def __init__(self, model, x: np.ndarray, carry: bool = True):
        import torch

        self.model, self.x, self.carry = model, torch.from_numpy(x), carry
        self.state = model.zero_state(x.shape[0])

    def __call__(self) -> None:
        _, state = self.model(self.x, self.state)
        if self.carry:
            self.state = state


# -- models ------------------------------------------------------------------------------


@dataclass
class Models:
    torch_model: object  # faultwatch.train.model.Forecaster, eval mode
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
        paths[mode] = workdir / f"model-{_label(mode)}.onnx"
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
        self.engine.process([Reading(d, self.ts, v) for d, v in zip(self.devices, self.rows, strict=True)])


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
            calls = {"torch": TorchStepper(models.torch_model, x),
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
    config = np.show_config(mode="dicts") if hasattr(np, "show_config") else {}
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
        [sys.executable, "-c", "from faultwatch.bench.speed import gemm_worker; gemm_worker()"],
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

    timings = {}
    for batch in (1, DAEMON_BATCH):
        rows = np.arange(batch) % readings.shape[0]
        window = np.ascontiguousarray(readings[rows, :WINDOW])  # [B, 60, F]
        step = np.ascontiguousarray(window[:, -1:])  # [B, 1, F]
        calls = {}
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
    result = {
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


class Cycle:
    """Each call feeds the next item of ``items`` (round and round) to ``fn``."""

    def __init__(self, fn: Callable, items: list):
        self.fn, self.items, self.i = fn, items, 0

    def __call__(self) -> None:
        self.i = (self.i + 1) % len(self.items)
        self.fn(self.items[self.i])


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


# -- run, targets, table -----------------------------------------------------------------


def targets(r: dict) -> list[dict]:
    """The issue's targets, each with its measured value and whether it is met."""
    s, w, d = r["step_us"], r["stateful_vs_window_detail"], r.get("daemon") or {}
    bound = w["batch1_bound"]

    def fp32_vs_int8(batch: int) -> float:
        return s["ort_fp32"][str(batch)] / s["ort_int8"][str(batch)]

    rows = [
        ("int8 vs torch eager, batch 1", s["torch"]["1"] / s["ort_int8"]["1"], ">=", 8.0, "×"),
        ("int8 vs fp32, batch 1", fp32_vs_int8(1), ">=", 1.4, "×", bound["int8_vs_fp32"]),
        ("int8 vs fp32, batch 64", fp32_vs_int8(64), ">=", 1.4, "×"),
        ("int8 vs fp32, batch 1024", fp32_vs_int8(1024), ">=", 1.4, "×"),
        ("streaming vs re-windowing, batch 1", w["ratio_batch1"], ">=", 30.0, "×", bound["stream_vs_window"]),
        (f"streaming vs re-windowing, batch {DAEMON_BATCH}", w[f"ratio_batch{DAEMON_BATCH}"],
         ">=", 30.0, "×"),
        ("int8 @1024 vs numpy GEMM rate", r["floor"]["int8_vs_gemm"], ">=", 0.5, "×"),
    ]
    if "readings_per_s" in d:
        rows += [
            ("daemon vs bare paho subscriber", d["readings_per_s"] / d["paho_baseline_per_s"],
             ">=", 0.8, "×"),
            ("daemon peak RSS, 1,000 devices", d["rss_mb_1k"], "<=", 100.0, " MB"),
            ("same, after draining the backlogs", d["rss_mb_drain"], "<=", 100.0, " MB"),
            ("cold start to first forecast", d["cold_start_s"], "<=", 1.5, " s"),
            ("torch loaded in the daemon", float(d["torch_loaded"]), "<=", 0.0, ""),
        ]
    # An optional sixth field is the best value reachable through session.run (batch1_bounds).
    return [{"name": name, "value": value, "op": op, "target": goal, "unit": unit,
             "met": bool(value >= goal if op == ">=" else value <= goal),
             **({"reachable": rest[0]} if rest else {})}
            for name, value, op, goal, unit, *rest in rows]


def run_bench(options: BenchOptions) -> dict:
    import torch

    counts = Counts.of(options.quick)
    started = time.monotonic()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="faultwatch-bench-") as tmp:
        workdir = options.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        models = prepare_models(options, counts, workdir)
        prepared_s = time.monotonic() - started
        readings = scaled_readings(models, 64, 4 * WINDOW, options.seed + 1)  # [64, 240, F]
        result: dict = {}
        result["step_us"], call_floor_us = bench_steps(models, counts, readings)
        result["engine_us"] = bench_engine(models, counts, options.seed + 3)
        result["floor"] = bench_floor(models, counts, result["step_us"], call_floor_us)
        window = bench_window(models, counts, readings, call_floor_us["1"])
        # The headline ratio is per reading at the daemon's micro-batch (many devices, one call);
        # batch 1 is in the detail, with the most any graph could reach there.
        result["stateful_vs_window"] = window[f"ratio_batch{DAEMON_BATCH}"]
        result["stateful_vs_window_batch"] = DAEMON_BATCH
        result["stateful_vs_window_detail"] = window
        result["peers_us"] = bench_peers(models, counts, readings)
        artifacts = bench_artifacts(models, counts, options.seed + 2)
        result["size_bytes"] = artifacts.pop("size_bytes")
        result["accuracy"] = artifacts
        if options.daemon:
            from faultwatch.bench.speed_daemon import DaemonCounts, bench_daemon

            result["daemon"] = bench_daemon(models.paths["ort_int8"], workdir / "daemon",
                                            DaemonCounts.of(options.quick), profile=options.profile)
        c = models.steps["ort_int8"].contract
        result["config"] = {
            "quick": options.quick, "hidden": list(c.hidden), "dense": models.torch_model.config.dense,
            "features": len(c.features), "targets": len(c.targets), "threads": 1, "window": WINDOW,
            "run_dir": str(options.run_dir) if options.run_dir else None,
            "train_and_export_s": round(prepared_s, 2),
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "onnxruntime": ort.__version__, "numpy": np.__version__},
            "machine": {"cpu": _cpu_name(), "cores": os.cpu_count()},
        }
    result["targets"] = targets(result)
    result["seconds"] = round(time.monotonic() - started, 1)
    return result


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def render(r: dict) -> str:
    """The stdout table."""
    cfg, s, fl, w, p = r["config"], r["step_us"], r["floor"], r["stateful_vs_window_detail"], r["peers_us"]
    head = (f"faultwatch bench{' --quick' if cfg['quick'] else ''}: LSTM {cfg['hidden']} → dense "
            f"{cfg['dense']}, {cfg['features']} features; {cfg['machine']['cpu']}, "
            f"{cfg['machine']['cores']} cores; one thread per contender")
    names = {m: _label(m) for m in STEP_MODES}
    lines = [head, "", "1. model step, µs per reading (= per device per step)",
             f"   {'batch':>6} " + " ".join(f"{names[m]:>11}" for m in STEP_MODES)
             + f" {'torch/int8':>11} {'fp32/int8':>10} {'call floor':>11}"]
    for b in BATCHES:
        k = str(b)
        t, f32, i8 = s["torch"][k], s["ort_fp32"][k], s["ort_int8"][k]
        lines.append(f"   {b:>6} " + " ".join(f"{s[m][k]:>11.2f}" for m in STEP_MODES)
                     + f" {t / i8:>10.1f}× {f32 / i8:>9.2f}× {fl['call_floor_us'][k] / b:>10.2f}")
    g, kern = fl["model_gflops_by_mode"], fl["kernel_us_batch1"]
    lines += [
        "   call floor: session.run of an identity graph with the step's inputs and outputs",
        "   the daemon's whole step per reading (int8; scaling, scoring, thresholds, fault logic): "
        + ", ".join(f"batch {b} {us:.1f} µs" for b, us in r["engine_us"].items()),
        f"   at batch 1, step minus floor: fp32 {kern['ort_fp32']:.1f} µs, int8 {kern['ort_int8']:.1f} µs "
        f"({kern['ort_fp32'] / max(kern['ort_int8'], 1e-9):.2f}×)",
        "",
        f"2. floor at batch {fl['batch']}: {fl['flops_per_step']:,} FLOPs per step per device (GEMMs)",
        "   achieved GFLOP/s: " + ", ".join(f"{names[m]} {g[m]:.1f}" for m in STEP_MODES),
        f"   numpy, same GEMM shapes, 1 thread: {fl['gemm_gflops']:.1f} GFLOP/s "
        f"({fl['gemm_us_per_reading']:.2f} µs/reading, {fl['blas']})",
        f"   int8 step reaches {100 * fl['int8_vs_gemm']:.0f}% of the numpy GEMM rate",
    ]
    u = w["us_per_reading"]
    lines += ["", f"3. streaming vs re-windowing the last {w['window']} readings, µs per reading"]
    for b, t in u.items():
        pairs = [(m, t[m + "_stream"], t[m + "_window"]) for m in MODES]
        lines.append(f"   batch {b:>3}: " + "; ".join(
            f"{m} {st:.2f} vs {wi:.1f} (×{wi / st:.0f})" for m, st, wi in pairs))
    fx, ps = w["batch1_fixed_us"], w["batch1_per_step_us"]
    lines.append("   batch 1, a call = fixed + steps × per-step: " + "; ".join(
        f"{m} {fx[m]:.1f} + T × {ps[m]:.2f}" for m in MODES))
    bd = w["batch1_bound"]
    lines.append(f"   batch 1 through session.run, with a graph of no fixed cost beyond the "
                 f"{w['batch1_call_floor_us']:.1f} µs call floor: at most ×{bd['stream_vs_window']:.1f} "
                 f"streaming vs re-windowing, ×{bd['int8_vs_fp32']:.2f} int8 vs fp32")
    d = w["max_abs_diff"]
    lines.append(f"   same forecasts from the same state: max |diff| fp32 {d['ort_fp32']:.1e}, "
                 f"torch {d['torch']:.1e} → {'equal' if w['equal'] else 'NOT EQUAL'}; "
                 f"int8 {d['ort_int8']:.1e} (activations quantized per call)")
    hst = p["half_space_trees"]
    lines += ["", f"4. peers per reading ({p['readings']} readings), µs",
              f"   River HalfSpaceTrees score_one + learn_one: "
              f"{'not installed' if hst is None else f'{hst:.1f}'}",
              f"   rolling z-score ({WINDOW}): {p['rolling_zscore']:.1f}; batched ×{p['batched_at']}: "
              f"{p['rolling_zscore_batched']:.2f}",
              f"   faultwatch int8 step: {p['ort_int8_batch1']:.1f}; batched ×{p['batched_at']}: "
              f"{p['ort_int8_batched']:.2f}"]
    lines += ["", "5. daemon end to end (int8 model, its own Mosquitto on loopback, QoS 1)"]
    lines += _render_daemon(r.get("daemon"))
    sz, acc = r["size_bytes"], r["accuracy"]
    lines += ["", "6. artifacts, and forecasts on "
              f"{acc['rmse_readings']:,} fresh readings (scaled units)",
              f"   {'':>11} {'size, B':>9} {'vs fp32':>8} {'RMSE':>9} {'vs fp32':>8} "
              f"{'RMS diff to fp32':>17}"]
    for m in STEP_MODES:
        size = sz[m]
        lines.append(f"   {names[m]:>11} {size:>9,} {100 * size / sz['ort_fp32']:>7.0f}% "
                     f"{acc['rmse'][m]:>9.5f} {100 * acc['rmse_rel_vs_fp32'][m]:>+7.2f}% "
                     f"{acc['rms_diff_vs_fp32'][m]:>17.1e}")
    lines.append("   (torch: the serialized state_dict)")
    lines += ["", "targets"]
    for t in r["targets"]:
        op = "≥" if t["op"] == ">=" else "≤"
        reach = (f"; reachable through session.run ≤ {t['reachable']:.2f}{t['unit']}"
                 if "reachable" in t else "")
        lines.append(f"   {'met   ' if t['met'] else 'MISSED'} {t['name']:<38} {t['value']:>8.2f} "
                     f"(target {op} {t['target']:g}{t['unit']}{reach})")
    lines.append(f"\n{r['seconds']:.0f} s in all, {cfg['train_and_export_s']:.0f} s of it training "
                 "and export")
    return "\n".join(lines)


def _label(mode: str) -> str:
    """``ort_int8_static`` → ``int8-static``: the name ``faultwatch export --quantize`` uses."""
    return EXPORTS.get(mode, mode).replace("none", "fp32")


def _render_daemon(dm: dict | None) -> list[str]:
    if not dm:
        return ["   skipped (--no-daemon)"]
    if "skipped" in dm:
        return [f"   skipped: {dm['skipped']}"]
    lines = [
        f"   throughput, {dm['devices']:,} devices, median of {dm['drain_rounds']} rounds of "
        f"{dm['drain_readings']:,} queued readings: daemon {dm['readings_per_s']:,.0f}/s, "
        f"bare paho subscriber {dm['paho_baseline_per_s']:,.0f}/s "
        f"({100 * dm['readings_per_s'] / dm['paho_baseline_per_s']:.0f}%)",
        "   latency, ms p50 / p99     readings/s   publish → forecast   = publish → delivered"
        "   + delivered → forecast",
    ]
    for label, key in ((f"{dm['devices']:,} devices", ""), (f"{dm['big_devices']:,} devices", "big_")):
        cells = [f"{dm[f'{key}{part}p50_ms']:.1f} / {dm[f'{key}{part}p99_ms']:.1f}"
                 for part in ("", "delivery_", "daemon_")]
        lines.append(f"   {label:<22} {dm[key + 'paced_rate']:>11,.0f}   {cells[0]:>18}   {cells[1]:>19}"
                     f"   {cells[2]:>19}")
    lines += [
        f"   bare paho publish → receive at 1,000/s: p50 {dm['paho_p50_ms']:.1f} ms, "
        f"p99 {dm['paho_p99_ms']:.1f} ms",
        f"   first reading of every device (new slot, discovery): {dm['first_seen_s']:.2f} s for "
        f"{dm['devices']:,}, {dm['big_first_seen_s']:.2f} s for {dm['big_devices']:,}",
        f"   peak RSS: {dm['rss_mb_1k']:.1f} MB at {dm['devices']:,} devices "
        f"({dm['rss_mb_drain']:.1f} MB after the queued bursts), {dm['rss_mb_10k']:.1f} MB at "
        f"{dm['big_devices']:,} devices; torch loaded: {'YES' if dm['torch_loaded'] else 'no'}",
        f"   cold start, launch → first forecast: {dm['cold_start_s']:.2f} s "
        f"(each launch: {', '.join(f'{v:.2f}' for v in dm['cold_starts_s'])})",
    ]
    if dm.get("profile"):
        lines.append(f"   py-spy of a daemon drain (collapsed stacks): {dm['profile']}")
    return lines


def main(options: BenchOptions, json_path: Path | None = None) -> int:
    result = run_bench(options)
    print(render(result))
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0
