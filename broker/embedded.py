"""Zero-setup development broker: amqtt (MQTT 3.1.1) on one loopback port.

For development, tests and the demo only; production fleets use mosquitto (MQTT 5,
ACLs, persistence). It allows anonymous clients, keeps retained messages and last wills
in memory (lost when it stops) and has no maximum packet size, so chunked blobs of any
chunk size pass. Clients must speak MQTT 3.1.1 to it (``BrokerSettings(protocol="3.1.1")``).

Run it with ``python -m broker.embedded --host 127.0.0.1 --port 1883`` (``fedmq broker run``
calls :func:`main`). It prints ``fedmq-embedded-broker listening on HOST:PORT`` to stdout
once the port accepts connections.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from typing import Any

from amqtt.broker import Broker

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 1883


def broker_config(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, *, allow_anonymous: bool = True) -> dict[str, Any]:
    """amqtt 0.12 broker configuration: one TCP listener, anonymous access, no $SYS tree.

    The packet-logger and $SYS plugins of amqtt's default configuration are left out:
    the first logs every packet (slow under chunked transfers), the second publishes
    broker statistics nobody here reads.
    """
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{int(port)}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": allow_anonymous}},
    }


class _Broker(Broker):
    """amqtt's broker with one fix.

    amqtt 0.12 sends, on every connection, the retained messages of *every* topic filter
    any client ever subscribed to (``for topic in self._subscriptions`` in
    ``_handle_client_session``): a device would receive model chunks and pointers it never
    asked for. Retained messages are only sent for the connecting session's own filters.
    """

    async def _publish_retained_messages_for_subscription(self, subscription: tuple[str, int],
                                                          session: Any) -> None:
        if any(s is session for s, _ in self._subscriptions.get(subscription[0], ())):
            await super()._publish_retained_messages_for_subscription(subscription, session)


async def serve(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, *, ready: asyncio.Event | None = None,
                stop: asyncio.Event | None = None) -> None:
    """Run the broker until ``stop`` is set (forever when ``stop`` is None).

    Raises:
        amqtt.errors.BrokerError: the port cannot be bound.
    """
    broker = _Broker(broker_config(host, port))
    await broker.start()
    if ready is not None:
        ready.set()
    stop = stop or asyncio.Event()
    try:
        await stop.wait()
    finally:
        await broker.shutdown()


def main(argv: list[str] | None = None) -> None:
    """Command line: ``python -m broker.embedded [--host H] [--port P] [--verbose]``.

    Stops cleanly on SIGINT or SIGTERM.
    """
    parser = argparse.ArgumentParser(prog="python -m broker.embedded", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default=DEFAULT_HOST, help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="TCP port (default 1883)")
    parser.add_argument("--verbose", action="store_true", help="log amqtt at INFO level")
    args = parser.parse_args(argv)
    run(args.host, args.port, verbose=args.verbose)


def run(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, *, verbose: bool = False) -> None:
    """Serve in the foreground until SIGINT / SIGTERM."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("transitions").setLevel(logging.WARNING)

    async def _main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        ready = asyncio.Event()
        task = asyncio.create_task(serve(host, port, ready=ready, stop=stop))
        ready_wait = asyncio.create_task(ready.wait())
        await asyncio.wait({task, ready_wait}, return_when=asyncio.FIRST_COMPLETED)
        if ready.is_set():
            print(f"fedmq-embedded-broker listening on {host}:{port}", flush=True)
        else:
            ready_wait.cancel()
        await task

    asyncio.run(_main())


if __name__ == "__main__":
    main()
