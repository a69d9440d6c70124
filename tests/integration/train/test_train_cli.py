"""``faultwatch train`` options: recipe defaults, --config files and flags over them, the training
modes, the progress display, and one-line user errors."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from faultwatch.runtime import cli, commands
from faultwatch.runtime.devtools.simulator import simulate, write_csv
from faultwatch.train.command import train_with_options
from faultwatch.train.options import OptionsError, TrainOptions

pytestmark = [pytest.mark.torch, pytest.mark.usefixtures("torch_one_thread")]

TINY = {"hidden": [8], "dense": 4, "epochs": 2, "look_back": 10, "lr": 0.01, "batch_size": 16}


@pytest.fixture(scope="module")
def csv_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("train-cli") / "pumps.csv"
    write_csv(simulate(devices=2, steps=300, seed=2), path)
    return path


def run_train(csv_path: Path, out: Path, *flags: str) -> tuple[int, dict | None]:
    rc = cli.main(["train", str(csv_path), "--out", str(out), "--quiet", *flags])
    report = out / "report.json"
    return rc, json.loads(report.read_text()) if report.exists() else None


def test_defaults_are_the_reference_recipe():
    o = TrainOptions()
    assert (o.hidden, o.dropout, o.dense, o.cell) == ((128, 64), 0.3, 32, "lstm")
    assert (o.look_back, o.batch_size, o.epochs, o.lr) == (60, 32, 100, 1e-3)
    assert (o.patience, o.lr_patience, o.val_fraction, o.scaler) == (10, 5, 0.2, "minmax")
    # `faultwatch train DATA --out RUN` with no other flag trains exactly that.
    args = cli.build_parser().parse_args(["train", "data.csv", "--out", "run"])
    assert commands.train_options(args) == o


def test_config_file_then_flags_override_it(csv_path, tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY | {"dropout": 0.1, "cell": "gru"}))
    rc, report = run_train(csv_path, tmp_path / "run", "--config", str(config), "--dropout", "0.25")
    assert rc == 0
    assert report["options"]["dropout"] == 0.25  # the flag wins
    assert report["options"]["cell"] == "gru" and report["model"]["hidden"] == [8]  # from the file
    assert list(report["parameters"]) == ["gru0 (8→8)", "head"]
    assert report["epochs_run"] <= 2


def test_toml_config(csv_path, tmp_path):
    config = tmp_path / "config.toml"
    config.write_text("hidden = [8]\ndense = 4\nepochs = 1\nlook_back = 10\nwindowed_unused = 1\n")
    rc, _ = run_train(csv_path, tmp_path / "run", "--config", str(config))
    assert rc == 2  # the unknown key is refused...
    config.write_text("hidden = [8]\ndense = 4\nepochs = 1\nlook_back = 10\nmode = \"windowed\"\n")
    rc, report = run_train(csv_path, tmp_path / "run", "--config", str(config))
    assert rc == 0 and report["train"]["mode"] == "windowed"  # ...the rest is used


@pytest.mark.parametrize(("content", "named"), [
    ({"hiddne": [8]}, "hiddne"),
    ({"dropout": 1.5}, "dropout"),
    ({"hidden": "big"}, "hidden"),
    ({"cell": "transformer"}, "cell"),
    ({"peephole": True, "cell": "gru"}, "peephole"),
    ({"bidirectional": True, "mode": "stateful"}, "bidirectional"),
])
def test_bad_config_is_a_one_line_error_naming_the_key(csv_path, tmp_path, capsys, content, named):
    config = tmp_path / "bad.json"
    config.write_text(json.dumps(content))
    rc, _ = run_train(csv_path, tmp_path / "run", "--config", str(config))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and named in err[0] and str(config) in err[0], err
    assert not (tmp_path / "run").exists()


def test_bad_flag_value_is_a_one_line_error(csv_path, tmp_path, capsys):
    rc, _ = run_train(csv_path, tmp_path / "run", "--zoneout", "1.0")
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "zoneout" in err[0]


@pytest.mark.parametrize(("flags", "mode"), [
    ([], "stateful"), (["--stateful"], "stateful"), (["--windowed"], "windowed"),
    (["--mode", "windowed"], "windowed"), (["--bidirectional"], "windowed"),
])
def test_training_mode_flags(csv_path, tmp_path, flags, mode):
    tiny = ["--hidden", "8", "--dense", "4", "--epochs", "1", "--look-back", "10"]
    rc, report = run_train(csv_path, tmp_path / "run", *tiny, *flags)
    assert rc == 0 and report["train"]["mode"] == mode
    # Both validation errors, whatever the mode (the bidirectional model cannot stream).
    assert report["val_loss_windowed"] > 0
    if "--bidirectional" in flags:
        assert report["val_loss_streamed"] is None
    else:
        assert report["val_loss_streamed"] == report["best_val_loss"]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_on_a_terminal_lines_in_a_log_nothing_when_quiet(csv_path, tmp_path, capsys):
    options = TrainOptions.from_mapping(TINY)
    tty, log = Terminal(), io.StringIO()
    train_with_options(csv_path, tmp_path / "a", options, stream=tty)
    train_with_options(csv_path, tmp_path / "b", options, stream=log)
    assert "\r" in tty.getvalue() and "[" in tty.getvalue() and "#" in tty.getvalue()
    assert "\r" not in log.getvalue()
    epochs = [line for line in log.getvalue().splitlines() if line.startswith("epoch")]
    assert len(epochs) == 2 and all(" train " in e and " val " in e for e in epochs)
    assert "best val loss" in log.getvalue() and "streamed" in log.getvalue()
    capsys.readouterr()
    train_with_options(csv_path, tmp_path / "c", options, quiet=True)
    assert capsys.readouterr().out == ""


def test_options_round_trip_and_reject_unknown_keys():
    options = TrainOptions.from_mapping(TINY | {"features": ["a", "b"], "peephole": True})
    assert TrainOptions.from_mapping(options.to_dict()) == options
    with pytest.raises(OptionsError, match="lookback"):
        TrainOptions.from_mapping({"lookback": 3})


def test_foreign_checkpoint_is_a_one_line_export_error(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    torch.save({"model": {"w": torch.zeros(2)}}, tmp_path / "run" / "checkpoint.pt")
    assert cli.main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a faultwatch checkpoint" in err[0]


def test_version_1_checkpoint_still_loads(csv_path, tmp_path):
    """Checkpoints written before the cell choice (layers named ``lstms.i``) load unchanged."""
    from faultwatch.train.checkpoint import load_checkpoint

    run = tmp_path / "run"
    assert cli.main(["train", str(csv_path), "--out", str(run), "--quiet", "--hidden", "8", "--dense", "4",
                     "--epochs", "1", "--look-back", "10"]) == 0
    new, _, prepared = load_checkpoint(run)
    payload = torch.load(run / "checkpoint.pt", weights_only=True)
    payload["version"] = 1
    state = payload["state_dict"]
    payload["state_dict"] = {k.replace("rnns.0.rnn.", "lstms.0."): v for k, v in state.items()}
    for key in ("peephole", "bidirectional", "recurrent_dropout", "zoneout"):
        del payload["model_args"][key]
    torch.save(payload, run / "checkpoint.pt")
    old, _, _ = load_checkpoint(run)
    x = torch.from_numpy(prepared.series[0].scaled[None])
    with torch.no_grad():
        torch.testing.assert_close(old(x)[0], new(x)[0])
