"""The ClientApp's wire contract, exercised through the real Flower handlers."""

from __future__ import annotations

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from common.config import build_config, client_config
from common.models import PROMPT_KEY, AdapterSpec, personal_model


@pytest.fixture
def setup(tiny_data, task_identity, tmp_path):
    cfg = build_config("quick", {"data-dir": str(tiny_data / "data"), "store-dir": str(tmp_path / "devices")})
    model = personal_model(AdapterSpec.from_run_config(cfg))
    model.reset_to_initial()
    ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 1, "num-partitions": 3}, state=RecordDict(), run_config={})
    return cfg, model, ctx


def _message(cfg, model, kind):
    content = {"arrays": ArrayRecord(model.shared_state()), "config": ConfigRecord(client_config(cfg))}
    return Message(content=RecordDict(content), dst_node_id=1, message_type=kind)


def test_train_reply_sends_exactly_the_global_adapter(setup):
    from client.app import app

    cfg, model, ctx = setup
    # The contract, spelled out: with the default FFA split, LoRA B of the global
    # adapter on q_proj and v_proj of both tiny layers, and nothing else (A is
    # frozen at its seeded init on every party and never travels).
    assert cfg["lora-split"] == "ffa"
    expected = {f"global/layers.{layer}.self_attn.{proj}.lora_B" for layer in (0, 1) for proj in ("q_proj", "v_proj")}
    reply = app(_message(cfg, model, "train"), ctx)
    assert set(reply.content.keys()) == {"arrays", "metrics"}
    sent = set(reply.content["arrays"].keys())
    assert sent == expected
    assert PROMPT_KEY not in sent and not any(k.startswith("user/") for k in sent)
    assert set(reply.content["metrics"].keys()) == {"train-loss", "num-examples", "steps", "epsilon"}
    assert reply.content["metrics"]["epsilon"] > 0


def test_separate_split_sends_a_and_b(tiny_data, task_identity, tmp_path):
    from client.app import app

    cfg = build_config("quick", {"data-dir": str(tiny_data / "data"), "store-dir": str(tmp_path / "d"), "lora-split": "separate"})
    model = personal_model(AdapterSpec.from_run_config(cfg))
    ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 3}, state=RecordDict(), run_config={})
    reply = app(_message(cfg, model, "train"), ctx)
    expected = {
        f"global/layers.{layer}.self_attn.{proj}.lora_{ab}" for layer in (0, 1) for proj in ("q_proj", "v_proj") for ab in "AB"
    }
    assert set(reply.content["arrays"].keys()) == expected


def test_user_tier_stays_on_device_and_persists(setup):
    from client import device
    from client.app import app

    cfg, model, ctx = setup
    app(_message(cfg, model, "train"), ctx)
    store = device.open_store(client_config(cfg), ctx.node_config)
    assert store.get_state(device.USER_TIER) is not None
    eps1 = app(_message(cfg, model, "evaluate"), ctx).content["metrics"]["epsilon"]
    app(_message(cfg, model, "train"), ctx)
    eps2 = app(_message(cfg, model, "evaluate"), ctx).content["metrics"]["epsilon"]
    assert 0 < eps1 < eps2  # the accountant is not reset between rounds


def test_evaluate_reply_is_metrics_only(setup):
    from client.app import app

    cfg, model, ctx = setup
    reply = app(_message(cfg, model, "evaluate"), ctx)
    assert set(reply.content.keys()) == {"metrics"}
    m = reply.content["metrics"]
    assert {"nll-base", "nll-global", "nll-personal", "num-tokens"} <= set(m.keys())


def test_server_cannot_overwrite_the_user_tier(setup):
    from client.app import app

    cfg, model, ctx = setup
    content = {"arrays": ArrayRecord({**model.shared_state(), PROMPT_KEY: model.user_embedding.weight.detach().clone()}), "config": ConfigRecord(client_config(cfg))}
    with pytest.raises(ValueError, match="user-tier"):
        app(Message(content=RecordDict(content), dst_node_id=1, message_type="train"), ctx)
