"""Home Assistant MQTT discovery: every device the daemon sees appears in Home Assistant.

Per device, two retained config messages (published once per device, capped and
rate-limited by :mod:`.announcements`; retained, so Home Assistant finds them whenever it
starts):

- ``{ha}/binary_sensor/faultwatch_{id}/fault/config``: *Fault*, device class
  ``problem``, on while a fault is raised, from ``{prefix}/{device}/fault``
  (its JSON, with the top channels, as attributes);
- ``{ha}/sensor/faultwatch_{id}/anomaly_score/config``: *Anomaly score*, from
  the forecast messages (only when forecasts are published).

Both are available while ``{prefix}/status`` (or the status topic of the daemon
that owns the device, ``{prefix}/status/{partition}``) is ``online`` (``offline`` by the
last will and ``stopped`` on a clean exit both mean unavailable), and both
belong to one Home Assistant device per faultwatch device. ``{id}`` is the
device id with every character outside ``[A-Za-z0-9_-]`` replaced by ``_``,
plus a short hash when that changed it (two ids never share an entity), after
the output prefix when it is not the default (two sites never share one). A
device announced with no fault raised also gets its fault state ``ok``
(:func:`initial_fault_state`), so Home Assistant shows *off*, not *Unknown*.

>>> [t for t, _ in discovery_messages("pump 1", "faultwatch", "homeassistant", scores=True)]
['homeassistant/binary_sensor/faultwatch_pump_1_3479fc/fault/config', \
'homeassistant/sensor/faultwatch_pump_1_3479fc/anomaly_score/config']
"""

from __future__ import annotations

import hashlib
import json
import re

from faultwatch.runtime.version import VERSION

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def _safe(text: str) -> str:
    safe = _UNSAFE.sub("_", text)
    if safe != text:
        safe += "_" + hashlib.sha256(text.encode()).hexdigest()[:6]
    return safe


def object_id(device: str, prefix: str = "faultwatch") -> str:
    """Home Assistant's id of a device: two sites (output prefixes) sharing one Home Assistant
    never collide; with the default prefix the id is what it always was.

    >>> object_id("pump-1"), object_id("pump-1", "plant/site-b")
    ('faultwatch_pump-1', 'faultwatch_plant_site-b_c548b6_pump-1')
    """
    site = "" if prefix == "faultwatch" else _safe(prefix) + "_"
    return f"faultwatch_{site}{_safe(device)}"


def initial_fault_state(device: str) -> bytes:
    """The retained fault state of a device announced with no fault raised: Home Assistant shows
    the Fault sensor *off* instead of *Unknown* until the first fault event."""
    return json.dumps({"device": device, "state": "ok"}).encode()


def discovery_messages(device: str, prefix: str, ha_prefix: str, scores: bool,
                       model: str = "", status_topic: str = "") -> list[tuple[str, bytes]]:
    """(topic, retained payload) of the device's discovery configs; availability follows
    ``status_topic`` (default ``{prefix}/status``)."""
    oid = object_id(device, prefix)
    availability = {
        "availability": [{"topic": status_topic or f"{prefix}/status",
                          "value_template": "{{ 'online' if value == 'online' else 'offline' }}"}],
        "payload_available": "online",
        "payload_not_available": "offline",
    }
    ha_device = {"identifiers": [oid], "name": device, "manufacturer": "faultwatch",
                 "model": model or "LSTM forecaster", "sw_version": VERSION}
    fault_topic = f"{prefix}/{device}/fault"
    messages = [(f"{ha_prefix}/binary_sensor/{oid}/fault/config", {
        "name": "Fault",
        "unique_id": f"{oid}_fault",
        "device_class": "problem",
        "state_topic": fault_topic,
        "value_template": "{{ 'ON' if value_json.state == 'raised' else 'OFF' }}",
        "json_attributes_topic": fault_topic,
        "device": ha_device,
        **availability,
    })]
    if scores:
        messages.append((f"{ha_prefix}/sensor/{oid}/anomaly_score/config", {
            "name": "Anomaly score",
            "unique_id": f"{oid}_anomaly_score",
            "state_topic": f"{prefix}/{device}/forecast",
            "value_template": "{{ value_json.score }}",
            "state_class": "measurement",
            "icon": "mdi:chart-bell-curve",
            "device": ha_device,
            **availability,
        }))
    return [(topic, json.dumps(body, sort_keys=True).encode()) for topic, body in messages]
