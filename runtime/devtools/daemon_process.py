"""The daemon as a subprocess, exactly as a user starts it: for tests, ``faultwatch bench`` and the demo.

``python -m faultwatch.runtime.cli run --model M --broker H:P --config C`` with a config file
of its own (written from a dict of TOML sections, or given as text) and its output
appended to one log file. Each start remembers where its own output begins in that
log, so what is read about *this* process (its metrics port, its ``stopping:`` line)
is never an earlier process's, after a restart too.

>>> print(toml_text({"log_level": "INFO", "broker": {"client_id": "x", "session_expiry_s": 60}}), end="")
log_level = "INFO"
[broker]
client_id = "x"
session_expiry_s = 60
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

_METRICS_LINE = re.compile(r"metrics on http://[\d.]+:(\d+)/metrics")


def _toml_value(v) -> str:
    """JSON scalars and string lists are valid TOML; a dict becomes an inline table."""
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    return json.dumps(v)


def toml_text(sections: dict) -> str:
    """TOML from a dict: scalars and string lists at the top, then one table per dict value
    (a dict inside it, such as ``engine.detector``, an inline table)."""
    top = [f"{k} = {_toml_value(v)}" for k, v in sections.items() if not isinstance(v, dict)]
    tables = [f"[{k}]\n" + "\n".join(f"{kk} = {_toml_value(vv)}" for kk, vv in v.items())
              for k, v in sections.items() if isinstance(v, dict)]
    return "\n".join(top + tables) + "\n"


def _wait(predicate: Callable[[], object], timeout: float, interval: float = 0.05) -> object:
    """``predicate()``'s first true value within ``timeout`` seconds, else its last (false) one."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)  # polling interval


class DaemonError(RuntimeError):
    """The daemon process did not do what was waited for; the message ends with its log."""


class DaemonProcess:
    """``faultwatch run`` as a subprocess named ``name`` in ``workdir`` (``name``.toml, ``name``.log).

    Not started by the constructor: :meth:`start` (again after a stop, for a restart).
    ``env`` is added to its environment (a password, say).
    """

    def __init__(self, model: Path | str, address: str, workdir: Path, name: str, config: dict | str,
                 env: dict[str, str] | None = None):
        workdir.mkdir(parents=True, exist_ok=True)
        self.model = Path(model)
        self.config_path = workdir / f"{name}.toml"
        self.config_path.write_text(config if isinstance(config, str) else toml_text(config))
        self.log_path = workdir / f"{name}.log"
        self.argv = [sys.executable, "-m", "faultwatch.runtime.cli", "run", "--model", str(model),
                     "--broker", address, "--config", str(self.config_path)]
        self.env = os.environ | (env or {})
        self.proc: subprocess.Popen | None = None
        self.launched = 0.0  # time.monotonic() of the last start
        self._log_offset = 0  # where the last start's output begins in the log

    def start(self) -> DaemonProcess:
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            self.launched = time.monotonic()
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, env=self.env)
        return self

    # -- its output ----------------------------------------------------------------------------

    def log(self) -> str:
        """Everything every start of it wrote."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def current_log(self) -> str:
        """What the process of the last start wrote."""
        if not self.log_path.exists():
            return ""
        with self.log_path.open("rb") as f:
            f.seek(self._log_offset)
            return f.read().decode(errors="replace")

    def log_tail(self, n: int = 30) -> str:
        return "\n".join(self.log().splitlines()[-n:])

    def metrics_port(self, timeout: float = 60.0) -> int:
        """The port this process serves /metrics on (it logs it once it listens)."""
        found = _wait(lambda: _METRICS_LINE.findall(self.current_log()), timeout)
        if not found:
            raise DaemonError(f"no 'metrics on' line from this process in {timeout:g} s:\n{self.log()}")
        return int(found[-1])  # type: ignore[index]

    def get(self, path: str) -> tuple[int, str]:
        """(HTTP status, body) of ``path`` (``/metrics``, ``/healthz``, ...) on its metrics port."""
        url = f"http://127.0.0.1:{self.metrics_port()}{path}"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def metric(self, name: str, labels: str = "") -> float:
        """One sample of /metrics (``labels`` as written, e.g. ``reason="bad_value"``), 0 if absent."""
        _, text = self.get("/metrics")
        key = f"{name}{{{labels}}}" if labels else name
        for line in text.splitlines():
            if line.startswith(key + " "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def stopping_counters(self) -> dict:
        """The counters of this process's ``stopping:`` line (it logs them on a clean exit); {} if none."""
        for line in reversed(self.current_log().splitlines()):
            if "stopping: " in line:
                return json.loads(line.split("stopping: ", 1)[1])
        return {}

    # -- the process ---------------------------------------------------------------------------

    @property
    def pid(self) -> int:
        self.check_alive()
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def exit_code(self) -> int | None:
        """Its exit code; None while it runs (or before it was started)."""
        return None if self.proc is None else self.proc.poll()

    def check_alive(self) -> None:
        if not self.alive():
            code = None if self.proc is None else self.proc.returncode
            raise DaemonError(f"the daemon is not running (exit code {code}):\n{self.log_tail()}")

    def signal(self, signum: int) -> None:
        self.check_alive()
        assert self.proc is not None
        self.proc.send_signal(signum)

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM (SIGCONT first, in case it is paused) and its exit code; killed, and an error
        raised, if it is still running after ``timeout`` seconds."""
        if self.proc is None:
            raise DaemonError("the daemon was never started")
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise DaemonError(f"the daemon ignored SIGTERM for {timeout:g} s:\n{self.log()}") from None

    def stopped_log(self) -> str:
        """Its log after a :meth:`stop`: what a failed wait shows, ending with the ``stopping:``
        line of every counter (what it received, rejected, stepped and published), which says
        where readings went when an expected message never came."""
        self.stop()
        return self.log()

    def kill(self) -> None:
        """SIGKILL: no snapshot, no ``stopped``, nothing flushed."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()

    def stop(self, timeout: float = 20.0) -> int | None:
        """:meth:`terminate` if running, never raising (killed after ``timeout``); its exit code."""
        if self.proc is None:
            return None
        try:
            return self.terminate(timeout)
        except DaemonError:
            return self.proc.returncode

    def _status_mb(self, key: str) -> float:
        self.check_alive()
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024  # kB → MB
        raise DaemonError(f"no {key} in /proc/{self.proc.pid}/status")

    def peak_rss_mb(self) -> float:
        """Its peak resident set size (VmHWM; Linux)."""
        return self._status_mb("VmHWM")

    def torch_loaded(self) -> bool:
        """Whether torch is mapped into the process (the edge daemon must never load it; Linux)."""
        self.check_alive()
        assert self.proc is not None
        maps = Path(f"/proc/{self.proc.pid}/maps").read_text()
        return "libtorch" in maps or "/torch/" in maps
