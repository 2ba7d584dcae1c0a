"""The phases of a secure round as pure state objects (no MQTT yet): SecAgg with SecAgg+'s
sparse graph (Bonawitz et al. 2017, "Practical Secure Aggregation for Privacy-Preserving
Machine Learning", section 4 in its honest-but-curious form; Bell et al. 2020, SecAgg+).

Sets of devices, as in the paper: U1 advertised keys, U2 sent their shares, U3 sent their
masked input, U4 answered the unmasking request.

1. **Advertise keys** (:meth:`SecAggClient.advertise`): two X25519 public keys per device, c
   (share encryption) and s (mask agreement).
2. **Share keys** (:meth:`SecAggClient.share_keys`): t-of-degree Shamir shares of the self-mask
   seed b_u and of the mask private key s_u for each neighbour in U1, each sealed to that
   neighbour's c key with HPKE (RFC 9180; info binds round, sender and recipient): the server
   relays ciphertexts it cannot open.
3. **Masked input** (:meth:`SecAggClient.masked_input`): y_u = x_u + PRG(b_u) + sum over
   neighbours v in U2 of +PRG(s_uv) (u < v) or -PRG(s_uv) (u > v), mod 2^bits, on the round's
   common support (fedmq.secagg.support) in the fixed-point ring (fedmq.secagg.ring).
4. **Unmasking** (:meth:`SecAggServer.close_inputs` gives the request): survivors U3 and dropped
   U2 \\ U3, disjoint by construction; each device in U3 reveals the b shares it holds for
   survivors and the s shares it holds for dropped devices, and refuses a request naming one
   device in both (the server would learn x_u). The server reconstructs each survivor's b_u and
   each dropped device's s key, removes PRG(b_u) and the dropped devices' pairwise masks, and
   gets the exact integer sum of U3's inputs.

A round fails cleanly (:class:`SecAggError`, phase ``failed``, no sum) when fewer than t
devices sent masked inputs or any secret the unmasking needs has fewer than t shares.

Sizing: a survivor's self-mask seed needs t of its degree neighbours to answer the unmasking,
so degree and t follow the expected dropout and the collusion to resist (Bell et al. 2020,
section 4). The defaults, degree 4 ceil(log2 n) and t = degree // 3 + 1 (28 and 10 for 100
devices), complete rounds of 100 at 30% dropout (`fedmq fleet`, benchmarks/secagg.py); the
earlier 2 ceil(log2 n) and t = degree // 2 + 1 failed every such round. A threshold above
half the degree also resists a coordinator that equivocates (tells some neighbours a device
dropped and others that it survived, to collect both kinds of its shares); the defaults
assume the honest-but-curious coordinator of docs/security.md and trade that for dropout.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from fedmq.errors import FedmqError
from fedmq.secagg.masking import default_degree, harary_graph, pairwise_seed, prg
from fedmq.secagg.ring import RingSpec
from fedmq.secagg.shamir import PRIME, SHARE_BYTES, ShamirError, combine, split

_SUITE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.CHACHA20_POLY1305)
_RAW = (serialization.Encoding.Raw, serialization.PublicFormat.Raw)


class SecAggError(FedmqError):
    """A secure round cannot go on: a message out of phase or from outside the round, a request
    that would reveal one device's input, or too few devices or shares (the round fails)."""


def _raw(key: X25519PublicKey) -> bytes:
    return key.public_bytes(*_RAW)


