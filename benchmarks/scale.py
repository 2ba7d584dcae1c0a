"""Scale: fleets of virtual devices (the real edge agent) against one mosquitto on loopback.

Two parts (``python -m benchmarks.scale [--quick] [--only scale|modes] [--sizes 100,1000]``):

* **scale**: for each fleet size (default 1,000 and 10,000; quick 100 and 1,000), every
  device connects, then synchronous rounds of a tenth of the fleet run (digits-logreg, 32
  samples per device, every device online, no slow-down), in about 1,250 devices per worker
  process with ``network = "shared"`` (one network loop per process, event-driven agents;
  ``--network threads``: two threads per device). Reported: time until all are connected, rounds closed on time
  (all selected devices accepted before the deadline), round wall time, the
  coordinator's CPU seconds per round and RSS (it runs in this process), the broker's
  RSS and the fleet's PSS (total and per device);
* **modes**: synchronous (the coordinator's default scheduling: no over-selection, every
  selected device awaited until the deadline or its last will) against buffered
  asynchronous (FedBuff) aggregation on the same fleet: long-tailed compute speeds
  (log-normal slow-down, sigma 1), 20% of the devices offline at any time, 5% dying
  mid-training. Reported: wall time to test accuracies 0.90, 0.95 and 0.96, device-seconds of
  training (total, in accepted updates, wasted), bytes through the broker (its $SYS
  counters, both directions) and client-update bytes received.

Every device's trainings are counted by the simulator; an accepted update reports its own
device-seconds (the envelope metric ``device_seconds``), so wasted = total - accepted.
"""

from __future__ import annotations

import argparse
import json
import queue
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from fedmq.tasks.builtin import MNIST_PLAN
from fleet.fleet import Fleet, FleetSpec, Heterogeneity, cpu_seconds, memory_kib, raise_nofile
from fleet.launch import Broker, build_coordinator, coordinator_options, start_broker, write_toml

PLAN = {"local_epochs": 5, "lr": 0.3, "batch_size": 16, "density": 0.25}
TASK = "digits-logreg"
#: ``--task`` of the modes part -> (fleet data, local samples per device, train plan).
MODE_TASKS: dict[str, tuple[str, int, dict[str, Any]]] = {
    "digits-logreg": ("digits", 32, PLAN),
    # The McMahan CNN on the MNIST-10k split, the demo's plan (1 local epoch).
    "mnist-cnn": ("mnist10k", 160, MNIST_PLAN),
}


class _SysBytes:
    """mosquitto's ``$SYS/broker/bytes/{received,sent}`` (published every ``sys_interval`` s)."""

    def __init__(self, port: int) -> None:
        self.values: dict[str, int] = {}
        self._q: queue.SimpleQueue[tuple[str, int]] = queue.SimpleQueue()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-sys")
        self.client.on_message = lambda c, u, m: self._q.put((m.topic.rsplit("/", 1)[1], int(m.payload)))
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe([("$SYS/broker/bytes/received", 0), ("$SYS/broker/bytes/sent", 0)])

    def now(self, window: float = 2.5) -> dict[str, int]:
        """The newest counters: every report of the next ``window`` seconds is read (the
        broker reports every second; the first one seen may be the stale retained one)."""
        end = time.monotonic() + window
        while True:
            remaining = end - time.monotonic()
            if remaining <= 0:
                return dict(self.values)
            try:
                key, value = self._q.get(timeout=remaining)
            except queue.Empty:
                return dict(self.values)
            self.values[key] = value

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _coordinator(work: Path, broker: Broker, fed: str, rounds: int, round_: dict[str, Any],
                 async_: dict[str, Any] | None = None, task: str = TASK, plan: dict[str, Any] | None = None) -> Any:
    """The coordinator of federation ``fed`` in this process, its configuration written to
    ``work/coordinator-<fed>.toml`` (read with no environment)."""
    path = write_toml(work / f"coordinator-{fed}.toml", coordinator_options(
        federation=fed, task=task, broker=broker, rounds=rounds, seed=1, state_dir=work / f"coord-{fed}",
        evaluation_data=work / "fleet" / "test.npz", publish_onnx=False, round=round_, plan=plan or PLAN,
        **{"async": async_ or {}}))
    return build_coordinator(path, environ={})


