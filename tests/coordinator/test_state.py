"""Checkpoints (safetensors, atomic) and the SQLite database."""

import numpy as np
import pytest

from coordinator.presence import Device
from coordinator.state import (CHECKPOINT_NAME, Checkpoint, ParticipationRecord, RoundRecord, StateDB, load_checkpoint,
                               save_checkpoint)
from fedmq.errors import StateError


def record(r=3):
    return RoundRecord(round=r, state="closed", base_version=1, model_version=2, target=2, participants=3, accepted=2,
                       rejected={"late": 1}, test_loss=0.5, test_accuracy=0.9, device_metrics={"train_loss": 0.7},
                       bytes_up=1000, bytes_down=3000, dense_bytes_up=8000, started=1.0, closed=2.5, wall_s=1.5,
                       participations=[ParticipationRecord("a", "t1", "accepted", "", 10, 400, {"train_loss": 0.6}),
                                       ParticipationRecord("b", "t2", "rejected", "late", 5, 600)])


def test_checkpoint_round_trips_bit_for_bit(tmp_path):
    rng = np.random.default_rng(0)
    model = rng.normal(size=1000).astype(np.float32)
    opt = {"m": rng.normal(size=1000).astype(np.float32), "v": rng.random(1000).astype(np.float32)}
    save_checkpoint(tmp_path, Checkpoint(3, 2, model, opt, {"task": "t", "spec_hash": "abc"}, record()))
    back = load_checkpoint(tmp_path)
    assert back.round == 3 and back.version == 2 and back.meta == {"task": "t", "spec_hash": "abc"}
    assert back.model.tobytes() == model.tobytes()
    assert all(back.optimizer_state[k].tobytes() == opt[k].tobytes() for k in opt)
    assert back.record == record()
    assert b"pickle" not in (tmp_path / CHECKPOINT_NAME).read_bytes()[:200]


def test_missing_and_corrupt_checkpoint(tmp_path):
    assert load_checkpoint(tmp_path) is None
    (tmp_path / CHECKPOINT_NAME).write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(StateError, match=CHECKPOINT_NAME):
        load_checkpoint(tmp_path)


def test_database_rounds_devices_and_upsert(tmp_path):
    db = StateDB(tmp_path)
    db.write_round(record(1))
    db.write_round(record(1))  # replay after a restart: idempotent
    db.write_round(record(2))
    db.write_devices([Device("a", True, "t", "h", 10, "1.0", 5.0), Device("b", False, "t", "h", 5, "1.0", 4.0)])
    rows = db.rounds()
    assert [r["round"] for r in rows] == [1, 2] and rows[0]["rejected"] == {"late": 1}
    devs = {d.device: d for d in db.devices()}
    assert devs["a"].rounds == 2 and devs["a"].bytes_up == 800 and devs["b"].rounds == 0 and devs["a"].online
    db.delete_rounds_after(1)
    assert [r["round"] for r in db.rounds()] == [1]
    assert [p.device for p in db.participations(1)] == ["a", "b"]
    db.close()


def test_round_record_row_is_flat():
    row = record().row()
    assert row["rejected_late"] == 1 and row["rejected_total"] == 1 and row["device_train_loss"] == 0.7
    assert all(not isinstance(v, (dict, list)) for v in row.values())


def test_transfer_outcome_is_the_stored_answer(tmp_path):
    db = StateDB(tmp_path)
    try:
        db.write_round(record(3))
        failed = record(4)
        failed.state = "failed"
        failed.participations = [ParticipationRecord("a", "t4", "accepted", "", 10, 400)]
        db.write_round(failed)
        assert db.transfer_outcome("a", "t1") == ("accepted", "", 3)
        assert db.transfer_outcome("b", "t2") == ("rejected", "late", 3)
        # Accepted in a round that failed: never aggregated.
        assert db.transfer_outcome("a", "t4") == ("rejected", "late", 4)
        assert db.transfer_outcome("a", "nope") is None
    finally:
        db.close()


def test_rejections_accumulate_across_runs(tmp_path):
    db = StateDB(tmp_path)
    db.add_rejections({"malformed_status": 2, "late": 1})
    db.close()
    db = StateDB(tmp_path)
    try:
        db.add_rejections({"late": 4, "unknown_device": 0})
        assert db.rejections() == {"late": 5, "malformed_status": 2}
    finally:
        db.close()


def test_a_checkpoint_write_killed_before_its_rename_leaves_a_temporary_that_is_removed(tmp_path):
    from fedmq.storage.atomic import remove_stale_temporaries

    model = np.zeros(10, np.float32)
    save_checkpoint(tmp_path, Checkpoint(1, 1, model, {}, {}))

    class Killed(Exception):
        pass

    def die() -> None:
        raise Killed

    with pytest.raises(Killed):
        save_checkpoint(tmp_path, Checkpoint(2, 2, model + 1, {}, {}), before_rename=die)
    # atomic_write_bytes removes its own temporary on an exception; a kill -9 cannot.
    leftover = tmp_path / f".{CHECKPOINT_NAME}.abcd1234.tmp"
    leftover.write_bytes(b"half")
    other = tmp_path / ".someone-elses.abcd1234.tmp"
    other.write_bytes(b"x")
    assert remove_stale_temporaries(tmp_path, (CHECKPOINT_NAME,)) == [leftover]
    assert other.exists() and load_checkpoint(tmp_path).round == 1


def test_task_leases_round_trip_and_rewrite_the_inflight_list(tmp_path):
    db = StateDB(tmp_path)
    try:
        assert db.task_leases() == {}
        db.set_task_leases({"b": (2, 1000.5), "a": (1, 999.0)})
        assert db.task_leases() == {"a": (1, 999.0), "b": (2, 1000.5)}
        assert db.inflight_devices() == ["a", "b"]
        db.set_task_leases({"c": (3, 5.0)})
        assert db.task_leases() == {"c": (3, 5.0)} and db.inflight_devices() == ["c"]
        db.set_task_leases({})
        assert db.task_leases() == {} and db.inflight_devices() == []
    finally:
        db.close()


def test_a_journal_write_killed_before_its_rename_leaves_a_temporary_the_step_removes(tmp_path):
    from coordinator.buffered import BufferedRounds

    folder = tmp_path / "buffer" / "2"
    folder.mkdir(parents=True)
    journaled = folder / "00000005+vd-00001+ab770e8893e30ce82a4d49521c50920e.bin"
    journaled.write_bytes(b"update")
    leftover = folder / ".00000006+vd-00000+7ec235d1515455b638159a479c944b2c.bin.4uy0ytqm.tmp"
    leftover.write_bytes(b"half")
    BufferedRounds._delete_journal(folder)
    assert not folder.exists()
    # a file fedmq did not write stays, and so does its folder
    folder.mkdir()
    (folder / ".notes.abcd1234.tmp").write_bytes(b"x")
    BufferedRounds._delete_journal(folder)
    assert (folder / ".notes.abcd1234.tmp").exists()
