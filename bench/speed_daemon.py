"""The daemon end to end, for ``faultwatch bench``: a private Mosquitto, the real daemon as a
subprocess (``python -m faultwatch.runtime.cli run``), simulated devices published with paho.

Phases, on one broker, in one run:

1. cold start: launch the daemon and publish a probe reading every 10 ms until its first
   forecast arrives; launch → that forecast.
2. latency: ``devices`` devices at 1 reading/s each, spread evenly over each second, after
   one warm-up round (every device new: a slot, its discovery configs); ``first_seen_s``
   is how long that round took. Latency is reading published → its forecast received, and,
   the daemon's part alone, reading delivered by the broker → forecast delivered. The
   daemon's peak RSS (VmHWM) after this is ``rss_mb_1k``.
3. throughput: the same daemon (warm) and a bare paho subscriber (QoS 1, a persistent
   session, no work) each have a subscription; with the subscriber offline and the daemon
   paused (SIGSTOP), ``devices × drain_steps`` QoS 1 readings are queued at the broker;
   then each drains its queue alone, and its rate is measured from its first to its last
   message (for the daemon: first to last forecast). Rounds alternate who goes first and
   the medians are taken, so the ratio holds on a noisy machine.
4. ``big_devices`` devices (10,000), paced below the daemon's capacity: latency and RSS.

Every timed actor is a process of its own, as it would be in the field: the daemon, the
bare subscriber, and the paced publisher (one Python process publishing thousands of
QoS 1 readings a second would otherwise lag, and its lag would be counted as the
daemon's). Their timestamps are ``time.monotonic()``, one clock for all processes.

The load side (publishers, listeners, the bare subscriber) is :mod:`.mqtt_load`; the daemon
runs as :class:`~faultwatch.runtime.devtools.daemon_process.DaemonProcess`, as in the tests
and the demo. torch is never imported here, and ``torch_loaded`` reads the daemon's
/proc/PID/maps.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
from faultwatch.bench.mqtt_load import (
    PREFIX,
    PROBE,
    TOPIC,
    Arrivals,
    BareSubscriber,
    Paced,
    close_client,
    connect_client,
    publish_all,
    reading_payloads,
    run_paced,
    wait_until,
)
from faultwatch.runtime.daemon.payload import encode_reading
from faultwatch.runtime.devtools.daemon_process import DaemonProcess
from faultwatch.runtime.devtools.simulator import CHANNELS, device_ids, simulate

BIG_RATE = 5000.0  # readings/s offered in the 10,000-device phase
BIG_EVERY = 20  # there, latency is measured on every 20th device


@dataclass(frozen=True)
class DaemonCounts:
    devices: int = 1000
    paced_s: int = 10  # measured seconds at 1 reading/s per device
    drain_steps: int = 20  # queued readings per device per throughput round
    drain_rounds: int = 4  # alternating rounds (bare subscriber first, then daemon first, ...)
    big_devices: int = 10_000
    big_steps: int = 3  # measured rounds at 10,000 devices
    echo_messages: int = 3000  # bare paho publish → receive latency, at 1,000/s

    @classmethod
    def of(cls, quick: bool) -> DaemonCounts:
        if quick:
            return cls(paced_s=3, drain_steps=5, drain_rounds=2, big_steps=1, echo_messages=500)
        return cls()


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# -- the daemon process ------------------------------------------------------------------


def _daemon(model: Path, address: str, workdir: Path, client_id: str, max_devices: int) -> DaemonProcess:
    """``faultwatch run`` for the bench, not started yet."""
    return DaemonProcess(model, address, workdir, client_id, {
        "log_level": "INFO",
        "broker": {"client_id": client_id, "session_expiry_s": 3600},
        "output": {"stats_interval_s": 0.0},
        "engine": {"max_devices": max_devices},
        # Metrics stay on, on a free port: 9108 may be taken by a daemon already running here.
        "metrics": {"listen": "127.0.0.1:0"},
    })


def _probe_until_forecast(daemon: DaemonProcess, publisher: mqtt.Client, arrivals: Arrivals,
                          timeout: float = 60.0) -> float:
    """Publish a probe reading every 10 ms until its forecast arrives; seconds since launch."""
    row = dict(zip(CHANNELS, simulate(devices=1, steps=1).values[0, 0].tolist(), strict=True))
    deadline = time.monotonic() + timeout
    start = len(arrivals.items)
    while time.monotonic() < deadline:
        daemon.check_alive()
        publisher.publish(TOPIC.format(device=PROBE), encode_reading(time.time(), row), qos=1)
        time.sleep(0.01)  # probe spacing
        for topic, _, t in arrivals.items[start:]:
            if topic == f"{PREFIX}/{PROBE}/forecast":
                return t - daemon.launched
    raise RuntimeError(f"no forecast within {timeout:g} s of launch:\n{daemon.log_tail()}")




def _paced_latency(spec: Paced, arrivals: Arrivals) -> dict:
    """Warm-up round (step ``spec.first``; waited for), then the measured rounds.

    ``arrivals`` must listen to the forecasts and the readings of every ``spec.every``-th
    device. Latency in ms: ``p50_ms``/``p99_ms`` from the publish call to the forecast's
    arrival, which is ``delivery_*`` (publish call → the reading delivered to a subscriber
    beside the daemon: the load generator and the broker) then ``daemon_*`` (that delivery
    → the forecast's arrival: the daemon's part).
    """
    tracked = len(range(0, spec.devices, spec.every))
    warm = run_paced(Paced(**(asdict(spec) | {"last": spec.first + 1})))
    if not wait_until(lambda: arrivals.count("/forecast") >= tracked, timeout=120):
        raise RuntimeError(f"bench: {arrivals.count('/forecast')} of {tracked} first forecasts arrived")
    first_seen = max(t for topic, _, t in arrivals.items
                     if topic.endswith("/forecast") and PROBE not in topic) - warm["start"]
    run = run_paced(Paced(**(asdict(spec) | {"first": spec.first + 1})))
    expected = tracked * (spec.last - spec.first)
    wait_until(lambda: arrivals.count("/forecast") >= expected, timeout=60)
    forecasts, readings = arrivals.by_reading("forecast"), arrivals.by_reading("reading")
    sent = {(device, ts): t for device, ts, t in run["sent"]}
    total = np.array([forecasts[k] - t for k, t in sent.items() if k in forecasts]) * 1e3
    own = np.array([forecasts[k] - readings[k] for k in sent if k in forecasts and k in readings]) * 1e3
    hop = np.array([readings[k] - t for k, t in sent.items() if k in readings]) * 1e3
    if len(total) == 0:
        raise RuntimeError("bench: no forecast arrived in the latency phase")
    return {
        "p50_ms": float(np.percentile(total, 50)), "p99_ms": float(np.percentile(total, 99)),
        "max_ms": float(total.max()),
        "daemon_p50_ms": float(np.percentile(own, 50)), "daemon_p99_ms": float(np.percentile(own, 99)),
        "delivery_p50_ms": float(np.percentile(hop, 50)), "delivery_p99_ms": float(np.percentile(hop, 99)),
        "latency_readings": len(sent), "latency_missing": len(sent) - len(total),
        "paced_rate": spec.devices * (spec.last - spec.first - 1) / run["elapsed"],
        "first_seen_s": first_seen,
    }


def _paho_latency(host: str, port: int, publisher: mqtt.Client, n: int) -> dict:
    """The floor under the daemon's latency: publish → a bare subscriber receives, 1,000/s."""
    arrivals = Arrivals(host, port, ["bench/echo/+"])
    try:
        sent = []
        start = time.monotonic()
        for i in range(n):
            delay = start + i / 1000 - time.monotonic()
            if delay > 0:
                time.sleep(delay)  # 1,000 messages/s
            sent.append(time.monotonic())
            publisher.publish(f"bench/echo/{i}", b'{"ts": 1}', qos=1)
        wait_until(lambda: len(arrivals.items) >= n, timeout=20)
        got = {int(topic.rsplit("/", 1)[1]): t for topic, _, t in arrivals.items}
        lat = np.array([got[i] - t for i, t in enumerate(sent) if i in got]) * 1e3
        return {"paho_p50_ms": float(np.percentile(lat, 50)), "paho_p99_ms": float(np.percentile(lat, 99))}
    finally:
        arrivals.close()


