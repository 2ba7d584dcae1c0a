"""``fedmq report RUN_DIR``: one self-contained HTML page about a federation run.

Input is either a run folder as ``fedmq demo --out DIR`` writes it (``summary.json``,
``coordinator.toml`` and the coordinator's state folder below it) or a bare coordinator
state folder (``coordinator.sqlite`` and ``checkpoint.safetensors``). The run is only read:
the SQLite database is opened read-only, and a database without a write-ahead log is opened
as immutable, because even a read-only connection to a WAL database otherwise leaves
``-wal`` and ``-shm`` files behind.

The page has no external resource (no scripts, fonts or images fetched): CSS is inline,
the accuracy / loss and bytes charts are inline SVG drawn by matplotlib (imported only
here, when a report is written), and the participation heat map is SVG written directly,
one ``rect.cell`` per device and round with ``data-device``, ``data-round`` and
``data-status`` attributes (``accepted``, ``rejected``, ``silent``: selected but sent
nothing in time, ``not-selected``).

Byte counts are MQTT payload bytes as the coordinator counts them (coordinator.state.RoundRecord):
uplink client-update blobs with their manifests, downlink global-model blob bytes times the
devices sent a task, and ``dense_bytes_up`` the float32 size of the same updates uncompressed.
"""

from __future__ import annotations

import html
import io
import json
import math
import sqlite3
import time
import tomllib
import urllib.parse
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import typer

from coordinator.config import PrivacyConfig
from coordinator.state import CHECKPOINT_NAME, DB_NAME
from fedmq import __version__
from fedmq.storage.atomic import atomic_write_text
from fedmq.errors import FedmqError

#: The first line of every report after the doctype; an existing file that lacks it was not
#: written by this command and is only replaced with ``--force``.
GENERATOR = f'<meta name="generator" content="fedmq report {__version__}">'
_GENERATOR_PREFIX = b'<meta name="generator" content="fedmq report'

#: Heat-map cell states, in the order a cell takes the first one that applies.
STATUSES = ("accepted", "rejected", "silent", "not-selected")
_STATUS_COLOR = {"accepted": "#2a9d5c", "silent": "#8a94a6", "not-selected": "#eef1f5"}
# Rejections: "late" (the common, benign case of over-selection) in amber, the rest in reds.
_REASON_COLORS = ("#d64545", "#9b3fb5", "#b5452a", "#e0569b", "#7a2f2f")
_LATE_COLOR = "#f0a030"
_SECRET_KEYS = ("password", "secret", "token", "key")


class ReportError(FedmqError):
    """The run folder cannot be reported on (missing or unreadable files) or the output is refused."""


@dataclass
class RunData:
    """Everything the report shows, read from a run folder.

    Attributes:
        source: the folder given on the command line.
        db_path: the coordinator's ``coordinator.sqlite``.
        summary: ``summary.json`` of a demo run (None for a bare state folder).
        config: the parsed ``coordinator.toml`` next to ``summary.json`` (None if absent).
        config_path: where ``config`` came from.
        checkpoint_meta: metadata of ``checkpoint.safetensors`` (task, optimizer, seed,
            round, version; empty without a checkpoint).
        rounds: one dict per round, oldest first (columns of the ``rounds`` table, with
            ``rejected`` decoded to reason -> count).
        participations: one dict per participation row (round, device, transfer_id,
            status, reason, samples, bytes_up).
        devices: the ``devices`` table (presence), one dict per device.
    """

    source: Path
    db_path: Path
    summary: dict[str, Any] | None
    config: dict[str, Any] | None
    config_path: Path | None
    checkpoint_meta: dict[str, str]
    rounds: list[dict[str, Any]]
    participations: list[dict[str, Any]]
    devices: list[dict[str, Any]] = field(default_factory=list)


# -- reading a run -------------------------------------------------------------------------


