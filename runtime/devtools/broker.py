"""A private Mosquitto broker on a free loopback port, for the demo, benchmarks and tests.

One process of the ``mosquitto`` binary (the Debian package), with its config,
persistence file and log in a directory of its own. It is never a service:
whoever starts it stops it. Persistence is on, so :meth:`MosquittoBroker.stop`
+ :meth:`MosquittoBroker.start` keeps retained messages, persistent sessions
and the QoS 1 messages queued for them, as a production broker does;
:meth:`MosquittoBroker.kill` is a crash (nothing since the last save is kept).

>>> import tempfile
>>> with tempfile.TemporaryDirectory() as tmp, MosquittoBroker(Path(tmp)) as broker:
...     print(broker.running, broker.address == f"127.0.0.1:{broker.port}")
True True
>>> broker.running   # stopped (SIGTERM, persistence saved) on leaving the block
False

A :class:`SecureListener` adds a second listener that asks for a password and/or
speaks TLS, for the client under test, while the first stays open to everyone else
(``per_listener_settings``).

Standard library only: the edge install does not need it, and it does not need paho.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

INSTALL_HINT = (
    "install it with `apt-get install -y mosquitto` (as root or with sudo; only the binary "
    "is used, no service is started), or run `make demo` / `make test`, which install it"
)

#: Where Debian and source builds put the binary; /usr/sbin is not on a non-root PATH.
_SBIN = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")


class BrokerError(RuntimeError):
    """The broker did not start, stop or save as it must; the message ends with its log."""


class BrokerUnavailable(BrokerError):
    """There is no mosquitto binary on this machine; the message says how to install it."""


def find_mosquitto() -> str:
    """Path of the mosquitto binary: on PATH, else in /usr/sbin. Raises BrokerUnavailable."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for candidate in _SBIN:
        if os.access(candidate, os.X_OK):
            return candidate
    raise BrokerUnavailable(f"mosquitto not found on PATH or in /usr/sbin: {INSTALL_HINT}")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the kernel's pick; may be taken again later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


@dataclass
class SecureListener:
    """A second listener on 127.0.0.1: with ``users``, only those name/password pairs may
    connect (no anonymous clients); with ``tls`` = (CA, certificate, key) PEM files, TLS only.
    Change ``users`` and :meth:`MosquittoBroker.restart` to change the passwords."""

    users: dict[str, str] = field(default_factory=dict)
    tls: tuple[Path, Path, Path] | None = None
    port: int = 0  # 0: a free port, picked when the broker is made


def find_passwd_tool() -> str:
    """``mosquitto_passwd``, from the same Debian package as the broker."""
    found = shutil.which("mosquitto_passwd") or next(
        (p for p in ("/usr/bin/mosquitto_passwd", "/usr/sbin/mosquitto_passwd") if os.access(p, os.X_OK)),
        None)
    if found is None:
        raise BrokerUnavailable(f"mosquitto_passwd not found: {INSTALL_HINT}")
    return found


