"""Observability: Prometheus ``/metrics`` and ``/healthz`` over HTTP (standard library only).

Cardinality is bounded by construction: every label takes its values from a
fixed set (drop reasons, frame outcomes, reload results), except the
per-device staleness series, which exist only while there are at most
``metrics.per_device_max`` devices; beyond that only the summary of all
devices' staleness is exported (how many are older than 10 s, 60 s, ...).

>>> h = Histogram((0.001, 0.01))
>>> h.observe(np.array([0.0005, 0.002, 0.5]))
>>> print("\\n".join(h.render("x_seconds", "example")))
# HELP x_seconds example
# TYPE x_seconds histogram
x_seconds_bucket{le="0.001"} 1
x_seconds_bucket{le="0.01"} 2
x_seconds_bucket{le="+Inf"} 3
x_seconds_sum 0.5025
x_seconds_count 3
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, HTTPServer

import numpy as np
from faultwatch.runtime.engine.model import ModelStep

log = logging.getLogger("faultwatch")

LATENCY_BUCKETS = (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 16384, 65536)
STALE_AFTER_S = (10, 60, 300, 3600)


def _labels(labels: dict | None) -> str:
    if not labels:
        return ""
    body = ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items())
    return "{" + body + "}"


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _value(v: float) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int | np.integer):
        return str(int(v))
    v = float(v)
    if v != v:
        return "NaN"
    if v in (float("inf"), float("-inf")):
        return "+Inf" if v > 0 else "-Inf"
    return repr(v)


def family(name: str, kind: str, help_text: str,
           samples: Iterable[tuple[dict | None, float]]) -> list[str]:
    """One metric family in the Prometheus text format: HELP, TYPE, then its samples."""
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    lines += [f"{name}{_labels(labels)} {_value(value)}" for labels, value in samples]
    return lines


class Histogram:
    """A Prometheus histogram, fed a batch of observations at a time (thread-safe)."""

    def __init__(self, bounds: Iterable[float]):
        self.bounds = np.asarray(tuple(bounds), dtype=np.float64)
        self.counts = np.zeros(len(self.bounds) + 1, dtype=np.int64)  # last: above every bound
        self.sum = 0.0
        self._lock = threading.Lock()

    def observe(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.float64).ravel()
        if values.size == 0:
            return
        counts = np.bincount(np.searchsorted(self.bounds, values, side="left"),
                             minlength=len(self.counts))
        with self._lock:
            self.counts += counts
            self.sum += float(values.sum())

    def observe_one(self, value: float) -> None:
        index = int(np.searchsorted(self.bounds, value, side="left"))
        with self._lock:
            self.counts[index] += 1
            self.sum += value

    def render(self, name: str, help_text: str) -> list[str]:
        with self._lock:
            counts, total = self.counts.copy(), self.sum
        cumulative = np.cumsum(counts)
        samples = [({"le": repr(float(b))}, int(c)) for b, c in zip(self.bounds, cumulative, strict=False)]
        samples.append(({"le": "+Inf"}, int(cumulative[-1])))
        lines = family(name, "histogram", help_text, [])
        lines += [f"{name}_bucket{_labels(labels)} {value}" for labels, value in samples]
        lines += [f"{name}_sum {_value(total)}", f"{name}_count {int(cumulative[-1])}"]
        return lines


class TimedModel:
    """A :class:`ModelStep` that records each step's batch size and latency; everything else
    (contract, state widths, ...) passes through to the wrapped model."""

    def __init__(self, model: ModelStep, step_seconds: Histogram, batch_size: Histogram):
        self._model = model
        self._step_seconds = step_seconds
        self._batch_size = batch_size

    def __getattr__(self, name: str):
        return getattr(self._model, name)

    def step(self, x: np.ndarray, state: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        start = time.perf_counter()
        out = self._model.step(x, state)
        self._step_seconds.observe_one(time.perf_counter() - start)
        self._batch_size.observe_one(float(x.shape[0]))
        return out


def process_memory_bytes() -> int:
    """Resident set size of this process (Linux; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class MetricsServer:
    """``GET /metrics`` (Prometheus text), ``/healthz`` and ``/readyz`` (JSON) in a daemon thread.

    ``render()`` returns the metrics text; ``health()`` returns (live, ready, details).
    One request at a time, each with a 5 s socket timeout: a stuck client cannot pile up threads.
    """

    def __init__(self, host: str, port: int, render: Callable[[], str],
                 health: Callable[[], tuple[bool, bool, dict]]):
        outer = self

        class Handler(BaseHTTPRequestHandler):
            timeout = 5

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                try:
                    if path == "/metrics":
                        self._send(200, outer.render().encode(), "text/plain; version=0.0.4; charset=utf-8")
                    elif path in ("/healthz", "/readyz"):
                        live, ready, details = outer.health()
                        ok = live if path == "/healthz" else live and ready
                        self._send(200 if ok else 503, json.dumps(details).encode(), "application/json")
                    else:
                        self._send(404, b"not found: try /metrics or /healthz\n", "text/plain")
                except Exception:  # a bug in rendering must not kill the server thread
                    log.exception("error serving %s", path)
                    self._send(500, b"internal error\n", "text/plain")

            def _send(self, code: int, body: bytes, content_type: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args) -> None:
                pass  # scrapes every few seconds would drown the daemon's log

        self.render = render
        self.health = health
        self.server = HTTPServer((host, port), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.5},
                                       name="faultwatch-metrics", daemon=True)

    def start(self) -> MetricsServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
