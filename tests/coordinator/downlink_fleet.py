"""A small fleet for the compressed-downlink tests: one coordinator and real edge agents, each
on its own thread, on the in-memory bus or a real broker. Every version the coordinator
publishes is recorded with its parameter hash; every device's model is hashed when it
trains, so tests compare both bit for bit."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from coordinator.config import config_from_dict
from coordinator.service import Coordinator, Progress
from edge_client.agent import EdgeAgent
from edge_client.config import EdgeConfig
from fedmq.data import load_split, save_npz_atomic
from fedmq.fl.downlink import params_sha256
from fedmq.params import flatten_params

TASK = "digits-logreg"


def write_shards(tmp: Path, n: int) -> list[Path]:
    x, y, _, _ = load_split("digits")
    out = []
    for i in range(n):
        path = tmp / f"shard-{i}.npz"
        save_npz_atomic(path, x[i::n], y[i::n])
        out.append(path)
    return out


def coordinator_config(url: str, protocol: str, state: Path, fed: str, *, rounds: int, per_round: int,
                       downlink: dict[str, Any] | None = None, min_devices: int | None = None):
    round_cfg = {"devices_per_round": per_round, "min_updates": 1, "deadline_s": 20.0, "wait_for_devices_s": 60.0,
                 "over_selection": 1.0}
    if min_devices is not None:
        round_cfg["min_devices"] = min_devices
    data = {"federation": fed, "task": TASK, "rounds": rounds, "seed": 3, "state_dir": str(state),
            "broker": {"url": url, "protocol": protocol}, "round": round_cfg,
            "plan": {"density": 0.1, "lr": 0.1}, "publish": {"onnx": False},
            "downlink": {"density": 0.05, "window": 4, "snapshot_every": 4, **(downlink or {})}}
    return config_from_dict(data)


class HashingAgent(EdgeAgent):
    """An edge agent that records the hash of the global model it trains from, per round."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.trained_from: dict[int, tuple[int, str]] = {}

    def _run_round(self, task, stop):  # noqa: ANN001, ANN202 - same signature as the parent
        original = self._load_global

        def load(version: int, stop_: threading.Event, expected: str = "") -> bool:
            ok = original(version, stop_, expected)
            if ok:
                self.trained_from[task.round] = (version, params_sha256(flatten_params(self.model, self.spec)))
            return ok

        self._load_global = load  # type: ignore[method-assign]
        try:
            return super()._run_round(task, stop)
        finally:
            del self._load_global


class Fleet:
    """Devices on threads; start, stop and restart them one by one."""

    def __init__(self, tmp: Path, url: str, protocol: str, fed: str, n: int, **edge: Any) -> None:
        self.tmp, self.url, self.protocol, self.fed = tmp, url, protocol, fed
        self.shards = write_shards(tmp, n)
        self.edge = edge
        self.agents: dict[str, HashingAgent] = {}
        self.threads: dict[str, tuple[threading.Thread, threading.Event]] = {}

    def config(self, i: int, **extra: Any) -> EdgeConfig:
        opts = {"broker_url": self.url, "protocol": self.protocol, "device_id": f"dev{i}", "federation": self.fed,
                "task": TASK, "data": str(self.shards[i]), "state_dir": str(self.tmp / f"dev{i}"),
                "holdout_fraction": 0.0, "receipt_timeout": 10.0, "fetch_timeout": 20.0, "delta_fetch_timeout": 2.0}
        opts.update(self.edge)
        opts.update(extra)
        return EdgeConfig(**opts)

    def start(self, i: int, **extra: Any) -> HashingAgent:
        agent = HashingAgent(self.config(i, **extra))
        stop = threading.Event()
        thread = threading.Thread(target=agent.run, args=(stop,), daemon=True, name=f"dev{i}")
        thread.start()
        self.agents[f"dev{i}"] = agent
        self.threads[f"dev{i}"] = (thread, stop)
        return agent

    def stop(self, name: str) -> None:
        thread, stop = self.threads.pop(name)
        stop.set()
        thread.join(timeout=30)
        assert not thread.is_alive(), f"{name} did not stop"
        self.agents[name]._state_lock.close()

    def stop_all(self) -> None:
        for name in list(self.threads):
            self.stop(name)


def run_recording(cfg) -> tuple[Any, dict[int, str]]:
    """Run a coordinator; returns its RunResult and version -> params hash of every version
    published by this run (read when each round closed)."""
    coord = Coordinator(cfg)
    published: dict[int, str] = {}

    def on(p: Progress) -> None:
        if p.kind == "round_closed" and p.record is not None:
            published[p.record.model_version] = coord.publisher.published_sha

    result = coord.run(on)
    published.setdefault(result.version, params_sha256(result.vector))
    return result, published


def hashes_match(agents: dict[str, HashingAgent], published: dict[int, str]) -> list[str]:
    """Mismatches between what devices trained from and what the coordinator published."""
    bad = []
    for name, agent in agents.items():
        for round_, (version, sha) in agent.trained_from.items():
            want = published.get(version)
            if want is not None and want != sha:
                bad.append(f"{name} round {round_} version {version}: {sha[:12]} != {want[:12]}")
    return bad
