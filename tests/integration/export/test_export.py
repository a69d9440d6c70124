"""Export: a really trained checkpoint → one ONNX file that streams like torch and carries its contract.

Parity is computed here, independently of the numbers export writes in its report:
torch runs each device's whole series in one call from a zero state; the ONNX file
is stepped one reading per call, carrying the state, as the edge runtime does.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from faultwatch.export.build import TOLERANCE, ExportOptions
from faultwatch.runtime.devtools.simulator import CHANNELS
from faultwatch.runtime.engine import contract as C
from faultwatch.runtime.engine.contract import CONTRACT_VERSION, METADATA_KEY, ModelContract, Scaler
from faultwatch.runtime.engine.model import StepModel
from faultwatch.runtime.offline.csvdata import read_csv
from faultwatch.train.checkpoint import load_checkpoint
from model_fixtures import HIDDEN, VAL_FRACTION, TrainedModels

pytestmark = [pytest.mark.torch, pytest.mark.usefixtures("torch_one_thread")]

#: The exports the session fixtures make.
MODES = ("none", "int8")


# -- helpers -------------------------------------------------------------------------------


@torch.no_grad()
def torch_whole_sequence(model, series: np.ndarray) -> np.ndarray:
    """[N, F] scaled → [N, K]: torch over the whole series in one call from a zero state."""
    forecast, _ = model(torch.from_numpy(series)[None])
    return forecast[0].numpy()


def onnx_streamed(step_model: StepModel, batch: np.ndarray) -> np.ndarray:
    """[B, N, F] scaled → [B, N, K]: one reading per call for the whole batch, state carried."""
    state = step_model.zero_state(batch.shape[0])
    out = []
    for t in range(batch.shape[1]):
        forecast, state = step_model.step(batch[:, t:t + 1], state)  # [B, 1, K]
        out.append(forecast)
    return np.concatenate(out, axis=1)


def metadata(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(path).metadata_props}


def dims(value_info) -> list[int | str]:
    """A graph input/output's shape: ints for fixed axes, names for dynamic ones."""
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


# -- parity --------------------------------------------------------------------------------


@pytest.mark.parametrize("quantize", MODES)
def test_streamed_onnx_matches_torch_over_every_step(trained: TrainedModels, quantize: str):
    model, _, prepared = load_checkpoint(trained.run_dir)
    step_model = StepModel(trained.model(quantize))
    series = np.stack([s.scaled for s in prepared.series])  # [D, N, F], equal lengths here
    expected = np.stack([torch_whole_sequence(model, s) for s in series])  # [D, N, K]
    streamed = onnx_streamed(step_model, series)
    assert streamed.shape == expected.shape == (len(prepared.series), series.shape[1],
                                                len(prepared.targets))
    diff = np.abs(streamed - expected).max()
    assert diff <= TOLERANCE[quantize], f"{quantize}: max |onnx streamed - torch| = {diff:.3g}"
    # The whole series, from the first reading: the held-out part export checks is not enough.
    assert np.isfinite(streamed).all()


def test_fp32_parity_is_tight_and_int8_is_not_a_copy(trained: TrainedModels):
    """fp32 parity well inside 1e-4; int8 really differs from fp32 (it was quantized), within tolerance."""
    _, _, prepared = load_checkpoint(trained.run_dir)
    series = np.stack([s.scaled for s in prepared.series])
    fp32 = onnx_streamed(StepModel(trained.fp32), series)
    int8 = onnx_streamed(StepModel(trained.int8), series)
    diff = np.abs(fp32 - int8).max()
    assert 0 < diff <= TOLERANCE["int8"]


