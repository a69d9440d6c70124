"""The daemon's parts, without a broker: config, topics, payloads (property-based), frames,
outbox and fault journal, discovery, metrics, and the engine's device cap and hot swap."""

from __future__ import annotations

import json
import math
import re
import tomllib
from collections import Counter
from dataclasses import fields, is_dataclass

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from daemon_harness import renamed_feature_model
from faultwatch.runtime.cli import main as cli_main
from faultwatch.runtime.daemon import config as cfg
from faultwatch.runtime.daemon.discovery import discovery_messages, initial_fault_state, object_id
from faultwatch.runtime.daemon.frames import FrameAssembler
from faultwatch.runtime.daemon.metrics import Histogram, family
from faultwatch.runtime.daemon.outbox import FaultJournal, Outbox
from faultwatch.runtime.daemon.payload import (
    MAX_ABS_VALUE,
    REASONS,
    ForecastEncoder,
    PayloadError,
    forecast_message,
    parse_reading,
    parse_value,
)
from faultwatch.runtime.daemon.topics import TopicError, TopicMatcher, TopicTemplate
from faultwatch.runtime.devtools.simulator import simulate
from faultwatch.runtime.engine.engine import Engine, EngineSettings, Reading
from faultwatch.runtime.engine.model import StepModel
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

# -- config --------------------------------------------------------------------------------


def _leaves(obj, prefix: str = "") -> dict:
    out = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        if is_dataclass(value):
            out |= _leaves(value, f"{prefix}{f.name}.")
        else:
            out[f"{prefix}{f.name}"] = value
    return out


def test_example_config_is_every_option_at_its_default():
    text = cfg.example_config()
    assert cfg.parse_config(text) == cfg.Config()
    # ...and names every option: nothing left to its implicit default.
    raw = tomllib.loads(text)
    named = set()
    for key, value in raw.items():
        named |= {f"{key}.{sub}" for sub in value} if isinstance(value, dict) else {key}
    assert named == set(_leaves(cfg.Config()))


def test_every_bound_names_an_option_and_defaults_are_within_bounds():
    leaves = _leaves(cfg.Config())
    for key, (lo, hi) in cfg.BOUNDS.items():
        assert key in leaves, key
        assert lo <= leaves[key] <= hi, key
    numeric = {k for k, v in leaves.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    assert numeric - set(cfg.BOUNDS) == set(), "every number needs bounds"


@pytest.mark.parametrize(("text", "message"), [
    ("[input]\ntopik = 'x/{device}'", "unknown key 'input.topik'"),
    ("[engine]\nmax_devices = 0", "engine.max_devices = 0 is out of range"),
    ("[broker]\nreceive_maximum = 70000", "broker.receive_maximum"),
    ("[output]\nforecast_every = 'often'", "output.forecast_every must be int"),
    ("[input]\ntopic = ['a/{device}', 'a/{device}/{channel}', 'a/+/x']", "input.topic"),
    ("[input]\ntopic = 'a/{device}/b/{device}'", "{device}"),
    ("[input]\ntopic = 'a/pump-{device}'", "whole topic level"),
    ("[input]\ntopic = ['a/{device}/{channel}', 'a/{device}/raw']", "can match the same topic"),
    ("[input]\ntopic = 5", "input.topic must be"),
    ("[output]\nprefix = 'fw/#'", "output.prefix"),
    ("[metrics]\nlisten = 'localhost'", "metrics.listen"),
    ("[broker]\nreconnect_min_s = 60.0\nreconnect_max_s = 10.0", "reconnect_min_s"),
    ("[homeassistant]\ndiscovery = 'yes'", "homeassistant.discovery must be bool"),
    ("[broker]\ntls_cert_file = 'c.pem'", "tls_key_file"),
])
def test_bad_config_is_rejected_naming_the_key(text, message):
    with pytest.raises(cfg.ConfigError, match=re.escape(message)):
        cfg.validate(cfg.parse_config(text))


def test_topic_list_and_int_for_float_are_accepted():
    c = cfg.validate(cfg.parse_config(
        "[input]\ntopic = ['s/{device}', 's/{device}/{channel}']\n[engine]\nmax_latency_ms = 2\n"))
    assert c.topics == ["s/{device}", "s/{device}/{channel}"] and c.engine.max_latency_ms == 2.0


def test_check_config_cli(tmp_path, int8_model, capsys):
    good = tmp_path / "good.toml"
    good.write_text(f'model = "{int8_model}"\n[input]\ntopic = "plant/{{device}}/{{channel}}"\n')
    assert cli_main(["run", "--check-config", str(good)]) == 0
    out = capsys.readouterr().out
    assert "ok" in out and "plant/{device}/{channel}" in out
    bad = tmp_path / "bad.toml"
    bad.write_text(f'model = "{int8_model}"\n[engine]\nmax_batch = -1\n')
    assert cli_main(["run", "--check-config", str(bad)]) == 2
    assert "engine.max_batch" in capsys.readouterr().err
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"not a model")
    assert cli_main(["run", "--model", str(corrupt), "--check-config", "--config", str(good)]) == 2
    assert cli_main(["run", "--example-config"]) == 0
    assert cfg.parse_config(capsys.readouterr().out) == cfg.Config()


