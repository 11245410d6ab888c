"""Secure aggregation wired into the Message API: the real strategy, the real ClientApp.

A loopback grid routes messages in-process (a transport for the test, nothing
more). A spy records each device's plain update just before it is masked; the
server, which only ever sees masked vectors and shares, must still produce
exactly the result of the plain arithmetic on those updates, within the
fixed-point quantisation bound.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import ConfigRecord, RecordDict
from helpers import LoopbackGrid, codec_for, device_context, initial_arrays, quick, strategy_for, user_files

from client.app import app
from server.aggregate import apply_sum


@pytest.fixture
def spy(masked_updates):
    return masked_updates


def _devices(tmp_path, tiny_data, cfg, n):
    users = user_files(tiny_data)
    return {100 + i: device_context(tmp_path, 100 + i, users[i % len(users)], cfg) for i in range(n)}


def _round(cfg, contexts, drop=()):
    strategy = strategy_for(cfg)
    grid = LoopbackGrid(app, contexts, drop=drop)
    initial = initial_arrays(cfg)
    messages = strategy.configure_train(1, initial, ConfigRecord(), grid)
    replies = grid.send_and_receive(messages)
    new, _ = strategy.aggregate_train(1, replies)
    return strategy, initial, messages, replies, new


def _flat(codec, arrays):
    return np.concatenate([np.asarray(arrays[k].numpy() if hasattr(arrays[k], "numpy") else arrays[k]).reshape(-1) for k in codec.server_shapes])


@pytest.mark.parametrize("slots", [0, 3])
def test_server_gets_exactly_the_plain_result_and_never_a_plain_update(spy, tiny_data, task_identity, tmp_path, slots):
    cfg = quick(secagg=True, dp=False, persona_slots=slots, num_supernodes=3)
    contexts = _devices(tmp_path, tiny_data, cfg, 3)
    strategy, initial, messages, replies, new = _round(cfg, contexts)
    codec = codec_for(cfg)
    assert set(spy) == set(contexts) and all(np.abs(u).max() > 0 for u in spy.values())
    expected, info = apply_sum({k: v.numpy() for k, v in initial.items()}, codec, np.sum(list(spy.values()), axis=0), 3, cfg.persona.min_size, True)
    bound = 3 * 2 * cfg.secagg.clip_range / 2**32 * 3 + 1e-7  # 3 summands of one quantisation step each
    assert np.abs(_flat(codec, new) - _flat(codec, expected)).max() <= max(bound, 1e-6)
    row = strategy.rounds[1]
    assert row["contributors"] == 3 and row["refused"] == {} and row["failed"] == 0
    if slots:
        assert np.allclose(row["persona_counts"], info.counts) and round(sum(row["persona_counts"])) == 3
    # Train replies carry one masked uint32 vector and no float tensor; the message carried the round number only.
    for reply in replies:
        assert set(reply.content["arrays"].keys()) == {"masked"} and reply.content["arrays"]["masked"].numpy().dtype == np.uint32
    for msg in messages:
        assert dict(msg.content["config"]) == {"server-round": 1}
    # Key, share and unmask replies are counted per client, next to the train reply.
    assert set(row["secagg_bytes"]) == set(contexts) and min(row["secagg_bytes"].values()) > 0


def test_sum_survives_a_client_dropping_before_its_masked_input(spy, tiny_data, task_identity, tmp_path):
    # Five devices: with 3 clients and threshold 2, one dropout would rightly abort the round.
    cfg = quick(secagg=True, dp=False, num_supernodes=5)
    contexts = _devices(tmp_path, tiny_data, cfg, 5)
    strategy, initial, _, _, new = _round(cfg, contexts, drop={(104, "train")})
    codec = codec_for(cfg)
    survivors = [spy[n] for n in range(100, 104)]
    # Fixed denominator for the global tier (clients asked, not clients answered),
    # as DP-FedAvg requires; slots divide by their decoded counts.
    expected, info = apply_sum({k: v.numpy() for k, v in initial.items()}, codec, np.sum(survivors, axis=0), 5, cfg.persona.min_size, True)
    assert np.abs(_flat(codec, new) - _flat(codec, expected)).max() < 1e-6
    assert round(sum(info.counts)) == 4
    assert strategy.rounds[1]["contributors"] == 4 and strategy.rounds[1]["steps"]["secure-sum"]["dropped"] == 1


def test_query_replies_may_not_smuggle_text():
    from common.wire import EgressGuard, EgressViolation

    with pytest.raises(EgressViolation) as err:
        EgressGuard.check_secagg(RecordDict({"secagg": ConfigRecord({"stage": "shares", "dst": [1], "ciphertexts": ["Jane Doe"]})}))
    assert "Jane" not in str(err.value)
    with pytest.raises(EgressViolation):
        EgressGuard.check_secagg(RecordDict({"secagg": ConfigRecord({"stage": "Jane Doe"})}))
    with pytest.raises(EgressViolation) as err:
        EgressGuard.check_secagg(RecordDict({"secagg": ConfigRecord({"stage": "shares", "jane@example.com": 1})}))
    assert "jane" not in str(err.value)


def test_distributed_noise_no_party_sees_a_noiseless_sum(spy, tiny_data, task_identity, tmp_path, monkeypatch):
    """User-level DP under secure aggregation: the devices' noise shares are the only noise.

    Each device adds N(0, (zC)^2 / h) before masking (h = the fewest *honest*
    survivors: the unmask floor m = 3 minus the colluder budget ceil(0.1 * 3) = 1),
    so even after a colluder subtracts its share the unmasked sum carries
    noise of std >= zC, and the server adds none of its own.
    """
    from common import csprng
    from common.privacy import noise as noise_mod

    z, clip = 1.0, 0.05
    cfg = quick(secagg=True, dp=False, user_dp=True, user_noise_multiplier=z, user_clip_norm=clip, num_supernodes=3)
    contexts = _devices(tmp_path, tiny_data, cfg, 3)
    server_draws = []
    real = csprng.gaussian

    def counted(shape, std):
        server_draws.append(std)
        return real(shape, std)

    strategy = strategy_for(cfg)
    grid = LoopbackGrid(app, contexts)
    initial = initial_arrays(cfg)
    messages = strategy.configure_train(1, initial, ConfigRecord(), grid)
    replies = grid.send_and_receive(messages)
    monkeypatch.setattr(noise_mod.csprng, "gaussian", counted)  # from here on only the server runs
    new, _ = strategy.aggregate_train(1, replies)

    noised_sum = np.sum(list(spy.values()), axis=0)  # what the devices masked: clipped update + noise share
    assert noised_sum.std() == pytest.approx(z * clip * math.sqrt(3 / 2), rel=0.05)  # 3 shares of variance (zC)^2/2 (h = 2)
    codec = codec_for(cfg)
    clip_step = strategy.pipeline.step("clip")
    unscaled = noised_sum.copy()
    for part, slices in codec.part_slices().items():
        if part != "model":
            for sl in slices:
                unscaled[sl] /= clip_step.fixed_part_scale(clip_step.ceiling)
    expected, _ = apply_sum({k: v.numpy() for k, v in initial.items()}, codec, unscaled, 3, cfg.persona.min_size, False)
    assert np.abs(_flat(codec, new) - _flat(codec, expected)).max() < 1e-5
    assert server_draws == []  # the server drew no noise of its own
    assert strategy.pipeline.step("accounting").accountant.get_epsilon(1e-3) > 0
    assert strategy.rounds[1]["steps"]["noise"]["noise-std"] == pytest.approx(z * clip * math.sqrt(3 / 2))
    assert strategy.rounds[1]["steps"]["secure-sum"]["fixed-point-clip-probability"] < 1e-12


def test_under_secure_aggregation_devices_sample_themselves_and_the_server_never_learns_the_cohort(spy, tiny_data, task_identity, tmp_path, monkeypatch):
    """Poisson sampling at q = 1/2, drawn by each device from its own coins: every device joins the
    secure sum (a device not drawn sends a zero update), and the mean divides by q*N."""
    from common import csprng

    cfg = quick(dp=False, num_supernodes=8, fraction_train=0.5)
    contexts = _devices(tmp_path, tiny_data, cfg, 8)
    coins = iter([True, False, True, True, False, True, False, False])  # the devices' draws, in message order
    monkeypatch.setattr(csprng, "bernoulli", lambda n, p: np.array([next(coins) for _ in range(n)]))
    strategy, initial, messages, _, new = _round(cfg, contexts)
    assert {m.metadata.dst_node_id for m in messages} == set(contexts)  # the server offered the round to all
    drawn = {nid for nid, vec in spy.items() if np.abs(vec).max() > 0}
    assert drawn == {100, 102, 103, 105} and set(spy) == set(contexts)  # the others masked zeros
    codec = codec_for(cfg)
    expected, _ = apply_sum({k: v.numpy() for k, v in initial.items()}, codec, np.sum([spy[n] for n in sorted(drawn)], axis=0), 0.5 * 8, cfg.persona.min_size, True)
    assert np.abs(_flat(codec, new) - _flat(codec, expected)).max() < 1e-6
    row = strategy.rounds[1]
    assert row["sampled"] == 8 and row["expected"] == 4.0 and row["contributors"] == 8


def test_without_secure_aggregation_the_server_draws_the_cohort_from_its_csprng(tiny_data, task_identity, tmp_path, monkeypatch):
    from common import csprng

    cfg = quick(secagg=False, dp=False, num_supernodes=8, fraction_train=0.5)
    contexts = _devices(tmp_path, tiny_data, cfg, 8)
    draws = np.array([True, False, True, True, False, True, False, False])
    monkeypatch.setattr(csprng, "bernoulli", lambda n, p: draws[:n])
    strategy, initial, messages, replies, new = _round(cfg, contexts)
    assert {m.metadata.dst_node_id for m in messages} == {100 + i for i in np.flatnonzero(draws)}
    updates = [codec_for(cfg).flatten(r.content["arrays"]) for r in replies]
    codec = codec_for(cfg)
    expected, _ = apply_sum({k: v.numpy() for k, v in initial.items()}, codec, np.sum(updates, axis=0), 0.5 * 8, cfg.persona.min_size, True)
    assert np.abs(_flat(codec, new) - _flat(codec, expected)).max() < 1e-6
    assert strategy.rounds[1]["sampled"] == 4 and strategy.rounds[1]["expected"] == 4.0


def test_kmeans_sends_its_profile_only_inside_the_clipped_noised_masked_update(spy, tiny_data, task_identity, tmp_path):
    """A data-derived persona choice is allowed only under user-level DP with device-added noise:
    the profile row and the count are clipped with the update, noised, and masked."""
    import math

    z, clip = 1e-6, 0.05  # negligible noise, so the clipped parts can be checked in the pre-mask vector
    cfg = quick(dp=False, num_supernodes=3, persona_assign="kmeans", user_dp=True, user_noise_multiplier=z, user_clip_norm=clip, user_delta=1e-6)
    contexts = _devices(tmp_path, tiny_data, cfg, 3)
    _round(cfg, contexts)
    codec = codec_for(cfg)
    share = clip / math.sqrt(3)
    for vec in spy.values():
        parts = codec.unflatten(vec)
        assert np.linalg.norm(parts["persona-centroids"]) == pytest.approx(share, rel=1e-3)
        assert sorted(parts["persona-count"].tolist()) == pytest.approx([0, 0, share], abs=1e-4)


class TamperingGrid(LoopbackGrid):
    """A loopback grid that lets a test corrupt one device's reply to one message type."""

    def __init__(self, app, contexts, tamper):
        super().__init__(app, contexts)
        self.tamper = tamper

    def send_and_receive(self, messages, timeout=None):
        replies = super().send_and_receive(messages, timeout)
        for reply in replies:
            self.tamper(reply)
        return replies


