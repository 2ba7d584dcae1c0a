"""The fleet's shaped link under the agent's counting wrapper, against mosquitto."""

from __future__ import annotations

import queue

from fedmq.transport.counting import CountingLink
from fedmq.transport.link import MqttLink
from fedmq.transport.settings import BrokerSettings
from fleet.netsim import ShapedLink

WAIT_S = 10.0


def test_a_counting_link_over_a_shaped_link_receives_and_counts(mosquitto) -> None:
    settings = BrokerSettings(url=mosquitto.url, protocol=mosquitto.protocol)
    # As the agent wraps the fleet's link: the counting inbox must be the one the MQTT link fills.
    first = CountingLink(ShapedLink(MqttLink(settings, client_id="shaped"), bandwidth=1e9, latency_s=0.0))
    peer = MqttLink(settings, client_id="peer").connect()
    try:
        first.connect()
        first.subscribe("t/x")
        peer.publish_wait("t/x", b"12345")
        msg = first.inbox.get(timeout=WAIT_S)
        assert (msg.topic, msg.payload) == ("t/x", b"12345")
        assert first.traffic.snapshot()["bytes_in"] == 5
        first.close()
        # A new connection for the same device adds to the same counters.
        second = CountingLink(ShapedLink(MqttLink(settings, client_id="shaped"), bandwidth=1e9, latency_s=0.0),
                              first.traffic)
        second.connect()
        try:
            second.subscribe("t/x")
            peer.publish_wait("t/x", b"678")
            assert second.inbox.get(timeout=WAIT_S).payload == b"678"
            second.publish_wait("t/y", b"ab")
            assert second.traffic.snapshot() == {"bytes_in": 8, "msgs_in": 2, "bytes_out": 2, "msgs_out": 1}
            assert second.traffic is first.traffic
            try:
                first.inbox.get_nowait()
                raise AssertionError("the closed link received a message")
            except queue.Empty:
                pass
        finally:
            second.close()
    finally:
        peer.close()
