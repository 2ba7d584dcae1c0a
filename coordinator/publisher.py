"""Publishing the global model and the retained round state, and repairing them after a reconnect.

:class:`Publisher` owns what the broker should hold for devices to find: each global model
version (dense: a retained safetensors blob and its pointer; compressed downlink: the
version's delta blob, a snapshot every ``snapshot_every`` versions and the version chain,
:mod:`fedmq.fl.chain`), the ONNX export when due, the retained round state (tasks, round
announcement, secure-round results) and the clearing of superseded versions. mosquitto saves
retained messages only every ``autosave_interval``: after a broker restart
:meth:`Publisher.repair` publishes the same bytes again.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from coordinator.config import CoordinatorConfig
from coordinator.scaffold import ScaffoldServer
from coordinator.state import StateDB
from fedmq.wire import topics
from fedmq.fl.chain import ChainEntry, DeltaBlob, ModelChain
from fedmq.errors import TransportError
from fedmq.fl.downlink import params_sha256
from fedmq.wire.messages import ModelPointer
from fedmq.model.modelio import export_onnx, model_to_safetensors
from fedmq.model.params import ParamSpec, flatten_params, load_params
from fedmq.tasks import Task
from fedmq.transport import Link
from fedmq.transport.flows import clear_blob, publish_model
from fedmq.transport.sender import BlobSender

log = logging.getLogger("fedmq.coordinator")


def delta_path(state_dir: Path, version: int) -> Path:
    """Where the delta blob of ``version`` (compressed downlink) is kept until it leaves the window."""
    return state_dir / "downlink" / f"delta-{version}.bin"


class Publisher:
    """What the broker holds for the devices of one federation.

    Args:
        config: the coordinator's configuration (``[downlink]``, ``[publish]``, ``[export]``,
            ``rounds``, ``seed``, ``state_dir``).
        link: the coordinator's link (connected before the first publication).
        task, spec, model: the learning task, its ParamSpec and a module to load versions into.
        db: the state database (which blobs are retained, to clear them when superseded).
        onnx_metadata: metadata the ONNX export carries (the privacy guarantee), or None.

    Raises (from the publications): :class:`fedmq.errors.TransportError` when the broker is
    unreachable.
    """

    def __init__(self, config: CoordinatorConfig, link: Link, task: Task, spec: ParamSpec, model: torch.nn.Module,
                 db: StateDB, onnx_metadata: Callable[[], dict[str, str] | None], *,
                 scaffold: ScaffoldServer | None = None) -> None:
        self.config, self.link, self.task, self.spec, self.model, self.db = config, link, task, spec, model, db
        self.scaffold = scaffold
        self.fed = config.federation
        self.onnx_metadata = onnx_metadata
        self.compressed = config.downlink.compressed
        #: The params hash of version 0 (devices build it themselves from the seed).
        self.origin_sha = params_sha256(self.module_vector())
        #: The params hash of the published model (compressed downlink; "" for a dense one).
        self.published_sha = ""
        self._onnx_published = False
        self._snapshot: ChainEntry | None = None
        #: Retained round state (topic -> payload; b"" for a cleared task) to restore when
        #: the broker may have lost it; the published model is restored from ``model_at``.
        self._retained: dict[str, bytes] = {}
        self.model_at: tuple[int, int] | None = None
        self.connects_seen = 0

    def module_vector(self) -> np.ndarray:
        """The parameters the module holds now, float32 ``(spec.size,)``."""
        return flatten_params(self.model, self.spec)

    def module_of(self, vector: np.ndarray) -> torch.nn.Module:
        """The task's module holding ``vector`` (float32 ``(spec.size,)``)."""
        load_params(self.model, vector, self.spec)
        return self.model

    # -- the global model ------------------------------------------------------------------

    def publish_model(self, vector: np.ndarray, version: int, round_: int, delta_blob: bytes | None = None) -> None:
        """Publish ``version``. Dense downlink: retained blob + pointer, then clear versions
        older than the previous one (devices of the round just closed may still be fetching
        the previous one). Compressed downlink: the version's delta blob, a snapshot every
        ``snapshot_every`` versions (and at start), the version chain. Then the ONNX export when
        due (``export.onnx_every``, the first version of a run and the last round's)."""
        self.published_sha = params_sha256(vector) if self.compressed else ""
        self.model_at = (version, round_)
        if self.scaffold is not None:
            # Before the model: a task for this version finds its control variate on the broker.
            self.scaffold.publish(self.link, self.db, version)
        if not self.compressed:
            self._publish_snapshot(vector, version, round_)
        else:
            self._publish_chain(vector, version, round_, delta_blob)
        every = self.config.export.onnx_every
        due = not self._onnx_published or round_ >= self.config.rounds or (every > 0 and version % every == 0)
        if self.config.publish.onnx and due:
            self._onnx_published = True
            onnx = export_onnx(self.module_of(vector), self.task, metadata=self.onnx_metadata())
            self._publish_blob("onnx", topics.onnx_blob(self.fed, version), topics.onnx_latest(self.fed), onnx,
                               version, round_, "onnx")

    def _publish_snapshot(self, vector: np.ndarray, version: int, round_: int) -> ChainEntry:
        model = self.module_of(vector)
        blob = model_to_safetensors(model, {"version": str(version), "round": str(round_),
                                            "spec_hash": self.spec.hash, "task": self.task.name})
        self._publish_blob("model", topics.model_blob(self.fed, version), topics.model_latest(self.fed), blob,
                           version, round_, "safetensors")
        entry = ChainEntry(version, len(blob), hashlib.sha256(blob).hexdigest(), params_sha256(vector))
        if self.compressed:
            self._snapshot = entry
        return entry

    def _retained_deltas(self, version: int) -> dict[int, Path]:
        """Delta files of the window ending at ``version``; removes the ones this coordinator
        wrote that fell out of it or belong to a version the checkpoint never reached."""
        out: dict[int, Path] = {}
        folder = delta_path(self.config.state_dir, version).parent
        if not folder.is_dir():
            return out
        low = version - self.config.downlink.window
        for path in folder.glob("delta-*.bin"):
            try:
                v = int(path.name[len("delta-"):-len(".bin")])
            except ValueError:
                continue
            if low < v <= version:
                out[v] = path
            else:
                path.unlink(missing_ok=True)
        return out

    def _publish_chain(self, vector: np.ndarray, version: int, round_: int, delta_blob: bytes | None) -> None:
        """Deltas of the window (the new one, or at start all of them: the broker may have lost
        retained messages), the snapshot when due, then the chain; deltas that left the window
        are cleared from the broker."""
        cfg = self.config.downlink
        files = self._retained_deltas(version)
        fresh = {version: delta_blob} if delta_blob is not None else {v: p.read_bytes() for v, p in files.items()}
        entries: list[ChainEntry] = []
        for v in sorted(files):
            data = fresh.get(v)
            if data is None:
                data = files[v].read_bytes()
            else:
                base = topics.model_delta(self.fed, v)
                info = BlobSender(self.link).send(base, data, retain=True, timeout=120.0)
                self.db.add_published("delta", v, base, info.count)
            entries.append(ChainEntry(v, len(data), hashlib.sha256(data).hexdigest(), DeltaBlob.from_bytes(data).sha256))
        snapshot = self._snapshot
        if snapshot is None or delta_blob is None or version % cfg.snapshot_every == 0:
            snapshot = self._publish_snapshot(vector, version, round_)
        chain = ModelChain(self.spec.hash, cfg.codec.name, self.config.seed, self.origin_sha, version,
                           self.published_sha, snapshot, tuple(entries))
        self.link.publish_wait(topics.model_chain(self.fed), chain.to_bytes(), retain=True, timeout=30.0)
        for old_version, old_base, count in self.db.published("delta"):
            if old_version not in files:
                clear_blob(self.link, old_base, count)
                self.db.remove_published("delta", old_version)

    def _publish_blob(self, kind: str, base: str, latest: str, blob: bytes, version: int, round_: int,
                      fmt: str) -> None:
        pointer = ModelPointer(version, self.spec.hash, round_, len(blob), hashlib.sha256(blob).hexdigest(), fmt)
        info = publish_model(self.link, self.fed, version, blob, pointer, kind=kind)
        self.db.add_published(kind, version, base, info.count)
        for old_version, old_base, count in self.db.published(kind):
            if old_version < version - 1:
                clear_blob(self.link, old_base, count)
                self.db.remove_published(kind, old_version)

    # -- retained round state --------------------------------------------------------------

    def publish_retained(self, topic: str, payload: bytes) -> None:
        """Publish retained round state and remember it, to restore after a broker restart."""
        self._retained[topic] = payload
        self.link.publish(topic, payload, retain=True)

    def forget_cleared(self) -> None:
        """Stop restoring the cleared topics: cleared a round ago, whatever the broker kept is gone."""
        for topic in [t for t, payload in self._retained.items() if payload == b""]:
            del self._retained[topic]

    def clear_retained(self, topic: str) -> None:
        """Clear a retained message a device published (never remembered: nothing to restore)."""
        try:
            self.link.publish(topic, b"", retain=True)
        except TransportError as exc:
            log.warning("retained message on %s not cleared: %s", topic, exc)

    def publish_or_defer(self, vector: np.ndarray, version: int, round_: int, delta_blob: bytes | None) -> None:
        """:meth:`publish_model`; when the broker goes away mid-publication, publish it again
        once reconnected (:meth:`repair`) instead of failing the run."""
        try:
            self.publish_model(vector, version, round_, delta_blob)
        except TransportError as exc:
            log.warning("round %d: publishing model version %d failed (%s); republished on reconnect",
                        round_, version, exc)
            self.model_at = (version, round_)
            self.connects_seen = -1

    def repair(self, vector: np.ndarray) -> None:
        """After a reconnect, publish the retained round state and the global model ``vector`` again.

        mosquitto saves retained messages only every ``autosave_interval`` and on a clean
        stop: after a kill -9 the model, its pointer, the tasks and the round announcement
        may be gone, half there, or an older copy. Publishing them again (same bytes) is
        harmless when they survived.
        """
        link = self.link
        if not link.connected or link.connects == self.connects_seen:
            return
        seen = link.connects
        try:
            for topic, payload in list(self._retained.items()):
                link.publish(topic, payload, retain=True)
            if self.model_at is not None:
                self.publish_model(vector, *self.model_at)
        except TransportError as exc:
            log.warning("restoring the retained state failed (%s); tried again", exc)
            return
        log.info("reconnected to the broker: retained round state and model version %s published again",
                 self.model_at[0] if self.model_at else "-")
        self.connects_seen = seen