# -- topics --------------------------------------------------------------------------------


def test_topic_templates():
    m = TopicMatcher(["plant/{device}/json", "plant/{device}/ch/{channel}"])
    assert m.subscriptions == ["plant/+/json", "plant/+/ch/+"]
    assert m.match("plant/p1/json") == ("p1", None)
    assert m.match("plant/p1/ch/current") == ("p1", "current")
    for topic in ("plant/p1", "plant//json", "plant/p1/ch/", "other/p1/json", "plant/" + "x" * 200 + "/json"):
        assert m.match(topic) is None, topic
    assert TopicTemplate("{device}").match("p9") == ("p9", None)
    with pytest.raises(TopicError):
        TopicMatcher(["a/{device}", "a/+"])


# -- payloads (property-based) -------------------------------------------------------------

FEATURES = ("a", "b", "c")
json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=10**300, max_value=10**320),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
)
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=5), inner, max_size=4)), max_leaves=12)


def _dumps(obj) -> bytes:
    return json.dumps(obj, allow_nan=True).encode()


hostile_payloads = st.one_of(
    st.binary(max_size=300),  # mostly not UTF-8, not JSON
    st.dictionaries(st.sampled_from([*FEATURES, "ts", "x"]), json_values, max_size=5).map(_dumps),
    json_values.map(_dumps),
    st.integers(1, 30_000).map(lambda n: b'{"a": ' + b"[" * n + b"]" * n + b"}"),  # deep nesting
    st.integers(1, 3).map(lambda k: b'{"a": 1, "pad": "' + b"x" * (16_384 * k) + b'"}'),  # oversized
    st.text(max_size=50).map(lambda t: t.encode("utf-8", "surrogatepass")),
)


def _check_reading(payload: bytes) -> None:
    try:
        ts, values = parse_reading(payload, FEATURES, now=1_000.0)
    except PayloadError as exc:
        assert exc.reason in REASONS
        return
    assert math.isfinite(ts) and 0 <= ts < 1e11
    assert values.shape == (3,) and values.dtype == np.float64
    finite = np.isfinite(values)
    assert finite.any() and np.all(np.abs(values[finite]) <= MAX_ABS_VALUE)
    assert np.isnan(values[~finite]).all()  # missing is NaN, never inf


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hostile_payloads)
def test_parse_reading_accepts_only_finite_readings_and_names_every_rejection(payload):
    _check_reading(payload)


@settings(max_examples=500, deadline=None)
@given(st.dictionaries(st.sampled_from(FEATURES), st.floats(-1e12, 1e12) | st.none(), min_size=1),
       st.floats(0, 1e10) | st.none())
