"""Bridged sites: bytes on each site-to-central bridge, routed (broker/bridge_routes.py) vs
forward-everything (the shipped broker/bridge/site-bridge.conf).

One run: a central mosquitto, two site mosquittos (``a``, ``b``) bridged to it, each
bridge through a byte-counting TCP relay on loopback (the bytes the bridge link carried,
MQTT framing included, each way); the real coordinator on the central broker, a fleet of
virtual devices (fleet/, the product's device code) on each site, a synchronous
federation on digits-logreg. A wildcard subscriber (``fedmq/#``, QoS 1) on each site
broker records every message the site broker relayed: which device's tasks, receipts and
resend requests it carried, and how often each model topic arrived.

The brokers run anonymous on plain TCP (the shipped TLS, passwords and ACLs across a
bridge: tests/broker/test_bridge.py); the bridge section is the shipped one without its
TLS file lines.

Rerun: ``python -m benchmarks.bridge --devices-per-site 20 --rounds 3``.
"""

from __future__ import annotations

import argparse
import socket
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from broker.bridge_routes import PER_DEVICE_DOWN, SITE_BRIDGE_TEMPLATE, render_site_bridge
from broker.launch import LOOPBACK
from fleet.fleet import Fleet, FleetSpec
from fleet.launch import Broker, build_coordinator, coordinator_options, start_broker, write_toml

FED = "sites"
SITES = ("a", "b")
_NAMES = "abcdefghijklmnopqrstuvwxyz"
_TLS_LINES = ("bridge_cafile", "bridge_certfile", "bridge_keyfile")
_WAIT_S = 120.0


class LinkMeter:
    """A TCP relay ``127.0.0.1:port -> 127.0.0.1:target``: counts the bytes it carries each way.

    ``up`` is what the connecting side (the site's bridge) sent, ``down`` what it received,
    in bytes. Every accepted connection is relayed by two threads until either side closes.
    """

    def __init__(self, target: int) -> None:
        self.target = target
        self.up = 0
        self.down = 0
        self._lock = threading.Lock()
        self._server = socket.create_server((LOOPBACK, 0))
        self.port: int = self._server.getsockname()[1]
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, name=f"meter-{self.port}", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                near, _ = self._server.accept()
            except OSError:
                return
            try:
                far = socket.create_connection((LOOPBACK, self.target))
            except OSError:
                near.close()
                continue
            with self._lock:
                self._sockets += [near, far]
            threading.Thread(target=self._pump, args=(near, far, "up"), daemon=True).start()
            threading.Thread(target=self._pump, args=(far, near, "down"), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, way: str) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
                with self._lock:
                    setattr(self, way, getattr(self, way) + len(data))
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._server.close()
        with self._lock:
            for s in self._sockets:
                s.close()


@dataclass
class SiteRecord:
    """What one site broker relayed, seen by a wildcard subscriber on it."""

    devices: list[str]
    #: (kind, device) -> messages, for the per-device kinds (task, receipt, xfer).
    per_device: Counter[tuple[str, str]] = field(default_factory=Counter)
    #: model/... topic -> non-empty messages (an empty retained publish clears a topic).
    model: Counter[str] = field(default_factory=Counter)
    #: first topic level after the federation -> topic + payload bytes.
    bytes_by_kind: Counter[str] = field(default_factory=Counter)
    up: int = 0
    down: int = 0

    def foreign(self) -> list[tuple[str, str]]:
        """Per-device messages addressed to a device of another site."""
        return sorted(k for k in self.per_device if k[1] not in self.devices)


class _Watcher:
    def __init__(self, port: int, record: SiteRecord) -> None:
        self.record = record
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"watch-{port}", protocol=mqtt.MQTTv5)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(f"fedmq/{FED}/#", qos=1)
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self._ready.set()
        self.client.on_message = self._on_message
        self.client.connect(LOOPBACK, port, keepalive=30)
        self.client.loop_start()
        if not self._ready.wait(_WAIT_S):
            raise RuntimeError(f"watcher on port {port} did not subscribe")

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        parts = msg.topic.split("/")
        kind = parts[2]
        with self._lock:
            self.record.bytes_by_kind[kind] += len(msg.topic) + len(msg.payload)
            if kind in PER_DEVICE_DOWN and len(parts) == 4:
                self.record.per_device[(kind, parts[3])] += 1
            elif kind == "model" and msg.payload:
                self.record.model[msg.topic] += 1

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def bridge_section(site: str, devices: list[str], central_port: int, *, routed: bool) -> str:
    """The site's bridge section over plain TCP: routed to ``devices``, or the shipped
    forward-everything one with this site's names."""
    template = "".join(line for line in SITE_BRIDGE_TEMPLATE.read_text().splitlines(keepends=True)
                       if not line.startswith(_TLS_LINES))
    address = f"{LOOPBACK}:{central_port}"
    if routed:
        return render_site_bridge(site, devices, address=address, template=template)
    return (template.replace("address central.example.net:8883", f"address {address}")
            .replace("connection fedmq-central", f"connection fedmq-central-{site}")
            .replace("bridge-site1", f"bridge-{site}"))


