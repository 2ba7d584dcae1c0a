"""The global model on a device: load the version a task names from the local cache or the
broker, and, with a compressed downlink, reach it through the version chain (catch-up over
deltas from a version held, or a snapshot) and follow the newest version (``model_follow``).

Every vector reached through the chain is checked against the parameter hash the chain or
the task announces; a missing or corrupt delta, a gap or a hash mismatch falls back to the
snapshot (fedmq.fl.downlink.choose_catch_up picks the path, docs/wire-format.md).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from edge_client.config import EdgeConfig
from edge_client.connection import Connection
from edge_client.loop import TICK, Heartbeat
from edge_client.state import DeviceState
from fedmq.wire import topics
from fedmq.fl.chain import DeltaBlob, ModelChain
from fedmq.errors import FedmqError, TransferError, TransportError, WireError
from fedmq.fl import downlink
from fedmq.fl.downlink import params_sha256
from fedmq.model.modelio import model_from_safetensors, model_to_safetensors
from fedmq.model.params import ParamSpec, flatten_params, load_params
from fedmq.tasks import Task
from fedmq.transport import Message
from fedmq.transport.flows import fetch_blob

log = logging.getLogger("edge_client.agent")


class ModelSync:
    """Loads global model versions into the device's model.

    Args:
        cfg: ``fetch_timeout``, ``delta_fetch_timeout`` (seconds), ``model_follow``, ids.
        conn: the connection models are fetched on.
        state: the durable state (its model cache).
        model, spec, task_def: the device's model (loaded in place), its ParamSpec, and the
            task that builds version 0 from the federation's seed.
        counters: ``downlink_fallbacks``, ``deltas_applied``.
        heartbeat: runs a fetch off the loop thread while the watchdog keeps being pinged.
        handle: the agent's handler of one message of its inbox (the chain arrives there,
            among other messages, while :meth:`load` waits for it).

    Attributes:
        chain: the newest version chain seen, or None.
        held: ``(version, vector)``: the newest global model version this device holds
            (float32 ``(spec.size,)``, apart from what training changes), or None.
    """

    def __init__(self, cfg: EdgeConfig, conn: Connection, state: DeviceState, *, model: torch.nn.Module,
                 spec: ParamSpec, task_def: Task, counters: Counter[str], heartbeat: Heartbeat,
                 handle: Callable[[Message], None]) -> None:
        self.cfg, self.conn, self.state = cfg, conn, state
        self.model, self.spec, self.task_def = model, spec, task_def
        self.counters, self.heartbeat, self.handle = counters, heartbeat, handle
        self.chain: ModelChain | None = None
        self.held: tuple[int, np.ndarray] | None = None

    def on_chain(self, payload: bytes) -> None:
        """A version chain from ``fedmq/F/model/chain``; kept when not older than the one held.

        Raises: WireError when malformed."""
        chain = ModelChain.from_bytes(payload)
        if self.chain is None or chain.latest >= self.chain.latest:
            self.chain = chain

    def to_follow(self) -> ModelChain | None:
        """With ``model_follow``: the chain when it names a version newer than the one held."""
        chain = self.chain
        if (self.cfg.model_follow and chain is not None and chain.spec_hash == self.spec.hash
                and (self.held is None or self.held[0] < chain.latest)):
            return chain
        return None

    def follow(self, chain: ModelChain, stop: threading.Event) -> None:
        """Fetch the chain's newest version now (``model_follow``): one delta per version."""
        try:
            self.load(chain.latest, stop, chain.latest_sha256)
        except FedmqError as exc:
            log.warning("following version %d failed (%s): retried with the next chain", chain.latest, exc)
            self.chain = None

    def load(self, version: int, stop: threading.Event, expected_sha256: str = "") -> bool:
        """Load global model ``version`` into the model, from the cache or the broker (with a
        compressed downlink, ``expected_sha256`` set: through the version chain).

        Returns: False when ``stop`` was set first.
        Raises: TransferError / WireError / TransportError when the version cannot be had
            within the fetch timeouts."""
        if expected_sha256:
            return self._load_chained(version, stop, expected_sha256)
        cached = self.state.cached_model(version)
        if cached is not None:
            try:
                model_from_safetensors(cached, self.model, self.spec)
                return True
            except WireError as exc:
                log.warning("cached model version %d unusable (%s): fetched again", version, exc)
                self.state.drop_model(version)
        base = topics.model_blob(self.cfg.federation, version)
        timeout = self.cfg.fetch_timeout
        deadline = time.monotonic() + timeout

        def fetch() -> Any:
            while True:
                try:
                    return fetch_blob(self.conn.link, base, max(1.0, deadline - time.monotonic()))
                except TransferError:
                    raise
                except TransportError as exc:
                    # The link dropped mid-fetch (a broker restart): fetch again once it is back.
                    left = deadline - time.monotonic()
                    if left <= 0 or not self.conn.link.wait_connected(left):
                        raise
                    log.info("global model %d: fetch interrupted (%s); fetching again", version, exc)

        blob = self.heartbeat.in_worker(fetch, timeout + 30.0, stop)
        if blob is None:
            return False
        model_from_safetensors(blob.data, self.model, self.spec)
        self.state.cache_model(version, blob.data)
        return True

    def _load_chained(self, version: int, stop: threading.Event, expected: str) -> bool:
        if self.held is not None and self.held[0] == version and params_sha256(self.held[1]) == expected:
            load_params(self.model, self.held[1], self.spec)
            return True
        chain = self._wait_for_chain(version, stop)
        held = self._held_version(chain, version)
        if held is not None and held[0] == version and params_sha256(held[1]) == expected:
            vec = held[1]
        else:
            limit = self.cfg.fetch_timeout + 30.0 * (1 + version - (held[0] if held else 0))
            result = self.heartbeat.in_worker(lambda: self._catch_up(chain, held, version, expected), limit, stop)
            if result is None:
                return False
            vec = result
        load_params(self.model, vec, self.spec)
        self.held = (version, vec)
        self.state.cache_model(version, model_to_safetensors(self.model, {"version": str(version),
                                                                          "sha256": expected}))
        return True

    def _wait_for_chain(self, version: int, stop: threading.Event) -> ModelChain:
        """The version chain once it names ``version`` (it is published before any task for it).

        Raises: TransferError when none comes within ``fetch_timeout`` seconds."""
        end = time.monotonic() + self.cfg.fetch_timeout
        topic = topics.model_chain(self.cfg.federation)
        link = self.conn.link
        subscribed = False
        try:
            while True:
                chain = self.chain
                if chain is not None and chain.latest >= version:
                    return chain
                if stop.is_set() or time.monotonic() >= end:
                    raise TransferError(f"no version chain naming version {version} within "
                                        f"{self.cfg.fetch_timeout:.0f} s on {topic}")
                if not subscribed and not self.cfg.model_follow:
                    link.subscribe(topic, timeout=max(1.0, end - time.monotonic()))  # the retained chain
                    subscribed = True
                try:
                    msg = link.inbox.get(timeout=TICK)
                except queue.Empty:
                    continue
                self.handle(msg)
        finally:
            if subscribed:
                link.unsubscribe(topic)

    def _held_version(self, chain: ModelChain, target: int) -> tuple[int, np.ndarray] | None:
        """The newest version at most ``target`` this device holds: in memory, in the cache,
        or version 0 built from the task and the federation's seed when its hash matches."""
        if self.held is not None and self.held[0] <= target:
            return self.held
        for version in reversed(self.state.cached_versions()):
            if version > target:
                continue
            data = self.state.cached_model(version)
            try:
                model_from_safetensors(data or b"", self.model, self.spec)
            except WireError as exc:
                log.warning("cached model version %d unusable (%s): dropped", version, exc)
                self.state.drop_model(version)
                continue
            return version, flatten_params(self.model, self.spec)
        origin = flatten_params(self.task_def.build_model(chain.seed), self.spec)
        if params_sha256(origin) == chain.origin_sha256:
            return 0, origin
        log.warning("version 0 built from seed %d does not match the announced hash (another torch build or "
                    "platform?): the snapshot is downloaded", chain.seed)
        return None

    def _catch_up(self, chain: ModelChain, held: tuple[int, np.ndarray] | None, version: int,
                  expected: str) -> np.ndarray:
        """Download what the catch-up rule picks (fedmq.fl.downlink.choose_catch_up) and return
        version ``version``'s vector, verified against ``expected``; on a missing or corrupt
        delta, a gap or a hash mismatch, log why and take the snapshot path instead.

        Raises: TransferError / WireError when the snapshot path fails too."""
        sizes = chain.delta_sizes()
        avoid = False
        while True:
            route = downlink.choose_catch_up(None if held is None else held[0], version, sizes, chain.snapshot.version,
                                          chain.snapshot.size, avoid_deltas=avoid)
            if route is None:
                raise TransferError(f"version {version} cannot be reached from the chain (snapshot "
                                    f"{chain.snapshot.version}, deltas {sorted(sizes)[:3]}..)")
            log.info("catching up to version %d: %s (%d bytes)", version, route.reason, route.cost)
            try:
                return self._apply_catch_up(chain, route, held, version, expected)
            except FedmqError as exc:
                if route.snapshot is not None:
                    raise
                log.warning("delta path to version %d failed (%s): falling back to the snapshot", version, exc)
                self.counters["downlink_fallbacks"] += 1
                avoid = True

    def _apply_catch_up(self, chain: ModelChain, route: downlink.CatchUp, held: tuple[int, np.ndarray] | None,
                    version: int, expected: str) -> np.ndarray:
        fed, link = self.cfg.federation, self.conn.link
        if route.snapshot is not None:
            blob = fetch_blob(link, topics.model_blob(fed, route.snapshot), self.cfg.fetch_timeout)
            if blob.sha256 != chain.snapshot.blob_sha256:
                raise TransferError(f"snapshot {route.snapshot}: blob sha256 {blob.sha256[:12]} differs from the "
                                    f"chain's {chain.snapshot.blob_sha256[:12]}")
            model = self.task_def.build_model(chain.seed)
            model_from_safetensors(blob.data, model, self.spec)
            vec = flatten_params(model, self.spec)
            if params_sha256(vec) != chain.snapshot.sha256:
                raise TransferError(f"snapshot {route.snapshot}: parameter hash differs from the chain's")
        elif held is not None:
            vec = held[1]
        else:
            raise TransferError(f"version {version}: a delta path from no version held")
        for v in route.deltas:
            entry = chain.entry(v)
            if entry is None:
                raise TransferError(f"delta {v}: not in the chain")
            blob = fetch_blob(link, topics.model_delta(fed, v), self.cfg.delta_fetch_timeout)
            if blob.sha256 != entry.blob_sha256:
                raise TransferError(f"delta {v}: blob sha256 {blob.sha256[:12]} differs from the chain's")
            delta = DeltaBlob.from_bytes(blob.data)
            if delta.version != v:
                raise TransferError(f"delta blob on the topic of version {v} is for version {delta.version}")
            vec = delta.apply(vec, self.spec)
            self.counters["deltas_applied"] += 1
        got = params_sha256(vec)
        if got != expected:
            raise TransferError(f"version {version}: parameter hash {got[:12]} after applying, expected {expected[:12]}")
        return vec
