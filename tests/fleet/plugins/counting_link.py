"""A test-only link: the in-memory bus under its own URL scheme ``counting://NAME``, counting
every publish its clients make."""

from __future__ import annotations

from collections import Counter

from fedmq.transport import register_link
from fedmq.transport.memory import MemoryLink, get_bus
from fedmq.transport.settings import BrokerSettings

PUBLISHES: Counter[str] = Counter()


class CountingLink(MemoryLink):
    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False):
        PUBLISHES[self.client_id] += 1
        return super().publish(topic, payload, qos=qos, retain=retain)


def counting_link(settings: BrokerSettings, client_id: str = "") -> CountingLink:
    return CountingLink(get_bus("counting-" + settings.url.split("://", 1)[1]), settings, client_id)


register_link("counting", counting_link)
