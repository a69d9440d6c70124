"""Input topic templates: ``sensors/{device}`` (a JSON object per reading) and
``sensors/{device}/{channel}`` (one plain number per channel and message).

A template is a topic with ``{device}`` as one whole level and, optionally,
``{channel}`` as another; it subscribes with ``+`` in their place. Several
templates may be given, as long as no topic could match two of them (the
broker would deliver such a message twice).

>>> t = TopicTemplate("plant/{device}/sensor/{channel}")
>>> t.subscription, t.match("plant/pump-1/sensor/current")
('plant/+/sensor/+', ('pump-1', 'current'))
>>> t.match("plant/pump-1/sensor") is None
True
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

MAX_DEVICE_ID = 128  # characters; longer device levels are rejected as bad_topic
MAX_CHANNEL = 64


def device_partition(device: str, partitions: int) -> int:
    """Which of ``partitions`` daemons owns ``device``: CRC-32 of its UTF-8 id, modulo.

    Stable across processes, machines and Python versions (unlike ``hash``), so every
    daemon of a group agrees on the owner without talking to the others.

    >>> device_partition("pump-001", 3), device_partition("pump-001", 1)
    (2, 0)
    >>> from collections import Counter  # about even shares
    >>> sorted(Counter(device_partition(f"pump-{i:03d}", 3) for i in range(300)).items())
    [(0, 105), (1, 98), (2, 97)]
    """
    return zlib.crc32(device.encode()) % partitions


MAX_TOPIC_BYTES = 65_535  # MQTT's limit on a topic name


def publish_topic_problem(topic: str) -> str | None:
    """Why ``topic`` can't be published to (one phrase), or None when it can.

    paho refuses wildcards and an empty topic with an exception; a broker
    disconnects a client that sends a NUL or an over-long topic.

    >>> [publish_topic_problem(t) for t in ("fw/p1/fault", "", "fw/#", "fw/+/fault")]
    [None, 'empty', 'has a wildcard', 'has a wildcard']
    """
    if not topic:
        return "empty"
    if "+" in topic or "#" in topic:
        return "has a wildcard"
    if "\0" in topic:
        return "has a NUL character"
    try:
        size = len(topic.encode("utf-8"))
    except UnicodeEncodeError:
        return "is not valid UTF-8"
    if size > MAX_TOPIC_BYTES:
        return f"is longer than {MAX_TOPIC_BYTES} bytes"
    return None


class TopicError(ValueError):
    """A template is malformed; the message says how."""


class TopicTemplate:
    def __init__(self, template: str):
        if not isinstance(template, str) or not template:
            raise TopicError("a topic template must be a non-empty string")
        levels = template.split("/")
        if levels.count("{device}") != 1:
            raise TopicError(f"{template!r} must have {{device}} as one whole topic level, once")
        if levels.count("{channel}") > 1:
            raise TopicError(f"{template!r} has {{channel}} more than once")
        for level in levels:
            if level not in ("{device}", "{channel}") and ("{" in level or "}" in level
                                                           or "+" in level or "#" in level):
                raise TopicError(f"{template!r}: level {level!r} may not hold braces or wildcards "
                                 "(placeholders are whole levels: {device}, {channel})")
        self.template = template
        self.levels = levels
        self.device_at = levels.index("{device}")
        self.channel_at = levels.index("{channel}") if "{channel}" in levels else None
        self.subscription = "/".join("+" if lv in ("{device}", "{channel}") else lv for lv in levels)
        self._fixed = [(i, lv) for i, lv in enumerate(levels) if lv not in ("{device}", "{channel}")]

    @property
    def per_channel(self) -> bool:
        return self.channel_at is not None

    def match(self, topic: str) -> tuple[str, str | None] | None:
        """(device, channel or None) when ``topic`` fits, else None."""
        parts = topic.split("/")
        if len(parts) != len(self.levels):
            return None
        for i, level in self._fixed:
            if parts[i] != level:
                return None
        device = parts[self.device_at]
        if not device or len(device) > MAX_DEVICE_ID:
            return None
        if self.channel_at is None:
            return device, None
        channel = parts[self.channel_at]
        if not channel or len(channel) > MAX_CHANNEL:
            return None
        return device, channel

    def __repr__(self) -> str:
        return f"TopicTemplate({self.template!r})"


def _overlap(a: str, b: str) -> bool:
    """Whether two ``+``-only subscriptions can match the same topic."""
    la, lb = a.split("/"), b.split("/")
    return len(la) == len(lb) and all(x == y or "+" in (x, y) for x, y in zip(la, lb, strict=True))


class TopicMatcher:
    """Several templates; a topic is matched against each in turn.

    >>> m = TopicMatcher(["sensors/{device}", "sensors/{device}/{channel}"])
    >>> m.subscriptions, m.match("sensors/p1"), m.match("sensors/p1/flow")
    (['sensors/+', 'sensors/+/+'], ('p1', None), ('p1', 'flow'))
    """

    def __init__(self, templates: str | Sequence[str]):
        if isinstance(templates, str):
            templates = [templates]
        if not templates:
            raise TopicError("no input topic template")
        self.templates = [TopicTemplate(t) for t in templates]
        for i, a in enumerate(self.templates):
            for b in self.templates[i + 1:]:
                if _overlap(a.subscription, b.subscription):
                    raise TopicError(f"templates {a.template!r} and {b.template!r} can match the same "
                                     "topic (the broker would deliver it twice)")
        self.subscriptions = [t.subscription for t in self.templates]
        self._single = self.templates[0] if len(self.templates) == 1 else None

    def match(self, topic: str) -> tuple[str, str | None] | None:
        if self._single is not None:
            return self._single.match(topic)
        for t in self.templates:
            found = t.match(topic)
            if found is not None:
                return found
        return None
