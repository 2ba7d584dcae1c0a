"""Bridged sites that route (broker/bridge_routes.py): two site mosquittos bridged to one
central mosquitto, the coordinator on the central broker, devices on both sites. A site
broker never carries another site's device's task, receipt or resend request, while the
global model chain reaches every site once; the shipped forward-everything bridge does
carry them (so the count would see a leak)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from benchmarks.bridge import SITES, run_sites
from broker import credentials as cred
from broker.bridge_routes import central_acl_rules, check_devices, render_central_acl, render_site_bridge
from broker.cli import app
from fedmq.errors import ConfigError

PER_SITE = 2
ROUNDS = 2


def test_two_bridged_sites_carry_a_federation(tmp_path: Path) -> None:
    # site a routed, site b the shipped forward-everything bridge: one federation shows both
    records, rounds = run_sites(tmp_path, routed=("a",), devices_per_site=PER_SITE, rounds=ROUNDS)
    assert [(r.state, r.accepted) for r in rounds] == [("closed", 2 * PER_SITE)] * ROUNDS
    central = records["central"]
    for site in SITES:
        rec = records[site]
        # every device of the site got its tasks and receipts through its own bridge
        assert {d for (kind, d) in rec.per_device if kind == "task"} >= set(rec.devices)
        assert {d for (kind, d) in rec.per_device if kind == "receipt"} >= set(rec.devices)
        # every model message the coordinator published reached the site, once
        assert central.model and rec.model == central.model, (rec.model, central.model)
    assert records["a"].foreign() == []
    # the count would see a leak: the forward-everything site carried site a's tasks and receipts
    assert {d for _, d in records["b"].foreign()} == set(records["a"].devices)
    assert {k for k, _ in records["b"].foreign()} >= {"task", "receipt"}


def test_routed_sections_list_each_device_once() -> None:
    text = render_site_bridge("north", ["d1", "d2", "d1"], address="central:8883")
    topics = [line for line in text.splitlines() if line.startswith("topic ")]
    assert topics == ["topic fedmq/+/status/# out 1", "topic fedmq/+/update/# out 1", "topic fedmq/+/secagg/# out 1",
                      "topic fedmq/+/model/# in 1", "topic fedmq/+/onnx/# in 1", "topic fedmq/+/round in 1",
                      "topic fedmq/+/task/d1 in 1", "topic fedmq/+/receipt/d1 in 1", "topic fedmq/+/xfer/d1 in 1",
                      "topic fedmq/+/secagg-to/d1 in 1",
                      "topic fedmq/+/task/d2 in 1", "topic fedmq/+/receipt/d2 in 1", "topic fedmq/+/xfer/d2 in 1",
                      "topic fedmq/+/secagg-to/d2 in 1"]
    assert "address central:8883" in text and "remote_clientid bridge-north" in text
    acl = render_central_acl("north", ["d1"], federation="f")
    assert acl.splitlines()[1:] == ["user bridge-north", "topic write fedmq/f/status/d1",
                                    "topic write fedmq/f/update/d1/#", "topic write fedmq/f/secagg/d1/#",
                                    "topic read fedmq/f/model/#", "topic read fedmq/f/onnx/#",
                                    "topic read fedmq/f/round", "topic read fedmq/f/task/d1",
                                    "topic read fedmq/f/receipt/d1", "topic read fedmq/f/xfer/d1",
                                    "topic read fedmq/f/secagg-to/d1"]


@pytest.mark.parametrize("devices", [[], ["ok", "bad/id"], ["+"]])
def test_bad_device_lists_are_refused(devices: list[str]) -> None:
    with pytest.raises(ConfigError):
        check_devices(devices)


def test_cli_writes_both_files_and_refuses_bad_ids(tmp_path: Path) -> None:
    listing = tmp_path / "devices.txt"
    listing.write_text("d2\n\nd3\n")
    out = tmp_path / "out"
    ok = CliRunner().invoke(app, ["bridge-config", "--site", "s1", "--devices", "d1", "--devices-file", str(listing),
                                  "--out-dir", str(out)])
    assert ok.exit_code == 0, ok.output
    assert (out / "site-bridge.conf").read_text().count("topic fedmq/+/task/") == 3
    assert "user bridge-s1" in (out / "central-acl").read_text()
    bad = CliRunner().invoke(app, ["bridge-config", "--site", "s2", "--devices", "d1,a#b", "--out-dir",
                                   str(tmp_path / "bad")])
    assert bad.exit_code == 1 and "device id" in bad.output
    assert not (tmp_path / "bad").exists()


def test_the_bridge_block_stays_in_the_central_acl_across_add_device(tmp_path: Path) -> None:
    acl = tmp_path / "auth" / "acl"
    runner = CliRunner()

    def add_device(name: str) -> None:
        result = runner.invoke(app, ["add-device", name, "--passwd-file", str(tmp_path / "auth" / "passwd"),
                                     "--acl-file", str(acl), "--ca-dir", str(tmp_path / "no-ca"), "--out-dir",
                                     str(tmp_path / name), "--broker-url", "mqtt://127.0.0.1:1883", "--hasher",
                                     "fedmq", "--no-predict-account"])
        assert result.exit_code == 0, result.output

    def bridge(devices: str) -> None:
        result = runner.invoke(app, ["bridge-config", "--site", "s1", "--devices", devices, "--out-dir",
                                     str(tmp_path / "b"), "--acl-file", str(acl)])
        assert result.exit_code == 0, result.output

    add_device("bridge-s1")
    bridge("d1,d2")
    add_device("bridge-s2")  # a later account rewrites the ACL and keeps the bridge's block
    assert cred.read_acl(acl).bridges == {"bridge-s1": central_acl_rules("s1", ["d1", "d2"])}
    bridge("d2")  # the site's devices changed: its block is replaced
    assert cred.read_acl(acl).bridges == {"bridge-s1": central_acl_rules("s1", ["d2"])}
    assert acl.read_text().startswith(cred.SHIPPED_ACL.read_text())
