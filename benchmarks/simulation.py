"""Federated rounds simulated in one process, with the services' own code.

The learning benchmarks drive a federation without a broker, for speed, but every step a
byte or a number goes through is the library code the services run:

- sampling: :func:`fedmq.fl.sampling.select_devices` (seeded per round, so runs with the
  same seed select the same devices, whatever their codec);
- device: :func:`fedmq.fl.training.train_local` from the global vector, then
  :class:`fedmq.feedback.ErrorFeedback` (or plain :func:`fedmq.codecs.encode` for the dense
  ``none`` codec), then :func:`fedmq.envelope.encode_update`: the bytes counted as uplink
  are the whole client-update envelope;
- coordinator: :func:`fedmq.envelope.decode_update`, :func:`fedmq.codecs.decode_sparse`,
  :class:`fedmq.fl.aggregation.WeightedMean` (sample-weighted), then
  :func:`fedmq.fl.aggregation.model_delta` and a server optimizer from
  :func:`fedmq.fl.server_opt.make_server_optimizer`;
- downlink: each selected device fetches the global model as the safetensors blob of
  :func:`fedmq.modelio.model_to_safetensors` (the retained model blob) plus its task
  message (:class:`fedmq.messages.Task`); devices not selected fetch nothing.

What is not simulated: MQTT itself (chunking, QoS, retained delivery), deadlines, late or
lost updates, and process boundaries. ``fedmq demo`` runs the same settings through a real
broker and separate processes (see :mod:`benchmarks.learning`, ``broker_comparison``).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from fedmq.fl.aggregation import WeightedMean, model_delta
from fedmq.fl.sampling import SelectionPolicy, select_devices
from fedmq.fl.server_opt import make_server_optimizer
from fedmq.fl.training import train_local
from fedmq import codec
from fedmq.envelope import ClientUpdate, decode_update, encode_update
from fedmq.feedback import ErrorFeedback
from fedmq.messages import Task, TrainPlan
from fedmq.modelio import model_to_safetensors
from fedmq.params import ParamSpec, flatten_params, load_params
from fedmq.tasks import evaluate, get_task

#: Federation id written into the simulated envelopes and tasks (counts towards their bytes).
FEDERATION = "bench"


@dataclass(frozen=True)
class FedSetup:
    """One simulated federation.

    Attributes:
        task: task name (:func:`fedmq.tasks.get_task`).
        devices: number of devices K; device k holds partition k.
        per_round: devices selected per round (uniform, without replacement, no over-selection).
        rounds: number of rounds.
        partition: ``iid`` or ``dirichlet`` (MNIST-10k partitions of ../shared/data/README.md).
        alpha: Dirichlet concentration (non-IID only).
        plan: the devices' training and codec settings (as sent in each task).
        server_optimizer: name for :func:`fedmq.fl.server_opt.make_server_optimizer`.
        server_lr: its ``eta``.
        seed: model initialisation, device sampling and local shuffling all derive from it.
        samples_per_device: keep only the first N samples of each partition (None: all);
            for the smoke case.
        test_samples: evaluate on the first N test samples (None: all 2,000).
    """

    task: str = "mnist-cnn"
    devices: int = 10
    per_round: int = 5
    rounds: int = 30
    partition: str = "iid"
    alpha: float = 0.5
    plan: TrainPlan = field(default_factory=TrainPlan)
    server_optimizer: str = "fedavg"
    server_lr: float = 1.0
    seed: int = 0
    samples_per_device: int | None = None
    test_samples: int | None = None

    def describe(self) -> dict[str, Any]:
        """JSON-friendly settings (the plan flattened in)."""
        d = asdict(self)
        d["plan"] = asdict(self.plan)
        return d


@dataclass
class FedData:
    """The split and partition a setup trains on: float32 x, int64 y (see fedmq.data)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    parts: list[np.ndarray]


def load_data(setup: FedSetup) -> FedData:
    """The task's split and the README partition of its train set over ``setup.devices``.

    Raises:
        DataError: the shared data set is missing or corrupt.
    """
    from fedmq.data import load_split, partition

    task = get_task(setup.task)
    x_tr, y_tr, x_te, y_te = load_split(task.dataset)
    parts = partition(y_tr, setup.devices, setup.partition, setup.alpha)
    if setup.samples_per_device is not None:
        parts = [p[:setup.samples_per_device] for p in parts]
    if setup.test_samples is not None:
        x_te, y_te = x_te[:setup.test_samples], y_te[:setup.test_samples]
    return FedData(x_tr, y_tr, x_te, y_te, parts)


def device_ids(k: int) -> list[str]:
    return [f"dev{i:03d}" for i in range(k)]


def _codec_config(plan: TrainPlan) -> codec.CodecConfig:
    return codec.CodecConfig.from_plan(plan)


