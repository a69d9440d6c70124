"""Checkpoints are plain data: tensors, numbers, strings, lists and dicts.

Nothing is pickled as an object, so :func:`load_checkpoint` reads them with
``weights_only=True``. This is the one loader; export and tests use it. Tensors
are saved on the CPU and loaded with ``map_location="cpu"``, so a checkpoint
trained on a GPU reads, exports and runs on a machine without one.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from faultwatch.runtime.engine.contract import Scaler
from faultwatch.train.data import Prepared, Series
from faultwatch.train.fit import TrainConfig, TrainResult
from faultwatch.train.model import Forecaster, ForecasterConfig

FORMAT = "faultwatch-checkpoint"
#: 2: recurrent layers are ``rnns.{i}.rnn.*`` (any cell, optional peepholes); 1 had ``lstms.{i}.*``.
VERSION = 2
FILENAME = "checkpoint.pt"
#: Per device, at most this many of the latest rows travel in the checkpoint for export's
#: parity check and threshold calibration.
MAX_SERIES_ROWS = 20_000


class CheckpointError(ValueError):
    """Not a faultwatch checkpoint, or one this version cannot read."""


def save_checkpoint(
    run_dir: Path,
    result: TrainResult,
    prepared: Prepared,
    train_config: TrainConfig,
    provenance: dict,
) -> Path:
    series = []
    for s in prepared.series:
        cut = max(0, len(s.scaled) - MAX_SERIES_ROWS)
        series.append({"device": s.device, "scaled": torch.from_numpy(s.scaled[cut:]).clone(),
                       "split": max(1, s.split - cut)})
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "model_args": result.model.config.to_dict(),
        # On the CPU whatever the model trained on: a CUDA-trained run loads and exports anywhere.
        "state_dict": {k: v.detach().cpu() for k, v in result.model.state_dict().items()},
        "features": list(prepared.features),
        "targets": list(prepared.targets),
        "scaler": {"kind": prepared.scaler.kind, "offset": list(prepared.scaler.offset),
                   "scale": list(prepared.scaler.scale)},
        "series": series,
        "sample_period_s": prepared.sample_period_s,
        "train_config": asdict(train_config),
        "history": result.history,
        "provenance": provenance,
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / FILENAME
    torch.save(payload, path)
    return path


def _v1_key(key: str) -> str:
    """``lstms.0.weight_ih_l0`` (version 1) → ``rnns.0.rnn.weight_ih_l0``."""
    if key.startswith("lstms."):
        _, layer, rest = key.split(".", 2)
        return f"rnns.{layer}.rnn.{rest}"
    return key


def load_checkpoint(path: str | Path) -> tuple[Forecaster, dict, Prepared]:
    """Rebuild the model (eval mode), the raw payload and the held-out series from a run."""
    path = Path(path)
    if path.is_dir():
        path = path / FILENAME
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a foreign or corrupt file
        reason = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
        raise CheckpointError(f"{path} is not a readable checkpoint ({reason})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a faultwatch checkpoint")
    if payload.get("version", 0) > VERSION:
        raise CheckpointError(f"{path} has checkpoint version {payload['version']}; upgrade faultwatch")
    state_dict = payload["state_dict"]
    if payload.get("version", 0) < 2:
        state_dict = {_v1_key(k): v for k, v in state_dict.items()}
    try:
        model = Forecaster(ForecasterConfig.from_dict(payload["model_args"]))
        model.load_state_dict(state_dict)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        reason = str(exc).splitlines()[0]
        raise CheckpointError(f"{path}: model does not match its arguments: {reason}") from None
    model.eval()
    sc = payload["scaler"]
    prepared = Prepared(
        features=tuple(payload["features"]),
        targets=tuple(payload["targets"]),
        scaler=Scaler(sc["kind"], tuple(sc["offset"]), tuple(sc["scale"])),
        series=[Series(s["device"], s["scaled"].numpy().astype(np.float32), int(s["split"]))
                for s in payload["series"]],
        n_interpolated=0,
        sample_period_s=float(payload["sample_period_s"]),
    )
    return model, payload, prepared
