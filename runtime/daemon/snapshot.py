"""Device state on disk, so a restarted daemon resumes where it left off.

One ``.npz`` file (plain arrays, no pickle), written atomically (write, fsync,
rename, fsync the folder) and tagged with the model file's sha256: a snapshot
taken with another model is discarded, with the reason logged, because its
LSTM state means nothing to a different network.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Protocol

import numpy as np

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
    """The saved arrays, or None (with the reason logged) when there is nothing usable."""
    path = state_dir / FILENAME
    if not path.exists():
        log.info("no state snapshot in %s: starting fresh", state_dir)
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError) as exc:
        log.warning("state snapshot %s unreadable (%s): starting fresh", path, exc)
        return None
    if int(arrays.pop("_format", -1)) != FORMAT:
        log.warning("state snapshot %s has an unknown format: starting fresh", path)
        return None
    saved_sha = str(arrays.pop("_model_sha256", ""))
    if saved_sha != model_sha256:
        log.warning("state snapshot %s was taken with another model (sha256 %s…, now %s…): "
                    "discarded, devices start fresh with warm-up", path, saved_sha[:12], model_sha256[:12])
        return None
    return arrays


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
        except (KeyError, ValueError) as exc:
            log.warning("state snapshot does not fit the model (%s): starting fresh", exc)
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