class MosquittoBroker:
    """One Mosquitto process on 127.0.0.1 with its config, persistence and log in ``data_dir``.

    ``port=None`` picks a free port (and another one if that port is taken before
    the first start); the port then stays the same across :meth:`restart`.
    ``binary=None`` finds it with :func:`find_mosquitto` (BrokerUnavailable if absent).
    """

    host = "127.0.0.1"

    def __init__(self, data_dir: Path, port: int | None = None, *, binary: str | None = None,
                 secure: SecureListener | None = None) -> None:
        self.binary = binary or find_mosquitto()
        self.secure = secure
        if secure is not None and not secure.port:
            secure.port = free_port(self.host)
        self.data_dir = Path(data_dir)
        self._port_given = port is not None
        self.port = port or free_port(self.host)
        self.db_path = self.data_dir / "mosquitto.db"
        self.log_path = self.data_dir / "mosquitto.log"
        self.output_path = self.data_dir / "mosquitto.out"  # stdout/stderr: errors before logging
        self.config_path = self.data_dir / "mosquitto.conf"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._proc: subprocess.Popen[bytes] | None = None
        self._ever_started = False

    @property
    def address(self) -> str:
        """``"127.0.0.1:PORT"``, as ``faultwatch run --broker`` takes it."""
        return f"{self.host}:{self.port}"

    @property
    def secure_address(self) -> str:
        """``"127.0.0.1:PORT"`` of the :class:`SecureListener`."""
        if self.secure is None:
            raise BrokerError("this broker has no secure listener")
        return f"{self.host}:{self.secure.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def _write_config(self) -> None:
        lines = [
            "persistence true",
            f"persistence_location {self.data_dir}/",
            "persistence_file mosquitto.db",
            "autosave_interval 0",  # save on exit (SIGTERM) only: stop() is the save point
            "max_queued_messages 100000",
            "max_inflight_messages 1000",
            # As deploy/mosquitto.conf: without it Nagle + delayed ACK add ~40 ms to every forecast.
            "set_tcp_nodelay true",
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
            # write into a private (e.g. tmp) directory.
            lines.append("user root")
        if self.secure is not None:
            lines.append("per_listener_settings true")
        lines += [f"listener {self.port} {self.host}", "allow_anonymous true"]
        if self.secure is not None:
            lines += [f"listener {self.secure.port} {self.host}", *self._secure_lines(self.secure)]
        self.config_path.write_text("\n".join(lines) + "\n")

    def _secure_lines(self, secure: SecureListener) -> list[str]:
        lines = []
        if secure.users:
            passwd = self.data_dir / "passwd"
            passwd.unlink(missing_ok=True)
            tool = find_passwd_tool()
            for i, (user, password) in enumerate(secure.users.items()):
                subprocess.run([tool, *(["-c"] if i == 0 else []), "-b", str(passwd), user, password],
                               check=True, capture_output=True, stdin=subprocess.DEVNULL)
            passwd.chmod(0o600)
            lines += ["allow_anonymous false", f"password_file {passwd}"]
        else:
            lines.append("allow_anonymous true")
        if secure.tls is not None:
            ca, cert, key = secure.tls
            lines += [f"cafile {ca}", f"certfile {cert}", f"keyfile {key}"]
        return lines

    def start(self, timeout: float = 20.0) -> MosquittoBroker:
        """Start (or start again) with the same config and data; return self.

        Waits until the port accepts TCP connections. If the process exits at once
        (the port held by someone else, or by a socket of the previous run), it
        retries briefly; a port picked by us is replaced before the first start.
        """
        if self.running:
            raise BrokerError(f"mosquitto already running on {self.address}")
        self._write_config()  # on every start: the secure listener's passwords may have changed
        deadline = time.monotonic() + timeout
        attempt = 0
        while True:
            attempt += 1
            with self.output_path.open("ab") as out:
                proc = subprocess.Popen(
                    [self.binary, "-c", str(self.config_path)],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            self._proc = proc
            while proc.poll() is None and not _accepts(self.host, self.port):
                if time.monotonic() >= deadline:
                    self.kill()
                    raise BrokerError(f"mosquitto did not listen on {self.address} within "
                                      f"{timeout:g} s:\n{self.log_text()}")
                time.sleep(0.05)  # polling interval
            if proc.poll() is None:
                self._ever_started = True
                return self
            self._proc = None
            if time.monotonic() >= deadline:
                raise BrokerError(
                    f"mosquitto exited with {proc.returncode} on start "
                    f"(attempt {attempt}, {self.address}):\n{self.log_text()}"
                )
            if not (self._port_given or self._ever_started):
                self.port = free_port(self.host)  # lost the race for our pick: take another
                if self.secure is not None:
                    self.secure.port = free_port(self.host)
                self._write_config()
            time.sleep(min(0.1 * attempt, 1.0))  # backoff between attempts, not a wait

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM and wait: mosquitto writes its persistence file on a clean exit.

        Raises BrokerError (after killing it) if it ignores SIGTERM, exits non-zero
        or saves nothing. Stopping a stopped broker does nothing.
        """
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise BrokerError(
                f"mosquitto on {self.address} ignored SIGTERM for {timeout:g} s; killed it, "
                f"its persistence was NOT saved:\n{self.log_text()}"
            ) from None
        if code != 0:
            raise BrokerError(f"mosquitto exited with {code} on SIGTERM:\n{self.log_text()}")
        if not self.db_path.exists():
            raise BrokerError(f"mosquitto did not save {self.db_path}:\n{self.log_text()}")

    def kill(self) -> None:
        """SIGKILL, like a crash or power cut: nothing since the last save is kept."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def restart(self, timeout: float = 20.0) -> MosquittoBroker:
        """:meth:`stop` then :meth:`start`, on the same port."""
        self.stop(timeout)
        return self.start(timeout)

    def log_text(self) -> str:
        """What mosquitto printed before its log was open, then its log file."""
        parts = []
        for path in (self.output_path, self.log_path):
            if path.exists():
                text = path.read_text(errors="replace").strip()
                if text:
                    parts.append(text)
        return "\n".join(parts)

    def __enter__(self) -> MosquittoBroker:
        return self if self.running else self.start()

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop()  # leaves no process behind, even when it raises
        except BrokerError:
            if exc[0] is None:  # don't hide the error that ended the block
                raise

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<MosquittoBroker {self.address} {state}>"


__all__ = ["INSTALL_HINT", "BrokerError", "BrokerUnavailable", "MosquittoBroker", "SecureListener",
           "find_mosquitto", "free_port"]