def test_parse_reading_round_trips_valid_readings(channels, ts):
    body = dict(channels) | ({} if ts is None else {"ts": ts})
    if all(v is None for v in channels.values()):
        with pytest.raises(PayloadError, match="no_channels"):
            parse_reading(_dumps(body), FEATURES, now=5.0)
        return
    got_ts, values = parse_reading(_dumps(body), FEATURES, now=5.0)
    assert got_ts == (5.0 if ts is None else ts)
    for i, name in enumerate(FEATURES):
        want = channels.get(name)
        assert (np.isnan(values[i]) if want is None else values[i] == want)


@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(hostile_payloads,
                 st.floats(allow_nan=True, allow_infinity=True).map(lambda v: repr(v).encode())))
def test_parse_value_accepts_only_one_finite_number(payload):
    try:
        ts, value = parse_value(payload, now=3.0)
    except PayloadError as exc:
        assert exc.reason in REASONS
        return
    assert math.isfinite(value) and abs(value) <= MAX_ABS_VALUE and math.isfinite(ts)


def test_forecast_encoder_matches_the_reference_encoding(int8_model):
    engine = Engine(StepModel(int8_model), EngineSettings())
    data = simulate(devices=2, steps=5, seed=1)
    data.values[0, 3, 2] = np.nan  # an imputed channel
    outs = [o for o in engine.process([Reading(d, ts, v) for ts, d, v, _ in data.rows()]) if o]
    enc = ForecastEncoder(engine.contract.targets)
    batch = enc.encode_batch(outs, engine.threshold)
    for out, message in zip(outs, batch, strict=True):
        assert message == forecast_message(out, engine.contract.targets, engine.threshold)
        body = json.loads(message)
        reference = {"ts": out.ts, "score": round(out.score, 6), "anomalous": out.anomalous,
                     "fault": out.fault_active, "imputed": list(out.imputed),
                     "forecast": {k: round(float(v), 6) for k, v in zip(engine.contract.targets,
                                                                       out.forecast, strict=True)}}
        assert {k: body[k] for k in reference} == reference
    assert any(json.loads(m)["imputed"] == ["current"] for m in batch)


# -- frames --------------------------------------------------------------------------------


def test_frame_assembler_completes_times_out_and_supersedes():
    fa = FrameAssembler(n_features=3, tolerance_s=0.5, max_wait_s=1.0, max_pending=100)
    assert fa.add("p", 0, 10.0, 1.0, "m1", now=0.0) == []
    assert fa.add("p", 2, 10.1, 3.0, "m2", now=0.1) == []
    (done,) = fa.add("p", 1, 10.2, 2.0, "m3", now=0.2)
    assert (done.how, done.ts, done.values.tolist(), done.acks) == ("complete", 10.0, [1.0, 2.0, 3.0],
                                                                   ["m1", "m2", "m3"])
    # The same channel again, or a later sample, closes the open frame first.
    fa.add("p", 0, 11.0, 1.0, "m4", now=1.0)
    (old,) = fa.add("p", 0, 12.0, 1.5, "m5", now=1.1)
    assert old.how == "superseded" and old.values[0] == 1.0 and np.isnan(old.values[1:]).all()
    (old,) = fa.add("p", 1, 13.0, 2.5, "m6", now=1.2)  # ts 13 is beyond the tolerance of 12
    assert old.how == "superseded" and old.ts == 12.0
    assert fa.next_deadline() == pytest.approx(2.2)
    assert fa.expire(now=2.1) == []
    (late,) = fa.expire(now=2.2)
    assert late.how == "timeout" and late.acks == ["m6"]
    assert len(fa) == 0 and fa.counters == Counter(complete=1, superseded=2, timeout=1)


def test_frame_assembler_stays_bounded_under_a_flood_of_device_ids():
    fa = FrameAssembler(n_features=8, tolerance_s=0.5, max_wait_s=60.0, max_pending=1000)
    closed = 0
    for i in range(100_000):
        closed += len(fa.add(f"intruder-{i}", i % 8, 1.0, 0.5, None, now=i * 1e-4))
        assert len(fa) <= 1000
    assert closed == fa.counters["evicted"] == 99_000


