"""Beyond one broker: devices on a site broker bridged to the central broker where the
coordinator connects (broker/bridge/), both brokers running the shipped configuration
(TLS, passwords, ACLs), carry a federation end to end."""

from __future__ import annotations

import getpass
import shutil
from pathlib import Path

import pytest

from broker import credentials as cred
from broker.bridge_routes import render_central_acl, render_site_bridge
from broker.conf import SHIPPED_CONF, BrokerDirs, render_mosquitto_conf
from broker.launch import MosquittoProcess, free_port, mosquitto_binary
from coordinator.config import config_from_dict
from coordinator.service import Coordinator
from fleet.fleet import Fleet, FleetSpec

from .conftest import Account, make_account, start_shipped_mosquitto

BRIDGE = Path(__file__).resolve().parents[2] / "broker" / "bridge"
FED = "br"
N = 3


def _secret_files(account: Account, folder: Path) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "username").write_text(account.name + "\n")
    (folder / "password").write_text(account.password + "\n")
    return folder / "username", folder / "password"


@pytest.mark.parametrize("routed", [False, True], ids=["shipped", "routed"])
def test_bridged_site_broker_carries_a_federation(tmp_path: Path, routed: bool) -> None:
    """The shipped bridge and central ACL block, or the routed ones of 'fedmq broker
    bridge-config' (the central ACL then names the site's devices only)."""
    accounts: dict[str, Account] = {}
    names = [f"vd-{i:05d}" for i in range(N)]

    def central_setup(passwd: Path, acl: Path, ca_dir: Path) -> dict[str, Account]:
        common = {"passwd": passwd, "acl": acl, "ca_dir": ca_dir, "root": tmp_path / "central"}
        accounts["coord"] = make_account("coord", "coordinator", federation=FED, **common)
        accounts["bridge"] = make_account("bridge-site1", "device", **common)
        block = (render_central_acl("site1", names) if routed else
                 (BRIDGE / "central-acl").read_text().replace("user NAME", "user bridge-site1"))
        acl.write_text(acl.read_text() + "\n" + block)
        return accounts

    central = start_shipped_mosquitto(tmp_path / "central", central_setup)
    site_root = tmp_path / "site"
    dirs = BrokerDirs(site_root / "config", site_root / "data", site_root / "log")
    for folder in (dirs.config, dirs.data, dirs.log, dirs.certs):
        folder.mkdir(parents=True, exist_ok=True)
    site_ca = site_root / "ca"
    cred.init_ca(site_ca, ["localhost", "127.0.0.1"])
    for name in ("ca.crt", "server.crt", "server.key"):
        shutil.copyfile(site_ca / name, dirs.certs / name)
    shutil.copyfile(central.ca_dir / "ca.crt", dirs.certs / "central-ca.crt")
    shutil.copyfile(accounts["bridge"].folder / "client.crt", dirs.certs / "bridge.crt")
    shutil.copyfile(accounts["bridge"].folder / "client.key", dirs.certs / "bridge.key")
    devices = {}
    for i in range(N):
        name = f"vd-{i:05d}"
        devices[name] = make_account(name, "device", passwd=dirs.passwd, acl=dirs.acl, ca_dir=site_ca,
                                     root=site_root)
        _secret_files(devices[name], tmp_path / "creds" / name)
    # the shipped bridge section, with the three lines an operator edits
    shipped = (BRIDGE / "site-bridge.conf").read_text()
    bridge = ((render_site_bridge("site1", names) if routed else shipped)
              .replace("address central.example.net:8883", f"address 127.0.0.1:{central.tls_port}")
              .replace("remote_password CHANGE-ME", f"remote_password {accounts['bridge'].password}"))
    plain, tls = free_port(), free_port()
    conf = site_root / "mosquitto.conf"
    conf.write_text(render_mosquitto_conf(dirs, plain_port=plain, tls_port=tls, run_as=getpass.getuser(),
                                          template=SHIPPED_CONF.read_text() + "\n" + bridge))
    site = MosquittoProcess(site_root, tls, conf, mosquitto_binary())
    site.start()
    try:
        user_file, pass_file = _secret_files(accounts["coord"], tmp_path / "creds" / "coord")
        spec = FleetSpec(broker_url=f"mqtt://127.0.0.1:{plain}", federation=FED, devices=N, processes=1, seed=3,
                         work_dir=tmp_path / "fleet", credentials_dir=tmp_path / "creds")
        cfg = config_from_dict({
            "federation": FED, "task": "digits-logreg", "rounds": 2, "seed": 1, "state_dir": str(tmp_path / "state"),
            "broker": {"url": f"mqtt://127.0.0.1:{central.plain_port}", "username_file": str(user_file),
                       "password_file": str(pass_file)},
            "round": {"devices_per_round": N, "over_selection": 1.0, "deadline_s": 30.0, "min_devices": N,
                      "wait_for_devices_s": 60.0},
            "plan": {"local_epochs": 1, "lr": 0.1, "density": 0.5}, "publish": {"onnx": False}})
        with Fleet(spec) as fleet:
            assert fleet.wait_connected(N, 60.0), fleet.totals()
            result = Coordinator(cfg).run()
            fleet.wait_totals(lambda t: t["counters"].get("accepted", 0) >= 2 * N, 20.0)
            results = fleet.stop()
    finally:
        site.kill()
        central.broker.kill()
    assert [(r.state, r.accepted) for r in result.records] == [("closed", N), ("closed", N)]
    # the devices fetched the retained global models through the bridge and got every receipt
    assert sum(d["counters"].get("accepted", 0) for d in results) == 2 * N
    assert all(d["counters"].get("rejected", 0) == 0 for d in results)