def scale_point(n: int, per_round: int, rounds: int, processes: int, work: Path,
                network: str = "shared") -> dict[str, Any]:
    """One fleet size: connect, run ``rounds`` synchronous rounds, measure (module docstring).
    ``network``: the fleet's ``network`` option (``shared``: one network loop per worker)."""
    raise_nofile(n + 2048)
    broker = start_broker("mosquitto", work, mosquitto_conf="max_connections -1")
    deadline = 60.0
    spec = FleetSpec(broker_url=broker.url, federation="scale", task=TASK, devices=n, processes=processes, seed=1,
                     work_dir=work / "fleet", heterogeneity=Heterogeneity(compute_s=0.5), network=network)
    out: dict[str, Any] = {"devices": n, "per_round": per_round, "processes": processes, "network": network}
    try:
        t0 = time.monotonic()
        with Fleet(spec) as fleet:
            out["all_connected"] = fleet.wait_connected(n, 120.0 + n / 20)
            out["connect_s"] = round(time.monotonic() - t0, 1)
            out["connected"] = fleet.connected()
            coord = _coordinator(work, broker, "scale", rounds,
                                 {"devices_per_round": per_round, "over_selection": 1.0, "deadline_s": deadline,
                                  "min_devices": min(n, out["connected"]), "wait_for_devices_s": 30.0})
            cpu0 = cpu_seconds()
            result = coord.run()
            cpu = cpu_seconds() - cpu0
            totals = fleet.totals()
            out["threads_per_worker"] = max((s.get("threads", 0) for s in fleet.latest.values()), default=0)
            out["coordinator_rss_mib"] = round(memory_kib().get("rss", 0) / 1024, 1)
            out["broker_rss_mib"] = round(memory_kib(broker.process.pid or 0).get("rss", 0) / 1024, 1)
            fleet.stop()
    finally:
        broker.close()
    recs = result.records
    out["rounds"] = len(recs)
    out["rounds_on_time"] = sum(1 for r in recs if r.state == "closed" and r.accepted == per_round
                                and r.wall_s < deadline)
    out["round_s_mean"] = round(sum(r.wall_s for r in recs) / max(1, len(recs)), 2)
    out["round_s_max"] = round(max((r.wall_s for r in recs), default=0.0), 2)
    out["coordinator_cpu_s_per_round"] = round(cpu / max(1, len(recs)), 2)
    out["fleet_pss_mib"] = round(totals["pss"] / 1024, 1)
    out["fleet_pss_kib_per_device"] = round(totals["pss"] / n, 1)
    out["fleet_cpu_s"] = round(totals["cpu_s"], 1)
    out["test_accuracy"] = recs[-1].test_accuracy if recs else None
    return out


