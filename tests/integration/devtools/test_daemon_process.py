"""The daemon-process helper reads what *this* process wrote, after a restart too."""

from __future__ import annotations

import json
import re
import socket

from faultwatch.runtime.devtools.daemon_process import DaemonProcess
from helpers import wait_for
from model_fixtures import TrainedModels


def _closed_port() -> int:
    """A loopback port nothing listens on (the daemon keeps retrying it; no broker needed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_after_a_restart_the_metrics_port_is_the_new_process_s(trained: TrainedModels, tmp_path):
    config = {"broker": {"reconnect_max_s": 1.0}, "metrics": {"listen": "127.0.0.1:0"}}
    daemon = DaemonProcess(trained.int8, f"127.0.0.1:{_closed_port()}", tmp_path, "d", config)
    try:
        daemon.start()
        first = daemon.metrics_port()
        status, body = daemon.get("/healthz")
        assert json.loads(body)["model_sha256"], (status, body)
        assert daemon.terminate() == 0
        assert daemon.stopping_counters()["connect_failures"] >= 1

        daemon.start()
        # Read at once: the new process may not listen yet, and the log still ends with the old
        # process's "metrics on" line; the helper waits for this process's own.
        status, body = daemon.get("/healthz")
        assert json.loads(body)["uptime_s"] >= 0, (status, body)
        ports = re.findall(r"metrics on http://[\d.]+:(\d+)/", daemon.log())
        assert len(ports) == 2 and int(ports[0]) == first and int(ports[1]) == daemon.metrics_port()
        assert daemon.current_log().count("metrics on") == 1
        assert daemon.terminate() == 0
    finally:
        daemon.kill()


def test_the_stopped_log_of_a_failed_wait_ends_with_the_daemon_s_counters(trained: TrainedModels, tmp_path):
    config = {"broker": {"reconnect_max_s": 1.0}, "metrics": {"listen": ""}}
    daemon = DaemonProcess(trained.int8, f"127.0.0.1:{_closed_port()}", tmp_path, "d", config)
    try:
        daemon.start()
        # Once it has tried the closed port it runs its loop, and SIGTERM is a clean stop.
        wait_for(lambda: "cannot connect to the broker" in daemon.log(), timeout=60, message=daemon.log)
        text = daemon.stopped_log()
        assert not daemon.alive() and daemon.exit_code() == 0
        assert "stopping: {" in text and text == daemon.log()
        assert daemon.stopping_counters()["connect_failures"] >= 1
    finally:
        daemon.kill()