@dataclass(frozen=True)
class RoundParams:
    """What every party of a secure round knows before it starts.

    Attributes:
        round: the round number.
        devices: the selected devices, sorted and distinct (their order gives the Shamir x:
            index + 1).
        ring: the fixed-point ring (its ``max_devices`` at least ``len(devices)``).
        k: common-support size (values per input).
        seed: the public seed of the graph.
        degree: neighbours per device (default :func:`default_degree`).
        threshold: shares that rebuild a secret, t (default: the smallest neighbourhood // 3 + 1).
    """

    round: int
    devices: tuple[str, ...]
    ring: RingSpec
    k: int
    seed: int = 0
    degree: int = 0
    threshold: int = 0

    def __post_init__(self) -> None:
        n = len(self.devices)
        if n < 2 or tuple(sorted(set(self.devices))) != self.devices or self.ring.max_devices < n or self.k < 1:
            raise SecAggError(f"round {self.round}: at least 2 sorted distinct devices, a ring for them and k >= 1 "
                              f"expected")
        object.__setattr__(self, "degree", self.degree or default_degree(n))
        smallest = min(len(v) for v in self.graph.values())
        object.__setattr__(self, "threshold", self.threshold or smallest // 3 + 1)
        if not 1 <= self.threshold <= smallest:
            raise SecAggError(f"threshold {self.threshold} outside 1..{smallest} (the smallest neighbourhood)")

    @cached_property
    def graph(self) -> dict[str, tuple[str, ...]]:
        return harary_graph(self.devices, self.degree, seed=self.seed, round_=self.round)

    def neighbours(self, device: str) -> tuple[str, ...]:
        return self.graph[device]

    def x_of(self, device: str) -> int:
        return self.devices.index(device) + 1


@dataclass(frozen=True)
class AdvertisedKeys:
    """Phase 1: a device's two raw X25519 public keys (32 bytes each)."""

    device: str
    c_public: bytes
    s_public: bytes


@dataclass(frozen=True)
class UnmaskRequest:
    """Phase 4's request: ``survivors`` (U3, their b shares) and ``dropped`` (U2 \\ U3, their s shares)."""

    survivors: tuple[str, ...]
    dropped: tuple[str, ...]


@dataclass(frozen=True)
class UnmaskResponse:
    """A survivor's shares: owner -> share value, b shares of survivors, s shares of dropped."""

    device: str
    b_shares: dict[str, int]
    s_shares: dict[str, int]


def _info(round_: int, sender: str, recipient: str) -> bytes:
    return f"fedmq secagg shares v1\n{round_}\n{sender}\n{recipient}".encode()


class SecAggClient:
    """One device's side of a secure round (its secrets never leave it but as shares)."""

    def __init__(self, device: str, params: RoundParams) -> None:
        if device not in params.devices:
            raise SecAggError(f"{device!r} is not a device of round {params.round}")
        self.device, self.params = device, params
        self._c = X25519PrivateKey.generate()
        self._s = X25519PrivateKey.generate()
        self._b = secrets.token_bytes(32)
        self._keys: dict[str, AdvertisedKeys] = {}
        self._held: dict[str, tuple[int, int]] = {}

    def advertise(self) -> AdvertisedKeys:
        """Phase 1."""
        return AdvertisedKeys(self.device, _raw(self._c.public_key()), _raw(self._s.public_key()))

    def share_keys(self, keys: Mapping[str, AdvertisedKeys]) -> dict[str, bytes]:
        """Phase 2: sealed shares for each neighbour in U1 (``keys``: U1's advertised keys).

        Returns:
            recipient -> ciphertext (HPKE, 132 bytes of shares + 48).

        Raises:
            SecAggError: fewer than t neighbours advertised keys.
        """
        p = self.params
        self._keys = dict(keys)
        neighbours = [v for v in p.neighbours(self.device) if v in keys]
        if len(neighbours) < p.threshold:
            raise SecAggError(f"round {p.round}: {self.device} has {len(neighbours)} neighbours with keys, "
                              f"{p.threshold} needed")
        xs = [p.x_of(v) for v in neighbours]
        s_raw = self._s.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                      serialization.NoEncryption())
        b_shares, s_shares = split(self._b, p.threshold, xs), split(s_raw, p.threshold, xs)
        return {v: _SUITE.encrypt(b_shares[x].to_bytes(SHARE_BYTES, "big") + s_shares[x].to_bytes(SHARE_BYTES, "big"),
                                  X25519PublicKey.from_public_bytes(keys[v].c_public),
                                  info=_info(p.round, self.device, v))
                for v, x in zip(neighbours, xs)}

    def masked_input(self, q: np.ndarray, shares: Mapping[str, bytes]) -> np.ndarray:
        """Phase 3: the masked input, uint64 ``(k,)`` in [0, 2^bits).

        Args:
            q: this device's integers on the common support, int64 ``(k,)``, |q| <= qmax + noise
                (the ring's noise headroom: differential privacy's discrete Gaussian noise)
                (:meth:`RingSpec.quantize`).
            shares: the ciphertexts addressed to this device, by sender (the neighbours in U2).

        Raises:
            SecAggError: a share from outside the neighbourhood or that does not open, or q of
                the wrong shape or range.
        """
        p, ring = self.params, self.params.ring
        if q.shape != (p.k,) or int(np.abs(q).max(initial=0)) > ring.qmax + ring.noise:
            raise SecAggError(f"round {p.round}: input of shape {q.shape}, |q| <= {ring.qmax + ring.noise} and "
                              f"({p.k},) expected")
        for sender, ct in shares.items():
            if sender not in p.neighbours(self.device) or sender not in self._keys:
                raise SecAggError(f"round {p.round}: shares from {sender!r}, not a neighbour of {self.device}")
            try:
                plain = _SUITE.decrypt(ct, self._c, info=_info(p.round, sender, self.device))
            except InvalidTag:
                raise SecAggError(f"round {p.round}: shares from {sender!r} do not open") from None
            self._held[sender] = (int.from_bytes(plain[:SHARE_BYTES], "big"),
                                  int.from_bytes(plain[SHARE_BYTES:], "big"))
        y = ring.encode(q) + prg(self._b, p.k, ring.mask)
        for v in sorted(shares):
            mask = prg(pairwise_seed(self._s, X25519PublicKey.from_public_bytes(self._keys[v].s_public), p.round,
                                     self.device, v), p.k, ring.mask)
            y = y + mask if self.device < v else y - mask
        return y & ring.mask

    def unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        """Phase 4: the shares the request asks of this device.

        Raises:
            SecAggError: the request names a device both as survivor and as dropped (it would
                reveal that device's input), or does not list this device as a survivor.
        """
        both = set(request.survivors) & set(request.dropped)
        if both:
            raise SecAggError(f"round {self.params.round}: unmasking request names {sorted(both)} both as survivor "
                              f"and as dropped: refused")
        if self.device not in request.survivors:
            raise SecAggError(f"round {self.params.round}: {self.device} is not a survivor of the request")
        return UnmaskResponse(self.device,
                              {u: b for u, (b, _) in self._held.items() if u in request.survivors},
                              {u: s for u, (_, s) in self._held.items() if u in request.dropped})


