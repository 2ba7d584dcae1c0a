"""sd_notify datagrams reach a real AF_UNIX socket, as systemd would receive them."""

from __future__ import annotations

import os
import socket

from edge_client.sdnotify import Notifier


def _listener(tmp_path):
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    return sock, path


def test_ready_watchdog_status_stopping_are_sent(tmp_path):
    sock, path = _listener(tmp_path)
    with sock:
        n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "20000000", "WATCHDOG_PID": str(os.getpid())})
        assert n.enabled and n.watchdog_interval == 10.0
        assert n.ready("online")
        assert sock.recv(4096) == b"READY=1\nSTATUS=online"
        assert n.watchdog()
        assert sock.recv(4096) == b"WATCHDOG=1"
        assert n.status("training round 3")
        assert sock.recv(4096) == b"STATUS=training round 3"
        assert n.stopping()
        assert sock.recv(4096) == b"STOPPING=1"


def test_abstract_namespace_socket():
    name = f"fedmq-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).ready()
        assert sock.recv(4096) == b"READY=1"


def test_outside_systemd_is_a_no_op_and_watchdog_for_other_pid_is_ignored(tmp_path):
    n = Notifier({})
    assert not n.enabled and n.watchdog_interval is None and not n.ready() and not n.watchdog()
    other = Notifier({"NOTIFY_SOCKET": str(tmp_path / "x.sock"), "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"})
    assert other.watchdog_interval is None
    # socket path does not exist: the notification is lost, never raised
    assert other.ready() is False