def simulate(setup: FedSetup, data: FedData | None = None, *, target_accuracy: float | None = None) -> dict[str, Any]:
    """Run ``setup.rounds`` rounds and measure.

    Args:
        setup: the federation.
        data: preloaded data (else :func:`load_data`).
        target_accuracy: report the first round whose test accuracy reaches it (fraction).

    Returns:
        ``{"settings", "final_accuracy", "best_accuracy", "final_loss", "rounds_to_target",
        "bytes_up", "bytes_down", "payload_bytes_up", "seconds", "seconds_train",
        "seconds_codec", "seconds_eval", "history": [{"round", "accuracy", "loss",
        "bytes_up", "bytes_down", "selected"}]}``; accuracies are fractions in [0, 1],
        bytes are totals over the run, seconds wall-clock.
    """
    t_start = time.perf_counter()
    data = data if data is not None else load_data(setup)
    task = get_task(setup.task)
    plan = setup.plan.validate()
    config = _codec_config(plan)
    model = task.build_model(setup.seed)
    spec = ParamSpec.from_module(model)
    x = flatten_params(model, spec)
    opt = make_server_optimizer(setup.server_optimizer, eta=setup.server_lr)
    ids = device_ids(setup.devices)
    index = {d: i for i, d in enumerate(ids)}
    feedback = {d: ErrorFeedback(spec) for d in ids}
    participation = SelectionPolicy(devices_per_round=setup.per_round, over_selection=1.0)
    history: list[dict[str, Any]] = []
    totals = {"bytes_up": 0, "bytes_down": 0, "payload_bytes_up": 0}
    t_train = t_codec = t_eval = 0.0
    best, reached = 0.0, None
    for rnd in range(1, setup.rounds + 1):
        selected = select_devices(ids, participation, setup.seed, rnd)
        load_params(model, x, spec)
        model_blob = len(model_to_safetensors(model, {"round": str(rnd - 1)}))
        acc = WeightedMean(spec.size)
        up = down = 0
        for dev in selected:
            task_msg = Task(federation=FEDERATION, device=dev, round=rnd, model_version=rnd - 1,
                            spec_hash=spec.hash, deadline=0.0, plan=plan).to_bytes()
            down += model_blob + len(task_msg)
            part = data.parts[index[dev]]
            load_params(model, x, spec)
            t0 = time.perf_counter()
            result = train_local(model, data.x_train[part], data.y_train[part], plan, global_vector=x,
                                 rng=np.random.default_rng([setup.seed, rnd, index[dev]]),
                                 max_seconds=plan.max_seconds, x_val=None, y_val=None)
            t1 = time.perf_counter()
            if plan.codec == "none":
                payload = codec.encode(result.update, spec, config)
            else:
                payload, _sent = feedback[dev].compress(result.update, config, enabled=plan.error_feedback,
                                                        rng=np.random.default_rng([setup.seed, rnd, index[dev], 1]))
            envelope = encode_update(ClientUpdate(
                federation=FEDERATION, device=dev, round=rnd, base_version=rnd - 1, samples=int(result.samples),
                kind=plan.update_kind, spec_hash=spec.hash, codec=config.name, payload=payload,
                metrics={k: float(v) for k, v in (result.metrics or {}).items()}))
            received = decode_update(envelope, spec)
            acc.add(codec.decode_sparse(received.codec, received.payload, spec), received.samples)
            t_codec += time.perf_counter() - t1
            t_train += t1 - t0
            up += len(envelope)
            totals["payload_bytes_up"] += len(payload)
        opt.step(x, model_delta(acc.result(), plan.update_kind))
        t0 = time.perf_counter()
        load_params(model, x, spec)
        loss, accuracy = evaluate(model, data.x_test, data.y_test)
        t_eval += time.perf_counter() - t0
        totals["bytes_up"] += up
        totals["bytes_down"] += down
        best = max(best, accuracy)
        if reached is None and target_accuracy is not None and accuracy >= target_accuracy:
            reached = rnd
        history.append({"round": rnd, "accuracy": accuracy, "loss": loss, "bytes_up": up, "bytes_down": down,
                        "selected": selected})
    return {
        "settings": setup.describe(),
        "parameters": spec.size,
        "final_accuracy": history[-1]["accuracy"] if history else None,
        "final_loss": history[-1]["loss"] if history else None,
        "best_accuracy": best if history else None,
        "target_accuracy": target_accuracy,
        "rounds_to_target": reached,
        **totals,
        "seconds": time.perf_counter() - t_start,
        "seconds_train": t_train,
        "seconds_codec": t_codec,
        "seconds_eval": t_eval,
        "history": history,
    }


def with_codec(plan: TrainPlan, name: str, density: float = 0.01, error_feedback: bool = True) -> TrainPlan:
    """``plan`` with another codec setting (everything else, learning included, kept)."""
    return replace(plan, codec=name, density=density, error_feedback=error_feedback)
