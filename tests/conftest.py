"""Shared fixtures: a real Mosquitto broker per test, and the package-dir import alias.

``broker``          a Mosquitto on a free loopback port, stopped at teardown.
``broker_factory``  ``broker_factory()`` starts another one (several per test are fine).

Each broker is a :class:`MosquittoBroker` with ``.host``, ``.port``, ``.address``
(``"127.0.0.1:PORT"``), ``.stop()``, ``.start()``, ``.restart()``, ``.kill()``,
``.running`` and ``.log_text()``. Persistence is on (in the test's tmp dir), so
``stop()`` + ``start()`` keeps retained messages, persistent sessions and the
QoS 1 messages queued for them, as a production broker does.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import wait_for

# Trained-model fixtures (tiny models, trained once per session) live in their own module.
pytest_plugins = ["model_fixtures"]

# --------------------------------------------------------------------------------------
# `pytest --doctest-modules runtime`: import runtime/*.py as faultwatch.runtime.*
#
# pyproject maps the folders runtime/, train/, export/ to the packages
# faultwatch.runtime, .train, .export. pytest names a collected file after its folder
# (`runtime.engine`) in every --import-mode, which would load a second copy of the
# module beside the installed `faultwatch.runtime.engine` (other class identities,
# other module state, relative imports pulling more copies). This finder, first on
# sys.meta_path, answers for those folder names with the installed module itself, so
# doctests run in the real `faultwatch.runtime.*` modules. It is installed when this
# conftest loads, which pytest does before collecting `runtime` as long as `tests` is
# on the command line too (the Makefile runs `pytest --doctest-modules runtime tests`).
# --------------------------------------------------------------------------------------

_PACKAGE_DIRS = {
    "runtime": "faultwatch.runtime",
    "train": "faultwatch.train",
    "export": "faultwatch.export",
}


class _PackageDirAlias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, aliases: dict[str, str]) -> None:
        self.aliases = aliases
        self._real_specs: dict[str, object] = {}

    def _real_name(self, fullname: str) -> str | None:
        head, dot, rest = fullname.partition(".")
        target = self.aliases.get(head)
        return None if target is None else target + dot + rest

    def find_spec(self, fullname, path=None, target=None):
        real = self._real_name(fullname)
        if real is None:
            return None
        try:
            if importlib.util.find_spec(real) is None:
                return None
        except ImportError:  # faultwatch not installed: leave the name to the usual finders
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        module = importlib.import_module(self._real_name(spec.name))
        self._real_specs[spec.name] = module.__spec__
        return module

    def exec_module(self, module) -> None:
        # importlib overwrote __spec__ with the alias spec; give the module its own back.
        module.__spec__ = self._real_specs.pop(module.__spec__.name)


if not any(isinstance(f, _PackageDirAlias) for f in sys.meta_path):
    sys.meta_path.insert(0, _PackageDirAlias(_PACKAGE_DIRS))


# --------------------------------------------------------------------------------------
# Mosquitto
# --------------------------------------------------------------------------------------

_INSTALL_HINT = (
    "Tests need a real Mosquitto broker binary. Run `make test` (its `mosquitto` target "
    "installs it), or `apt-get install -y mosquitto` (as root / with sudo)."
)


def find_mosquitto() -> str:
    """Path of the mosquitto binary; fails the test (never skips) when there is none."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for candidate in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if os.access(candidate, os.X_OK):
            return candidate
    pytest.fail(f"mosquitto not found on PATH or in /usr/sbin. {_INSTALL_HINT}", pytrace=False)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


