"""Secure aggregation: correctness under dropout, mask hiding, Shamir, codec, graph."""

from __future__ import annotations

import itertools
import math
import os

import numpy as np
import pytest

from benchmarks.secagg_driver import run_secagg_round
from common.secagg import (
    FixedPointCodec,
    SecAggAbort,
    SecAggClient,
    SecAggParams,
    SecAggProtocolError,
    SecAggServer,
    VectorPacker,
    default_neighbours,
)
from common.secagg_crypto import (
    SHAMIR_PRIME,
    MaskExpander,
    _interpolate_at_zero,
    neighbour_graph,
    shamir_combine,
    shamir_split,
)


def _vectors(n: int, d: int, seed: int = 0, scale: float = 1.0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    # Flower-like 64-bit node ids: the protocol must not assume 0..N-1.
    ids = rng.choice(2**62, size=n, replace=False)
    return {int(i): rng.uniform(-scale, scale, d).astype(np.float32) for i in ids}


def _plain(vectors, ids) -> np.ndarray:
    return np.sum([vectors[i].astype(np.float64) for i in ids], axis=0)


# ------------------------------------------------------------------ round correctness


def _keyed_session(ids, length, **kwargs):
    """A session through stages 0 and 1 (keys advertised, shares exchanged)."""
    params = SecAggParams.create(ids, length, **kwargs)
    server = SecAggServer(params)
    setup = server.setup_message()
    clients = {i: SecAggClient(i, setup) for i in ids}
    for i, c in clients.items():
        server.receive_keys(i, c.advertise_keys())
    for i, m in server.share_keys_messages().items():
        server.receive_shares(i, clients[i].share_keys(m))
    return params, server, clients


@pytest.mark.parametrize("drop_frac", [0.0, 0.3])
@pytest.mark.parametrize("neighbours", [None, 6], ids=["full", "sparse-k6"])
def test_masked_sum_matches_plain_sum(drop_frac, neighbours):
    vecs = _vectors(10, 5000, seed=1)
    ids = sorted(vecs)
    # 3 dropped out of 10 with k=6, t=4: pick dropouts every neighbourhood can absorb.
    params = SecAggParams.create(ids, 5000, neighbours=9 if neighbours is None else neighbours, threshold=4 if neighbours else 5)
    n_drop = int(round(drop_frac * len(ids)))
    dropped = _droppable(params, n_drop)
    result = run_secagg_round(vecs, params, drop_after_shares=dropped)

    assert set(result.dropped) == set(dropped)
    assert set(result.survivors) == set(ids) - set(dropped)
    expected = _plain(vecs, result.survivors)
    bound = params.codec.error_bound(len(result.survivors))
    err = np.abs(result.sum - expected).max()
    assert err <= bound
    if n_drop:  # the dropped clients' inputs must really be absent, not silently summed
        assert np.abs(result.sum - _plain(vecs, ids)).max() > 1e-3


def _droppable(params: SecAggParams, n_drop: int) -> list[int]:
    """``n_drop`` clients whose loss leaves every neighbourhood >= t (first such set found)."""
    for chosen in itertools.combinations(params.node_ids, n_drop):
        alive = set(params.node_ids) - set(chosen)
        if all(len(params.neighbours_of(i) & alive) >= params.threshold for i in params.node_ids):
            return list(chosen)
    raise AssertionError("test setup: no tolerable dropout set")


def test_dropouts_at_every_stage_still_sum_correctly():
    vecs = _vectors(12, 2000, seed=2)
    ids = sorted(vecs)
    params = SecAggParams.create(ids, 2000, neighbours=11, threshold=6)
    result = run_secagg_round(
        vecs,
        params,
        drop_before_keys=[ids[0]],
        drop_after_keys=[ids[1]],
        drop_after_shares=[ids[2], ids[3]],
        drop_before_unmask=[ids[4]],  # masked input arrived: it must still be counted
    )
    assert result.survivors == tuple(ids[4:])
    assert result.dropped == (ids[2], ids[3])
    err = np.abs(result.sum - _plain(vecs, result.survivors)).max()
    assert err <= params.codec.error_bound(len(result.survivors))


def test_deterministic_rounding_meets_tighter_bound():
    vecs = _vectors(6, 3000, seed=3, scale=2.0)
    params = SecAggParams.create(sorted(vecs), 3000, clip_range=2.0, stochastic_rounding=False, modulus_bits=24)
    result = run_secagg_round(vecs, params)
    codec = params.codec
    err = np.abs(result.sum - _plain(vecs, result.survivors)).max()
    assert err <= codec.error_bound(6) == pytest.approx(6 * codec.step / 2, rel=1e-6)
    assert err > 0.25 * codec.step  # a coarse 24-bit grid really quantises


def test_uint64_modulus_round():
    vecs = _vectors(5, 1000, seed=4)
    params = SecAggParams.create(sorted(vecs), 1000, modulus_bits=48)
    result = run_secagg_round(vecs, params)
    assert result.modular_sum.dtype == np.uint64
    assert int(result.modular_sum.max()) < 2**48
    assert np.abs(result.sum - _plain(vecs, result.survivors)).max() <= params.codec.error_bound(5)


@pytest.mark.parametrize("bits", [56, 60, 64])
def test_moduli_beyond_float64_precision_decode_exactly(bits):
    """From 54 bits on, the grid used to outgrow float64: +R encoded one float
    ulp above the top level and five such inputs wrapped the modulus (5 x +1.0
    decoded to -5). The grid is now capped at 2**53 levels, so the extra bits
    are headroom, and the decoder works on exact integers."""
    ids = [1, 2, 3, 4, 5]
    for value in (1.0, -1.0, 0.999999, 0.0):
        for stochastic in (False, True):
            params = SecAggParams.create(ids, 4, modulus_bits=bits, clip_range=1.0, stochastic_rounding=stochastic)
            result = run_secagg_round({i: np.full(4, value) for i in ids}, params)
            assert np.abs(result.sum - 5 * value).max() <= params.codec.error_bound(5)
    codec = FixedPointCodec(1.0, bits, 5, stochastic=False)
    top = codec.encode(np.ones(3)).values
    assert int(top.max()) <= codec.levels and 5 * int(top.max()) < codec.modulus
    vecs = _vectors(6, 2000, seed=11)
    params = SecAggParams.create(sorted(vecs), 2000, modulus_bits=bits)
    result = run_secagg_round(vecs, params)
    assert result.modular_sum.dtype == np.uint64
    assert np.abs(result.sum - _plain(vecs, result.survivors)).max() <= params.codec.error_bound(6)


def test_packed_segments_sum_in_one_round():
    rng = np.random.default_rng(5)
    n = 7
    packer = VectorPacker(
        {"delta": ((40, 25), 0.5), "persona": ((8,), 1.0), "counts": ((8,), 1000.0)}, max_summands=n
    )
    ids = list(range(100, 100 + n))
    inputs = {
        i: {
            "delta": rng.uniform(-0.5, 0.5, (40, 25)),
            "persona": rng.uniform(-1, 1, 8),
            "counts": rng.integers(0, 100, 8).astype(float),
        }
        for i in ids
    }
    encoded = {i: packer.encode(inputs[i], rng)[0] for i in ids}
    params = SecAggParams.create(ids, packer.size, max_summands=n)
    result = run_secagg_round(encoded, params, encoded=True)
    sums = packer.decode_sum(result.modular_sum, len(result.survivors))
    bounds = packer.error_bounds(n)
    for name in ("delta", "persona", "counts"):
        expected = np.sum([inputs[i][name] for i in ids], axis=0)
        assert sums[name].shape == expected.shape
        assert np.abs(sums[name] - expected).max() <= bounds[name]
    assert np.allclose(sums["counts"], np.sum([inputs[i]["counts"] for i in ids], axis=0), atol=1e-2)


def test_full_size_update_n5_with_a_dropout():
    # The round's time is a benchmark figure (benchmarks/secagg_overhead.py), never a test assertion.
    vecs = _vectors(5, 460_800, seed=6, scale=0.05)
    params = SecAggParams.create(sorted(vecs), 460_800, neighbours=4, threshold=3)
    result = run_secagg_round(vecs, params, drop_after_shares=[sorted(vecs)[0]])
    assert len(result.survivors) == 4
    assert np.abs(result.sum - _plain(vecs, result.survivors)).max() <= params.codec.error_bound(4)


# ------------------------------------------------------------------------ hiding


def test_single_masked_vector_looks_uniform_and_uncorrelated():
    d = 20_000
    ids = [11, 22, 33, 44, 55]
    # A highly structured input: a ramp. Unmasked, its encoding is a ramp too.
    ramp = np.linspace(-1, 1, d, dtype=np.float32)
    params, server, clients = _keyed_session(ids, d)
    msgs = server.masked_input_messages()
    y = clients[ids[0]].masked_input(msgs[ids[0]], ramp)
    enc = params.codec.encode(ramp, np.random.default_rng(0)).values

    # Chi-square over 64 equal bins of [0, 2**32): uniform words give ~63 +- 11.
    counts = np.bincount((y >> np.uint32(26)).astype(np.int64), minlength=64)
    chi2 = ((counts - d / 64) ** 2 / (d / 64)).sum()
    assert chi2 < 120
    enc_counts = np.bincount((enc >> np.uint32(26)).astype(np.int64), minlength=64)
    assert ((enc_counts - d / 64) ** 2 / (d / 64)).sum() > 1000  # the check can tell structure apart

    corr = np.corrcoef(y.astype(np.float64), ramp.astype(np.float64))[0, 1]
    assert abs(corr) < 5 / math.sqrt(d)
    assert abs(np.corrcoef(enc.astype(np.float64), ramp)[0, 1]) > 0.99


def test_mask_prg_is_uniform_and_seed_dependent():
    prg = MaskExpander(50_000, 20)
    a = prg.expand(b"\x01" * 32).copy()
    b = prg.expand(b"\x02" * 32).copy()
    assert a.max() < 2**20 and not np.array_equal(a, b)
    assert np.array_equal(a, prg.expand(b"\x01" * 32))  # both parties must derive the same mask
    counts = np.bincount(a >> np.uint32(14), minlength=64)
    assert ((counts - a.size / 64) ** 2 / (a.size / 64)).sum() < 130


# -------------------------------------------------------------------- dropouts


def test_too_many_dropouts_raises():
    vecs = _vectors(10, 500, seed=7)
    ids = sorted(vecs)
    params = SecAggParams.create(ids, 500, neighbours=9, threshold=6)
    with pytest.raises(SecAggAbort, match="too many dropouts"):
        run_secagg_round(vecs, params, drop_after_shares=ids[:4])  # 5 neighbours left < 6


def test_too_many_unmask_dropouts_raises():
    vecs = _vectors(6, 500, seed=8)
    ids = sorted(vecs)
    params = SecAggParams.create(ids, 500, neighbours=5, threshold=4, min_survivors=3)
    # All inputs arrived, but only 3 clients answer the unmask request: 3 shares < t.
    with pytest.raises(SecAggAbort, match="unmasking"):
        run_secagg_round(vecs, params, drop_before_unmask=ids[:3])


def test_client_refuses_inconsistent_unmask_request():
    ids = [1, 2, 3, 4]
    params, server, clients = _keyed_session(ids, 10, neighbours=3, threshold=2)
    for i, m in server.masked_input_messages().items():
        clients[i].masked_input(m, np.zeros(10))
    with pytest.raises(SecAggProtocolError, match="overlap"):
        clients[1].unmask({"stage": "unmask", "session_id": params.session_id, "survivors": [1, 2, 3], "dropped": [3, 4]})
    with pytest.raises(SecAggProtocolError, match="stage"):  # a replayed stage
        clients[2].share_keys({"stage": "share_keys", "session_id": params.session_id, "ids": [], "c_pks": [], "s_pks": []})


def test_threshold_must_exceed_half_the_neighbourhood():
    """With t <= k/2 two disjoint halves of a neighbourhood each hold t shares:
    the server could ask one half for a client's self-mask seed and the other
    for its mask key, and unmask that client without any colluder."""
    ids = list(range(1, 11))
    for k, t in ((8, 4), (8, 2), (4, 2), (9, 4)):
        with pytest.raises(ValueError, match="threshold"):
            SecAggParams.create(ids, 10, neighbours=k, threshold=t)
    assert SecAggParams.create(ids, 10, neighbours=8, threshold=5).threshold == 5
    assert SecAggParams.create(ids, 10, neighbours=8).threshold == 5  # default k//2 + 1
    # A client checks the setup message itself: it cannot rely on the server's params.
    setup = SecAggServer(SecAggParams.create(ids, 10, neighbours=8, threshold=5)).setup_message()
    with pytest.raises(SecAggProtocolError, match="threshold"):
        SecAggClient(ids[0], {**setup, "threshold": 4})
    SecAggClient(ids[0], setup)


def test_every_stage_message_and_reply_carries_and_checks_the_session_id():
    """A message from another (e.g. an earlier) session is refused by both
    sides, and refusing it does not consume the stage."""
    ids = [1, 2, 3, 4, 5]
    params = SecAggParams.create(ids, 10)
    sid, other = params.session_id, SecAggParams.create(ids, 10).session_id
    server = SecAggServer(params)
    setup = server.setup_message()
    assert setup["session_id"] == sid
    clients = {i: SecAggClient(i, setup) for i in ids}

    def stale(msg):
        return {**msg, "session_id": other}

    def both(deliver, msg, *args):
        """``deliver`` refuses ``msg`` from another session or without one, then accepts it."""
        for bad in (stale(msg), {k: v for k, v in msg.items() if k != "session_id"}):
            with pytest.raises(SecAggProtocolError, match="session"):
                deliver(bad, *args)
        return deliver(msg, *args)

    for i, c in clients.items():
        reply = c.advertise_keys()
        assert reply["session_id"] == sid
        both(lambda r, i=i: server.receive_keys(i, r), reply)
    for i, m in server.share_keys_messages().items():
        assert m["session_id"] == sid
        reply = both(clients[i].share_keys, m)
        assert reply["session_id"] == sid
        both(lambda r, i=i: server.receive_shares(i, r), reply)
    for i, m in server.masked_input_messages().items():
        assert m["session_id"] == sid
        y = both(clients[i].masked_input, m, np.zeros(10))
        server.receive_masked_input(i, y)  # a bare array: bound to the session by its masks
    for i, m in server.unmask_messages().items():
        assert m["session_id"] == sid
        reply = both(clients[i].unmask, m)
        assert reply["session_id"] == sid
        both(lambda r, i=i: server.receive_unmask(i, r), reply)
    assert np.abs(server.finalize().sum).max() <= params.codec.error_bound(5)


def _two_cliques_and_a_bridge(monkeypatch):
    """Nodes 1-5 and 6-10 are cliques; node 11 joins every node. Dropping 11 splits the survivors."""
    import common.secagg as secagg

    left, right, bridge = set(range(1, 6)), set(range(6, 11)), 11
    graph = {i: frozenset((left if i in left else right) - {i} | {bridge}) for i in left | right}
    graph[bridge] = frozenset(left | right)
    monkeypatch.setattr(secagg, "neighbour_graph", lambda n, k, seed: graph)
    return sorted(left | right | {bridge}), bridge


def test_server_aborts_when_the_survivors_graph_is_disconnected(monkeypatch):
    """With the bridge dropped, each clique's pairwise masks cancel within the
    clique: unmasking would hand the server each clique's sum, not just the
    total. Every neighbourhood still has t live members, so only the
    connectivity check stops it."""
    ids, bridge = _two_cliques_and_a_bridge(monkeypatch)
    params, server, clients = _keyed_session(ids, 10, neighbours=6, threshold=4, min_survivors=4)
    for i, m in server.masked_input_messages().items():
        if i != bridge:
            server.receive_masked_input(i, clients[i].masked_input(m, np.ones(10)))
    with pytest.raises(SecAggAbort, match="connected"):
        server.unmask_messages()


def test_client_refuses_to_unmask_a_disconnected_survivor_set(monkeypatch):
    ids, bridge = _two_cliques_and_a_bridge(monkeypatch)
    params, server, clients = _keyed_session(ids, 10, neighbours=6, threshold=4, min_survivors=4)
    for i, m in server.masked_input_messages().items():
        clients[i].masked_input(m, np.ones(10))
    survivors = [i for i in ids if i != bridge]
    forged = {"stage": "unmask", "session_id": params.session_id, "survivors": survivors, "dropped": [bridge]}
    with pytest.raises(SecAggProtocolError, match="connected"):
        clients[1].unmask(forged)
    # The honest request (everyone survived) is still answered: refusing did not consume the stage.
    assert clients[1].unmask({**forged, "survivors": ids, "dropped": []})["b_ids"]


def test_client_checks_the_survivor_and_dropped_lists():
    ids = list(range(1, 9))
    params, server, clients = _keyed_session(ids, 10, min_survivors=5)
    for i, m in server.masked_input_messages().items():
        clients[i].masked_input(m, np.zeros(10))
    c = clients[1]

    def unmask(survivors, dropped):
        return c.unmask({"stage": "unmask", "session_id": params.session_id, "survivors": survivors, "dropped": dropped})

    for survivors, dropped, why in (
        (ids, [99], "outside the session"),
        (ids, [8], "overlap"),
        (ids[1:], [], "does not list me"),
        (ids[:4], ids[4:], "fewer"),
        (ids[:-1], [], "omit"),
    ):
        with pytest.raises(SecAggProtocolError, match=why):
            unmask(survivors, dropped)
    unmask(ids[:-1], ids[-1:])  # consistent: node 8 shared keys and then dropped


def _unmask_replies(n: int = 8, dropped: int = 1):
    """A full-graph session up to the unmask replies (not yet delivered); ``dropped`` clients
    send shares and no masked input. Returns params, server, replies, the dropped ids."""
    ids = list(range(1, n + 1))
    params, server, clients = _keyed_session(ids, 50)
    for i, m in server.masked_input_messages().items():
        y = clients[i].masked_input(m, np.full(50, 0.5))
        if i > dropped:
            server.receive_masked_input(i, y)
    replies = {i: clients[i].unmask(m) for i, m in server.unmask_messages().items()}
    return params, server, replies, ids[:dropped]


def _corrupt(reply: dict, field: str, src: int) -> dict:
    ids, shares = reply[field.replace("shares", "ids")], list(reply[field])
    k = ids.index(src)
    shares[k] = shares[k][:-8] + bytes(b ^ 0x5A for b in shares[k][-8:])  # still a field element
    return {**reply, field: shares}


@pytest.mark.parametrize("bad", [1, 2])
def test_reconstruction_tolerates_corrupted_shares(bad):
    """n=8, full graph, t=4; one client dropped: each survivor's seed and the
    dropped client's key have 6 shares, so up to 2 bad ones leave t good."""
    params, server, replies, (gone,) = _unmask_replies()
    assert params.threshold == 4
    target = 5  # a survivor whose self-mask seed shares we damage
    holders = [i for i in sorted(replies) if i != target][:bad]
    for h in holders:
        replies[h] = _corrupt(_corrupt(replies[h], "b_shares", target), "sk_shares", gone)
    for i, r in replies.items():
        server.receive_unmask(i, r)
    result = server.finalize()
    assert np.abs(result.sum - 0.5 * 7).max() <= params.codec.error_bound(7)


def test_reconstruction_gives_up_with_too_few_good_shares():
    params, server, replies, _ = _unmask_replies()
    for h in [i for i in sorted(replies) if i != 5][:3]:  # 3 of 6 shares bad: only 3 < t good
        replies[h] = _corrupt(replies[h], "b_shares", 5)
    for i, r in replies.items():
        server.receive_unmask(i, r)
    with pytest.raises(SecAggAbort, match="no 4 of its 6 shares"):
        server.finalize()


def test_a_dropped_clients_key_with_too_many_bad_shares_aborts():
    params, server, replies, (gone,) = _unmask_replies()
    for h in sorted(replies)[:4]:  # all 7 survivors hold a share of its key: 4 bad leave 3 < t
        replies[h] = _corrupt(replies[h], "sk_shares", gone)
    for i, r in replies.items():
        server.receive_unmask(i, r)
    with pytest.raises(SecAggAbort, match="mask key: no 4 of its 7 shares"):
        server.finalize()


SECRET_STATE = {"c_sk", "s_sk", "b", "held_ids", "held_b", "held_sk", "peer_ids", "peer_c_pks", "peer_s_pks"}


def test_client_forgets_its_secrets_when_the_round_ends():
    ids = [1, 2, 3, 4, 5]
    params, server, clients = _keyed_session(ids, 10)
    for i, m in server.masked_input_messages().items():
        server.receive_masked_input(i, clients[i].masked_input(m, np.ones(10)))
    mid_round = clients[1].to_state()  # private keys, seed and held shares
    secrets_ = [mid_round["c_sk"], mid_round["s_sk"], mid_round["b"], *mid_round["held_b"], *mid_round["held_sk"]]
    for i, m in server.unmask_messages().items():
        server.receive_unmask(i, clients[i].unmask(m))
    assert np.abs(server.finalize().sum - 5.0).max() <= params.codec.error_bound(5)

    # After unmask() the state a ClientApp would store holds nothing private.
    state = clients[1].to_state()
    assert not SECRET_STATE & set(state) and state["stage"] == "unmasked"
    assert not any(v in secrets_ for v in state.values())
    done = SecAggClient.from_state(state)
    with pytest.raises(SecAggProtocolError, match="stage"):
        done.unmask({"stage": "unmask", "session_id": params.session_id, "survivors": ids, "dropped": []})

    # A round that ends early (an abort, a server that never asks to unmask):
    # the caller scrubs whatever state it holds.
    cleared = SecAggClient.clear_secrets(mid_round)
    assert not SECRET_STATE & set(cleared) and cleared["stage"] == "closed"
    assert "c_sk" in mid_round  # a new dict; the caller replaces its copy
    closed = SecAggClient.from_state(cleared)
    with pytest.raises(SecAggProtocolError, match="stage"):
        closed.masked_input({"stage": "masked_input", "session_id": params.session_id, "src": [], "ciphertexts": []}, np.ones(10))
    # ...or tells a live client object to forget.
    c = SecAggClient.from_state(mid_round)
    c.forget()
    assert not SECRET_STATE & set(c.to_state()) and c.to_state()["stage"] == "closed"


# ------------------------------------------------------------------------ Shamir


def test_shamir_exactly_t_shares_reconstruct_and_t_minus_1_fail():
    secret = os.urandom(32)
    xs = list(range(1, 8))
    t = 4
    shares = shamir_split(secret, t, xs)
    for subset in ([1, 2, 3, 4], [7, 5, 3, 1], [2, 4, 6, 7]):
        assert shamir_combine({x: shares[x] for x in subset}, t, 32) == secret
    few = {x: shares[x] for x in [1, 2, 3]}
    with pytest.raises(ValueError, match="need 4 shares"):
        shamir_combine(few, t, 32)
    # Even when told a lower threshold, t-1 points interpolate to garbage, which
    # the secret-space check reports instead of returning a wrong secret.
    with pytest.raises(ValueError, match="inconsistent"):
        shamir_combine(few, t - 1, 32)


def _reference_interpolation(points: dict[int, int]) -> int:
    """Lagrange interpolation at 0 as first written: t**2 field steps and t inverses."""
    p, total = SHAMIR_PRIME, 0
    for xi, yi in points.items():
        num = den = 1
        for xj in points:
            if xj != xi:
                num, den = num * -xj % p, den * (xi - xj) % p
        total = (total + yi * num * pow(den, -1, p)) % p
    return total


@pytest.mark.parametrize("spread", [100, 1000, 2**40, SHAMIR_PRIME - 1])
def test_batched_lagrange_matches_the_reference(spread):
    """The cached, batch-inverted coefficients interpolate exactly what the
    plain formula does: small secure ids (the int64 product path), points too
    far apart for it, and any field element."""
    rng = np.random.default_rng(spread % 1000)
    for t in (1, 2, 5, 31, 88):
        xs: set[int] = set()
        while len(xs) < t:
            xs.add(1 + int.from_bytes(rng.bytes(70), "big") % spread)
        points = {x: int.from_bytes(rng.bytes(66), "big") % SHAMIR_PRIME for x in sorted(xs, key=lambda _: rng.random())}
        assert _interpolate_at_zero(points) == _reference_interpolation(points), (spread, t)
    # Recovery through the cached coefficients: every t-subset of one holder
    # set, then the same subsets again for a second secret.
    holders = list(range(3, 3 + 12))
    for secret in (os.urandom(32), os.urandom(32)):
        shares = shamir_split(secret, 5, holders)
        for subset in itertools.islice(itertools.combinations(holders, 5), 40):
            assert shamir_combine({x: shares[x] for x in subset}, 5, 32) == secret


def test_shamir_uses_fresh_randomness():
    # t-1 shares hide the secret only if the other coefficients are random and
    # fresh; with fixed coefficients two splittings would repeat, and shares of
    # related secrets would differ by a known offset.
    s1, s2 = b"\x00" * 32, b"\xff" * 32
    a, b = shamir_split(s1, 3, [1, 2, 3]), shamir_split(s2, 3, [1, 2, 3])
    assert a[1] != shamir_split(s1, 3, [1, 2, 3])[1]  # fresh coefficients every time
    assert a[1] != b[1] and len(a[1]) == len(b[1]) == 66


# ------------------------------------------------------------------------- codec


def test_codec_clips_and_counts_out_of_range():
    codec = FixedPointCodec(clip_range=1.0, modulus_bits=16, max_summands=4, stochastic=False)
    x = np.array([-5.0, -1.0, 0.0, 0.5, 1.0, 3.0])
    enc = codec.encode(x)
    assert enc.num_clipped == 2
    assert enc.values.min() == 0 and enc.values.max() == codec.levels
    dec = codec.decode_sum(enc.values, 1)
    assert np.allclose(dec, np.clip(x, -1, 1), atol=codec.step / 2 + 1e-12)
    with pytest.raises(ValueError, match="outside"):
        FixedPointCodec(1.0, 16, 4, stochastic=False, strict=True).encode(x)
    with pytest.raises(ValueError, match="non-finite"):
        codec.encode(np.array([0.0, np.nan]))
    # The sum of max_summands encodings of +R must not wrap the modulus.
    total = sum(codec.encode(np.ones(3)).values.astype(np.int64) for _ in range(4))
    assert int(total.max()) < codec.modulus
    with pytest.raises(ValueError, match="wrapped"):
        codec.decode_sum(enc.values, 5)


def test_clip_probability_of_a_noised_coordinate():
    """P(a value |x| <= C plus N(0, sigma^2) leaves [-R, R]), union-bounded over
    coordinates: what a caller adds to delta when it sets R = C + k*sigma."""
    from common.secagg_codec import clip_probability

    c, sigma = 0.5, 0.1
    q = lambda z: 0.5 * math.erfc(z / math.sqrt(2))  # noqa: E731  (Gaussian upper tail)
    for k in (6, 8, 10):
        r = c + k * sigma
        p1 = clip_probability(r, c, sigma, 1)
        assert p1 == pytest.approx(q(k) + q(k + 2 * c / sigma), rel=1e-9)
        assert clip_probability(r, c, sigma, 460_800) == pytest.approx(460_800 * p1, rel=1e-9)
    assert clip_probability(c + 8 * sigma, c, sigma, 10**6) < 1e-9 < clip_probability(c + 6 * sigma, c, sigma, 10**6)
    assert clip_probability(c, c, sigma, 10) == 1.0  # union bound capped at 1
    assert clip_probability(1.0, 0.5, 0.0, 10) == 0.0 and clip_probability(0.4, 0.5, 0.0, 1) == 1.0
    # Monte Carlo at the worst-case value |x| = C, where the bound is exact per coordinate.
    z = np.random.default_rng(12).normal(0.0, sigma, 2_000_000)
    r = c + 2 * sigma
    assert np.mean(np.abs(c + z) > r) == pytest.approx(clip_probability(r, c, sigma, 1), rel=0.02)
    assert np.mean(np.abs(0.1 + z) > r) < clip_probability(r, c, sigma, 1)  # smaller |x| clips less
    # The codec answers for its own range.
    codec = FixedPointCodec(clip_range=c + 8 * sigma)
    assert codec.clip_probability(c, sigma, 100) == clip_probability(c + 8 * sigma, c, sigma, 100)
    with pytest.raises(ValueError):
        clip_probability(1.0, 0.5, -1.0, 1)


def test_stochastic_rounding_is_unbiased():
    codec = FixedPointCodec(clip_range=1.0, modulus_bits=8, max_summands=1, stochastic=True)
    x = np.full(200_000, 0.3 * codec.step + 0.1)  # sits between grid points
    dec = codec.decode_sum(codec.encode(x, np.random.default_rng(9)).values, 1)
    assert abs(dec.mean() - x[0]) < 0.01 * codec.step
    assert np.abs(dec - x).max() < codec.step


def test_client_reports_clipping_locally():
    ids = [1, 2, 3]
    vecs = {i: np.zeros(100, np.float32) for i in ids}
    vecs[2][:7] = 100.0
    params = SecAggParams.create(ids, 100, clip_range=8.0)
    result = run_secagg_round(vecs, params)
    assert np.allclose(result.sum[:7], 8.0, atol=1e-5)  # clipped, as documented


# ------------------------------------------------------------------------- graph


def test_graph_is_deterministic_regular_and_symmetric():
    seed = b"s" * 16
    g1, g2 = neighbour_graph(30, 10, seed), neighbour_graph(30, 10, seed)
    assert g1 == g2
    assert all(len(nb) == 10 and i not in nb for i, nb in g1.items())
    assert all(i in g1[j] for i, nb in g1.items() for j in nb)
    assert neighbour_graph(30, 10, b"t" * 16) != g1
    full = neighbour_graph(6, None, seed)
    assert all(nb == frozenset(set(range(1, 7)) - {i}) for i, nb in full.items())
    with pytest.raises(ValueError):
        neighbour_graph(30, 5, seed)


def test_client_and_server_agree_on_graph_from_setup_message():
    ids = [5, 900, 17, 2**40, 3, 77, 64, 8, 1000, 12]
    params = SecAggParams.create(ids, 10, neighbours=4)
    server = SecAggServer(params)
    setup = server.setup_message()
    for nid in ids:
        assert SecAggClient(nid, setup).graph_neighbours == params.neighbours_of(nid)
    assert default_neighbours(10) == 8 and default_neighbours(30) == 10 and default_neighbours(5) == 4


def test_node_neighbours_are_the_seeded_graph_translated_one_node_at_a_time():
    ids = [5, 900, 17, 2**40, 3, 77, 64, 8, 1000, 12]
    params = SecAggParams.create(ids, 10, neighbours=4)
    graph, order = neighbour_graph(len(ids), 4, params.graph_seed), params.node_ids  # secure ids in node-id order
    assert params.neighbours_of(900) == frozenset(order[j - 1] for j in graph[order.index(900) + 1])
    # A device asks only for its own set, at every stage: the rest of the graph stays untranslated.
    assert list(params.__dict__["_graph_cache"][1]) == [900]
    for nid in ids:
        assert params.neighbours_of(nid) == frozenset(order[j - 1] for j in graph[params.secure_id(nid)])
    with pytest.raises(KeyError):
        params.neighbours_of(4)


# ------------------------------------------------------------ Flower wiring


def test_round_through_flower_records_and_stateless_clients():
    # Every message goes through a ConfigRecord/ArrayRecord protobuf round trip
    # and every client is rebuilt from its context-state dict between stages,
    # as a Message-API ClientApp will be.
    vecs = _vectors(8, 3000, seed=10)
    ids = sorted(vecs)
    params = SecAggParams.create(ids, 3000, neighbours=6, threshold=4)
    result = run_secagg_round(vecs, params, drop_after_shares=_droppable(params, 2), via_flower_records=True)
    assert len(result.dropped) == 2 and len(result.survivors) == 6
    assert np.abs(result.sum - _plain(vecs, result.survivors)).max() <= params.codec.error_bound(6)


# ------------------------------------------------------------- double masking


def test_late_input_of_dropped_client_stays_hidden():
    """The server reconstructs a dropped client's pairwise-mask key; if that
    client's masked vector then arrives late, its self mask b_i still hides it."""
    d = 20_000
    ids = [1, 2, 3, 4, 5, 6]
    late = 3
    x = np.linspace(-1, 1, d, dtype=np.float32)
    params, server, clients = _keyed_session(ids, d, neighbours=5, threshold=3)
    late_y = None
    for i, m in server.masked_input_messages().items():
        y = clients[i].masked_input(m, x)
        if i == late:
            late_y = y  # computed, but reaches the server only after it was declared dropped
        else:
            server.receive_masked_input(i, y)
    for i, m in server.unmask_messages().items():
        server.receive_unmask(i, clients[i].unmask(m))
    server.finalize()
    assert late not in server._b_shares  # honest clients never revealed b_late
    with pytest.raises(SecAggProtocolError):
        server.receive_masked_input(late, late_y)

    # Everything the server can strip with what it learned: the pairwise masks.
    from common.secagg_crypto import INFO_MASK, agree, private_from_bytes

    sk = private_from_bytes(shamir_combine(server._sk_shares[late], params.threshold, 32))
    prg = MaskExpander(d, params.modulus_bits)
    stripped = late_y.copy()
    for j in params.neighbours_of(late):
        seed = agree(sk, server._keys[j][1], INFO_MASK, params.session_id)
        prg.add(stripped, seed, -1 if late < j else +1)
    assert abs(np.corrcoef(stripped.astype(np.float64), x)[0, 1]) < 5 / math.sqrt(d)
    # ...and it is exactly the self mask that remains: with b_late it would decode.
    prg.add(stripped, clients[late]._b, -1)  # the late client never ran unmask, so it still holds b
    assert np.abs(params.codec.decode_sum(stripped, 1) - x).max() <= params.codec.error_bound(1)
