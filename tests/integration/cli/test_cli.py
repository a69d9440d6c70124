"""The ``faultwatch`` command as a user meets it: in fresh subprocesses, on a really trained model.

- the edge runtime's commands never import torch (nor onnx), and work where torch is not installed
  (tests/unit/test_edge_imports.py imports every runtime module that way);
- a user error is one line on stderr and exit code 2, never a traceback;
- ``inspect --json`` shows the model's contract; ``run --example-config`` is the defaults.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import subprocess
import sys
import tomllib
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import onnx
import pytest
from faultwatch.runtime import cli
from faultwatch.runtime.daemon.config import Config, load_config, resolve_client_id
from faultwatch.runtime.devtools.simulator import CHANNELS, simulate, write_csv
from faultwatch.runtime.engine.model import StepModel
from helpers import HEAVY, WITHOUT_HEAVY
from model_fixtures import TrainedModels

pytestmark = pytest.mark.torch



def faultwatch(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "faultwatch.runtime.cli", *args], capture_output=True,
                          text=True, timeout=300, cwd=cwd)


def python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def small_csv(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "readings.csv"
    write_csv(simulate(devices=2, steps=120, seed=31), path)
    return path


# -- no torch on the edge ------------------------------------------------------------------


def test_runtime_and_replay_never_import_torch(trained: TrainedModels, small_csv: Path, tmp_path: Path):
    out = tmp_path / "scores.csv"
    code = f"""
import json, sys
from faultwatch.runtime import cli
rc_replay = cli.main(["replay", {str(trained.int8)!r}, {str(small_csv)!r}, "--out", {str(out)!r}])
rc_inspect = cli.main(["inspect", "--json", {str(trained.int8)!r}])
print(json.dumps({{"rc": [rc_replay, rc_inspect],
                  "heavy": sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r})}}))
"""
    result = python(code)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["rc"] == [0, 0]
    assert report["heavy"] == [], f"the runtime imported {report['heavy']}"
    with out.open(newline="") as f:
        assert len(list(csv.reader(f))) == 1 + 2 * 120  # the replay really ran


def test_runtime_works_where_torch_is_not_installed(trained: TrainedModels, small_csv: Path,
                                                    tmp_path: Path):
    """torch (and onnx) made unimportable: the runtime still runs; training commands say what to install."""
    out = tmp_path / "scores.csv"
    code = WITHOUT_HEAVY + f"""
import contextlib, io, json
from faultwatch.runtime import cli
rc_replay = cli.main(["replay", {str(trained.int8)!r}, {str(small_csv)!r}, "--out", {str(out)!r}])
rc_describe = cli.main(["inspect", {str(trained.int8)!r}])
err = io.StringIO()
with contextlib.redirect_stderr(err):
    rc_train = cli.main(["train", {str(small_csv)!r}, "--out", {str(tmp_path / "run")!r}])
    rc_export = cli.main(["export", {str(trained.run_dir)!r}, "--out", {str(tmp_path / "m.onnx")!r}])