def find_state_dir(run_dir: Path) -> tuple[Path, Path | None]:
    """``(state folder, summary.json or None)`` of ``run_dir``.

    The state folder is ``run_dir`` itself when it holds ``coordinator.sqlite``; next to a
    ``summary.json`` it is the ``state_dir`` of ``coordinator.toml``, else the one
    sub-folder holding ``coordinator.sqlite``.

    Raises:
        ReportError: ``run_dir`` is not a folder, holds neither file, or holds a
            ``summary.json`` without a coordinator database (names the paths).
    """
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: not a folder; expected a run folder (with summary.json, as written by "
                          f"`fedmq demo --out`) or a coordinator state folder (with {DB_NAME})")
    if (run_dir / DB_NAME).is_file():
        return run_dir, None
    summary = run_dir / "summary.json"
    if not summary.is_file():
        raise ReportError(f"{run_dir}: neither summary.json (a run folder of `fedmq demo --out`) nor {DB_NAME} "
                          "(a coordinator state folder) is there")
    candidates: list[Path] = []
    config = _read_toml(run_dir / "coordinator.toml")
    if config is not None and isinstance(config.get("state_dir"), str):
        candidates.append(run_dir / config["state_dir"])
    candidates += sorted(p.parent for p in run_dir.glob(f"*/{DB_NAME}"))
    for folder in candidates:
        if (folder / DB_NAME).is_file():
            return folder, summary
    raise ReportError(f"{run_dir}: summary.json is there but no {DB_NAME} (the coordinator's state folder, "
                      "coordinator-state/ in a demo run) in it or in a sub-folder")


def _epsilons(conn: sqlite3.Connection) -> dict[int, float]:
    """Round -> epsilon spent (differential privacy); a database from before privacy has no such table."""
    if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'privacy'").fetchone() is None:
        return {}
    return {int(r[0]): float(r[1]) for r in conn.execute("SELECT round, epsilon FROM privacy")}


