"""``faultwatch train``: CSV → trained forecaster in RUN_DIR/checkpoint.pt (+ report.json)."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

from faultwatch.runtime.csvdata import read_csv
from faultwatch.runtime.version import VERSION

from .checkpoint import save_checkpoint
from .data import prepare
from .fit import TrainConfig, fit
from .model import ForecasterConfig


def train_run(
    csv_path: Path,
    run_dir: Path,
    *,
    hidden: tuple[int, ...] = (128, 64),
    dense: int = 32,
    dropout: float = 0.3,
    train_config: TrainConfig | None = None,
    features: list[str] | None = None,
    exclude: list[str] = (),
    targets: list[str] | None = None,
    val_fraction: float = 0.2,
    scaler: str = "minmax",
    quiet: bool = False,
) -> dict:
    """Train on ``csv_path`` and save the run; returns the training report."""
    train_config = train_config or TrainConfig()
    say = (lambda *a: None) if quiet else print
    table = read_csv(csv_path)
    prepared = prepare(table, features=features, exclude=exclude, targets=targets,
                       val_fraction=val_fraction, scaler_kind=scaler)
    say(f"data: {len(table.timestamps)} rows, {len(prepared.series)} device(s), "
        f"{len(prepared.features)} features, {len(prepared.targets)} targets, "
        f"{prepared.n_interpolated} missing cells interpolated")
    config = ForecasterConfig(
        n_features=len(prepared.features),
        target_index=tuple(prepared.features.index(t) for t in prepared.targets),
        hidden=hidden, dense=dense, dropout=dropout,
    )

    def progress(row: dict) -> None:
        say(f"epoch {row['epoch']:3d}/{train_config.epochs}  train {row['train_loss']:.3e}  "
            f"val {row['val_loss']:.3e}  lr {row['lr']:.0e}")

    result = fit(prepared, config, train_config, progress)
    provenance = {
        "data_path": str(csv_path), "data_sha256": table.sha256, "epochs": result.epochs_run,
        "best_epoch": result.best_epoch, "val_loss": result.best_val_loss,
        "faultwatch_version": VERSION, "seed": train_config.seed,
        "trained_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    path = save_checkpoint(run_dir, result, prepared, train_config, provenance)
    report = {
        "checkpoint": str(path),
        "parameters": dict(result.model.parameter_table()),
        "model": config.to_dict(),
        "train": asdict(train_config),
        "best_val_loss": result.best_val_loss,
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "seconds": round(result.seconds, 2),
        "interpolated_cells": prepared.n_interpolated,
    }
    (run_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    for name, count in result.model.parameter_table():
        say(f"  {name:<24} {count:>9,d} parameters")
    say(f"best val loss {result.best_val_loss:.3e} at epoch {result.best_epoch} "
        f"({result.epochs_run} epochs, {result.seconds:.1f} s) → {path}")
    return report
