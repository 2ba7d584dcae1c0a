"""One error hierarchy for fedmq.

Every error fedmq raises on purpose derives from :class:`FedmqError`. Messages say
what was wrong, what was expected and where (topic, device, file path).
"""


class FedmqError(Exception):
    """Root of every error raised on purpose by fedmq."""


class ConfigError(FedmqError):
    """A configuration file or option is missing or invalid (message names the option or path)."""


class DataError(FedmqError):
    """A data set file is missing or corrupt (message names the path)."""


class WireError(FedmqError):
    """A message on the wire is malformed, oversized, of an unknown protocol version or
    inconsistent with the ParamSpec. Decoders raise only this (or a subclass)."""


class CodecError(WireError):
    """A compressed payload cannot be decoded against the ParamSpec."""


class SpecMismatchError(WireError):
    """A message was made for another model architecture (ParamSpec hash differs)."""


class TransportError(FedmqError):
    """The broker refused us, a publish could not be completed in time, or a transfer failed."""


class BrokerConnectError(TransportError):
    """The first connection to the broker failed; ``cause`` says why, the message names
    the broker URL and the underlying reason.

    ``cause`` is one of ``"refused"`` (nothing listens on the port), ``"unresolvable"``
    (the host name has no address), ``"unreachable"`` (no route, reset), ``"timeout"``
    (no answer / no CONNACK in time), ``"tls"`` (handshake failed: certificate verify
    failed, wrong host name, client certificate rejected), ``"not_authorised"`` (CONNACK
    reason 134 bad user name or password, or 135 not authorised) or ``"refused_by_broker"``
    (any other failing CONNACK reason code).
    """

    def __init__(self, message: str, cause: str, url: str) -> None:
        super().__init__(message)
        self.cause = cause
        self.url = url


class TransferError(TransportError):
    """A chunked transfer is inconsistent (hash mismatch, bad manifest, chunk out of range)."""


class StateError(FedmqError):
    """State on disk is missing, corrupt or from an incompatible version (message names the path)."""


class NonFiniteError(CodecError):
    """A client update (scales or dense float32 values) holds NaN or Inf."""
