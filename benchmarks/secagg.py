"""Secure aggregation benchmark: the core (fedmq.secagg) and secure rounds over MQTT.

1. **Support rule against client Top-K** on real MNIST CNN updates: devices 1-4 of the
   MNIST-10k IID split train one local epoch from the seed-0 model; the global model steps by
   their mean (FedAvg); device 0 trains one epoch from that model. Of device 0's update, the
   share of ||d||^2 on (a) its own Top-K (today's global Top-K at 1%) and (b) the common
   support of the round (90% the largest coordinates of the last global change, 10% seeded
   random).
2. **Protocol cost** of one round of 100 devices (the fleet's round size) on k = 1% of the CNN
   (16,634 values, int8-like range: qmax 127): per device, the bytes of each phase (keys,
   sealed shares, masked input packed to the ring's bits, unmasking answer) against today's
   sparse envelope; CPU seconds of the devices (mean) and of the coordinator per phase, with 0%
   and 30% of the masked devices dropping before unmasking. Pure library: no broker, so no
   wall time of MQTT phases.

3. **Secure rounds over MQTT** (``--federation``): the demo federation through a real
   mosquitto with device processes, plain then secure (``[secure_aggregation] enabled``,
   defaults otherwise), per partition: final test accuracy, the bytes the broker carried to
   and from the coordinator (every message: models, tasks, client updates or masked inputs,
   keys, shares, unmasking), the devices' bytes both ways (everything mosquitto's ``$SYS``
   counters say it carried, less the coordinator's own messages), and the median wall time
   per round. The issue's set-ups B / C
   are ``--data mnist --devices 10 --per-round 5 --rounds 30 --partitions iid dirichlet``
   (heavy: run it on a machine of its own); the default is a reduced run on digits.

    python -m benchmarks.secagg                 the library figures (1, 2) as JSON
    python -m benchmarks.secagg --federation    the federation figures (3) as JSON
    python -m benchmarks.secagg --bus-round --devices 100   one secure round over the
        in-memory bus through the product's policies (4): coordinator CPU and phase times
    python -m benchmarks.secagg --fleet --devices 1000 --per-round 100 --rounds 3
        secure rounds of ``fedmq fleet`` through mosquitto (5): the coordinator's CPU per round
        and each phase's wall time, with 0% and 30% of the selected devices dying mid-training

5. **A fleet** (``--fleet``): ``fedmq fleet``'s virtual devices (the unchanged edge agent,
   each with its own MQTT connection; digits-logreg, the scale benchmark's plan) against one
   mosquitto, the coordinator in this process with ``[secure_aggregation] enabled`` (shipped
   settings otherwise). Per dropout (the fleet's ``dropout``: a training ends with the device
   dying with that probability, so it never sends its masked input; it rejoins later): rounds
   closed, the survivors per round, the coordinator's CPU seconds per round and the median
   wall time of each phase (keys, shares, input, reveal).
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

import numpy as np
import torch

from fedmq.codecs import CodecSpec, decode_sparse, encode
from fedmq.data import mnist10k_partitions, mnist10k_split
from fedmq.wire.envelope import ClientUpdate, encode_update
from fedmq.model.params import ParamSpec, flatten_params, load_params
from fedmq.secagg import RingSpec, RoundParams, SecAggClient, SecAggServer, common_support
from fedmq.secagg.shamir import SHARE_BYTES
from fedmq.tasks import get_task

DENSITY = 0.01
DEVICES = 100


def _local_epoch(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, seed: int) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    model.train()
    for batch in torch.randperm(len(yt), generator=torch.Generator().manual_seed(seed)).split(32):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xt[batch]), yt[batch]).backward()
        opt.step()


def support_against_topk() -> dict[str, Any]:
    task = get_task("mnist-cnn")
    model = task.build_model(0)
    spec = ParamSpec.from_module(model)
    x_train, y_train, _, _ = mnist10k_split()
    parts = mnist10k_partitions(10, "iid")
    w0 = flatten_params(model, spec)
    deltas = []
    for dev in range(1, 5):
        load_params(model, w0, spec)
        _local_epoch(model, x_train[parts[dev]], y_train[parts[dev]], dev)
        deltas.append(flatten_params(model, spec) - w0)
    change = np.mean(deltas, axis=0).astype(np.float32)
    load_params(model, w0 + change, spec)
    before = flatten_params(model, spec)
    _local_epoch(model, x_train[parts[0]], y_train[parts[0]], 0)
    d = (flatten_params(model, spec) - before).astype(np.float64)
    energy = float(d @ d)
    own = decode_sparse("topk-int8", encode(d.astype(np.float32), spec, CodecSpec.of(density=DENSITY)), spec)
    k = own.nnz
    support = common_support(spec.size, k, last_change=change, seed=0, round_=2)
    random = common_support(spec.size, k, last_change=None, seed=0, round_=2)
    envelope = encode_update(ClientUpdate(federation="bench", device="dev-0", round=2, base_version=1,
                                          samples=len(parts[0]), kind="delta", spec_hash=spec.hash, codec="topk-int8",
                                          payload=encode(d.astype(np.float32), spec, CodecSpec.of(density=DENSITY)),
                                          metrics={"train_loss": 0.1}))
    return {"params": spec.size, "k": k, "today_envelope_bytes": len(envelope),
            "energy_own_topk": round(float(d[own.indices] @ d[own.indices]) / energy, 4),
            "energy_common_support": round(float(d[support] @ d[support]) / energy, 4),
            "energy_random_support": round(float(d[random] @ d[random]) / energy, 4),
            "overlap_with_own_topk": round(len(np.intersect1d(support, own.indices)) / k, 4)}


def protocol_cost(k: int, f_unmask: float, seed: int = 0, degree: int = 0, threshold: int = 0,
                  f_input: float = 0.0) -> dict[str, Any]:
    devices = tuple(f"vd-{i:05d}" for i in range(DEVICES))
    ring = RingSpec(clip=1.0, scale=127.0, max_devices=DEVICES)
    params = RoundParams(round=1, devices=devices, ring=ring, k=k, seed=seed, degree=degree, threshold=threshold)
    rng = np.random.default_rng(seed)
    inputs = {d: ring.quantize(rng.uniform(-1, 1, k)) for d in devices}
    client_s: dict[str, float] = {"keys": 0.0, "shares": 0.0, "input": 0.0, "unmask": 0.0}
    server_s: dict[str, float] = {}
    t = time.process_time()
    clients = {d: SecAggClient(d, params) for d in devices}
    adverts = [c.advertise() for c in clients.values()]
    client_s["keys"] += time.process_time() - t
    server = SecAggServer(params)
    t = time.process_time()
    for a in adverts:
        server.add_keys(a)
    keys = server.close_keys()
    server_s["keys"] = time.process_time() - t
    share_bytes = []
    for d, c in clients.items():
        t = time.process_time()
        cts = c.share_keys(keys)
        client_s["shares"] += time.process_time() - t
        share_bytes.append(sum(len(ct) for ct in cts.values()))
        t = time.process_time()
        server.add_shares(d, cts)
        server_s["shares"] = server_s.get("shares", 0.0) + time.process_time() - t
    server.close_shares()
    gone = set(rng.permutation(list(devices))[:round(f_input * DEVICES)].tolist())
    for d, c in clients.items():
        if d in gone:
            continue
        relayed = server.shares_for(d)
        t = time.process_time()
        y = c.masked_input(inputs[d], relayed)
        client_s["input"] += time.process_time() - t
        t = time.process_time()
        server.add_masked_input(d, y)
        server_s["input"] = server_s.get("input", 0.0) + time.process_time() - t
    request = server.close_inputs()
    drop = set(rng.permutation(list(request.survivors))[:round(f_unmask * len(request.survivors))].tolist())
    answer_bytes = []
    for d in request.survivors:
        if d in drop:
            continue
        t = time.process_time()
        answer = clients[d].unmask(request)
        client_s["unmask"] += time.process_time() - t
        answer_bytes.append(SHARE_BYTES * (len(answer.b_shares) + len(answer.s_shares)))
        server.add_unmask_response(answer)
    t = time.process_time()
    total = server.result()
    server_s["unmask"] = time.process_time() - t
    assert np.array_equal(total, np.sum([inputs[d] for d in request.survivors], axis=0))
    answered = len(request.survivors) - len(drop)
    per_device = {"keys": 2 * 32, "shares": round(float(np.mean(share_bytes))),
                  "masked_input": math.ceil(k * ring.bits / 8), "unmask": round(float(np.mean(answer_bytes)))}
    return {"devices": DEVICES, "dropped_before_input": len(gone), "dropped_before_unmask": len(drop),
            "degree": params.degree,
            "threshold": params.threshold, "ring_bits": ring.bits, "bytes_per_device": per_device,
            "bytes_per_device_total": sum(per_device.values()),
            "device_cpu_s_mean": {p: round(s / (answered if p == "unmask" else DEVICES), 5)
                                  for p, s in client_s.items()},
            "coordinator_cpu_s": {p: round(s, 4) for p, s in server_s.items()},
            "coordinator_cpu_s_total": round(sum(server_s.values()), 4)}


def run(quick: bool = True) -> dict[str, Any]:
    torch.set_num_threads(1)
    support = support_against_topk()
    k = support["k"]
    return {"support": support,
            # The defaults (degree 4 ceil(log2 n), t = degree // 3 + 1: 28 and 10 for 100
            # devices) make a neighbourhood short of t at 30% dropout a 3e-5 event per device;
            # the earlier degree 2 ceil(log2 n), t = degree // 2 + 1 left some short.
            "protocol": {"dropout_0pct_defaults": protocol_cost(k, 0.0),
                         "dropout_0pct_degree28_t10": protocol_cost(k, 0.0, degree=28, threshold=10),
                         "dropout_30pct_degree28_t10": protocol_cost(k, 0.3, degree=28, threshold=10),
                         "dropout_30pct_before_input_degree28_t10": protocol_cost(k, 0.0, degree=28, threshold=10,
                                                                                  f_input=0.3)},
            "notes": ["energy_*: share of ||d||^2 of device 0's update on each support (k values)",
                      "bytes_per_device: keys 2 x 32; shares: HPKE-sealed Shamir shares to each neighbour; "
                      "masked_input: k values packed to the ring's bits; unmask: 66-byte shares answered",
                      "CPU: process_time, one thread, pure library (no MQTT)"]}


def bus_round(n: int = 100, k: int = 16_634, size: int = 166_340, dropout: float = 0.0, degree: int = 28,
              threshold: int = 10, seed: int = 0) -> dict[str, Any]:
    """Part 4: one secure round of ``n`` devices through the product's own policies
    (coordinator.secure and edge_client.secure, each device on its own link of an in-memory
    bus, the devices driven by one thread): the coordinator's CPU seconds (its thread) and the
    wall time of each phase, with ``dropout`` of the masked devices silent at the unmasking.
    No training: each device's input is Gaussian noise of the update's scale, on a model of
    ``size`` coordinates (the CNN's k = 16,634 on a tenth of its size, to keep 100 devices'
    vectors in memory)."""
    import queue
    import tempfile
    import threading
    from pathlib import Path

    from coordinator.config import SecureAggregationConfig
    from coordinator.phases import PhaseIO
    from coordinator.secure import SecureRound
    from edge_client.secure import SecureDevice
    from fedmq.wire import topics
    from fedmq.secagg import messages as sm
    from fedmq.transport.memory import MemoryBus

    fed, bus = "bench", MemoryBus()
    devices = [f"d{i:04d}" for i in range(n)]
    rng = np.random.default_rng(seed)
    drop = set(rng.choice(devices, size=round(dropout * n), replace=False))
    inbox: queue.SimpleQueue = queue.SimpleQueue()
    agents = {}
    for d in devices:
        link = bus.link(d).connect()
        link.subscribe(topics.secagg_down(fed, d), inbox=inbox)
        agents[d] = SecureDevice(fed, d, link, size=size, settle=lambda p, s: None)
    stop = threading.Event()
    device_cpu = [0.0]

    def drive() -> None:
        while not stop.is_set():
            try:
                msg = inbox.get(timeout=0.05)
            except queue.Empty:
                continue
            t0 = time.thread_time()
            d = msg.topic.rsplit("/", 1)[1]
            if not (d in drop and agents[d].pending is not None):
                agents[d].handle(msg.payload)
                decoded = sm.decode_downlink(msg.payload)
                if isinstance(decoded, sm.Setup):
                    agents[d].provide(decoded.round, rng.normal(0, 0.01, size).astype(np.float32))
            device_cpu[0] += time.thread_time() - t0

    coord = bus.link("coordinator").connect()
    up: queue.SimpleQueue = queue.SimpleQueue()
    coord.subscribe(topics.secagg_up_filter(fed), inbox=up)

    def receive(timeout: float):
        try:
            return up.get(timeout=timeout)
        except queue.Empty:
            return None

    io = PhaseIO(receive=receive, parse=lambda t: topics.parse_secagg_up(fed, t), other=lambda m: None,
                 refuse=lambda r: None)
    with tempfile.TemporaryDirectory() as tmp:
        policy = SecureRound(fed, coord, SecureAggregationConfig(enabled=True, degree=degree, threshold=threshold,
                                                                 phase_s=120.0), io, Path(tmp))
        support = common_support(size, k, last_change=None, seed=seed, round_=1)
        worker = threading.Thread(target=drive, daemon=True)
        worker.start()
        t0 = time.thread_time()
        outcome = policy.run(1, devices, size=size, support=support, seed=seed, deadline=time.time() + 600)
        cpu = time.thread_time() - t0
        stop.set()
        worker.join(5)
    return {"devices": n, "k": k, "dropout_before_unmasking": dropout, "degree": degree, "threshold": threshold,
            "state": outcome.state, "survivors": len(outcome.survivors),
            "coordinator_cpu_s": round(cpu, 3), "devices_cpu_s_total": round(device_cpu[0], 3),
            "phase_wall_s": {name: round(v, 3) for name, v in outcome.phase_s.items()},
            "bytes_up_per_device_mean": round(sum(outcome.bytes_in.values()) / max(1, len(outcome.bytes_in)))}


def federation(*, data: str = "digits", devices: int = 10, per_round: int = 5, rounds: int = 10,
               partitions: tuple[str, ...] = ("iid", "dirichlet"), seed: int = 0,
               secure: dict[str, Any] | None = None, secure_density: float | None = None) -> dict[str, Any]:
    """Part 3: plain against secure rounds through mosquitto with device processes (each run a
    fresh broker), through :func:`fleet.demo.run_demo` and :func:`fleet.demo.secure_cost`.
    ``secure``: the secure run's ``[secure_aggregation]`` table (default: the shipped one);
    ``secure_density``: its plan density (default: the plain run's)."""
    import tempfile
    from pathlib import Path

    from rich.console import Console

    from benchmarks.scale import _SysBytes
    from fedmq.data import shared_data_dir
    from fleet.demo import DemoSettings, run_demo, secure_cost
    from fleet.launch import start_broker

    out: dict[str, Any] = {"setup": {"data": data, "devices": devices, "per_round": per_round, "rounds": rounds,
                                     "seed": seed, "broker": "mosquitto", "devices_in": "processes",
                                     "secure_aggregation": secure or {}, "secure_density": secure_density}}
    quiet = Console(quiet=True)
    for scheme in partitions:
        runs = []
        for on in (False, True):
            extra: dict[str, Any] = {"density": secure_density} if on and secure_density else {}
            with tempfile.TemporaryDirectory(prefix="fedmq-secagg-bench-") as tmp:
                broker = start_broker("mosquitto", Path(tmp), mosquitto_conf="max_packet_size 1048576\nsys_interval 1")
                sysb = _SysBytes(broker.process.port)
                try:
                    runs.append(run_demo(DemoSettings(
                        devices=devices, per_round=per_round, rounds=rounds, data=data,
                        data_dir=shared_data_dir() / "mnist-t10k" if data == "mnist" else None,
                        partition_scheme=scheme, broker=broker.url, protocol="5", seed=seed, out=Path(tmp) / "demo",
                        write_files=False, publish_onnx=False, secure_aggregation=(secure or True) if on else False,
                        **extra), console=quiet))
                    # Every message the broker carried, less the coordinator's own (payload counts
                    # on its link, so MQTT headers of its messages stay in: an upper bound).
                    total = sysb.now()
                    link = runs[-1].get("coordinator_link") or {}
                    runs[-1]["devices_bytes_both_ways"] = (total.get("sent", 0) + total.get("received", 0)
                                                           - link.get("bytes_out", 0) - link.get("bytes_in", 0))
                finally:
                    sysb.close()
                    broker.close()
        out[scheme] = secure_cost(*runs)
        for side, run_ in zip(("plain", "secure"), runs):
            out[scheme][side]["devices_bytes_both_ways"] = run_["devices_bytes_both_ways"]
    return out


def fleet_rounds(devices: int, per_round: int, rounds: int, dropout: float, *, degree: int = 0,
                 threshold: int = 0) -> dict[str, Any]:
    """Part 5 for one dropout (module docstring); ``degree``, ``threshold``: the
    ``[secure_aggregation]`` options (0: the defaults)."""
    import tempfile
    from pathlib import Path

    import coordinator.secure as cs
    from benchmarks.scale import PLAN, TASK
    from fleet.fleet import Fleet, FleetSpec, Heterogeneity, cpu_seconds, min_processes, raise_nofile
    from fleet.launch import build_coordinator, coordinator_options, start_broker, write_toml

    phases: list[dict[str, float]] = []
    survivors: list[int] = []
    closed_round = cs.closed_round

    def recorded(closed, outcome, **kwargs):  # noqa: ANN001, ANN202 - closed_round's signature
        phases.append(dict(outcome.phase_s))
        survivors.append(len(outcome.survivors))
        return closed_round(closed, outcome, **kwargs)

    raise_nofile(devices + 2048)
    cs.closed_round = recorded  # type: ignore[assignment]
    out: dict[str, Any] = {"devices": devices, "per_round": per_round, "dropout": dropout, "degree": degree,
                           "threshold": threshold}
    try:
        with tempfile.TemporaryDirectory(prefix="fedmq-secagg-fleet-") as tmp:
            work = Path(tmp)
            broker = start_broker("mosquitto", work, mosquitto_conf="max_connections -1")
            try:
                spec = FleetSpec(broker_url=broker.url, federation="sa", task=TASK, devices=devices,
                                 processes=max(2, min_processes(devices)), seed=1, work_dir=work / "fleet",
                                 heterogeneity=Heterogeneity(compute_s=0.5, dropout=dropout, rejoin_s=5.0),
                                 network="threads")
                t0 = time.monotonic()
                with Fleet(spec) as fleet:
                    fleet.wait_connected(devices, 120.0 + devices / 20)
                    out["connect_s"] = round(time.monotonic() - t0, 1)
                    path = write_toml(work / "coordinator.toml", coordinator_options(
                        federation="sa", task=TASK, broker=broker, rounds=rounds, seed=1, state_dir=work / "coord",
                        evaluation_data=work / "fleet" / "test.npz", publish_onnx=False, plan=PLAN,
                        round={"devices_per_round": per_round, "over_selection": 1.0, "deadline_s": 90.0,
                               "min_devices": min(devices, fleet.connected()), "wait_for_devices_s": 30.0},
                        secure_aggregation={"enabled": True, "degree": degree, "threshold": threshold}))
                    coord = build_coordinator(path, environ={})
                    cpu0 = cpu_seconds()
                    result = coord.run()
                    cpu = cpu_seconds() - cpu0
                    fleet.stop()
            finally:
                broker.close()
    finally:
        cs.closed_round = closed_round  # type: ignore[assignment]
    recs = result.records
    out["rounds"] = [{"state": r.state, "accepted": r.accepted, "wall_s": round(r.wall_s, 2)} for r in recs]
    out["survivors"] = survivors
    out["coordinator_cpu_s_per_round"] = round(cpu / max(1, len(recs)), 2)
    names = sorted({n for p in phases for n in p})
    out["phase_s_median"] = {n: round(float(np.median([p[n] for p in phases if n in p])), 3) for n in names}
    out["test_accuracy"] = recs[-1].test_accuracy if recs else None
    return out


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--federation", action="store_true", help="part 3: secure rounds over mosquitto")
    parser.add_argument("--bus-round", action="store_true",
                        help="part 4: one secure round of --devices devices over the in-memory bus, 0%% and 30%% "
                             "dropout before unmasking (coordinator CPU, phase wall times)")
    parser.add_argument("--fleet", action="store_true",
                        help="part 5: secure rounds of fedmq fleet through mosquitto, 0%% and 30%% dropout")
    parser.add_argument("--data", default="digits", choices=("digits", "mnist"))
    parser.add_argument("--devices", type=int, default=10)
    parser.add_argument("--per-round", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--partitions", nargs="+", default=["iid", "dirichlet"], choices=("iid", "dirichlet"))
    parser.add_argument("--secure", type=json.loads, default=None,
                        help='the secure run\'s [secure_aggregation] table as JSON, e.g. \'{"ranking": "gradient"}\'')
    parser.add_argument("--degree", type=int, default=0, help="--fleet: [secure_aggregation] degree (0: default)")
    parser.add_argument("--threshold", type=int, default=0, help="--fleet: [secure_aggregation] threshold (0: default)")
    parser.add_argument("--secure-density", type=float, default=None, help="the secure run's plan density")
    args = parser.parse_args()
    if args.fleet:
        print(json.dumps([fleet_rounds(args.devices, args.per_round, args.rounds, f, degree=args.degree,
                                       threshold=args.threshold) for f in (0.0, 0.3)], indent=1))
    elif args.bus_round:
        print(json.dumps([bus_round(args.devices, dropout=f) for f in (0.0, 0.3)], indent=1))
    elif args.federation:
        print(json.dumps(federation(data=args.data, devices=args.devices, per_round=args.per_round,
                                    rounds=args.rounds, partitions=tuple(args.partitions), secure=args.secure,
                                    secure_density=args.secure_density), indent=1))
    else:
        print(json.dumps(run(), indent=1))
