"""A federation across a real three-node RabbitMQ cluster, with a node killed mid-round.

The coordinator is on node 0 and sends every retained message to nodes 1 and 2 as well
(``broker.retain_urls``: RabbitMQ keeps retained messages per node); dev-0 and dev-1 are on
node 1, dev-2 on node 2, each with the other nodes as ``broker.failover_urls``. dev-0 stops
while training in round 2, node 1 is killed (SIGKILL), dev-0 goes on: dev-0 and dev-1 move
to another node and the federation finishes. The fault suite's invariants are checked on
what the run left (benchmarks.faults: every round closed, nothing lost, nothing counted
twice, nothing unsettled, nothing aggregated that no device knows).
"""

from __future__ import annotations

import time
import tomllib
from pathlib import Path

import pytest

from benchmarks import faults
from broker.rabbitmq import RabbitCluster, start_rabbitmq_cluster
from fleet.launch import write_toml

pytestmark = pytest.mark.timeout(420)

#: Node of each device; the coordinator is on node 0.
NODE_OF = {"dev-0": 1, "dev-1": 1, "dev-2": 2}
KILLED = 1
#: The user guest, and the policy without which a client whose node died cannot connect to
#: another node (its subscription queue's home node is down): MQTT subscription queues
#: mirrored to every node.
DEFINITIONS = {
    "users": [{"name": "guest", "password": "guest", "tags": ["administrator"]}],
    "vhosts": [{"name": "/"}],
    "permissions": [{"user": "guest", "vhost": "/", "configure": ".*", "write": ".*", "read": ".*"}],
    "policies": [{"vhost": "/", "name": "mqtt-sessions-mirrored", "pattern": "^mqtt-subscription-",
                  "apply-to": "queues", "priority": 0, "definition": {"ha-mode": "all", "ha-sync-mode": "automatic"}}],
}


class _ClusterBroker:
    """What benchmarks.faults.TrialFederation needs of its broker: a URL and kill()."""

    def __init__(self, cluster: RabbitCluster) -> None:
        self.cluster = cluster
        self.url = cluster.nodes[0].url

    def kill(self) -> None:
        self.cluster.stop()


def _wait_log(path: Path, text: str, fleet: faults.TrialFederation, limit: float = 120.0) -> bool:
    """Wait until the log of another process holds ``text`` (polled: nothing to wait on)."""
    end = time.monotonic() + limit
    while time.monotonic() < end and fleet.coordinator is not None and fleet.coordinator.poll() is None:
        if path.exists() and text in path.read_text(errors="replace"):
            return True
        time.sleep(0.1)
    return False


def _rewrite(path: Path, broker: dict[str, object]) -> None:
    cfg = tomllib.loads(path.read_text())
    for flat in ("broker_url", "protocol"):
        cfg.pop(flat, None)
    cfg["broker"] = {**cfg.get("broker", {}), **broker}
    write_toml(path, cfg)


def test_a_federation_survives_the_kill_of_a_node_mid_round(tmp_path: Path) -> None:
    cluster = start_rabbitmq_cluster(tmp_path / "rabbit", nodes=3, definitions=DEFINITIONS)
    fleet = faults.TrialFederation(tmp_path / "fed", broker=_ClusterBroker(cluster))
    try:
        urls = [n.url for n in cluster.nodes]
        (tmp_path / "password").write_text("guest\n")
        credentials = {"protocol": "3.1.1", "username": "guest", "password_file": str(tmp_path / "password")}
        _rewrite(fleet.work / "coordinator.toml", {"url": urls[0], "retain_urls": urls[1:], **credentials})
        (tmp_path / "username").write_text("guest\n")
        for device, node in NODE_OF.items():
            others = [u for i, u in enumerate(urls) if i != node]
            _rewrite(fleet.work / "devices" / device / "edge.toml",
                     {"url": urls[node], "failover_urls": others, "protocol": "3.1.1",
                      "username_file": str(tmp_path / "username"), "password_file": str(tmp_path / "password")})
        pause = tmp_path / "paused"
        hook = {"FEDMQ_EDGE_TEST_PAUSE_AT": "training", "FEDMQ_EDGE_TEST_PAUSE_ROUND": str(faults.FAULT_ROUND),
                "FEDMQ_EDGE_TEST_PAUSE_FILE": str(pause)}
        fleet.start_coordinator()
        # The devices' retained online statuses stay on their own nodes, and a wildcard
        # subscription gets no retained message on RabbitMQ: the coordinator hears a device
        # only from a status published while it is subscribed (docs/scale.md).
        assert _wait_log(fleet.work / "coordinator.log", "waiting for devices", fleet), "coordinator never ready"
        for device in NODE_OF:
            fleet.start_device(device, **(hook if device == "dev-0" else {}))
        assert faults._wait_file(pause, 180.0, fleet), "dev-0 never reached training in round 2"
        cluster.kill(KILLED)
        pause.unlink()
        assert fleet.coordinator is not None
        fleet.coordinator.wait(timeout=300)
        assert fleet.coordinator.returncode == 0
        faults._settle(fleet)
        assert fleet.device_exits() == []

        rounds = fleet.rounds()
        assert [r["round"] for r in rounds] == list(range(1, faults.ROUNDS + 1))
        assert all(r["state"] == "closed" for r in rounds), rounds
        aggregated = fleet.aggregated()
        known = set()
        for device, entries in fleet.ledgers().items():
            assert entries, f"{device} sent nothing"
            for e in entries:
                key = (device, e["transfer_id"])
                known.add(key)
                assert e["state"] != "sent", f"{device} round {e['round']}: still in flight"
                if e["state"] == "accepted":
                    assert key in aggregated, f"{device} round {e['round']}: accepted, not aggregated (lost)"
                else:
                    assert key not in aggregated, f"{device} round {e['round']}: aggregated and rolled back"
        assert aggregated <= known, "aggregated updates that no device knows"
        # dev-0 sent its round-2 update after its node died, from another node
        assert any(e["round"] == faults.FAULT_ROUND for e in fleet.ledgers()["dev-0"])
        for device in ("dev-0", "dev-1"):
            assert "fails over to broker" in (fleet.work / "devices" / device / "edge.log").read_text()
    finally:
        fleet.close()
