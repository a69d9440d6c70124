"""Reading sensor CSV files: the one loader used by train, export, replay and eval.

Accepts ``,`` or ``;`` separated files with a header, a timestamp column
(``timestamp``, ``datetime``, ``time``, ``ts`` or ``date``; ISO 8601 text or
epoch seconds), an optional ``device`` column, numeric channel columns and
optional label columns (``anomaly``, ``changepoint``) that never become
model inputs. Missing cells become NaN.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TIME_COLUMNS = ("timestamp", "datetime", "time", "ts", "date")
DEVICE_COLUMNS = ("device", "device_id")
LABEL_COLUMNS = ("anomaly", "changepoint")
DEFAULT_DEVICE = "device-0"


class CsvError(ValueError):
    """A CSV file cannot be used; the message names the file, line or column."""


@dataclass(frozen=True)
class Table:
    """A sensor CSV in memory, in file order.

    ``values`` is ``[N, C]`` float64 with NaN for missing cells; ``timestamps``
    is ``[N]`` epoch seconds; ``devices`` is ``[N]`` str.
    """

    path: str
    sha256: str
    columns: tuple[str, ...]
    timestamps: np.ndarray
    devices: np.ndarray
    values: np.ndarray
    labels: dict[str, np.ndarray]

    def device_rows(self) -> dict[str, np.ndarray]:
        """Row indices of each device, in file order (devices in order of first appearance)."""
        order: dict[str, list[int]] = {}
        for i, d in enumerate(self.devices):
            order.setdefault(d, []).append(i)
        return {d: np.asarray(rows) for d, rows in order.items()}

    def select(self, names: list[str] | tuple[str, ...]) -> np.ndarray:
        """``[N, len(names)]`` values of the named columns; a missing name is a CsvError."""
        missing = [n for n in names if n not in self.columns]
        if missing:
            raise CsvError(f"{self.path}: no column {missing[0]!r} (has: {', '.join(self.columns)})")
        return self.values[:, [self.columns.index(n) for n in names]]


def _parse_time(raw: list[str], path: str) -> np.ndarray:
    """Epoch seconds ``[N]`` from epoch numbers or ISO 8601 text (naive = UTC)."""
    try:
        return np.asarray(raw, dtype=np.float64)
    except ValueError:
        pass
    try:
        # Strip a trailing Z: numpy reads naive ISO 8601 as UTC already.
        stamps = np.asarray([s.strip().removesuffix("Z") for s in raw], dtype="datetime64[ms]")
    except ValueError as exc:
        raise CsvError(f"{path}: unreadable timestamp ({exc})") from None
    return stamps.astype(np.int64) / 1000.0


def _to_float(cell: str) -> float:
    cell = cell.strip()
    return float(cell) if cell and cell.lower() not in ("nan", "null", "none") else np.nan


def read_csv(path: str | Path, evenly_spaced: bool = False) -> Table:
    """Read a sensor CSV; raise :class:`CsvError` with a one-line reason when it can't be used.

    With ``evenly_spaced``, a file without a timestamp column is taken as evenly spaced rows,
    one second apart (row i at i s); without it, such a file is an error.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CsvError(f"{path}: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise CsvError(f"{path}: not UTF-8 text") from None
    lines = text.splitlines()
    if len(lines) < 2:
        raise CsvError(f"{path}: needs a header and at least one row")
    delimiter = ";" if lines[0].count(";") > lines[0].count(",") else ","
    rows = list(csv.reader(lines, delimiter=delimiter))
    header = [h.strip() for h in rows[0]]
    lower = [h.lower() for h in header]
    time_col = next((lower.index(c) for c in TIME_COLUMNS if c in lower), None)
    if time_col is None and not evenly_spaced:
        raise CsvError(f"{path}: no timestamp column (one of {', '.join(TIME_COLUMNS)})")
    device_col = next((lower.index(c) for c in DEVICE_COLUMNS if c in lower), None)
    label_cols = {lower[i]: i for i in range(len(header)) if lower[i] in LABEL_COLUMNS}
    channel_cols = [
        i for i in range(len(header))
        if i not in (time_col, device_col) and i not in label_cols.values()
    ]
    if not channel_cols:
        raise CsvError(f"{path}: no channel columns")
    body = [r for r in rows[1:] if r and any(c.strip() for c in r)]
    for n, r in enumerate(body, start=2):
        if len(r) != len(header):
            raise CsvError(f"{path}: line {n} has {len(r)} fields, header has {len(header)}")
    values = np.empty((len(body), len(channel_cols)), dtype=np.float64)
    for j, col in enumerate(channel_cols):
        try:
            values[:, j] = [_to_float(r[col]) for r in body]
        except ValueError:
            raise CsvError(f"{path}: column {header[col]!r} is not numeric") from None
    labels = {}
    for name, col in label_cols.items():
        try:
            labels[name] = np.asarray([_to_float(r[col]) for r in body]) > 0.5
        except ValueError:
            raise CsvError(f"{path}: label column {name!r} is not numeric") from None
    devices = np.asarray(
        [r[device_col].strip() for r in body] if device_col is not None else [DEFAULT_DEVICE] * len(body),
        dtype=object,
    )
    return Table(
        path=str(path),
        sha256=hashlib.sha256(data).hexdigest(),
        columns=tuple(header[i] for i in channel_cols),
        timestamps=(np.arange(len(body), dtype=np.float64) if time_col is None
                    else _parse_time([r[time_col] for r in body], str(path))),
        devices=devices,
        values=values,
        labels=labels,
    )
