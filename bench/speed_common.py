"""Shared by the ``faultwatch bench`` sections: what is measured (constants, options, counts),
how (alternating timed blocks) and the callables that are timed.

torch is imported lazily: the GEMM child process imports the bench without it."""

from __future__ import annotations

import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from faultwatch.runtime.engine.model import StepModel, session_options
from faultwatch.train.options import TrainOptions

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
    hidden: tuple[int, ...] = TrainOptions.hidden  # the reference network: the recipe's
    dense: int = TrainOptions.dense
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


def time_interleaved(calls: Mapping[str, Callable[[], object]], rounds: int,
                     block_s: float) -> dict[str, float]:
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


class Cycle:
    """Each call feeds the next item of ``items`` (round and round) to ``fn``."""

    def __init__(self, fn: Callable, items: list):
        self.fn, self.items, self.i = fn, items, 0

    def __call__(self) -> None:
        self.i = (self.i + 1) % len(self.items)
        self.fn(self.items[self.i])


def label(mode: str) -> str:
    """``ort_int8_static`` → ``int8-static``: the name ``faultwatch export --quantize`` uses."""
    return EXPORTS.get(mode, mode).replace("none", "fp32")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
