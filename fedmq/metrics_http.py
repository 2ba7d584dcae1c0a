"""A Prometheus metrics endpoint for one :class:`prometheus_client.CollectorRegistry`.

Both apps serve their metrics with :func:`serve_metrics`: one HTTP server on a daemon
thread, answering ``GET /metrics`` (any path, as prometheus_client does) in the Prometheus
text exposition format. Each coordinator or agent has its own registry, so several in
one process (tests, the simulator) never share or clash on a metric.
"""

from __future__ import annotations

import errno
import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server

from fedmq.errors import ConfigError


class MetricsServer:
    """A running metrics endpoint; :meth:`close` stops it (idempotent).

    Attributes:
        address: the address it is bound to; port: its TCP port (the real one when 0 was asked).
    """

    def __init__(self, server: WSGIServer, thread: threading.Thread) -> None:
        self._server: WSGIServer | None = server
        self._thread = thread
        self.address, self.port = server.server_address[:2]

    @property
    def url(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5.0)
        self._server = None


def serve_metrics(registry: CollectorRegistry, address: str, port: int, option: str) -> MetricsServer:
    """Serve ``registry`` on ``address:port`` (port 0: a free port the OS picks).

    Args:
        option: the configuration option that named the port (for the error message,
            e.g. ``metrics.port``).

    Raises:
        ConfigError: the address cannot be bound (in use, not an address of this host,
            not permitted), naming ``option``, the address and the OS's reason.
    """
    try:
        server, thread = start_http_server(port, address, registry)
    except OSError as exc:
        why = "address already in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
        raise ConfigError(f"{option}: cannot serve metrics on {address}:{port}: {why}") from None
    return MetricsServer(server, thread)