# -- engine: the device cap and the hot swap ------------------------------------------------


def test_engine_stays_within_its_device_cap_under_100k_device_ids(int8_model):
    engine = Engine(StepModel(int8_model), EngineSettings(max_devices=500))
    row = simulate(devices=1, steps=1, seed=3).values[0, 0]
    for start in range(0, 100_000, 5000):
        engine.process([Reading(f"flood-{i}", 1_700_000_000.0, row) for i in range(start, start + 5000)])
        assert len(engine.table.slots) <= 500 and engine.capacity <= 500
        assert all(len(a) <= 500 for a in engine.per_device.arrays.values())
    assert engine.counters["devices_evicted"] == 99_500
    assert len(engine.device_of_slot) <= 500


def _readings(data, steps: slice) -> list[Reading]:
    return [Reading(d, float(data.timestamps[k]), data.values[i, k].copy())
            for k in range(*steps.indices(len(data.timestamps))) for i, d in enumerate(data.devices)]


def test_engine_swap_with_the_same_contract_keeps_state(trained):
    data = simulate(devices=2, steps=80, seed=5)
    a = Engine(StepModel(trained.int8))
    a.process(_readings(data, slice(0, 60)))
    assert a.swap_model(StepModel(trained.fp32)) is True
    # Same as an fp32 engine that carried the int8 engine's state from the swap on.
    b = Engine(StepModel(trained.fp32))
    b.import_state(Engine.export_state(a))
    out_a, out_b = a.process(_readings(data, slice(60, 80))), b.process(_readings(data, slice(60, 80)))
    for x, y in zip(out_a, out_b, strict=True):
        np.testing.assert_allclose(x.forecast, y.forecast, rtol=1e-6, atol=1e-6)
        assert x.score == pytest.approx(y.score) and x.score > 0  # no warm-up: the scorer went on
    assert a.model.sha256 == b.model.sha256


def test_engine_swap_with_another_contract_starts_over_keeping_devices(trained, tmp_path):
    other = renamed_feature_model(trained.int8, tmp_path / "renamed.onnx")
    data = simulate(devices=2, steps=80, seed=6)
    a = Engine(StepModel(trained.int8))
    a.process(_readings(data, slice(0, 60)))
    last_ts = {d: a.per_device["last_ts"][a.table.slots[d]] for d in data.devices}
    assert a.swap_model(StepModel(other)) is False
    assert a.devices == list(data.devices)
    assert {d: a.per_device["last_ts"][a.table.slots[d]] for d in data.devices} == last_ts
    assert not a.per_device["has_prev"][: a.capacity].any()
    assert (a.stepper.decider.scorer.seen[: a.capacity] == 0).all()
    # A redelivered reading is still recognised...
    assert a.process(_readings(data, slice(59, 60))) == [None, None]
    # ...and the next ones run as on a fresh engine with the new model.
    fresh = Engine(StepModel(other))
    for x, y in zip(a.process(_readings(data, slice(60, 70))), fresh.process(_readings(data, slice(60, 70))),
                    strict=True):
        np.testing.assert_array_equal(x.forecast, y.forecast)


# -- outbox and fault journal ----------------------------------------------------------------


class FakeClient:
    """Records publishes; ``up`` says whether it is connected."""

    def __init__(self) -> None:
        self.up = True
        self.sent: list[tuple[str, bytes, int, bool]] = []
        self.infos: list[mqtt.MQTTMessageInfo] = []

    def is_connected(self) -> bool:
        return self.up

    def publish(self, topic, payload, qos=0, retain=False):
        info = mqtt.MQTTMessageInfo(len(self.infos) + 1)
        if not self.up:
            info.rc = mqtt.MQTT_ERR_NO_CONN
            if qos == 0:
                return info
        self.sent.append((topic, payload, qos, retain))
        self.infos.append(info)
        return info


