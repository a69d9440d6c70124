"""Scale-out: two daemons read the same topics, each steps the devices of its own partition.

Every reading is answered exactly once, by the daemon that owns its device, with the same
forecast one daemon alone would give; each acknowledges the others' readings (counted) and
has its own availability topic, which Home Assistant follows for the devices it owns.
Real Mosquitto, real model, subprocess.
"""

from __future__ import annotations

import json
from collections import Counter

from daemon_harness import (
    Daemon,
    Publisher,
    answered,
    as_readings,
    expected_messages,
    forecasts,
    kill_daemons_at_teardown,  # noqa: F401 (the fixture, for this module)
    readings_of,
)
from faultwatch.runtime.daemon.topics import device_partition
from faultwatch.runtime.devtools.simulator import simulate
from faultwatch.runtime.engine.engine import Engine, EngineSettings
from faultwatch.runtime.engine.model import StepModel
from helpers import MqttRecorder, wait_for

PARTITIONS = 2


def _config(partition: int, tmp_path) -> dict:
    return {
        "state_dir": str(tmp_path / f"state-{partition}"),
        "input": {"topic": "sensors/{device}", "partitions": PARTITIONS, "partition": partition},
        "output": {"stats_interval_s": 0.3, "forecast_qos": 1},
        "engine": {"max_batch": 1},
        "metrics": {"listen": "127.0.0.1:0"},
        "broker": {"client_id": f"fw-part-{partition}"},
    }


def _stats(recorder: MqttRecorder, partition: int) -> dict:
    published = recorder.messages(f"faultwatch/stats/{partition}")
    return json.loads(published[-1].payload) if published else {}


def test_each_device_is_stepped_once_by_the_daemon_of_its_partition(broker, trained, tmp_path):
    data = simulate(devices=8, steps=6, seed=43)
    rows = readings_of(data)
    owner = {d: device_partition(d, PARTITIONS) for d in data.devices}
    assert set(owner.values()) == set(range(PARTITIONS))  # both daemons have work
    mine = Counter(owner[d] for d, _, _ in rows)

    with MqttRecorder(broker.host, broker.port, ["faultwatch/#", "homeassistant/#"]) as recorder:
        daemons = [Daemon(trained.int8, broker, tmp_path, f"part-{p}", _config(p, tmp_path))
                   for p in range(PARTITIONS)]

        def online() -> bool:
            return all(any(m.payload == b"online" for m in recorder.messages(f"faultwatch/status/{p}"))
                       for p in range(PARTITIONS))

        wait_for(online, timeout=90, message=lambda: "\n".join(d.log() for d in daemons))
        assert not recorder.messages("faultwatch/status")  # no shared status topic to fight over
        publisher = Publisher(broker)
        publisher.send_readings(rows)
        publisher.wait()
        wanted = {(d, ts) for d, ts, _ in rows}
        wait_for(lambda: wanted <= answered(recorder.messages()), timeout=90,
                 message=lambda: "\n".join(d.log() for d in daemons))

        # Each stepped exactly its own devices' readings and acknowledged the others'.
        def counted() -> list[tuple[int, int]]:
            stats = [_stats(recorder, p) for p in range(PARTITIONS)]
            return [(s.get("engine_readings", 0), s.get("other_partition", 0)) for s in stats]

        expected = [(mine[p], len(rows) - mine[p]) for p in range(PARTITIONS)]
        wait_for(lambda: counted() == expected, timeout=30, message=lambda: f"{counted()} != {expected}")
        for daemon in daemons:
            assert daemon.metric("faultwatch_other_partition_total") > 0
            assert daemon.terminate() == 0

    # Exactly once, and what one daemon alone computes (each device's state lives in one place).
    published = [(d, body) for d, body in forecasts(recorder.messages()) if d in owner]
    assert Counter((d, body["ts"]) for d, body in published) == Counter({key: 1 for key in wanted})
    engine = Engine(StepModel(trained.int8), EngineSettings(max_batch=1))
    outputs = engine.process(as_readings(rows))
    reference = expected_messages(outputs, engine.contract.targets, engine.threshold)
    for device, body in published:
        assert body == reference[(device, body["ts"])]

    # Home Assistant: a device is available while the daemon that owns it is.
    for device, p in owner.items():
        topics = f"homeassistant/+/faultwatch_{device}/+/config"
        configs = [json.loads(m.payload) for m in recorder.messages(topics)]
        assert configs and all(c["availability"][0]["topic"] == f"faultwatch/status/{p}" for c in configs)
