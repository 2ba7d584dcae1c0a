"""fedmq transport: MQTT link, broker settings and chunked, verified blob transfers.

Modules, one concern each:

- :mod:`~fedmq.transport.settings`: :class:`BrokerSettings` (URL, protocol, credential and
  TLS files, session, backoff, chunk size), :func:`parse_broker_url`.
- :mod:`~fedmq.transport.base`: the :class:`Link` protocol, :class:`Will`, :class:`Message`,
  and the registry of links by the broker URL's scheme (:func:`register_link`).
- :mod:`~fedmq.transport.cluster`: :class:`RetainedFanoutLink`, retained publishes to every
  node of a cluster that keeps them per node.
- :mod:`~fedmq.transport.opening`: :func:`open_link`, which picks a link by the broker
  URL's scheme (and wraps it for a cluster).
- :mod:`~fedmq.transport.link`: :class:`MqttLink` over paho-mqtt 2.x (reconnect, inbox
  queue, broker's Maximum Packet Size honoured): ``mqtt://``, ``mqtts://``.
- :mod:`~fedmq.transport.memory`: :class:`MemoryBus` / :class:`MemoryLink`, an in-process
  bus with MQTT's semantics for tests and the simulator: ``memory://NAME``.
- :mod:`~fedmq.transport.wire`: blob :class:`Manifest`, chunk header, :class:`TransferRequest`.
- :mod:`~fedmq.transport.sender`: :class:`BlobSender` (windowed QoS 1 chunks, resend).
- :mod:`~fedmq.transport.receiver`: :class:`BlobReceiver` (verify, dedupe, expire, resume).
- :mod:`~fedmq.transport.spool`: the receiver's disk spool.
- :mod:`~fedmq.transport.flows`: :func:`publish_model`, :func:`fetch_model`,
  :func:`fetch_blob`, :func:`clear_blob`, :func:`request_repairs`.

Byte formats and topics: docs/wire-format.md.
"""

from fedmq.transport.base import Link, Message, Will, link_schemes, register_link
from fedmq.transport.flows import clear_blob, fetch_blob, fetch_model, publish_model, request_repairs
from fedmq.transport.link import MqttLink, Publish, publish_packet_size
from fedmq.transport.memory import MemoryBus, MemoryLink, get_bus, memory_link
from fedmq.transport.opening import open_link
from fedmq.transport.receiver import BlobReceiver, CompletedBlob, StalledTransfer
from fedmq.transport.sender import BlobInfo, BlobSender
from fedmq.transport.settings import DEFAULT_MAX_CHUNK, BrokerSettings, parse_broker_url, read_secret
from fedmq.transport.wire import Manifest, TransferRequest

for _scheme, _tls in (("mqtt", False), ("tcp", False), ("mqtts", True), ("ssl", True)):
    register_link(_scheme, MqttLink, tls=_tls)
register_link("memory", memory_link)

__all__ = [
    "Link", "MemoryBus", "MemoryLink", "get_bus", "link_schemes", "memory_link", "open_link", "register_link",
    "DEFAULT_MAX_CHUNK", "BlobInfo", "BlobReceiver", "BlobSender", "BrokerSettings", "CompletedBlob", "Manifest",
    "Message", "MqttLink", "Publish", "StalledTransfer", "TransferRequest", "Will", "clear_blob", "fetch_blob",
    "fetch_model", "parse_broker_url", "publish_model", "publish_packet_size", "read_secret", "request_repairs",
]
