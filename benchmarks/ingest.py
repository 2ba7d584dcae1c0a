"""Coordinator ingest benchmark: client updates of the MNIST CNN (1,663,370 parameters,
McMahan et al. 2017) at density 1%, topk-int8.

Three figures; each timed path runs :data:`RUNS` times and gives its median run, with every
run's rate beside it (``runs_...``):

* ``memory_path``: updates per CPU second through the coordinator's validation and
  aggregation from in-memory messages, one core (2,000 updates a run; ``--full`` 5,000):
  envelope decode + round checks + ``decode_sparse`` + ``add_into``
  (fedmq.fl.rounds.RoundEngine.offer: UpdateChecks.check then
  fedmq.fl.aggregation.WeightedMean.add), with the update checks a coordinator gets by default
  (the data-set norm bound included). Target >= 5,000 updates/s.
* ``mosquitto_path``: updates per second end to end through a mosquitto on loopback:
  publisher processes send blobs (fedmq.transport BlobSender) on the update topics; the
  coordinator's own message handling (``Coordinator._pump``: blob reassembly, validation,
  accumulation, a receipt per update) consumes them, 3,000 updates a run (``--full`` 5,000
  from 4 publishers). Target >= 2,000 updates/s. The publishers run at the lowest scheduling
  priority (nice 19, :data:`PUBLISHER_NICE`), so that the simulated devices, which are way
  ahead of the coordinator, do not take its cores while it has work; with them at its own
  priority the figure is ``mosquitto_path_publishers_not_niced``. On a
  2-core machine the publishers, the broker and the coordinator share the cores, so it also
  gives ``cpu_ms_per_update`` of each (coordinator, publishers, broker; the broker's from
  ``/proc/PID/stat`` in clock ticks of 10 ms, so over 1,000 updates +-0.01 ms) and
  ``cpu_bound_updates_per_s``, the most the machine's cores could carry at that cost.
* ``memory_growth``: resident memory (VmRSS) of the in-memory path after 100 updates and
  after 10,000 (quick: 2,000) updates of one round; target growth under 10%.

Update payloads are real Top-K int8 encodings of random-normal vectors (20 distinct
payloads, each wrapped in an envelope per device), so decoding does the real work.

Both paths also give ``updates_per_cpu_s``: updates per CPU second of the coordinator
(the ingesting thread in memory; the whole coordinator process, its MQTT network thread
included, through mosquitto), a figure that holds on a machine shared with other work,
where wall-clock rates move with the load. ``message_loop_cpu_seconds`` is the CPU time of
the thread running the coordinator's message loop alone: against ``seconds`` it shows how
long that thread waited (for messages, or for the GIL, held by paho's network thread while
it reads the next update). ``profile`` says where the time goes: a
separate pass of each path under cProfile (slower than the timed one), as microseconds
per update in each stage (cumulative, so nested stages overlap: ``offer`` holds the rest)
and the functions with the most time of their own.

``--compare REV`` instead runs the in-memory path interleaved: two round engines in one
process take the same updates one at a time, in alternating order, one with the decoders'
fast paths of commit REV (``_decode_valid`` of fedmq/codecs/topk_int8.py and ``_canonical``
of fedmq/wire/strict_msgpack.py, loaded from git; REV after fedmq/ was grouped by layer) and
one with the working tree's, and it gives
the CPU time of each ``offer`` (median and mean) and of each stage alone: on a shared
machine, whose load moves whole-run rates by more than the change, the figure to quote.

    python -m benchmarks.ingest [--full]           prints the result as JSON
    python -m benchmarks.ingest --compare REV      before (REV) / after, interleaved
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# One core: keep BLAS and OpenMP pools (numpy, torch) to one thread, in this process and
# in the publisher processes it spawns.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

TARGETS = {"memory_updates_per_s": 5000.0, "mosquitto_updates_per_s": 2000.0, "rss_growth_fraction": 0.10}
#: Stages of the profile summary: (label, file suffix, function names), cumulative time.
STAGES = (
    ("offer (envelope, checks, aggregation, bookkeeping)", "fedmq/fl/rounds.py", ("offer",)),
    ("envelope decode (strict msgpack)", "fedmq/wire/envelope.py", ("decode_update",)),
    ("update checks (decode included)", "fedmq/fl/rounds.py", ("check",)),
    ("codec decode (topk-int8)", "fedmq/codecs/__init__.py", ("decode_sparse",)),
    ("aggregate (WeightedMean.add)", "fedmq/fl/aggregation.py", ("add",)),
    ("blob reassembly (manifest, chunks, SHA-256)", "fedmq/transport/receiver.py", ("feed", "feed_manifest")),
    ("manifest parse", "fedmq/transport/wire.py", ("from_bytes",)),
    ("receipt (publish)", "coordinator/inbox.py", ("answer",)),
    ("coordinator message handling", "coordinator/inbox.py", ("handle",)),
)
FED = "bench"


def _rss_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _updates(n_distinct: int = 20) -> tuple[Any, list[Any]]:
    """The CNN's ParamSpec and ``n_distinct`` synthetic local results (random float32 updates)."""
    from fedmq.fl.training import LocalResult
    from fedmq.model.params import ParamSpec
    from fedmq.tasks import get_task

    spec = ParamSpec.from_module(get_task("mnist-cnn").build_model(0))
    rng = np.random.default_rng(0)
    return spec, [LocalResult(rng.normal(size=spec.size).astype(np.float32), "delta", 100, 1, 1, 0.0,
                              {"train_loss": 0.5}) for _ in range(n_distinct)]


