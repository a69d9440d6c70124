"""Fault injection: the daemon's files corrupted before a start or a reload. The daemon must start
(or go on), stay up and answer a reading with a forecast; its own bad state goes aside as
``<name>.corrupt-<UTC time>``; a bad model is refused in one line.

Every corruption of the snapshot and the journal (truncated at every 10 %, flipped bytes, empty,
wrong arrays, a folder in place) is tested on the reading path itself in
tests/unit/daemon/test_statefiles.py; here a real daemon starts on a representative few, a
snapshot and a journal fault per start, so the whole run stays short.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from daemon_harness import (
    Daemon,
    Publisher,
    forecasts,
    kill_daemons_at_teardown,  # noqa: F401 (the fixture, for this module)
    payload,
    wait_answering,
)
from faultwatch.runtime.daemon.snapshot import FILENAME
from faultwatch.runtime.devtools.simulator import CHANNELS
from helpers import MqttRecorder, wait_for
from model_fixtures import with_edited_contract

CONFIG = {
    "snapshot_interval_s": 1.0,
    "broker": {"client_id": "fw-faults", "reconnect_min_s": 0.2, "reconnect_max_s": 1.0},
    "output": {"stats_interval_s": 0.0},
    "homeassistant": {"discovery": False},
    "metrics": {"listen": ""},
    "reload": {"min_interval_s": 0.0},
}
JOURNAL = "outbox.jsonl"


def _snapshot_bytes(tmp_path: Path) -> bytes:
    """A real snapshot, as a daemon writes it (np.savez of the engine's arrays, tagged)."""
    from faultwatch.runtime.daemon.snapshot import save_snapshot

    folder = tmp_path / "real-snapshot"
    save_snapshot(folder, {"devices": np.array(["pump-1", "pump-2"]), "last_ts": np.zeros(2)}, "0" * 64)
    return (folder / FILENAME).read_bytes()


def _flip(data: bytes, at: float) -> bytes:
    i = int(len(data) * at)
    return data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:]


def _malformed_format(tmp_path: Path) -> bytes:
    path = tmp_path / "malformed.npz"
    with path.open("wb") as f:
        np.savez(f, _format=np.array([1, 2, 3]), _model_sha256=np.array("x"), devices=np.array(["a"]))
    return path.read_bytes()


# (snapshot fault, journal fault): one daemon start each. "dir" puts a folder in the file's place.
CASES = {
    "empty-and-hash-topic": (lambda tmp: b"", b'{"topic": "#", "payload": "x"}\n'),
    "truncated-and-empty-topic": (lambda tmp: _snapshot_bytes(tmp)[: len(_snapshot_bytes(tmp)) // 2],
                                  b'{"topic": "", "payload": "x"}\n'),
    "flipped-and-garbage": (lambda tmp: _flip(_snapshot_bytes(tmp), 0.6), b"\x00\xff{not json\n"),
    "malformed-format-and-wildcard": (_malformed_format,
                                      b'{"topic": "faultwatch/+/fault", "payload": "x"}\n'),
    "folders": ("dir", "dir"),
}


def _place(path: Path, content) -> None:
    if content == "dir":
        path.mkdir()
        (path / "inside").write_text("a folder where a file should be")
    else:
        path.write_bytes(content)


def _aside(folder: Path, name: str) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.startswith(f"{name}.corrupt-")]


@pytest.mark.parametrize("case", list(CASES))
def test_a_corrupt_snapshot_and_journal_are_set_aside_and_the_daemon_answers(broker, trained, tmp_path,
                                                                             case):
    snapshot, journal = CASES[case]
    state = tmp_path / "state"
    state.mkdir()
    _place(state / FILENAME, snapshot if snapshot == "dir" else snapshot(tmp_path))
    _place(state / JOURNAL, journal)
    with MqttRecorder(broker.host, broker.port, ["faultwatch/#"]) as recorder:
        daemon = Daemon(trained.int8, broker, tmp_path, "daemon", CONFIG | {"state_dir": str(state)})
        wait_answering(daemon, broker, recorder)  # a reading in, a forecast out
        # Both bad files moved aside (each reported in one line), the way clear for new ones.
        assert len(_aside(state, FILENAME)) == 1, daemon.log()
        assert len(_aside(state, JOURNAL)) == 1, daemon.log()
        wait_for(lambda: (state / FILENAME).is_file(), timeout=60, message="no new snapshot written")
        assert daemon.alive()
        assert daemon.terminate() == 0
    log = daemon.log()
    assert "Traceback" not in log
    assert log.count("moved aside") == 2, log


