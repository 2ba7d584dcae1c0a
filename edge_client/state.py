"""Durable device state: residual, client update in flight, model cache, last round.

Layout of the state directory (``state_dir`` / ``$STATE_DIRECTORY``)::

    state.json                commit record, rewritten atomically (the only commit point)
    residual-<seq>.npy        error-feedback residual, float32 (spec.size,), .npy (never pickle)
    update-<seq>.bin          exact bytes of the client update in flight (encoded ClientUpdate)
    sealed-<seq>.bin          the same update sealed to the coordinator's key (fedmq.security.sealing):
                              the bytes published, when the device seals
    models/<version>.safetensors   cached global model versions (the last 2 kept)

``state.json`` names the residual file and the in-flight update file of the same sequence
number ``seq``. A change (new in-flight update, rollback) first writes its new files under
``seq + 1`` with :func:`fedmq.storage.atomic.atomic_write_bytes`, then replaces ``state.json``;
files of other sequence numbers are removed afterwards and on load. So whatever instant
the process dies at, the residual and the in-flight record on disk belong together: either
both from before the change or both from after it.

Crash-safety contract used by :mod:`edge_client.agent`:

* the in-flight record is committed BEFORE the first byte of the update is published, so
  after a restart the device re-sends the SAME bytes under the same transfer id (the
  coordinator deduplicates by (device, round)) and never trains a second update for it;
* the residual saved with the in-flight record is the residual AFTER compression
  (``residual + update - sent``); rolling back adds ``sent`` (decoded from the saved
  bytes) once, in a commit of its own that also clears the in-flight record;
* ``last_round`` is the highest round this device is done with (accepted, rejected or
  past its deadline): a retained task for such a round is ignored;
* the ledger (``state.json``'s ``ledger``, the last :data:`LEDGER_KEPT` transfers) records
  each transfer's state in the same commit as the residual change it goes with: ``sent``
  (committed, maybe published), ``accepted`` (the coordinator's receipt said so; no longer
  in the residual) or ``rolled_back`` (back in the residual, with the reason). The
  fault-injection suite checks it against the coordinator's database: a transfer must
  never be both aggregated and rolled back.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import IO

from fedmq.storage.atomic import atomic_write_bytes, atomic_write_text
from fedmq.errors import StateError
from fedmq.fl.feedback import ErrorFeedback
from fedmq.storage.lockfile import LOCK_FILE, lock_folder
from fedmq.model.params import ParamSpec

STATE_FORMAT = 1
MODELS_KEPT = 2
#: Transfers kept in the ledger (the oldest are dropped first).
LEDGER_KEPT = 64


@dataclass(frozen=True)
class LedgerEntry:
    """One transfer in the device ledger: ``state`` is ``sent``, ``accepted`` or
    ``rolled_back`` (``reason``: the receipt's rejection reason, ``deadline`` when no receipt
    came in time, ``superseded`` when a later round began without one)."""

    round: int
    transfer_id: str
    state: str
    reason: str = ""


@dataclass(frozen=True)
class InFlight:
    """A client update committed to disk and (about to be) published.

    Attributes:
        round: round the update is for.
        transfer_id: id of its blob transfer (topic level under fedmq/F/update/D/).
        base_version: global model version it was trained from.
        deadline: the round's deadline, wall-clock seconds since the epoch.
        update_file: file name (in the state dir) of the encoded ClientUpdate bytes.
        sha256: hex digest of those bytes.
        size: their length, bytes.
        feedback: the update was compressed with error feedback (False: the residual did
            not change, so a rollback leaves it alone).
        sealed_file, sealed_sha256: the sealed update (the bytes published) and its digest,
            "" when the device sends the envelope itself.
    """

    round: int
    transfer_id: str
    base_version: int
    deadline: float
    update_file: str
    sha256: str
    size: int
    feedback: bool = True
    sealed_file: str = ""
    sealed_sha256: str = ""


@dataclass(frozen=True)
class Record:
    """Content of ``state.json``: ``seq`` (sequence number of the current files),
    ``spec_hash`` (ParamSpec hash the residual belongs to, "" when none), ``last_round``
    (-1 before the first round), ``last_deadline`` (deadline of that round's task, seconds
    since the epoch: a task for the same round with a later deadline is the coordinator
    rerunning a round it lost in a crash), ``residual_file`` (None: all zeros), ``inflight``,
    the ``ledger`` and ``settled``: the last accepted update, kept (with its bytes) until the
    next update is committed, so that a rerun of its round gets the same bytes again."""

    seq: int = 0
    spec_hash: str = ""
    last_round: int = -1
    last_deadline: float = 0.0
    residual_file: str | None = None
    inflight: InFlight | None = None
    ledger: tuple[LedgerEntry, ...] = ()
    settled: InFlight | None = None

    def with_entry(self, round: int, transfer_id: str, state: str, reason: str = "") -> tuple[LedgerEntry, ...]:
        """The ledger with ``transfer_id``'s entry set (added last when new), bounded."""
        kept = tuple(e for e in self.ledger if e.transfer_id != transfer_id)
        return (kept + (LedgerEntry(round, transfer_id, state, reason),))[-LEDGER_KEPT:]


