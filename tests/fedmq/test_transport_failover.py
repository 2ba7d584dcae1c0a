"""Broker URL failover (``BrokerSettings.failover_urls``): a link moves to another node when
its node refuses or dies, against real mosquitto brokers (two brokers stand for two nodes
of a cluster; what a real cluster keeps across nodes is tested in tests/broker)."""

from __future__ import annotations

import pytest

from broker.launch import free_port
from fedmq.errors import BrokerConnectError, ConfigError
from fedmq.transport import open_link
from fedmq.transport.cluster import RetainedFanoutLink
from fedmq.transport.counting import CountingLink
from fedmq.transport.link import MqttLink
from fedmq.transport.netloop import NetworkLoop, SharedLoopLink
from fedmq.transport.settings import BrokerSettings
from tests.waiting import until


def test_failover_urls_from_a_configuration_table() -> None:
    s = BrokerSettings.from_mapping({"url": "mqtt://127.0.0.1:1", "failover_urls": ["127.0.0.1:2", "mqtt://h:3"]})
    assert s.urls == ("mqtt://127.0.0.1:1", "127.0.0.1:2", "mqtt://h:3")
    assert BrokerSettings().failover_urls == ()
    with pytest.raises(ConfigError, match="failover_urls"):
        BrokerSettings.from_mapping({"failover_urls": "mqtt://h:3"})
    with pytest.raises(ConfigError, match="scheme"):
        BrokerSettings(url="mqtt://h:1", failover_urls=("mqtts://h:2",))
    with pytest.raises(ConfigError, match="in-process"):
        BrokerSettings(url="memory://bus", failover_urls=("mqtt://h:2",))
    with pytest.raises(ConfigError, match="port"):
        BrokerSettings(url="mqtt://h:1", failover_urls=("mqtt://h:99999",))


def test_connect_uses_the_first_node_that_accepts(mosquitto) -> None:
    dead = f"mqtt://127.0.0.1:{free_port()}"
    link = MqttLink(BrokerSettings(url=dead, failover_urls=(mosquitto.url,)), client_id="fo-first")
    link.connect(timeout=10.0)
    try:
        assert link.current_url == mosquitto.url
        link.subscribe("fo/t", timeout=10.0)
        link.publish_wait("fo/t", b"x", timeout=10.0)
        assert link.inbox.get(timeout=10.0).payload == b"x"
    finally:
        link.close()
    # every node refused: one error naming each
    other = f"mqtt://127.0.0.1:{free_port()}"
    with pytest.raises(BrokerConnectError) as info:
        MqttLink(BrokerSettings(url=dead, failover_urls=(other,)), client_id="fo-none").connect(timeout=5.0)
    assert info.value.cause == "refused"
    assert dead in str(info.value) and other in str(info.value)


@pytest.mark.parametrize("shared_loop", [False, True], ids=["own-thread", "shared-loop"])
def test_a_killed_node_s_link_moves_to_the_next_node(mosquitto_factory, shared_loop: bool) -> None:
    first, second = mosquitto_factory(), mosquitto_factory()
    settings = BrokerSettings(url=first.url, failover_urls=(second.url,), reconnect_min=0.2, reconnect_max=1.0)
    loop = NetworkLoop() if shared_loop else None
    link = SharedLoopLink(settings, client_id="fo-dev", loop=loop) if loop else MqttLink(settings, client_id="fo-dev")
    publisher = MqttLink(BrokerSettings(url=second.url), client_id="fo-pub").connect(timeout=10.0)
    try:
        link.connect(timeout=10.0)
        link.subscribe("fo/task", timeout=10.0)
        assert link.current_url == first.url
        first.kill()
        # the reconnect goes to the other node, and the link subscribes again there
        assert until(lambda: link.connected and link.connects == 2, 30.0)
        assert link.current_url == second.url and link.failovers >= 1
        publisher.publish_wait("fo/task", b"after the kill", timeout=10.0)
        assert link.inbox.get(timeout=10.0).payload == b"after the kill"
        link.publish_wait("fo/up", b"up", timeout=10.0)
    finally:
        link.close()
        publisher.close()
        if loop is not None:
            loop.stop()


def test_retained_messages_go_to_every_node_and_a_dead_node_blocks_nothing(mosquitto_factory) -> None:
    main, other = mosquitto_factory(), mosquitto_factory()
    dead = f"mqtt://127.0.0.1:{free_port()}"
    link = open_link(BrokerSettings(url=main.url, retain_urls=(other.url, dead)), client_id="fo-coord")
    assert isinstance(link, RetainedFanoutLink)
    link.connect(timeout=10.0)
    try:
        link.publish_wait("fo/model/latest", b"v1", retain=True, timeout=10.0)
        link.publish("fo/round", b"r1", retain=True).wait(10.0)
        link.publish_wait("fo/live", b"not kept", timeout=10.0)
        for broker in (main, other):
            reader = MqttLink(BrokerSettings(url=broker.url), client_id="fo-reader").connect(timeout=10.0)
            try:
                reader.subscribe(["fo/model/latest", "fo/round", "fo/live"], timeout=10.0)
                got = {reader.inbox.get(timeout=10.0).topic for _ in range(2)}
                assert got == {"fo/model/latest", "fo/round"}
            finally:
                reader.close()
        assert link.settings.retain_urls == (other.url, dead)
        # what the coordinator's CountingLink does: the inbox it sets is the one filled
        counted = CountingLink(link)
        counted.subscribe("fo/round", timeout=10.0)
        assert counted.inbox.get(timeout=10.0).payload == b"r1"
        assert counted.traffic.msgs_in == 1
    finally:
        link.close()
