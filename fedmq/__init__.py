"""fedmq: federated learning for fleets of small devices over MQTT.

The shared library: wire format, codec, transport and tasks. It never imports
the apps (``coordinator``, ``edge_client``, ``broker``).
"""

__version__ = "0.1.0"

#: Version of the fedmq wire protocol carried in every message (see docs/wire-format.md).
PROTOCOL_VERSION = 1