def _envelope(spec: Any, result: Any, device: str) -> bytes:
    """A client update of ``device`` for round 1, built by the client-update pipeline
    (Top-K 1% + int8; a fresh residual, so every envelope is the update itself)."""
    from fedmq.fl.feedback import ErrorFeedback
    from fedmq.fl.client import package_update
    from fedmq.wire.messages import RoundTask, TrainPlan

    task = RoundTask(FED, device, 1, 0, spec.hash, 0.0, TrainPlan())
    return package_update(result, task, federation=FED, device=device, spec=spec, feedback=ErrorFeedback(spec),
                          seed=0).data


def _engine(spec: Any, devices: list[str]) -> Any:
    """The coordinator's round engine with round 1 open for ``devices`` (no target closes it
    early), with the update checks a coordinator gets by default (``[limits]``: the sample
    limit, the data-set norm bound of 10 x the median norm)."""
    from coordinator.config import LimitsConfig
    from fedmq.fl.rounds import RoundEngine, UpdateChecks

    lim = LimitsConfig()
    checks = UpdateChecks(max_samples=lim.max_samples, norm_bound=lim.norm_bound, norm_factor=lim.norm_bound_factor,
                          norm_warmup=lim.norm_bound_warmup, norm_initial=lim.norm_bound_initial)
    known = set(devices)
    engine = RoundEngine(FED, spec, kind="delta", is_known=known.__contains__, max_update_bytes=lim.max_update_bytes,
                         checks=checks)
    engine.open(1, 0, devices, len(devices) + 1, time.time() + 3600, time.time())
    return engine


def _warm_kernels(spec: Any, payloads: list[Any]) -> None:
    """Compile (or load from numba's cache) the coordinator's decode and add kernels before the
    timed updates, as a running coordinator has long done by its rounds; about 0.1-1.5 s once,
    which otherwise lands in the first update's time."""
    from fedmq.codecs import decode_sparse, kernels
    from fedmq.fl.aggregation import WeightedMean
    from fedmq.wire.envelope import decode_update

    kernels.enable()
    upd = decode_update(_envelope(spec, payloads[0], "warm"), spec)
    WeightedMean(spec.size).add(decode_sparse(upd.codec, upd.payload, spec), 1.0)


def _summary(profiler: Any, updates: int) -> dict[str, Any]:
    """Microseconds per update in each of :data:`STAGES` found in ``profiler``'s run, and the
    eight functions with the most time of their own."""
    import pstats

    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    stages: dict[str, float] = {}
    for label, suffix, funcs in STAGES:
        cum = sum(ct for (path, _, name), (_, _, _, ct, _) in stats.items()
                  if name in funcs and path.endswith(suffix))
        if cum:
            stages[label] = round(cum / updates * 1e6, 1)
    top = sorted(stats.items(), key=lambda kv: kv[1][2], reverse=True)[:8]
    own = {f"{Path(path).name}:{line}({name})" if line else name: round(tt / updates * 1e6, 1)
           for (path, line, name), (_, _, tt, _, _) in top}
    return {"updates": updates, "us_per_update": stages, "own_time_us_per_update": own}


