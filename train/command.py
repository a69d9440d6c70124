"""``faultwatch train``: CSV → trained forecaster in RUN_DIR/checkpoint.pt (+ report.json)."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, fields
from pathlib import Path
from typing import TextIO

from faultwatch.runtime.offline.csvdata import Table, read_csv
from faultwatch.runtime.version import VERSION
from faultwatch.train.checkpoint import save_checkpoint
from faultwatch.train.data import Prepared, prepare
from faultwatch.train.device import resolve_device
from faultwatch.train.fit import TrainConfig, fit
from faultwatch.train.model import ForecasterConfig
from faultwatch.train.options import TrainOptions
from faultwatch.train.progress import EpochProgress


def load_data(csv_path: Path, options: TrainOptions) -> tuple[Table, Prepared]:
    table = read_csv(csv_path)
    prepared = prepare(table, features=list(options.features) if options.features else None,
                       exclude=list(options.exclude),
                       targets=list(options.target) if options.target else None,
                       val_fraction=options.val_fraction, scaler_kind=options.scaler)
    return table, prepared


def model_config(options: TrainOptions, prepared: Prepared) -> ForecasterConfig:
    return ForecasterConfig(
        n_features=len(prepared.features),
        target_index=tuple(prepared.features.index(t) for t in prepared.targets),
        hidden=options.hidden, dense=options.dense, dropout=options.dropout, cell=options.cell,
        peephole=options.peephole, bidirectional=options.bidirectional,
        recurrent_dropout=options.recurrent_dropout, zoneout=options.zoneout,
    )


def loop_config(options: TrainOptions) -> TrainConfig:
    return TrainConfig(**{f.name: getattr(options, f.name) for f in fields(TrainConfig)})


def train_with_options(csv_path: Path, run_dir: Path, options: TrainOptions, *, quiet: bool = False,
                       stream: TextIO | None = None) -> dict:
    """Train on ``csv_path`` with ``options`` and save the run; returns the training report."""
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, file=stream, flush=True))
    device = resolve_device(options.device, options.precision)  # refuse before reading any data
    table, prepared = load_data(csv_path, options)
    say(f"data: {len(table.timestamps)} rows, {len(prepared.series)} device(s), "
        f"{len(prepared.features)} features, {len(prepared.targets)} targets, "
        f"{prepared.n_interpolated} missing cells interpolated")
    say(f"training on {device} ({options.precision}), {options.batch_size} "
        + ("streams" if options.mode == "stateful" else "windows per batch"))
    mconfig, tconfig = model_config(options, prepared), loop_config(options)
    bar = EpochProgress(tconfig.epochs, stream, quiet=quiet)
    result = fit(prepared, mconfig, tconfig, progress=bar.end_epoch, on_batch=bar.batch)
    provenance = {
        "data_path": str(csv_path), "data_sha256": table.sha256, "epochs": result.epochs_run,
        "best_epoch": result.best_epoch, "val_loss": result.best_val_loss,
        "val_loss_streamed": result.val_loss_streamed, "val_loss_windowed": result.val_loss_windowed,
        "mode": tconfig.mode, "faultwatch_version": VERSION, "seed": tconfig.seed,
        "device": result.device, "precision": tconfig.precision,
        "trained_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    path = save_checkpoint(run_dir, result, prepared, tconfig, provenance)
    table_rows = result.model.parameter_table()
    report = {
        "checkpoint": str(path),
        "parameters": dict(table_rows),
        "model": mconfig.to_dict(),
        "train": asdict(tconfig),
        "options": options.to_dict(),
        "best_val_loss": result.best_val_loss,
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        # Both for both modes: the daemon's view (state carried over the whole series) and the recipe's.
        "val_loss_streamed": result.val_loss_streamed,
        "val_loss_windowed": result.val_loss_windowed,
        "history": result.history,
        "seconds": round(result.seconds, 2),
        "device": result.device,
        "interpolated_cells": prepared.n_interpolated,
        "data_sha256": table.sha256,
    }
    (run_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    for name, count in table_rows:
        say(f"  {name:<28} {count:>9,d} parameters")
    streamed = ("n/a (bidirectional: cannot stream)" if result.val_loss_streamed is None
                else f"{result.val_loss_streamed:.3e}")
    say(f"validation MSE (scaled): streamed {streamed}, windowed ({tconfig.look_back} readings) "
        f"{result.val_loss_windowed:.3e}")
    say(f"best val loss {result.best_val_loss:.3e} at epoch {result.best_epoch} "
        f"({result.epochs_run} epochs, {result.seconds:.1f} s) → {path}")
    return report


def train_run(
    csv_path: Path,
    run_dir: Path,
    *,
    hidden: tuple[int, ...] = TrainOptions.hidden,
    dense: int = TrainOptions.dense,
    dropout: float = TrainOptions.dropout,
    cell: str = TrainOptions.cell,
    peephole: bool = TrainOptions.peephole,
    bidirectional: bool = TrainOptions.bidirectional,
    recurrent_dropout: float = TrainOptions.recurrent_dropout,
    zoneout: float = TrainOptions.zoneout,
    train_config: TrainConfig | None = None,
    features: list[str] | None = None,
    exclude: list[str] | tuple[str, ...] = TrainOptions.exclude,
    targets: list[str] | None = None,
    val_fraction: float = TrainOptions.val_fraction,
    scaler: str = TrainOptions.scaler,
    quiet: bool = False,
) -> dict:
    """Keyword form of :func:`train_with_options` (``train_config`` carries the loop's settings)."""
    loop = asdict(train_config or TrainConfig())
    options = TrainOptions(
        hidden=tuple(hidden), dense=dense, dropout=dropout, cell=cell, peephole=peephole,
        bidirectional=bidirectional, recurrent_dropout=recurrent_dropout, zoneout=zoneout,
        features=tuple(features) if features else None, exclude=tuple(exclude),
        target=tuple(targets) if targets else None, val_fraction=val_fraction, scaler=scaler, **loop,
    )
    return train_with_options(Path(csv_path), Path(run_dir), options, quiet=quiet)
