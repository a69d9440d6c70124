"""Bounds on what a sender controls, against the running daemon: Home Assistant discovery
under a flood of device IDs, withdrawing a device, a device evicted with its fault raised,
retained readings and commands at reconnects, two daemons on one client_id.
Real Mosquitto, real model, subprocess."""

from __future__ import annotations

import json
import re
from datetime import datetime

from daemon_harness import (
    Daemon,
    PersistentRecorder,
    Publisher,
    forecasts,
    kill_daemons_at_teardown,  # noqa: F401 (the fixture, for this module)
    payload,
    readings_of,
    wait_answering,
)
from faultwatch.runtime.devtools.simulator import Fault, simulate
from helpers import MqttRecorder, Received, wait_for


def _config(client_id: str, **extra) -> dict:
    config = {
        "broker": {"client_id": client_id, "reconnect_min_s": 0.2, "reconnect_max_s": 1.0},
        "output": {"stats_interval_s": 0.0, "forecast_qos": 1},
        "engine": {"max_batch": 64},
        "metrics": {"listen": ""},
    }
    for section, values in extra.items():
        config[section] = config.get(section, {}) | values if isinstance(values, dict) else values
    return config


def final_stats(daemon: Daemon) -> list[dict]:
    """The counters of each clean exit of ``daemon`` (its ``stopping:`` log lines), in order."""
    return [json.loads(s) for s in re.findall(r"stopping: (\{.*\})", daemon.log())]


def retained_now(broker, topic_filter: str) -> list[Received]:
    """What a new subscriber gets, retained, on ``topic_filter``."""
    with MqttRecorder(broker.host, broker.port, [topic_filter, "fw-test/end"]) as late:
        marker = Publisher(broker)  # published after the SUBACK: it arrives after the retained ones
        marker.send("fw-test/end", b"x")
        marker.close()
        wait_for(lambda: late.messages("fw-test/end"), timeout=30, message="no end marker")
        return [m for m in late.messages(topic_filter) if m.retain]


def test_a_flood_of_device_ids_announces_within_the_cap_and_a_restart_announces_nothing(
        broker, trained, tmp_path):
    row = simulate(steps=1, seed=81).values[0, 0]
    config = _config("fw-ha-flood", state_dir=str(tmp_path / "state"),
                     homeassistant={"max_devices": 100, "announce_per_s": 1000.0})
    with MqttRecorder(broker.host, broker.port, ["homeassistant/#", "faultwatch/#"]) as recorder:
        daemon = Daemon(trained.int8, broker, tmp_path, "daemon", config)
        wait_answering(daemon, broker, recorder)
        publisher = Publisher(broker)
        for i in range(2000):
            publisher.send(f"sensors/intruder-{i}", payload(1_700_000_000.0, row))
        publisher.wait(timeout=120)
        wait_for(lambda: len(recorder.messages("homeassistant/#")) >= 200, timeout=120, message=daemon.log)
        wait_for(lambda: {d for d, _ in forecasts(recorder.messages())} >= {"intruder-1999"}, timeout=120,
                 message=daemon.log)
        assert daemon.terminate() == 0
        (first,) = final_stats(daemon)
        assert first["discovery_announced"] == 100 and first["discovery_capped"] == 1901  # 2000 + probe
        configs = retained_now(broker, "homeassistant/#")
        assert len(configs) == 200  # two per device: fault and anomaly score
        before = len(recorder.messages("homeassistant/#"))

        daemon.start()  # the announced set is in the state dir: nothing is announced again
        wait_answering(daemon, broker, recorder)
        for i in range(50):
            publisher.send(f"sensors/intruder-{i}", payload(1_700_000_001.0, row))
        publisher.send("sensors/latecomer", payload(1_700_000_001.0, row))
        publisher.wait()
        wait_for(lambda: {d for d, _ in forecasts(recorder.messages())} >= {"latecomer"}, timeout=60,
                 message=daemon.log)
        assert daemon.terminate() == 0
        publisher.close()
    assert len(recorder.messages("homeassistant/#")) == before
    assert final_stats(daemon)[-1].get("discovery_announced", 0) == 0
    assert len(retained_now(broker, "homeassistant/#")) == 200