def load_run(run_dir: Path) -> RunData:
    """Read a run folder or a coordinator state folder (nothing is written).

    Raises:
        ReportError: files missing, unreadable or not what fedmq writes (names the path).
    """
    state_dir, summary_path = find_state_dir(run_dir)
    summary = None
    config_path = None
    config = None
    if summary_path is not None:
        try:
            summary = json.loads(summary_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ReportError(f"{summary_path}: not a readable JSON summary ({exc})") from None
        if not isinstance(summary, dict):
            raise ReportError(f"{summary_path}: expected a JSON object (the summary of `fedmq demo`)")
        config_path = run_dir / "coordinator.toml"
        config = _read_toml(config_path)
        if config is None:
            config_path = None
    db_path = state_dir / DB_NAME
    rounds, parts, devices = _read_db(db_path)
    return RunData(source=run_dir, db_path=db_path, summary=summary, config=config, config_path=config_path,
                   checkpoint_meta=_checkpoint_meta(state_dir / CHECKPOINT_NAME), rounds=rounds,
                   participations=parts, devices=devices)


def _read_toml(path: Path) -> dict[str, Any] | None:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ReportError(f"{path}: not a readable TOML file ({exc})") from None


def _read_db(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    # A WAL database opened with mode=ro still creates -wal and -shm files. Without a -wal
    # file every transaction is in the main file (the coordinator closed it cleanly), so it
    # can be opened as immutable and nothing is created; with one (a coordinator running, or
    # killed), mode=ro reads the log that is already there.
    wal = path.with_name(path.name + "-wal").exists()
    uri = f"file:{urllib.parse.quote(str(path.resolve()))}?{'mode=ro' if wal else 'immutable=1'}"
    try:
        conn = sqlite3.connect(uri, uri=True)
    except sqlite3.Error as exc:
        raise ReportError(f"{path}: cannot open the coordinator database read-only ({exc})") from None
    try:
        conn.row_factory = sqlite3.Row
        rounds = [dict(r) for r in conn.execute("SELECT * FROM rounds ORDER BY round")]
        parts = [dict(r) for r in conn.execute(
            "SELECT round, device, transfer_id, status, reason, samples, bytes_up FROM participations "
            "ORDER BY round, device, transfer_id")]
        devices = [dict(r) for r in conn.execute("SELECT * FROM devices ORDER BY device")]
        epsilons = _epsilons(conn)
    except sqlite3.Error as exc:
        raise ReportError(f"{path}: not a coordinator database with rounds, participations and devices "
                          f"tables ({exc})") from None
    finally:
        conn.close()
    for r in rounds:
        r["epsilon"] = epsilons.get(r["round"])
        try:
            r["rejected"] = json.loads(r["rejected"] or "{}")
        except ValueError:
            raise ReportError(f"{path}: round {r['round']} has an unreadable rejected column") from None
    return rounds, parts, devices


def _checkpoint_meta(path: Path) -> dict[str, str]:
    """The metadata of a safetensors checkpoint: its JSON header, after an 8-byte length."""
    try:
        with open(path, "rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
            if not 0 < header_len <= 100_000_000:
                raise ValueError(f"header length {header_len}")
            meta = json.loads(fh.read(header_len)).get("__metadata__") or {}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, AttributeError) as exc:
        raise ReportError(f"{path}: not a readable safetensors checkpoint ({exc})") from None
    # The last round's record is in the database already; the rest is the run's identity.
    return {k: str(v) for k, v in sorted(meta.items()) if k != "record"}


# -- figures -------------------------------------------------------------------------------


@dataclass
class Headline:
    """The figures at the top of the page (accuracies are fractions, bytes are payload bytes)."""

    task: str
    rounds: int
    rounds_failed: int
    devices: int
    initial_accuracy: float | None
    final_accuracy: float | None
    best_accuracy: float | None
    updates_accepted: int
    updates_rejected: int
    rejected_by_reason: dict[str, int]
    bytes_up_total: int
    bytes_up_dense_equivalent: int
    bytes_down_total: int
    wall_seconds: float | None

    @property
    def uplink_ratio(self) -> float:
        return self.bytes_up_dense_equivalent / self.bytes_up_total if self.bytes_up_total else math.nan


def headline(run: RunData) -> Headline:
    """The headline figures: from ``summary.json`` where the run has one, else from the database."""
    rounds = run.rounds
    reasons: Counter[str] = Counter()
    for r in rounds:
        reasons.update(r["rejected"])
    accs = [r["test_accuracy"] for r in rounds if r["state"] == "closed" and r["test_accuracy"] is not None]
    from_db = Headline(
        task=run.checkpoint_meta.get("task", "?"), rounds=len(rounds),
        rounds_failed=sum(r["state"] != "closed" for r in rounds), devices=len(device_ids(run)),
        initial_accuracy=None, final_accuracy=accs[-1] if accs else None, best_accuracy=max(accs) if accs else None,
        updates_accepted=sum(r["accepted"] or 0 for r in rounds), updates_rejected=sum(reasons.values()),
        rejected_by_reason=dict(sorted(reasons.items())), bytes_up_total=sum(r["bytes_up"] or 0 for r in rounds),
        bytes_up_dense_equivalent=sum(r["dense_bytes_up"] or 0 for r in rounds),
        bytes_down_total=sum(r["bytes_down"] or 0 for r in rounds),
        wall_seconds=(rounds[-1]["closed"] - rounds[0]["started"]) if rounds else None)
    s = run.summary
    if s is None:
        return from_db
    return Headline(
        task=str(s.get("task", from_db.task)), rounds=int(s.get("rounds", from_db.rounds)),
        rounds_failed=int(s.get("rounds_failed", from_db.rounds_failed)),
        devices=int(s.get("devices", from_db.devices)), initial_accuracy=s.get("initial_accuracy"),
        final_accuracy=s.get("final_accuracy", from_db.final_accuracy),
        best_accuracy=s.get("best_accuracy", from_db.best_accuracy),
        updates_accepted=int(s.get("updates_accepted", from_db.updates_accepted)),
        updates_rejected=int(s.get("updates_rejected", from_db.updates_rejected)),
        rejected_by_reason=dict(sorted(s.get("rejected_by_reason", from_db.rejected_by_reason).items())),
        bytes_up_total=int(s.get("bytes_up_total", from_db.bytes_up_total)),
        bytes_up_dense_equivalent=int(s.get("bytes_up_dense_equivalent", from_db.bytes_up_dense_equivalent)),
        bytes_down_total=int(s.get("bytes_down_total", from_db.bytes_down_total)),
        wall_seconds=s.get("wall_seconds", from_db.wall_seconds))


def device_ids(run: RunData) -> list[str]:
    """Every device the run knows: seen by presence or named in a participation."""
    return sorted({d["device"] for d in run.devices} | {p["device"] for p in run.participations})


#: Rejection reasons of updates that do not answer the round they arrive in (validation.py).
_NOT_AN_ANSWER = ("late", "wrong_round", "device_mismatch")


def participation_grid(run: RunData) -> dict[tuple[str, int], tuple[str, str]]:
    """``(device, round) -> (status, detail)`` for every device and round of the run.

    Status is the first of :data:`STATUSES` that applies: an accepted update, a rejected
    one (detail: its reasons, e.g. ``late``), selected with nothing received (``silent``),
    else ``not-selected``. The database files an update under the round in progress when it
    arrives and does not record which round it answered, so a ``late`` (or ``wrong_round``,
    ``device_mismatch``) update is placed, newest arrival first, in the latest round at or
    before its arrival that selected the device and heard nothing from it (a slow device's
    update for round r arrives in round r or r + 1); the cell's detail names the round it
    arrived in.
    """
    rows: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for p in run.participations:
        rows[(p["device"], p["round"])].append(p)
    grid: dict[tuple[str, int], tuple[str, str]] = {}
    for device in device_ids(run):
        late_for: dict[int, int] = Counter()
        for r in run.rounds:
            got = rows.get((device, r["round"]), [])
            statuses = {p["status"] for p in got}
            answered = [p for p in got if p["status"] == "accepted"
                        or (p["status"] == "rejected" and p["reason"] not in _NOT_AN_ANSWER)]
            selected = bool(answered) or "no_answer" in statuses
            if "accepted" in statuses:
                sent = sum(p["bytes_up"] or 0 for p in got if p["status"] == "accepted")
                grid[(device, r["round"])] = ("accepted", f"{_fmt_bytes(sent)} up")
            elif answered:
                grid[(device, r["round"])] = ("rejected", ", ".join(sorted({p["reason"] or "?" for p in answered})))
            elif selected:
                grid[(device, r["round"])] = ("silent", "selected, nothing received in time")
            else:
                grid[(device, r["round"])] = ("not-selected", "")
            for p in got:
                if p["status"] == "rejected" and p["reason"] in _NOT_AN_ANSWER:
                    late_for[r["round"]] += 1
        for arrived in sorted(late_for, reverse=True):
            for _ in range(late_for[arrived]):
                silent = [r["round"] for r in run.rounds if r["round"] <= arrived
                          and grid[(device, r["round"])][0] == "silent"]
                if not silent and grid[(device, arrived)][0] != "not-selected":
                    continue  # no round left for it; the device table still counts it
                target = silent[-1] if silent else arrived
                reasons = sorted({p["reason"] for p in rows[(device, arrived)]
                                  if p["status"] == "rejected" and p["reason"] in _NOT_AN_ANSWER})
                when = "" if target == arrived else f", arrived in round {arrived}"
                grid[(device, target)] = ("rejected", ", ".join(reasons) + when)
    return grid


def device_table(run: RunData) -> list[dict[str, Any]]:
    """Per device: samples, rounds selected / accepted / silent, rejections by reason, client
    updates received (accepted or not) and their payload bytes."""
    presence = {d["device"]: d for d in run.devices}
    grid = participation_grid(run)
    out = []
    for device in device_ids(run):
        mine = [p for p in run.participations if p["device"] == device]
        states = Counter(grid[(device, r["round"])][0] for r in run.rounds)
        info = presence.get(device, {})
        samples = info.get("samples") or max((p["samples"] or 0 for p in mine), default=0)
        out.append({
            "device": device, "samples": samples, "online": info.get("online"), "last_seen": info.get("last_seen"),
            "selected": len(run.rounds) - states["not-selected"], "accepted": states["accepted"],
            "silent": states["silent"],
            "rejected": dict(sorted(Counter(p["reason"] or "?" for p in mine if p["status"] == "rejected").items())),
            "bytes_up": sum(p["bytes_up"] or 0 for p in mine),
            "updates_sent": sum(p["status"] != "no_answer" for p in mine),
        })
    return out


# -- rendering -----------------------------------------------------------------------------


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _fmt_pct(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x * 100:.1f}%"


def _fmt_ratio(x: float | None) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:.0f}x" if x >= 10 else f"{x:.1f}x"


def _fmt_loss(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _fmt_time(t: float | None) -> str:
    return "n/a" if t is None else time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _reason_colors(reasons: list[str]) -> dict[str, str]:
    others = iter(_REASON_COLORS * (1 + len(reasons) // len(_REASON_COLORS)))
    return {r: _LATE_COLOR if r == "late" else next(others) for r in reasons}


def _charts(run: RunData, head: Headline) -> tuple[str, str]:
    """Inline SVG of (accuracy and loss over rounds, bytes per round by direction)."""
    try:
        import matplotlib
    except ImportError:
        raise ReportError("fedmq report draws its charts with matplotlib, which is not installed "
                          "(pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    rounds = [r["round"] for r in run.rounds]
    style = {"svg.fonttype": "none", "font.family": "sans-serif", "font.size": 10, "axes.spines.top": False,
             "axes.spines.right": False, "axes.titlesize": 11, "axes.titleweight": "bold", "axes.titlelocation": "left"}
    with plt.rc_context(style):
        # Deterministic ids inside each SVG, distinct between the two (they share one page).
        plt.rcParams["svg.hashsalt"] = "fedmq-report-quality"
        fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10.4, 3.4))
        acc_x = ([0] if head.initial_accuracy is not None else []) + rounds
        acc_y = ([head.initial_accuracy] if head.initial_accuracy is not None else []) + [
            math.nan if r["test_accuracy"] is None else r["test_accuracy"] * 100 for r in run.rounds]
        if head.initial_accuracy is not None:
            acc_y[0] *= 100
        ax_acc.plot(acc_x, acc_y, marker="o", ms=4, color="#2563eb", lw=2)
        ax_acc.set(title="test accuracy of the global model", xlabel="round", ylabel="%", ylim=(0, 100))
        loss = [math.nan if r["test_loss"] is None else r["test_loss"] for r in run.rounds]
        ax_loss.plot(rounds, loss, marker="o", ms=4, color="#c2410c", lw=2)
        ax_loss.set(title="test loss", xlabel="round", ylabel="cross-entropy")
        for ax in (ax_acc, ax_loss):
            ax.grid(alpha=0.3)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        failed = [r["round"] for r in run.rounds if r["state"] != "closed"]
        for x in failed:
            ax_acc.axvline(x, color="#d64545", alpha=0.3, lw=6)
        fig.tight_layout()
        quality = _svg(fig)
        plt.close(fig)

        plt.rcParams["svg.hashsalt"] = "fedmq-report-bytes"
        fig, ax = plt.subplots(figsize=(10.4, 3.6))
        up = [r["bytes_up"] or 0 for r in run.rounds]
        dense = [r["dense_bytes_up"] or 0 for r in run.rounds]
        down = [r["bytes_down"] or 0 for r in run.rounds]
        ax.plot(rounds, down, marker="s", ms=4, color="#7c3aed", lw=2, label="down: global model")
        ax.plot(rounds, dense, ls="--", color="#64748b", lw=1.5, label="up if dense float32")
        ax.plot(rounds, up, marker="o", ms=4, color="#2a9d5c", lw=2, label="up: client updates")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: _fmt_bytes(v)))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set(xlabel="round", ylabel="payload bytes per round")
        ax.grid(alpha=0.3)
        ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
        fig.tight_layout()
        traffic = _svg(fig)
        plt.close(fig)
    return quality, traffic


def _svg(fig: Any) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None})
    text = buf.getvalue()
    # Inline SVG in HTML: drop the XML declaration and doctype; let CSS size it.
    text = text[text.index("<svg"):]
    return text.replace("<svg ", '<svg class="chart" ', 1)


