"""The benchmark harness: run suites, write ``bench.json``, regenerate BENCHMARKS.md.

A suite is a module of :mod:`benchmarks` with ``run(quick: bool) -> dict``. The harness
survives a suite that is missing (not written yet, or an import error) or raises: the
error and its traceback go into ``bench.json`` and BENCHMARKS.md, and the next suite
runs. ``bench.json`` is rewritten (atomically) after every suite, so a run cut short
keeps what it measured.

Three modes:

- ``quick``: every suite with ``quick=True``; about 10 minutes on 2 cores;
- ``full``: every suite with ``quick=False``; longer (the whole learning matrix);
- ``smoke``: the smallest case of the suites that define ``smoke() -> dict`` (seconds);
  the others are recorded as skipped. Used by the test suite so the harness cannot rot;
- ``faults``: the fault-injection campaign (:mod:`benchmarks.faults`, ``quick=False``),
  a suite of its own mode only: about an hour on 2 cores.

BENCHMARKS.md keeps one generated block per mode between the markers
``<!-- bench:MODE:begin -->`` and ``<!-- bench:MODE:end -->``; text outside the
markers is left alone, and a missing block is appended at the end of the file.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from fedmq.storage.atomic import atomic_write_text
from fedmq.errors import ConfigError

#: Version of the ``bench.json`` layout.
BENCH_SCHEMA = 1

MODES = ("quick", "full", "smoke", "faults")

#: Project root: BENCHMARKS.md lives here.
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MARKDOWN = ROOT / "BENCHMARKS.md"


@dataclass(frozen=True)
class Suite:
    """One benchmark suite.

    Attributes:
        name: key in bench.json and for ``--only``.
        module: dotted module path.
        title: heading in BENCHMARKS.md.
        entry: the module's ``(quick: bool) -> dict`` function, default ``run``.
        smoke: the module's ``() -> dict`` smallest case for the smoke mode, default
            ``smoke`` (a module without it is recorded as skipped); None: none.
        modes: the modes that run it.
    """

    name: str
    module: str
    title: str
    entry: str = "run"
    smoke: str | None = "smoke"
    modes: tuple[str, ...] = ("quick", "full", "smoke")


SUITES: tuple[Suite, ...] = (
    Suite("codec", "benchmarks.codec", "Codec: Top-K + int8 on a real McMahan CNN update"),
    Suite("transport", "benchmarks.transport", "Transport: chunked blobs through a real broker"),
    Suite("learning", "benchmarks.learning", "Learning parity: McMahan CNN on the MNIST-10k split"),
    Suite("tutorial", "benchmarks.tutorial", "Tutorial set-up: federated logistic regression"),
    Suite("ingest", "benchmarks.ingest", "Coordinator ingest"),
    Suite("device", "benchmarks.device", "Device cost"),
    Suite("broker", "benchmarks.learning", "Through the real broker: `fedmq demo` against the in-process simulation",
          entry="broker_run", smoke=None),
    Suite("faults", "benchmarks.faults", "Fault injection: kill -9 and restarts at every step of a round",
          smoke=None, modes=("faults",)),
    Suite("scale", "benchmarks.scale", "Scale: virtual fleets against one mosquitto; sync vs buffered async"),
    Suite("privacy", "benchmarks.privacy", "Privacy: accuracy against epsilon through mosquitto (`fedmq fleet`)",
          smoke=None),
    Suite("robust", "benchmarks.robust", "Robust aggregation against Byzantine devices through mosquitto",
          smoke=None, modes=("full",)),
)


def suite_names() -> tuple[str, ...]:
    return tuple(s.name for s in SUITES)


# --------------------------------------------------------------------------- environment

def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mosquitto_version() -> str | None:
    exe = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if exe is None:
        return None
    try:
        # `mosquitto -h` prints its version on the first line and exits with status 3.
        out = subprocess.run([exe, "-h"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"mosquitto version (\S+)", out.stdout + out.stderr)
    return m.group(1) if m else None


def _module_version(name: str) -> str | None:
    try:
        return str(importlib.import_module(name).__version__)
    except Exception:  # a missing or broken package is reported as None, not fatal
        return None


def _git_commit() -> str | None:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def environment() -> dict[str, Any]:
    """The machine and software a run measured: CPU model, logical cores (and those this
    process may use), memory (bytes), OS; versions of python, torch, numpy, fedmq,
    paho-mqtt and mosquitto; torch intra-op threads; git commit."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        mem = None
    torch_threads = None
    try:
        import torch

        torch_threads = torch.get_num_threads()
    except Exception:
        pass
    return {
        "machine": {
            "cpu_model": _cpu_model(),
            "cores": os.cpu_count(),
            "cores_usable": usable,
            "memory_bytes": mem,
            "os": f"{platform.system()} {platform.release()}",
            "arch": platform.machine(),
        },
        "versions": {
            "python": platform.python_version(),
            "torch": _module_version("torch"),
            "numpy": _module_version("numpy"),
            "fedmq": _module_version("fedmq"),
            "paho_mqtt": _module_version("paho.mqtt"),
            "mosquitto": _mosquitto_version(),
        },
        "torch_threads": torch_threads,
        "git_commit": _git_commit(),
    }


