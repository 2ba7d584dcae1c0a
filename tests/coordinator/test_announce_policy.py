"""A round policy of two phases registered by a test (tests/coordinator/announce_policy.py),
run end to end with real edge agents, over the in-memory bus and through mosquitto, by the
unchanged round driver."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from coordinator.service import Coordinator
from fedmq.transport import open_link
from fedmq.transport.settings import BrokerSettings

from .announce_policy import NAME, AckResponder
from .downlink_fleet import coordinator_config, device_threads

N = 4
ROUNDS = 2


@pytest.fixture(params=["memory", "mosquitto"])
def transport(request: pytest.FixtureRequest) -> tuple[str, str]:
    if request.param == "memory":
        return f"memory://announce-{secrets.token_hex(4)}", "5"
    broker = request.getfixturevalue("mosquitto")
    return broker.url, broker.protocol


def test_only_the_devices_that_acknowledge_the_announcement_train(tmp_path: Path, transport) -> None:
    url, protocol = transport
    fed = f"ann{secrets.token_hex(2)}"
    fleet = device_threads(tmp_path, url, protocol, fed, N)
    silent = f"dev{N - 1}"  # online and eligible, but never acknowledges
    responder_link = open_link(BrokerSettings(url=url, protocol=protocol), client_id="acks").connect()
    try:
        for i in range(N):
            fleet.start(i)
        with AckResponder(responder_link, fed, [f"dev{i}" for i in range(N - 1)]) as responder:
            cfg = coordinator_config(url, protocol, tmp_path / "coord", fed, rounds=ROUNDS, per_round=N,
                                     min_devices=N)
            coord = Coordinator(cfg, policy=NAME)
            result = coord.run()
    finally:
        fleet.stop_all()
        responder_link.close()
    phases = coord.policy.phases
    assert [(r.state, r.accepted) for r in result.records] == [("closed", N - 1)] * ROUNDS
    for rec in result.records:
        assert phases.acked[rec.round] == frozenset(f"dev{i}" for i in range(N - 1))
        status = {p.device: p.status for p in rec.participations}
        assert status[silent] == "dropped", status
    assert {d for d, _ in responder.announced} == {f"dev{i}" for i in range(N - 1)}
    assert fleet.agents[silent].trained_from == {}, "a device that never acknowledged was sent a task"
