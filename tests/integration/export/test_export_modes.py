"""Every cell in every precision: export → checker → parity → stream → score, the same round trip.

Tiny models (hidden (16, 8)) really trained on simulated pumps; each export is checked
here against torch independently of the numbers in its report. One test trains the
reference size (128/64) briefly, since the int8 targets (≤ 30% of the fp32 file,
forecast RMSE within 2%) are about that size: a tiny model's file is mostly graph.
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from faultwatch.export.build import TOLERANCE, ExportOptions, export_model
from faultwatch.export.onnx_graph import ExportError
from faultwatch.runtime import cli
from faultwatch.runtime.devtools.simulator import simulate, write_csv
from faultwatch.runtime.engine.calibration import streamed_forecasts
from faultwatch.runtime.engine.contract import CONTRACT_VERSION, METADATA_KEY
from faultwatch.runtime.engine.model import StepModel
from faultwatch.runtime.offline.replay import replay_csv
from faultwatch.train.checkpoint import load_checkpoint
from faultwatch.train.command import train_run
from faultwatch.train.fit import TrainConfig

pytestmark = pytest.mark.torch

CELLS = {"lstm": {}, "gru": {"cell": "gru"}, "peephole": {"peephole": True}}
MODES = ("none", "int8", "int8-static", "fp16")
LOOP = {"epochs": 3, "lr": 1e-2, "look_back": 20, "batch_size": 16, "seed": 0}


@pytest.fixture(scope="module")
def data_csv(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("export-modes") / "pumps.csv"
    write_csv(simulate(devices=2, steps=600, seed=11), path)
    return path


@pytest.fixture(scope="module")
def runs(data_csv: Path, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("export-runs")
    out = {}
    for name, kw in CELLS.items():
        out[name] = root / name
        train_run(data_csv, out[name], hidden=(16, 8), dense=8, train_config=TrainConfig(**LOOP),
                  quiet=True, **kw)
    return out


@pytest.fixture(scope="module")
def exports(runs: dict[str, Path], tmp_path_factory) -> dict[tuple[str, str], tuple[Path, dict]]:
    root = tmp_path_factory.mktemp("export-models")
    out = {}
    for cell, run in runs.items():
        for mode in MODES:
            path = root / f"{cell}-{mode}.onnx"
            out[cell, mode] = (path, export_model(run, path, ExportOptions(quantize=mode)))
    return out


def expected_ops(cell: str, mode: str) -> tuple[set[str], set[str]]:
    """(ops that must be in the graph, ops that must not)."""
    recurrent = "GRU" if cell == "gru" else "LSTM"
    if mode == "int8":
        if cell == "gru":  # no quantized GRU kernel: int8 storage, float op; dense layers quantized
            return {"GRU", "MatMulInteger"}, {"MatMul"}
        return {"DynamicQuantizeLSTM", "MatMulInteger"}, {"LSTM", "MatMul"}
    if mode == "int8-static":
        return {recurrent, "QuantizeLinear", "DequantizeLinear"}, set()
    return {recurrent, "MatMul"}, {"QuantizeLinear", "MatMulInteger"}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cell", list(CELLS))
def test_every_cell_in_every_mode_round_trips(cell, mode, runs, exports, data_csv, tmp_path):
    path, report = exports[cell, mode]
    model, _, prepared = load_checkpoint(runs[cell])
    proto = onnx.load(path)
    onnx.checker.check_model(proto)
    assert report["onnx_checker"] == "passed" and report["opset"] == 17
    assert any(o.domain in ("", "ai.onnx") and o.version == 17 for o in proto.opset_import)

    must, must_not = expected_ops(cell, mode)
    ops = {n.op_type for n in proto.graph.node}
    assert must <= ops and not (must_not & ops), sorted(ops)

    # The weight matrices really are stored in the mode's precision (biases stay float).
    matrices = [t for t in proto.graph.initializer if sum(d > 1 for d in t.dims) >= 2]
    kinds = {onnx.helper.tensor_dtype_to_np_dtype(t.data_type) for t in matrices}
    if mode == "none":
        assert kinds == {np.dtype("float32")}
    elif mode == "fp16":
        assert kinds == {np.dtype("float16")}
    else:
        assert np.dtype("float32") not in kinds and np.dtype("int8") in kinds, kinds

    # Parity, recomputed here: ONNX one reading per call vs torch over each whole series.
    step = StepModel(path)
    assert step.contract.quantization == mode and step.contract.cell == ("gru" if cell == "gru" else "lstm")
    assert step.contract.architecture["peephole"] == (cell == "peephole")
    series = [s.scaled for s in prepared.series]
    onnx_fc = streamed_forecasts(step, series)
    with torch.no_grad():
        torch_fc = [model(torch.from_numpy(s)[None])[0][0].numpy() for s in series]
    diff = max(float(np.abs(a - b).max()) for a, b in zip(onnx_fc, torch_fc, strict=True))
    assert diff <= TOLERANCE[mode]
    assert report["parity"]["max_abs_diff"] <= TOLERANCE[mode]
    if mode == "none":
        assert diff < 1e-5
    else:
        assert diff > 1e-7  # really converted, not a copy of fp32
    assert abs(report["parity"]["rmse_rel_change"]) < 0.05

    # Runs under default session options and under full optimisation, and is a real step graph.
    for level in (None, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        options = ort.SessionOptions()
        if level is not None:
            options.graph_optimization_level = level
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    assert set(report["sessions"]) == {"default", "full_optimisation", "no_optimisation"}
    assert max(report["sessions"].values()) <= TOLERANCE[mode]

    # The report beside the model is the one returned, with size and latency.
    saved = json.loads(path.with_suffix(".report.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert saved["size_bytes"] == path.stat().st_size
    assert saved["latency_us_per_step_batch1"]["model"] > 0
    if mode in ("int8", "fp16"):  # (QDQ's extra nodes outweigh its savings on a model this tiny)
        assert saved["size_bytes"] < saved["fp32_size_bytes"]

    # And the runtime engine scores with it, as the daemon would: a finite score for every reading.
    summary = replay_csv(path, data_csv, tmp_path / "scores.csv")
    assert summary["readings"] == sum(len(s) for s in series)
    with (tmp_path / "scores.csv").open() as f:
        scores = [float(row["score"]) for row in csv.DictReader(f)]
    assert len(scores) == summary["readings"] and np.isfinite(scores).all()


def test_peephole_weights_are_the_lstm_ops_p_input(runs, exports):
    model, _, _ = load_checkpoint(runs["peephole"])
    for mode in ("none", "int8"):
        path, _ = exports["peephole", mode]
        proto = onnx.load(path)
        inits = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
        nodes = [n for n in proto.graph.node if n.op_type in ("LSTM", "DynamicQuantizeLSTM")]
        assert len(nodes) == 2
        for node, rnn in zip(nodes, model.rnns, strict=True):
            p = inits[node.input[7]]  # [1, 3H] in ONNX gate order (input, output, forget)
            torch_p = rnn.peephole.detach().numpy()[0]  # [3, H] in (input, forget, output)
            np.testing.assert_array_equal(p[0], np.concatenate([torch_p[0], torch_p[2], torch_p[1]]))
    # Without its P input the graph would forecast differently: the peepholes matter.
    path, _ = exports["peephole", "none"]
    proto = onnx.load(path)
    for node in proto.graph.node:
        if node.op_type == "LSTM":
            node.input[7] = ""
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    step = StepModel(path)
    x = load_checkpoint(runs["peephole"])[2].series[0].scaled[None, :200]
    feed = dict(zip([i for i, _, _ in step.contract.state_names()], step.zero_state(1), strict=True))
    without = session.run(["forecast"], {"readings": x, **feed})[0]
    with_p, _ = step.step(x, step.zero_state(1))
    assert np.abs(without - with_p).max() > 1e-4


def test_int8_targets_at_the_reference_size(data_csv, tmp_path):
    """128/64, the recipe's size: int8 file ≤ 30% of fp32 and forecast RMSE within 2% of fp32."""
    run = tmp_path / "run"
    train_run(data_csv, run, train_config=TrainConfig(epochs=1, look_back=30, seed=0), quiet=True)
    fp32 = export_model(run, tmp_path / "fp32.onnx", ExportOptions(quantize="none"))
    for mode in ("int8", "int8-static"):
        q = export_model(run, tmp_path / f"{mode}.onnx", ExportOptions(quantize=mode))
        assert q["size_bytes"] <= 0.30 * fp32["size_bytes"], (mode, q["size_bytes"], fp32["size_bytes"])
        rel = abs(q["parity"]["rmse_onnx"] - fp32["parity"]["rmse_onnx"]) / fp32["parity"]["rmse_onnx"]
        assert rel <= 0.02, (mode, rel)
        assert q["int8_targets"]["size_met"] and q["int8_targets"]["rmse_met"]


