"""A test-side device process speaking the real protocol (transport, codec, envelope).

Its client update is a pure function of (device, round): ``0.01 * normal`` drawn from
``default_rng([crc32(device), round])``, encoded with the task's codec settings, so a
rerun round gets the same updates and a test can compute the expected global model.

Modes: ``good``; ``silent`` (online, never answers); ``garbage`` (random bytes as the
update); ``nan`` (a dense payload with a NaN); ``impostor`` (claims to be ``good-0``).

Usage: python tests/coordinator/sim_device.py URL PROTOCOL FED DEVICE MODE TASK SAMPLES
"""

from __future__ import annotations

import os
from dataclasses import replace
import queue
import sys
import zlib

import numpy as np

from fedmq.wire import topics
from fedmq.codecs import CodecSpec, encode
from fedmq.wire.envelope import ClientUpdate, encode_update
from fedmq.fl.feedback import ErrorFeedback
from fedmq.fl.client import package_update
from fedmq.fl.training import LocalResult
from fedmq.wire.messages import Status, RoundTask
from fedmq.model.params import ParamSpec
from fedmq.tasks import get_task
from fedmq.transport.link import Message, MqttLink, Will
from fedmq.transport.sender import BlobSender
from fedmq.transport.settings import BrokerSettings


def update_vector(device: str, round_: int, size: int) -> np.ndarray:
    rng = np.random.default_rng([zlib.crc32(device.encode()), round_])
    return (0.01 * rng.normal(size=size)).astype(np.float32)


def client_update(fed: str, device: str, task: RoundTask, spec: ParamSpec, samples: int, mode: str) -> bytes:
    """The envelope this device sends for ``task``: the product's client-update pipeline on
    :func:`update_vector` (a fresh residual, so what is sent is the update itself), or, in
    the attacking modes, bytes built by hand."""
    if mode == "garbage":
        return os.urandom(300)
    if mode == "nan":
        payload = bytearray(encode(np.zeros(spec.size, np.float32), spec, CodecSpec.of(name="none")))
        payload[0:4] = np.array([np.nan], np.float32).tobytes()
        return encode_update(ClientUpdate(federation=fed, device=device, round=task.round,
                                          base_version=task.model_version, samples=samples,
                                          kind=task.plan.update_kind, spec_hash=spec.hash, codec="none",
                                          payload=bytes(payload), metrics={}))
    vector = update_vector(device, task.round, spec.size)
    if mode == "huge":
        # Finite but enormous (values near 3e36): only a norm bound stops it.
        vector = np.full(spec.size, 3e36, np.float32)
    if mode == "overweight":
        samples = 2**63 - 1  # from its own credentials, otherwise valid
    result = LocalResult(vector, task.plan.update_kind, samples, 1, 1, 0.0, {"train_loss": 1.0 + min(samples, 10**6) / 1000})
    claimed = "good-0" if mode == "impostor" else device
    plan = task.plan if mode != "huge" else replace(task.plan, codec=CodecSpec("none"), error_feedback=False)
    return package_update(result, replace(task, plan=plan), federation=fed, device=claimed, spec=spec,
                          feedback=ErrorFeedback(spec), seed=0).data


def main(url: str, protocol: str, fed: str, device: str, mode: str, task_name: str, samples: str) -> None:
    spec = ParamSpec.from_module(get_task(task_name).build_model(0))
    n = int(samples)
    offline = Status(device, False, task_name, spec.hash, n).to_bytes()
    link = MqttLink(BrokerSettings(url=url, protocol=protocol), client_id=device,
                    will=Will(topics.status(fed, device), offline))
    link.connect()
    inbox: queue.SimpleQueue[Message] = queue.SimpleQueue()
    link.subscribe([topics.task(fed, device), topics.transfer_requests(fed, device)], inbox=inbox)
    link.publish_wait(topics.status(fed, device), Status(device, True, task_name, spec.hash, n).to_bytes(),
                      retain=True)
    sender = BlobSender(link)
    print("ready", flush=True)
    answered: set[tuple[int, float]] = set()
    while True:
        msg = inbox.get()
        if msg.topic == topics.transfer_requests(fed, device):
            sender.handle_request(msg.payload)
            continue
        if not msg.payload:
            continue
        task = RoundTask.from_bytes(msg.payload)
        # A rerun round (coordinator restarted) sends a new task for the same round number.
        if (task.round, task.deadline) in answered or mode == "silent":
            continue
        answered.add((task.round, task.deadline))
        data = client_update(fed, device, task, spec, n, mode)
        sender.send(topics.update_base(fed, device, f"r{task.round}-{os.urandom(4).hex()}"), data, round_=task.round)


if __name__ == "__main__":
    main(*sys.argv[1:8])
