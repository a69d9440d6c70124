"""Loading a faultwatch ONNX file and stepping it: the only place the runtime touches onnxruntime."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Protocol

import numpy as np
import onnxruntime as ort
from faultwatch.runtime.engine.contract import METADATA_KEY, READINGS, ContractError, ModelContract


class ModelError(ValueError):
    """The model file can't be used; the message says why in one line."""


def session_options(threads: int = 1) -> ort.SessionOptions:
    """Edge defaults: a small fixed thread count and no spin-waiting, so an idle
    daemon uses no CPU and leaves the other cores to the machine's real work."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


def read_contract(session: ort.InferenceSession) -> ModelContract:
    try:
        meta = session.get_modelmeta().custom_metadata_map
    except UnicodeDecodeError as exc:  # a damaged file: onnxruntime hands the bytes to Python as they are
        raise ContractError(f"metadata is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    if METADATA_KEY not in meta:
        raise ContractError(f"no {METADATA_KEY} metadata: not a faultwatch model")
    return ModelContract.from_json(meta[METADATA_KEY])


class ModelStep(Protocol):
    """What the engine steps: a model's contract and one stateful step for a batch of devices.

    :class:`StepModel` is the real one; the daemon's ``TimedModel`` wraps it to time each step.
    """

    contract: ModelContract
    state_widths: list[int]  # H_i of each state tensor, in ModelContract.state_names() order

    def zero_state(self, batch: int) -> list[np.ndarray]:
        """Zero state for ``batch`` devices: ``[1, batch, H_i]`` float32 each."""
        ...

    def step(self, x: np.ndarray, state: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """x [B, T, F] float32 scaled readings, state [1, B, H_i] each → forecast [B, T, K], new state."""
        ...


class StepModel:
    """One faultwatch model, ready to step a batch of devices.

    ``step(x, state)``: x is ``[B, T, F]`` float32 scaled readings, state a list
    of ``[1, B, H_i]`` arrays in :meth:`ModelContract.state_names` order; it
    returns the forecast ``[B, T, K]`` (scaled) and the new state.
    """

    def __init__(self, path: str | Path, threads: int = 1):
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ModelError(f"cannot read model {path}: {exc.strerror or exc}") from None
        self.path = path
        self.sha256 = hashlib.sha256(data).hexdigest()
        self.size_bytes = len(data)
        try:
            # No fallback: onnxruntime would retry a file it can't load with the same CPU provider,
            # after printing the error to stdout (a user error is one line on stderr).
            self.session = ort.InferenceSession(
                data, session_options(threads), providers=["CPUExecutionProvider"], enable_fallback=0
            )
        except Exception as exc:  # onnxruntime raises its own untyped errors for bad files
            raise ModelError(f"{path} is not a loadable ONNX model: {str(exc).splitlines()[0]}") from None
        try:
            self.contract = read_contract(self.session)
        except ContractError as exc:
            raise ModelError(f"{path}: {exc}") from None
        self._check_graph()
        self.state_widths = [w for _, _, w in self.contract.state_names()]
        self._inputs = self.contract.input_names()
        self._outputs = self.contract.output_names()
        # One RunOptions for every call: session.run builds a fresh one per call when given none
        # (~0.5 µs, 3% of a batch-1 step).
        self._run_options = ort.RunOptions()
        # Warm up on zeros of exactly the contract's shapes: fails here, not on the first reading.
        # A graph whose metadata lies (hidden sizes, feature count) fails here with onnxruntime's
        # own untyped error: one line, like every other unusable file.
        try:
            forecast, state = self.step(np.zeros((1, 1, len(self.contract.features)), np.float32),
                                        self.zero_state(1))
        except Exception as exc:
            raise ModelError(f"{path}: the graph does not run with the shapes its metadata gives: "
                             f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        widths = [forecast.shape[-1], *(s.shape[-1] for s in state)]
        expected = [len(self.contract.targets), *self.state_widths]
        if widths != expected:
            raise ModelError(f"{path}: the graph's forecast and state widths {widths} are not the "
                             f"metadata's {expected} (targets, then hidden sizes)")

    def _check_graph(self) -> None:
        c = self.contract
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name for o in self.session.get_outputs()}
        missing = [n for n in c.input_names() if n not in inputs]
        missing += [n for n in c.output_names() if n not in outputs]
        if missing:
            raise ModelError(f"{self.path}: graph lacks {', '.join(missing)} required by the contract")
        width = inputs[READINGS].shape[-1]
        if isinstance(width, int) and width != len(c.features):
            raise ModelError(
                f"{self.path}: {READINGS} has {width} features, metadata names {len(c.features)}"
            )
        for name, _, hidden in c.state_names():  # [1, B, H_i]: a fixed H_i must be the metadata's
            declared = inputs[name].shape[-1]
            if isinstance(declared, int) and declared != hidden:
                raise ModelError(f"{self.path}: {name} is {declared} wide in the graph, "
                                 f"metadata says {hidden}")

    def zero_state(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((1, batch, w), np.float32) for w in self.state_widths]

    def step(self, x: np.ndarray, state: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        feed = {READINGS: x, **dict(zip(self._inputs[1:], state, strict=True))}
        out = self.session.run(self._outputs, feed, self._run_options)
        return out[0], out[1:]


__all__ = ["ModelError", "ModelStep", "StepModel"]
