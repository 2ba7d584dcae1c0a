"""Bytes on the wire, both directions, counted by tcpdump on loopback, with ``fedmq demo``.

Each case is one ``fedmq demo`` federation (fleet.demo.run_demo: the real coordinator in this
process, one edge-client process per device) through a real mosquitto on a free loopback port,
started with the shipped queue and packet settings (benchmarks.faults.shipped_persistence_conf).
tcpdump captures the broker's port; every TCP payload byte is attributed to the client
connection it travelled on (the client's port, named by mosquitto's own connection log:
``New client connected from 127.0.0.1:PORT as CLIENT_ID``). Figures per case: the bytes on the
devices' connections (to the broker = up, from it = down; MQTT headers, manifests, chunks,
receipts, statuses, retained messages and keep-alives included), the coordinator's connection
separately, the demo's own counts beside them, and the accuracy curve.

Cases: ``defaults`` is ``fedmq demo`` as shipped (Top-K 1% + int8 with error feedback on the
uplink, the compressed downlink, FedAvgM 0.5); ``dense`` is fedmq's dense FedAvg (codec
``none`` both ways, FedAvg), the reference.

Run: ``python -m benchmarks.wire --data mnist --partition iid --case dense --case defaults``
(``--data digits`` for the digits demo). Needs tcpdump (run.sh installs it) and the right to
capture on ``lo`` (root or CAP_NET_RAW). Prints one JSON line per case.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from rich.console import Console

from benchmarks.faults import shipped_persistence_conf
from broker.launch import start_mosquitto
from fedmq.data import shared_data_dir
from fedmq.errors import FedmqError
from fleet.demo import DemoSettings, run_demo

#: name -> run_demo keyword arguments over the demo's defaults.
CASES: dict[str, dict[str, Any]] = {
    "defaults": {},
    "dense": {"codec": "none"},
    # Candidates tried for accuracy parity (BENCHMARKS.md): server momentum and server lr.
    "fedavgm-0.7": {"server_optimizer": {"name": "fedavgm", "momentum": 0.7}},
    "fedavgm-0.9": {"server_optimizer": {"name": "fedavgm", "momentum": 0.9}},
    "fedavgm-0.5-eta-1.5": {"server_optimizer": {"name": "fedavgm", "momentum": 0.5, "eta": 1.5}},
}

_CONNECTED = re.compile(r"New client connected from 127\.0\.0\.1:(\d+) as (\S+)")
# tcpdump -n -q -r: "... IP 127.0.0.1.41234 > 127.0.0.1.1883: tcp 45"
_PACKET = re.compile(r"IP 127\.0\.0\.1\.(\d+) > 127\.0\.0\.1\.(\d+): tcp (\d+)")
#: Seconds tcpdump gets to announce that it listens.
_CAPTURE_START_S = 10.0


class Capture:
    """tcpdump on ``lo`` for TCP port ``port``, written to ``pcap``.

    Raises:
        FedmqError: tcpdump is missing or did not start capturing (no CAP_NET_RAW?).
    """

    def __init__(self, port: int, pcap: Path) -> None:
        binary = shutil.which("tcpdump")
        if binary is None:
            raise FedmqError("tcpdump not found on PATH (apt-get install tcpdump; run.sh installs it)")
        self.pcap = pcap
        # Headers are enough (the lengths come from the IP header) and a large buffer keeps
        # the kernel from dropping packets of a dense run; drops are reported, not hidden.
        self.proc = subprocess.Popen([binary, "-i", "lo", "-n", "-s", "96", "-B", "65536", "-w", str(pcap),
                                      f"tcp port {port}"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        assert self.proc.stderr is not None
        end = time.monotonic() + _CAPTURE_START_S
        line = ""
        while time.monotonic() < end:
            line = self.proc.stderr.readline()
            if "listening on" in line or not line:
                break
        if "listening on" not in line:
            self.proc.kill()
            raise FedmqError(f"tcpdump did not start capturing on lo: {line.strip() or 'no output'}")

    def stop(self) -> int:
        """Stop capturing; returns the packets the kernel dropped (tcpdump's own count)."""
        self.proc.send_signal(signal.SIGINT)
        try:
            _, err = self.proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        m = re.search(r"(\d+) packets dropped by kernel", err or "")
        return int(m[1]) if m else -1


def tcp_payload_bytes(pcap: Path, broker_port: int) -> dict[int, dict[str, int]]:
    """Client port -> ``{"to_broker": bytes, "from_broker": bytes}`` of TCP payload in ``pcap``."""
    out = subprocess.run(["tcpdump", "-n", "-q", "-r", str(pcap)], capture_output=True, text=True, check=True).stdout
    per: dict[int, dict[str, int]] = defaultdict(lambda: {"to_broker": 0, "from_broker": 0})
    for m in _PACKET.finditer(out):
        src, dst, length = int(m[1]), int(m[2]), int(m[3])
        if dst == broker_port:
            per[src]["to_broker"] += length
        elif src == broker_port:
            per[dst]["from_broker"] += length
    return dict(per)


def client_ports(mosquitto_log: Path) -> dict[int, str]:
    """Client port -> client id, from mosquitto's connection messages."""
    return {int(m[1]): m[2] for m in _CONNECTED.finditer(mosquitto_log.read_text(errors="replace"))}


def _first_round(accuracies: list[float | None], target: float) -> int | None:
    return next((i + 1 for i, a in enumerate(accuracies) if a is not None and a >= target), None)


def run_case(case: str, *, data: str, data_dir: Path | None, partition: str, alpha: float, devices: int,
             per_round: int, rounds: int, seed: int, work: Path) -> dict[str, Any]:
    """One federation through mosquitto under tcpdump; returns its figures (module docstring)."""
    work.mkdir(parents=True, exist_ok=True)
    broker = start_mosquitto(work / "broker", extra_conf=shipped_persistence_conf())
    capture = Capture(broker.port, work / "broker.pcap")
    try:
        summary = run_demo(DemoSettings(
            devices=devices, per_round=per_round, rounds=rounds, data=data, data_dir=data_dir,
            partition_scheme=partition, alpha=alpha, seed=seed, broker=broker.url, protocol="5",
            devices_in="processes", out=work / "demo", **CASES[case]), console=Console(file=io.StringIO()))
    finally:
        dropped = capture.stop()
        broker.stop()
    ports = client_ports(work / "broker" / "mosquitto.log")
    per_port = tcp_payload_bytes(work / "broker.pcap", broker.port)
    devices_up = devices_down = coord_up = coord_down = other = 0
    for port, counts in per_port.items():
        client = ports.get(port, "")
        if client.startswith("fedmq-coordinator"):
            coord_up += counts["to_broker"]
            coord_down += counts["from_broker"]
        elif client.startswith("device-"):
            devices_up += counts["to_broker"]
            devices_down += counts["from_broker"]
        else:
            other += counts["to_broker"] + counts["from_broker"]
    acc = summary["accuracy_per_round"]
    return {
        "case": case, "data": data, "partition": partition, "rounds": rounds, "devices": devices,
        "per_round": per_round, "final_accuracy": summary["final_accuracy"], "best_accuracy": summary["best_accuracy"],
        "round_95": _first_round(acc, 0.95), "round_96": _first_round(acc, 0.96), "rounds_failed": summary["rounds_failed"],
        "updates_accepted": summary["updates_accepted"],
        "wire_devices_up_bytes": devices_up, "wire_devices_down_bytes": devices_down,
        "wire_devices_total_bytes": devices_up + devices_down,
        "wire_coordinator_to_broker_bytes": coord_up, "wire_coordinator_from_broker_bytes": coord_down,
        "wire_unattributed_bytes": other, "capture_dropped_packets": dropped,
        "demo_bytes_up_total": summary["bytes_up_total"], "demo_bytes_down_total": summary["bytes_down_total"],
        "demo_bytes_down_dense_equivalent": summary["bytes_down_dense_equivalent"],
        "wall_s": round(summary["wall_seconds"], 1), "accuracy_per_round": acc,
    }


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.wire", description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", action="append", choices=sorted(CASES), required=True)
    ap.add_argument("--data", default="mnist", choices=["digits", "mnist"])
    ap.add_argument("--data-dir", type=Path)
    ap.add_argument("--partition", action="append", choices=["iid", "dirichlet"])
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--devices", type=int, default=10)
    ap.add_argument("--per-round", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True, help="folder for the runs (created; must not exist)")
    args = ap.parse_args()
    if args.data == "mnist" and args.data_dir is None:
        args.data_dir = shared_data_dir() / "mnist-t10k"  # the MNIST-10k split
    args.out.mkdir(parents=True, exist_ok=False)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    for partition in args.partition or ["iid"]:
        for case in args.case:
            res = run_case(case, data=args.data, data_dir=args.data_dir, partition=partition, alpha=args.alpha,
                           devices=args.devices, per_round=args.per_round, rounds=args.rounds, seed=args.seed,
                           work=args.out / f"{args.data}-{partition}-{case}")
            print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
