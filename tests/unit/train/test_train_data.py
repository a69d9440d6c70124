"""``faultwatch train`` on the CSVs users bring: SKAB-style ``;`` files with labels, gaps and a
stuck channel; the recipe's own OHLCV price example; column selection; real SKAB when present."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from faultwatch.export.build import ExportOptions, export_model
from faultwatch.runtime import cli
from faultwatch.runtime.engine.model import StepModel
from faultwatch.train.checkpoint import load_checkpoint
from helpers import SHARED_DATA

pytestmark = [pytest.mark.torch, pytest.mark.usefixtures("torch_one_thread")]

TINY = ["--hidden", "8", "--dense", "4", "--epochs", "2", "--look-back", "10", "--lr", "1e-2", "--quiet"]
SKAB = SHARED_DATA / "skab"


def train(csv: Path, out: Path, *flags: str) -> dict:
    assert cli.main(["train", str(csv), "--out", str(out), *TINY, *flags]) == 0
    return json.loads((out / "report.json").read_text())


@pytest.fixture(scope="module")
def skab_like(tmp_path_factory) -> tuple[Path, int]:
    """A ``;`` separated file shaped like SKAB: ISO datetimes, 4 sensors (one stuck at a constant),
    anomaly/changepoint labels, and some empty cells. Returns the path and the number of gaps."""
    rng = np.random.default_rng(3)
    n = 300
    t = np.arange(n)
    stamps = np.datetime64("2020-02-08T13:30:47") + t.astype("timedelta64[s]")
    sensors = {
        "Accelerometer1RMS": 0.2 + 0.01 * np.sin(t / 7) + 0.002 * rng.standard_normal(n),
        "Current": 2.1 + 0.3 * np.sin(t / 23) + 0.01 * rng.standard_normal(n),
        "Voltage": np.full(n, 230.0),  # stuck channel: must scale safely
        "Volume Flow RateRMS": 122 + 3 * np.cos(t / 31) + 0.1 * rng.standard_normal(n),
    }
    gaps = [(10, "Current"), (11, "Current"), (150, "Accelerometer1RMS"), (299, "Volume Flow RateRMS")]
    lines = ["datetime;" + ";".join(sensors) + ";anomaly;changepoint"]
    for i in range(n):
        cells = ["" if (i, name) in gaps else f"{v[i]:.6f}" for name, v in sensors.items()]
        label = "1.0" if 200 <= i < 220 else "0.0"
        lines.append(f"{str(stamps[i]).replace('T', ' ')};" + ";".join(cells) + f";{label};0.0")
    path = tmp_path_factory.mktemp("skab-like") / "valve.csv"
    path.write_text("\n".join(lines) + "\n")
    return path, len(gaps)


def test_semicolon_csv_with_labels_gaps_and_a_constant_column(skab_like, tmp_path):
    path, n_gaps = skab_like
    report = train(path, tmp_path / "run")
    _, _, prepared = load_checkpoint(tmp_path / "run")
    assert prepared.features == ("Accelerometer1RMS", "Current", "Voltage", "Volume Flow RateRMS")
    assert report["interpolated_cells"] == n_gaps
    assert np.isfinite(report["best_val_loss"]) and np.isfinite(report["val_loss_windowed"])
    v = prepared.features.index("Voltage")
    assert prepared.scaler.scale[v] == 1.0  # constant: no division by a zero range
    assert all(np.all(s.scaled[:, v] == 0.0) for s in prepared.series)
    assert all(np.isfinite(s.scaled).all() for s in prepared.series)
    assert prepared.sample_period_s == 1.0
    # It exports and runs like any other model.
    export_model(tmp_path / "run", tmp_path / "m.onnx", ExportOptions(quantize="int8"))
    assert StepModel(tmp_path / "m.onnx").contract.features == prepared.features


def test_scaler_is_fitted_on_the_training_part_only(skab_like, tmp_path):
    path, _ = skab_like
    train(path, tmp_path / "run", "--scaler", "standard", "--features", "Current")
    _, _, prepared = load_checkpoint(tmp_path / "run")
    (s,) = prepared.series
    train_part = s.scaled[: s.split, 0]
    assert prepared.scaler.kind == "standard"
    assert abs(train_part.mean()) < 1e-5 and abs(train_part.std() - 1) < 1e-4
    assert abs(s.scaled[s.split:, 0].mean()) > 1e-3  # the validation part was not used to fit


def test_features_and_exclude_choose_the_inputs(skab_like, tmp_path):
    path, _ = skab_like
    train(path, tmp_path / "a", "--exclude", "Voltage,Current")
    assert load_checkpoint(tmp_path / "a")[2].features == ("Accelerometer1RMS", "Volume Flow RateRMS")
    train(path, tmp_path / "b", "--features", "Current,Voltage", "--target", "Current")
    _, _, prepared = load_checkpoint(tmp_path / "b")
    assert (prepared.features, prepared.targets) == (("Current", "Voltage"), ("Current",))


@pytest.fixture(scope="module")
def prices(tmp_path_factory) -> Path:
    """The recipe's example: daily OHLCV prices, forecast Close."""
    rng = np.random.default_rng(9)
    n = 400
    close = 100 * np.exp(np.cumsum(0.01 * rng.standard_normal(n)))
    open_ = close * (1 + 0.003 * rng.standard_normal(n))
    high = np.maximum(open_, close) * (1 + 0.005 * rng.random(n))
    low = np.minimum(open_, close) * (1 - 0.005 * rng.random(n))
    volume = rng.integers(1_000_000, 5_000_000, n)
    days = np.datetime64("2020-01-01") + np.arange(n).astype("timedelta64[D]")
    lines = ["Date,Open,High,Low,Close,Adj Close,Volume"]
    lines += [f"{days[i]},{open_[i]:.2f},{high[i]:.2f},{low[i]:.2f},{close[i]:.2f},{close[i]:.2f},{volume[i]}"
              for i in range(n)]
    path = tmp_path_factory.mktemp("prices") / "prices.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_price_example_forecasts_close(prices, tmp_path):
    """``faultwatch train prices.csv --target Close``: every column in, Close out."""
    report = train(prices, tmp_path / "run", "--target", "Close")
    _, _, prepared = load_checkpoint(tmp_path / "run")
    assert prepared.features == ("Open", "High", "Low", "Close", "Adj Close", "Volume")
    assert prepared.targets == ("Close",)
    assert report["model"]["target_index"] == [3]
    assert prepared.sample_period_s == 86_400.0
    assert report["parameters"]["head"] == 8 * 4 + 4 + 4 * 1 + 1
    out = tmp_path / "prices.onnx"
    assert cli.main(["export", str(tmp_path / "run"), "--out", str(out), "--quantize", "int8"]) == 0
    model = StepModel(out)
    forecast, _ = model.step(prepared.series[0].scaled[None, :5], model.zero_state(1))
    assert forecast.shape == (1, 5, 1)


def test_a_target_that_is_not_a_column_is_a_one_line_error(prices, tmp_path, capsys):
    assert cli.main(["train", str(prices), "--out", str(tmp_path / "r"), *TINY, "--target", "close"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "close" in err[0]


@pytest.mark.skipif(not SKAB.is_dir(), reason=f"SKAB data not found at {SKAB}")
def test_real_skab_file_trains_with_labels_excluded(tmp_path):
    path = SKAB / "valve1" / "0.csv"
    report = train(path, tmp_path / "run", "--epochs", "1")
    _, _, prepared = load_checkpoint(tmp_path / "run")
    assert len(prepared.features) == 8 and "anomaly" not in prepared.features
    assert "changepoint" not in prepared.features
    assert np.isfinite(report["best_val_loss"])
