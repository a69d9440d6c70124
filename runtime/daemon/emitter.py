"""Emitter: what the daemon publishes for a batch of engine outputs, and when it acknowledges.

Forecasts (every ``output.forecast_every``-th reading of a device), fault events (retained,
journaled on disk until the broker has them), Home Assistant discovery for each new
device, the result of a reload. Everything goes out through the :mod:`.outbox`, in order;
the readings of a batch are acknowledged only after its outputs are queued.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from pathlib import Path

from faultwatch.runtime.daemon.announcements import Announcements
from faultwatch.runtime.daemon.config import Config
from faultwatch.runtime.daemon.discovery import discovery_messages, initial_fault_state
from faultwatch.runtime.daemon.mqtt.transport import Transport
from faultwatch.runtime.daemon.outbox import Outbox
from faultwatch.runtime.daemon.payload import ForecastEncoder, fault_message
from faultwatch.runtime.engine.contract import ModelContract
from faultwatch.runtime.engine.engine import FaultEvent, Output

log = logging.getLogger("faultwatch")


class Emitter:
    def __init__(self, config: Config, client: Transport, outbox: Outbox, status_topic: str,
                 contract: ModelContract, counters: Counter, fault_active: Callable[[str], bool]):
        self.config = config
        self.prefix = config.output.prefix
        self.client = client
        self.outbox = outbox
        self.status_topic = status_topic
        self.counters = counters  # the daemon's engine-thread counters
        ha = config.homeassistant
        self.announcements = Announcements(Path(config.state_dir) if config.state_dir else None,
                                           ha.max_devices, ha.announce_per_s, counters)
        self._nth: OrderedDict[str, int] = OrderedDict()  # readings since the last forecast, per device
        # Whether a device has a fault raised (the engine's): an announcement made later (they are
        # rate-limited) must not overwrite that retained state with the initial "ok".
        self.fault_active = fault_active
        self.adopt(contract)

    def adopt(self, contract: ModelContract) -> None:
        self.encoder = ForecastEncoder(contract.targets)

    def emit(self, outputs: list[Output], acks: list[int], threshold: float,
             events: list[FaultEvent] | None = None) -> None:
        """Publish the outputs of one batch (and ``events`` of devices not in it: evicted), then
        acknowledge the messages (``acks``) it came in."""
        out_cfg = self.config.output
        every = out_cfg.forecast_every if out_cfg.forecasts else 0
        forecast = [out for out in outputs if every == 1 or (every and self._due(out.device, every))]
        with self.client.batch():
            if forecast:
                prefix = self.prefix
                self.outbox.publish_many([f"{prefix}/{out.device}/forecast" for out in forecast],
                                         self.encoder.encode_batch(forecast, threshold),
                                         qos=out_cfg.forecast_qos)
            for event in events or ():
                self._publish_event(event)
            discovery = self.config.homeassistant.discovery
            for out in outputs:
                if out.event is not None:
                    self._publish_event(out.event)
                if discovery:
                    self.announcements.want(out.device)
            self.announce_due()
            if self.outbox.journal is not None:
                self.outbox.journal.sync()  # fault events on disk before their readings are acked
            # The outputs are queued with paho, in order: only now are the readings acknowledged.
            self.client.ack_many(acks)

    def _due(self, device: str, every: int) -> bool:
        count = self._nth.pop(device, every - 1) + 1  # a device's first reading is published
        if count >= every:
            count = 0
        elif len(self._nth) >= self.config.engine.max_devices:
            self._nth.popitem(last=False)
        self._nth[device] = count
        return count == 0

    def _publish_event(self, event: FaultEvent) -> None:
        self.outbox.publish(f"{self.prefix}/{event.device}/fault", fault_message(event), qos=1,
                            retain=True, droppable=False, journal=True)
        log.info("fault %s on %s (score %.2f, threshold %.2f)%s", event.state, event.device,
                 event.peak_score, event.threshold,
                 "".join(f" {c['channel']}={c['reading']:.4g} (forecast {c['forecast']:.4g})"
                         for c in event.top_channels))

    def announce_due(self) -> None:
        """Announce the devices whose turn it is (``homeassistant.announce_per_s``)."""
        for device in self.announcements.due(time.monotonic()):
            self._announce(device)

    def withdraw(self, device: str) -> None:
        """Delete ``device``'s retained discovery configs and fault state (an empty retained
        message deletes one); it is announced again if it sends again."""
        ha_prefix = self.config.homeassistant.prefix
        topics = [topic for topic, _ in discovery_messages(device, self.prefix, ha_prefix, scores=True)]
        for topic in [*topics, f"{self.prefix}/{device}/fault"]:
            self.outbox.publish(topic, b"", qos=1, retain=True, droppable=False)
        self.announcements.forget(device)
        self.announcements.save()

    def _announce(self, device: str) -> None:
        for topic, payload in discovery_messages(
                device, self.prefix, self.config.homeassistant.prefix,
                scores=self.config.output.forecasts, model=Path(self.config.model).name,
                status_topic=self.status_topic):
            self.outbox.publish(topic, payload, qos=1, retain=True, droppable=False)
        if not self.fault_active(device):  # else the retained state is a real event: keep it
            self.outbox.publish(f"{self.prefix}/{device}/fault", initial_fault_state(device), qos=1,
                                retain=True, droppable=False)
        self.counters["discovery_announced"] += 1

    def reload_result(self, body: dict) -> None:
        """``{prefix}/reload``: what a reload request did (``body``), with the model's file name.

        Only the name: anyone subscribed may read the reply, and a path tells them about the
        device's file system. ``sha256`` says which model runs."""
        self.outbox.publish(f"{self.prefix}/reload",
                            json.dumps({"model": Path(self.config.model).name} | body).encode(),
                            qos=1, droppable=False)

    def stats(self, topic: str, stats: dict) -> None:
        self.outbox.publish(topic, json.dumps(stats).encode(), qos=0)