# -- throughput ------------------------------------------------------------------------


def _profile(pid: int, seconds: float, out: Path) -> subprocess.Popen | None:
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not os.access(spy, os.X_OK):
        _say("py-spy not found (pip install py-spy): no profile")
        return None
    return subprocess.Popen([spy, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))),
                             "--rate", "250", "--format", "raw", "--output", str(out), "--nonblocking"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _drain_daemon(daemon: DaemonProcess, host: str, port: int, ids: list[str], steps: int,
                  profile_to: Path | None) -> tuple[float, Path | None]:
    """Resume the paused daemon on its queue; readings/s from its first to its last forecast."""
    ends = Arrivals(host, port, [f"{PREFIX}/{ids[0]}/forecast", f"{PREFIX}/{ids[-1]}/forecast"])
    spy = None
    try:
        daemon.signal(signal.SIGCONT)
        if profile_to:
            spy = _profile(daemon.pid, len(ids) * steps / 4000 + 2, profile_to)
        if not wait_until(lambda: len(ends.items) >= 2 * steps, timeout=180):
            raise RuntimeError(f"bench: the daemon did not drain {len(ids) * steps} readings:\n"
                               f"{daemon.log_tail()}")
    finally:
        ends.close()
    first = min(t for topic, _, t in ends.items if f"/{ids[0]}/" in topic)
    last = max(t for topic, _, t in ends.items if f"/{ids[-1]}/" in topic)
    if spy is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            spy.wait(timeout=60)
    return (len(ids) * steps - 1) / (last - first), (profile_to if spy is not None else None)


