"""The wire format: control messages and their strict msgpack reader, the client-update envelope, the topic scheme (docs/wire-format.md)."""
