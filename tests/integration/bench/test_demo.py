"""`faultwatch demo` end to end: train, export, a real Mosquitto and daemon, live faults detected."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import pytest
from faultwatch.bench.demo import INJECTED, PUMPS
from faultwatch.runtime.devtools.simulator import device_ids

pytestmark = pytest.mark.torch

# The demo takes ~25 s on an idle 2-core machine; a busy one may take several times longer.
TIMEOUT_S = 900


def _run_demo(workdir) -> tuple[int, str]:
    # Own session: on a timeout the whole group goes (the daemon and mosquitto are grandchildren).
    proc = subprocess.Popen(
        [sys.executable, "-m", "faultwatch.runtime.cli", "demo", "--workdir", str(workdir)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"faultwatch demo did not finish within {TIMEOUT_S} s:\n{out}")
    return proc.returncode, out


def test_demo_detects_every_injected_fault(tmp_path):
    workdir = tmp_path / "demo"
    code, out = _run_demo(workdir)
    assert code == 0, out
    rows = {line.split()[0]: line for line in out.splitlines()
            if line.strip() and line.split()[0] in device_ids(PUMPS)}
    faulty = {pump for _, pump, *_ in INJECTED}
    for kind, pump, start, duration, _ in INJECTED:
        assert re.search(rf"{kind} {start}\.\.{start + duration}\s+raised at reading \d+", rows[pump]), out
    for pump in set(device_ids(PUMPS)) - faulty:
        assert "nothing (clean)" in rows[pump], out
    assert "false alarms: none" in out and "FALSE ALARM" not in out, out
    answered = re.search(r"readings answered: (\d+) forecasts / (\d+) readings published", out)
    assert answered and answered[1] == answered[2] != "0", out
    assert "status 'stopped'" in out, out
    assert (workdir / "model.onnx").stat().st_size > 0
    assert (workdir / "daemon.log").exists()