# -- the run -----------------------------------------------------------------------------


def _listen(host: str, port: int, ids: list[str], every: int) -> Arrivals:
    """Forecasts and readings of every ``every``-th device, and the probe's forecasts."""
    sample = ids[::every]
    return Arrivals(host, port, [f"{PREFIX}/{PROBE}/forecast"]
                    + [f"{PREFIX}/{d}/forecast" for d in sample] + [TOPIC.format(device=d) for d in sample])


def bench_daemon(model: Path, workdir: Path, counts: DaemonCounts, profile: bool = False) -> dict:
    try:
        from faultwatch.runtime.devtools.broker import BrokerError, MosquittoBroker
    except ImportError:
        return {"skipped": "faultwatch.runtime.devtools.broker is not available"}
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        broker = MosquittoBroker(workdir / "mosquitto").start()
    except BrokerError as exc:
        return {"skipped": str(exc).splitlines()[0]}
    host, port = broker.host, broker.port
    daemons: list[DaemonProcess] = []
    publisher = None
    result: dict = {"devices": counts.devices, "big_devices": counts.big_devices, "cold_starts_s": []}
    try:
        publisher = connect_client(host, port)
        # One time line per device: warm-up, the paced rounds, then the drain rounds.
        paced_steps = counts.paced_s + 1
        total = paced_steps + counts.drain_rounds * counts.drain_steps
        ids, _, stream = reading_payloads(counts.devices, total, seed=11)

        # 1 + 2: cold start, then paced latency and RSS at `devices` devices.
        listener = _listen(host, port, ids, 1)
        daemon = _daemon(model, broker.address, workdir, "bench-daemon-1k", counts.devices + 1)
        daemons.append(daemon)
        result["cold_starts_s"].append(_probe_until_forecast(daemon.start(), publisher, listener))
        _say(f"daemon: first forecast {result['cold_starts_s'][0]:.2f} s after launch; "
             f"{counts.devices} devices at 1 reading/s for 1 + {counts.paced_s} s")
        listener.items.clear()
        result |= _paced_latency(Paced(host, port, counts.devices, total, 11, 0, paced_steps, 1.0, 1),
                                 listener)
        listener.close()
        daemon.check_alive()
        result["rss_mb_1k"] = daemon.peak_rss_mb()
        result["torch_loaded"] = daemon.torch_loaded()

        # 3: throughput in alternating rounds; the daemon paused while a burst is queued.
        n = counts.devices * counts.drain_steps
        result |= {"drain_readings": n, "drain_rounds": counts.drain_rounds}
        bare = BareSubscriber(host, port)
        _say(f"throughput: {counts.drain_rounds} rounds of {n:,} queued QoS 1 readings, "
             f"daemon vs bare paho subscriber")
        rates: dict[str, list[float]] = {"daemon": [], "bare": []}
        profile_to = workdir / "daemon-drain.pyspy.txt" if profile else None
        for r in range(counts.drain_rounds):
            burst = stream[paced_steps + r * counts.drain_steps:paced_steps + (r + 1) * counts.drain_steps]
            daemon.signal(signal.SIGSTOP)
            publish_all(publisher, ids, burst)
            for who in ("bare", "daemon") if r % 2 == 0 else ("daemon", "bare"):
                if who == "bare":
                    rates["bare"].append(bare.drain(n))
                else:
                    rate, spied = _drain_daemon(daemon, host, port, ids, counts.drain_steps, profile_to)
                    rates["daemon"].append(rate)
                    if spied:
                        result["profile"], profile_to = str(spied), None
        result["readings_per_s"] = statistics.median(rates["daemon"])
        result["paho_baseline_per_s"] = statistics.median(rates["bare"])
        result["drain_rates"] = rates
        daemon.check_alive()
        result["rss_mb_drain"] = daemon.peak_rss_mb()
        result["torch_loaded"] |= daemon.torch_loaded()
        daemon.stop()
        result["daemon_counters"] = daemon.stopping_counters()
        _say(f"daemon drained {result['readings_per_s']:,.0f} readings/s, bare paho subscriber "
             f"{result['paho_baseline_per_s']:,.0f}/s (medians)")
        result |= _paho_latency(host, port, publisher, counts.echo_messages)

        # 4: `big_devices` devices, paced below the daemon's capacity: the peak is the devices'
        # state, not a backlog.
        listener = _listen(host, port, device_ids(counts.big_devices), BIG_EVERY)
        big = _daemon(model, broker.address, workdir, "bench-daemon-10k", counts.big_devices + 1)
        daemons.append(big)
        result["cold_starts_s"].append(_probe_until_forecast(big.start(), publisher, listener))
        period = counts.big_devices / BIG_RATE
        _say(f"daemon: {counts.big_devices:,} devices, one reading each per {period:g} s, "
             f"1 + {counts.big_steps} rounds")
        listener.items.clear()
        steps = counts.big_steps + 1
        big_latency = _paced_latency(
            Paced(host, port, counts.big_devices, steps, 13, 0, steps, period, BIG_EVERY), listener)
        listener.close()
        result |= {f"big_{k}": v for k, v in big_latency.items()}
        big.check_alive()
        result["rss_mb_10k"] = big.peak_rss_mb()
        result["torch_loaded"] |= big.torch_loaded()
        big.stop()
    finally:
        for d in daemons:
            d.stop()
        if publisher is not None:
            close_client(publisher)
        broker.stop()
    result["cold_start_s"] = result["cold_starts_s"][0]
    result["cold_start_median_s"] = statistics.median(result["cold_starts_s"])
    return result