# --------------------------------------------------------------------------- running

def _jsonable(obj: Any) -> Any:
    """NumPy scalars/arrays and tuples to plain JSON; non-finite floats to None (JSON has no NaN)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if hasattr(obj, "tolist"):  # numpy scalar or array
        return _jsonable(obj.tolist())
    return str(obj)


def _resolve(suite: Suite, mode: str) -> Callable[[], Any] | None:
    """The callable to run for ``mode``, or None when the suite has no smoke case."""
    if mode == "smoke" and suite.smoke is None:
        return None
    module = importlib.import_module(suite.module)
    if mode == "smoke":
        fn = getattr(module, suite.smoke, None)
        return fn if callable(fn) else None
    run = getattr(module, suite.entry, None)
    if not callable(run):
        raise ConfigError(f"{suite.module} defines no {suite.entry}(quick: bool) -> dict")
    quick = mode == "quick"
    return lambda: run(quick)


def run_suite(suite: Suite, mode: str) -> dict[str, Any]:
    """Run one suite; never raises (except KeyboardInterrupt).

    Returns ``{"status": "ok" | "error" | "missing" | "skipped", "seconds": float,
    "result": dict}`` on success, or with ``"error"`` (one line) and ``"traceback"``
    instead of ``"result"``.
    """
    started = time.perf_counter()
    entry: dict[str, Any] = {"title": suite.title, "module": suite.module}
    try:
        fn = _resolve(suite, mode)
        if fn is None:
            entry.update(status="skipped", error=f"{suite.module} has no smoke case")
            return entry
        result = fn()
        if not isinstance(result, dict):
            raise TypeError(f"{suite.module} returned {type(result).__name__}, expected a dict")
        entry.update(status="ok", result=_jsonable(result))
    except ModuleNotFoundError as exc:
        # The suite itself or a module it needs is not written yet (the message names which).
        entry.update(status="missing", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
    except Exception as exc:  # a broken suite must not stop the others
        entry.update(status="error", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
    finally:
        entry["seconds"] = round(time.perf_counter() - started, 3)
    return entry


def run_suites(mode: str, out_dir: str | os.PathLike[str], *, only: list[str] | None = None,
               markdown: str | os.PathLike[str] | None = DEFAULT_MARKDOWN,
               suites: tuple[Suite, ...] = SUITES, threads: int | None = 1,
               log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the suites of ``mode`` and write ``out_dir/bench.json`` (and BENCHMARKS.md).

    Args:
        mode: ``quick``, ``full`` or ``smoke``.
        out_dir: folder for ``bench.json`` (created if missing); suites that keep
            artefacts get ``FEDMQ_BENCH_OUT`` = this folder.
        only: names of the suites to run (default: all).
        markdown: the BENCHMARKS.md to regenerate, or None to leave Markdown alone.
        suites: the suite table (tests pass their own).
        threads: torch intra-op threads for the whole run (None: torch's default). One
            thread by default: on a shared 2-core machine, two threads made small models'
            local training about 20 times slower (oversubscription), and one thread gives
            comparable figures from run to run.
        log: called with one line per suite as it starts and ends.

    Returns: the bench.json document.

    Raises:
        ConfigError: unknown mode or suite name.
    """
    if mode not in MODES:
        raise ConfigError(f"--suite must be one of {', '.join(MODES)}, got {mode!r}")
    suites = tuple(s for s in suites if mode in s.modes)
    names = [s.name for s in suites]
    selected = list(suites)
    if only:
        unknown = [n for n in only if n not in names]
        if unknown:
            raise ConfigError(f"unknown suite(s) {', '.join(unknown)}; known: {', '.join(names)}")
        selected = [s for s in suites if s.name in only]
    if threads is not None:
        import torch

        torch.set_num_threads(int(threads))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    os.environ["FEDMQ_BENCH_OUT"] = str(out.resolve())
    started = _dt.datetime.now(_dt.timezone.utc)
    doc: dict[str, Any] = {
        "schema": BENCH_SCHEMA,
        "suite": mode,
        "suites_selected": [s.name for s in selected],
        "date": started.date().isoformat(),
        "started": started.isoformat(timespec="seconds"),
        **environment(),
        "suites": {},
    }
    bench_path = out / "bench.json"
    t0 = time.perf_counter()
    for suite in selected:
        if log:
            log(f"[bench] {suite.name}: running ({mode})")
        entry = run_suite(suite, mode)
        doc["suites"][suite.name] = entry
        doc["seconds"] = round(time.perf_counter() - t0, 3)
        atomic_write_text(bench_path, json.dumps(doc, indent=2, allow_nan=False) + "\n")
        if log:
            detail = f": {entry['error']}" if "error" in entry else ""
            log(f"[bench] {suite.name}: {entry['status']} in {entry['seconds']:.1f} s{detail}")
    doc["finished"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    doc["seconds"] = round(time.perf_counter() - t0, 3)
    atomic_write_text(bench_path, json.dumps(doc, indent=2, allow_nan=False) + "\n")
    if markdown is not None:
        update_markdown(markdown, doc)
    return doc


# --------------------------------------------------------------------------- Markdown

def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 1e6 or abs(value) < 1e-3:
            return f"{value:.3g}"
        if abs(value) >= 100:
            return f"{value:,.1f}".rstrip("0").rstrip(".")
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, separators=(",", ":"))
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(columns: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(_fmt(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _generic(result: dict[str, Any]) -> list[str]:
    """Tables for a result that brings none: scalars as key/value rows, lists of dicts
    and dicts of dicts as tables of their own."""
    parts: list[str] = []
    scalars = [[k, v] for k, v in result.items() if not isinstance(v, (dict, list)) and k != "notes"]
    if scalars:
        parts.append(_table(["measure", "value"], scalars))
    for key, value in result.items():
        if key in ("tables", "notes"):
            continue
        if isinstance(value, list) and value and all(isinstance(r, dict) for r in value):
            cols = list(dict.fromkeys(k for r in value for k in r if not isinstance(r[k], (dict, list))))
            parts.append(f"**{key}**\n\n" + _table(cols, [[r.get(c) for c in cols] for r in value]))
        elif isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
            cols = list(dict.fromkeys(k for r in value.values() for k in r if not isinstance(r[k], (dict, list))))
            parts.append(f"**{key}**\n\n" + _table([key] + cols, [[n] + [r.get(c) for c in cols]
                                                                 for n, r in value.items()]))
        elif isinstance(value, dict) and value:
            flat = [[k, v] for k, v in value.items() if not isinstance(v, (dict, list))]
            if flat:
                parts.append(f"**{key}**\n\n" + _table(["measure", "value"], flat))
    return parts


def _render_entry(name: str, entry: dict[str, Any]) -> str:
    title = entry.get("title", name)
    head = f"### {title} (`{name}`)\n\n"
    status = entry.get("status")
    if status != "ok":
        msg = entry.get("error", "")
        return head + f"**{status}** after {_fmt(entry.get('seconds'))} s: `{_fmt(msg)}`\n"
    result = entry.get("result", {})
    parts = [f"Ran in {_fmt(entry.get('seconds'))} s."]
    try:
        for t in result.get("tables", []) or []:
            parts.append((f"**{t['title']}**\n\n" if t.get("title") else "") + _table(t["columns"], t["rows"]))
        if not result.get("tables"):
            parts.extend(_generic(result))
        notes = result.get("notes")
        if notes:
            notes = [notes] if isinstance(notes, str) else notes
            parts.append("\n".join(f"- {n}" for n in notes))
    except Exception as exc:  # an odd result shape must not lose the figures: show the JSON
        parts.append(f"(could not tabulate: {type(exc).__name__}: {exc})\n\n```json\n"
                     + json.dumps(result, indent=1)[:20000] + "\n```")
    return head + "\n\n".join(parts) + "\n"


def render_block(doc: dict[str, Any]) -> str:
    """The generated Markdown for one bench.json document (without the markers)."""
    m, v = doc.get("machine", {}), doc.get("versions", {})
    mem = m.get("memory_bytes")
    lines = [
        f"## `{doc.get('suite')}` suite, {doc.get('date')}",
        "",
        (f"Assembled by `python -m benchmarks render` from {len(doc['merged_from'])} runs of "
         f"`python -m benchmarks run --suite {doc.get('suite')} --only ...` (started "
         f"{', '.join(map(str, doc['merged_from']))}; {_fmt(doc.get('seconds'))} s in all"
         if doc.get("merged_from") else
         f"Generated by `python -m benchmarks run --suite {doc.get('suite')}` from `bench.json` "
         f"(started {doc.get('started')}, {_fmt(doc.get('seconds'))} s in all")
        + (f", suites: {', '.join(doc.get('suites_selected', []))}" if doc.get("suites_selected") else "") + ").",
        "",
        _table(["machine", "cores", "memory", "python", "torch", "numpy", "fedmq", "paho-mqtt", "mosquitto",
                "torch threads", "commit"],
               [[m.get("cpu_model"), f"{m.get('cores')} ({m.get('cores_usable')} usable)",
                 f"{mem / 2**30:.0f} GiB" if mem else None, v.get("python"), v.get("torch"), v.get("numpy"),
                 v.get("fedmq"), v.get("paho_mqtt"), v.get("mosquitto"), doc.get("torch_threads"),
                 doc.get("git_commit")]]),
        "",
        _table(["suite", "status", "seconds"],
               [[n, e.get("status"), e.get("seconds")] for n, e in doc.get("suites", {}).items()]),
        "",
    ]
    for name, entry in doc.get("suites", {}).items():
        lines.append(_render_entry(name, entry))
    return "\n".join(lines).rstrip() + "\n"


def update_markdown(path: str | os.PathLike[str], doc: dict[str, Any]) -> None:
    """Replace (or append) the generated block of ``doc['suite']`` in the Markdown file
    ``path``, atomically; text outside the markers is kept. Creates the file if missing."""
    mode = doc.get("suite", "unknown")
    begin, end = f"<!-- bench:{mode}:begin -->", f"<!-- bench:{mode}:end -->"
    block = f"{begin}\n{render_block(doc)}{end}"
    p = Path(path)
    text = p.read_text(encoding="utf-8") if p.exists() else "# fedmq benchmarks\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    atomic_write_text(p, text)


def merge_bench(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """Merge bench.json documents of the same mode (later suites win): for a full run
    assembled from runs of separate suites. Machine, versions and date come from the last."""
    if not docs:
        raise ConfigError("merge_bench: no bench.json documents given")
    if len(docs) == 1:
        return docs[0]
    modes = {d.get("suite") for d in docs}
    if len(modes) != 1:
        raise ConfigError(f"merge_bench: documents of different suites {sorted(map(str, modes))}")
    merged = dict(docs[-1])
    suites: dict[str, Any] = {}
    for d in docs:
        suites.update(d.get("suites", {}))
    order = {name: i for i, name in enumerate(suite_names())}
    merged["suites"] = dict(sorted(suites.items(), key=lambda kv: order.get(kv[0], len(order))))
    merged["suites_selected"] = list(merged["suites"])
    merged["seconds"] = round(sum(float(d.get("seconds") or 0) for d in docs), 3)
    merged["merged_from"] = [d.get("started") for d in docs]
    return merged


def load_bench(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a bench.json; ConfigError naming the path if missing or not a bench document."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{p}: cannot read a bench.json ({exc})") from None
    if not isinstance(doc, dict) or "suites" not in doc or doc.get("schema") != BENCH_SCHEMA:
        raise ConfigError(f"{p}: not a bench.json of schema {BENCH_SCHEMA}")
    return doc


def main_log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
