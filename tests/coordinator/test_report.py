"""``fedmq report``: the page of a real short federation, rendered by headless Chromium.

A module-scoped fixture runs ``fedmq demo`` (4 device processes, 2 per round so that
over-selection leaves one device out each round, 3 rounds, embedded broker). The report is
made through the real CLI, rendered by Chromium (``--dump-dom`` for the DOM after
rendering, ``--screenshot`` for the pixels) and checked against ``summary.json`` and the
coordinator's database. Chromium missing fails these tests (Debian package ``chromium``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import pytest

from fleet.demo import DemoSettings, run_demo
from coordinator.report import STATUSES, RunData, participation_grid
from coordinator.state import StateDB

ROOT = Path(__file__).resolve().parents[2]
DEVICES, PER_ROUND, ROUNDS = 4, 2, 3
ACCEPTED_RGB = (0x2A, 0x9D, 0x5C)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo-run")
    run_demo(DemoSettings(devices=DEVICES, per_round=PER_ROUND, rounds=ROUNDS, out=out, deadline_s=60.0))
    return out


def _fedmq(*args: str) -> subprocess.CompletedProcess[str]:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "fedmq.cli", *args], env=env, capture_output=True, text=True,
                          timeout=120)


def _tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _chromium(*args: str, profile: Path) -> subprocess.CompletedProcess[bytes]:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.fail("chromium is not installed (Debian package `chromium`); the report test needs it")
    return subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
                           *args], capture_output=True, timeout=120, check=True)


class _Dom(HTMLParser):
    """Elements as (tag, attributes) and the text of each headline card."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str]]] = []
        self.cards: dict[str, list[str]] = {}
        self._card: str | None = None
        self._depth = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        self.elements.append((tag, a))
        if tag == "div":
            if "card" in a.get("class", "").split():
                self._card, self._depth = a["data-key"], 0
                self.cards[self._card] = []
            elif self._card is not None:
                self._depth += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "div" and self._card is not None:
            if self._depth == 0:
                self._card = None
            else:
                self._depth -= 1

    def handle_data(self, data: str) -> None:
        if self._card is not None and data.strip():
            self.cards[self._card].append(data.strip())

    def find(self, tag: str, cls: str | None = None) -> list[dict[str, str]]:
        return [a for t, a in self.elements if t == tag and (cls is None or cls in a.get("class", "").split())]


def _dom(html_file: Path, profile: Path) -> _Dom:
    dom = _Dom()
    dom.feed(_chromium("--dump-dom", html_file.as_uri(), profile=profile).stdout.decode("utf-8"))
    return dom