def test_outbox_keeps_order_while_disconnected_and_bounds_forecasts(tmp_path):
    client = FakeClient()
    box = Outbox(client, max_held=3, journal=FaultJournal(tmp_path / "outbox.jsonl", 100))
    box.publish("f/1", b"1")
    client.up = False
    box.publish_many(["f/2", "f/3"], [b"2", b"3"])
    box.publish("fault/x", b"raised", qos=1, retain=True, droppable=False, journal=True)
    box.publish_many(["f/4", "f/5"], [b"4", b"5"])  # f/5 is one forecast too many
    box.publish("fault/x", b"cleared", qos=1, retain=True, droppable=False, journal=True)
    assert [t for t, *_ in client.sent] == ["f/1"] and len(box) == 5
    assert box.counters["outbox_full"] == 1
    client.up = True
    box.publish_many(["f/6"], [b"6"])  # newer than what waited: goes after it
    assert [p for _, p, *_ in client.sent] == [b"1", b"2", b"3", b"raised", b"4", b"cleared", b"6"]
    assert client.sent[3][2:] == (1, True)


def test_fault_journal_survives_a_crash_until_the_broker_acknowledges(tmp_path):
    path = tmp_path / "outbox.jsonl"
    journal = FaultJournal(path, max_entries=100)
    client = FakeClient()
    client.up = False
    box = Outbox(client, max_held=10, journal=journal)
    box.publish("fw/p1/fault", b'{"state": "raised"}', qos=1, retain=True, droppable=False, journal=True)
    journal.sync()
    with path.open("a") as f:
        f.write('{"topic": "torn')  # a crash in the middle of a line
    # A new process: the journal sends what the broker never acknowledged, first.
    client2 = FakeClient()
    journal2 = FaultJournal(path, max_entries=100)
    box2 = Outbox(client2, max_held=10, journal=journal2)
    assert journal2.counters["journal_bad_lines"] == 1
    box2.publish("fw/p1/forecast", b"{}")
    assert client2.sent[0] == ("fw/p1/fault", b'{"state": "raised"}', 1, True)
    assert len(journal2.entries) == 1
    client2.infos[0]._set_as_published()  # PUBACK
    journal2.prune()
    assert journal2.entries == {} and not path.exists()


# -- discovery and metrics -------------------------------------------------------------------


def test_discovery_messages_describe_both_entities():
    messages = dict(discovery_messages("pump-7", "fw", "ha", scores=True, model="m.onnx"))
    fault = json.loads(messages["ha/binary_sensor/faultwatch_fw_pump-7/fault/config"])
    score = json.loads(messages["ha/sensor/faultwatch_fw_pump-7/anomaly_score/config"])
    assert fault["state_topic"] == "fw/pump-7/fault" and fault["device_class"] == "problem"
    assert score["state_topic"] == "fw/pump-7/forecast" and "score" in score["value_template"]
    for body in (fault, score):
        assert body["availability"][0]["topic"] == "fw/status"
        assert body["device"]["identifiers"] == ["faultwatch_fw_pump-7"]
    assert fault["unique_id"] != score["unique_id"]
    assert len(discovery_messages("pump-7", "fw", "ha", scores=False)) == 1
    assert object_id("a b") != object_id("a_b")  # sanitised ids never collide
    # Two sites (output prefixes) on one Home Assistant: neither topics nor unique ids collide.
    other = dict(discovery_messages("pump-7", "site-b/fw", "ha", scores=True))
    assert not set(other) & set(messages)
    assert {json.loads(b)["unique_id"] for b in other.values()}.isdisjoint(
        json.loads(b)["unique_id"] for b in messages.values())
    assert json.loads(initial_fault_state("pump-7"))["state"] == "ok"


def test_metrics_text_format():
    h = Histogram((1.0, 10.0))
    h.observe(np.array([0.5, 5.0, 50.0]))
    h.observe_one(1.0)
    lines = h.render("x", "help") + family("y_total", "counter", "y", [({"reason": 'a"b'}, 3)])
    assert 'x_bucket{le="1.0"} 2' in lines and 'x_bucket{le="+Inf"} 4' in lines
    assert "x_count 4" in lines and 'y_total{reason="a\\"b"} 3' in lines
