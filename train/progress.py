"""Training progress: a bar per epoch on a terminal, one line per epoch otherwise.

On a terminal the bar redraws in place (``\\r``) as batches finish and is
replaced by the epoch's summary line; in a log file or pipe only the summary
lines appear, so logs stay readable. ``--quiet`` prints nothing at all.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

WIDTH = 24


class EpochProgress:
    def __init__(self, epochs: int, stream: TextIO | None = None, *, quiet: bool = False):
        self.epochs = epochs
        self.stream = stream if stream is not None else sys.stdout
        self.quiet = quiet
        self.live = not quiet and self.stream.isatty()
        self.epoch = 1
        self._drawn = 0.0
        self._started = time.monotonic()

    def batch(self, done: int, total: int, loss: float) -> None:
        """After each batch: redraw the bar (at most ~10 times a second, and always at the end)."""
        if not self.live:
            return
        now = time.monotonic()
        if done < total and now - self._drawn < 0.1:
            return
        self._drawn = now
        filled = round(WIDTH * done / max(total, 1))
        self.stream.write(f"\repoch {self.epoch:3d}/{self.epochs} [{'#' * filled}{'.' * (WIDTH - filled)}] "
                          f"{done}/{total}  loss {loss:.3e}")
        self.stream.flush()

    def end_epoch(self, row: dict) -> None:
        """After validation: the epoch's summary line (replacing the bar on a terminal)."""
        if self.quiet:
            return
        clear = "\r\x1b[K" if self.live else ""
        elapsed = time.monotonic() - self._started
        self.stream.write(f"{clear}epoch {row['epoch']:3d}/{self.epochs}  train {row['train_loss']:.3e}  "
                          f"val {row['val_loss']:.3e}  lr {row['lr']:.0e}  {elapsed:6.1f} s\n")
        self.stream.flush()
        self.epoch = row["epoch"] + 1
