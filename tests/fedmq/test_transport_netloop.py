"""One network thread for many MQTT links (fedmq.transport.netloop) against a real mosquitto."""

from __future__ import annotations

import threading

from fedmq.transport.link import MqttLink
from fedmq.transport.netloop import NetworkLoop, SharedLoopLink
from fedmq.transport.settings import BrokerSettings
from tests.waiting import until


def test_one_loop_drives_many_links_through_a_broker_restart(mosquitto) -> None:
    n = 100
    threads_before = threading.active_count()
    loop = NetworkLoop()
    settings = BrokerSettings(url=mosquitto.url, reconnect_min=0.2, reconnect_max=1.0)
    links = [SharedLoopLink(settings, client_id=f"nl-{i}", loop=loop) for i in range(n)]
    woken = [threading.Event() for _ in range(n)]
    for link, event in zip(links, woken):
        link.on_inbox = event.set
        link.connect(timeout=30.0)
        link.subscribe(f"nl/{link.client_id}", timeout=30.0)
    # n connections, one thread more than before
    assert threading.active_count() == threads_before + 1
    publisher = MqttLink(BrokerSettings(url=mosquitto.url), client_id="nl-pub").connect(timeout=30.0)
    try:
        for link in links:
            publisher.publish_wait(f"nl/{link.client_id}", b"before")
        assert all(e.wait(30.0) for e in woken)
        assert [link.inbox.get(timeout=1.0).payload for link in links] == [b"before"] * n

        mosquitto.kill()
        assert until(lambda: not any(link.connected for link in links), 30.0)
        mosquitto.start()
        # each link came back by itself, after its jittered back-off, with its subscription
        assert until(lambda: all(link.connected and link.connects == 2 for link in links), 60.0)
        assert publisher.wait_connected(30.0)
        for e in woken:
            e.clear()
        for link in links:
            publisher.publish_wait(f"nl/{link.client_id}", b"after")
        assert all(e.wait(30.0) for e in woken)
        assert [link.inbox.get(timeout=1.0).payload for link in links] == [b"after"] * n
        # QoS 1 publishes from the links go out through the loop too (publish_wait raises
        # without the broker's PUBACK)
        for link in links[:10]:
            link.publish_wait("nl/up", link.client_id.encode(), timeout=30.0)
    finally:
        publisher.close()
        for link in links:
            link.close()
        assert until(lambda: loop.links == 0, 10.0)
        loop.stop()
