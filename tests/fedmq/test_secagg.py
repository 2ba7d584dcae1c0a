"""Secure aggregation core (fedmq.secagg): the unmasked sum is the exact integer sum after
dropouts, the round fails cleanly below the threshold, the coordinator never holds both kinds
of share of one device, the ring never wraps, the support is common and seeded."""

from __future__ import annotations

import numpy as np
import pytest

from fedmq.secagg import (AdvertisedKeys, RingError, RingSpec, RoundParams, SecAggClient, SecAggError, SecAggServer,
                          common_support, values_on_support)
from fedmq.secagg.protocol import UnmaskRequest, UnmaskResponse
from fedmq.secagg.shamir import ShamirError, combine, split

N, K = 20, 500
DEVICES = tuple(f"dev-{i:02d}" for i in range(N))
RING = RingSpec(clip=0.05, scale=2.0**16, max_devices=N)


def simulate(f_input: float = 0.0, f_unmask: float = 0.0, seed: int = 0):
    """A round of N devices: a share f_input drops after sharing keys (before its masked
    input), then a share f_unmask of the masked devices drops before unmasking."""
    params = RoundParams(round=7, devices=DEVICES, ring=RING, k=K, seed=seed)
    rng = np.random.default_rng(seed)
    inputs = {d: RING.quantize(rng.normal(0.0, 0.02, K)) for d in DEVICES}
    order = [DEVICES[i] for i in rng.permutation(N)]
    drop_input = set(order[:round(f_input * N)])
    clients = {d: SecAggClient(d, params) for d in DEVICES}
    server = SecAggServer(params)
    for c in clients.values():
        server.add_keys(c.advertise())
    keys = server.close_keys()
    for d, c in clients.items():
        server.add_shares(d, c.share_keys(keys))
    server.close_shares()
    for d, c in clients.items():
        if d not in drop_input:
            server.add_masked_input(d, c.masked_input(inputs[d], server.shares_for(d)))
    request = server.close_inputs()
    masked = [d for d in order if d in request.survivors]
    drop_unmask = set(masked[:round(f_unmask * len(masked))])
    for d in request.survivors:
        if d not in drop_unmask:
            server.add_unmask_response(clients[d].unmask(request))
    return server, inputs, request, clients


@pytest.mark.parametrize("f_input, f_unmask", [(0.0, 0.0), (0.0, 0.1), (0.0, 0.3), (0.3, 0.0), (0.1, 0.1)])
def test_unmasked_sum_is_the_exact_integer_sum_after_dropouts(f_input, f_unmask) -> None:
    server, inputs, request, _ = simulate(f_input, f_unmask)
    assert len(request.dropped) == round(f_input * N)
    expected = np.sum([inputs[d] for d in request.survivors], axis=0)
    np.testing.assert_array_equal(server.result(), expected)
    assert server.phase == "done"


def test_too_many_dropouts_fail_cleanly() -> None:
    # 20 devices: degree 19 (the complete graph), t = 7; 15 of 20 silent at the unmasking
    # leave 5 shares of each secret.
    server, _, _, _ = simulate(0.0, 0.75)
    with pytest.raises(SecAggError, match="cannot be rebuilt"):
        server.result()
    assert server.phase == "failed"
    # Fewer masked inputs than the threshold: the round fails before anything is unmasked.
    params = RoundParams(round=1, devices=DEVICES, ring=RING, k=K)
    clients = {d: SecAggClient(d, params) for d in DEVICES}
    server = SecAggServer(params)
    for c in clients.values():
        server.add_keys(c.advertise())
    keys = server.close_keys()
    for d, c in clients.items():
        server.add_shares(d, c.share_keys(keys))
    server.close_shares()
    for d in DEVICES[:params.threshold - 1]:
        server.add_masked_input(d, clients[d].masked_input(np.zeros(K, np.int64), server.shares_for(d)))
    with pytest.raises(SecAggError, match="nothing is aggregated"):
        server.close_inputs()
    assert server.phase == "failed" and server.request is None


