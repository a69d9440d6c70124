"""Export: a really trained checkpoint → one ONNX file that streams like torch and carries its contract.

Parity is computed here, independently of the numbers export writes in its report:
torch runs each device's whole series in one call from a zero state; the ONNX file
is stepped one reading per call, carrying the state, as the edge runtime does.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from faultwatch.export.build import TOLERANCE, ExportOptions, export_model
from faultwatch.export.onnx_graph import ExportError
from faultwatch.runtime.devtools.simulator import CHANNELS
from faultwatch.runtime.engine import contract as C
from faultwatch.runtime.engine.contract import CONTRACT_VERSION, METADATA_KEY, ModelContract, Scaler
from faultwatch.runtime.engine.model import ModelError, StepModel
from faultwatch.runtime.offline.csvdata import read_csv
from faultwatch.train.checkpoint import CheckpointError, load_checkpoint
from model_fixtures import HIDDEN, VAL_FRACTION, TrainedModels, with_edited_contract

pytestmark = pytest.mark.torch

#: The exports the session fixtures make.
MODES = ("none", "int8")


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """torch's worker threads spin-wait; on two shared, busy cores one thread is several times faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


# -- refusals ------------------------------------------------------------------------------


def test_export_refuses_an_unknown_quantization(trained: TrainedModels, tmp_path: Path):
    out = tmp_path / "model.onnx"
    with pytest.raises(ExportError, match="int4"):
        export_model(trained.run_dir, out, ExportOptions(quantize="int4"))
    assert not out.exists()


def _run_copy(trained: TrainedModels, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(trained.run_dir, run)
    return run


@pytest.mark.parametrize("damage", ["truncated", "garbage", "text", "empty"])
def test_corrupt_checkpoint_gives_checkpoint_error(trained: TrainedModels, tmp_path: Path, damage: str):
    run = _run_copy(trained, tmp_path)
    path = run / "checkpoint.pt"
    data = path.read_bytes()
    path.write_bytes({
        "truncated": data[: len(data) // 2],
        "garbage": bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)),
        "text": b"this is not a checkpoint\n",
        "empty": b"",
    }[damage])
    with pytest.raises(CheckpointError):
        load_checkpoint(run)
    out = tmp_path / "model.onnx"
    with pytest.raises(CheckpointError):  # the path `faultwatch export` takes
        export_model(run, out, ExportOptions(quantize="none"))
    assert not out.exists()


def test_foreign_and_missing_checkpoints_give_checkpoint_error(tmp_path: Path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    torch.save({"state_dict": {"w": torch.zeros(3)}, "epoch": 3}, foreign / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="not a faultwatch checkpoint"):
        load_checkpoint(foreign)
    torch.save([1, 2, 3], foreign / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="not a faultwatch checkpoint"):
        load_checkpoint(foreign)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "nowhere")


def test_newer_checkpoint_version_is_refused(trained: TrainedModels, tmp_path: Path):
    payload = torch.load(trained.checkpoint, map_location="cpu", weights_only=True)
    payload["version"] += 1
    path = tmp_path / "checkpoint.pt"
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="upgrade"):
        load_checkpoint(path)


