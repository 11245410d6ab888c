"""The ClientApp's wire contract, exercised through the real Flower handlers."""

from __future__ import annotations

import pytest
import json

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from common.config import build_config, client_config
from common.models import PROMPT_KEY, AdapterSpec, personal_model
from common.tiers import server_state


@pytest.fixture
def setup(tiny_data, task_identity, tmp_path):
    cfg = build_config("quick", {"data-dir": str(tiny_data / "data"), "store-dir": str(tmp_path / "devices")})
    model = personal_model(AdapterSpec.from_run_config(cfg))
    model.reset_to_initial()
    ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 1, "num-partitions": 3}, state=RecordDict(), run_config={})
    return cfg, model, ctx


def _message(cfg, model, kind):
    """What the ServerApp sends: the global tier and every persona slot (common.tiers.server_state)."""
    arrays = server_state(model.shared_state(), int(cfg["persona-slots"]), float(cfg["persona-init-std"]), 0)
    content = {"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}), "config": ConfigRecord(client_config(cfg))}
    return Message(content=RecordDict(content), dst_node_id=1, message_type=kind)


def _lora_b(prefix):
    return {f"{prefix}/layers.{layer}.self_attn.{proj}.lora_B" for layer in (0, 1) for proj in ("q_proj", "v_proj")}


def test_train_reply_is_a_k_slot_update(setup):
    from client.app import app
    from client.persona import CHOICE_STATE
    from client import device

    cfg, model, ctx = setup
    # The contract, spelled out: with the default FFA split, LoRA B (A is frozen
    # at its seeded init on every party and never travels) of the global
    # adapter and of all K persona slots, plus the one-hot count; nothing else.
    assert cfg["lora-split"] == "ffa" and cfg["persona-slots"] == 3
    expected = _lora_b("global") | _lora_b("persona0") | _lora_b("persona1") | _lora_b("persona2") | {"persona-centroids", "persona-count"}
    reply = app(_message(cfg, model, "train"), ctx)
    assert set(reply.content.keys()) == {"arrays", "metrics"}
    arrays = reply.content["arrays"]
    assert set(arrays.keys()) == expected
    assert PROMPT_KEY not in arrays and not any(k.startswith("user/") for k in arrays)
    assert set(reply.content["metrics"].keys()) == {"train-loss", "num-examples", "steps", "epsilon"}
    assert reply.content["metrics"]["epsilon"] > 0
    # Exactly one slot carries a change, the one the device chose and kept to itself.
    count = arrays["persona-count"].numpy()
    chosen = int(np.argmax(count))
    assert sorted(count.tolist()) == [0.0, 0.0, 1.0]
    nonzero = {k for k in range(3) if any(np.abs(arrays[key].numpy()).sum() > 0 for key in _lora_b(f"persona{k}"))}
    assert nonzero == {chosen}
    # The centroid block carries the device's unit profile embedding in that row only.
    rows = arrays["persona-centroids"].numpy()
    assert rows.shape == (3, 384) and np.linalg.norm(rows, axis=1) == pytest.approx([1.0 if k == chosen else 0.0 for k in range(3)], abs=1e-5)
    store = device.open_store(client_config(cfg), ctx.node_config)
    assert json.loads(store.get_state(CHOICE_STATE))["train"] == {"0": chosen}


def test_without_persona_tier_the_reply_is_the_global_values(tiny_data, task_identity, tmp_path):
    from client.app import app

    cfg = build_config("quick", {"data-dir": str(tiny_data / "data"), "store-dir": str(tmp_path / "d"), "persona-slots": 0})
    model = personal_model(AdapterSpec.from_run_config(cfg))
    ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 3}, state=RecordDict(), run_config={})
    reply = app(_message(cfg, model, "train"), ctx)
    assert set(reply.content["arrays"].keys()) == _lora_b("global")


def test_separate_split_sends_a_and_b(tiny_data, task_identity, tmp_path):
    from client.app import app

    cfg = build_config("quick", {"data-dir": str(tiny_data / "data"), "store-dir": str(tmp_path / "d"), "lora-split": "separate", "persona-slots": 0})
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
    assert {"nll-base", "nll-global", "nll-persona", "nll-personal", "nll-served", "routing-group", "num-tokens"} <= set(m.keys())
    assert m["routing-group"] == 2 and m["nll-served"] == m["nll-personal"]  # ~40 train tasks: a frequent user


def test_server_cannot_overwrite_the_user_tier(setup):
    from client.app import app

    cfg, model, ctx = setup
    msg = _message(cfg, model, "train")
    msg.content["arrays"][PROMPT_KEY] = Array(model.user_embedding.weight.detach().numpy().copy())
    content = dict(msg.content.items())
    with pytest.raises(ValueError, match="user-tier"):
        app(Message(content=RecordDict(content), dst_node_id=1, message_type="train"), ctx)
