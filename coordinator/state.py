"""Durable coordinator state: a checkpoint file and a SQLite database in the state folder.

``checkpoint.safetensors`` (written atomically with :func:`fedmq.storage.atomic.atomic_write_bytes`
after every round, never pickle) holds the global model (``model``, float32 (d,)), the
server optimizer's state arrays (``opt.<name>``, float32 (d,)), with a compressed downlink
the server residual (``downlink.residual``, float32 (d,); the model is then the *published*
one, bit for bit what devices hold) and metadata: the last
finished round, the model version, task, ParamSpec hash, optimizer name, and the last
round's record as JSON. The random generator of round ``r`` is derived from
``(seed, r)`` (fedmq.fl.sampling.round_rng), so no generator state is saved.

``coordinator.sqlite`` holds ``rounds`` (one row per finished round), ``participations``
(one row per selected device or received update per round) and ``devices`` (presence).
``rejections`` counts every rejection by reason since the state folder was made: client
updates (inside and outside a round), malformed statuses and chunks, statuses refused by
a full presence registry, non-finite global models refused. ``inflight`` lists the devices holding a retained task of the round in flight (cleared at
start after a kill), ``published`` the retained model / ONNX blobs (cleared when superseded).
The checkpoint is the source of truth: it is written first, and the round record it
carries is written into the database again at start (idempotent upsert), so a kill -9
between the two writes loses nothing.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from coordinator.presence import Conflict, Device
from fedmq.fl.rounds import ParticipationRecord, RoundRecord  # noqa: F401  (re-exported: the records are stored here)
from fedmq.storage.atomic import atomic_write_bytes
from fedmq.errors import StateError

CHECKPOINT_FORMAT = "fedmq-coordinator-checkpoint-v1"
CHECKPOINT_NAME = "checkpoint.safetensors"
DB_NAME = "coordinator.sqlite"
#: Checkpoint tensor holding the server residual of a compressed downlink.
DOWNLINK_RESIDUAL = "downlink.residual"


@dataclass
class Checkpoint:
    """The state a coordinator resumes from.

    Attributes:
        round: last finished round (0: none yet).
        version: global model version (0: the initial model).
        model: float32 (d,) global model.
        optimizer_state: server optimizer arrays, float32 (d,) each.
        meta: task, spec_hash, optimizer, seed (checked on resume).
        record: the last round's record (None before the first round).
        downlink_residual: float32 (d,) server residual of a compressed downlink (what the
            downlink codec has not sent yet; the server model is ``model + residual``), or
            None with downlink codec ``none``.
    """

    round: int
    version: int
    model: np.ndarray
    optimizer_state: dict[str, np.ndarray]
    meta: dict[str, str]
    record: RoundRecord | None = None
    downlink_residual: np.ndarray | None = None


def save_checkpoint(state_dir: Path, ckpt: Checkpoint, *, before_rename: Callable[[], None] | None = None) -> None:
    """Write the checkpoint atomically (old or new file, never a torn one).

    ``before_rename``: see :func:`fedmq.storage.atomic.atomic_write_bytes` (a test hook).

    Raises:
        OSError: the state folder cannot be written.
    """
    tensors = {"model": np.ascontiguousarray(ckpt.model, dtype=np.float32)}
    tensors.update({f"opt.{k}": np.ascontiguousarray(v, dtype=np.float32) for k, v in ckpt.optimizer_state.items()})
    if ckpt.downlink_residual is not None:
        tensors[DOWNLINK_RESIDUAL] = np.ascontiguousarray(ckpt.downlink_residual, dtype=np.float32)
    meta = dict(ckpt.meta, format=CHECKPOINT_FORMAT, round=str(ckpt.round), version=str(ckpt.version),
                record=ckpt.record.to_json() if ckpt.record is not None else "")
    atomic_write_bytes(state_dir / CHECKPOINT_NAME, st_save(tensors, metadata=meta), before_rename=before_rename)


def load_checkpoint(state_dir: Path) -> Checkpoint | None:
    """The checkpoint in ``state_dir``, or None when there is none.

    Raises:
        StateError: the file is corrupt or not a coordinator checkpoint (names the path).
    """
    path = state_dir / CHECKPOINT_NAME
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        tensors = st_load(data)
        # safetensors.numpy.load drops the metadata; it sits in the JSON header after an 8-byte length.
        header_len = int.from_bytes(data[:8], "little")
        meta = dict(json.loads(data[8:8 + header_len]).get("__metadata__") or {})
    except (SafetensorError, ValueError, UnicodeDecodeError) as exc:
        raise StateError(f"{path}: not a readable safetensors checkpoint ({exc})") from None
    if meta.get("format") != CHECKPOINT_FORMAT or "model" not in tensors:
        raise StateError(f"{path}: not a {CHECKPOINT_FORMAT} file (format {meta.get('format')!r})")
    try:
        round_, version = int(meta.pop("round")), int(meta.pop("version"))
        record_text = meta.pop("record", "")
        record = RoundRecord.from_json(record_text) if record_text else None
    except (KeyError, ValueError, TypeError) as exc:
        raise StateError(f"{path}: bad checkpoint metadata ({exc})") from None
    meta.pop("format")
    opt = {k.removeprefix("opt."): v for k, v in tensors.items() if k.startswith("opt.")}
    model = tensors["model"]
    if model.dtype != np.float32 or model.ndim != 1:
        raise StateError(f"{path}: model must be a float32 vector, got {model.dtype} {model.shape}")
    residual = tensors.get(DOWNLINK_RESIDUAL)
    if residual is not None and (residual.dtype != np.float32 or residual.shape != model.shape):
        raise StateError(f"{path}: downlink residual must be float32 {model.shape}, got {residual.dtype} "
                         f"{residual.shape}")
    return Checkpoint(round_, version, model, opt, meta, record, residual)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER PRIMARY KEY, state TEXT NOT NULL, base_version INTEGER, model_version INTEGER,
    target INTEGER, participants INTEGER, accepted INTEGER, rejected TEXT, test_loss REAL, test_accuracy REAL,
    device_metrics TEXT, bytes_up INTEGER, bytes_down INTEGER, dense_bytes_up INTEGER,
    started REAL, closed REAL, wall_s REAL);
CREATE TABLE IF NOT EXISTS participations (
    round INTEGER NOT NULL, device TEXT NOT NULL, transfer_id TEXT NOT NULL, status TEXT NOT NULL, reason TEXT,
    samples INTEGER, bytes_up INTEGER, metrics TEXT, PRIMARY KEY (round, device, transfer_id));
CREATE INDEX IF NOT EXISTS participations_transfer ON participations (device, transfer_id);
CREATE TABLE IF NOT EXISTS privacy (round INTEGER PRIMARY KEY, epsilon REAL NOT NULL);
CREATE TABLE IF NOT EXISTS rejections (reason TEXT PRIMARY KEY, count INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS inflight (device TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS task_leases (device TEXT PRIMARY KEY, round INTEGER NOT NULL, lease REAL NOT NULL);
CREATE TABLE IF NOT EXISTS published (
    kind TEXT NOT NULL, version INTEGER NOT NULL, base TEXT NOT NULL, chunks INTEGER NOT NULL,
    PRIMARY KEY (kind, version));
CREATE TABLE IF NOT EXISTS devices (
    device TEXT PRIMARY KEY, online INTEGER, task TEXT, spec_hash TEXT, samples INTEGER, software TEXT,
    last_seen REAL);
CREATE TABLE IF NOT EXISTS run_stop (
    id INTEGER PRIMARY KEY CHECK (id = 0), round INTEGER NOT NULL, reason TEXT NOT NULL, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS conflicts (
    device TEXT PRIMARY KEY, instances TEXT NOT NULL, first_seen REAL, last_seen REAL, turns INTEGER);
"""