class _TouchOnUnpickle:
    """Unpickling this calls ``Path.touch(marker)``: proof that code ran during a load."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_checkpoint_with_a_pickled_object_is_rejected_without_running_it(trained: TrainedModels,
                                                                          tmp_path: Path):
    payload = torch.load(trained.checkpoint, map_location="cpu", weights_only=True)
    marker = tmp_path / "code-ran"
    payload["provenance"]["note"] = _TouchOnUnpickle(marker)
    path = tmp_path / "checkpoint.pt"
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(path)
    assert not marker.exists(), "load_checkpoint executed pickled code"
    # Control: the file really carries executable pickle (a full unpickle runs it).
    torch.load(path, map_location="cpu", weights_only=False)
    assert marker.exists()


def test_saved_checkpoint_is_plain_data(trained: TrainedModels):
    """Loads with weights_only=True and holds no module object: only tensors, numbers, text, containers."""
    payload = torch.load(trained.checkpoint, map_location="cpu", weights_only=True)

    def walk(value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                assert isinstance(k, str | int), type(k)
                walk(v)
        elif isinstance(value, list | tuple):
            for v in value:
                walk(v)
        else:
            assert isinstance(value, torch.Tensor | int | float | str | bool | type(None)), type(value)

    walk(payload)
    assert payload["format"] == "faultwatch-checkpoint"
    # Rebuilt from its args alone, the model has the trained sizes.
    model, _, _ = load_checkpoint(trained.run_dir)
    assert model.config.hidden == HIDDEN and not model.training


# -- the runtime refuses models it cannot read ---------------------------------------------


def test_newer_contract_version_is_refused_by_step_model(trained: TrainedModels, tmp_path: Path):
    def bump(raw):
        raw["version"] = CONTRACT_VERSION + 1

    path = with_edited_contract(trained.int8, tmp_path / "future.onnx", bump)
    with pytest.raises(ModelError) as info:
        StepModel(path)
    message = str(info.value)
    assert "\n" not in message
    assert f"contract version {CONTRACT_VERSION + 1}" in message and "upgrade" in message
    assert str(path) in message


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (lambda raw: raw.update(hidden=[*raw["hidden"], 4]), "h_in_2"),  # a layer the graph lacks
        (lambda raw: raw.update(features=raw["features"][:-1], targets=raw["targets"][:-1],
                                scaler=raw["scaler"] | {"offset": raw["scaler"]["offset"][:-1],
                                                        "scale": raw["scaler"]["scale"][:-1]},
                                calibration=raw["calibration"]
                                | {"residual_std": raw["calibration"]["residual_std"][:-1]},
                                detector_calibration=raw["detector_calibration"] | {
                                    "spike_residual_std":
                                        raw["detector_calibration"]["spike_residual_std"][:-1]}),
         "features"),
        (lambda raw: raw.pop("scaler"), "scaler"),
        (lambda raw: raw.update(cell="transformer"), "transformer"),
        # Crafted or damaged metadata that used to load (or crash with a traceback): each is
        # refused at load, which is start, --check-config and reload alike.
        (lambda raw: raw.update(hidden=[h * 2 for h in raw["hidden"]]), "wide"),
        (lambda raw: raw.update(hidden=["x"]), "malformed field"),
        (lambda raw: raw.update(sample_period_s="fast"), "malformed field"),
        (lambda raw: raw.update(sample_period_s=0), "sample_period_s must be finite and > 0"),
        (lambda raw: raw.update(sample_period_s="NaN"), "sample_period_s must be finite and > 0"),
        (lambda raw: raw["scaler"].update(scale=[0.0] * len(raw["scaler"]["scale"])),
         "scaler.scale must be finite and > 0"),
        (lambda raw: raw["scaler"].update(offset=[float("nan")] * len(raw["scaler"]["offset"])),
         "scaler.offset must be finite"),
        (lambda raw: raw["scaler"].update(offset=["1"] * len(raw["scaler"]["offset"])),
         "scaler.offset must hold numbers"),
        (lambda raw: raw["calibration"].update(residual_std=[float("inf")] * len(raw["targets"])),
         "calibration.residual_std must be finite and > 0"),
        (lambda raw: raw["calibration"].update(threshold=float("nan")), "calibration.threshold"),
        (lambda raw: raw["calibration"].update(threshold=-1.0), "calibration.threshold"),
        (lambda raw: raw["calibration"].update(score_span=0), "calibration.score_span"),
        (lambda raw: raw["calibration"].update(warmup=1.5), "calibration.warmup"),
        (lambda raw: raw["calibration"].update(extra=1), "malformed field"),
        (lambda raw: raw.update(features=[*raw["features"][:-1], raw["features"][0]]), "unique"),
        (lambda raw: raw.update(targets=[raw["targets"][0]] * 2), "repeated"),
    ],
    ids=["extra-layer", "fewer-features", "no-scaler", "unknown-cell", "hidden-doubled", "hidden-text",
         "period-text", "period-zero", "period-nan", "scale-zero", "offset-nan", "offset-text",
         "residual-inf", "threshold-nan", "threshold-negative", "span-zero", "warmup-fraction",
         "calibration-extra-key", "feature-twice", "target-twice"],
)
def test_contract_mismatch_is_a_model_error_naming_it(trained: TrainedModels, tmp_path: Path, edit,
                                                      named: str):
    path = with_edited_contract(trained.fp32, tmp_path / "edited.onnx", edit)
    with pytest.raises(ModelError, match=named) as info:
        StepModel(path)
    assert "\n" not in str(info.value)


def test_a_damaged_model_file_loads_intact_or_is_refused_in_one_line(trained: TrainedModels, tmp_path: Path,
                                                                     capfd):
    """Truncated at every 10 %, a byte flipped at every 10 %, empty, a folder: never a traceback."""
    good = trained.int8.read_bytes()
    variants = {f"truncated-{pct}%": good[:len(good) * pct // 100] for pct in range(0, 100, 10)}
    for pct in range(0, 100, 10):
        at = len(good) * pct // 100
        variants[f"flipped-{pct}%"] = good[:at] + bytes([good[at] ^ 0xFF]) + good[at + 1:]
    refused = 0
    for name, data in variants.items():
        path = tmp_path / f"{name}.onnx"
        path.write_bytes(data)
        try:
            StepModel(path)  # a flip inside a weight still makes a loadable model
        except ModelError as exc:
            assert "\n" not in str(exc) and str(path) in str(exc), (name, str(exc))
            refused += 1
    assert refused >= 10  # every truncation at least
    assert "EP Error" not in capfd.readouterr().out  # onnxruntime's retry, printed to stdout: off
    (tmp_path / "folder.onnx").mkdir()
    with pytest.raises(ModelError, match="cannot read model"):
        StepModel(tmp_path / "folder.onnx")


def test_replaced_contract_keeps_graph_parity(trained: TrainedModels, tmp_path: Path):
    """Editing nothing but re-serializing keeps the model loadable (the edit helper is sound)."""
    path = with_edited_contract(trained.fp32, tmp_path / "same.onnx", lambda raw: None)
    assert StepModel(path).contract == StepModel(trained.fp32).contract
