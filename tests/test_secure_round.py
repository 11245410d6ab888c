"""Secure aggregation wired into the Message API: the real strategy, the real ClientApp.

A loopback grid routes messages in-process (a transport for the test, nothing
more). A spy records each client's plain update just before it is masked; the
server, which only ever sees masked vectors and shares, must still produce
exactly the mean of those updates, within the fixed-point quantisation bound.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

from common.config import build_config, client_config
from common.models import AdapterSpec, personal_model
from common.secagg import SecAggClient
from common.wire import WireSchema


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

    args = {"min_train_nodes": 3, "min_available_nodes": 3, **extra}
    return SecAggFedAvg(num_rounds=1, clip_range=float(cfg["secagg-clip-range"]), fraction_train=1.0, **args)


def test_server_gets_exactly_the_mean_update_and_never_a_plain_one(round_setup):
    from common.wire import flatten

    app, cfg, model, contexts, updates = round_setup
    initial = ArrayRecord(model.shared_state())
    grid = LoopbackGrid(app, contexts)
    strategy = _strategy(cfg)
    messages = strategy.configure_train(1, initial, ConfigRecord(client_config(cfg)), grid)
    replies = grid.send_and_receive(messages)
    new, metrics = strategy.aggregate_train(1, replies)

    assert set(updates) == set(contexts) and all(np.abs(u).max() > 0 for u in updates.values())
    expected = flatten(initial) + np.mean(list(updates.values()), axis=0)
    bound = 3 * 2 * float(cfg["secagg-clip-range"]) / 2**32 * 3 + 1e-7  # 3 summands of one quantisation step each
    assert np.abs(flatten(new) - expected).max() <= max(bound, 1e-6)
    assert metrics is not None
    # The train replies carry one masked uint32 vector and no float tensor.
    guard_schema = WireSchema.masked(model.shared_state())
    from common.wire import EgressGuard

    for reply in replies:
        EgressGuard(guard_schema).check(reply.content, "train")
        masked = reply.content["arrays"]["masked"].numpy()
        assert masked.dtype == np.uint32


def test_sum_survives_a_client_dropping_before_its_masked_input(round_setup, tiny_data, tmp_path):
    from common.wire import flatten

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
    initial = ArrayRecord(model.shared_state())
    grid = LoopbackGrid(app, contexts, drop={(204, "train")})
    strategy = _strategy(cfg, min_train_nodes=5, min_available_nodes=5)
    messages = strategy.configure_train(1, initial, ConfigRecord(client_config(cfg)), grid)
    replies = grid.send_and_receive(messages)
    new, _ = strategy.aggregate_train(1, replies)
    survivors = [updates[n] for n in range(200, 204)]
    # Fixed denominator (clients asked, not clients answered), as DP-FedAvg requires.
    expected = flatten(initial) + np.sum(survivors, axis=0) / 5
    assert np.abs(flatten(new) - expected).max() < 1e-6
    assert strategy.dropped[1] == 1


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
