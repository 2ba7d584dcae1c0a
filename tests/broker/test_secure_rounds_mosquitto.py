"""Secure rounds end to end through the shipped mosquitto (TLS, passwords, the shipped ACL):
every secure-aggregation message travels on the devices' own topics, the federation learns,
and what a subscriber with the coordinator's rights reads of one device's masked input is not
its update."""

from __future__ import annotations

import queue
from pathlib import Path

import numpy as np

from coordinator.config import SecureAggregationConfig, config_from_dict
from coordinator.service import Coordinator
from coordinator.state import StateDB
from fedmq.wire import topics
from fedmq.secagg import RingSpec
from fedmq.secagg import messages as sm
from fedmq.transport import Message, open_link
from fedmq.transport.settings import BrokerSettings
from fleet.fleet import Fleet, FleetSpec

from .conftest import Account, make_account, start_shipped_mosquitto

FED = "sa"
N = 5
ROUNDS = 3


def _secret_files(account: Account, folder: Path) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "username").write_text(account.name + "\n")
    (folder / "password").write_text(account.password + "\n")
    return folder / "username", folder / "password"


def test_secure_rounds_through_the_shipped_mosquitto_learn(tmp_path: Path) -> None:
    accounts: dict[str, Account] = {}

    def setup(passwd: Path, acl: Path, ca_dir: Path) -> dict[str, Account]:
        common = {"passwd": passwd, "acl": acl, "ca_dir": ca_dir, "root": tmp_path / "broker"}
        accounts["coord"] = make_account("coord", "coordinator", federation=FED, **common)
        accounts["watch"] = make_account("watch", "coordinator", federation=FED, **common)
        for i in range(N):
            name = f"vd-{i:05d}"
            accounts[name] = make_account(name, "device", **common)
            _secret_files(accounts[name], tmp_path / "creds" / name)
        return accounts

    dep = start_shipped_mosquitto(tmp_path / "broker", setup)
    url = f"mqtt://127.0.0.1:{dep.plain_port}"
    try:
        user_file, pass_file = _secret_files(accounts["coord"], tmp_path / "creds-coord")
        watch_user, watch_pass = _secret_files(accounts["watch"], tmp_path / "creds-watch")
        # What an operator of the broker reads: every secure message of the federation.
        watcher = open_link(BrokerSettings(url=url, username_file=str(watch_user), password_file=str(watch_pass)),
                            client_id="watch").connect()
        seen: queue.SimpleQueue[Message] = queue.SimpleQueue()
        watcher.subscribe(f"fedmq/{FED}/secagg/#", inbox=seen)
        spec = FleetSpec(broker_url=url, federation=FED, devices=N, processes=1, seed=3, samples_per_device=64,
                         work_dir=tmp_path / "fleet", credentials_dir=tmp_path / "creds")
        cfg = config_from_dict({
            "federation": FED, "task": "digits-logreg", "rounds": ROUNDS, "seed": 1,
            "state_dir": str(tmp_path / "state"),
            "broker": {"url": url, "username_file": str(user_file), "password_file": str(pass_file)},
            "round": {"devices_per_round": N, "over_selection": 1.0, "deadline_s": 60.0, "min_devices": N,
                      "wait_for_devices_s": 60.0},
            "plan": {"local_epochs": 1, "lr": 0.1, "density": 0.5}, "publish": {"onnx": False},
            "evaluation": {"data": "digits"}, "secure_aggregation": {"enabled": True}})
        with Fleet(spec) as fleet:
            assert fleet.wait_connected(N, 60.0), fleet.totals()
            result = Coordinator(cfg).run()
            fleet.wait_totals(lambda t: t["counters"].get("accepted", 0) >= ROUNDS * N, 30.0)
            results = fleet.stop()
        watcher.close()
    finally:
        dep.broker.kill()
    assert [(r.state, r.accepted) for r in result.records] == [("closed", N)] * ROUNDS
    accs = [r.test_accuracy for r in result.records]
    assert accs[-1] is not None and accs[-1] > 0.3, accs  # digits-logreg starts at chance (10%)
    # every device settled each round's masked input as aggregated; nothing was refused
    assert sum(d["counters"].get("accepted", 0) for d in results) == ROUNDS * N
    assert not any(k.startswith("secagg_") for d in results for k in d["counters"]), results
    # (a survivor's shares that come after the unmasking closed, every secret rebuilt, count as
    # out_of_phase: expected, not a fault)
    db = StateDB(tmp_path / "state")
    try:
        refused = db.rejections()
    finally:
        db.close()
    assert not any(k.startswith("secagg_") and k != "secagg_out_of_phase" for k in refused), refused
    settings = SecureAggregationConfig()
    ring = RingSpec(settings.clip, settings.scale, N)
    kinds: dict[str, int] = {}
    while not seen.empty():
        msg = seen.get()
        device, kind = topics.parse_secagg_up(FED, msg.topic) or ("", "")
        assert device, msg.topic
        kinds[kind] = kinds.get(kind, 0) + 1
        if kind == "input":
            y = sm.MaskedInput.from_bytes(msg.payload).array().astype(np.int64)
            # An update's integers lie within qmax of 0 (mod 2^bits); a masked input is uniform
            # in the ring, so most of its values lie outside.
            near = np.minimum(y, (1 << ring.bits) - y) <= ring.qmax
            assert near.mean() < 0.5, near.mean()
    assert kinds == {"keys": ROUNDS * N, "shares": ROUNDS * N, "input": ROUNDS * N, "reveal": ROUNDS * N}
