"""``faultwatch demo``: the whole path in well under a minute, with real parts.

    make demo                          # or: faultwatch demo [--seed N] [--workdir DIR]

1. simulate an hour of normal readings of four pumps (``history.csv``);
2. train a small LSTM forecaster on it and export it as one int8 ONNX file;
3. start a private Mosquitto on a free loopback port, and the daemon
   (``faultwatch run``) as a real subprocess connected to it;
4. stream the pumps' next readings through the broker, faster than real time,
   with a valve closure on one pump and bearing wear on another (the other
   two stay clean), printing every fault the daemon raises or clears;
5. stop the daemon with SIGTERM, then compare what was injected with what was
   detected: delays, false alarms, and whether every reading got a forecast.

Exit 0 when every injected fault was detected, every reading answered and the
daemon stopped cleanly; 1 otherwise (the last line says what failed); 2 when
Mosquitto is not installed.
"""

from __future__ import annotations

import json
import queue
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
from faultwatch.runtime.daemon.payload import encode_reading
from faultwatch.runtime.devtools.broker import BrokerUnavailable, MosquittoBroker, find_mosquitto
from faultwatch.runtime.devtools.daemon_process import DaemonError, DaemonProcess
from faultwatch.runtime.devtools.sim_publish import publish
from faultwatch.runtime.devtools.simulator import CHANNELS, Fault, SimData, simulate, write_csv

PUMPS = 4
HISTORY_STEPS = 3600  # one hour at 1 reading/s: the normal history the model learns from
LIVE_STEPS = 750  # readings per pump streamed through the broker
STEPS_PER_S = 50.0  # live stream pace: 50 steps/s × 4 pumps = 200 readings/s (50× real time)
# (kind, pump, start, duration, severity); start in readings from the beginning of the live stream.
# Valve closure shows at once (flow −60 %). Bearing wear grows linearly from nothing over its
# window (to +0.12 g vibration and +10 °C at severity 2), so it is caught once it has risen above
# the noise: over seeds 0-25, 46-84 readings in, while clean pumps peaked at 0.72-0.94× the
# threshold (at severity 1 it was caught only 97-148 readings into its 200).
INJECTED = (
    ("valve_closure", "pump-001", 150, 120, 1.0),
    ("bearing_wear", "pump-002", 400, 200, 2.0),
)
# A fault still flagged this many readings after its window (the model's state catching up with
# the pump) belongs to the fault; a raise anywhere else is a false alarm.
SETTLE_READINGS = 30
HIDDEN, DENSE, EPOCHS = (32, 16), 16, 40
TOPIC_IN, PREFIX, PROBE = "sensors/{device}", "faultwatch", "demo-probe"

DAEMON_CONFIG = f"""\
# Written by `faultwatch demo`. Model and broker come from the command line.
log_level = "INFO"
[broker]
client_id = "faultwatch-demo"
[input]
topic = "{TOPIC_IN}"
[output]
prefix = "{PREFIX}"
forecast_qos = 1        # the demo counts forecasts: none may be dropped on the way
stats_interval_s = 5.0
[metrics]
listen = ""             # off: a daemon already running on this machine may hold the default port
"""


class _Clock:
    def __init__(self) -> None:
        self.start = time.monotonic()

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.start:5.1f}s] {text}", flush=True)


