"""Transport benchmark: model distribution and client-update ingest through mosquitto on loopback.

- ``distribution``: one sender publishes a retained model blob (BlobSender, QoS 1,
  window 16) while 1 or 10 receivers download it (fetch_blob into a BlobReceiver);
  MB/s = model bytes / seconds from the first publish until the last receiver holds the
  verified blob (per receiver), and the aggregate delivered MB/s. Chunk sizes 64 KiB,
  256 KiB, 1 MiB. All receivers are threads of this process (one MqttLink each), so on
  a small machine they share one interpreter lock with the sender.
- ``ingest``: devices (threads, one link each) send ~20 KB client updates (inline blobs,
  one message each) to one coordinator link that feeds a BlobReceiver; updates/s from
  the first send until the coordinator holds every verified update.

``python -m benchmarks.transport [--full]`` prints the JSON of :func:`run`.
"""

from __future__ import annotations

import json
import os
import platform
import queue
import sys
import tempfile
import threading
import time
from pathlib import Path

from broker.launch import start_mosquitto
from fedmq.wire import topics
from fedmq.transport import BlobReceiver, BlobSender, BrokerSettings, MqttLink, fetch_blob

MiB = 1024 * 1024
#: Queue settings of broker/mosquitto.conf (mosquitto's defaults, 20 in flight and 1,000
#: queued per client, drop a busy coordinator's QoS 1 messages while publishers see success).
BROKER_CONF = "max_inflight_messages 100\nmax_queued_messages 20000\n"
FED = "bench"


def _distribution(url: str, size: int, chunk: int, receivers: int, version: int) -> dict:
    settings = BrokerSettings(url=url, max_chunk=chunk)
    sender_link = MqttLink(settings, "bench-coordinator").connect()
    links = [MqttLink(settings, f"bench-dev{i}").connect() for i in range(receivers)]
    data = os.urandom(size)
    base = topics.model_blob(FED, version)
    done: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    start = threading.Event()

    def receive(link: MqttLink) -> None:
        start.wait()
        try:
            blob = fetch_blob(link, base, timeout=300, receiver=BlobReceiver(timeout=300), refetch_after=5.0)
            ok = blob.data == data
        except Exception as exc:  # reported in the result, the benchmark goes on
            errors.append(repr(exc))
            return
        with lock:
            done.append(time.perf_counter())
            if not ok:
                errors.append("corrupt blob delivered")

    threads = [threading.Thread(target=receive, args=(link,), daemon=True) for link in links]
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    start.set()
    info = BlobSender(sender_link, chunk_size=chunk).send(base, data, retain=True, timeout=300)
    sent = time.perf_counter() - t0
    for t in threads:
        t.join(330)
    for link in links + [sender_link]:
        link.close()
    elapsed = (max(done) - t0) if len(done) == receivers else float("nan")
    return {"chunk_kib": chunk // 1024, "receivers": receivers, "model_mib": size / MiB, "chunks": info.count,
            "send_s": round(sent, 3), "all_received_s": round(elapsed, 3),
            "per_receiver_mb_s": round(size / 1e6 / elapsed, 1),
            "aggregate_mb_s": round(size * receivers / 1e6 / elapsed, 1), "errors": errors}


def _ingest(url: str, updates: int, size: int, devices: int) -> dict:
    settings = BrokerSettings(url=url)
    coordinator = MqttLink(settings, "bench-ingest").connect()
    coordinator.subscribe(topics.update_filter(FED))
    receiver = BlobReceiver(timeout=300)
    payloads = [os.urandom(size) for _ in range(8)]
    per_device = updates // devices
    total = per_device * devices
    got = 0
    last = [time.perf_counter()]
    finished = threading.Event()

    def consume() -> None:
        nonlocal got
        while got < total:
            try:
                msg = coordinator.inbox.get(timeout=10)
            except queue.Empty:  # the broker dropped the rest (its queue for us overflowed)
                break
            if receiver.feed(msg.topic, msg.payload) is not None:
                got += 1
                last[0] = time.perf_counter()
        finished.set()

    def send(i: int, link: MqttLink) -> None:
        sender = BlobSender(link, keep=0)
        for k in range(per_device):
            sender.send(topics.update_base(FED, f"d{i}", f"t{k}"), payloads[k % len(payloads)], timeout=120)

    links = [MqttLink(settings, f"bench-d{i}").connect() for i in range(devices)]
    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    senders = [threading.Thread(target=send, args=(i, link), daemon=True) for i, link in enumerate(links)]
    t0 = time.perf_counter()
    for t in senders:
        t.start()
    finished.wait(600)
    for t in senders:
        t.join(60)
    elapsed = last[0] - t0
    for link in links + [coordinator]:
        link.close()
    return {"updates": total, "delivered": got, "update_kib": size / 1024, "devices": devices,
            "seconds": round(elapsed, 3), "updates_per_s": round(got / elapsed, 1),
            "bad_messages": receiver.stats["bad_messages"]}


def run(quick: bool) -> dict:
    """Run the benchmark; ``quick`` uses an 8 MiB model and 2,000 updates (full: 32 MiB, 10,000)."""
    size = 8 * MiB if quick else 32 * MiB
    with tempfile.TemporaryDirectory(prefix="fedmq-bench-") as tmp:
        broker = start_mosquitto(Path(tmp), extra_conf=BROKER_CONF)
        try:
            results = []
            version = 0
            for chunk in (64 * 1024, 256 * 1024, MiB):
                for receivers in (1, 10):
                    version += 1
                    results.append(_distribution(broker.url, size, chunk, receivers, version))
            ingest = _ingest(broker.url, 2000 if quick else 10_000, 20 * 1024, 8)
        finally:
            broker.stop()
    return {"suite": "transport", "quick": quick, "broker": "mosquitto 2 on loopback, " + BROKER_CONF.strip().replace("\n", ", "),
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
            "distribution": results, "ingest": ingest}


if __name__ == "__main__":
    print(json.dumps(run(quick="--full" not in sys.argv[1:]), indent=2))
