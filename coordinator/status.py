"""What ``fedmq coordinator status`` shows: the fleet at a glance and the rounds so far,
read from a state folder (the checkpoint and the SQLite database), as a JSON-ready
document and as text for a terminal.

Times in the document are ISO 8601 in UTC (``2026-03-01T12:00:05+00:00``) with their
age in seconds; the text form says how long ago (``3 min ago``).
"""

from __future__ import annotations

import datetime as dt
import math
from pathlib import Path
from typing import Any

from coordinator.state import DB_NAME, StateDB, load_checkpoint


def iso(ts: float | None) -> str | None:
    """Seconds since the epoch as ISO 8601 UTC with seconds precision; None stays None."""
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(ts, tz=dt.timezone.utc).isoformat(timespec="seconds")


def ago(ts: float | None, now: float) -> str:
    """How long before ``now`` (seconds since the epoch) ``ts`` was, in words:
    ``just now``, ``42 s ago``, ``3 min ago``, ``5 h ago``, ``2 d ago``; ``never`` for
    None; ``in 7 s`` when ``ts`` is ahead of ``now`` (clock skew between hosts)."""
    if ts is None:
        return "never"
    delta = now - ts
    ahead = delta < 0
    delta = abs(delta)
    if delta < 1:
        return "just now"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if delta >= size:
            text = f"{int(delta // size)} {unit}"
            break
    else:
        text = f"{int(delta)} s"
    return f"in {text}" if ahead else f"{text} ago"


def _age(ts: float | None, now: float) -> float | None:
    return None if ts is None else round(now - ts, 3)


def build_status(state_dir: Path, now: float, federation: str = "", task: str = "",
                 delta: float | None = None) -> dict[str, Any]:
    """The status document of the coordinator state in ``state_dir``.

    Reads only: a folder without a database yet gives empty lists (nothing is created).

    Args:
        state_dir: the coordinator's ``state_dir``.
        now: the current time, seconds since the epoch (ages are measured against it).
        federation, task: from the configuration, copied into the document.
        delta: ``[privacy] delta`` when differential privacy is on (the ``epsilon`` of the
            rounds summary is at this delta), else None.

    Returns:
        ``{"federation", "task", "state_dir", "generated_at", "checkpoint": {"round",
        "model_version"} | None, "fleet": {"known", "online", "offline"}, "devices": [...],
        "stopped": {"round_not_opened", "reason", "at"} | None, "rounds_summary": {...},
        "rounds": [...]}``; ``stopped``: the run stopped on its own before a round (the privacy
        budget), until a later round runs; per device ``online``, ``last_seen``
        (ISO) and ``last_seen_age_s``, ``rounds_taken_part`` (rounds it was selected for or
        sent an update in), ``accepted``, ``rejected`` (by reason), ``no_answer``,
        ``bytes_up`` (client-update bytes received, manifests included), ``duplicate_id``
        (bool); ``duplicate_ids``: device ids several agents use (coordinator.presence),
        each with ``instances``, ``turns``, ``first_seen``, ``last_seen``,
        ``last_seen_age_s``; per round its record with ``started`` / ``closed`` as ISO.

    Raises:
        StateError: the checkpoint or the database is corrupt (names the path).
    """
    ckpt = load_checkpoint(state_dir)
    devices: list[dict[str, Any]] = []
    rounds: list[dict[str, Any]] = []
    duplicates: list[dict[str, Any]] = []
    stopped: dict[str, Any] | None = None
    if (state_dir / DB_NAME).is_file():
        db = StateDB(state_dir)
        try:
            rounds = db.rounds()
            stop = db.stopped()
            if stop is not None:
                stopped = {"round_not_opened": stop[0], "reason": stop[1], "at": iso(stop[2])}
            conflicts = db.conflicts()
            duplicates = [{"device": c.device, "instances": c.instances, "turns": c.turns,
                           "first_seen": iso(c.first_seen), "last_seen": iso(c.last_seen),
                           "last_seen_age_s": _age(c.last_seen, now)} for c in sorted(conflicts.values(),
                                                                                       key=lambda c: c.device)]
            per_device: dict[str, dict[str, Any]] = {}
            for device, rnd, status, reason, sent in db.conn.execute(
                    "SELECT device, round, status, reason, bytes_up FROM participations"):
                d = per_device.setdefault(device, {"rounds": set(), "accepted": 0, "rejected": {}, "no_answer": 0,
                                                   "bytes_up": 0})
                d["rounds"].add(rnd)
                d["bytes_up"] += sent or 0
                if status == "accepted":
                    d["accepted"] += 1
                elif status == "rejected":
                    d["rejected"][reason or "unknown"] = d["rejected"].get(reason or "unknown", 0) + 1
                else:
                    d["no_answer"] += 1
            for dev in db.devices():
                d = per_device.get(dev.device, {"rounds": set(), "accepted": 0, "rejected": {}, "no_answer": 0,
                                                "bytes_up": 0})
                devices.append({"device": dev.device, "online": dev.online, "task": dev.task,
                                "spec_hash": dev.spec_hash, "samples": dev.samples, "software": dev.software,
                                "last_seen": iso(dev.last_seen), "last_seen_age_s": _age(dev.last_seen, now),
                                "rounds_taken_part": len(d["rounds"]), "accepted": d["accepted"],
                                "rejected": dict(sorted(d["rejected"].items())), "no_answer": d["no_answer"],
                                "bytes_up": d["bytes_up"], "duplicate_id": dev.device in conflicts})
        finally:
            db.close()
    for r in rounds:
        r["started"], r["closed"] = iso(r["started"]), iso(r["closed"])
    online = sum(d["online"] for d in devices)
    closed = [r for r in rounds if r["state"] == "closed"]
    evaluated = [r["test_accuracy"] for r in rounds if r["test_accuracy"] is not None]
    reasons: dict[str, int] = {}
    for r in rounds:
        for reason, n in r["rejected"].items():
            reasons[reason] = reasons.get(reason, 0) + n
    last = rounds[-1] if rounds else None
    summary = {
        "rounds": len(rounds), "closed": len(closed), "failed": len(rounds) - len(closed),
        "last_round": None if last is None else last["round"],
        "last_state": None if last is None else last["state"],
        "last_closed": None if last is None else last["closed"],
        "last_test_accuracy": evaluated[-1] if evaluated else None,
        "best_test_accuracy": max(evaluated) if evaluated else None,
        "updates_accepted": sum(r["accepted"] for r in rounds),
        "updates_rejected": dict(sorted(reasons.items())),
        "bytes_up": sum(r["bytes_up"] for r in rounds), "bytes_down": sum(r["bytes_down"] for r in rounds),
        "mean_wall_s": sum(r["wall_s"] for r in rounds) / len(rounds) if rounds else None,
        "epsilon": next((r["epsilon"] for r in reversed(rounds) if r.get("epsilon") is not None), None),
        "delta": delta,
    }
    return _finite({"federation": federation, "task": task, "state_dir": str(state_dir), "generated_at": iso(now),
                    "checkpoint": None if ckpt is None else {"round": ckpt.round, "model_version": ckpt.version},
                    "fleet": {"known": len(devices), "online": online, "offline": len(devices) - online},
                    "devices": devices, "duplicate_ids": duplicates, "stopped": stopped,
                    "rounds_summary": summary, "rounds": rounds})


