"""``faultwatch eval nab`` end to end on a synthetic univariate series with a NAB windows file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from faultwatch.runtime.cli import main

pytestmark = pytest.mark.torch

N = 2400
SHIFT = (1500, 1600)  # rows of the fault: the temperature steps up


def stamp(t: np.ndarray) -> list[str]:
    return [str(s).replace("T", " ") for s in t.astype("datetime64[s]")]


@pytest.fixture(scope="module")
def nab_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("nab")
    rng = np.random.default_rng(5)
    t = np.datetime64("2014-01-01T00:00:00") + np.arange(N) * np.timedelta64(300, "s")
    value = 80 + 2 * np.sin(np.arange(N) * 2 * np.pi / 288) + 0.3 * rng.standard_normal(N)
    value[SHIFT[0]:SHIFT[1]] += 6.0
    csv = root / "machine.csv"
    rows = "".join(f"{s},{v:.4f}\n" for s, v in zip(stamp(t), value, strict=True))
    csv.write_text("timestamp,value\n" + rows)
    # A NAB window around the fault, as in combined_windows.json (".000000" and all).
    lo, hi = stamp(t[[SHIFT[0] - 60, SHIFT[0] + 60]])
    windows = {"realKnownCause/machine.csv": [[lo + ".000000", hi + ".000000"]]}
    (root / "windows.json").write_text(json.dumps(windows))
    return csv, root / "windows.json"


def test_nab_eval_scores_the_series(nab_files, tmp_path: Path, capsys):
    csv, windows = nab_files
    out = tmp_path / "out"
    assert main(["eval", "nab", str(csv), "--windows", str(windows), "--out", str(out), "--jobs", "1"]) == 0
    text = capsys.readouterr().out
    assert "NAB std" in text and "LSTM forecaster (the model's detector)" in text
    m = json.loads((out / "metrics.json").read_text())
    assert {"f1", "far", "mar", "tp", "fp", "fn", "tn"} <= set(m)
    assert set(m["nab"]) == {"standard", "reward_low_FP", "reward_low_FN"}
    (f,) = m["files"]
    assert f["train_rows"] == 360  # min(⌊0.15 · 2400⌋, 750): the probationary period trains
    lstm = f["detectors"]["lstm"]
    assert lstm["nab"]["standard"]["windows"] == 1
    # The step is found early in its window: close to a perfect score, and far above the null detector.
    assert lstm["nab"]["standard"]["detected"] == 1
    assert m["nab"]["standard"] > 50
    assert m["nab"]["reward_low_FP"] <= m["nab"]["standard"] + 1e-9  # false positives cost more there
    # Event-wise too: the one window is one labelled sequence, found.
    assert m["events"]["tp"] == 1 and m["events"]["fn"] == 0
    assert (out / "reports" / "machine.html").exists() and (out / "models" / "machine.onnx").exists()
    assert (out / "rows" / "machine.csv").read_text().startswith("ts,score,anomalous,fault\n")


def test_a_series_without_windows_is_a_user_error(nab_files, tmp_path: Path, capsys):
    csv, _ = nab_files
    other = tmp_path / "windows.json"
    other.write_text(json.dumps({"x/other.csv": []}))
    assert main(["eval", "nab", str(csv), "--windows", str(other), "--out", str(tmp_path / "o")]) == 2
    assert "no windows for it" in capsys.readouterr().err
