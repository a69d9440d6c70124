"""The daemon's seams, without a broker or a model: the MQTT transport chosen in config (and its
fallback), intake of typed inbox items, and /metrics and stats rendered from one snapshot."""

from __future__ import annotations

import logging
from collections import Counter
from types import SimpleNamespace

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from faultwatch.runtime.daemon import config as cfg
from faultwatch.runtime.daemon.daemon_metrics import render
from faultwatch.runtime.daemon.inbox import ChannelItem, OtherPartitionItem, ReadingItem, RejectItem
from faultwatch.runtime.daemon.intake import Intake
from faultwatch.runtime.daemon.metrics import BATCH_BUCKETS, Histogram
from faultwatch.runtime.daemon.mqtt.mqttclient import BufferedClient
from faultwatch.runtime.daemon.mqtt.transport import StockClient, make_client, missing_hooks
from faultwatch.runtime.daemon.observability import StatsSnapshot

# -- transport -------------------------------------------------------------------------------


def test_the_installed_paho_has_every_hook_the_fast_client_needs():
    assert missing_hooks() == []
    assert type(make_client("fast", "t")) is BufferedClient


def test_paho_client_uses_manual_acks_through_the_public_api():
    client = make_client("paho", "t")
    assert type(client) is StockClient and client.kind == "paho"
    assert client._manual_ack  # set through manual_ack_set(True)
    with client.batch() as inside:
        assert inside is client
    assert client.backlog() == 0


def test_fast_client_falls_back_to_paho_with_one_warning_when_a_hook_is_missing(monkeypatch, caplog):
    monkeypatch.delattr(mqtt.Client, "_handle_publish")
    with caplog.at_level(logging.WARNING, logger="faultwatch"):
        client = make_client("fast", "t")
    assert type(client) is StockClient
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "_handle_publish" in warnings[0]


def test_broker_client_is_checked():
    config = cfg.parse_config('[broker]\nclient = "paho"\n')
    assert cfg.validate(config).broker.client == "paho"
    with pytest.raises(cfg.ConfigError, match=r"broker\.client"):
        cfg.validate(cfg.parse_config('[broker]\nclient = "turbo"\n'))


# -- intake ----------------------------------------------------------------------------------


def _intake(features=("a", "b")) -> tuple[Intake, Counter]:
    counters: Counter = Counter()
    contract = SimpleNamespace(features=features, sample_period_s=1.0)
    return Intake(cfg.Config(), contract, counters), counters  # type: ignore[arg-type]


def test_intake_turns_items_into_readings_and_acks_every_qos1_message():
    intake, counters = _intake()
    features = intake.features
    batch = [
        ReadingItem("p1", 10.0, np.array([1.0, 2.0]), features, mid=1, qos=1, received=5.0),
        ChannelItem("p2", 10.0, 3.0, "a", mid=2, qos=1, received=5.1),
        ChannelItem("p2", 10.0, 4.0, "b", mid=3, qos=0, received=5.2),  # completes p2's frame
        ChannelItem("p3", 10.0, 4.0, "nope", mid=4, qos=1, received=5.3),  # not a model channel
        RejectItem("bad_json", mid=5, qos=1),
        OtherPartitionItem(mid=6, qos=1),
        OtherPartitionItem(mid=7, qos=0),
    ]
    got = intake.collect(batch)
    assert [(r.device, r.ts, r.values.tolist()) for r in got.readings] == [
        ("p1", 10.0, [1.0, 2.0]), ("p2", 10.0, [3.0, 4.0])]
    assert got.received == [5.0, 5.1]
    assert sorted(got.acks) == [1, 2, 4, 5, 6]  # QoS 0 messages are never acknowledged
    assert counters == Counter(ignored_channel=1, rejected_bad_json=1, other_partition=2)


def test_a_reading_parsed_for_the_previous_model_is_put_in_this_models_order():
    intake, _ = _intake(("b", "c", "a"))
    old = ("a", "b")
    got = intake.collect([ReadingItem("p1", 1.0, np.array([1.0, 2.0]), old, 9, 1, 0.0)])
    values = got.readings[0].values
    assert values[:1].tolist() == [2.0] and np.isnan(values[1]) and values[2] == 1.0


# -- observability ---------------------------------------------------------------------------


def _snapshot(**changes) -> StatsSnapshot:
    fields = dict(
        network={"received": 7, "connects": 1}, counters={"processed": 5, "rejected_bad_json": 2},
        engine={"steps": 3}, frames={"complete": 1}, outbox={"outbox_full": 4}, devices=2, queue=1,
        open_frames=0, outbox_depth=0, journal_pending=0, faults_active=1, connected=True,
        model_sha256="ab" * 32, quantization="int8", features=7, uptime_s=12.5, devices_max=10,
        per_device_max=100, last_seen={"p1": 1.0, "p2": 2.0},
    )
    return StatsSnapshot(**(fields | changes))  # type: ignore[arg-type]


def test_stats_message_comes_from_the_snapshot():
    assert _snapshot().as_stats() == {
        "received": 7, "connects": 1, "processed": 5, "rejected_bad_json": 2, "engine_steps": 3,
        "frames_complete": 1, "outbox_full": 4, "devices": 2, "queue": 1}


def test_metrics_come_from_the_snapshot():
    sizes = Histogram(BATCH_BUCKETS)
    sizes.observe(np.array([1.0, 3.0]))
    text = render(_snapshot(batch_sizes=sizes))
    for line in ("faultwatch_readings_received_total 7", "faultwatch_readings_processed_total 5",
                 'faultwatch_readings_dropped_total{reason="bad_json"} 2',
                 'faultwatch_readings_dropped_total{reason="outbox_full"} 4',
                 "faultwatch_faults_active 1", "faultwatch_connected 1", "faultwatch_devices 2",
                 "faultwatch_step_batch_size_count 2", 'faultwatch_device_staleness_seconds{device="p2"}'):
        assert line in text
    # Beyond metrics.per_device_max devices: only the summary over all of them.
    assert "faultwatch_device_staleness_seconds{" not in render(_snapshot(per_device_max=1))
