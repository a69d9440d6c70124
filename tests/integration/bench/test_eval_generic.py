"""``faultwatch eval telemanom`` and ``eval csv``: real training, int8 export, the engine, and the
proof that the model file decides: ``replay`` of the exported model gives eval's fault column.

A tiny telemanom folder and a tiny CSV are made by the tests; the last test runs two real MSL
channels from ../shared/data when present.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from faultwatch.runtime.cli import main
from faultwatch.runtime.devtools.simulator import Fault, simulate, write_csv
from faultwatch.runtime.engine.model import StepModel
from helpers import SHARED_DATA

pytestmark = pytest.mark.torch

MSL = SHARED_DATA / "msl"
EVENT_KEYS = {"precision", "recall", "f1", "tp", "fp", "fn"}


def _run(*argv: str) -> tuple[int, str]:
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(list(argv))
    return code, stdout.getvalue()


def _column(path: Path, name: str) -> list[str]:
    with path.open(newline="") as f:
        return [row[name] for row in csv.DictReader(f)]


def write_telemanom(root: Path) -> None:
    """Two channels: a noisy sine (column 0) and two command columns; the test array of A-1 has
    a level shift at rows 200..239 (labelled), B-1's test array has none (and no label)."""
    rng = np.random.default_rng(5)
    for name in ("train", "test"):
        (root / name).mkdir(parents=True)
    for chan, shift in (("A-1", True), ("B-1", False)):
        for part, n in (("train", 300), ("test", 400)):
            t = np.arange(n)
            x = np.zeros((n, 3))
            x[:, 0] = 0.6 * np.sin(2 * np.pi * t / 25) + 0.02 * rng.standard_normal(n)
            x[t % 50 == 0, 1] = 1.0  # a command now and then
            if part == "test" and shift:
                x[200:240, 0] += 0.8
            np.save(root / part / f"{chan}.npy", x.astype(np.float32))
    (root / "labeled_anomalies.csv").write_text(
        'chan_id,spacecraft,anomaly_sequences,class,num_values\n'
        'A-1,TEST,"[[200, 239]]",[point],400\n'
        'B-1,TEST,"[]",[],400\n')


def test_eval_telemanom_on_a_tiny_folder(tmp_path: Path):
    root = tmp_path / "telemanom"
    write_telemanom(root)
    out = tmp_path / "out"
    code, text = _run("eval", "telemanom", str(root), "--out", str(out), "--jobs", "2", "--epochs", "15")
    assert code == 0, text
    m = json.loads((out / "metrics.json").read_text())
    assert m["benchmark"] == "telemanom" and m["failed"] == []
    assert set(m["events"]) == EVENT_KEYS
    assert m["events"]["tp"] + m["events"]["fn"] == 1  # one labelled sequence in all
    assert m["events"]["tp"] == 1, m["events"]  # a 0.8 level shift on a 0.02 noise is found
    files = {f["name"]: f for f in m["files"]}
    assert set(files) == {"A-1", "B-1"}
    for name, f in files.items():
        assert f["train_rows"] == 300 and f["test_rows"] == 400
        model = StepModel(out / "models" / f"{name}.onnx")
        assert model.contract.targets == ("value",) and len(model.contract.features) == 3
        rows = out / "rows" / f"{name}.csv"
        assert len(_column(rows, "fault")) == 700  # every row, train rows first
    assert files["A-1"]["anomalous_test_rows"] == 40
    assert "ev P" in text and "A-1" in text
    assert (out / "index.html").is_file() and (out / "reports" / "A-1.html").is_file()


def test_eval_csv_then_replay_of_the_exported_model_decides_the_same(tmp_path: Path):
    data = simulate(devices=1, steps=900, seed=17, faults=[Fault("valve_closure", "pump-000", 600, 150)])
    with_ts = tmp_path / "with_ts.csv"
    write_csv(data, with_ts)
    # The same rows without their timestamp column: evenly spaced rows.
    lines = with_ts.read_text().splitlines()
    header = lines[0].split(",")
    drop = header.index("timestamp")
    plain = tmp_path / "pump.csv"
    plain.write_text("\n".join(",".join(c for i, c in enumerate(line.split(",")) if i != drop)
                               for line in lines) + "\n")
    out = tmp_path / "out"
    code, text = _run("eval", "csv", str(plain), "--train-rows", "400", "--out", str(out), "--jobs", "1",
                      "--epochs", "15", "--no-baselines")
    assert code == 0, text
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["events"]) == EVENT_KEYS and m["events"]["tp"] == 1, m["events"]
    model, rows = out / "models" / "pump.onnx", out / "rows" / "pump.csv"
    assert _column(rows, "ts")[:2] == ["0.0", "1.0"]

    replayed = tmp_path / "replayed.csv"
    assert main(["replay", str(model), str(plain), "--out", str(replayed)]) == 0
    eval_fault, replay_fault = _column(rows, "fault"), _column(replayed, "fault")
    assert len(eval_fault) == 900 and replay_fault == eval_fault
    assert "1" in eval_fault  # the comparison includes a raised fault
    assert _column(replayed, "anomalous") == _column(rows, "anomalous")