class MosquittoBroker:
    """One Mosquitto process on 127.0.0.1 with its config, data and log in ``workdir``."""

    host = "127.0.0.1"

    def __init__(self, binary: str, workdir: Path, port: int | None = None) -> None:
        self.binary = binary
        self.workdir = workdir
        self.port = port or _free_port()
        self.data_dir = workdir / "data"
        self.db_path = self.data_dir / "mosquitto.db"
        self.log_path = workdir / "mosquitto.log"
        self.output_path = workdir / "mosquitto.out"  # stdout/stderr: errors before logging
        self.config_path = workdir / "mosquitto.conf"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._proc: subprocess.Popen[bytes] | None = None
        self._write_config()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.running else None

    def _write_config(self) -> None:
        lines = [
            f"listener {self.port} {self.host}",
            "allow_anonymous true",
            "persistence true",
            f"persistence_location {self.data_dir}/",
            "persistence_file mosquitto.db",
            "autosave_interval 0",  # save on exit (SIGTERM) only: stop() is the save point
            "max_queued_messages 100000",
            "max_inflight_messages 1000",
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            "log_timestamp_format %Y-%m-%dT%H:%M:%S",
        ]
        if os.geteuid() == 0:
            # As root, mosquitto would switch to the `mosquitto` user, which cannot
            # write into the test's tmp dir.
            lines.append("user root")
        self.config_path.write_text("\n".join(lines) + "\n")

    def start(self, timeout: float = 20.0) -> MosquittoBroker:
        """Start (or restart) on the same port with the same config and data.

        Waits until the port accepts TCP connections. If the process exits at once
        (the port still held by a socket of the previous run), it retries briefly.
        """
        if self.running:
            raise RuntimeError(f"mosquitto already running on {self.address}")
        deadline = time.monotonic() + timeout
        attempt = 0
        while True:
            attempt += 1
            with self.output_path.open("ab") as out:
                self._proc = subprocess.Popen(
                    [self.binary, "-c", str(self.config_path)],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            proc = self._proc

            def up_or_exited(proc=proc) -> bool:
                return proc.poll() is not None or _accepts(self.host, self.port)

            wait_for(
                up_or_exited,
                timeout=max(deadline - time.monotonic(), 0.5),
                message=lambda: f"mosquitto did not listen on {self.address}:\n{self.log_text()}",
            )
            if proc.poll() is None:
                return self
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"mosquitto exited with {proc.returncode} on start "
                    f"(attempt {attempt}, {self.address}):\n{self.log_text()}"
                )
            time.sleep(min(0.1 * attempt, 1.0))  # backoff between attempts, not a wait

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM and wait: mosquitto writes its persistence db on a clean exit."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError(
                f"mosquitto on {self.address} ignored SIGTERM for {timeout:g} s; killed it, "
                f"its persistence was NOT saved:\n{self.log_text()}"
            ) from None
        if code != 0:
            raise AssertionError(f"mosquitto exited with {code} on SIGTERM:\n{self.log_text()}")
        if not self.db_path.exists():
            raise AssertionError(f"mosquitto did not save {self.db_path}:\n{self.log_text()}")

    def kill(self) -> None:
        """SIGKILL, like a crash or power cut: nothing since the last save is kept."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def restart(self, timeout: float = 20.0) -> MosquittoBroker:
        self.stop(timeout)
        return self.start(timeout)

    def log_text(self) -> str:
        parts = []
        for path in (self.output_path, self.log_path):
            if path.exists():
                text = path.read_text(errors="replace").strip()
                if text:
                    parts.append(text)
        return "\n".join(parts)

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<MosquittoBroker {self.address} {state}>"


@pytest.fixture
def broker_factory(tmp_path: Path) -> Iterator[Callable[[], MosquittoBroker]]:
    """Returns a function that starts a new broker (in ``tmp_path/mosquitto-N``);
    all of them are stopped at teardown."""
    binary = find_mosquitto()
    started: list[MosquittoBroker] = []

    def make() -> MosquittoBroker:
        broker = MosquittoBroker(binary, tmp_path / f"mosquitto-{len(started)}")
        started.append(broker)
        return broker.start()

    yield make
    for broker in started:
        try:
            broker.stop()
        except AssertionError:  # teardown must not leave a process behind
            broker.kill()


@pytest.fixture
def broker(broker_factory: Callable[[], MosquittoBroker]) -> MosquittoBroker:
    """A real Mosquitto on a free loopback port, fresh for each test."""
    return broker_factory()