print(json.dumps({{"rc": [rc_replay, rc_describe, rc_train, rc_export], "stderr": err.getvalue()}}))
"""
    result = python(code)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["rc"] == [0, 0, 2, 2]
    hint = report["stderr"].splitlines()
    assert len(hint) == 2 and all("pip install 'faultwatch[train]'" in line for line in hint)
    assert out.exists()


# -- user errors ---------------------------------------------------------------------------


def _non_faultwatch_onnx(path: Path) -> Path:
    """A valid ONNX model without faultwatch metadata."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def _user_error_case(name: str, trained: TrainedModels, small_csv: Path, tmp: Path) -> list[str]:
    """The arguments of one user error; files it needs are made in ``tmp``."""
    model = str(trained.int8)
    if name == "missing-csv":
        return ["replay", model, str(tmp / "nope.csv"), "--out", str(tmp / "o.csv")]
    if name == "csv-without-timestamp":
        # replay takes such a file as evenly spaced rows; training needs real timestamps
        (tmp / "no-ts.csv").write_text("device,current\npump,1.0\npump,2.0\n")
        return ["train", str(tmp / "no-ts.csv"), "--out", str(tmp / "run")]
    if name == "csv-without-a-model-channel":
        (tmp / "few.csv").write_text("timestamp,current\n1,1.0\n2,2.0\n")
        return ["replay", model, str(tmp / "few.csv"), "--out", str(tmp / "o.csv")]
    if name == "missing-model":
        return ["replay", str(tmp / "nope.onnx"), str(small_csv), "--out", str(tmp / "o.csv")]
    if name == "corrupt-model":
        data = trained.int8.read_bytes()
        (tmp / "corrupt.onnx").write_bytes(data[: len(data) // 3])
        return ["inspect", str(tmp / "corrupt.onnx")]
    if name == "empty-model":
        (tmp / "empty.onnx").write_bytes(b"")
        return ["inspect", str(tmp / "empty.onnx")]
    if name == "non-faultwatch-onnx":
        return ["inspect", str(_non_faultwatch_onnx(tmp / "identity.onnx"))]
    if name == "run-with-non-faultwatch-onnx":
        return ["run", "--model", str(_non_faultwatch_onnx(tmp / "identity.onnx")), "--broker",
                "127.0.0.1:1"]
    if name == "bad-fault-spec":
        return ["simulate", "--fault", "valve_closure", "--out", str(tmp / "s.csv")]
    if name == "fault-on-unknown-device":
        return ["simulate", "--devices", "1", "--fault", "valve_closure@pump-007:10+5",
                "--out", str(tmp / "s.csv")]
    if name == "fault-after-the-end":
        return ["simulate", "--steps", "100", "--fault", "spike@pump-000:500+5", "--out",
                str(tmp / "s.csv")]
    if name == "no-steps":
        return ["simulate", "--steps", "0", "--out", str(tmp / "s.csv")]
    if name == "unknown-config-key":
        (tmp / "bad.toml").write_text("[engine]\ntreshold = 3.0\n")
        return ["run", "--model", model, "--config", str(tmp / "bad.toml")]
    if name == "config-value-out-of-range":
        (tmp / "range.toml").write_text("[input]\nqos = 2\n")
        return ["run", "--model", model, "--config", str(tmp / "range.toml"), "--check-config"]
    if name == "missing-config-file":
        return ["run", "--model", model, "--config", str(tmp / "nope.toml")]
    if name == "missing-checkpoint":
        return ["export", str(tmp / "no-run"), "--out", str(tmp / "m.onnx")]
    if name == "empty-checkpoint":
        (tmp / "run").mkdir()
        (tmp / "run" / "checkpoint.pt").write_bytes(b"")
        return ["export", str(tmp / "run"), "--out", str(tmp / "m.onnx")]
    if name == "unknown-quantization":
        return ["export", str(trained.run_dir), "--out", str(tmp / "m.onnx"), "--quantize", "int4"]
    if name == "unknown-detector-setting":
        return ["export", str(trained.run_dir), "--out", str(tmp / "m.onnx"), "--set", "clearm=20"]
    if name == "detector-setting-without-value":
        return ["export", str(trained.run_dir), "--out", str(tmp / "m.onnx"), "--set", "clear_m"]
    if name == "eval-models-not-an-eval-folder":
        return ["eval", "csv", str(small_csv), "--train-rows", "10", "--out", str(tmp / "o"),
                "--models", str(tmp)]
    if name == "eval-models-with-training-flags":
        (tmp / "models").mkdir()
        return ["eval", "csv", str(small_csv), "--train-rows", "10", "--out", str(tmp / "o"),
                "--models", str(tmp), "--epochs", "3"]
    raise AssertionError(name)


USER_ERRORS = {
    # case: (what stderr must mention)
    "missing-csv": "nope.csv",
    "csv-without-timestamp": "timestamp",
    "csv-without-a-model-channel": "column",
    "missing-model": "nope.onnx",
    "corrupt-model": "corrupt.onnx",
    "empty-model": "empty.onnx",
    "non-faultwatch-onnx": "not a faultwatch model",
    "run-with-non-faultwatch-onnx": "not a faultwatch model",
    "bad-fault-spec": "valve_closure",
    "fault-on-unknown-device": "pump-007",
    "fault-after-the-end": "500",
    "no-steps": "steps",
    "unknown-config-key": "engine.treshold",
    "config-value-out-of-range": "input.qos",
    "missing-config-file": "nope.toml",
    "missing-checkpoint": "no-run",
    "empty-checkpoint": "checkpoint",
    "unknown-quantization": "int4",
    "unknown-detector-setting": "clearm",
    "detector-setting-without-value": "KEY=VALUE",
    "eval-models-not-an-eval-folder": "--models",
    "eval-models-with-training-flags": "--epochs",
}


@pytest.mark.parametrize("case", list(USER_ERRORS))
def test_user_error_is_one_line_and_exit_2(case: str, trained: TrainedModels, small_csv: Path,
                                           tmp_path: Path):
    args = _user_error_case(case, trained, small_csv, tmp_path)
    result = faultwatch(*args)
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"faultwatch {args[0]}: "), lines[0]
    assert USER_ERRORS[case] in lines[0]
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "s.csv").exists()