class _Listener:
    """Subscribes to the daemon's outputs; the main thread drains :attr:`inbox`."""

    def __init__(self, host: str, port: int, timeout: float = 30.0) -> None:
        self.inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="faultwatch-demo-viewer",
                                  protocol=mqtt.MQTTv5)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *args: self.subscribed.set()
        self.client.on_message = lambda c, u, msg: self.inbox.put((msg.topic, bytes(msg.payload)))
        self.client.connect(host, port, keepalive=30)
        self.client.loop_start()
        if not self.subscribed.wait(timeout):
            self.close()
            raise RuntimeError(f"no SUBACK from the broker at {host}:{port} within {timeout:g} s")

    @staticmethod
    def _on_connect(client, userdata, flags, reason_code, properties) -> None:
        if not reason_code.is_failure:  # subscribing here renews it after a reconnect
            client.subscribe([(f"{PREFIX}/+/fault", 1), (f"{PREFIX}/+/forecast", 1),
                              (f"{PREFIX}/status", 1)])

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@dataclass
class _Watch:
    """What the daemon said, as the demo's viewer saw it."""

    stream_ts0: float
    period_s: float
    warmup: int
    published: int = 0  # readings the broker acknowledged
    status: list[str] = field(default_factory=list)
    forecasts: Counter = field(default_factory=Counter)  # device → forecasts received
    peak: dict = field(default_factory=dict)  # device → peak score / threshold after warm-up
    unreadable: int = 0
    events: list[tuple[str, str, int, dict]] = field(default_factory=list)  # device, state, k, body

    def reading_index(self, ts: float) -> int:
        return round((ts - self.stream_ts0) / self.period_s)

    def take(self, topic: str, payload: bytes) -> str | None:
        """Record one message; return a line to print for fault events."""
        parts = topic.split("/")
        if topic == f"{PREFIX}/status":
            self.status.append(payload.decode(errors="replace"))
            return None
        device, kind = parts[1], parts[2]
        try:
            body = json.loads(payload)
            k = self.reading_index(body["ts"])
        except (ValueError, KeyError, TypeError):
            self.unreadable += 1
            return None
        if kind == "forecast":
            self.forecasts[device] += 1
            score, threshold = body.get("score"), body.get("threshold")
            if device != PROBE and k >= self.warmup and score is not None and threshold:
                self.peak[device] = max(self.peak.get(device, 0.0), score / threshold)
            return None
        self.events.append((device, body["state"], k, body))
        when = f"t+{k * self.period_s:4.0f} s (reading {k:3d})"
        if body["state"] == "raised":
            top = ", ".join(f"{c['channel']} {c['reading']:.4g} (forecast {c['forecast']:.4g})"
                            for c in body["top_channels"])
            return f"  FAULT RAISED   {device}  {when}  score {body['peak_score']:.2f} > " \
                   f"{body['threshold']:.2f}: {top}"
        return f"  fault cleared  {device}  {when}  (peak score {body['peak_score']:.2f})"


def run_demo(workdir: Path | None, seed: int = 0) -> int:
    try:
        find_mosquitto()  # before training: a missing broker should cost no time
    except BrokerUnavailable as exc:
        print(f"faultwatch demo: needs the Mosquitto broker binary. {exc}", file=sys.stderr)
        return 2
    # SIGTERM unwinds like Ctrl-C, so the daemon and the broker we started are stopped too.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        if workdir is None:
            with tempfile.TemporaryDirectory(prefix="faultwatch-demo-") as tmp:
                return _demo(Path(tmp), seed, keep=False)
        workdir.mkdir(parents=True, exist_ok=True)
        return _demo(workdir, seed, keep=True)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _slice(data: SimData, steps: slice) -> SimData:
    return SimData(data.timestamps[steps], data.devices, data.values[:, steps],
                   data.anomaly[:, steps], data.period_s)


def _train_and_export(workdir: Path, seed: int, clock: _Clock) -> tuple[Path, dict, SimData]:
    from faultwatch.export.build import ExportOptions, export_model
    from faultwatch.train.command import train_run
    from faultwatch.train.fit import TrainConfig

    faults = [Fault(kind, pump, HISTORY_STEPS + start, duration, severity=severity)
              for kind, pump, start, duration, severity in INJECTED]
    # One simulation: the live stream is the same pumps' next readings after the history.
    data = simulate(devices=PUMPS, steps=HISTORY_STEPS + LIVE_STEPS, seed=seed, faults=faults)
    write_csv(_slice(data, slice(0, HISTORY_STEPS)), workdir / "history.csv")
    clock.say(f"simulated {PUMPS} pumps × {HISTORY_STEPS} s of normal readings "
              f"({len(CHANNELS)} channels, 1 reading/s) → history.csv")
    started = time.monotonic()
    report = train_run(workdir / "history.csv", workdir / "run", hidden=HIDDEN, dense=DENSE,
                       dropout=0.0, train_config=TrainConfig(epochs=EPOCHS, seed=seed), quiet=True)
    clock.say(f"trained LSTM {'/'.join(map(str, HIDDEN))} + dense {DENSE} "
              f"({sum(report['parameters'].values()):,} parameters): {report['epochs_run']} epochs "
              f"in {time.monotonic() - started:.1f} s, val loss {report['best_val_loss']:.2e}")
    model = workdir / "model.onnx"
    exported = export_model(workdir / "run", model, ExportOptions(quantize="int8"))
    cal = exported["calibration"]
    clock.say(f"exported int8 {model.name} ({exported['size_bytes']:,} bytes; "
              f"parity {exported['parity']['max_abs_diff']:.1e}); threshold {cal['threshold']:.2f}, "
              f"warm-up {cal['warmup']} readings")
    return model, cal, _slice(data, slice(HISTORY_STEPS, None))