def test_multi_step_call_equals_single_steps(trained: TrainedModels):
    """Time is a dynamic axis: T readings in one call give the forecasts and state of T calls."""
    _, _, prepared = load_checkpoint(trained.run_dir)
    step_model = StepModel(trained.fp32)
    chunk = prepared.series[0].scaled[None, :50]  # [1, 50, F]
    whole, whole_state = step_model.step(chunk, step_model.zero_state(1))
    state = step_model.zero_state(1)
    singles = []
    for t in range(chunk.shape[1]):
        f, state = step_model.step(chunk[:, t:t + 1], state)
        singles.append(f)
    np.testing.assert_allclose(whole, np.concatenate(singles, axis=1), atol=1e-5)
    for a, b in zip(whole_state, state, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("quantize", MODES)
def test_batch_of_three_equals_each_device_alone(trained: TrainedModels, quantize: str):
    """Stepping three devices in one call gives each the forecasts it gets alone.

    fp32 is exact up to float rounding. int8 quantizes activations dynamically over the
    whole input tensor, so a device's forecast moves slightly with its batch partners;
    that must stay far inside the export tolerance.
    """
    _, _, prepared = load_checkpoint(trained.run_dir)
    s0, s1 = (s.scaled[:200] for s in prepared.series)
    # Three different streams: both devices and a time-shifted copy of the first.
    batch = np.stack([s0, s1, prepared.series[0].scaled[500:700]])  # [3, 200, F]
    step_model = StepModel(trained.model(quantize))
    together = onnx_streamed(step_model, batch)
    alone = np.stack([onnx_streamed(step_model, batch[i:i + 1])[0] for i in range(3)])
    atol = 1e-6 if quantize == "none" else TOLERANCE["int8"] / 10
    np.testing.assert_allclose(together, alone, atol=atol)
    # The three streams really are different (the test would not notice a swapped row otherwise).
    assert np.abs(alone[0] - alone[1]).max() > 10 * atol
    assert np.abs(alone[0] - alone[2]).max() > 10 * atol


# -- the graph -----------------------------------------------------------------------------


def test_int8_graph_has_quantized_lstm_and_no_float_lstm(trained: TrainedModels):
    ops = {node.op_type for node in onnx.load(trained.int8).graph.node}
    assert "DynamicQuantizeLSTM" in ops
    assert "MatMulInteger" in ops  # the dense head is quantized too
    assert "LSTM" not in ops
    fp32_ops = {node.op_type for node in onnx.load(trained.fp32).graph.node}
    assert "LSTM" in fp32_ops and "DynamicQuantizeLSTM" not in fp32_ops
    assert set(trained.int8_report["ops"]) == ops


@pytest.mark.parametrize("quantize", MODES)
def test_graph_io_is_exactly_the_contract_with_dynamic_batch_and_time(trained: TrainedModels,
                                                                       quantize: str):
    path = trained.model(quantize)
    graph = onnx.load(path).graph
    contract = StepModel(path).contract
    initializers = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    assert [i.name for i in inputs] == contract.input_names()
    assert [o.name for o in graph.output] == contract.output_names()
    n_features, n_targets = len(contract.features), len(contract.targets)

    by_name = {v.name: v for v in [*inputs, *graph.output]}
    readings, forecast = dims(by_name[C.READINGS]), dims(by_name[C.FORECAST])
    assert isinstance(readings[0], str) and isinstance(readings[1], str), readings  # batch, time
    assert readings[2] == n_features
    assert isinstance(forecast[0], str) and isinstance(forecast[1], str), forecast
    assert forecast[2] == n_targets
    for name_in, name_out, width in contract.state_names():
        for shape in (dims(by_name[name_in]), dims(by_name[name_out])):
            assert shape[0] == 1 and isinstance(shape[1], str) and shape[2] == width, shape

    # Dynamic in fact, not only in name: any batch and time run.
    step_model = StepModel(path)
    x = np.random.default_rng(0).random((5, 7, n_features), dtype=np.float32)
    out, state = step_model.step(x, step_model.zero_state(5))
    assert out.shape == (5, 7, n_targets)
    assert [s.shape for s in state] == [(1, 5, w) for w in step_model.state_widths]


def test_the_model_and_its_report_are_readable_by_the_service_user(trained: TrainedModels):
    """0644 under the usual umask: copied to a device, the daemon's own user can read the model."""
    mask = os.umask(0o022)
    os.umask(mask)
    for path in (trained.int8, trained.int8.with_suffix(".report.json")):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644 & ~mask, path


def test_int8_file_is_smaller_than_fp32(trained: TrainedModels):
    int8, fp32 = trained.int8.stat().st_size, trained.fp32.stat().st_size
    assert int8 < fp32
    assert trained.int8_report["size_bytes"] == int8
    assert trained.fp32_report["size_bytes"] == fp32


# -- the contract in the metadata ----------------------------------------------------------


@pytest.mark.parametrize("quantize", MODES)
def test_metadata_contract_round_trips(trained: TrainedModels, quantize: str):
    path = trained.model(quantize)
    meta = metadata(path)
    assert list(meta) == [METADATA_KEY]
    contract = ModelContract.from_json(meta[METADATA_KEY])
    assert contract == StepModel(path).contract
    assert ModelContract.from_json(contract.to_json()) == contract
    assert contract.version == CONTRACT_VERSION
    assert contract.quantization == quantize
    assert contract.cell == "lstm" and contract.hidden == HIDDEN


@pytest.mark.parametrize("quantize", MODES)
def test_contract_has_the_features_scaler_and_calibration_of_the_run(trained: TrainedModels,
                                                                     quantize: str):
    contract = StepModel(trained.model(quantize)).contract
    assert contract.features == CHANNELS  # every numeric CSV column, in file order; no labels
    assert contract.targets == contract.features
    assert contract.sample_period_s == trained.data.period_s

    # The scaler, fitted here from the CSV on the training part of each device only.
    table = read_csv(trained.csv)
    train_rows = []
    for rows in table.device_rows().values():
        split = round(len(rows) * (1 - VAL_FRACTION))
        train_rows.append(table.select(CHANNELS)[rows[:split]])
    expected = Scaler.fit(np.concatenate(train_rows), "minmax")
    assert contract.scaler.kind == "minmax"
    np.testing.assert_allclose(contract.scaler.offset, expected.offset, rtol=1e-12)
    np.testing.assert_allclose(contract.scaler.scale, expected.scale, rtol=1e-12)
    _, _, prepared = load_checkpoint(trained.run_dir)
    assert contract.scaler == prepared.scaler

    cal = contract.calibration
    options = ExportOptions().detector
    assert contract.detector == options  # the file carries its detector
    assert len(cal.residual_std) == len(contract.targets)
    assert all(np.isfinite(cal.residual_std)) and min(cal.residual_std) > 0
    assert np.isfinite(cal.threshold) and cal.threshold > 0
    assert (cal.quantile, cal.factor, cal.score_span, cal.warmup) == (
        options.quantile, options.factor, options.score_span, options.warmup)
    held_out = sum(len(s.scaled) - s.split for s in prepared.series)
    assert held_out == trained.report(quantize)["parity"]["held_out_steps"]
    assert 0 < cal.n_scores <= held_out  # calibrated on held-out readings only
    assert contract.provenance["data_sha256"] == hashlib.sha256(trained.csv.read_bytes()).hexdigest()