def test_forget_withdraws_a_device_only_while_commands_are_enabled(broker, trained, tmp_path):
    row = simulate(steps=1, seed=82).values[0, 0]
    seeder = Publisher(broker)  # an old raised fault, retained at the broker
    old = seeder.client.publish("faultwatch/pump-x/fault", b'{"state": "raised"}', qos=1, retain=True)
    old.wait_for_publish(10)
    mine = ("homeassistant/+/faultwatch_pump-x/#", "faultwatch/pump-x/fault")

    def held() -> list[Received]:
        return [m for f in mine for m in retained_now(broker, f)]

    with MqttRecorder(broker.host, broker.port, ["faultwatch/#", "homeassistant/#"]) as recorder:
        off = Daemon(trained.int8, broker, tmp_path, "off", _config("fw-forget-off"))
        wait_answering(off, broker, recorder)
        seeder.send("sensors/pump-x", payload(1_700_000_000.0, row))
        wait_for(lambda: len(recorder.messages("homeassistant/+/faultwatch_pump-x/#")) == 2, timeout=60,
                 message=off.log)
        seeder.send("faultwatch/command/forget", b"pump-x")
        seeder.send("sensors/pump-x", payload(1_700_000_001.0, row))  # answered after the command
        wait_for(lambda: any(d == "pump-x" and b["ts"] == 1_700_000_001.0
                             for d, b in forecasts(recorder.messages())),
                 timeout=60, message=off.log)
        assert len(held()) == 3  # commands off: nothing withdrawn
        assert off.terminate() == 0

        on = Daemon(trained.int8, broker, tmp_path, "on", _config("fw-forget-on", commands={"enabled": True}))
        wait_for(lambda: "session present" in on.log(), timeout=60, message=on.log)
        wait_answering(on, broker, recorder)
        seeder.send("faultwatch/command/forget", b"pump-x")
        wait_for(lambda: held() == [], timeout=60, message=on.log)
        assert "forgot device pump-x" in on.log()
        assert len(retained_now(broker, "homeassistant/+/faultwatch_probe/#")) == 2  # the others stay
        seeder.send("faultwatch/command/forget", b"no-such-device")
        assert on.terminate() == 0
        seeder.close()


def test_a_device_evicted_with_a_fault_raised_is_cleared(broker, trained, tmp_path):
    fault = Fault("valve_closure", "pump-000", start=200, duration=60)
    data = simulate(devices=1, steps=300, seed=22, faults=[fault])
    config = _config("fw-evict", engine={"max_devices": 2, "detector": {"clear_m": 1000}},
                     homeassistant={"discovery": False})
    with MqttRecorder(broker.host, broker.port, ["faultwatch/#"]) as recorder:
        daemon = Daemon(trained.int8, broker, tmp_path, "daemon", config)
        wait_answering(daemon, broker, recorder)
        publisher = Publisher(broker)
        publisher.send_readings(readings_of(data))
        wait_for(lambda: recorder.messages("faultwatch/pump-000/fault"), timeout=120, message=daemon.log)
        row = data.values[0, 0]
        publisher.send("sensors/newcomer-1", payload(1_700_000_000.0, row))  # evicts the probe
        publisher.send("sensors/newcomer-2", payload(1_700_000_000.0, row))  # evicts pump-000
        # (Failed once in a full run on a loaded machine, not reproduced since: on a timeout the
        # daemon is stopped first, so the log ends with its counters.)
        wait_for(lambda: len(recorder.messages("faultwatch/pump-000/fault")) == 2, timeout=60,
                 message=daemon.stopped_log)
        assert daemon.terminate() == 0
        publisher.close()
    raised, cleared = (json.loads(m.payload) for m in recorder.messages("faultwatch/pump-000/fault"))
    assert raised["state"] == "raised" and "reason" not in raised
    assert cleared["state"] == "cleared" and cleared["reason"] == "evicted"
    assert cleared["started_ts"] == raised["ts"]
    (state,) = retained_now(broker, "faultwatch/pump-000/fault")
    assert json.loads(state.payload)["state"] == "cleared"


