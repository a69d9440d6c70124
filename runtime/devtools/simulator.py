"""Deterministic simulator of a centrifugal pump rig (SKAB-like), numpy only.

Why: tests, demos and benchmarks need pump data with known, labelled faults and
any number of devices, without shipping a data set or importing torch. The same
arguments give bit-identical arrays. Device ``k`` draws from its own child seed
(``SeedSequence(seed).spawn``), so its data does not depend on how many devices
are simulated, and a shorter run is a prefix of a longer one.

The physics, per device (``t = step * period_s`` seconds):

- a load cycle drives the relative pump speed ``s`` (~0.4-1.0): two harmonics of
  a 300-600 s period with a per-device phase, plus a slow AR(1) wander;
- affinity laws: flow ∝ s, pressure ∝ s², hydraulic current ∝ s³; vibration
  grows with s²; motor temperature lags (120 s) behind idle + 3.2·I²; voltage is
  mains minus a 2.5 V/A line drop; the thermocouple reads ambient + slow drift;
- every channel carries AR(1) measurement noise with its own correlation time,
  so a forecaster has something to learn that is not trivial.

Faults (``anomaly`` is 1 exactly on ``[start, start + duration)``; severity
scales the magnitude):

- ``valve_closure``: the inlet valve closes by ``min(0.9, 0.6·severity)`` over
  5 steps and reopens over the window's last 5 steps. At severity 1: flow -60 %,
  pressure -30 %, hydraulic current -30 %, vibration +0.024 g (cavitation) with
  extra jitter; temperature follows the lower current through its lag.
- ``bearing_wear``: vibration grows linearly over the window to
  +0.06·severity g (accel1) and +0.048·severity g (accel2) with jitter of std
  0.015·severity g; the motor temperature target rises to +5·severity °C.
- ``stuck_sensor``: the channel repeats the last reading before ``start`` (the
  first reading if ``start`` is 0); severity has no effect.
- ``spike``: the channel jumps by ``severity × _SPIKE[channel]`` for the window.

Physical faults end with their window; only the thermal lag carries over.

>>> data = simulate(devices=2, steps=5, faults=[parse_fault("spike@pump-001:2+1:current")])
>>> data.values.shape, data.anomaly[1].tolist()
((2, 5, 8), [0, 0, 1, 0, 0])
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from os import PathLike

import numpy as np

CHANNELS: tuple[str, ...] = (
    "accel1_rms", "accel2_rms", "current", "pressure",
    "temperature", "thermocouple", "voltage", "flow_rate",
)  # fmt: skip
FAULT_KINDS: tuple[str, ...] = ("valve_closure", "bearing_wear", "stuck_sensor", "spike")

_CH = {name: i for i, name in enumerate(CHANNELS)}
# Measurement noise, in CHANNELS order: stationary std (physical units) and the
# correlation time of its AR(1) process in seconds (phi = exp(-period_s / tau)).
_NOISE_STD = np.array([0.004, 0.004, 0.08, 0.04, 0.15, 0.03, 1.2, 1.0])
_NOISE_TAU_S = np.array([10.0, 6.0, 1.5, 1.0, 10.0, 2.0, 2.0, 5.0])
# Height of a severity-1 spike, in CHANNELS order (physical units).
_SPIKE = np.array([0.08, 0.08, 1.5, 0.6, 8.0, 3.0, 30.0, 40.0])
_DEFAULT_CHANNEL = {"stuck_sensor": "flow_rate", "spike": "current"}

_SPEED_TAU_S, _SPEED_WANDER = 60.0, 0.03  # slow random wander of the speed setpoint
_AMBIENT_TAU_S, _AMBIENT_DRIFT = 1800.0, 0.5  # room temperature drift (°C)
_THERMAL_TAU_S = 120.0  # motor temperature lag behind I² heating
_RAMP_STEPS = 5  # valve closing / reopening time

# Per-device parameters, drawn uniformly in [lo, hi) from the device's own generator.
_PARAMS = (
    ("cycle_s", 300.0, 600.0),  # load cycle period
    ("phase", 0.0, 2 * math.pi),
    ("phase2", 0.0, 2 * math.pi),  # phase of the second harmonic
    ("speed_mean", 0.66, 0.72),
    ("speed_amp", 0.18, 0.24),
    ("q_max", 115.0, 130.0),  # l/min at full speed
    ("p_max", 0.8, 1.0),  # bar at full speed
    ("i_idle", 0.7, 0.9),  # A, magnetising and friction
    ("i_load", 1.6, 2.0),  # A, hydraulic part at full speed
    ("accel1_base", 0.19, 0.20),  # g
    ("accel2_base", 0.24, 0.25),  # g
    ("temp_base", 66.0, 70.0),  # °C, motor temperature at zero current
    ("ambient", 25.5, 28.0),  # °C
    ("mains", 232.0, 236.0),  # V, no-load voltage
)
# Innovations drawn per step: one per channel's noise, speed wander, ambient
# drift, then two white columns for fault jitter on the accelerometers.
_N_INNOV = len(CHANNELS) + 4


@dataclass(frozen=True)
class Fault:
    """One injected fault on one device over steps ``[start, start + duration)``.

    Sensor faults (stuck_sensor, spike) act on one ``channel``, which defaults
    per kind (flow_rate, current); physical faults act on the pump and take none.
    """

    kind: str
    device: str
    start: int
    duration: int
    channel: str | None = None
    severity: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r} (known: {', '.join(FAULT_KINDS)})")
        if not isinstance(self.device, str) or not self.device:
            raise ValueError(f"fault device must be a non-empty string, got {self.device!r}")
        for name, low in (("start", 0), ("duration", 1)):
            try:
                value = operator.index(getattr(self, name))
            except TypeError:
                raise ValueError(
                    f"fault {name} must be an integer, got {getattr(self, name)!r}"
                ) from None
            if value < low:
                raise ValueError(f"fault {name} must be >= {low}, got {value}")
            object.__setattr__(self, name, value)
        if not (math.isfinite(self.severity) and self.severity > 0):
            raise ValueError(f"fault severity must be finite and > 0, got {self.severity!r}")
        object.__setattr__(self, "severity", float(self.severity))
        if self.kind in _DEFAULT_CHANNEL:
            channel = self.channel or _DEFAULT_CHANNEL[self.kind]
            if channel not in _CH:
                raise ValueError(f"unknown channel {channel!r} (known: {', '.join(CHANNELS)})")
            object.__setattr__(self, "channel", channel)
        elif self.channel is not None:
            raise ValueError(f"{self.kind} acts on the pump and takes no channel")


def parse_fault(spec: str) -> Fault:
    """Parse ``KIND@DEVICE:START+DURATION[:CHANNEL][*SEVERITY]``.

    E.g. ``valve_closure@pump-000:600+120`` or ``spike@pump-001:300+3:current*2``.
    Raises ValueError with one line naming what is wrong.
    """

    def bad(why: str) -> ValueError:
        return ValueError(
            f"bad fault {spec!r}: {why} (want KIND@DEVICE:START+DURATION[:CHANNEL][*SEVERITY])"
        )

    body, star, severity_text = spec.strip().partition("*")
    kind, at, rest = body.partition("@")
    device, colon, rest = rest.partition(":")
    if not at or not device:
        raise bad("missing '@DEVICE'")
    window, _, channel = rest.partition(":")
    start_text, plus, duration_text = window.partition("+")
    if not colon or not plus:
        raise bad("missing ':START+DURATION'")
    for name, text in (("start", start_text), ("duration", duration_text)):
        if not re.fullmatch(r"\d+", text):
            raise bad(f"{name} must be a non-negative integer, got {text!r}")
    try:
        severity = float(severity_text) if star else 1.0
    except ValueError:
        raise bad(f"severity must be a number, got {severity_text!r}") from None
    try:
        return Fault(kind, device, int(start_text), int(duration_text), channel or None, severity)
    except ValueError as err:
        raise bad(str(err)) from None


def device_ids(n: int) -> list[str]:
    """The ids the simulator gives its devices: ``["pump-000", "pump-001", ...]``."""
    if n < 0:
        raise ValueError(f"number of devices must be >= 0, got {n}")
    return [f"pump-{i:03d}" for i in range(n)]


@dataclass(frozen=True, eq=False)
class SimData:
    """Simulated readings of ``D`` devices over ``T`` steps (arrays, so no ``==``).

    timestamps [T] float64 epoch seconds; values [D, T, len(CHANNELS)] float64 raw
    physical units; anomaly [D, T] uint8, 1 where an injected fault is active.
    """

    timestamps: np.ndarray
    devices: list[str]
    values: np.ndarray
    anomaly: np.ndarray
    period_s: float

    def rows(self) -> Iterator[tuple[float, str, np.ndarray, int]]:
        """Yield ``(ts, device, values[C], anomaly)`` time-major, then in device order.

        ``values`` is a view into :attr:`values`; copy it to keep it past mutation.
        """
        for k, ts in enumerate(self.timestamps.tolist()):
            for d, device in enumerate(self.devices):
                yield ts, device, self.values[d, k], int(self.anomaly[d, k])


def simulate(
    devices: int = 1,
    steps: int = 2000,
    period_s: float = 1.0,
    seed: int = 0,
    faults: Sequence[Fault] = (),
    start_ts: float = 1_700_000_000.0,
) -> SimData:
    """Simulate ``devices`` pumps (ids from :func:`device_ids`) for ``steps`` readings."""
    if devices < 1 or steps < 1:
        raise ValueError(f"need devices >= 1 and steps >= 1, got {devices} and {steps}")
    if not (math.isfinite(period_s) and period_s > 0):
        raise ValueError(f"period_s must be finite and > 0, got {period_s!r}")
    ids = device_ids(devices)
    index = {device: d for d, device in enumerate(ids)}
    for f in faults:
        if f.device not in index:
            raise ValueError(f"fault on unknown device {f.device!r} (simulating {devices})")
        if f.start >= steps:
            raise ValueError(f"fault {f.kind}@{f.device} starts at {f.start} >= steps {steps}")

    # Parameters first, then every innovation in one call, per device: a run with
    # fewer steps or devices draws a prefix of the same streams.
    draws, innov = [], []
    for child in np.random.SeedSequence(seed).spawn(devices):
        rng = np.random.default_rng(child)
        draws.append(rng.random(len(_PARAMS)))
        innov.append(rng.standard_normal((steps, _N_INNOV)))
    u = np.stack(draws)  # [D, P]
    p = {name: lo + (hi - lo) * u[:, j] for j, (name, lo, hi) in enumerate(_PARAMS)}  # [D] each
    z = np.stack(innov, axis=1)  # [T, D, _N_INNOV]

    n_ch = len(CHANNELS)
    tau = np.concatenate([_NOISE_TAU_S, [_SPEED_TAU_S, _AMBIENT_TAU_S]])
    ar = _ar1(z[:, :, : n_ch + 2], np.exp(-period_s / tau))  # [T, D, C + 2], unit std
    noise, wander, drift = ar[..., :n_ch], ar[..., n_ch], ar[..., n_ch + 1]
    jitter = z[..., n_ch + 2 :]  # [T, D, 2] white, for the accelerometers

    # Physics on [T, D] arrays; per-device parameters broadcast along D.
    t = np.arange(steps)[:, None] * period_s  # [T, 1]
    theta = 2 * np.pi * t / p["cycle_s"] + p["phase"]
    speed = (
        p["speed_mean"]
        + p["speed_amp"] * np.sin(theta)
        + 0.25 * p["speed_amp"] * np.sin(2 * theta + p["phase2"])
        + _SPEED_WANDER * wander
    )
    speed = np.clip(speed, 0.2, 1.05)
    closure, wear = _physical_faults(faults, index, steps, devices)  # [T, D] each
    flow = p["q_max"] * speed * (1 - closure)
    pressure = p["p_max"] * speed**2 * (1 - 0.5 * closure)
    current = p["i_idle"] + p["i_load"] * speed**3 * (1 - 0.5 * closure)
    # Both accelerometers at once, [T, D, 2]: load vibration, cavitation, bearing wear.
    base = np.stack([p["accel1_base"], p["accel2_base"]], axis=-1)  # [D, 2]
    accel = (
        base
        + (0.03 * speed**2)[..., None]
        + closure[..., None] * (0.04 + 0.01 * jitter)
        + wear[..., None] * (np.array([0.06, 0.048]) + 0.015 * jitter)
    )
    heat_target = p["temp_base"] + 3.2 * current**2 + 5.0 * wear
    lag = math.exp(-period_s / _THERMAL_TAU_S)
    temperature = _recur((1 - lag) * heat_target, lag, heat_target[0])  # starts settled
    thermocouple = p["ambient"] + _AMBIENT_DRIFT * drift
    voltage = p["mains"] - 2.5 * current
    truth = np.stack(
        [accel[..., 0], accel[..., 1], current, pressure, temperature, thermocouple, voltage, flow],
        axis=-1,
    )  # [T, D, C], in CHANNELS order
    values = truth + _NOISE_STD * noise
    values[..., _CH["flow_rate"]] = np.maximum(values[..., _CH["flow_rate"]], 0.0)

    anomaly = np.zeros((steps, devices), dtype=np.uint8)
    for f in faults:
        d, window = index[f.device], slice(f.start, f.start + f.duration)
        anomaly[window, d] = 1
        if f.kind in ("stuck_sensor", "spike"):
            assert f.channel is not None  # Fault.__post_init__ requires one for these kinds
            c = _CH[f.channel]
            if f.kind == "stuck_sensor":
                values[window, d, c] = values[max(f.start - 1, 0), d, c]
            else:
                values[window, d, c] += f.severity * _SPIKE[c]

    return SimData(
        timestamps=start_ts + np.arange(steps, dtype=np.float64) * period_s,
        devices=ids,
        values=np.ascontiguousarray(values.transpose(1, 0, 2)),  # [D, T, C]
        anomaly=np.ascontiguousarray(anomaly.T),  # [D, T]
        period_s=float(period_s),
    )


def write_csv(data: SimData, path: str | PathLike[str]) -> None:
    """Write ``timestamp,device,<CHANNELS...>,anomaly`` rows, time-major then device.

    Timestamps are ISO 8601 UTC with milliseconds and no zone suffix
    (``2023-11-14T22:13:20.000``), which ``np.datetime64`` parses; values keep
    6 significant digits.
    """
    millis = np.round(data.timestamps * 1000.0).astype(np.int64).astype("datetime64[ms]")
    stamps = np.datetime_as_string(millis, unit="ms")
    values = data.values.transpose(1, 0, 2).tolist()  # [T][D][C] Python floats: fast formatting
    flags = data.anomaly.T.tolist()  # [T][D]
    with open(path, "w", encoding="utf-8", newline="") as fh:
        fh.write(",".join(("timestamp", "device", *CHANNELS, "anomaly")) + "\n")
        for stamp, row_t, flag_t in zip(stamps, values, flags, strict=True):
            for device, row, flag in zip(data.devices, row_t, flag_t, strict=True):
                fh.write(f"{stamp},{device},{','.join(f'{v:.6g}' for v in row)},{flag}\n")


def _recur(u: np.ndarray, a: np.ndarray | float, y0: np.ndarray | float) -> np.ndarray:
    """``y[k] = a * y[k-1] + u[k]`` along axis 0 with ``y[-1] = y0``.

    u [T, ...]; ``a`` and ``y0`` broadcast against ``u[0]``. The one Python loop
    of the simulator: each step is a vector operation over devices and channels.
    """
    y = np.empty_like(u)
    prev = np.broadcast_to(np.asarray(y0, dtype=u.dtype), u.shape[1:])
    for k in range(u.shape[0]):
        np.multiply(a, prev, out=y[k])
        y[k] += u[k]
        prev = y[k]
    return y


def _ar1(z: np.ndarray, phi: np.ndarray) -> np.ndarray:
    """Stationary unit-variance AR(1) from white innovations z [T, ...], coefficients ``phi``."""
    u = z * np.sqrt(1.0 - phi**2)
    u[0] = z[0]  # start from the stationary distribution, no burn-in
    return _recur(u, phi, 0.0)


def _physical_faults(
    faults: Sequence[Fault], index: dict[str, int], steps: int, devices: int
) -> tuple[np.ndarray, np.ndarray]:
    """Valve closure fraction and bearing wear level over time, each [T, D] in [0, ...)."""
    closure = np.zeros((steps, devices))
    wear = np.zeros((steps, devices))
    for f in faults:
        end = min(f.start + f.duration, steps)
        i = np.arange(end - f.start)  # position inside the window
        d = index[f.device]
        if f.kind == "valve_closure":
            ramp = np.minimum(1.0, np.minimum(i + 1, f.duration - i) / _RAMP_STEPS)
            level = min(0.9, 0.6 * f.severity) * ramp
            closure[f.start : end, d] = np.maximum(closure[f.start : end, d], level)
        elif f.kind == "bearing_wear":
            level = f.severity * (i + 1) / f.duration  # progressive: grows to full at the end
            wear[f.start : end, d] = np.maximum(wear[f.start : end, d], level)
    return closure, wear