def memory_path(spec: Any, payloads: list[Any], n: int, profile: bool = False) -> dict[str, Any]:
    import cProfile

    from fedmq.fl.rounds import Accepted

    devices = [f"d{i}" for i in range(n)]
    messages = [_envelope(spec, payloads[i % len(payloads)], d) for i, d in enumerate(devices)]
    engine = _engine(spec, devices)
    _warm_kernels(spec, payloads)
    profiler = cProfile.Profile() if profile else None
    t, cpu = time.perf_counter(), time.thread_time()
    if profiler is not None:
        profiler.enable()
    for i, (device, data) in enumerate(zip(devices, messages)):
        res = engine.offer(device, f"t{i}", data)
        assert isinstance(res, Accepted), res
    if profiler is not None:
        profiler.disable()
        return _summary(profiler, n)
    seconds, cpu = time.perf_counter() - t, time.thread_time() - cpu
    return {"updates": n, "seconds": round(seconds, 3), "updates_per_s": round(n / seconds, 1),
            "cpu_seconds": round(cpu, 3), "updates_per_cpu_s": round(n / cpu, 1), "envelope_bytes": len(messages[0])}


def memory_growth(spec: Any, payloads: list[Any], n: int) -> dict[str, Any]:
    """RSS after 100 and after ``n`` updates of one round (envelopes built on the fly)."""
    from fedmq.fl.rounds import Accepted

    devices = [f"d{i}" for i in range(n)]
    engine = _engine(spec, devices)
    rss_100 = 0
    for i, device in enumerate(devices):
        res = engine.offer(device, f"t{i}", _envelope(spec, payloads[i % len(payloads)], device))
        assert isinstance(res, Accepted)
        if i + 1 == 100:
            rss_100 = _rss_bytes()
    rss_n = _rss_bytes()
    return {"updates": n, "rss_after_100": rss_100, f"rss_after_{n}": rss_n,
            "growth_fraction": round((rss_n - rss_100) / rss_100, 4)}


def _publisher_main(url: str, first: int, stride: int, n: int, n_distinct: int, nice: int = 0) -> None:
    """A publisher process (``python -m benchmarks.ingest --publisher URL FIRST STRIDE N DISTINCT
    [NICE]``): builds the envelopes of devices ``d{first}``, ``d{first + stride}``, ... below
    ``n`` (the same synthetic updates as the coordinator's side: seeded), lowers its scheduling
    priority by ``nice`` (``os.nice``) once they are built, prints ``ready``, waits for a line
    ``go`` on stdin, sends them, and prints its CPU seconds while sending as JSON. Plain
    command-line arguments and text lines, so nothing crosses the process boundary pickled."""
    from fedmq.transport.link import MqttLink
    from fedmq.transport.sender import BlobSender
    from fedmq.transport.settings import BrokerSettings
    from fedmq.wire import topics

    spec, payloads = _updates(n_distinct)
    blobs = [(f"d{i}", _envelope(spec, payloads[i % len(payloads)], f"d{i}")) for i in range(first, n, stride)]
    link = MqttLink(BrokerSettings(url=url), inflight=64).connect()
    sender = BlobSender(link, keep=0)
    if nice:
        os.nice(nice)
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return
    cpu = time.process_time()
    for device, data in blobs:
        sender.send(topics.update_base(FED, device, f"t{device[1:]}"), data)
    link.close()
    print(json.dumps({"cpu_seconds": time.process_time() - cpu, "sent": len(blobs), "nice": os.nice(0)}), flush=True)