def _heatmap(run: RunData, colors: dict[str, str]) -> str:
    devices = device_ids(run)
    rounds = [r["round"] for r in run.rounds]
    grid = participation_grid(run)
    label_w, top, width = 120, 26, 1040
    cell_w = max(4.0, min(44.0, (width - label_w) / max(1, len(rounds))))
    cell_h = max(3.0, min(26.0, 1200 / max(1, len(devices))))
    gap = 2.0 if cell_w >= 10 and cell_h >= 10 else 0.0
    w = label_w + cell_w * len(rounds)
    h = top + cell_h * len(devices) + 4
    parts = [f'<svg class="heatmap" xmlns="http://www.w3.org/2000/svg" width="{w:.0f}" height="{h:.0f}" '
             f'viewBox="0 0 {w:.0f} {h:.0f}" role="img" aria-label="participation per device and round">']
    step = max(1, math.ceil(len(rounds) * 30 / (w - label_w)))
    for j, rnd in enumerate(rounds):
        if j % step == 0 or j == len(rounds) - 1:
            parts.append(f'<text class="tick" x="{label_w + (j + 0.5) * cell_w:.1f}" y="{top - 8}" '
                         f'text-anchor="middle">{rnd}</text>')
    parts.append(f'<text class="tick" x="{label_w - 8}" y="{top - 8}" text-anchor="end">round</text>')
    for i, device in enumerate(devices):
        y = top + i * cell_h
        if cell_h >= 10:
            parts.append(f'<text class="label" x="{label_w - 8}" y="{y + cell_h / 2 + 4:.1f}" '
                         f'text-anchor="end">{_e(device)}</text>')
        for j, rnd in enumerate(rounds):
            status, detail = grid[(device, rnd)]
            fill = colors[detail.split(", ")[0]] if status == "rejected" else _STATUS_COLOR[status]
            title = f"{device}, round {rnd}: {status.replace('-', ' ')}" + (f" ({detail})" if detail else "")
            parts.append(f'<rect class="cell" data-device="{_e(device)}" data-round="{rnd}" data-status="{status}" '
                         f'data-detail="{_e(detail)}" x="{label_w + j * cell_w + gap / 2:.1f}" '
                         f'y="{y + gap / 2:.1f}" width="{cell_w - gap:.1f}" height="{cell_h - gap:.1f}" rx="2" '
                         f'fill="{fill}"><title>{_e(title)}</title></rect>')
    parts.append("</svg>")
    return "".join(parts)