def _demo(workdir: Path, seed: int, keep: bool) -> int:
    clock = _Clock()
    print(f"faultwatch demo (seed {seed}) in {workdir}{'' if keep else ' (temporary)'}", flush=True)
    model, cal, live = _train_and_export(workdir, seed, clock)
    watch = _Watch(float(live.timestamps[0]), live.period_s, cal["warmup"])
    daemon: DaemonProcess | None = None
    listener: _Listener | None = None
    with MosquittoBroker(workdir / "mosquitto") as broker:
        try:
            clock.say(f"mosquitto listening on {broker.address} (pid {broker.pid})")
            listener = _Listener(broker.host, broker.port)
            # daemon.toml and daemon.log in the workdir
            daemon = DaemonProcess(model, broker.address, workdir, "daemon", DAEMON_CONFIG).start()
            failure = _wait_online(daemon, listener, watch, live, clock)
            if failure is None:
                failure = _stream(daemon, listener, watch, live, broker, clock)
            stop_failure = _stop_daemon(daemon, listener, watch, clock)
            failure = failure or stop_failure
        finally:
            if daemon is not None and daemon.alive():  # interrupted, or it ignored SIGTERM
                daemon.stop(timeout=10)
            if listener is not None:
                listener.close()
    if failure:
        tail = daemon.current_log().splitlines()[-15:] if daemon is not None else []
        print("daemon log (last lines):\n  " + "\n  ".join(tail))
        print(f"FAILED: {failure}")
        return 1
    return _summary(watch, live, clock, workdir if keep else None)


def _drain(listener: _Listener, watch: _Watch, timeout: float) -> None:
    """Take what arrived (waiting up to ``timeout`` for the first message); print fault lines."""
    try:
        item = listener.inbox.get(timeout=timeout)
        while True:
            line = watch.take(*item)
            if line:
                print(line, flush=True)
            item = listener.inbox.get_nowait()
    except queue.Empty:
        pass


def _wait_online(daemon: DaemonProcess, listener: _Listener, watch: _Watch, live: SimData, clock: _Clock,
                 timeout: float = 60.0) -> str | None:
    """Wait for the retained ``online``, then for the answer to a probe reading: the daemon
    publishes ``online`` before it subscribes, so ``online`` alone does not mean it is listening."""
    started = time.monotonic()
    deadline = started + timeout
    probe_ts, next_probe = float(live.timestamps[0]) - 3600.0, 0.0
    channels = dict(zip(CHANNELS, live.values[0, 0].tolist(), strict=True))
    while not watch.forecasts[PROBE]:
        if not daemon.alive():
            return f"the daemon exited with {daemon.exit_code()} before it was ready"
        if time.monotonic() >= deadline:
            return f"the daemon was not online and answering within {timeout:g} s"
        if "online" in watch.status and time.monotonic() >= next_probe:
            probe_ts += 1.0  # a lost probe is sent again, newer, once a second
            listener.client.publish(TOPIC_IN.format(device=PROBE), encode_reading(probe_ts, channels),
                                    qos=1)
            next_probe = time.monotonic() + 1.0
        _drain(listener, watch, timeout=0.05)
    clock.say(f"daemon pid {daemon.pid} online and answering ({time.monotonic() - started:.1f} s "
              f"after start); log → daemon.log")
    return None


def _stream(daemon: DaemonProcess, listener: _Listener, watch: _Watch, live: SimData, broker: MosquittoBroker,
            clock: _Clock, answer_timeout: float = 120.0) -> str | None:
    steps, n = len(live.timestamps), len(live.devices)
    injected = "; ".join(f"{kind} on {pump} at t+{start} s for {duration} s"
                         + ("" if severity == 1 else f" (severity {severity:g})")
                         for kind, pump, start, duration, severity in INJECTED)
    clock.say(f"streaming {n} pumps × {steps} readings at {STEPS_PER_S * n:.0f} readings/s "
              f"({STEPS_PER_S:g}× real time); injected: {injected}")
    result: dict = {}

    def sensors() -> None:
        try:
            result["sent"] = publish(live, broker.host, broker.port, rate=STEPS_PER_S, topic=TOPIC_IN,
                                     qos=1, client_id="faultwatch-demo-sensors", timeout_s=60.0)
        except Exception as exc:  # reported by the main thread
            result["error"] = exc

    started = time.monotonic()
    publisher = threading.Thread(target=sensors, name="demo-sensors", daemon=True)
    publisher.start()
    deadline = None
    while True:
        _drain(listener, watch, timeout=0.1)
        answered = sum(v for d, v in watch.forecasts.items() if d != PROBE)
        if not publisher.is_alive():
            if "error" in result:
                return f"publishing the readings failed: {result['error']!r}"
            if deadline is None:
                deadline = time.monotonic() + answer_timeout
                watch.published = result["sent"]
                clock.say(f"published {result['sent']} readings in {time.monotonic() - started:.1f} s")
            if answered >= steps * n:
                break
            if time.monotonic() >= deadline:
                break  # the summary reports the shortfall
        if not daemon.alive():
            return f"the daemon exited with {daemon.exit_code()} while streaming"
    clock.say(f"{answered} forecasts received, {time.monotonic() - started:.1f} s after the first reading")
    return None


