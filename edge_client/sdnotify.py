"""systemd service notifications (sd_notify protocol) without extra dependencies.

Follows sd_notify(3): one datagram per message on the AF_UNIX socket named by
``$NOTIFY_SOCKET`` (a leading ``@`` means the Linux abstract namespace). The watchdog
period comes from ``$WATCHDOG_USEC`` (microseconds), honoured only when
``$WATCHDOG_PID`` is unset or names this process, as sd_watchdog_enabled(3) says.
Outside systemd (no ``$NOTIFY_SOCKET``) every call is a no-op returning False.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping


class Notifier:
    """Sends ``READY=1``, ``WATCHDOG=1``, ``STATUS=...`` and ``STOPPING=1`` to systemd.

    Args:
        environ: environment to read ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and
            ``WATCHDOG_PID`` from (default ``os.environ``).

    Attributes:
        watchdog_interval: seconds between watchdog pings (half of ``WatchdogSec=``, as
            sd_watchdog_enabled(3) advises), or None when no watchdog is asked for.
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        addr = env.get("NOTIFY_SOCKET") or None
        if addr and addr.startswith("@"):
            addr = "\0" + addr[1:]
        self._addr = addr
        self.watchdog_interval: float | None = None
        usec, pid = env.get("WATCHDOG_USEC"), env.get("WATCHDOG_PID")
        if addr and usec and usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_interval = int(usec) / 2e6

    @property
    def enabled(self) -> bool:
        """True when running under a service manager that listens for notifications."""
        return self._addr is not None

    def notify(self, message: str) -> bool:
        """Send one notification datagram, e.g. ``"READY=1\\nSTATUS=online"``.

        Returns:
            True when sent; False outside systemd or when the socket is gone (a lost
            notification must never stop the agent: systemd then restarts it by watchdog).
        """
        if self._addr is None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(message.encode("utf-8"), self._addr)
            return True
        except OSError:
            return False

    def ready(self, status: str = "") -> bool:
        return self.notify("READY=1" + (f"\nSTATUS={status}" if status else ""))

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text}")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")
