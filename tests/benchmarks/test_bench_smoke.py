"""The benchmark harness cannot rot: its smallest case runs end to end, writes bench.json and
regenerates BENCHMARKS.md (a temporary copy), and a missing or failing suite is recorded
without stopping the others. No timing is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _bench(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "benchmarks", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_smoke_suite_writes_bench_json_and_regenerates_markdown(tmp_path: Path) -> None:
    md = tmp_path / "BENCHMARKS.md"
    original = (ROOT / "BENCHMARKS.md").read_text(encoding="utf-8")
    md.write_text("HAND-WRITTEN HEAD\n\n" + original + "\n<!-- bench:smoke:begin -->\nSTALE FIGURES\n"
                  "<!-- bench:smoke:end -->\n\nHAND-WRITTEN TAIL\n", encoding="utf-8")
    out = tmp_path / "out"

    proc = _bench(["run", "--suite", "smoke", "--only", "learning,tutorial", "--out", str(out),
                   "--markdown", str(md)])
    assert proc.returncode == 0, proc.stderr

    doc = json.loads((out / "bench.json").read_text())
    assert doc["schema"] == 1 and doc["suite"] == "smoke"
    assert doc["machine"]["cpu_model"] and doc["machine"]["cores"] >= 1
    for key in ("python", "torch", "numpy", "fedmq", "mosquitto"):
        assert doc["versions"][key], key
    assert doc["date"] and doc["torch_threads"] == 1
    assert list(doc["suites"]) == ["learning", "tutorial"]

    learning = doc["suites"]["learning"]
    assert learning["status"] == "ok", learning.get("traceback")
    result = learning["result"]
    assert result["execution"] == "in-process" and result["reduced"] is True
    assert "real coordinator" in result["execution_note"]
    dense, ef = result["runs"]["iid/dense"], result["runs"]["iid/topk1-ef"]
    for r in (dense, ef):
        assert 0.0 <= r["final_accuracy"] <= 1.0 and len(r["history"]) == 2
        assert r["bytes_down"] > 0
    # The same seeded devices take part in both runs; only the codec differs.
    assert [h["selected"] for h in dense["history"]] == [h["selected"] for h in ef["history"]]
    assert all(len(h["selected"].split(",")) == 2 for h in dense["history"])
    # Dense float32 of the 1,663,370-parameter CNN is 4 bytes a parameter (2 updates in each of
    # 2 rounds), and the blobs the coordinator received carry that plus envelope and manifest;
    # Top-K 1% far less.
    assert dense["dense_bytes_up"] == 4 * 1_663_370 * 2 * 2
    assert dense["dense_bytes_up"] < dense["bytes_up"] < 1.01 * dense["dense_bytes_up"]
    assert ef["bytes_up"] * 50 < dense["bytes_up"]
    assert result["parity"][0]["partition"] == "iid"

    tutorial = doc["suites"]["tutorial"]
    assert tutorial["status"] == "ok", tutorial.get("traceback")
    assert set(tutorial["result"]["runs"]) == {"dense", "topk1-ef", "topk10-ef"}

    text = md.read_text(encoding="utf-8")
    assert text.startswith("HAND-WRITTEN HEAD\n") and text.rstrip().endswith("HAND-WRITTEN TAIL")
    assert original.strip() in text and "STALE FIGURES" not in text
    assert text.count("<!-- bench:smoke:begin -->") == 1 and text.count("<!-- bench:smoke:end -->") == 1
    block = text.split("<!-- bench:smoke:begin -->")[1].split("<!-- bench:smoke:end -->")[0]
    assert doc["machine"]["cpu_model"] in block and doc["versions"]["mosquitto"] in block
    assert "McMahan CNN, 3 devices, 2 per round, 2 rounds" in block
    assert "| iid | dense float32 FedAvg |" in block
    assert "in-process" in block

    # Re-rendering from the saved bench.json replaces the block instead of adding one.
    proc = _bench(["render", str(out / "bench.json"), "--markdown", str(md)], timeout=60)
    assert proc.returncode == 0, proc.stderr
    again = md.read_text(encoding="utf-8")
    assert again.count("<!-- bench:smoke:begin -->") == 1
    assert again == text


def test_missing_and_failing_suites_are_recorded_and_the_rest_runs(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "bench_boom.py").write_text("def run(quick):\n    raise RuntimeError('boom at ' + str(quick))\n")
    (tmp_path / "bench_fine.py").write_text(
        "def run(quick):\n    return {'answer': 42, 'rows': [{'size': 1, 'bytes': 10}, {'size': 2, 'bytes': 20}]}\n")
    (tmp_path / "bench_odd.py").write_text("def run(quick):\n    return [1, 2]\n")
    from benchmarks.harness import Suite, run_suites

    suites = (Suite("ghost", "bench_no_such_module", "Ghost"), Suite("boom", "bench_boom", "Boom"),
              Suite("odd", "bench_odd", "Odd"), Suite("fine", "bench_fine", "Fine"))
    md = tmp_path / "B.md"
    doc = run_suites("quick", tmp_path / "out", markdown=md, suites=suites, threads=None)

    saved = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert saved["suites"] == doc["suites"]
    s = saved["suites"]
    assert s["ghost"]["status"] == "missing" and "bench_no_such_module" in s["ghost"]["error"]
    assert s["boom"]["status"] == "error" and "RuntimeError: boom at True" in s["boom"]["error"]
    assert "Traceback" in s["boom"]["traceback"]
    assert s["odd"]["status"] == "error" and "expected a dict" in s["odd"]["error"]
    assert s["fine"]["status"] == "ok" and s["fine"]["result"]["answer"] == 42

    text = md.read_text(encoding="utf-8")
    assert "**missing**" in text and "boom at True" in text
    assert "| answer | 42 |" in text and "| 2 | 20 |" in text


def test_ingest_smoke_drives_the_coordinators_message_loop(tmp_path: Path) -> None:
    # benchmarks/ingest.py pumps the coordinator's inbox outside Coordinator.run; a change to
    # that loop (the background evaluation's reporting) once broke it with an AssertionError.
    proc = _bench(["run", "--suite", "smoke", "--only", "ingest", "--out", str(tmp_path), "--no-markdown"],
                  timeout=240)
    assert proc.returncode == 0, proc.stderr
    suite = json.loads((tmp_path / "bench.json").read_text())["suites"]["ingest"]
    assert suite["status"] == "ok", suite.get("traceback")
    assert suite["result"]["memory_path"]["updates"] == 20
    wire = suite["result"]["mosquitto_path"]
    assert wire["accepted"] == wire["updates_sent"] == 20 and wire["rejected"] == {}
    # The publisher process (a subprocess speaking text lines, nothing pickled) reports its CPU
    # time; the broker's comes from /proc; together with the coordinator's they bound the rate.
    assert wire["publishers_cpu_seconds"] > 0 and wire["broker_cpu_seconds"] >= 0
    # The publishers (simulated devices) yield the cores to the coordinator: lowest priority.
    assert wire["publishers_niceness"] == [19]
    per = wire["cpu_ms_per_update"]
    assert per["all"] == pytest.approx(per["coordinator"] + per["publishers"] + per["broker"], abs=2e-3)
    assert wire["cpu_bound_updates_per_s"] == pytest.approx(os.cpu_count() * 1e3 / per["all"], rel=1e-2)


def test_the_ingest_figures_are_the_median_runs() -> None:
    from benchmarks.ingest import _median_run

    runs = [{"rate": 3.0, "n": 1}, {"rate": 1.0, "n": 2}, {"rate": 2.0, "n": 3}]
    assert _median_run(runs, "rate") == {"rate": 2.0, "n": 3, "runs_rate": [3.0, 1.0, 2.0]}