def test_bidirectional_model_is_refused_with_the_reason(data_csv, tmp_path, capsys):
    run = tmp_path / "bi"
    report = train_run(data_csv, run, hidden=(8,), dense=0, bidirectional=True,
                       train_config=TrainConfig(**LOOP | {"epochs": 1, "mode": "windowed"}), quiet=True)
    assert report["val_loss_streamed"] is None and report["val_loss_windowed"] > 0
    out = tmp_path / "bi.onnx"
    with pytest.raises(ExportError, match="cannot stream") as info:
        export_model(run, out, ExportOptions(quantize="none"))
    assert "after the one being forecast" in str(info.value)
    assert cli.main(["export", str(run), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bidirectional" in err[0] and "cannot stream" in err[0]
    assert not out.exists()


def test_inspect_json_shows_cell_training_and_file(exports, runs, data_csv, capsys):
    path, _ = exports["peephole", "int8"]
    assert cli.main(["inspect", "--json", str(path)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert info["size_bytes"] == path.stat().st_size
    assert (info["cell"], info["peephole"], info["hidden"], info["layers"]) == ("lstm", True, [16, 8], 2)
    assert info["quantization"] == "int8" and info["opset"] == 17
    assert info["contract_version"] == CONTRACT_VERSION
    t = info["training"]
    assert t["data_sha256"] == hashlib.sha256(data_csv.read_bytes()).hexdigest()
    assert t["epochs"] == LOOP["epochs"] and 1 <= t["best_epoch"] <= LOOP["epochs"]
    assert t["val_loss"] > 0 and t["val_loss_windowed"] > 0 and t["mode"] == "stateful"
    assert t["faultwatch_version"] and info["exported"]["faultwatch_version"]
    assert [n for n, _ in info["parameters"]] == ["peephole-lstm0 (8→16)", "peephole-lstm1 (16→8)", "head"]
    assert list(info["inputs"]) == ["readings", "h_in_0", "c_in_0", "h_in_1", "c_in_1"]
    assert info["inputs"]["readings"]["shape"] == ["batch", "time", 8]
    assert info["calibration"]["threshold"] > 0
    # The text form carries the same facts.
    assert cli.main(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    for fact in (info["sha256"], "peephole lstm", "quantization int8", "opset 17", t["data_sha256"]):
        assert fact in text


def test_gru_model_has_no_cell_state_in_its_contract(exports):
    path, _ = exports["gru", "int8"]
    contract = StepModel(path).contract
    assert contract.input_names() == ["readings", "h_in_0", "h_in_1"]
    assert [o.name for o in onnx.load(path).graph.output] == ["forecast", "h_out_0", "h_out_1"]


def test_newer_contract_version_is_a_one_line_user_error(exports, tmp_path, capsys):
    path, _ = exports["lstm", "fp16"]
    proto = onnx.load(path)
    for prop in proto.metadata_props:
        if prop.key == METADATA_KEY:
            prop.value = json.dumps(json.loads(prop.value) | {"version": CONTRACT_VERSION + 1})
    future = tmp_path / "future.onnx"
    onnx.save(proto, future)
    assert cli.main(["inspect", str(future)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "upgrade" in err[0]


def test_old_runtime_fields_still_read(exports, tmp_path):
    """A model without the optional ``architecture`` field (an older export) still loads."""
    path, _ = exports["lstm", "none"]
    proto = onnx.load(path)
    for prop in proto.metadata_props:
        if prop.key == METADATA_KEY:
            raw = json.loads(prop.value)
            raw.pop("architecture")
            prop.value = json.dumps(raw)
    old = tmp_path / "old.onnx"
    onnx.save(proto, old)
    assert StepModel(old).contract.architecture == {}