def test_coordinator_sees_masked_inputs_and_never_both_kinds_of_share() -> None:
    server, inputs, request, clients = simulate(0.3, 0.1)
    for d, y in server.masked.items():
        # The coordinator's stored view of one device is not its update.
        assert np.mean(y == RING.encode(inputs[d])) < 0.01, d
    assert set(request.survivors).isdisjoint(request.dropped)
    assert set(server.b_shares) <= set(request.survivors) and set(server.s_shares) <= set(request.dropped)
    assert set(server.b_shares).isdisjoint(server.s_shares)
    # A request that names one device both ways is refused by every device.
    survivor = request.survivors[0]
    greedy = UnmaskRequest(request.survivors, request.dropped + (request.survivors[1],))
    with pytest.raises(SecAggError, match="both as survivor and as dropped"):
        clients[survivor].unmask(greedy)
    # And the coordinator does not take shares it did not ask for.
    fresh, _, req, fresh_clients = simulate(0.3, 1.0)
    answer = fresh_clients[req.survivors[0]].unmask(req)
    extra = UnmaskResponse(answer.device, answer.b_shares, {**answer.s_shares, req.survivors[1]: 1})
    with pytest.raises(SecAggError, match="did not ask for"):
        fresh.add_unmask_response(extra)


def test_messages_out_of_phase_or_from_outside_are_refused() -> None:
    params = RoundParams(round=2, devices=DEVICES, ring=RING, k=K)
    server = SecAggServer(params)
    client = SecAggClient(DEVICES[0], params)
    with pytest.raises(SecAggError, match="not a device of the round"):
        server.add_keys(AdvertisedKeys("intruder", b"", b""))
    with pytest.raises(SecAggError, match="in phase keys"):
        server.add_masked_input(DEVICES[0], np.zeros(K, np.uint64))
    with pytest.raises(SecAggError, match="not a device"):
        SecAggClient("intruder", params)
    with pytest.raises(SecAggError, match="input of shape"):
        client.masked_input(np.full(K, RING.qmax + 1, np.int64), {})


def test_ring_sum_never_wraps_at_the_extremes() -> None:
    ring = RingSpec(clip=1.0, scale=127.0, max_devices=1000)
    assert ring.qmax == 127 and (1 << (ring.bits - 1)) <= 2 * ring.bound < (1 << ring.bits)
    for sign in (1, -1):
        q = np.full(4, sign * ring.qmax, np.int64)
        total = np.zeros(4, np.uint64)
        for _ in range(ring.max_devices):
            total = (total + ring.encode(q)) & ring.mask
        np.testing.assert_array_equal(ring.decode_sum(total), q * ring.max_devices)
    assert ring.quantize(np.array([3.0, -3.0, 0.5]))[:2].tolist() == [127, -127]
    with pytest.raises(RingError, match="at most 63"):
        RingSpec(clip=1.0, scale=2.0**60, max_devices=100)


def test_shamir_any_t_shares_rebuild_the_secret_and_fewer_do_not() -> None:
    secret = bytes(range(32))
    shares = split(secret, 3, [1, 2, 5, 9])
    assert combine({x: shares[x] for x in (1, 5, 9)}, 3) == secret == combine({x: shares[x] for x in (2, 9, 1)}, 3)
    with pytest.raises(ShamirError, match="3 needed"):
        combine({1: shares[1], 2: shares[2]}, 3)


def test_common_support_is_seeded_and_keeps_the_largest_changes() -> None:
    size, k = 10_000, 100
    change = np.random.default_rng(3).normal(size=size).astype(np.float32)
    s = common_support(size, k, last_change=change, seed=1, round_=4)
    assert s.dtype == np.int64 and len(s) == k and np.all(np.diff(s) > 0)
    assert np.array_equal(s, common_support(size, k, last_change=change.copy(), seed=1, round_=4))
    top = np.argsort(-np.abs(change), kind="stable")[:90]
    assert set(top) <= set(s.tolist())
    assert not np.array_equal(s, common_support(size, k, last_change=change, seed=1, round_=5))
    first = common_support(size, k, last_change=None, seed=1, round_=1)
    assert len(np.unique(first)) == k


def test_values_on_support_leave_the_rest_in_the_residual() -> None:
    size = 1000
    vector = np.random.default_rng(0).normal(0.0, 0.02, size).astype(np.float32)
    vector[7] = 1.0  # beyond the clip: the excess stays on the device
    support = common_support(size, 50, last_change=np.abs(vector), seed=0, round_=1)
    q, sent = values_on_support(vector, support, RING)
    residual = vector - sent
    assert q.shape == (50,) and not sent[np.setdiff1d(np.arange(size), support)].any()
    np.testing.assert_array_equal(residual[np.setdiff1d(np.arange(size), support)],
                                  vector[np.setdiff1d(np.arange(size), support)])
    assert 7 in support and sent[7] == np.float32(RING.qmax / RING.scale) and residual[7] > 0.9
    assert np.abs(residual[support][np.abs(vector[support]) < RING.clip]).max() <= 0.5 / RING.scale + 1e-9