def _legend(colors: dict[str, str]) -> str:
    items = [("accepted", _STATUS_COLOR["accepted"])]
    items += [(f"rejected: {reason}", c) for reason, c in colors.items()]
    items += [("selected, silent", _STATUS_COLOR["silent"]), ("not selected", _STATUS_COLOR["not-selected"])]
    return '<ul class="legend">' + "".join(
        f'<li><span class="swatch" style="background:{c}"></span>{_e(t)}</li>' for t, c in items) + "</ul>"


def _flatten(prefix: str, node: Any) -> list[tuple[str, Any]]:
    if isinstance(node, dict):
        out = []
        for k, v in node.items():
            out += _flatten(f"{prefix}.{k}" if prefix else str(k), v)
        return out
    return [(prefix, node)]


def _config_rows(run: RunData) -> list[tuple[str, str, str]]:
    """``(source, option, value)`` rows; inline secrets are masked, ``*_file`` paths shown."""
    rows = []
    if run.config is not None:
        for key, value in _flatten("", run.config):
            leaf = key.rsplit(".", 1)[-1]
            secret = any(s in leaf for s in _SECRET_KEYS) and not leaf.endswith("_file")
            rows.append((run.config_path.name if run.config_path else "", key,
                         "(set, not shown)" if secret else json.dumps(value) if not isinstance(value, str) else value))
    if run.summary is not None:
        for key in ("codec", "density", "devices", "devices_per_round", "broker"):
            if key in run.summary:
                rows.append(("summary.json", key, str(run.summary[key])))
    for key, value in run.checkpoint_meta.items():
        rows.append((CHECKPOINT_NAME, key, value))
    return rows


