"""Secure aggregation wired into the Message API: the real strategy, the real ClientApp.

A loopback grid routes messages in-process (a transport for the test, nothing
more). A spy records each client's plain update just before it is masked; the
server, which only ever sees masked vectors and shares, must still produce
exactly the mean of those updates, within the fixed-point quantisation bound.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, RecordDict

from common.config import build_config, client_config
from common.models import AdapterSpec, personal_model
from common.secagg import SecAggClient
from common.tiers import server_state
from common.wire import train_reply_schema


class LoopbackGrid:
    def __init__(self, app, contexts, drop=()):
        self.app, self.contexts, self.drop = app, contexts, set(drop)
        self.seen = []

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for msg in messages:
            nid = msg.metadata.dst_node_id
            self.seen.append((msg.metadata.message_type, msg.content))
            if (nid, msg.metadata.message_type) in self.drop:
                continue
            reply = self.app(msg, self.contexts[nid])
            # Flower's runtime stamps the sender on delivery; this loopback does it here.
            reply.metadata.__dict__["_src_node_id"] = nid
            replies.append(reply)
        return replies


@pytest.fixture
def round_setup(tiny_data, task_identity, tmp_path, monkeypatch):
    from client.app import app

    cfg = build_config("quick", {"data-dir": str(tiny_data / "data"), "store-dir": str(tmp_path / "dev"), "secagg": True, "dp": False})
    model = personal_model(AdapterSpec.from_run_config(cfg))
    model.reset_to_initial()
    contexts = {
        100 + i: Context(run_id=1, node_id=100 + i, node_config={"partition-id": i, "num-partitions": 3}, state=RecordDict(), run_config={})
        for i in range(3)
    }
    updates = {}
    real = SecAggClient.masked_input

    def spy(self, msg, vector=None, **kw):
        updates[self.node_id] = np.array(vector, copy=True)
        return real(self, msg, vector, **kw)

    monkeypatch.setattr(SecAggClient, "masked_input", spy)
    return app, cfg, model, contexts, updates


def _strategy(cfg, **extra):
    from server.secure_strategy import SecAggFedAvg

    args = {"min_train_nodes": 3, "min_available_nodes": 3, "num_slots": int(cfg["persona-slots"]), **extra}
    return SecAggFedAvg(num_rounds=1, clip_range=float(cfg["secagg-clip-range"]), fraction_train=1.0, **args)


def _initial(cfg, model) -> ArrayRecord:
    arrays = server_state(model.shared_state(), int(cfg["persona-slots"]), float(cfg["persona-init-std"]), 0)
    return ArrayRecord({k: Array(v) for k, v in arrays.items()})


@pytest.mark.parametrize("slots", [0, 3])
def test_server_gets_exactly_the_mean_update_and_never_a_plain_one(round_setup, slots):
    from common.wire import EgressGuard, flatten
    from server.slot_strategy import apply_update_sum

    app, cfg, model, contexts, updates = round_setup
    cfg = {**cfg, "persona-slots": slots}
    initial = _initial(cfg, model)
    grid = LoopbackGrid(app, contexts)
    strategy = _strategy(cfg)
    messages = strategy.configure_train(1, initial, ConfigRecord(client_config(cfg)), grid)
    replies = grid.send_and_receive(messages)
    new, metrics = strategy.aggregate_train(1, replies)

    assert set(updates) == set(contexts) and all(np.abs(u).max() > 0 for u in updates.values())
    plain_sum = np.sum(list(updates.values()), axis=0)
    # What the server computed from the masked replies equals the plain arithmetic
    # on the clients' own (unmasked) updates: the global mean, the per-slot means
    # and the per-slot counts.
    expected, info = apply_update_sum(initial, plain_sum, 3, slots, 1.0, None)
    bound = 3 * 2 * float(cfg["secagg-clip-range"]) / 2**32 * 3 + 1e-7  # 3 summands of one quantisation step each
    assert np.abs(flatten(new) - flatten(expected)).max() <= max(bound, 1e-6)
    assert metrics is not None
    if slots:
        counts = strategy.slot_rounds[1].counts
        assert np.allclose(counts, info.counts, atol=1e-6) and round(sum(counts)) == 3
    # The train replies carry one masked uint32 vector and no float tensor.
    shapes = {k: tuple(v.shape) for k, v in model.shared_params().items()}
    guard_schema = train_reply_schema(shapes, slots, masked=True)

    for reply in replies:
        EgressGuard(guard_schema).check(reply.content, "train")
        masked = reply.content["arrays"]["masked"].numpy()
        assert masked.dtype == np.uint32


def test_sum_survives_a_client_dropping_before_its_masked_input(round_setup, tiny_data, tmp_path):
    from common.wire import flatten

    from server.slot_strategy import apply_update_sum

    app, cfg, model, _, updates = round_setup
    # Five devices (two reuse a user file with their own store): with 3 clients
    # and threshold 2, one dropout would rightly abort the round.
    users = sorted((tiny_data / "data" / "users").glob("*.jsonl"))
    contexts = {
        200 + i: Context(
            run_id=1,
            node_id=200 + i,
            node_config={"user-file": str(users[i % 3]), "store-path": str(tmp_path / f"dev{i}.sqlite")},
            state=RecordDict(),
            run_config={},
        )
        for i in range(5)
    }
    initial = _initial(cfg, model)
    grid = LoopbackGrid(app, contexts, drop={(204, "train")})
    strategy = _strategy(cfg, min_train_nodes=5, min_available_nodes=5)
    messages = strategy.configure_train(1, initial, ConfigRecord(client_config(cfg)), grid)
    replies = grid.send_and_receive(messages)
    new, _ = strategy.aggregate_train(1, replies)
    survivors = [updates[n] for n in range(200, 204)]
    # Fixed denominator for the global tier (clients asked, not clients
    # answered), as DP-FedAvg requires; slots divide by their decoded counts.
    expected, info = apply_update_sum(initial, np.sum(survivors, axis=0), 5, int(cfg["persona-slots"]), 1.0, None)
    assert np.abs(flatten(new) - flatten(expected)).max() < 1e-6
    assert round(sum(info.counts)) == 4
    assert strategy.dropped[1] == 1
    # Key, share and unmask replies are counted per client, next to the train reply.
    assert set(strategy.query_bytes[1]) == set(contexts) and min(strategy.query_bytes[1].values()) > 0


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


def test_distributed_noise_no_party_sees_a_noiseless_sum(round_setup):
    """User-level DP under secure aggregation: the clients' noise shares are the only noise.

    Each device adds N(0, (zC)^2 / m) before masking (m = the minimum number of
    survivors the protocol unmasks), so the unmasked sum already carries noise
    of std >= zC, and the server adds none of its own.
    """
    from common.dp import make_user_accountant
    from common.wire import flatten
    from server.slot_strategy import apply_update_sum

    app, cfg, model, contexts, updates = round_setup
    z, clip = 1.0, 0.05
    cfg = {**cfg, "user-dp": True, "user-noise-multiplier": z, "user-clip-norm": clip}
    initial = _initial(cfg, model)
    grid = LoopbackGrid(app, contexts)
    accountant = make_user_accountant(3, 1e-3, None)
    strategy = _strategy(cfg, user_dp={"noise_multiplier": z, "clip_norm": clip}, server_noise=False, accountant=accountant)
    server_rng = strategy.rng = np.random.default_rng(0)
    before = server_rng.bit_generator.state
    messages = strategy.configure_train(1, initial, ConfigRecord(client_config(cfg)), grid)
    new, _ = strategy.aggregate_train(1, grid.send_and_receive(messages))

    noised_sum = np.sum(list(updates.values()), axis=0)  # what the devices masked: update + noise share
    assert noised_sum.std() == pytest.approx(z * clip, rel=0.05)  # 3 shares of variance (zC)^2/3
    expected, info = apply_update_sum(initial, noised_sum, 3, 3, 1.0, clip)
    assert np.abs(flatten(new) - flatten(expected)).max() < 1e-5
    assert server_rng.bit_generator.state == before  # the server drew no noise of its own
    assert accountant.get_epsilon(1e-3) > 0


def test_poisson_client_sampling_uses_the_expected_cohort_as_denominator(round_setup, tiny_data, tmp_path):
    """DP-FedAvg with Poisson sampling: each node kept with probability q; the mean divides by q*N."""
    from common.wire import flatten
    from server.slot_strategy import apply_update_sum

    app, cfg, model, _, updates = round_setup
    users = sorted((tiny_data / "data" / "users").glob("*.jsonl"))
    contexts = {
        300 + i: Context(run_id=1, node_id=300 + i, node_config={"user-file": str(users[i % 3]), "store-path": str(tmp_path / f"p{i}.sqlite")}, state=RecordDict(), run_config={})
        for i in range(8)
    }
    initial = _initial(cfg, model)
    grid = LoopbackGrid(app, contexts)
    strategy = _strategy(cfg, min_train_nodes=8, min_available_nodes=8, poisson_rate=0.5)
    strategy.rng = np.random.default_rng(3)
    draws = np.random.default_rng(3).random(8) < 0.5  # the same stream the strategy will use, in message order
    messages = strategy.configure_train(1, initial, ConfigRecord(client_config(cfg)), grid)
    chosen = {m.metadata.dst_node_id for m in messages}
    assert len(chosen) == draws.sum() and 3 <= len(chosen) < 8 and chosen <= set(contexts)
    new, _ = strategy.aggregate_train(1, grid.send_and_receive(messages))
    assert set(updates) == chosen
    expected, _ = apply_update_sum(initial, np.sum([updates[n] for n in sorted(chosen)], axis=0), 0.5 * 8, int(cfg["persona-slots"]), 1.0, None)
    assert np.abs(flatten(new) - flatten(expected)).max() < 1e-6
