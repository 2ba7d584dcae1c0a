"""A device's side of secure rounds over MQTT (the coordinator's: :mod:`coordinator.secure`).

The device answers each coordinator message on ``fedmq/F/secagg-to/D`` with its own on
``fedmq/F/secagg/D/{kind}`` (maths: :mod:`fedmq.secagg`):

- ``sa_setup``: fresh keys for this attempt (:class:`fedmq.secagg.SecAggClient`), ``sa_keys``;
- ``sa_neighbours``: its t-of-degree shares sealed to each neighbour, ``sa_shares``;
- ``sa_relay`` (the shares sealed to it) and its input (:meth:`SecureDevice.provide`: the
  residual plus this round's update): the values on the round's common support in the ring,
  masked, ``sa_input``; what they stand for (``sent``) is what leaves its residual;
- ``sa_unmask``: the shares asked for, ``sa_reveal``; it refuses a request naming one device
  both as survivor and as dropped, and any second request of one attempt that differs from
  the first (so the coordinator never gets both kinds of share of one device);
- ``sa_result`` (retained): ``closed`` with the device among the survivors settles its input
  as sent (the residual keeps only what was not sent); anything else (``failed``, not a
  survivor, or a setup of a later attempt before any result: the attempt was abandoned by a
  restarted coordinator) puts ``sent`` back into the residual.

The secrets of an attempt live in memory only: a device killed during a round is a dropout
of that attempt, and its own unsettled input is settled by the retained result when it
comes back (:class:`Pending` is what its caller keeps on disk).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fedmq import topics
from fedmq.errors import WireError
from fedmq.secagg import (AdvertisedKeys, RingSpec, RoundParams, SecAggClient, SecAggError, common_support,
                          values_on_support)
from fedmq.secagg import messages as sm
from fedmq.secagg.protocol import UnmaskRequest
from fedmq.secagg.shamir import SHARE_BYTES
from fedmq.transport import Link

log = logging.getLogger("fedmq.edge.secure")


@dataclass(frozen=True)
class Pending:
    """A masked input sent and not yet settled.

    Attributes:
        round, attempt: its round and attempt.
        sent: float32 ``(size,)``, what the input stands for (zero off the support): taken out
            of the residual when the result says it is in the sum, put back otherwise.
    """

    round: int
    attempt: str
    sent: np.ndarray


class SecureDevice:
    """Secure rounds of one device.

    Args:
        federation, device: ids.
        link: the device's connected link; :meth:`handle` gets the payloads of
            ``topics.secagg_down(federation, device)``.
        last_change: returns the last global model step for a round, float32 ``(size,)`` or
            None (as the coordinator computes it: the common support derives from it).
        size: the flat model's length.
        settle: called with ``(pending, in_sum)`` when a masked input is settled.
        pending: an unsettled input left by a previous run (the caller's durable state).
    """

    def __init__(self, federation: str, device: str, link: Link, *, size: int,
                 last_change: Callable[[int], np.ndarray | None], settle: Callable[[Pending, bool], None],
                 pending: Pending | None = None) -> None:
        self.fed, self.device, self.link, self.size = federation, device, link, size
        self.last_change, self.settle = last_change, settle
        self.pending = pending
        self.setup: sm.Setup | None = None
        self.client: SecAggClient | None = None
        self.support: np.ndarray | None = None
        self.ring: RingSpec | None = None
        self._relay: dict[str, bytes] | None = None
        self._vector: np.ndarray | None = None
        self._answered: sm.Unmask | None = None
        #: Refusals by reason (the caller counts them into its metrics).
        self.refused: dict[str, int] = {}

    # -- what the device feeds in ---------------------------------------------------------

    def provide(self, vector: np.ndarray) -> None:
        """This round's input: float32 ``(size,)``, the residual plus the client update; the
        masked input goes out once the shares are relayed."""
        self._vector = np.asarray(vector, dtype=np.float32)
        self._maybe_input()

    def handle(self, payload: bytes) -> None:
        """One message from the coordinator; a malformed or out-of-attempt one is refused
        (logged and counted), never raised."""
        try:
            msg = sm.decode_downlink(payload)
            if isinstance(msg, sm.Setup):
                self._on_setup(msg)
            elif isinstance(msg, sm.Result):
                self._on_result(msg)
            elif self.setup is None or (msg.round, msg.attempt) != (self.setup.round, self.setup.attempt):
                self._refuse("stale", f"{msg.TYPE} of round {msg.round} attempt {msg.attempt}")
            elif isinstance(msg, sm.Neighbours):
                self._on_neighbours(msg)
            elif isinstance(msg, sm.Relay):
                self._relay = dict(msg.sealed)
                self._maybe_input()
            else:
                self._on_unmask(msg)
        except WireError as exc:
            self._refuse("malformed", str(exc))
        except SecAggError as exc:
            self._refuse("protocol", str(exc))

    # -- phases ---------------------------------------------------------------------------

    def _on_setup(self, msg: sm.Setup) -> None:
        if self.setup is not None and (msg.round, msg.attempt) == (self.setup.round, self.setup.attempt):
            return  # the same setup again (a resend): keep this attempt's keys
        if self.device not in msg.devices:
            self._refuse("not_selected", f"setup of round {msg.round} does not name {self.device}")
            return
        if self.pending is not None:
            # A new attempt before the result of ours: the coordinator abandoned it (a restart
            # reruns the round; its result would have come first on this topic).
            self._settle(False)
        ring = RingSpec(msg.clip, msg.scale, len(msg.devices))
        params = RoundParams(msg.round, msg.devices, ring, msg.k, seed=msg.seed, degree=msg.degree,
                             threshold=msg.threshold)
        self.setup, self.ring, self.client = msg, ring, SecAggClient(self.device, params)
        self.support = common_support(self.size, msg.k, last_change=self.last_change(msg.round), seed=msg.seed,
                                      round_=msg.round, explore=msg.explore)
        self._relay, self._vector, self._answered = None, None, None
        keys = self.client.advertise()
        self._send("keys", sm.Keys(msg.round, msg.attempt, keys.c_public, keys.s_public))

    def _on_neighbours(self, msg: sm.Neighbours) -> None:
        assert self.client is not None and self.setup is not None
        keys = {d: AdvertisedKeys(d, raw[:sm.KEY_BYTES], raw[sm.KEY_BYTES:]) for d, raw in msg.keys.items()}
        sealed = self.client.share_keys(keys)
        self._send("shares", sm.Shares(self.setup.round, self.setup.attempt, sealed))

    def _maybe_input(self) -> None:
        if self._relay is None or self._vector is None or self.client is None or self.pending is not None:
            return
        assert self.setup is not None and self.support is not None and self.ring is not None
        if self._vector.shape != (self.size,):
            raise SecAggError(f"input of shape {self._vector.shape}, expected ({self.size},)")
        q, sent = values_on_support(self._vector, self.support, self.ring)
        y = self.client.masked_input(q, self._relay)
        self.pending = Pending(self.setup.round, self.setup.attempt, sent)
        self._send("input", sm.MaskedInput(self.setup.round, self.setup.attempt, y.astype("<u8").tobytes()))

    def _on_unmask(self, msg: sm.Unmask) -> None:
        assert self.client is not None and self.setup is not None
        if self._answered is not None:
            if msg != self._answered:
                self._refuse("second_request", f"round {msg.round}: a second, different unmasking request")
            return
        response = self.client.unmask(UnmaskRequest(msg.survivors, msg.dropped))
        self._answered = msg

        def raw(shares: dict[str, int]) -> dict[str, bytes]:
            return {o: v.to_bytes(SHARE_BYTES, "big") for o, v in shares.items()}

        self._send("reveal", sm.Reveal(msg.round, msg.attempt, raw(response.b_shares), raw(response.s_shares)))

    def _on_result(self, msg: sm.Result) -> None:
        if self.pending is None or (msg.round, msg.attempt) != (self.pending.round, self.pending.attempt):
            return  # a retained result of an attempt we have nothing pending in
        self._settle(msg.state == "closed" and self.device in msg.survivors)

    def _settle(self, in_sum: bool) -> None:
        assert self.pending is not None
        pending, self.pending = self.pending, None
        log.info("secure round %d (attempt %s): input %s", pending.round, pending.attempt,
                 "in the sum" if in_sum else "not aggregated: back into the residual")
        self.settle(pending, in_sum)

    # -- plumbing -------------------------------------------------------------------------

    def _send(self, kind: str, msg: sm.Keys | sm.Shares | sm.MaskedInput | sm.Reveal) -> None:
        self.link.publish(topics.secagg_up(self.fed, self.device, kind), msg.to_bytes())

    def _refuse(self, reason: str, detail: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1
        log.warning("secure round message refused (%s): %s", reason, detail)