def _stop_daemon(daemon: DaemonProcess, listener: _Listener, watch: _Watch, clock: _Clock,
                 timeout: float = 30.0) -> str | None:
    if not daemon.alive():
        return None  # already reported
    try:
        code = daemon.terminate(timeout=timeout)
    except DaemonError:  # killed
        return f"the daemon ignored SIGTERM for {timeout:g} s"
    deadline = time.monotonic() + 10.0
    while watch.status[-1:] != ["stopped"] and time.monotonic() < deadline:
        _drain(listener, watch, timeout=0.1)
    if code != 0:
        return f"the daemon exited with {code} on SIGTERM"
    if watch.status[-1:] != ["stopped"]:
        return f"the daemon did not publish status 'stopped' (status seen: {watch.status})"
    clock.say("daemon stopped on SIGTERM: exit 0, status 'stopped'")
    return None


def _summary(watch: _Watch, live: SimData, clock: _Clock, kept: Path | None) -> int:
    steps = len(live.timestamps)
    windows = {pump: (start, start + duration) for _, pump, start, duration, _ in INJECTED}
    raised = [(d, k) for d, state, k, _ in watch.events if state == "raised" and d != PROBE]
    false_alarms = [(d, k) for d, k in raised
                    if d not in windows or not windows[d][0] <= k < windows[d][1] + SETTLE_READINGS]
    rows = [("pump", "injected (readings)", "detected", "delay", "peak score/threshold", "forecasts")]
    missed = []
    for pump in live.devices:
        fault = next((f for f in INJECTED if f[1] == pump), None)
        score = f"{watch.peak.get(pump, 0.0):.2f}"
        answered = f"{watch.forecasts[pump]}/{steps}"
        if fault is None:
            alarms = [k for d, k in false_alarms if d == pump]
            found = f"FALSE ALARM at reading {alarms[0]}" if alarms else "nothing (clean)"
            rows.append((pump, "-", found, "-", score, answered))
            continue
        kind, _, start, duration, _ = fault
        hits = [k for d, k in raised if d == pump and start <= k < start + duration + SETTLE_READINGS]
        if hits:
            delay = hits[0] - start
            found = f"raised at reading {hits[0]}"
            delay_text = f"{delay} readings ({delay * watch.period_s:g} s)"
        else:
            missed.append(f"{kind} on {pump}")
            found, delay_text = "MISSED", "-"
        rows.append((pump, f"{kind} {start}..{start + duration}", found, delay_text, score, answered))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print()
    for row in rows:
        print("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    total = sum(watch.forecasts[p] for p in live.devices)
    published = watch.published
    detected = len(INJECTED) - len(missed)
    print(f"\n  faults detected: {detected}/{len(INJECTED)}; false alarms: "
          + (", ".join(f"{d} at reading {k}" for d, k in false_alarms) or "none")
          + f"; readings answered: {total} forecasts / {published} readings published")
    failures = []
    if missed:
        failures.append("not detected: " + ", ".join(missed))
    if published != steps * len(live.devices):
        failures.append(f"the broker acknowledged only {published} of {steps * len(live.devices)} readings")
    if total < published:
        failures.append(f"only {total} of {published} readings got a forecast")
    if kept:
        print(f"  files kept in {kept}: history.csv, run/, model.onnx, daemon.toml, daemon.log, mosquitto/")
    clock.say("done")
    if failures:
        print("FAILED: " + "; ".join(failures))
        return 1
    print(f"PASS: every injected fault detected, every reading answered ({len(false_alarms)} false alarms)")
    return 0