def lock_state_dir(root: str | os.PathLike[str]) -> IO[bytes]:
    """Take the exclusive lock of a state directory for this process (released when the
    returned file is closed or the process dies, ``kill -9`` included); see
    :func:`fedmq.storage.lockfile.lock_folder`.

    Two agents on one state directory would delete each other's files, so the second is
    refused.

    Raises:
        StateError: another process holds the lock (names the folder and its pid), or the
            folder cannot be written.
    """
    return lock_folder(root, "edge client", "each device needs its own state_dir")


class DeviceState:
    """Reads and commits the durable state of one device (one owner: the agent's main thread).

    Args:
        root: the state directory; created if missing (unless ``readonly``).
        readonly: only read (``fedmq edge status`` beside a running agent): create
            nothing and remove nothing, so a concurrent agent's half-made change survives.

    Raises:
        StateError: ``state.json`` or a file it names is corrupt (message names the path).
    """

    def __init__(self, root: str | os.PathLike[str], *, readonly: bool = False) -> None:
        self.root = Path(root)
        if readonly:
            self.record = self._read()
            return
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            (self.root / "models").mkdir(exist_ok=True)
        except OSError as exc:
            raise StateError(f"{self.root}: cannot create the state directory ({exc})") from None
        self.record = self._read()
        self._collect_garbage()

    @property
    def path(self) -> Path:
        return self.root / "state.json"

    def _read(self) -> Record:
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return Record()
        except (OSError, ValueError) as exc:
            raise StateError(f"{self.path}: unreadable device state ({exc}); move it away to start afresh") from None
        try:
            if raw.pop("format") != STATE_FORMAT:
                raise ValueError("unknown format")
            inflight = raw.pop("inflight")
            ledger = tuple(LedgerEntry(**e) for e in raw.pop("ledger", []))
            settled = raw.pop("settled", None)
            return Record(**raw, inflight=InFlight(**inflight) if inflight is not None else None, ledger=ledger,
                          settled=InFlight(**settled) if settled is not None else None)
        except (KeyError, TypeError, ValueError) as exc:
            raise StateError(f"{self.path}: not a fedmq device state of format {STATE_FORMAT} ({exc})") from None

    def _write(self, record: Record) -> None:
        body = {"format": STATE_FORMAT, **asdict(record)}
        atomic_write_text(self.path, json.dumps(body, indent=1, sort_keys=True))
        self.record = record
        self._collect_garbage()

    def _collect_garbage(self) -> None:
        keep = {"state.json", "models", LOCK_FILE, self.record.residual_file}
        for kept in (self.record.inflight, self.record.settled):
            if kept is not None:
                keep.update((kept.update_file, kept.sealed_file))
        for entry in self.root.iterdir():
            if entry.name not in keep and (entry.name.startswith(("residual-", "update-", "sealed-", "."))
                                           and entry.is_file()):
                entry.unlink(missing_ok=True)

    # -- residual and in-flight update ------------------------------------------------

    def load_feedback(self, spec: ParamSpec) -> ErrorFeedback:
        """The error-feedback state for ``spec``: the saved residual, or zeros when none is
        saved or it belongs to another ParamSpec (a new task: the old residual and any
        in-flight update of the old model are dropped, durably).

        Raises:
            StateError: the residual file is missing or corrupt (names the path).
        """
        rec = self.record
        if rec.spec_hash != spec.hash:
            if rec.spec_hash:
                self._write(replace(rec, seq=rec.seq + 1, spec_hash=spec.hash, residual_file=None, inflight=None))
            else:
                self._write(replace(rec, spec_hash=spec.hash))
            return ErrorFeedback(spec)
        if rec.residual_file is None:
            return ErrorFeedback(spec)
        return ErrorFeedback.load(self.root / rec.residual_file, spec)

    def read_inflight(self) -> bytes:
        """The exact bytes of the update in flight.

        Raises:
            StateError: no update is in flight, or its file is missing or corrupt.
        """
        inflight = self.record.inflight
        if inflight is None:
            raise StateError(f"{self.path}: no client update in flight")
        path = self.root / inflight.update_file
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise StateError(f"{path}: in-flight client update unreadable ({exc})") from None
        if len(data) != inflight.size or hashlib.sha256(data).hexdigest() != inflight.sha256:
            raise StateError(f"{path}: in-flight client update corrupt (size or sha256 differs from state.json)")
        return data

    def read_wire(self) -> bytes:
        """The bytes of the update in flight as published: the sealed update when the device
        seals, else the envelope (:meth:`read_inflight`).

        Raises:
            StateError: no update is in flight, or a file is missing or corrupt.
        """
        inflight = self.record.inflight
        if inflight is None or not inflight.sealed_file:
            return self.read_inflight()
        path = self.root / inflight.sealed_file
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise StateError(f"{path}: sealed client update unreadable ({exc})") from None
        if hashlib.sha256(data).hexdigest() != inflight.sealed_sha256:
            raise StateError(f"{path}: sealed client update corrupt (sha256 differs from state.json)")
        return data

    def begin_update(self, feedback: ErrorFeedback, update: bytes, *, round: int, transfer_id: str,
                     base_version: int, deadline: float, with_feedback: bool = True,
                     sealed: bytes | None = None) -> InFlight:
        """Commit the residual after compression together with the update about to be sent.

        Args:
            feedback: error-feedback state whose residual already had the sent part removed.
            update: encoded ClientUpdate bytes (published as they are unless ``sealed``).
            sealed: the same update sealed to the coordinator's key, exactly as it will be
                published, or None.

        Returns:
            The in-flight record now on disk.

        Raises:
            OSError: the state directory cannot be written (nothing changed on disk).
        """
        seq = self.record.seq + 1
        residual_file, update_file = f"residual-{seq}.npy", f"update-{seq}.bin"
        feedback.save(self.root / residual_file)
        atomic_write_bytes(self.root / update_file, update)
        sealed_file = ""
        if sealed is not None:
            sealed_file = f"sealed-{seq}.bin"
            atomic_write_bytes(self.root / sealed_file, sealed)
        inflight = InFlight(round=round, transfer_id=transfer_id, base_version=base_version, deadline=deadline,
                            update_file=update_file, sha256=hashlib.sha256(update).hexdigest(), size=len(update),
                            feedback=with_feedback, sealed_file=sealed_file,
                            sealed_sha256=hashlib.sha256(sealed).hexdigest() if sealed is not None else "")
        self._write(replace(self.record, seq=seq, residual_file=residual_file, inflight=inflight, settled=None,
                            ledger=self.record.with_entry(round, transfer_id, "sent")))
        return inflight

    def commit(self) -> None:
        """The coordinator has the in-flight update: forget it, mark its round done."""
        inflight = self.record.inflight
        if inflight is None:
            return
        self._write(replace(self.record, inflight=None, settled=inflight, **self._done(inflight.round, inflight.deadline),
                            ledger=self.record.with_entry(inflight.round, inflight.transfer_id, "accepted")))

    def reopen(self, deadline: float) -> InFlight:
        """Put the update in flight again for a rerun of its round with ``deadline``: the
        settled (accepted) one when none is in flight, else the one in flight. The rerun
        coordinator lost what the crashed one accepted; the same bytes under the same
        transfer id make the rerun aggregate exactly what the first run would have.

        Raises:
            StateError: nothing in flight or settled.
        """
        current = self.record.inflight or self.record.settled
        if current is None:
            raise StateError(f"{self.path}: no client update to send again")
        inflight = replace(current, deadline=max(deadline, current.deadline))
        self._write(replace(self.record, inflight=inflight, settled=None,
                            ledger=self.record.with_entry(inflight.round, inflight.transfer_id, "sent")))
        return inflight

    def rollback(self, feedback: ErrorFeedback, sent, reason: str = "") -> None:
        """The in-flight update never reached the aggregate: put ``sent`` (float32
        (spec.size,), the decoded update) back into the residual and forget the update,
        in one commit. Its round stays done: no second update is sent for it.
        ``reason`` goes into the ledger."""
        inflight = self.record.inflight
        if inflight is None:
            return
        if inflight.feedback:
            feedback.rollback(sent)
        self.save_residual(feedback, inflight.round, inflight.deadline, _settled=None,
                           _ledger=self.record.with_entry(inflight.round, inflight.transfer_id, "rolled_back", reason))

    def _done(self, round: int, deadline: float) -> dict[str, float | int]:
        if round > self.record.last_round:
            return {"last_round": round, "last_deadline": deadline}
        if round == self.record.last_round:
            return {"last_round": round, "last_deadline": max(deadline, self.record.last_deadline)}
        return {}

    def save_residual(self, feedback: ErrorFeedback, round: int, deadline: float = 0.0, *,
                      _ledger: tuple[LedgerEntry, ...] | None = None, _settled: InFlight | None = None) -> None:
        """Commit ``feedback``'s residual with no update in flight and ``round`` done (e.g. an
        update finished after its round's deadline, kept in the residual instead of sent)."""
        seq = self.record.seq + 1
        residual_file = f"residual-{seq}.npy"
        feedback.save(self.root / residual_file)
        self._write(replace(self.record, seq=seq, residual_file=residual_file, inflight=None, settled=_settled,
                            ledger=self.record.ledger if _ledger is None else _ledger,
                            **self._done(round, deadline)))

    def finish_round(self, round: int, deadline: float = 0.0) -> None:
        """Mark ``round`` (whose task had ``deadline``) done without an update (e.g. its
        deadline passed before training ended)."""
        if round >= self.record.last_round:
            self._write(replace(self.record, **self._done(round, deadline)))

    # -- global model cache -----------------------------------------------------------

    def _model_path(self, version: int) -> Path:
        return self.root / "models" / f"{int(version)}.safetensors"

    def cached_model(self, version: int) -> bytes | None:
        """Bytes of cached global model ``version`` (safetensors), or None."""
        try:
            return self._model_path(version).read_bytes()
        except FileNotFoundError:
            return None

    def drop_model(self, version: int) -> None:
        """Forget a cached model (found corrupt)."""
        self._model_path(version).unlink(missing_ok=True)

    def cache_model(self, version: int, data: bytes) -> None:
        """Store global model ``version`` atomically; keep the newest :data:`MODELS_KEPT`."""
        atomic_write_bytes(self._model_path(version), data)
        versions = sorted(self.cached_versions())
        for old in versions[:-MODELS_KEPT]:
            self.drop_model(old)

    def cached_versions(self) -> list[int]:
        """Versions in the model cache, ascending."""
        out = []
        for entry in (self.root / "models").glob("*.safetensors"):
            if entry.stem.isdigit():
                out.append(int(entry.stem))
        return sorted(out)
