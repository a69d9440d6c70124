"""What ``--check-config`` refuses: every problem of a config at once, a line each, and each config
the daemon could not run or would lose data with. (That a config it passes is one the daemon
starts with: tests/integration/daemon/test_check_config.py.)"""

from __future__ import annotations

import os
import socket

import pytest
from faultwatch.runtime.cli import main as cli_main
from faultwatch.runtime.daemon import config as cfg
from faultwatch.runtime.engine.detector import MAX_GAP_PERIODS, DetectorSettings


def check(tmp_path, text: str, capsys) -> tuple[int, list[str]]:
    """``faultwatch run --check-config`` on ``text`` (no model needed to fail): exit code, stderr lines."""
    path = tmp_path / "faultwatch.toml"
    path.write_text(text)
    code = cli_main(["run", "--check-config", str(path)])
    return code, capsys.readouterr().err.splitlines()


def test_every_problem_of_a_config_is_reported_in_one_run_a_line_each(tmp_path, capsys):
    text = ('log_level = "loud"\n[broker]\nhost = ""\nclient_id = ""\nport = 0\n'
            '[engine]\ntopik = 1\n[engine.detector]\nmax_gap_periods = 1e9\n[output]\nprefix = "a/#"\n')
    code, lines = check(tmp_path, text, capsys)
    assert code == 2
    assert all(line.startswith("faultwatch run: ") for line in lines), lines
    text = "\n".join(lines)
    for key in ("log_level", "broker.host", "broker.client_id", "broker.port",
                "engine.detector: max_gap_periods", "engine.topik", "output.prefix", "no model"):
        assert key in text, key
    assert len(lines) == 8, lines
    assert "Traceback" not in text


@pytest.mark.parametrize(("text", "named"), [
    ('[broker]\nclient_id = ""', "broker.client_id is empty: the persistent session"),
    ('[broker]\nclient_id = "  "', "broker.client_id is empty"),
    ('[broker]\nhost = ""', "broker.host is empty"),
    ('[broker]\ntls_ca_file = "/nonexistent/ca.pem"', "broker.tls_ca_file: '/nonexistent/ca.pem' is missing"),
    ('[broker]\ntls_ca_file = "/"', "broker.tls_ca_file: '/' is not a file"),
    ('[broker]\npassword_file = "/nonexistent/pw"', "broker.password_file: '/nonexistent/pw' is missing"),
    ("[engine.detector]\nmax_gap_periods = 1e9",
     f"engine.detector: max_gap_periods must be in [1, {MAX_GAP_PERIODS}]"),
    ('[log]\nformat = "xml"', "log.format must be one of auto, text, journald, json"),
    ("[reload]\nmqtt_command = true", "unknown key 'reload.mqtt_command' (now commands.enabled"),
    ('state_dir = "/dev/null"', "state_dir: '/dev/null' is not a folder"),
])
def test_a_config_the_daemon_cannot_run_is_refused_naming_the_key(text, named):
    with pytest.raises(cfg.ConfigError) as info:
        cfg.validate(cfg.parse_config(text))
    assert named in str(info.value)


def test_the_tls_files_are_named_one_line_each(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    text = (f'[broker]\ntls_ca_file = "{ca}"\ntls_cert_file = "{tmp_path}/c.pem"\n'
            f'tls_key_file = "{tmp_path}/k.pem"\n')
    with pytest.raises(cfg.ConfigError) as info:
        cfg.validate(cfg.parse_config(text))
    assert info.value.problems == [f"broker.tls_cert_file: '{tmp_path}/c.pem' is missing (no such file)",
                                   f"broker.tls_key_file: '{tmp_path}/k.pem' is missing (no such file)"]


@pytest.mark.parametrize("level", ["debug", "Info", "WARNING", "error"])
def test_log_levels_are_accepted_in_any_case(level):
    assert cfg.validate(cfg.parse_config(f'log_level = "{level}"')).log_level == level.upper()


def test_the_default_client_id_is_unique_per_host_and_partition():
    config = cfg.load_config(None, type("Args", (), {"model": "m.onnx"})())
    assert config.broker.client_id == f"faultwatch-{socket.gethostname()}"
    text = "model = 'm.onnx'\n[input]\npartitions = 4\npartition = 3\n"
    assert cfg.resolve_client_id(cfg.parse_config(text), "edge") == "faultwatch-edge-p3"
    explicit = cfg.parse_config("[broker]\nclient_id = 'line-1-{hostname}'\n[input]\npartitions = 2\n")
    assert cfg.resolve_client_id(explicit, "edge") == "line-1-edge"  # an explicit id is taken as written


def test_the_engine_refuses_to_bridge_more_than_the_cap():
    with pytest.raises(ValueError, match="max_gap_periods"):
        DetectorSettings(max_gap_periods=MAX_GAP_PERIODS + 1)
    assert DetectorSettings(max_gap_periods=MAX_GAP_PERIODS).max_gap_periods == MAX_GAP_PERIODS


def test_faultwatch_run_turns_off_onnxruntime_telemetry(monkeypatch, capsys):
    """onnxruntime would keep a telemetry queue under ~/.cache, the state dir under the unit."""
    monkeypatch.delenv("ORT_DISABLE_TELEMETRY", raising=False)
    assert cli_main(["run", "--example-config"]) == 0
    capsys.readouterr()
    assert os.environ["ORT_DISABLE_TELEMETRY"] == "1"


def test_a_damaged_config_file_is_refused_in_lines_never_a_traceback(tmp_path, capsys):
    """The config is the operator's file, not the daemon's: it is never moved, only refused."""
    good = cfg.example_config().encode()
    variants = {f"truncated-{pct}%": good[:len(good) * pct // 100] for pct in range(0, 100, 10)}
    variants |= {"binary": bytes(range(256)), "flipped": good[:40] + b"\xff" + good[41:]}
    for name, data in variants.items():
        path = tmp_path / f"{name}.toml"
        path.write_bytes(data)
        code = cli_main(["run", "--check-config", str(path)])
        err = capsys.readouterr().err
        assert code == 2, name
        assert err and all(line.startswith("faultwatch run: ") for line in err.splitlines()), (name, err)
        assert path.exists()
    (tmp_path / "folder.toml").mkdir()
    assert cli_main(["run", "--check-config", str(tmp_path / "folder.toml")]) == 2
    assert "cannot read config" in capsys.readouterr().err