def modes(n: int, seconds: float, targets: tuple[float, ...], processes: int, work: Path,
          task: str = TASK) -> list[dict[str, Any]]:
    """Sync against async on the same heterogeneous fleet, each for at most ``seconds``;
    the wall time to each test accuracy in ``targets``. ``task``: a key of MODE_TASKS."""
    data, samples, plan = MODE_TASKS[task]
    het = Heterogeneity(compute_s=1.0, speed_sigma=1.0, online_fraction=0.8, mean_online_s=60.0, dropout=0.05,
                        rejoin_s=20.0, bandwidth=2e5, bandwidth_sigma=0.5, latency_s=0.05)
    rows = []
    for mode in ("sync", "async"):
        raise_nofile(n + 2048)
        folder = work / mode
        broker = start_broker("mosquitto", folder, mosquitto_conf="sys_interval 1\nmax_connections -1")
        spec = FleetSpec(broker_url=broker.url, federation=mode, task=task, devices=n, processes=processes, seed=7,
                         work_dir=folder / "fleet", heterogeneity=het, data=data, samples_per_device=samples)
        per_round = max(2, n // 10)
        round_ = {"mode": mode, "devices_per_round": per_round, "deadline_s": 15.0, "min_devices": per_round,
                  "wait_for_devices_s": 60.0}
        async_ = {"buffer_size": per_round // 2, "concurrency": int(per_round * 1.3), "max_staleness": 20,
                  "task_timeout_s": 60.0}
        sysb = _SysBytes(broker.process.port)
        try:
            with Fleet(spec) as fleet:
                fleet.wait_connected(int(0.7 * n), 120.0)
                coord = _coordinator(folder, broker, mode, 10_000, round_, async_, task=task, plan=plan)
                reached: dict[float, float] = {}
                t0 = time.monotonic()
                before = sysb.now()

                def progress(p: Any) -> None:
                    if p.kind == "round_closed" and p.record is not None:
                        acc = p.record.test_accuracy
                        for target in targets:
                            if acc is not None and acc >= target and target not in reached:
                                reached[target] = time.monotonic() - t0
                        if time.monotonic() - t0 > seconds:
                            coord.stop()

                timer = threading.Timer(seconds + 5.0, coord.stop)
                timer.start()
                result = coord.run(progress)
                timer.cancel()
                wall = time.monotonic() - t0
                after = sysb.now()
                results = fleet.stop()
        finally:
            sysb.close()
            broker.close()
        recs = result.records
        total_s = sum(t[1] for d in results for t in d["trainings"])
        accepted_s = sum(p.metrics.get("device_seconds", 0.0) for r in recs for p in r.participations
                         if p.status == "accepted")
        rejected: dict[str, int] = {}
        for r in recs:
            for k, v in r.rejected.items():
                rejected[k] = rejected.get(k, 0) + v
        rows.append({
            "mode": mode, "devices": n, "wall_s": round(wall, 1), "steps": len(recs),
            **{f"time_to_{t}_s": round(reached[t], 1) if t in reached else None for t in targets},
            "final_accuracy": round(recs[-1].test_accuracy, 4) if recs and recs[-1].test_accuracy else None,
            "updates_accepted": sum(r.accepted for r in recs), "rejected": rejected,
            "trainings": sum(len(d["trainings"]) for d in results),
            "dropouts": sum(d["dropouts"] for d in results),
            "device_s_total": round(total_s, 1), "device_s_accepted": round(accepted_s, 1),
            "device_s_wasted": round(total_s - accepted_s, 1),
            "wasted_fraction": round((total_s - accepted_s) / total_s, 3) if total_s else None,
            "broker_bytes_in": after.get("received", 0) - before.get("received", 0),
            "broker_bytes_out": after.get("sent", 0) - before.get("sent", 0),
            "update_bytes_up": sum(r.bytes_up for r in recs),
        })
    return rows


def scale_processes(n: int) -> int:
    """Worker processes for a fleet of ``n`` devices: about 1,250 devices each, at least 4."""
    return max(4, -(-n // 1250))


def run(quick: bool = True, *, only: str | None = None, sizes: list[int] | None = None,
        task: str = TASK, devices: int | None = None, seconds: float | None = None,
        network: str = "shared") -> dict[str, Any]:
    """The suite's entry point (benchmarks.harness)."""
    out: dict[str, Any] = {"tables": [], "notes": []}
    with tempfile.TemporaryDirectory(prefix="fedmq-scale-") as tmp:
        work = Path(tmp)
        if only in (None, "scale"):
            points = [scale_point(s, max(1, s // 10), 2 if quick else 3, scale_processes(s), work / f"scale-{s}",
                                  network)
                      for s in (sizes or ([100, 1000] if quick else [1000, 10000]))]
            out["scale"] = points
            cols = ["devices", "network", "processes", "threads_per_worker", "per_round", "connected", "connect_s",
                    "rounds_on_time", "rounds", "round_s_mean",
                    "round_s_max", "coordinator_cpu_s_per_round", "coordinator_rss_mib", "broker_rss_mib",
                    "fleet_pss_mib", "fleet_pss_kib_per_device"]
            out["tables"].append({"title": "Fleet size (digits-logreg, sync rounds of a tenth of the fleet)",
                                  "columns": cols, "rows": [[p[c] for c in cols] for p in points]})
        if only in (None, "modes"):
            targets = (0.9, 0.95, 0.96)
            rows = modes(devices or (100 if quick else 200), seconds or (120.0 if quick else 240.0), targets, 2,
                         work / "modes", task=task)
            out["modes"] = rows
            cols = ["mode", "devices", "wall_s", "steps", *[f"time_to_{t}_s" for t in targets], "final_accuracy",
                    "updates_accepted",
                    "trainings", "device_s_total", "device_s_wasted", "wasted_fraction", "broker_bytes_in",
                    "broker_bytes_out", "update_bytes_up"]
            out["tables"].append({"title": f"Sync vs buffered async (FedBuff), same heterogeneous fleet, {task}",
                                  "columns": cols, "rows": [[r[c] for c in cols] for r in rows]})
    return out


def smoke() -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="fedmq-scale-") as tmp:
        return {"scale": [scale_point(20, 5, 1, 1, Path(tmp))]}


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", choices=("scale", "modes"))
    p.add_argument("--sizes", default="", help="comma-separated fleet sizes for the scale part")
    p.add_argument("--network", default="shared", choices=("shared", "threads"),
                   help="the fleet's network option in the scale part (shared: one network loop per worker)")
    p.add_argument("--task", default=TASK, choices=sorted(MODE_TASKS), help="task of the modes part")
    p.add_argument("--devices", type=int, help="fleet size of the modes part (default 200, quick 100)")
    p.add_argument("--seconds", type=float, help="seconds per mode in the modes part (default 240, quick 120)")
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()] or None
    print(json.dumps(run(args.quick, only=args.only, sizes=sizes, task=args.task, devices=args.devices,
                         seconds=args.seconds, network=args.network), indent=1, default=str))


if __name__ == "__main__":
    main()
