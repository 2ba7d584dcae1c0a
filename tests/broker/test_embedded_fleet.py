"""The embedded development broker (amqtt, MQTT 3.1.1) carries what a fedmq federation
needs: fedmq's devices and coordinator connect with their credentials, a retained global
model reaches a device that subscribes late, and a device that dies leaves its last will
on its retained status."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import paho.mqtt.client as mqtt

from broker.launch import free_port
from fedmq.wire import topics

FED = "f1"
WAIT = 10.0

# A device in its own process, so that killing it drops the TCP connection without a
# DISCONNECT, as a crash or a power cut does.
_DEVICE = textwrap.dedent("""
    import queue, sys
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion
    port, will_topic = int(sys.argv[1]), sys.argv[2]
    events = queue.Queue()
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="dev-w", protocol=mqtt.MQTTv311)
    c.username_pw_set("dev-w", "pw")
    c.will_set(will_topic, b"offline", qos=1, retain=True)
    c.on_connect = lambda cl, u, f, rc, p: events.put(rc)
    c.connect("127.0.0.1", port, keepalive=30)
    c.loop_start()
    rc = events.get(timeout=10)
    info = c.publish(will_topic, b"online", qos=1, retain=True)
    info.wait_for_publish(timeout=10)
    print("ready" if not rc.is_failure and info.is_published() else f"failed {rc}", flush=True)
    sys.stdin.read()
""")


def test_embedded_broker_carries_retained_model_and_last_will(embedded_broker, peers):
    port = embedded_broker.port
    coord = peers(port, "coordinator", "pw", protocol=mqtt.MQTTv311)
    coord.connect_ok()
    coord.subscribe(topics.status_filter(FED))

    model = topics.model_blob(FED, 3)
    pointer = (topics.model_latest(FED), b"pointer-v3")
    chunk = (topics.blob_chunk(model, 0), bytes(range(256)) * 1024)  # 256 KiB, one fedmq chunk
    coord.publish(*chunk, retain=True)
    coord.publish(*pointer, retain=True)

    device = subprocess.Popen([sys.executable, "-c", _DEVICE, str(port), topics.status(FED, "dev-w")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert device.stdout.readline().strip() == "ready"
        assert coord.until(topics.status(FED, "dev-w"), b"online")
        device.kill()
        device.wait(timeout=WAIT)
    finally:
        if device.poll() is None:
            device.kill()
            device.wait(timeout=WAIT)
    assert coord.until(topics.status(FED, "dev-w"), b"offline")

    late = peers(port, "dev-late", "pw", protocol=mqtt.MQTTv311)
    late.connect_ok()
    late.subscribe(f"fedmq/{FED}/model/#", topics.status(FED, "dev-w"))
    got = {}
    while len(got) < 3:
        msg = late.messages.get(timeout=WAIT)
        got[msg.topic] = (msg.payload, msg.retain)
    assert got[pointer[0]] == (pointer[1], True)
    assert got[chunk[0]] == (chunk[1], True)
    assert got[topics.status(FED, "dev-w")] == (b"offline", True)


def test_fedmq_broker_run_serves_on_loopback(peers):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", "from broker.cli import app; app()", "run", "--port", str(port)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == f"fedmq-embedded-broker listening on 127.0.0.1:{port}"
        peer = peers(port, "dev1", "pw", protocol=mqtt.MQTTv311)
        peer.connect_ok()
        peer.subscribe(topics.round_announcement(FED))
        peer.publish(topics.round_announcement(FED), b"round-1")
        assert peer.until(topics.round_announcement(FED), b"round-1")
        peer.close()
    finally:
        proc.terminate()
        assert proc.wait(timeout=WAIT) == 0