_CSS = """
:root { --ink:#1f2937; --muted:#6b7280; --line:#e5e7eb; --bg:#f6f7f9; --card:#fff; --accent:#2563eb; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--ink);
       font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; }
main { max-width: 1120px; margin: 0 auto; padding: 28px 24px 48px; }
header h1 { font-size: 24px; margin: 0 0 4px; }
header p { margin: 0; color: var(--muted); }
section { background: var(--card); border: 1px solid var(--line); border-radius: 10px; padding: 18px 20px;
          margin-top: 18px; }
section h2 { font-size: 16px; margin: 0 0 12px; }
.cards { display: grid; grid-template-columns: repeat(4, 1fr); gap: 12px; margin-top: 18px; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 10px; padding: 12px 14px; }
.card .k { color: var(--muted); font-size: 12px; text-transform: uppercase; letter-spacing: .04em; }
.card .v { font-size: 26px; font-weight: 650; margin-top: 2px; font-variant-numeric: tabular-nums; }
.card .s { color: var(--muted); font-size: 12px; margin-top: 2px; }
.card.good .v { color: #17804a; } .card.warn .v { color: #b45309; }
svg.chart { width: 100%; height: auto; display: block; }
.scroll { overflow-x: auto; }
svg.heatmap text { font: 12px system-ui, "DejaVu Sans", sans-serif; fill: var(--muted); }
svg.heatmap text.label { fill: var(--ink); }
.legend { list-style: none; padding: 0; margin: 10px 0 0; display: flex; flex-wrap: wrap; gap: 6px 18px;
          color: var(--muted); font-size: 12px; }
.swatch { display: inline-block; width: 12px; height: 12px; border-radius: 3px; margin-right: 6px;
          vertical-align: -2px; border: 1px solid rgba(0,0,0,.08); }
table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
th, td { padding: 5px 10px; border-bottom: 1px solid var(--line); text-align: left; }
th { color: var(--muted); font-weight: 600; font-size: 12px; text-transform: uppercase; letter-spacing: .03em; }
td.n, th.n { text-align: right; }
tr:last-child td { border-bottom: none; }
.pill { display: inline-block; padding: 0 7px; border-radius: 9px; font-size: 12px; color: #fff; margin-right: 4px; }
code { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 12.5px; }
details summary { cursor: pointer; font-weight: 600; }
footer { color: var(--muted); font-size: 12px; margin-top: 18px; }
@media (max-width: 800px) { .cards { grid-template-columns: repeat(2, 1fr); } }
"""


def _card(key: str, label: str, value: str, sub: str = "", raw: Any = None, tone: str = "") -> str:
    raw_attr = "" if raw is None else f' data-value="{_e(raw)}"'
    return (f'<div class="card {tone}" data-key="{key}"{raw_attr}><div class="k">{_e(label)}</div>'
            f'<div class="v">{_e(value)}</div><div class="s">{_e(sub)}</div></div>')


