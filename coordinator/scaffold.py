"""The coordinator's side of Scaffold (``[plan] algorithm = "scaffold"``; :mod:`fedmq.fl.scaffold`).

:class:`ScaffoldServer` keeps the server control variate ``c`` and its downlink:

* **checks**: :meth:`ScaffoldServer.checks` wraps the round's :class:`fedmq.fl.rounds.UpdateChecks`
  so that an update whose ``control`` payload (``delta c_i``) is malformed, non-finite or above
  its norm bound is rejected like a bad update (reasons ``malformed``, ``non_finite``,
  ``norm_bound``) and the ``delta c_i`` of every accepted update goes into the round's
  :class:`fedmq.fl.scaffold.ControlSum`. The control norm bound is the data-set rule of
  ``[limits]`` on its own history: ``norm_bound_factor`` x the median L2 norm of the last
  accepted control changes (no bound during ``norm_bound_warmup``; none when the factor is
  off). An update without ``control`` (a device that predates Scaffold) is judged as a
  FedAvg update and adds nothing to ``c``;
* **step**: :meth:`ScaffoldServer.step` at the close of a round whose model stepped:
  ``c <- c + sum(delta c_i) / N`` (N: :meth:`fleet_size`), then the move of the published ``c``
  compressed with the downlink codec and server-side error feedback
  (:func:`fedmq.fl.downlink.compress_step`), written as a delta blob file before the
  checkpoint names the version; a round that fails drops its sum (:meth:`discard`);
* **checkpoint**: :meth:`state_arrays` go into the coordinator checkpoint beside the server
  optimizer's (``opt.scaffold.*``), so a restart resumes ``c``, the published ``c`` and the
  control norms; the round in flight is rerun and its changes sent again;
* **publish**: :meth:`publish` puts the window's deltas, a snapshot when due and the chain on
  the broker (:mod:`fedmq.fl.control_chain`) each time the global model is published.
"""

from __future__ import annotations

import hashlib
import logging
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path

import numpy as np

from coordinator.presence import Device
from coordinator.state import StateDB
from fedmq.fl import control_chain as cc
from fedmq.storage.atomic import atomic_write_bytes
from fedmq.fl.chain import ChainEntry, DeltaBlob, ModelChain
from fedmq.codecs import CodecSpec, SparseUpdate
from fedmq.wire.envelope import ClientUpdate
from fedmq.errors import StateError
from fedmq.fl import downlink
from fedmq.fl.downlink import params_sha256
from fedmq.fl.rounds import Accepted, Rejected, UpdateChecks
from fedmq.fl.scaffold import ControlSum, server_control_step
from fedmq.model.params import ParamSpec
from fedmq.transport import Link
from fedmq.transport.flows import clear_blob
from fedmq.transport.sender import BlobSender

log = logging.getLogger("fedmq.coordinator.scaffold")

#: Checkpoint arrays (saved as ``opt.<name>``): the server control variate ``c``, the published
#: one, and the control norms of the bound's history (float32 (n,)).
C_SERVER, C_PUBLISHED, C_NORMS = "scaffold.c", "scaffold.published", "scaffold.norms"


class ControlChecks:
    """:class:`fedmq.fl.rounds.UpdateChecks` plus the ``control`` payload's checks; the round
    engine calls :meth:`check` then, for an update it aggregates, :meth:`accepted`."""

    def __init__(self, inner: UpdateChecks, server: ScaffoldServer) -> None:
        self.inner = inner
        self.server = server
        self._checked: SparseUpdate | None = None
        self._checked_norm = 0.0

    @property
    def norms(self) -> deque[float]:
        return self.inner.norms

    def current_norm_bound(self) -> float | None:
        return self.inner.current_norm_bound()

    def check(self, upd: ClientUpdate, spec: ParamSpec, kind: str) -> Accepted | Rejected:
        """The update's checks, then its control payload's (decode, non-finite, norm bound)."""
        self._checked = None
        outcome = self.inner.check(upd, spec, kind)
        if isinstance(outcome, Rejected) or not upd.control:
            return outcome
        judged = self.server.control_checks.check(replace(upd, payload=upd.control), spec, kind)
        if isinstance(judged, Rejected):
            return Rejected(judged.reason, f"control variate change: {judged.detail}", upd, upd.round)
        self._checked, self._checked_norm = judged.sparse, judged.norm
        return outcome

    def accepted(self, norm: float) -> None:
        """The update just checked went into the aggregate: so does its control change."""
        self.inner.accepted(norm)
        if self._checked is not None:
            self.server.round_sum.add(self._checked)
            self.server.control_checks.accepted(self._checked_norm)
            self._checked = None


