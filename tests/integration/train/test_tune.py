"""``faultwatch tune``: Optuna TPE over real (tiny) training runs, pruning, and a best config
that ``faultwatch train --config`` takes as it is."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import optuna
import pytest
from faultwatch.runtime import cli
from faultwatch.runtime.devtools.simulator import simulate, write_csv
from faultwatch.train.options import TrainOptions
from faultwatch.train.tune import SearchSpace, tune

pytestmark = [pytest.mark.torch, pytest.mark.usefixtures("torch_one_thread")]

BASE = ["--hidden", "12,6", "--dense", "4", "--lr", "1e-2", "--dropout", "0.3", "--batch-size", "16",
        "--look-back", "20", "--epochs", "3"]
SPACE = ["--hidden-range", "8,16", "--lr-range", "1e-3,3e-2", "--dropout-range", "0.2,0.5",
         "--batch-range", "16,32", "--look-back-range", "10,30"]


@pytest.fixture(scope="module")
def csv_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tune") / "pumps.csv"
    write_csv(simulate(devices=2, steps=400, seed=4), path)
    return path


def test_tune_writes_a_best_config_train_accepts(csv_path, tmp_path, capsys):
    out = tmp_path / "tune"
    assert cli.main(["tune", str(csv_path), "--out", str(out), "--trials", "4", *BASE, *SPACE]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "tune.json").read_text())
    with (out / "trials.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 == summary["trials"] and printed.count("trial ") >= 4
    # Trial 1 is the base configuration, so the best is at least as good as it.
    assert (rows[0]["hidden"], rows[0]["batch_size"], rows[0]["look_back"]) == ("12,6", "16", "20")
    assert summary["best_val_loss"] <= summary["baseline_val_loss"]
    complete = [float(r["val_loss"]) for r in rows if r["state"] == "complete"]
    assert summary["best_val_loss"] == pytest.approx(min(complete), rel=1e-5)
    for r in rows:  # every trial stayed inside the search space
        first = int(r["hidden"].split(",")[0])
        assert 8 <= first <= 16 and 1e-3 <= float(r["lr"]) <= 3e-2 and 0.2 <= float(r["dropout"]) <= 0.5
        assert r["batch_size"] in ("16", "32") and 10 <= int(r["look_back"]) <= 30

    best = json.loads((out / "best.json").read_text())
    assert {"hidden", "lr", "dropout", "batch_size", "look_back"} <= set(best) and "epochs" not in best
    assert best["dense"] == 4  # the base's non-recipe choices travel with it
    run = tmp_path / "run"
    assert cli.main(["train", str(csv_path), "--out", str(run), "--config", str(out / "best.json"),
                     "--epochs", "1", "--quiet"]) == 0
    report = json.loads((run / "report.json").read_text())
    assert report["options"]["hidden"] == best["hidden"] and report["options"]["lr"] == best["lr"]
    assert report["options"]["look_back"] == best["look_back"]


class PruneAllButFirst(optuna.pruners.BasePruner):
    def prune(self, study, trial) -> bool:
        return trial.number > 0


def test_pruned_trials_stop_after_their_first_epoch(csv_path, tmp_path):
    base = TrainOptions(hidden=(8,), dense=4, lr=1e-2, batch_size=16, look_back=20, epochs=4)
    space = SearchSpace(hidden=(8, 12), lr=(1e-3, 3e-2), batch_size=(16, 16), look_back=(10, 30))
    summary = tune(csv_path, tmp_path, trials=3, base=base, space=space, pruner=PruneAllButFirst(),
                   quiet=True)
    with (tmp_path / "trials.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["state"] for r in rows] == ["complete", "pruned", "pruned"]
    assert rows[0]["epochs_run"] == "4" and rows[1]["epochs_run"] == rows[2]["epochs_run"] == "1"
    assert summary["pruned"] == 2 and summary["best_trial"] == 0


def test_search_space_is_validated():
    with pytest.raises(ValueError, match="batch"):
        SearchSpace(batch_size=(33, 60))
    with pytest.raises(ValueError, match="dropout"):
        SearchSpace(dropout=(0.2, 1.0))
