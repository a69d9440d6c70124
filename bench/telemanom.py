"""The telemanom data layout (NASA SMAP/MSL, Hundman et al. 2018) as faultwatch tables.

    DIR/train/CHAN.npy        [T_train, C] float: column 0 the telemetry value, the rest inputs
    DIR/test/CHAN.npy         [T_test, C]
    DIR/labeled_anomalies.csv chan_id, ..., anomaly_sequences ("[[start, end], ...]" rows of
                              the test array, inclusive), ...

No timestamps: rows are evenly spaced, so they get one per second. Each
channel becomes one :class:`~faultwatch.runtime.offline.csvdata.Table`, its
train rows followed by its test rows; the model forecasts column 0 only. The
test array is a separate recording, so it starts ``RECORDING_GAP_S`` after
the last train row: longer than any gap the engine bridges, the device starts
over (zero state, warm-up) as it would on a new recording.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from faultwatch.runtime.offline.csvdata import DEFAULT_DEVICE, Table

LABELS_FILE = "labeled_anomalies.csv"
TARGET = "value"
RECORDING_GAP_S = 10_000.0


class TelemanomError(ValueError):
    """The folder is not in the telemanom layout; the message names what is missing."""


@dataclass(frozen=True)
class Channel:
    name: str
    train: Path
    test: Path
    sequences: tuple[tuple[int, int], ...]  # labelled rows of the test array, inclusive


def find_channels(root: Path) -> list[Channel]:
    """Every channel with a train and a test array and a row in the labels file, by name."""
    labels_path = root / LABELS_FILE
    if not (root / "train").is_dir() or not (root / "test").is_dir() or not labels_path.is_file():
        raise TelemanomError(f"{root}: needs train/, test/ and {LABELS_FILE} (the telemanom layout)")
    labelled: dict[str, list[tuple[int, int]]] = {}
    with labels_path.open(newline="") as f:
        for row in csv.DictReader(f):
            try:
                pairs = json.loads(row["anomaly_sequences"])
                labelled.setdefault(row["chan_id"].strip(), []).extend((int(a), int(b)) for a, b in pairs)
            except (KeyError, TypeError, ValueError, json.JSONDecodeError):
                raise TelemanomError(f"{labels_path}: unreadable row {row}") from None
    channels = []
    for name in sorted(labelled):
        train, test = root / "train" / f"{name}.npy", root / "test" / f"{name}.npy"
        if train.is_file() and test.is_file():
            channels.append(Channel(name, train, test, tuple(sorted(labelled[name]))))
    if not channels:
        raise TelemanomError(f"{root}: no channel has train/CHAN.npy, test/CHAN.npy and labels")
    return channels


def channel_table(channel: Channel) -> tuple[Table, int]:
    """(train rows then test rows as one table, number of train rows)."""
    try:
        train, test = np.load(channel.train), np.load(channel.test)
    except (OSError, ValueError) as exc:
        raise TelemanomError(f"{channel.name}: cannot load its arrays: {exc}") from None
    if train.ndim != 2 or test.ndim != 2 or train.shape[1] != test.shape[1]:
        raise TelemanomError(f"{channel.name}: train {train.shape} and test {test.shape} must be "
                             "2-D with the same columns")
    values = np.concatenate([train, test]).astype(np.float64)  # [N, C]
    n = len(values)
    label = np.zeros(n, bool)
    for a, b in channel.sequences:
        label[len(train) + a:len(train) + b + 1] = True
    columns = (TARGET, *(f"input_{i}" for i in range(1, values.shape[1])))
    digest = hashlib.sha256(channel.train.read_bytes() + channel.test.read_bytes()).hexdigest()
    table = Table(path=str(channel.test), sha256=digest, columns=columns,
                  timestamps=np.arange(n, dtype=np.float64) + RECORDING_GAP_S * (np.arange(n) >= len(train)),
                  devices=np.full(n, DEFAULT_DEVICE, object),
                  values=values, labels={"anomaly": label})
    return table, len(train)