class ScaffoldServer:
    """The server control variate of one federation and its downlink.

    Args:
        spec: the global model's ParamSpec.
        fed: federation id (topics).
        state_dir: the coordinator's state folder (delta blob files under ``downlink/``).
        codec: the downlink codec (``[downlink]``; ``none``: dense deltas).
        window, snapshot_every: as ``[downlink]``: versions whose deltas stay retained; a
            snapshot every this many versions.
        fleet_size: ``N``, the number of devices the coordinator knows for the task (called at
            each step; the step uses at least the round's accepted count).
        norm_factor, norm_warmup: the control norm bound (``[limits]``; None: no bound).
    """

    def __init__(self, spec: ParamSpec, fed: str, state_dir: Path, codec: CodecSpec, *, window: int,
                 snapshot_every: int, fleet_size: Callable[[], int], norm_factor: float | None,
                 norm_warmup: int) -> None:
        self.spec, self.fed, self.state_dir, self.codec = spec, fed, state_dir, codec
        self.window, self.snapshot_every = window, snapshot_every
        self.fleet_size = fleet_size
        self.c = np.zeros(spec.size, dtype=np.float32)
        self.published = np.zeros(spec.size, dtype=np.float32)
        self.control_checks = UpdateChecks(norm_factor=norm_factor, norm_warmup=norm_warmup)
        self.round_sum = ControlSum(spec.size)
        self._snapshot: ChainEntry | None = None
        self._last: int | None = None

    def checks(self, inner: UpdateChecks) -> ControlChecks:
        """The round engine's checks with the control payload's added."""
        return ControlChecks(inner, self)

    # -- checkpoint -----------------------------------------------------------------------

    def state_arrays(self) -> dict[str, np.ndarray]:
        """Arrays for the coordinator checkpoint (float32)."""
        return {C_SERVER: self.c.copy(), C_PUBLISHED: self.published.copy(),
                C_NORMS: np.asarray(self.control_checks.norms, dtype=np.float32)}

    def restore(self, arrays: dict[str, np.ndarray], where: str) -> None:
        """Resume from a checkpoint's arrays (none: a fresh ``c = 0``, e.g. a federation that
        switches to Scaffold).

        Raises:
            StateError: an array has the wrong shape or dtype or is non-finite (names ``where``).
        """
        if C_SERVER not in arrays:
            return
        for key in (C_SERVER, C_PUBLISHED):
            arr = arrays.get(key)
            if arr is None or arr.shape != (self.spec.size,) or arr.dtype != np.float32 or not np.isfinite(arr).all():
                raise StateError(f"{where}: Scaffold array {key!r} missing or not a finite float32 ({self.spec.size},)")
        norms = arrays.get(C_NORMS, np.zeros(0, dtype=np.float32))
        self.c, self.published = arrays[C_SERVER].copy(), arrays[C_PUBLISHED].copy()
        self.control_checks.norms.extend(float(n) for n in norms.reshape(-1))

    # -- a round's end --------------------------------------------------------------------

    def discard(self) -> None:
        """Forget the round's control changes (the round failed; its devices roll back)."""
        self.round_sum = ControlSum(self.spec.size)

    def step(self, version: int) -> None:
        """``c <- c + sum(delta c_i) / N`` for the round that produced model ``version``, and the
        compressed move of the published ``c`` written to ``downlink/control-delta-<version>.bin``
        (atomically, before the checkpoint that names the version)."""
        added = self.round_sum
        self.discard()
        n = max(self.fleet_size(), added.count, 1)
        self.c = server_control_step(self.c, added.total, n)
        step = downlink.compress_step(self.published, self.c, self.spec, self.codec)
        blob = DeltaBlob(self.codec.name, self.spec.hash, version - 1, version, params_sha256(self.published),
                         params_sha256(step.published), step.payload).to_bytes()
        self._dir().mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self._path(version), blob)
        # The residual of the control downlink is c - published: kept implicitly in self.c.
        self.published = step.published
        log.info("version %d: control variate stepped with %d change(s) over N = %d (|c| %.4g)", version,
                 added.count, n, float(np.linalg.norm(self.c)))

    # -- the downlink ---------------------------------------------------------------------

    def _dir(self) -> Path:
        return self.state_dir / "downlink"

    def _path(self, version: int) -> Path:
        return self._dir() / f"control-delta-{version}.bin"

    def _window_files(self, version: int) -> dict[int, Path]:
        """Delta files of the window ending at ``version``; removes the ones of this
        coordinator's that fell out of it or that the checkpoint never reached."""
        out: dict[int, Path] = {}
        if not self._dir().is_dir():
            return out
        for path in self._dir().glob("control-delta-*.bin"):
            try:
                v = int(path.name[len("control-delta-"):-len(".bin")])
            except ValueError:
                continue
            if version - self.window < v <= version:
                out[v] = path
            else:
                path.unlink(missing_ok=True)
        return out

    def publish(self, link: Link, db: StateDB, version: int) -> None:
        """Publish control variate ``version``: its delta (every delta of the window and a
        snapshot at the first publication of this run and when the same version is published
        again, after a broker restart), a snapshot when due, then the chain; clear the retained
        blobs that left the window.

        Raises:
            TransportError: the broker did not acknowledge in time.
        """
        everything = self._last is None or version != self._last + 1
        files = self._window_files(version)
        entries: list[ChainEntry] = []
        for v in sorted(files):
            data = files[v].read_bytes()
            if everything or v == version:
                base = cc.delta_topic(self.fed, v)
                info = BlobSender(link).send(base, data, retain=True, timeout=120.0)
                db.add_published("control-delta", v, base, info.count)
            entries.append(ChainEntry(v, len(data), hashlib.sha256(data).hexdigest(),
                                      DeltaBlob.from_bytes(data).sha256))
        if self._snapshot is None or everything or version % self.snapshot_every == 0:
            blob = cc.ControlSnapshot(self.spec.hash, version, self.published).to_bytes()
            base = cc.snapshot_topic(self.fed, version)
            info = BlobSender(link).send(base, blob, retain=True, timeout=120.0)
            db.add_published("control", version, base, info.count)
            self._snapshot = ChainEntry(version, len(blob), hashlib.sha256(blob).hexdigest(),
                                        params_sha256(self.published))
        chain = ModelChain(self.spec.hash, self.codec.name, 0, cc.zero_sha256(self.spec.size), version,
                           params_sha256(self.published), self._snapshot, tuple(entries))
        link.publish_wait(cc.chain_topic(self.fed), chain.to_bytes(), retain=True, timeout=30.0)
        self._last = version
        for kind, keep in (("control-delta", lambda v: v in files), ("control", lambda v: v == self._snapshot.version)):
            for old, base, count in db.published(kind):
                if not keep(old):
                    clear_blob(link, base, count)
                    db.remove_published(kind, old)


def fleet_size_of(devices: Mapping[str, Device], task: str, spec_hash: str) -> int:
    """``N``: devices the presence registry knows (online or not) for ``task`` and ``spec_hash``."""
    return sum(1 for d in devices.values() if d.task == task and d.spec_hash == spec_hash)

