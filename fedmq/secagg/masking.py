"""Masks of SecAgg+ (Bell et al. 2020, "Secure Single-Server Aggregation with (Poly)Logarithmic
Overhead"): the sparse random graph of who masks with whom, the pseudo-random generator that
expands a 32-byte seed into ring elements, and the pairwise seed two devices agree on.

- Graph: a Harary graph H(degree, n) (each device joined to the degree/2 nearest on either
  side of a cycle) over a random order of the round's devices, the order drawn with
  ``default_rng([seed, round, 0x6A])`` from the public seed, so every party builds the same
  graph. Degree ``4 * ceil(log2 n)`` by default (SecAgg+'s O(log n)); at least n - 1 is the
  complete graph of the original SecAgg (Bonawitz et al. 2017).
- PRG: the ChaCha20 keystream (``cryptography``, 16-byte zero nonce) of the seed, read as
  little-endian uint64 and reduced mod 2^bits (2^bits divides 2^64: uniform).
- Pairwise seed: HKDF-SHA256 of the X25519 agreement of the two devices' mask keys, with
  info ``"fedmq secagg pairwise v1\\n" + round + "\\n" + u + "\\n" + v`` (u < v).
"""

from __future__ import annotations

import math

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

_NONCE = bytes(16)


def default_degree(n: int) -> int:
    """SecAgg+'s neighbours per device for n devices: 4 * ceil(log2 n), at most n - 1 (28 for
    100 devices: with t = degree // 3 + 1, a round of 100 completes at 30% dropout, where
    2 * ceil(log2 n) and t = degree // 2 + 1 failed every round; docs/security.md, "Sizing")."""
    return min(n - 1, 4 * math.ceil(math.log2(max(n, 2))))


def harary_graph(devices: tuple[str, ...], degree: int, *, seed: int, round_: int) -> dict[str, tuple[str, ...]]:
    """Device -> its neighbours (sorted), a Harary graph over a seeded random order.

    An odd degree below n - 1 is rounded up to the next even one.
    """
    n = len(devices)
    order = [devices[i] for i in np.random.default_rng([int(seed), int(round_), 0x6A]).permutation(n)]
    half = min((degree + 1) // 2, n // 2)
    out: dict[str, set[str]] = {d: set() for d in devices}
    for i, d in enumerate(order):
        for step in range(1, half + 1):
            for other in (order[(i + step) % n], order[(i - step) % n]):
                if other != d:
                    out[d].add(other)
    if degree >= n - 1:
        out = {d: set(devices) - {d} for d in devices}
    return {d: tuple(sorted(v)) for d, v in out.items()}


def prg(seed: bytes, count: int, mask: np.uint64) -> np.ndarray:
    """``count`` ring elements (uint64, ``& mask``) from a 32-byte seed: ChaCha20 keystream."""
    encryptor = Cipher(algorithms.ChaCha20(seed, _NONCE), mode=None).encryptor()
    return np.frombuffer(encryptor.update(bytes(8 * count)), dtype="<u8").astype(np.uint64) & mask


def pairwise_seed(own: X25519PrivateKey, peer: X25519PublicKey, round_: int, u: str, v: str) -> bytes:
    """The seed devices ``u`` and ``v`` share for round ``round_`` (either side computes it)."""
    a, b = sorted((u, v))
    info = f"fedmq secagg pairwise v1\n{round_}\n{a}\n{b}".encode()
    return HKDF(hashes.SHA256(), 32, salt=None, info=info).derive(own.exchange(peer))
