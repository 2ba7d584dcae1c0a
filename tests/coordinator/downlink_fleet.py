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
from fedmq.data import load_split, save_npz_atomic
from fedmq.fl.downlink import params_sha256
from fedmq.model.params import flatten_params
from fleet.launch import Broker, DeviceThreads, coordinator_options, edge_options, write_federation

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
    return config_from_dict(coordinator_options(
        federation=fed, task=TASK, broker=Broker(url, protocol, "external"), rounds=rounds, seed=3, state_dir=state,
        publish_onnx=False, round=round_cfg, plan={"density": 0.1, "lr": 0.1},
        downlink={"density": 0.05, "window": 4, "snapshot_every": 4, **(downlink or {})}))


class HashingAgent(EdgeAgent):
    """An edge agent that records the hash of the global model it trains from, per round."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.trained_from: dict[int, tuple[int, str]] = {}
        run_round, load = self.trainer.run_round, self.sync.load
        rounds: list[int] = []  # the round being run (a model loaded outside one is not recorded)

        def recorded_round(task, stop):  # noqa: ANN001, ANN202 - Trainer.run_round's signature
            rounds.append(task.round)
            try:
                return run_round(task, stop)
            finally:
                rounds.pop()

        def recorded_load(version: int, stop: threading.Event, expected: str = "") -> bool:
            ok = load(version, stop, expected)
            if ok and rounds:
                self.trained_from[rounds[-1]] = (version, params_sha256(flatten_params(self.model, self.spec)))
            return ok

        self.trainer.run_round = recorded_round  # type: ignore[method-assign]
        self.sync.load = recorded_load  # type: ignore[method-assign]


def device_threads(tmp: Path, url: str, protocol: str, fed: str, n: int, **edge: Any) -> DeviceThreads:
    """``n`` devices ``dev0`` ... on threads (:class:`fleet.launch.DeviceThreads` of
    :class:`HashingAgent`), each with a shard of the digits and ``edge`` options; started and
    stopped one by one (``start(i, **extra)``, ``stop("devI")``, ``stop_all()``)."""
    broker = Broker(url, protocol, "external")
    options = {"holdout_fraction": 0.0, "receipt_timeout": 10.0, "fetch_timeout": 20.0, "delta_fetch_timeout": 2.0,
               **edge}
    files = write_federation(tmp, None, {
        f"dev{i}": edge_options(device_id=f"dev{i}", federation=fed, task=TASK, broker=broker, data=shard,
                                seed=0, state_dir=tmp / f"dev{i}", **options)
        for i, shard in enumerate(write_shards(tmp, n))})
    return DeviceThreads(files.devices, HashingAgent)


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
