"""Device state on disk, so a restarted daemon resumes where it left off.

One ``.npz`` file (plain arrays, no pickle), written atomically (write, fsync,
rename, fsync the folder) and tagged with the model file's sha256: a snapshot
taken with another model is discarded, with the reason logged, because its
LSTM state means nothing to a different network. A file that is not a sound
snapshot (empty, cut short, a flipped byte, wrong arrays) is moved aside by
:mod:`.statefiles` and the daemon starts fresh.
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from faultwatch.runtime.daemon.statefiles import StateFileError, read_state_file, set_aside

log = logging.getLogger("faultwatch")

FILENAME = "state.npz"
FORMAT = 1


def save_snapshot(state_dir: Path, arrays: dict[str, np.ndarray], model_sha256: str) -> Path:
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / FILENAME
    fd, tmp = tempfile.mkstemp(dir=state_dir, prefix=".state.", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            tagged: dict[str, Any] = {"_format": np.array(FORMAT), "_model_sha256": np.array(model_sha256)}
            np.savez(f, **(tagged | arrays))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(state_dir, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)
    return path


def load_snapshot(state_dir: Path, model_sha256: str) -> dict[str, np.ndarray] | None:
    """The saved arrays, or None (with the reason logged) when there is nothing usable.

    A file that does not parse or fails :func:`check_arrays` is moved aside
    (:mod:`.statefiles`); one taken with another model is only discarded (it is
    sound, just useless, and the next snapshot replaces it).
    """
    path = state_dir / FILENAME
    arrays = read_state_file(path, parse_snapshot, "state snapshot")
    if arrays is None:
        log.info("no usable state snapshot in %s: starting fresh", state_dir)
        return None
    saved_sha = str(arrays.pop("_model_sha256"))
    if saved_sha != model_sha256:
        log.warning("state snapshot %s was taken with another model (sha256 %s…, now %s…): "
                    "discarded, devices start fresh with warm-up", path, saved_sha[:12], model_sha256[:12])
        return None
    return arrays


def parse_snapshot(data: bytes) -> dict[str, np.ndarray]:
    """The arrays of a snapshot file's bytes, checked; raises for anything else."""
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    check_arrays(arrays)
    return arrays


def check_arrays(arrays: dict[str, np.ndarray]) -> None:
    """Raise :class:`StateFileError` unless ``arrays`` look like what :func:`save_snapshot` wrote.

    What the engine then checks against its model (widths, names) stays with the engine;
    this is what any snapshot must be: a known format, a sha256, one row per device in
    every array (``[N, ...]``), numbers or booleans, unique device ids.
    """
    fmt = arrays.get("_format")
    if fmt is None or fmt.shape != () or fmt.dtype.kind not in "iu":
        raise StateFileError("no integer _format")
    if int(fmt) != FORMAT:
        raise StateFileError(f"format {int(fmt)}, this faultwatch reads {FORMAT}")
    sha = arrays.get("_model_sha256")
    if sha is None or sha.shape != () or sha.dtype.kind != "U":
        raise StateFileError("no _model_sha256")
    devices = arrays.get("devices")
    if devices is None or devices.ndim != 1 or devices.dtype.kind != "U":
        raise StateFileError("no devices array of strings")
    if len(set(devices.tolist())) != len(devices):
        raise StateFileError("a device id appears twice")
    for name, a in arrays.items():
        if name.startswith("_") or name == "devices":
            continue
        if a.dtype.kind not in "biuf":
            raise StateFileError(f"array {name!r} holds {a.dtype}, not numbers")
        if a.ndim == 0 or len(a) != len(devices):
            raise StateFileError(f"array {name!r} has shape {a.shape}, "
                                 f"not one row per device ({len(devices)})")
    # Values that would poison a device for good: a NaN state gives NaN forecasts from then on;
    # a last time stamp of NaN or +inf makes every later reading "older" (-inf: never stepped).
    for name, a in arrays.items():
        model_made = name.startswith("state_") or name in ("prev_forecast", "last_scaled")
        if model_made and not np.isfinite(a).all():
            raise StateFileError(f"array {name!r} holds NaN or infinite values")
    last_ts = arrays.get("last_ts")
    if last_ts is not None and (np.isnan(last_ts) | (last_ts == np.inf)).any():
        raise StateFileError("array 'last_ts' holds NaN or +inf")


class StatefulEngine(Protocol):
    def export_state(self) -> dict[str, np.ndarray]: ...
    def import_state(self, saved: dict[str, np.ndarray], /) -> int: ...


class StateSnapshots:
    """The daemon's snapshots in ``state_dir`` ("" = none): restored at start, saved now and then."""

    def __init__(self, state_dir: str, counters: Counter):
        self.state_dir = Path(state_dir) if state_dir else None
        self.counters = counters  # the daemon's engine-thread counters

    def restore(self, engine: StatefulEngine, model_sha256: str) -> None:
        if self.state_dir is None:
            return
        saved = load_snapshot(self.state_dir, model_sha256)
        if saved is None:
            return
        try:
            n = engine.import_state(saved)
        except (KeyError, ValueError, TypeError, IndexError) as exc:
            # Taken with this very model (the sha256 matched), so it was damaged: keep it for a look.
            set_aside(self.state_dir / FILENAME, "state snapshot", f"does not fit the model: {exc}")
            return
        log.info("restored the state of %d device(s) from %s", n, self.state_dir)

    def save(self, engine: StatefulEngine, model_sha256: str) -> None:
        if self.state_dir is None:
            return
        try:
            save_snapshot(self.state_dir, engine.export_state(), model_sha256)
            self.counters["snapshots"] += 1
        except OSError as exc:
            self.counters["snapshot_errors"] += 1
            log.error("cannot write state snapshot to %s: %s", self.state_dir, exc)
