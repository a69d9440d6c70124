"""A config ``--check-config`` passes is one the daemon starts with: each is checked, then run, and
must answer a reading with a forecast. (What it refuses: tests/unit/daemon/test_config.py.)"""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest
from daemon_harness import (
    Daemon,
    kill_daemons_at_teardown,  # noqa: F401 (the fixture, for this module)
    toml,
    wait_answering,
)
from helpers import MqttRecorder

CONFIGS = {
    # Nothing but what every test daemon needs: the default client_id, log format, topics.
    "defaults": {"metrics": {"listen": ""}, "output": {"stats_interval_s": 0.0}},
    "json-logs-state-channels": {
        "log_level": "debug", "log": {"format": "json"}, "state_dir": "{tmp}/state",
        "broker": {"client_id": "fw-{hostname}-line-1"},
        "input": {"topic": ["sensors/{device}", "sensors/{device}/{channel}"]},
        "output": {"forecast_every": 1, "stats_interval_s": 0.0},
        "engine": {"detector": {"max_gap_periods": 3600.0}}, "metrics": {"listen": "127.0.0.1:0"},
    },
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_config_that_check_config_passes_runs(broker, trained, tmp_path, name):
    config = {k: v.replace("{tmp}", str(tmp_path)) if isinstance(v, str) else v
              for k, v in CONFIGS[name].items()}
    path = tmp_path / "checked.toml"
    path.write_text(toml(config | {"model": str(trained.int8)}
                         | {"broker": config.get("broker", {}) | {"host": broker.host, "port": broker.port}}))
    argv = [sys.executable, "-m", "faultwatch.runtime.cli", "run", "--check-config", str(path)]
    checked = subprocess.run(argv, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert checked.returncode == 0, checked.stderr
    with MqttRecorder(broker.host, broker.port, ["faultwatch/#"]) as recorder:
        # As under systemd: stderr is the journal (the harness's log file stands in for it).
        daemon = Daemon(trained.int8, broker, tmp_path, "daemon", config, env={"JOURNAL_STREAM": "8:4242"})
        wait_answering(daemon, broker, recorder)
        assert daemon.terminate() == 0
    lines = [line for line in daemon.log().splitlines() if line.strip()]
    if config.get("log", {}).get("format") == "json":
        assert all(json.loads(line)["level"] in ("DEBUG", "INFO", "WARNING", "ERROR") for line in lines)
    else:  # auto, under journald: each line carries its syslog priority
        assert all(line[:3] in ("<3>", "<4>", "<6>", "<7>") for line in lines), lines
        assert any(line.startswith("<6>faultwatch daemon: model") for line in lines)
    client_id = config.get("broker", {}).get("client_id", "faultwatch-{hostname}")
    assert f" as {client_id.replace('{hostname}', socket.gethostname())} " in broker.log_text()