def _finite(obj: Any) -> Any:
    """NaN / Inf (a diverged loss) become None: JSON has no such numbers."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def _since(iso_text: str | None, now: float) -> str:
    if iso_text is None:
        return "never"
    return ago(dt.datetime.fromisoformat(iso_text).timestamp(), now)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2%}"


def render_text(doc: dict[str, Any], now: float, last_rounds: int = 10) -> str:
    """The status document as aligned plain text for a terminal or a log (no colour):
    a head line, the fleet, the rounds summary and the ``last_rounds`` latest rounds."""
    ckpt = doc["checkpoint"]
    head = "no checkpoint yet" if ckpt is None else (f"last finished round {ckpt['round']}, "
                                                     f"model version {ckpt['model_version']}")
    fleet = doc["fleet"]
    lines = [f"federation {doc['federation']}, task {doc['task']}: {head} (state {doc['state_dir']})", "",
             f"fleet: {fleet['known']} device(s), {fleet['online']} online, {fleet['offline']} offline"]
    rows = [("device", "online", "last seen", "rounds", "accepted", "rejected", "no answer", "bytes up", "samples")]
    for d in doc["devices"]:
        rejected = sum(d["rejected"].values())
        rows.append((d["device"], "yes" if d["online"] else "no", _since(d["last_seen"], now),
                     str(d["rounds_taken_part"]), str(d["accepted"]),
                     f"{rejected} ({', '.join(f'{k}: {v}' for k, v in d['rejected'].items())})" if rejected else "0",
                     str(d["no_answer"]), f"{d['bytes_up']:,}", str(d["samples"])))
    if doc["devices"]:
        lines += _table(rows)
    for c in doc.get("duplicate_ids", []):
        lines.append(f"DUPLICATE DEVICE ID {c['device']}: {len(c['instances'])} agents take turns on it (instances "
                     f"{', '.join(c['instances'])}; {c['turns']} times, last {_since(c['last_seen'], now)}): each "
                     f"closes the other's connection; give every device its own device_id")
    stop = doc.get("stopped")
    if stop is not None:
        lines += ["", f"STOPPED {_since(stop['at'], now)}: round {stop['round_not_opened']} was not opened: "
                      f"{stop['reason']}"]
    s = doc["rounds_summary"]
    lines += ["", f"rounds: {s['rounds']} ({s['closed']} closed, {s['failed']} failed)"]
    if s["rounds"]:
        rejected = ", ".join(f"{k}: {v}" for k, v in s["updates_rejected"].items()) or "none"
        lines += [f"  last: round {s['last_round']} {s['last_state']}, closed {_since(s['last_closed'], now)}",
                  f"  test accuracy: last {_pct(s['last_test_accuracy'])}, best {_pct(s['best_test_accuracy'])}",
                  f"  updates accepted {s['updates_accepted']}, rejected {rejected}",
                  f"  bytes up {s['bytes_up']:,}, down {s['bytes_down']:,}; mean round {s['mean_wall_s']:.1f} s"]
        if s.get("epsilon") is not None:
            lines.append(f"  differential privacy: epsilon {s['epsilon']:.4g} spent at delta {s['delta']:g}")
        rows = [("round", "state", "version", "accepted", "rejected", "test acc", "bytes up", "wall s", "closed")]
        for r in doc["rounds"][-last_rounds:]:
            rows.append((str(r["round"]), r["state"], str(r["model_version"]), f"{r['accepted']}/{r['participants']}",
                         str(sum(r["rejected"].values())), _pct(r["test_accuracy"]), f"{r['bytes_up']:,}",
                         f"{r['wall_s']:.1f}", _since(r["closed"], now)))
        earlier = len(doc["rounds"]) - last_rounds
        lines += [""] + _table(rows) + ([f"({earlier} earlier round(s): see --json)"] if earlier > 0 else [])
    return "\n".join(lines)


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