def test_retained_readings_and_commands_are_not_replayed_at_reconnects(broker, trained, tmp_path):
    row = simulate(steps=1, seed=83).values[0, 0]
    seeder = Publisher(broker)
    seeder.client.publish("sensors/retained-pump", payload(1_700_000_000.0, row), qos=1,
                          retain=True).wait_for_publish(10)
    seeder.client.publish("faultwatch/command/reload", b"", qos=1, retain=True).wait_for_publish(10)
    seeder.close()
    config = _config("fw-retained", reload={"min_interval_s": 0.0}, commands={"enabled": True},
                     homeassistant={"discovery": False})
    with PersistentRecorder(broker, ["faultwatch/#"], "fw-retained-recorder") as recorder:
        daemon = Daemon(trained.int8, broker, tmp_path, "daemon", config)
        wait_answering(daemon, broker, recorder)
        broker.restart()  # the daemon reconnects to its session and subscribes again
        wait_for(lambda: daemon.log().count("session present: True") >= 1, timeout=60, message=daemon.log)
        wait_answering(daemon, broker, recorder)
        assert daemon.terminate() == 0
        daemon.start()  # and again after its own restart
        wait_for(lambda: daemon.log().count("session present: True") >= 2, timeout=60, message=daemon.log)
        wait_answering(daemon, broker, recorder)
        assert daemon.terminate() == 0
    runs = final_stats(daemon)
    stepped = [b for d, b in forecasts(recorder.messages()) if d == "retained-pump"]
    assert len(stepped) <= 1 and sum(s.get("dropped_out_of_order", 0) for s in runs) == 0
    assert sum(s.get("reload_commands", 0) for s in runs) <= 1


def test_two_daemons_on_one_client_id_report_the_takeover_and_back_off(broker, trained, tmp_path):
    config = _config("fw-twin", broker={"client_id": "fw-twin", "reconnect_min_s": 0.2,
                                        "reconnect_max_s": 2.0})
    a = Daemon(trained.int8, broker, tmp_path, "a", config)
    b = Daemon(trained.int8, broker, tmp_path, "b", config)
    # Mosquitto 2.0.11 closes the old connection without a DISCONNECT (142): the daemon tells
    # by a connection closed soon after connecting, again and again.
    takeover = re.compile(r"session take.*reason code 142.*broker\.client_id 'fw-twin'.* Reconnecting in "
                          r"([\d.]+) s")
    wait_for(lambda: len(takeover.findall(a.log())) >= 4 or len(takeover.findall(b.log())) >= 4,
             timeout=120, message=lambda: a.log() + b.log())
    for daemon in (a, b):
        delays = [float(d) for d in takeover.findall(daemon.log())]
        assert delays == sorted(delays), delays  # backing off, not storming...
        for waited, delay in _waits(daemon.log(), takeover):
            assert waited >= 0.9 * delay, (waited, delay, daemon.log())  # ...and it did wait
    assert _waits(a.log(), takeover) or _waits(b.log(), takeover)
    longest = max(takeover.findall(a.log()) + takeover.findall(b.log()), key=float)
    assert float(longest) >= 1.6
    assert a.terminate() == 0 and b.terminate() == 0


def _waits(log: str, takeover: re.Pattern) -> list[tuple[float, float]]:
    """(seconds from a takeover line to the next connect, the delay it announced) in ``log``."""
    stamp = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")
    out, pending = [], None
    for line in log.splitlines():
        found = stamp.match(line)
        if not found:
            continue
        at = datetime.strptime(found.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        delay = takeover.search(line)
        if delay:
            pending = (at, float(delay.group(1)))
        elif pending and "connected to " in line:
            out.append((at - pending[0], pending[1]))
            pending = None
    return out