def test_eval_with_models_scores_an_earlier_runs_models_with_a_new_detector(tmp_path: Path, capsys):
    data = simulate(devices=1, steps=700, seed=29, faults=[Fault("valve_closure", "pump-000", 500, 100)])
    pump = tmp_path / "pump.csv"
    write_csv(data, pump)
    first, same, other = tmp_path / "first", tmp_path / "same", tmp_path / "other"
    common = ("eval", "csv", str(pump), "--train-rows", "300", "--jobs", "1", "--no-baselines",
              "--no-reports")
    assert _run(*common, "--out", str(first), "--epochs", "10")[0] == 0
    # The same detector: nothing is trained, and every row is decided as before.
    code, text = _run(*common, "--out", str(same), "--models", str(first))
    assert code == 0, text
    (reused,) = json.loads((same / "metrics.json").read_text())["files"]
    assert reused["train"]["reused_model"] == str(first / "models" / "pump.onnx")
    assert (same / "rows" / "pump.csv").read_text() == (first / "rows" / "pump.csv").read_text()
    # Another detector: written into the copy, which replay then decides with, row for row.
    code, text = _run(*common, "--out", str(other), "--models", str(first), "--set", "raise_k=1",
                      "--set", "window_n=1", "--set", "clear_m=1", "--set", "cooldown=0")
    assert code == 0, text
    model = StepModel(other / "models" / "pump.onnx")
    assert (model.contract.detector.raise_k, model.contract.detector.clear_m) == (1, 1)
    replayed = tmp_path / "replayed.csv"
    assert main(["replay", str(other / "models" / "pump.onnx"), str(pump), "--out", str(replayed)]) == 0
    faults = _column(other / "rows" / "pump.csv", "fault")
    assert _column(replayed, "fault") == faults
    assert faults != _column(first / "rows" / "pump.csv", "fault")  # the new detector decided
    # A model trained on other data is refused, naming why.
    write_csv(simulate(devices=1, steps=700, seed=30), pump)
    capsys.readouterr()
    assert _run(*common, "--out", str(tmp_path / "refused"), "--models", str(first))[0] == 2
    err = capsys.readouterr().err
    assert "trained on other data" in err and err.count("\n") == 1


def test_eval_csv_needs_one_way_to_split(tmp_path: Path, capsys):
    f = tmp_path / "x.csv"
    f.write_text("a,anomaly\n1,0\n")
    for extra in ([], ["--train-rows", "10", "--train-fraction", "0.5"]):
        assert main(["eval", "csv", str(f), "--out", str(tmp_path / "o"), *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--train-rows" in err
    assert main(["eval", "telemanom", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "telemanom layout" in capsys.readouterr().err


@pytest.mark.skipif(not (MSL / "labeled_anomalies.csv").exists(),
                    reason=f"the MSL data is not at {MSL} (../shared/data beside the project)")
def test_two_real_msl_channels(tmp_path: Path):
    root = tmp_path / "msl"
    for part in ("train", "test"):
        (root / part).mkdir(parents=True)
        for chan in ("M-6", "S-2"):  # linked, never copied
            (root / part / f"{chan}.npy").symlink_to(MSL / part / f"{chan}.npy")
    lines = (MSL / "labeled_anomalies.csv").read_text().splitlines()
    (root / "labeled_anomalies.csv").write_text(
        "\n".join([lines[0], *[line for line in lines[1:] if line.split(",")[0] in ("M-6", "S-2")]]) + "\n")
    out = tmp_path / "out"
    code, text = _run("eval", "telemanom", str(root), "--out", str(out), "--jobs", "2", "--no-baselines")
    assert code == 0, text
    m = json.loads((out / "metrics.json").read_text())
    assert m["failed"] == [] and len(m["files"]) == 2
    assert m["events"]["tp"] + m["events"]["fn"] == 2  # one labelled sequence each
    for f in m["files"]:
        test = np.load(MSL / "test" / f"{f['name']}.npy")
        assert f["test_rows"] == len(test)