class StateDB:
    """The coordinator's SQLite database (standard library ``sqlite3``, WAL journal).

    Raises:
        StateError: the file cannot be opened or is not a database (names the path).
    """

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / DB_NAME
        state_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.conn = sqlite3.connect(str(self.path), check_same_thread=False)
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=FULL")
            self.conn.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise StateError(f"{self.path}: cannot open the coordinator database ({exc})") from None

    def close(self) -> None:
        self.conn.close()

    def write_round(self, rec: RoundRecord) -> None:
        """Insert or replace the round and its participations in one transaction."""
        with self.conn:
            self.conn.execute(
                "INSERT OR REPLACE INTO rounds VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (rec.round, rec.state, rec.base_version, rec.model_version, rec.target, rec.participants,
                 rec.accepted, json.dumps(rec.rejected, sort_keys=True), rec.test_loss, rec.test_accuracy,
                 json.dumps(rec.device_metrics, sort_keys=True), rec.bytes_up, rec.bytes_down, rec.dense_bytes_up,
                 rec.started, rec.closed, rec.wall_s))
            self.conn.execute("DELETE FROM participations WHERE round = ?", (rec.round,))
            self.conn.executemany(
                "INSERT OR REPLACE INTO participations VALUES (?,?,?,?,?,?,?,?)",
                [(rec.round, p.device, p.transfer_id, p.status, p.reason, p.samples, p.bytes_up,
                  json.dumps(p.metrics, sort_keys=True)) for p in rec.participations])
            if rec.epsilon is not None:
                self.conn.execute("INSERT OR REPLACE INTO privacy VALUES (?,?)", (rec.round, rec.epsilon))
            self.conn.execute("DELETE FROM run_stop")  # a round ran after it: the run went on

    def set_stopped(self, round_: int, reason: str, at: float) -> None:
        """Record that the run stopped before opening round ``round_`` for ``reason`` (the
        privacy budget): ``fedmq coordinator status`` says so until a later round is written.
        ``at``: seconds since the epoch."""
        with self.conn:
            self.conn.execute("INSERT OR REPLACE INTO run_stop VALUES (0,?,?,?)", (round_, reason, at))

    def stopped(self) -> tuple[int, str, float] | None:
        """``(round not opened, reason, at)`` of the run's stop, None while it is not stopped."""
        row = self.conn.execute("SELECT round, reason, at FROM run_stop").fetchone()
        return None if row is None else (int(row[0]), str(row[1]), float(row[2]))

    def set_evaluation(self, round_: int, loss: float | None, accuracy: float | None) -> None:
        """Store the test loss and accuracy of round ``round_``'s global model (evaluated
        after the round was written)."""
        with self.conn:
            self.conn.execute("UPDATE rounds SET test_loss = ?, test_accuracy = ? WHERE round = ?",
                              (loss, accuracy, round_))

    def evaluation(self, round_: int) -> tuple[float | None, float | None] | None:
        """``(test_loss, test_accuracy)`` stored for round ``round_``; None when the round is
        not stored or was not evaluated."""
        row = self.conn.execute("SELECT test_loss, test_accuracy FROM rounds WHERE round = ?", (round_,)).fetchone()
        return None if row is None or row[0] is None else (row[0], row[1])

    def transfer_outcome(self, device: str, transfer_id: str) -> tuple[str, str, int] | None:
        """The stored answer to a transfer of ``device`` judged in a finished round:
        ``(status, reason, round)``, or None when no finished round judged it. An update
        accepted in a round that failed was not aggregated: ``("rejected", "late", r)``.
        ``round`` is the round the receipt named: the update's own (a refusal of an update
        of another round carries it as the metric ``task_round``), which the device matches.
        This is the one authority a device's resend after any crash is answered from."""
        row = self.conn.execute(
            "SELECT p.status, p.reason, p.round, r.state, json_extract(p.metrics, '$.task_round') "
            "FROM participations p JOIN rounds r ON p.round = r.round "
            "WHERE p.device = ? AND p.transfer_id = ? AND p.transfer_id != '' ORDER BY p.round DESC LIMIT 1",
            (device, transfer_id)).fetchone()
        if row is None:
            return None
        status, reason, round_, state, named = row
        if status == "accepted" and state != "closed":
            return ("rejected", "late", int(round_))
        return (str(status), str(reason or ""), int(round_ if named is None else named))

    def add_rejections(self, counts: dict[str, int]) -> None:
        """Add ``counts`` (reason -> number) to the ``rejections`` table."""
        with self.conn:
            self.conn.executemany(
                "INSERT INTO rejections VALUES (?, ?) ON CONFLICT(reason) DO UPDATE SET count = count + excluded.count",
                [(k, int(v)) for k, v in counts.items() if v])

    def rejections(self) -> dict[str, int]:
        """Every rejection counted so far, by reason."""
        return {r: int(n) for r, n in self.conn.execute("SELECT reason, count FROM rejections ORDER BY reason")}

    def write_devices(self, devices: list[Device]) -> None:
        with self.conn:
            self.conn.executemany(
                "INSERT OR REPLACE INTO devices VALUES (?,?,?,?,?,?,?)",
                [(d.device, int(d.online), d.task, d.spec_hash, d.samples, d.software, d.last_seen) for d in devices])

    def write_conflict(self, conflict: Conflict) -> None:
        """Record (or update) a device id that several agents use (coordinator.presence)."""
        with self.conn:
            self.conn.execute("INSERT OR REPLACE INTO conflicts VALUES (?,?,?,?,?)",
                              (conflict.device, json.dumps(conflict.instances), conflict.first_seen,
                               conflict.last_seen, conflict.turns))

    def conflicts(self) -> dict[str, Conflict]:
        """Recorded duplicate device ids: device -> :class:`Conflict`."""
        return {r[0]: Conflict(r[0], json.loads(r[1]), r[2], r[3], r[4])
                for r in self.conn.execute("SELECT device, instances, first_seen, last_seen, turns FROM conflicts")}

    def delete_rounds_after(self, round_: int) -> None:
        """Drop rows of rounds after ``round_`` (left by a run whose checkpoint is older)."""
        with self.conn:
            self.conn.execute("DELETE FROM rounds WHERE round > ?", (round_,))
            self.conn.execute("DELETE FROM participations WHERE round > ?", (round_,))
            self.conn.execute("DELETE FROM privacy WHERE round > ?", (round_,))

    def rounds(self) -> list[dict[str, Any]]:
        cur = self.conn.execute("SELECT * FROM rounds ORDER BY round")
        cols = [c[0] for c in cur.description]
        epsilons = dict(self.conn.execute("SELECT round, epsilon FROM privacy").fetchall())
        out = []
        for row in cur.fetchall():
            rec = dict(zip(cols, row))
            rec["epsilon"] = epsilons.get(rec["round"])
            rec["rejected"] = json.loads(rec["rejected"] or "{}")
            rec["device_metrics"] = json.loads(rec["device_metrics"] or "{}")
            out.append(rec)
        return out

    def devices(self) -> list[Device]:
        """Devices with their totals: rounds with an accepted update, bytes sent."""
        totals = {row[0]: (row[1], row[2]) for row in self.conn.execute(
            "SELECT device, SUM(status = 'accepted'), SUM(bytes_up) FROM participations GROUP BY device")}
        out = []
        for row in self.conn.execute("SELECT * FROM devices ORDER BY device"):
            rounds, sent = totals.get(row[0], (0, 0))
            out.append(Device(device=row[0], online=bool(row[1]), task=row[2], spec_hash=row[3], samples=row[4],
                              software=row[5], last_seen=row[6], rounds=int(rounds or 0), bytes_up=int(sent or 0)))
        return out

    def bytes_down_by_device(self) -> dict[str, int]:
        """Device -> payload bytes the broker delivered to it, as it reported with its updates
        (client-update metric ``link_bytes_in``, summed over its participations)."""
        return {row[0]: int(row[1] or 0) for row in self.conn.execute(
            "SELECT device, SUM(json_extract(metrics, '$.link_bytes_in')) FROM participations GROUP BY device")}

    def participations(self, round_: int) -> list[ParticipationRecord]:
        return [ParticipationRecord(device=r[0], transfer_id=r[1], status=r[2], reason=r[3] or "", samples=r[4] or 0,
                              bytes_up=r[5] or 0, metrics=json.loads(r[6] or "{}"))
                for r in self.conn.execute("SELECT device, transfer_id, status, reason, samples, bytes_up, metrics "
                                           "FROM participations WHERE round = ? ORDER BY device", (round_,))]

    def set_inflight(self, devices: list[str]) -> None:
        """Record the devices that hold a retained task of the round in flight."""
        with self.conn:
            self.conn.execute("DELETE FROM inflight")
            self.conn.executemany("INSERT OR REPLACE INTO inflight VALUES (?)", [(d,) for d in devices])

    def inflight_devices(self) -> list[str]:
        return [r[0] for r in self.conn.execute("SELECT device FROM inflight ORDER BY device")]

    def set_task_leases(self, leases: dict[str, tuple[int, float]]) -> None:
        """Record the devices holding a retained task, each with the task's round and its
        lease end (seconds since the epoch), as buffered asynchronous rounds hand them out;
        the ``inflight`` list is rewritten with them in the same transaction."""
        with self.conn:
            self.conn.execute("DELETE FROM inflight")
            self.conn.execute("DELETE FROM task_leases")
            self.conn.executemany("INSERT INTO inflight VALUES (?)", [(d,) for d in sorted(leases)])
            self.conn.executemany("INSERT INTO task_leases VALUES (?,?,?)",
                                  [(d, int(r), float(t)) for d, (r, t) in sorted(leases.items())])

    def task_leases(self) -> dict[str, tuple[int, float]]:
        """Device -> (task round, lease end in seconds since the epoch) of
        :meth:`set_task_leases`; a database written before leases were recorded has none."""
        return {r[0]: (int(r[1]), float(r[2]))
                for r in self.conn.execute("SELECT device, round, lease FROM task_leases ORDER BY device")}

    def add_published(self, kind: str, version: int, base: str, chunks: int) -> None:
        """Record a retained blob (``kind`` ``model`` or ``onnx``) of ``chunks`` chunk messages."""
        with self.conn:
            self.conn.execute("INSERT OR REPLACE INTO published VALUES (?,?,?,?)", (kind, version, base, chunks))

    def published(self, kind: str) -> list[tuple[int, str, int]]:
        """``(version, base topic, chunks)`` of the retained blobs of ``kind``, oldest first."""
        return [(r[0], r[1], r[2]) for r in self.conn.execute(
            "SELECT version, base, chunks FROM published WHERE kind = ? ORDER BY version", (kind,))]

    def remove_published(self, kind: str, version: int) -> None:
        with self.conn:
            self.conn.execute("DELETE FROM published WHERE kind = ? AND version = ?", (kind, version))