def test_export_writes_set_detector_settings_into_the_model(trained: TrainedModels, tmp_path: Path):
    out = tmp_path / "m.onnx"
    assert cli.main(["export", str(trained.run_dir), "--out", str(out), "--quantize", "none",
                     "--set", "clear_m=40", "--set", "likelihood.tail=1e-6", "--set", "spike=false"]) == 0
    detector = StepModel(out).contract.detector
    assert (detector.clear_m, detector.likelihood.tail, detector.spike) == (40, 1e-6, False)
    assert detector.cooldown == type(detector)().cooldown  # the rest stay at their defaults


# -- inspect -------------------------------------------------------------------------------


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_inspect_json_shows_the_contract(trained: TrainedModels, quantize: str):
    path = trained.model(quantize)
    result = faultwatch("inspect", "--json", str(path))
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    contract = StepModel(path).contract
    assert info["features"] == list(contract.features) == list(CHANNELS)
    assert info["targets"] == list(contract.targets)
    assert info["quantization"] == quantize
    assert info["hidden"] == list(contract.hidden) and info["cell"] == "lstm"
    assert info["calibration"] == json.loads(json.dumps(asdict(contract.calibration)))
    assert info["scaler"] == json.loads(json.dumps(asdict(contract.scaler)))
    assert info["contract_version"] == contract.version
    assert info["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert info["size_bytes"] == path.stat().st_size
    assert list(info["inputs"]) == contract.input_names()
    assert list(info["outputs"]) == contract.output_names()
    readings = info["inputs"]["readings"]["shape"]
    assert isinstance(readings[0], str) and isinstance(readings[1], str)  # batch, time: dynamic
    assert readings[2] == len(contract.features)
    assert info["outputs"]["forecast"]["shape"][2] == len(contract.targets)
    for name_in, name_out, width in contract.state_names():
        for shape in (info["inputs"][name_in]["shape"], info["outputs"][name_out]["shape"]):
            assert shape[0] == 1 and isinstance(shape[1], str) and shape[2] == width
    assert info["provenance"]["data_sha256"] == hashlib.sha256(trained.csv.read_bytes()).hexdigest()


def test_inspect_text_names_features_and_quantization(trained: TrainedModels, capsys):
    assert cli.main(["inspect", str(trained.int8)]) == 0
    text = capsys.readouterr().out
    assert "quantization int8" in text
    assert all(name in text for name in CHANNELS)


# -- the example config --------------------------------------------------------------------


def test_example_config_is_the_defaults(trained: TrainedModels, tmp_path: Path):
    result = faultwatch("run", "--example-config")
    assert result.returncode == 0, result.stderr
    path = tmp_path / "example.toml"
    path.write_text(result.stdout)
    args = SimpleNamespace(model="model.onnx", broker=None, state_dir=None)
    assert load_config(str(path), args) == load_config(None, args)
    defaults = Config(model="model.onnx")
    defaults.broker.client_id = resolve_client_id(defaults)  # load_config fills in {hostname}
    assert load_config(str(path), args) == defaults

    # Every option is shown, so the example documents them all.
    raw = tomllib.loads(result.stdout)

    def keys(obj, table: dict, where: str = "") -> None:
        for f in dataclasses.fields(obj):
            assert f.name in table, f"example config lacks {where}{f.name}"
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                keys(value, table[f.name], f"{where}{f.name}.")

    keys(Config(), raw)

    # And the daemon's own check accepts it.
    check = faultwatch("run", "--config", str(path), "--model", str(trained.int8), "--check-config")
    assert check.returncode == 0, check.stderr
    assert "ok" in check.stdout