def render_html(run: RunData) -> str:
    """The whole report page (UTF-8 HTML, no external resources).

    Raises:
        ReportError: matplotlib is missing.
    """
    head = headline(run)
    reasons = sorted({p["reason"] or "?" for p in run.participations if p["status"] == "rejected"}
                     | set(head.rejected_by_reason))
    colors = _reason_colors(reasons)
    quality, traffic = _charts(run, head)
    federation = (run.config or {}).get("federation", "")
    title = f"fedmq run report: {head.task}" + (f", federation {federation}" if federation else "")
    first = run.rounds[0]["started"] if run.rounds else None
    last = run.rounds[-1]["closed"] if run.rounds else None

    rejected_sub = ", ".join(f"{k} {v}" for k, v in head.rejected_by_reason.items()) or "none"
    cards = [
        _card("final_accuracy", "final accuracy", _fmt_pct(head.final_accuracy),
              f"initial {_fmt_pct(head.initial_accuracy)}" if head.initial_accuracy is not None else "last closed round",
              head.final_accuracy, "good"),
        _card("best_accuracy", "best accuracy", _fmt_pct(head.best_accuracy), "over all rounds", head.best_accuracy),
        _card("rounds", "rounds", str(head.rounds), f"{head.rounds_failed} failed", head.rounds,
              "warn" if head.rounds_failed else ""),
        _card("devices", "devices", str(head.devices),
              f"{head.updates_accepted} updates accepted", head.devices),
        _card("bytes_up_total", "bytes up", _fmt_bytes(head.bytes_up_total),
              f"dense float32: {_fmt_bytes(head.bytes_up_dense_equivalent)}", head.bytes_up_total),
        _card("uplink_ratio", "uplink vs dense", _fmt_ratio(head.uplink_ratio), "smaller than float32 updates",
              f"{head.uplink_ratio:.6g}", "good"),
        _card("bytes_down_total", "bytes down", _fmt_bytes(head.bytes_down_total), "global model to devices",
              head.bytes_down_total),
        _card("updates_rejected", "rejected updates", str(head.updates_rejected), rejected_sub, head.updates_rejected,
              "warn" if head.updates_rejected else ""),
    ]
    epsilon = next((r["epsilon"] for r in reversed(run.rounds) if r.get("epsilon") is not None), None)
    if epsilon is not None:
        delta = ((run.config or {}).get("privacy") or {}).get("delta", PrivacyConfig().delta)
        cards.insert(2, _card("epsilon", "differential privacy", f"epsilon {epsilon:.3g}", f"at delta {delta:g}",
                              epsilon, "warn" if epsilon > 10 else "good"))
    eps_cell = (lambda r: f'<td class="n">{"-" if r.get("epsilon") is None else format(r["epsilon"], ".3g")}</td>'
                ) if epsilon is not None else (lambda r: "")

    dev_rows = []
    for d in device_table(run):
        pills = "".join(f'<span class="pill" style="background:{colors.get(k, _REASON_COLORS[0])}">{_e(k)} {v}</span>'
                        for k, v in d["rejected"].items()) or '<span class="muted">none</span>'
        online = "n/a" if d["online"] is None else "yes" if d["online"] else "no"
        dev_rows.append(
            f'<tr data-device="{_e(d["device"])}"><td><code>{_e(d["device"])}</code></td>'
            f'<td class="n">{d["samples"]:,}</td><td class="n">{d["selected"]}</td><td class="n">{d["accepted"]}</td>'
            f'<td class="n">{d["silent"]}</td><td>{pills}</td>'
            f'<td class="n" data-bytes="{d["bytes_up"]}">{_fmt_bytes(d["bytes_up"])}</td>'
            f'<td class="n">{_fmt_bytes(d["bytes_up"] / d["updates_sent"]) if d["updates_sent"] else "n/a"}</td>'
            f'<td>{online}</td><td>{_e(_fmt_time(d["last_seen"]))}</td></tr>')

    round_rows = "".join(
        f'<tr><td class="n">{r["round"]}</td><td>{_e(r["state"])}</td><td class="n">{r["model_version"]}</td>'
        f'<td class="n">{r["accepted"]}/{r["participants"]}</td>'
        f'<td>{_e(", ".join(f"{k} {v}" for k, v in sorted(r["rejected"].items())) or "-")}</td>'
        f'<td class="n">{_fmt_pct(r["test_accuracy"])}</td>'
        f'<td class="n">{_fmt_loss(r["test_loss"])}</td>{eps_cell(r)}'
        f'<td class="n">{_fmt_bytes(r["bytes_up"])}</td><td class="n">{_fmt_bytes(r["bytes_down"])}</td>'
        f'<td class="n">{_fmt_ratio(r["dense_bytes_up"] / r["bytes_up"] if r["bytes_up"] else math.nan)}</td>'
        f'<td class="n">{r["wall_s"]:.1f} s</td></tr>' for r in run.rounds)

    config_rows = "".join(f'<tr><td><code>{_e(k)}</code></td><td><code>{_e(v)}</code></td>'
                          f'<td class="src">{_e(src)}</td></tr>' for src, k, v in _config_rows(run))

    wall = "" if head.wall_seconds is None else f", {head.wall_seconds:.0f} s"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
{GENERATOR}
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)}</title>
<style>{_CSS}</style></head>
<body><main>
<header><h1>{_e(title)}</h1>
<p>{_e(str(run.source))} &middot; {_e(_fmt_time(first))} to {_e(_fmt_time(last))}{_e(wall)}</p></header>
<div class="cards" id="headline">{"".join(cards)}</div>
<section id="quality"><h2>Accuracy and loss over rounds</h2>{quality}</section>
<section id="traffic"><h2>Bytes per round, up and down, against dense float32</h2>{traffic}</section>
<section id="participation"><h2>Participation per device and round</h2>
<div class="scroll">{_heatmap(run, colors)}</div>{_legend(colors)}</section>
<section id="devices"><h2>Devices</h2><div class="scroll"><table>
<thead><tr><th>device</th><th class="n">samples</th><th class="n">selected</th><th class="n">accepted</th>
<th class="n">silent</th><th>rejected</th><th class="n">bytes up</th><th class="n">per update sent</th><th>online</th>
<th>last seen</th></tr></thead>
<tbody>{"".join(dev_rows)}</tbody></table></div></section>
<section id="rounds"><details><summary>Rounds ({len(run.rounds)})</summary><div class="scroll"><table>
<thead><tr><th class="n">round</th><th>state</th><th class="n">version</th><th class="n">accepted</th>
<th>rejected</th><th class="n">accuracy</th><th class="n">loss</th>{'<th class="n">epsilon</th>' if epsilon is not None else ""}<th class="n">up</th><th class="n">down</th>
<th class="n">ratio</th><th class="n">wall</th></tr></thead>
<tbody>{round_rows}</tbody></table></div></details></section>
<section id="configuration"><h2>Configuration</h2><table>
<thead><tr><th>option</th><th>value</th><th>from</th></tr></thead>
<tbody>{config_rows}</tbody></table></section>
<footer>fedmq {__version__} &middot; read from <code>{_e(str(run.db_path))}</code> &middot;
byte counts are MQTT payload bytes</footer>
</main></body></html>
"""


# -- writing -------------------------------------------------------------------------------


def write_report(run_dir: Path, out: Path | None = None, force: bool = False) -> Path:
    """Write the report of ``run_dir`` to ``out`` (default ``run_dir/report.html``), atomically.

    An existing ``out`` is replaced only if an earlier report wrote it, or with ``force``.

    Raises:
        ReportError: the run cannot be read, ``out`` is a folder, or ``out`` exists and was
            not written by this command (without ``force``).
    """
    dest = out if out is not None else run_dir / "report.html"
    if dest.is_dir():
        raise ReportError(f"--out {dest}: is a folder; expected an HTML file path")
    if dest.exists() and not force and not _written_by_report(dest):
        raise ReportError(f"{dest}: exists and was not written by fedmq report; pass --force to replace it "
                          "or --out another file")
    page = render_html(load_run(run_dir))
    try:
        atomic_write_text(dest, page)
    except OSError as exc:
        raise ReportError(f"{dest}: cannot write the report ({exc.strerror or exc})") from None
    return dest


def _written_by_report(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return _GENERATOR_PREFIX in fh.read(512)
    except OSError:
        return False


def report_command(
    run_dir: Path = typer.Argument(..., help="A run folder (`fedmq demo --out DIR`) or a coordinator state folder."),
    out: Path = typer.Option(None, "--out", help="HTML file to write (default: RUN_DIR/report.html)."),
    force: bool = typer.Option(False, "--force", help="Replace --out even if fedmq report did not write it."),
) -> None:
    """Write a self-contained HTML report of a run: accuracy, bytes, participation, devices, configuration."""
    try:
        dest = write_report(run_dir, out, force)
    except FedmqError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"wrote {dest}")
