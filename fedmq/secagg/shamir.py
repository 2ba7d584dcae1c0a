"""t-of-n Shamir secret sharing of 32-byte secrets over the prime field GF(2^521 - 1).

Shamir 1979, "How to share a secret". A secret (a self-mask seed or an X25519 private key,
32 bytes, so below 2^256 < p) is the constant term of a random polynomial of degree t - 1;
the share of the party at x (1 <= x < p) is the polynomial's value there. Any t shares give
the secret back by Lagrange interpolation at 0; t - 1 shares say nothing about it. The
coefficients come from :mod:`secrets`. p = 2^521 - 1 is a Mersenne prime.
"""

from __future__ import annotations

import secrets

from fedmq.errors import FedmqError

PRIME = 2**521 - 1
SECRET_BYTES = 32
#: Bytes of one share value (big-endian, below PRIME).
SHARE_BYTES = 66


class ShamirError(FedmqError):
    """Shares cannot give a secret: fewer than the threshold, repeated or invalid x."""


def split(secret: bytes, threshold: int, xs: list[int]) -> dict[int, int]:
    """Shares of a 32-byte ``secret`` for the parties at ``xs`` (distinct, 1 <= x < PRIME).

    Returns:
        x -> share value (an int below PRIME).

    Raises:
        ShamirError: ``threshold`` outside 1..len(xs), repeated or invalid x, or a secret
            that is not 32 bytes.
    """
    if len(secret) != SECRET_BYTES:
        raise ShamirError(f"a secret is {SECRET_BYTES} bytes, got {len(secret)}")
    if not 1 <= threshold <= len(xs) or len(set(xs)) != len(xs) or not all(0 < x < PRIME for x in xs):
        raise ShamirError(f"threshold {threshold} of {len(xs)} distinct x in 1..p-1 expected")
    coeffs = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = {}
    for x in xs:
        acc = 0
        for c in reversed(coeffs):  # Horner
            acc = (acc * x + c) % PRIME
        shares[x] = acc
    return shares


def combine(shares: dict[int, int], threshold: int) -> bytes:
    """The secret from at least ``threshold`` shares (x -> share), Lagrange at 0.

    Raises:
        ShamirError: fewer than ``threshold`` shares, or a secret that does not fit 32 bytes
            (shares of different secrets, or tampered).
    """
    if len(shares) < threshold:
        raise ShamirError(f"{len(shares)} shares, {threshold} needed")
    points = sorted(shares.items())[:threshold]
    secret = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                num = num * -xj % PRIME
                den = den * (xi - xj) % PRIME
        secret = (secret + yi * num * pow(den, -1, PRIME)) % PRIME
    if secret >= 1 << (8 * SECRET_BYTES):
        raise ShamirError("the shares do not combine to a 32-byte secret")
    return secret.to_bytes(SECRET_BYTES, "big")