def _crafted(trained, tmp_path: Path) -> dict[str, Path]:
    """Models whose metadata does not match their graph, or holds values the runtime can't use."""
    edits = {
        "hidden-sizes": lambda raw: raw.update(hidden=[h * 2 for h in raw["hidden"]]),
        "sample-period-text": lambda raw: raw.update(sample_period_s="one second"),
        "scale-zero": lambda raw: raw["scaler"].update(scale=[0.0] * len(raw["scaler"]["scale"])),
        "threshold-nan": lambda raw: raw["calibration"].update(threshold=float("nan")),
    }
    return {name: with_edited_contract(trained.int8, tmp_path / f"{name}.onnx", edit)
            for name, edit in edits.items()}


def test_a_crafted_model_is_refused_in_one_line_at_start_and_by_check_config(trained, tmp_path):
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    for name, model in _crafted(trained, tmp_path).items():
        for extra in (["--check-config"], ["--broker", "127.0.0.1:1"]):
            argv = [sys.executable, "-m", "faultwatch.runtime.cli", "run", "--model", str(model), *extra]
            run = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env,
                                 stdin=subprocess.DEVNULL)
            assert run.returncode == 2, (name, extra, run.stderr)
            assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr
            assert str(model) in run.stderr, run.stderr


def test_a_hot_reload_of_a_crafted_model_keeps_the_old_model_running(broker, trained, tmp_path):
    model_path = tmp_path / "model.onnx"
    shutil.copyfile(trained.int8, model_path)
    crafted = _crafted(trained, tmp_path)
    with MqttRecorder(broker.host, broker.port, ["faultwatch/#"]) as recorder:
        daemon = Daemon(model_path, broker, tmp_path, "daemon", CONFIG)
        wait_answering(daemon, broker, recorder)
        # Commands are off by default: a reload command is not acted on. Readings published after
        # it, each answered, prove it had its chance (a reload runs right after the batch it came in).
        publisher = Publisher(broker)
        publisher.send("faultwatch/command/reload", b"")
        for n, device in enumerate(("after-command-1", "after-command-2")):
            publisher.send(f"sensors/{device}", payload(1_600_000_000.0 + n, np.ones(len(CHANNELS))))
            wait_for(lambda device=device: any(d == device for d, _ in forecasts(recorder.messages())),
                     timeout=60, message=daemon.log)
        assert recorder.messages("faultwatch/reload") == []
        assert not any(word in daemon.log() for word in ("reload rejected", "reloaded ", "reload: "))
        for i, (name, bad) in enumerate(crafted.items(), start=1):
            tmp = model_path.with_suffix(".new")
            shutil.copyfile(bad, tmp)
            os.replace(tmp, model_path)
            daemon.signal(signal.SIGHUP)
            wait_for(lambda i=i: len(recorder.messages("faultwatch/reload")) >= i, timeout=60,
                     message=lambda name=name: f"no reload result for {name}:\n{daemon.log()}")
            result = json.loads(recorder.messages("faultwatch/reload")[-1].payload)
            assert result["ok"] is False and str(tmp_path) not in json.dumps(result), result
            assert daemon.alive(), daemon.log()
        # Still the old model, still answering: a reading of a new device gets its forecast.
        publisher.send("sensors/after-reloads", payload(1_600_000_000.0, np.ones(len(CHANNELS))))
        wait_for(lambda: any(d == "after-reloads" for d, _ in forecasts(recorder.messages())), timeout=60,
                 message=daemon.log)
        publisher.close()
        assert daemon.terminate() == 0
    assert daemon.log().count("reload rejected") == len(crafted)
    assert "Traceback" not in daemon.log()