@dataclass
class SecAggServer:
    """The coordinator's side: relays, collects, unmasks. Holds masked inputs and the shares
    the request asked for, never both kinds of share of one device."""

    params: RoundParams
    phase: str = "keys"
    keys: dict[str, AdvertisedKeys] = field(default_factory=dict)
    shared: set[str] = field(default_factory=set)
    masked: dict[str, np.ndarray] = field(default_factory=dict)
    request: UnmaskRequest | None = None
    b_shares: dict[str, dict[int, int]] = field(default_factory=dict)
    s_shares: dict[str, dict[int, int]] = field(default_factory=dict)
    _mailbox: dict[str, dict[str, bytes]] = field(default_factory=dict)

    def _expect(self, phase: str, device: str) -> None:
        if self.phase != phase:
            raise SecAggError(f"round {self.params.round}: {device!r} sent a {phase} message in phase {self.phase}")
        if device not in self.params.devices:
            raise SecAggError(f"round {self.params.round}: {device!r} is not a device of the round")

    def add_keys(self, keys: AdvertisedKeys) -> None:
        self._expect("keys", keys.device)
        self.keys[keys.device] = keys

    def close_keys(self) -> dict[str, AdvertisedKeys]:
        """End of phase 1: U1's keys, for every device of U1."""
        self._check_enough(len(self.keys), "advertised keys")
        self.phase = "shares"
        return dict(self.keys)

    def add_shares(self, device: str, ciphertexts: Mapping[str, bytes]) -> None:
        self._expect("shares", device)
        expected = {v for v in self.params.neighbours(device) if v in self.keys}
        if device not in self.keys or set(ciphertexts) != expected:
            raise SecAggError(f"round {self.params.round}: {device!r} must send shares to exactly its neighbours in U1")
        for recipient, ct in ciphertexts.items():
            self._mailbox.setdefault(recipient, {})[device] = ct
        self.shared.add(device)

    def close_shares(self) -> None:
        """End of phase 2: U2 fixed."""
        self._check_enough(len(self.shared), "shared their keys")
        self.phase = "input"

    def shares_for(self, device: str) -> dict[str, bytes]:
        """The ciphertexts for ``device`` from senders in U2 (the server cannot open them)."""
        return {u: ct for u, ct in self._mailbox.get(device, {}).items() if u in self.shared}

    def add_masked_input(self, device: str, y: np.ndarray) -> None:
        self._expect("input", device)
        p = self.params
        if device not in self.shared or y.dtype != np.uint64 or y.shape != (p.k,) or bool((y > p.ring.mask).any()):
            raise SecAggError(f"round {p.round}: masked input from {device!r} refused (not in U2, or not uint64 "
                              f"({p.k},) in the ring)")
        self.masked[device] = y

    def close_inputs(self) -> UnmaskRequest:
        """End of phase 3: U3 fixed; the unmasking request (survivors and dropped, disjoint)."""
        self._check_enough(len(self.masked), "sent masked inputs")
        self.request = UnmaskRequest(tuple(sorted(self.masked)), tuple(sorted(self.shared - set(self.masked))))
        self.phase = "unmask"
        return self.request

    def add_unmask_response(self, response: UnmaskResponse) -> None:
        self._expect("unmask", response.device)
        assert self.request is not None
        if response.device not in self.request.survivors or not set(response.b_shares) <= set(self.request.survivors) \
                or not set(response.s_shares) <= set(self.request.dropped):
            raise SecAggError(f"round {self.params.round}: unmasking response of {response.device!r} holds shares "
                              f"the request did not ask for")
        if not all(0 <= v < PRIME for v in (*response.b_shares.values(), *response.s_shares.values())):
            raise SecAggError(f"round {self.params.round}: unmasking response of {response.device!r} holds a share "
                              f"outside the field")
        x = self.params.x_of(response.device)
        for owner, share in response.b_shares.items():
            self.b_shares.setdefault(owner, {})[x] = share
        for owner, share in response.s_shares.items():
            self.s_shares.setdefault(owner, {})[x] = share

    def result(self) -> np.ndarray:
        """The exact integer sum of U3's inputs, int64 ``(k,)``.

        Raises:
            SecAggError: a survivor's b or a dropped device's s key has fewer than t shares,
                or its shares do not rebuild the advertised key (the round fails: phase
                ``failed``, no sum).
        """
        p, ring = self.params, self.params.ring
        assert self.request is not None and self.phase == "unmask"
        try:
            total = np.zeros(p.k, dtype=np.uint64)
            for u in self.request.survivors:
                total = total + self.masked[u] - prg(self._secret(self.b_shares, u, "self-mask seed"), p.k, ring.mask)
            for v in self.request.dropped:
                s_key = X25519PrivateKey.from_private_bytes(self._secret(self.s_shares, v, "mask key"))
                if _raw(s_key.public_key()) != self.keys[v].s_public:
                    raise SecAggError(f"round {p.round}: the shares of {v}'s mask key rebuild another key")
                for u in p.neighbours(v):
                    if u in self.masked:
                        mask = prg(pairwise_seed(s_key, X25519PublicKey.from_public_bytes(self.keys[u].s_public),
                                                 p.round, v, u), p.k, ring.mask)
                        # u added +mask when u < v, -mask otherwise: take it back out.
                        total = total - mask if u < v else total + mask
        except SecAggError:
            self.phase = "failed"
            raise
        self.phase = "done"
        return ring.decode_sum(total & ring.mask)

    def _secret(self, shares: dict[str, dict[int, int]], owner: str, what: str) -> bytes:
        try:
            return combine(shares.get(owner, {}), self.params.threshold)
        except ShamirError as exc:
            raise SecAggError(f"round {self.params.round}: {owner}'s {what} cannot be rebuilt ({exc})") from None

    def _check_enough(self, count: int, what: str) -> None:
        if count < self.params.threshold:
            self.phase = "failed"
            raise SecAggError(f"round {self.params.round}: {count} devices {what}, {self.params.threshold} needed: "
                              f"the round fails, nothing is aggregated")
