"""The daemon on a broker that asks for credentials or speaks TLS: the password comes from the
environment or a file and is never written out; a refused login and a certificate it can't
trust are reported with the reason, retried, and the daemon recovers once the broker lets it
in. Real Mosquitto (a second listener for the daemon, the first for the test's own clients),
real model, subprocess."""

from __future__ import annotations

import json
import secrets

from daemon_harness import (
    Daemon,
    PersistentRecorder,
    kill_daemons_at_teardown,  # noqa: F401 (the fixture, for this module)
    wait_answering,
)
from faultwatch.runtime.devtools.broker import MosquittoBroker, SecureListener
from helpers import MqttRecorder, wait_for
from tls_certs import make_tls_files


def _config(client_id: str, **broker) -> dict:
    return {
        "input": {"topic": ["sensors/{device}"]},
        "output": {"stats_interval_s": 0.3},
        "engine": {"max_batch": 1},
        "metrics": {"listen": "127.0.0.1:0"},
        "broker": {"client_id": client_id, "reconnect_min_s": 0.2, "reconnect_max_s": 0.5} | broker,
    }


def _health(daemon: Daemon) -> dict:
    status, body = daemon.get("/healthz")
    assert status == 200, body
    return json.loads(body)


def _written_out(daemon: Daemon) -> str:
    """Everything the daemon shows or wrote: its log, config file, /metrics and /healthz."""
    return "\n".join([daemon.log(), daemon.config_path.read_text(), daemon.get("/metrics")[1],
                      daemon.get("/healthz")[1]])


def test_a_password_from_the_environment_logs_in_and_is_never_written_out(trained, tmp_path):
    secret = "pw-" + secrets.token_hex(12)
    broker = MosquittoBroker(tmp_path / "broker", secure=SecureListener(users={"faultwatch": secret}))
    with broker, MqttRecorder(broker.host, broker.port, ["faultwatch/#"]) as recorder:
        daemon = Daemon(trained.int8, broker, tmp_path, "env", _config("fw-env", username="faultwatch"),
                        address=broker.secure_address, env={"FAULTWATCH_MQTT_PASSWORD": secret})
        wait_answering(daemon, broker, recorder)
        assert _health(daemon)["connected"] is True
        assert secret not in _written_out(daemon)
        assert daemon.terminate() == 0
        assert secret not in daemon.log()


def test_a_refused_login_is_reported_retried_and_recovers_when_the_broker_accepts_it(trained, tmp_path):
    password_file = tmp_path / "mqtt-password"
    password_file.write_text("new-" + secrets.token_hex(8) + "\n")
    new_password = password_file.read_text().splitlines()[0]
    secure = SecureListener(users={"faultwatch": "old-" + secrets.token_hex(8)})
    broker = MosquittoBroker(tmp_path / "broker", secure=secure)
    with broker, PersistentRecorder(broker, ["faultwatch/#"], "fw-test-recorder") as recorder:
        config = _config("fw-file", username="faultwatch", password_file=str(password_file))
        daemon = Daemon(trained.int8, broker, tmp_path, "file", config, address=broker.secure_address)
        wait_for(lambda: "refused the connection" in daemon.log(), timeout=60, message=daemon.log)
        wait_for(lambda: daemon.metric("faultwatch_connect_refused_total") >= 2, timeout=30,
                 message=daemon.log)  # and it keeps trying, with backoff
        health = _health(daemon)
        assert health["connected"] is False and health["connection_error"].startswith("refused")
        assert daemon.get("/readyz")[0] == 503
        assert daemon.metric("faultwatch_connected") == 0
        assert "connected to" not in daemon.log()
        assert daemon.alive()

        secure.users = {"faultwatch": new_password}  # the broker's admin sets the password the daemon has
        broker.restart()
        wait_answering(daemon, broker, recorder)
        assert _health(daemon)["connected"] is True and daemon.metric("faultwatch_connected") == 1
        assert new_password not in _written_out(daemon)
        assert daemon.terminate() == 0


def test_tls_connects_with_the_brokers_ca_and_names_the_reason_when_it_cannot_trust_it(trained, tmp_path):
    ca, cert, key = make_tls_files(tmp_path / "tls", "plant")
    other_ca = make_tls_files(tmp_path / "other", "other")[0]
    broker = MosquittoBroker(tmp_path / "broker", secure=SecureListener(tls=(ca, cert, key)))
    with broker, MqttRecorder(broker.host, broker.port, ["faultwatch/#"]) as recorder:
        untrusting = Daemon(trained.int8, broker, tmp_path, "wrong-ca",
                            _config("fw-wrong-ca", tls_ca_file=str(other_ca)),
                            address=broker.secure_address)
        daemon = Daemon(trained.int8, broker, tmp_path, "tls", _config("fw-tls", tls_ca_file=str(ca)),
                        address=broker.secure_address)
        wait_answering(daemon, broker, recorder)
        assert _health(daemon)["connected"] is True

        wait_for(lambda: "TLS handshake failed" in untrusting.log(), timeout=60, message=untrusting.log)
        health = _health(untrusting)
        assert health["connected"] is False
        assert health["connection_error"].startswith("TLS handshake failed")
        assert "tls_ca_file" in health["connection_error"]  # says what to check
        assert untrusting.metric("faultwatch_connect_failures_total") >= 1
        assert untrusting.alive() and untrusting.terminate() == 0
        assert daemon.terminate() == 0
