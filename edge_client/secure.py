"""A device's side of secure rounds over MQTT (the coordinator's: :mod:`coordinator.secure`).

The device answers each coordinator message on ``fedmq/F/secagg-to/D`` with its own on
``fedmq/F/secagg/D/{kind}`` (maths: :mod:`fedmq.secagg`):

- ``sa_setup``: fresh keys for this attempt (:class:`fedmq.secagg.SecAggClient`), ``sa_keys``;
  ``sa_setup_dp`` likewise, and its input is clipped to the clip norm and carries its share
  of discrete Gaussian noise (:mod:`fedmq.privacy.discrete`);
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

import io
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from fedmq.wire import topics
from fedmq.storage.atomic import atomic_write_bytes
from fedmq.errors import StateError, WireError
from fedmq.secagg import AdvertisedKeys, RingSpec, RoundParams, SecAggClient, SecAggError, values_on_support
from fedmq.secagg import messages as sm
from fedmq.secagg.protocol import UnmaskRequest
from fedmq.secagg.shamir import SHARE_BYTES
from fedmq.privacy.discrete import discrete_gaussian, noise_headroom, sampler_available

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


#: Seconds after the masked inputs' deadline that an attempt counts as under way (the
#: unmasking and the result follow the deadline; a dropped device stops waiting then).
ACTIVE_AFTER_DEADLINE_S = 120.0
#: The unsettled masked input of a device, in its state folder.
PENDING_NAME = "secagg-pending.npz"


def save_pending(state_dir: Path, pending: Pending, residual: np.ndarray) -> None:
    """Write ``pending`` and the residual that holds if its input is in the sum (float32
    ``(size,)``) atomically, before the input is published: a device killed after that
    settles it by the retained result (no pickle: plain arrays, the ids as UTF-8 bytes)."""
    buf = io.BytesIO()
    np.savez(buf, sent=pending.sent, residual=residual, round=np.array([pending.round], dtype=np.int64),
             attempt=np.frombuffer(pending.attempt.encode(), dtype=np.uint8))
    atomic_write_bytes(Path(state_dir) / PENDING_NAME, buf.getbuffer())


def load_pending(state_dir: Path, size: int) -> tuple[Pending, np.ndarray] | None:
    """What :func:`save_pending` wrote, or None.

    Raises:
        StateError: the file is unreadable or holds arrays of another size.
    """
    path = Path(state_dir) / PENDING_NAME
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            pending = Pending(int(z["round"][0]), bytes(z["attempt"]).decode(), z["sent"].astype(np.float32))
            residual = z["residual"].astype(np.float32)
    except (OSError, ValueError, KeyError, UnicodeDecodeError) as exc:
        raise StateError(f"{path}: unreadable pending secure input ({exc})") from None
    if pending.sent.shape != (size,) or residual.shape != (size,):
        raise StateError(f"{path}: arrays of another model size than ({size},)")
    return pending, residual


def clear_pending(state_dir: Path) -> None:
    """Remove the file :func:`save_pending` wrote (once its input is settled)."""
    (Path(state_dir) / PENDING_NAME).unlink(missing_ok=True)


class Publisher(Protocol):
    """What the device publishes its answers with: a :class:`fedmq.transport.Link`, or the
    agent's connection (edge_client.connection), which follows the agent's current link."""

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> Any: ...


@dataclass
class _Attempt:
    """One attempt of a secure round, built whole from its setup: its keys (``client``), the
    common support and ring; the relayed shares and the unmasking request answered, as they come."""

    setup: sm.Setup
    ring: RingSpec
    client: SecAggClient
    support: np.ndarray
    relay: dict[str, bytes] | None = None
    answered: sm.Unmask | None = None


class SecureDevice:
    """Secure rounds of one device.

    Args:
        federation, device: ids.
        link: what the answers are published with (the device's link, connected by the time
            messages come); :meth:`handle` gets the payloads of
            ``topics.secagg_down(federation, device)``.
        size: the flat model's length.
        settle: called with ``(pending, in_sum)`` when a masked input is settled.
        sent: called with the pending input just before it is published (the caller makes it
            durable first: a device killed after that settles it by the retained result).
        pending: an unsettled input left by a previous run (the caller's durable state).
        refused: where refusals are counted, ``secagg_<reason>`` (a new Counter when None).
        pause: the agent's test hook, called ``(point, round)`` before each message goes out:
            ``secagg_keys``, ``secagg_shares``, ``secagg_input`` (the input durable, not
            published) and ``secagg_reveal``.
    """

    def __init__(self, federation: str, device: str, link: Publisher, *, size: int,
                 settle: Callable[[Pending, bool], None], sent: Callable[[Pending], None] = lambda _p: None,
                 pending: Pending | None = None, refused: Counter[str] | None = None,
                 pause: Callable[[str, int], None] = lambda _p, _r: None) -> None:
        self.pause = pause
        self.fed, self.device, self.link, self.size = federation, device, link, size
        self.settle, self.sent = settle, sent
        self.pending = pending
        self._attempt: _Attempt | None = None
        self._vector: tuple[int, np.ndarray] | None = None
        self.refused: Counter[str] = refused if refused is not None else Counter()

    @property
    def active(self) -> bool:
        """A secure attempt is under way: set up, its input not yet settled or its unmasking not
        yet answered, and its deadline less than :data:`ACTIVE_AFTER_DEADLINE_S` ago."""
        attempt = self._attempt
        return (attempt is not None and time.time() < attempt.setup.deadline + ACTIVE_AFTER_DEADLINE_S
                and (self.pending is not None or attempt.answered is None))

    # -- what the device feeds in ---------------------------------------------------------

    def provide(self, round_: int, vector: np.ndarray) -> None:
        """Round ``round_``'s input: float32 ``(size,)``, the residual plus the client update;
        the masked input goes out once the round's shares are relayed (a setup may come before
        or after)."""
        self._vector = (round_, np.asarray(vector, dtype=np.float32))
        self._maybe_input()

    def handle(self, payload: bytes) -> None:
        """One message from the coordinator; a malformed or out-of-attempt one is refused
        (logged and counted), never raised."""
        try:
            msg = sm.decode_downlink(payload)
            attempt = self._attempt
            if isinstance(msg, sm.Setup):
                self._on_setup(msg)
            elif isinstance(msg, sm.Result):
                self._on_result(msg)
            elif attempt is None or (msg.round, msg.attempt) != (attempt.setup.round, attempt.setup.attempt):
                self._refuse("stale", f"{msg.TYPE} of round {msg.round} attempt {msg.attempt}")
            elif isinstance(msg, sm.Neighbours):
                self._on_neighbours(attempt, msg)
            elif isinstance(msg, sm.Relay):
                attempt.relay = dict(msg.sealed)
                self._maybe_input()
            else:
                self._on_unmask(attempt, msg)
        except WireError as exc:
            self._refuse("malformed", str(exc))
        except SecAggError as exc:
            self._refuse("protocol", str(exc))

    # -- phases ---------------------------------------------------------------------------

    def _on_setup(self, msg: sm.Setup) -> None:
        current = self._attempt
        if current is not None and (msg.round, msg.attempt) == (current.setup.round, current.setup.attempt):
            return  # the same setup again (a resend): keep this attempt's keys
        if self.device not in msg.devices:
            self._refuse("not_selected", f"setup of round {msg.round} does not name {self.device}")
            return
        if self.pending is not None:
            # A new attempt before the result of ours: the coordinator abandoned it (a restart
            # reruns the round; its result would have come first on this topic).
            self._settle(self.pending, False)
        if msg.size != self.size:
            self._refuse("bad_support", f"round {msg.round}: support over {msg.size} coordinates, the model has "
                                        f"{self.size}")
            return
        noisy = isinstance(msg, sm.NoisySetup)
        if noisy and not sampler_available():
            self._refuse("no_noise_sampler", f"round {msg.round} is differentially private and this device cannot "
                                             f"draw its noise: pip install 'fedmq[dp]' (package opendp)")
            return
        support = msg.indices()
        ring = RingSpec(msg.clip, msg.scale, len(msg.devices), noise_headroom(msg.noise_std) if noisy else 0)
        params = RoundParams(msg.round, msg.devices, ring, msg.k, seed=msg.seed, degree=msg.degree,
                             threshold=msg.threshold)
        attempt = _Attempt(msg, ring, SecAggClient(self.device, params), support)
        self._attempt = attempt
        if self._vector is not None and self._vector[0] != msg.round:
            self._vector = None
        keys = attempt.client.advertise()
        self._send("keys", sm.Keys(msg.round, msg.attempt, keys.c_public, keys.s_public))

    def _on_neighbours(self, attempt: _Attempt, msg: sm.Neighbours) -> None:
        keys = {d: AdvertisedKeys(d, raw[:sm.KEY_BYTES], raw[sm.KEY_BYTES:]) for d, raw in msg.keys.items()}
        sealed = attempt.client.share_keys(keys)
        self._send("shares", sm.Shares(attempt.setup.round, attempt.setup.attempt, sealed))

    def _maybe_input(self) -> None:
        attempt = self._attempt
        if attempt is None or attempt.relay is None or self._vector is None or self.pending is not None:
            return
        setup = attempt.setup
        round_, vector = self._vector
        if round_ != setup.round:
            return
        if vector.shape != (self.size,):
            raise SecAggError(f"input of shape {vector.shape}, expected ({self.size},)")
        if isinstance(setup, sm.NoisySetup):
            # Differential privacy: the values clipped to the clip norm, then this device's
            # share of the discrete Gaussian noise, which never enters the residual (``sent``).
            q, sent = values_on_support(vector, attempt.support, attempt.ring, l2_clip=setup.clip)
            q = q + discrete_gaussian(setup.noise_std, q.size)
        else:
            q, sent = values_on_support(vector, attempt.support, attempt.ring)
        y = attempt.client.masked_input(q, attempt.relay)
        self.pending = Pending(setup.round, setup.attempt, sent)
        self.sent(self.pending)
        self._send("input", sm.MaskedInput.pack(setup.round, setup.attempt, y, attempt.ring.bits))

    def _on_unmask(self, attempt: _Attempt, msg: sm.Unmask) -> None:
        if attempt.answered is not None:
            if msg != attempt.answered:
                self._refuse("second_request", f"round {msg.round}: a second, different unmasking request")
            return
        response = attempt.client.unmask(UnmaskRequest(msg.survivors, msg.dropped))
        attempt.answered = msg

        def raw(shares: dict[str, int]) -> dict[str, bytes]:
            return {o: v.to_bytes(SHARE_BYTES, "big") for o, v in shares.items()}

        self._send("reveal", sm.Reveal(msg.round, msg.attempt, raw(response.b_shares), raw(response.s_shares)))

    def _on_result(self, msg: sm.Result) -> None:
        pending = self.pending
        if pending is None or (msg.round, msg.attempt) != (pending.round, pending.attempt):
            return  # a retained result of an attempt we have nothing pending in
        self._settle(pending, msg.state == "closed" and self.device in msg.survivors)

    def holds(self, round_: int) -> bool:
        """Whether this device holds round ``round_``'s input, not yet in a sum: a rerun of
        the round (a new attempt after a coordinator restart) takes the same input again,
        as a plain round's rerun takes the same bytes again."""
        return self._vector is not None and self._vector[0] == round_

    def _settle(self, pending: Pending, in_sum: bool) -> None:
        self.pending = None
        if in_sum:
            self._vector = None  # in the sum: nothing of it is to be sent again
        log.info("secure round %d (attempt %s): input %s", pending.round, pending.attempt,
                 "in the sum" if in_sum else "not aggregated: back into the residual")
        self.settle(pending, in_sum)

    # -- plumbing -------------------------------------------------------------------------

    def _send(self, kind: str, msg: sm.Keys | sm.Shares | sm.MaskedInput | sm.Reveal) -> None:
        self.pause(f"secagg_{kind}", msg.round)
        self.link.publish(topics.secagg_up(self.fed, self.device, kind), msg.to_bytes())

    def _refuse(self, reason: str, detail: str) -> None:
        self.refused[f"secagg_{reason}"] += 1
        log.warning("secure round message refused (%s): %s", reason, detail)