def run_sites(work: Path, *, routed: tuple[str, ...], devices_per_site: int = 2, rounds: int = 2,
              seed: int = 1, sites: tuple[str, ...] = SITES, task: str = "digits-logreg",
              data: str = "digits") -> tuple[dict[str, SiteRecord], list[Any]]:
    """One federation across two bridged sites; returns each site's record (and the
    central broker's, key ``central``: what the coordinator's side carried) and the
    coordinator's round records.

    Args:
        routed: the sites whose bridge is routed; the others forward everything.
        sites: site names (each a fedmq id); devices of site S are ``sS-00000``, ...
        task, data: the federation's task and the fleet's data (fleet.fleet.FleetSpec).

    Raises:
        RuntimeError: the fleets did not connect within 120 s.
        BrokerLaunchError: a mosquitto did not start.
    """
    n = devices_per_site * len(sites)
    central = start_broker("mosquitto", work / "central")
    records = {"central": SiteRecord([])}
    started: list[Broker | LinkMeter | _Watcher] = [central, _Watcher(central.process.port, records["central"])]
    fleets: list[Fleet] = []
    try:
        site_links = {}
        for site in sites:
            spec_devices = [f"s{site}-{i:05d}" for i in range(devices_per_site)]
            meter = LinkMeter(central.process.port)
            started.append(meter)
            broker = start_broker("mosquitto", work / f"site-{site}",
                                  mosquitto_conf=bridge_section(site, spec_devices, meter.port,
                                                                routed=site in routed))
            started.append(broker)
            records[site] = SiteRecord(spec_devices)
            started.append(_Watcher(broker.process.port, records[site]))
            site_links[site] = (broker.url, meter)
        for index, site in enumerate(sites):
            spec = FleetSpec(broker_url=site_links[site][0], federation=FED,
                             devices=devices_per_site, processes=1, task=task, data=data, seed=seed + index, prefix=f"s{site}",
                             work_dir=work / f"fleet-{site}")
            fleets.append(Fleet(spec).start())
        for fleet in fleets:
            if not fleet.wait_connected(devices_per_site, _WAIT_S):
                raise RuntimeError(f"fleet did not connect: {fleet.totals()}")
        config = write_toml(work / "coordinator.toml", coordinator_options(
            federation=FED, task=task, broker=central, rounds=rounds, seed=seed, state_dir=work / "state",
            round={"devices_per_round": n, "over_selection": 1.0, "deadline_s": 60.0, "min_devices": n,
                   "wait_for_devices_s": _WAIT_S}))
        result = build_coordinator(config, environ={}).run()
        for fleet in fleets:
            fleet.wait_totals(lambda t: t["counters"].get("accepted", 0) >= rounds * devices_per_site, 30.0)
    finally:
        for fleet in fleets:
            fleet.stop()
        for item in reversed(started):
            item.close()
    for site in sites:
        records[site].up = site_links[site][1].up
        records[site].down = site_links[site][1].down
    return records, list(result.records)


def _table(runs: dict[str, dict[str, SiteRecord]], sites: tuple[str, ...]) -> str:
    rows = ["| bridge | site | bytes up (site -> central) | bytes down (central -> site) | tasks+receipts "
            "carried (own / other sites') | task+receipt+xfer bytes | model bytes | ONNX bytes |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for mode, records in runs.items():
        for site in sites:
            rec = records[site]
            own = sum(c for (_, d), c in rec.per_device.items() if d in rec.devices)
            other = sum(c for (_, d), c in rec.per_device.items() if d not in rec.devices)
            rows.append(f"| {mode} | {site} | {rec.up:,} | {rec.down:,} | {own} / {other} | "
                        f"{sum(rec.bytes_by_kind[k] for k in PER_DEVICE_DOWN):,} | {rec.bytes_by_kind['model']:,} | "
                        f"{rec.bytes_by_kind['onnx']:,} |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bridge", description=__doc__.split("\n\n")[0])
    p.add_argument("--devices-per-site", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--sites", type=int, default=2, help="number of site brokers (2-26)")
    p.add_argument("--task", default="digits-logreg")
    p.add_argument("--data", default="digits", help="digits, or mnist10k for the MNIST tasks")
    args = p.parse_args()
    sites = tuple(_NAMES[:max(2, min(args.sites, len(_NAMES)))])
    runs = {}
    for mode in ("routed", "forward-everything"):
        with TemporaryDirectory(prefix="fedmq-bridge-") as tmp:
            records, rounds = run_sites(Path(tmp), routed=sites if mode == "routed" else (), sites=sites,
                                        task=args.task, data=args.data, devices_per_site=args.devices_per_site,
                                        rounds=args.rounds)
        print(f"{mode}: rounds {[(r.state, r.accepted) for r in rounds]}", flush=True)
        runs[mode] = records
    print(_table(runs, sites))
    for site in sites:
        r, f = runs["routed"][site], runs["forward-everything"][site]
        print(f"site {site}: down routed/forward-everything {r.down / f.down:.3f}, "
              f"up {r.up / f.up:.3f}, link total {(r.up + r.down) / (f.up + f.down):.3f}")


if __name__ == "__main__":
    main()