def _db_rows(state_dir: Path, sql: str) -> list[tuple]:
    conn = sqlite3.connect(f"file:{state_dir / 'coordinator.sqlite'}?immutable=1", uri=True)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_report_of_a_demo_run_renders_every_figure(demo_run: Path, tmp_path: Path) -> None:
    before = _tree(demo_run)
    result = _fedmq("report", str(demo_run))
    assert result.returncode == 0, result.stderr
    page = demo_run / "report.html"
    assert f"wrote {page}" in result.stdout
    # Only the report was added: nothing of the run changed, no -wal / -shm files appeared.
    after = _tree(demo_run)
    assert set(after) - set(before) == {"report.html"}
    assert {k: after[k] for k in before} == before

    summary = json.loads((demo_run / "summary.json").read_text())
    dom = _dom(page, tmp_path / "profile")

    # Headline figures are summary.json's, raw and as shown.
    cards = {a["data-key"]: a for a in dom.find("div", "card")}
    for key in ("final_accuracy", "best_accuracy", "rounds", "devices", "bytes_up_total", "bytes_down_total",
                "updates_rejected"):
        assert float(cards[key]["data-value"]) == pytest.approx(summary[key]), key
    assert float(cards["uplink_ratio"]["data-value"]) == pytest.approx(summary["uplink_ratio"], rel=1e-5)
    assert dom.cards["final_accuracy"][1] == f"{summary['final_accuracy'] * 100:.1f}%"
    assert dom.cards["rounds"][1] == str(ROUNDS) and dom.cards["devices"][1] == str(DEVICES)
    assert dom.cards["uplink_ratio"][1] == f"{summary['uplink_ratio']:.0f}x"
    for reason, n in summary["rejected_by_reason"].items():
        assert f"{reason} {n}" in dom.cards["updates_rejected"][2]

    # Two matplotlib charts with drawn lines; a heat map of one cell per device and round.
    charts = dom.find("svg", "chart")
    assert len(charts) == 2
    assert len(dom.find("path")) > 20
    cells = dom.find("rect", "cell")
    assert len(cells) == DEVICES * ROUNDS
    assert {(c["data-device"], int(c["data-round"])) for c in cells} == {
        (f"device-{i:02d}", r) for i in range(DEVICES) for r in range(1, ROUNDS + 1)}
    assert {c["data-status"] for c in cells} <= set(STATUSES)
    state_dir = demo_run / "coordinator-state"
    accepted = Counter(int(c["data-round"]) for c in cells if c["data-status"] == "accepted")
    for round_, n in _db_rows(state_dir, "SELECT round, accepted FROM rounds"):
        assert accepted[round_] == n, round_
    selected = Counter(int(c["data-round"]) for c in cells if c["data-status"] != "not-selected")
    for round_, n in _db_rows(state_dir, "SELECT round, participants FROM rounds"):
        assert selected[round_] == n, round_
    # 2 of 4 devices take part per round: the others are left out every round.
    participants = sum(n for _, n in _db_rows(state_dir, "SELECT round, participants FROM rounds"))
    assert participants < DEVICES * ROUNDS
    assert sum(c["data-status"] == "not-selected" for c in cells) == DEVICES * ROUNDS - participants
    # Every rejected update is shown once, in a round that selected its device (a late one
    # is filed under the round it arrived in; the map shows it in the round it answered).
    rejected = Counter(c["data-device"] for c in cells if c["data-status"] == "rejected")
    assert rejected == Counter(dict(_db_rows(
        state_dir, "SELECT device, COUNT(*) FROM participations WHERE status = 'rejected' GROUP BY device")))
    assert sum(rejected.values()) == summary["updates_rejected"]

    # Per-device table: bytes per device sum to the uplink total.
    rows = dom.find("tr")
    device_rows = [a for a in rows if "data-device" in a]
    assert len(device_rows) == DEVICES
    per_device = [int(a["data-bytes"]) for a in dom.find("td") if "data-bytes" in a]
    assert sum(per_device) == summary["bytes_up_total"]

    # Self-contained: no script, no stylesheet link, no reference outside the page.
    raw = page.read_text()
    assert "<script" not in raw and "<link" not in raw
    for _, attrs in dom.elements:
        for name in ("src", "href", "xlink:href"):
            assert attrs.get(name, "#").startswith(("#", "data:")), attrs

    # Pixels: the page renders, and the heat map's accepted colour is on screen.
    shot = tmp_path / "report.png"
    _chromium(f"--screenshot={shot}", "--window-size=1280,2400", "--hide-scrollbars", page.as_uri(),
              profile=tmp_path / "profile")
    import matplotlib.image

    img = (matplotlib.image.imread(shot)[..., :3] * 255).round().astype(int)
    assert img.shape[:2] == (2400, 1280)
    green = (abs(img - ACCEPTED_RGB).max(axis=2) <= 2).sum()
    assert green > 200 * summary["updates_accepted"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_report_of_a_bare_state_folder_matches_the_summary(demo_run: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    shutil.copytree(demo_run / "coordinator-state", state)
    out = tmp_path / "state.html"
    result = _fedmq("report", str(state), "--out", str(out))
    assert result.returncode == 0, result.stderr
    # The report wrote nothing into the folder: what is there is the coordinator's own.
    assert set(os.listdir(state)) <= {"coordinator.sqlite", "checkpoint.safetensors", "downlink", "lock",
                                      "seal-key.pem", "seal-key.pub"}
    summary = json.loads((demo_run / "summary.json").read_text())
    dom = _dom(out, tmp_path / "profile")
    cards = {a["data-key"]: a for a in dom.find("div", "card")}
    # Without summary.json the headline comes from the database: the same figures.
    for key in ("final_accuracy", "best_accuracy", "rounds", "devices", "bytes_up_total", "bytes_down_total",
                "updates_rejected"):
        assert float(cards[key]["data-value"]) == pytest.approx(summary[key]), key
    assert len(dom.find("rect", "cell")) == DEVICES * ROUNDS


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_report_reads_a_live_database_without_writing_to_it(demo_run: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    shutil.copytree(demo_run / "coordinator-state", state)
    # A coordinator holding the database open: WAL mode, -wal and -shm present, and a
    # round committed to the log only.
    live = StateDB(state)
    try:
        live.conn.execute("PRAGMA wal_autocheckpoint=0")
        with live.conn:
            live.conn.execute("UPDATE rounds SET test_accuracy = 0.999 WHERE round = ?", (ROUNDS,))
        before = _tree(state)
        assert any(name.endswith("-wal") for name in before)
        result = _fedmq("report", str(state), "--out", str(tmp_path / "live.html"))
        assert result.returncode == 0, result.stderr
        assert set(_tree(state)) == set(before)
    finally:
        live.close()
    dom = _Dom()
    dom.feed((tmp_path / "live.html").read_text())
    assert dom.cards["final_accuracy"][1] == "99.9%"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_report_never_replaces_a_file_it_did_not_write(demo_run: Path, tmp_path: Path) -> None:
    foreign = tmp_path / "notes.html"
    foreign.write_text("<p>my notes</p>")
    result = _fedmq("report", str(demo_run), "--out", str(foreign))
    assert result.returncode == 2
    assert str(foreign) in result.stderr and "--force" in result.stderr and "Traceback" not in result.stderr
    assert foreign.read_text() == "<p>my notes</p>"
    assert _fedmq("report", str(demo_run), "--out", str(foreign), "--force").returncode == 0
    assert "fedmq report" in foreign.read_text()[:512]
    # Its own earlier report is replaced without --force.
    assert _fedmq("report", str(demo_run), "--out", str(foreign)).returncode == 0


def test_report_of_a_folder_that_is_no_run_is_a_one_line_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    result = _fedmq("report", str(empty))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert str(empty) in result.stderr and "summary.json" in result.stderr and "coordinator.sqlite" in result.stderr
    assert os.listdir(empty) == []

    result = _fedmq("report", str(tmp_path / "absent"))
    assert result.returncode == 2 and "not a folder" in result.stderr

    (empty / "summary.json").write_text("{}")
    result = _fedmq("report", str(empty))
    assert result.returncode == 2 and "no coordinator.sqlite" in result.stderr
    assert os.listdir(empty) == ["summary.json"]


def _run(rounds: int, parts: list[tuple[int, str, str, str]]) -> RunData:
    return RunData(source=Path("run"), db_path=Path("run/coordinator.sqlite"), summary=None, config=None,
                   config_path=None, checkpoint_meta={}, rounds=[{"round": r} for r in range(1, rounds + 1)],
                   participations=[{"round": r, "device": d, "transfer_id": "", "status": s, "reason": why,
                                    "samples": 0, "bytes_up": 10} for r, d, s, why in parts])


def test_a_late_update_is_shown_in_the_round_it_answered() -> None:
    # A slow device: selected in rounds 1-3, each update arrives one round late, the last
    # one while round 4 (which did not select it) runs.
    slow = _run(4, [(1, "d", "no_answer", ""), (2, "d", "no_answer", ""), (2, "d", "rejected", "late"),
                    (3, "d", "no_answer", ""), (3, "d", "rejected", "late"), (4, "d", "rejected", "late")])
    grid = participation_grid(slow)
    assert [grid[("d", r)][0] for r in range(1, 5)] == ["rejected", "rejected", "rejected", "not-selected"]
    assert grid[("d", 3)][1] == "late, arrived in round 4"
    # Offline in round 1, late in round 3 for round 2; accepted in round 4.
    gap = _run(4, [(1, "d", "no_answer", ""), (2, "d", "no_answer", ""), (3, "d", "rejected", "late"),
                   (4, "d", "accepted", "")])
    assert [participation_grid(gap)[("d", r)][0] for r in range(1, 5)] == ["silent", "rejected", "not-selected",
                                                                            "accepted"]
    # A rejection that answers its round (a malformed update) stays in it.
    bad = _run(1, [(1, "d", "rejected", "malformed")])
    assert participation_grid(bad)[("d", 1)] == ("rejected", "malformed")