def _stage_reply(reply, stage):
    return reply.has_content() and "secagg" in reply.content.keys() and reply.content["secagg"].get("stage") == stage


def _tamper_first(stage, edit):
    """Edit the first device's reply of one stage (an edit returns the new ConfigRecord dict)."""
    def tamper(reply):
        if reply.metadata.src_node_id == 100 and _stage_reply(reply, stage):
            reply.content["secagg"] = ConfigRecord(edit(dict(reply.content["secagg"])))
    return tamper


def _corrupt_one_share(fields):
    shares = list(fields["b_shares"])
    shares[0] = bytes(len(shares[0]))
    return {**fields, "b_shares": shares}


MALFORMED = {
    "a key advertisement without its keys": ("advertise_keys", lambda f: {k: v for k, v in f.items() if k not in ("c_pk", "s_pk")}),
    "a share reply with a short ciphertext list": ("shares", lambda f: {**f, "ciphertexts": list(f["ciphertexts"])[:-1]}),
    "a reply of another session": ("shares", lambda f: {**f, "session_id": bytes(16)}),
    "a public key of the wrong length": ("advertise_keys", lambda f: {**f, "c_pk": b"short"}),
    "one corrupted Shamir share": ("unmask_shares", _corrupt_one_share),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_stage_reply_drops_that_client_and_the_round_completes(spy, tiny_data, task_identity, tmp_path, case):
    """A protocol error is that client's problem: the server keeps running and sums the rest exactly."""
    stage, edit = MALFORMED[case]
    cfg = quick(dp=False, num_supernodes=6, persona_slots=0)
    contexts = _devices(tmp_path, tiny_data, cfg, 6)
    strategy = strategy_for(cfg)
    grid = TamperingGrid(app, contexts, _tamper_first(stage, edit))
    initial = initial_arrays(cfg)
    replies = grid.send_and_receive(strategy.configure_train(1, initial, ConfigRecord(), grid))
    new, _ = strategy.aggregate_train(1, replies)
    codec = codec_for(cfg)
    contributed = sorted(spy) if stage == "unmask_shares" else sorted(n for n in spy if n != 100)
    assert new is not None and strategy.rounds[1]["contributors"] == len(contributed)
    expected, _ = apply_sum({k: v.numpy() for k, v in initial.items()}, codec, np.sum([spy[n] for n in contributed], axis=0), 6, 1, True)
    assert np.abs(_flat(codec, new) - _flat(codec, expected)).max() < 1e-6


def test_too_many_dropouts_abort_the_round_keep_its_charge_and_the_next_round_runs(spy, tiny_data, task_identity, tmp_path):
    cfg = quick(dp=False, num_supernodes=5, persona_slots=0, user_dp=True, user_clip_norm=0.1, user_delta=1e-6)
    contexts = _devices(tmp_path, tiny_data, cfg, 5)
    strategy = strategy_for(cfg, num_rounds=2)
    drop_train = LoopbackGrid(app, contexts, drop={(n, "train") for n in (100, 101, 102)})  # 2 of 5 left: below the floor
    initial = initial_arrays(cfg)
    new, _ = strategy.aggregate_train(1, drop_train.send_and_receive(strategy.configure_train(1, initial, ConfigRecord(), drop_train)))
    assert new is None and strategy.rounds[1]["steps"]["secure-sum"] == {"aborted": 1.0}
    accounting = strategy.pipeline.step("accounting")
    assert 1 in accounting.epsilon_per_round  # the aborted round was charged
    grid = LoopbackGrid(app, contexts)
    new, _ = strategy.aggregate_train(2, grid.send_and_receive(strategy.configure_train(2, initial, ConfigRecord(), grid)))
    assert new is not None and strategy.rounds[2]["contributors"] == 5
    assert accounting.epsilon_per_round[2] > accounting.epsilon_per_round[1]
    # Devices keep no protocol secrets once a round is over (dropped after the unmask stage).
    assert all("secagg" not in ctx.state.keys() for ctx in contexts.values())