def _proc_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (``/proc/PID/stat``, Linux; in clock
    ticks, 10 ms at the usual ``SC_CLK_TCK`` of 100). Raises OSError when the process is gone."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def mosquitto_path(spec: Any, payloads: list[bytes], n: int, publishers: int, profile: bool = False,
                   publisher_nice: int = 0) -> dict[str, Any]:
    import cProfile
    import tempfile
    import threading

    from broker.launch import start_mosquitto
    from coordinator.config import config_from_dict
    from coordinator.presence import Device
    from coordinator.service import Coordinator
    from fedmq.wire import topics
    from fedmq.transport.link import MqttLink

    devices = [f"d{i}" for i in range(n)]
    procs: list[subprocess.Popen[str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        broker = start_mosquitto(Path(tmp), extra_conf="max_queued_messages 100000\n")
        try:
            cfg = config_from_dict({"federation": FED, "task": "mnist-cnn", "state_dir": str(Path(tmp) / "state"),
                                    "broker": {"url": broker.url}, "publish": {"onnx": False}})
            # The coordinator's own message loop and round engine, with round 1 open for
            # every publisher's devices (the rest of Coordinator.run is not on this path).
            coord = Coordinator(cfg, link=MqttLink(cfg.broker, client_id="bench-coordinator", inflight=256))
            for d in devices:
                coord.registry.devices[d] = Device(d, online=True, task="mnist-cnn", spec_hash=spec.hash)
            coord.link.connect()
            coord.link.subscribe(topics.update_filter(FED), inbox=coord.inbox.queue)
            engine = coord.policy.engine = _engine(spec, devices)
            _warm_kernels(spec, payloads)
            procs += [subprocess.Popen([sys.executable, "-m", "benchmarks.ingest", "--publisher", broker.url, str(k),
                                       str(publishers), str(n), str(len(payloads)), str(publisher_nice)],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                      cwd=Path(__file__).resolve().parents[1])
                      for k in range(publishers)]
            # A publisher that is not ready in 120 s is killed: its readline below then ends.
            watchdog = threading.Timer(120, lambda: [q.kill() for q in procs])
            watchdog.start()
            try:
                for p in procs:
                    line = p.stdout.readline()  # type: ignore[union-attr]
                    if line.strip() != "ready":
                        raise RuntimeError(f"a publisher process did not start within 120 s (said {line!r})")
            finally:
                watchdog.cancel()
            broker_cpu = _proc_cpu_seconds(broker.pid) if broker.pid else float("nan")
            profiler = cProfile.Profile() if profile else None
            t, cpu, pump_cpu = time.perf_counter(), time.process_time(), time.thread_time()
            for p in procs:
                p.stdin.write("go\n")  # type: ignore[union-attr]
                p.stdin.flush()  # type: ignore[union-attr]
            last = time.monotonic()
            if profiler is not None:
                profiler.enable()
            while engine.aggregate.count + sum(engine.rejected.values()) < n and time.monotonic() - last < 30:
                if coord.inbox.drain(1.0):
                    last = time.monotonic()
            if profiler is not None:
                profiler.disable()
            seconds, cpu, pump_cpu = (time.perf_counter() - t, time.process_time() - cpu,
                                      time.thread_time() - pump_cpu)
            broker_cpu = (_proc_cpu_seconds(broker.pid) if broker.pid else float("nan")) - broker_cpu
            publisher_cpu, niceness = 0.0, set()
            for p in procs:
                out, _ = p.communicate(timeout=60)
                report = json.loads(out.strip().splitlines()[-1])
                publisher_cpu += report["cpu_seconds"]
                niceness.add(report["nice"])
            coord.link.close()
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            broker.stop()
    if profiler is not None:
        return _summary(profiler, max(engine.aggregate.count, 1))
    return {"updates_sent": n, "accepted": engine.aggregate.count, "rejected": dict(engine.rejected),
            "publishers": publishers, "publishers_niceness": sorted(niceness), "seconds": round(seconds, 3),
            "updates_per_s": round(engine.aggregate.count / seconds, 1), "coordinator_cpu_seconds": round(cpu, 3),
            "updates_per_cpu_s": round(engine.aggregate.count / cpu, 1),
            "message_loop_cpu_seconds": round(pump_cpu, 3), "bytes_up": engine.tally.bytes_up,
            "publishers_cpu_seconds": round(publisher_cpu, 3), "broker_cpu_seconds": round(broker_cpu, 3),
            **_cpu_bound(engine.aggregate.count, cpu, publisher_cpu, broker_cpu)}


def _cpu_bound(updates: int, coordinator: float, publishers: float, broker: float) -> dict[str, Any]:
    """CPU milliseconds per update of each process through mosquitto, and the rate the machine's
    cores could carry if they did nothing else (``os.cpu_count()`` CPU seconds a second over
    their sum): on one machine the publishers and the broker take their share too."""
    per = {k: 1e3 * v / max(updates, 1) for k, v in
           (("coordinator", coordinator), ("publishers", publishers), ("broker", broker))}
    total = sum(per.values())
    return {"cpu_ms_per_update": {k: round(v, 3) for k, v in per.items()} | {"all": round(total, 3)},
            "cpu_bound_updates_per_s": round((os.cpu_count() or 1) * 1e3 / total, 1) if total else None}


def _median_run(runs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """The run with the median ``key`` of an odd number of ``runs``, with every run's ``key``
    added as ``runs_<key>`` (one machine's load moves single runs by 10-30%)."""
    ordered = sorted(runs, key=lambda r: r[key])
    return ordered[len(ordered) // 2] | {f"runs_{key}": [r[key] for r in runs]}


#: Runs of each timed path; the figures are the median run's.
RUNS = 3
#: ``os.nice`` increment of the publisher processes in the headline mosquitto figure: the
#: simulated devices yield this machine's cores to the coordinator and the broker, as devices
#: on their own machines would (the figure with them at the coordinator's priority is
#: reported beside it).
PUBLISHER_NICE = 19


def run(quick: bool) -> dict[str, Any]:
    import torch
    torch.set_num_threads(1)
    spec, payloads = _updates()
    n_mem = 2000 if quick else 5000
    mem = _median_run([memory_path(spec, payloads, n_mem) for _ in range(RUNS)], "updates_per_cpu_s")
    n_wire, publishers = (3000, 2) if quick else (5000, 4)
    wire = _median_run([mosquitto_path(spec, payloads, n_wire, publishers, publisher_nice=PUBLISHER_NICE)
                        for _ in range(RUNS)], "updates_per_s")
    shared = _median_run([mosquitto_path(spec, payloads, n_wire, publishers) for _ in range(RUNS)], "updates_per_s")
    growth = memory_growth(spec, payloads, 2000 if quick else 10000)
    profile = {"memory_path": memory_path(spec, payloads, 500, profile=True),
               "mosquitto_path": mosquitto_path(spec, payloads, 500, publishers=2, profile=True)}
    return {
        "model": "mnist-cnn", "parameters": spec.size, "density": 0.01, "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(), "memory_path": mem, "mosquitto_path": wire,
        "mosquitto_path_publishers_not_niced": shared, "memory_growth": growth,
        "profile": profile, "targets": TARGETS,
        "meets": {"memory_updates_per_s": mem["updates_per_cpu_s"] >= TARGETS["memory_updates_per_s"],
                  "mosquitto_updates_per_s": wire["updates_per_s"] >= TARGETS["mosquitto_updates_per_s"],
                  "rss_growth_fraction": growth["growth_fraction"] < TARGETS["rss_growth_fraction"]},
    }


def smoke() -> dict[str, Any]:
    """The harness's smoke case: 20 updates in memory and 20 through mosquitto (one publisher),
    so that the coordinator's message loop, driven here outside ``Coordinator.run``, cannot rot
    unnoticed. No targets."""
    import torch
    torch.set_num_threads(1)
    spec, payloads = _updates(4)
    return {"model": "mnist-cnn", "memory_path": memory_path(spec, payloads, 20),
            "mosquitto_path": mosquitto_path(spec, payloads, 20, publishers=1, publisher_nice=PUBLISHER_NICE)}


#: Functions swapped for the commit's in :func:`compare`: (module, file, names).
COMPARED = (("fedmq.codecs.topk_int8", "fedmq/codecs/topk_int8.py", ("_decode_valid",)),
            ("fedmq.wire.strict_msgpack", "fedmq/wire/strict_msgpack.py", ("_canonical",)))


def _git_show(rev: str, path: str) -> str:
    """The text of ``path`` at commit ``rev``."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    return subprocess.run(["git", "-C", str(root), "show", f"{rev}:{path}"], check=True, capture_output=True,
                          text=True).stdout


def _module_at(rev: str, name: str, path: str) -> Any:
    """Module ``name`` as it was at commit ``rev`` (its source from git), under another name."""
    import importlib.util

    source = _git_show(rev, path)
    spec = importlib.util.spec_from_loader(f"{name}_at_{rev}", loader=None)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[module.__name__] = module  # dataclasses look their module up there
    exec(compile(source, f"{rev}:{path}", "exec"), module.__dict__)  # noqa: S102 - the project's own source
    return module


def _kernels_at(rev: str) -> Any:
    """fedmq.codecs.kernels as it was at commit ``rev``, when it differs from the working
    tree's (else the live module): compiled without numba's on-disk cache, which needs a
    source file."""
    import importlib

    import numba

    path = "fedmq/codecs/kernels.py"
    live = importlib.import_module("fedmq.codecs.kernels")
    if _git_show(rev, path) == (Path(__file__).resolve().parents[1] / path).read_text():
        return live
    module = _module_at(rev, "fedmq.codecs.kernels", path)
    njit = numba.njit
    numba.njit = lambda *args, **kw: njit(*args, **{**kw, "cache": False})  # type: ignore[assignment]
    try:
        module.enable()  # builds REV's kernels now, uncached
    finally:
        numba.njit = njit  # type: ignore[assignment]
    return module


def compare(rev: str, n: int) -> dict[str, Any]:
    """Interleaved before/after of the in-memory path (see the module docstring): CPU
    microseconds per ``offer`` and per stage (envelope, codec decode, aggregation), median
    and mean over ``n`` updates, for commit ``rev`` and the working tree. The compiled
    kernels (fedmq.codecs.kernels) are off on the ``rev`` side when ``rev`` predates them."""
    import importlib
    import math

    from fedmq.codecs import decode_sparse, kernels
    from fedmq.wire.envelope import decode_update
    from fedmq.fl.aggregation import WeightedMean
    from fedmq.fl.rounds import Accepted

    spec, payloads = _updates()
    devices = [f"d{i}" for i in range(n)]
    messages = [_envelope(spec, payloads[i % len(payloads)], d) for i, d in enumerate(devices)]
    kernels_before = "kernels.get()" in _git_show(rev, COMPARED[0][1])
    old_kernels = _kernels_at(rev) if kernels_before else None
    sides: dict[str, dict[str, Any]] = {}
    for side in ("before", "after"):
        swap = {}
        for name, path, funcs in COMPARED:
            live = importlib.import_module(name)
            source = _module_at(rev, name, path) if side == "before" else live
            if source is not live and old_kernels is not None and hasattr(source, "kernels"):
                source.kernels = old_kernels  # REV's decode calls REV's kernels
            swap[name] = (live, {f: getattr(source, f) for f in funcs})
        sides[side] = {"swap": swap, "engine": _engine(spec, devices), "mean": WeightedMean(spec.size),
                       "us": {"offer": [], "envelope": [], "decode": [], "aggregate": []}}

    def use(side: str) -> None:
        for live, funcs in sides[side]["swap"].values():
            for f, impl in funcs.items():
                setattr(live, f, impl)
        if side == "before" and not kernels_before:
            kernels.disable()
        else:
            kernels.enable()
            if side == "before" and old_kernels is not None:
                old_kernels.enable()

    clock = time.thread_time_ns
    for side in ("before", "after"):  # compile (or load) the kernels outside the timed updates
        use(side)
        warm = WeightedMean(spec.size)
        upd = decode_update(messages[0], spec)
        warm.add(decode_sparse(upd.codec, upd.payload, spec), 1.0)
    try:
        for i, (device, data) in enumerate(zip(devices, messages)):
            for side in (("before", "after") if i % 2 else ("after", "before")):
                use(side)
                s = sides[side]
                t = clock()
                res = s["engine"].offer(device, f"t{i}", data)
                s["us"]["offer"].append((clock() - t) / 1e3)
                assert isinstance(res, Accepted), res
                t0 = clock()
                upd = decode_update(data, spec)
                t1 = clock()
                sparse = decode_sparse(upd.codec, upd.payload, spec)
                t2 = clock()
                s["mean"].add(sparse, float(upd.samples))
                t3 = clock()
                for stage, us in (("envelope", t1 - t0), ("decode", t2 - t1), ("aggregate", t3 - t2)):
                    s["us"][stage].append(us / 1e3)
    finally:
        use("after")
    same = all(np.array_equal(sides["before"][k].total, sides["after"][k].total) for k in ("mean",)) and \
        np.array_equal(sides["before"]["engine"].aggregate.total, sides["after"]["engine"].aggregate.total)
    out: dict[str, Any] = {"rev": rev, "updates": n, "load_average": os.getloadavg(), "bit_identical_aggregate": same}
    for stage in ("offer", "envelope", "decode", "aggregate"):
        row = {}
        for side in ("before", "after"):
            us = np.array(sides[side]["us"][stage])
            row[side] = {"median_us": round(float(np.median(us)), 1), "mean_us": round(float(us.mean()), 1)}
        row["ratio_median"] = round(row["before"]["median_us"] / row["after"]["median_us"], 3)
        row["ratio_mean"] = round(row["before"]["mean_us"] / row["after"]["mean_us"], 3)
        out[stage] = row
    mean_after = out["offer"]["after"]["mean_us"]
    out["updates_per_cpu_s"] = {"before": round(1e6 / out["offer"]["before"]["mean_us"], 1),
                                "after": round(1e6 / mean_after, 1)}
    assert not math.isnan(mean_after)
    return out


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--publisher"]:
        _publisher_main(args[1], int(args[2]), int(args[3]), int(args[4]), int(args[5]), *map(int, args[6:7]))
    elif "--compare" in args:
        import torch
        torch.set_num_threads(1)
        print(json.dumps(compare(args[args.index("--compare") + 1], 1000 if "--full" not in args else 5000),
                         indent=1))
    else:
        print(json.dumps(run(quick="--full" not in args), indent=1))
