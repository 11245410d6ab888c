"""The ClientApp's wire contract, exercised through the real Flower handlers."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, Message, RecordDict
from helpers import device_context, quick, server_message, user_files

from client import device
from client.app import app
from common.models import PROMPT_KEY
from common.wire import REFUSAL, Reason


@pytest.fixture
def setup(tiny_data, task_identity, tmp_path):
    cfg = quick(secagg=False)
    ctx = device_context(tmp_path, 1, user_files(tiny_data)[1], cfg)
    return cfg, ctx, tmp_path / "device-1" / "store.sqlite"


def _lora_b(prefix):
    return {f"{prefix}/layers.{layer}.self_attn.{proj}.lora_B" for layer in (0, 1) for proj in ("q_proj", "v_proj")}


def test_train_reply_is_a_k_slot_update_and_nothing_else(setup):
    from client.persona import CHOICE_STATE

    cfg, ctx, store_path = setup
    # The contract, spelled out: with the default FFA split, LoRA B (A is frozen
    # at its seeded init on every party and never travels) of the global
    # adapter and of all K persona slots, the centroid block and the one-hot
    # count; no metrics at all.
    assert cfg.model.lora_split == "ffa" and cfg.persona.slots == 3
    expected = _lora_b("global") | _lora_b("persona0") | _lora_b("persona1") | _lora_b("persona2") | {"persona-centroids", "persona-count"}
    reply = app(server_message(cfg, "train"), ctx)
    assert set(reply.content.keys()) == {"arrays"}
    arrays = reply.content["arrays"]
    assert set(arrays.keys()) == expected
    assert PROMPT_KEY not in arrays and not any(k.startswith("user/") for k in arrays)
    # Exactly one slot carries a change, the one the device chose and kept to itself.
    count = arrays["persona-count"].numpy()
    chosen = int(np.argmax(count))
    assert sorted(count.tolist()) == [0.0, 0.0, 1.0]
    nonzero = {k for k in range(3) if any(np.abs(arrays[key].numpy()).sum() > 0 for key in _lora_b(f"persona{k}"))}
    assert nonzero == {chosen}
    # The default choice is drawn from the device's own secret, not its data, so
    # no profile leaves the device: the centroid block is all zeros.
    rows = arrays["persona-centroids"].numpy()
    assert rows.shape == (3, 384) and not rows.any()
    store = device.DeviceStore(store_path)
    assert json.loads(store.get_state(CHOICE_STATE))["train"] == {"1": chosen}
    # ... and the same slot every round.
    app(server_message(cfg, "train", 2), ctx)
    assert json.loads(store.get_state(CHOICE_STATE))["train"] == {"1": chosen, "2": chosen}
    # What the device learned about its round stays with it.
    diag = device.get_json(store, device.DIAGNOSTICS, None)
    assert diag["rounds"]["1"]["persona"] == chosen and diag["rounds"]["1"]["epsilon"] > 0


def test_without_persona_tier_the_reply_is_the_global_update(tiny_data, task_identity, tmp_path):
    cfg = quick(secagg=False, persona_slots=0)
    ctx = device_context(tmp_path, 1, user_files(tiny_data)[0], cfg)
    reply = app(server_message(cfg, "train"), ctx)
    assert set(reply.content["arrays"].keys()) == _lora_b("global")


def test_separate_split_sends_a_and_b(tiny_data, task_identity, tmp_path):
    cfg = quick(secagg=False, lora_split="separate", persona_slots=0)
    ctx = device_context(tmp_path, 1, user_files(tiny_data)[0], cfg)
    reply = app(server_message(cfg, "train"), ctx)
    expected = {f"global/layers.{layer}.self_attn.{proj}.lora_{ab}" for layer in (0, 1) for proj in ("q_proj", "v_proj") for ab in "AB"}
    assert set(reply.content["arrays"].keys()) == expected


def test_a_device_out_of_the_persona_tier_sends_zero_slots_and_count(tiny_data, task_identity, tmp_path):
    cfg = quick(secagg=False)
    ctx = device_context(tmp_path, 1, user_files(tiny_data)[1], cfg, persona_tier=False)
    arrays = app(server_message(cfg, "train"), ctx).content["arrays"]
    assert not arrays["persona-count"].numpy().any() and not arrays["persona-centroids"].numpy().any()
    assert not any(arrays[k].numpy().any() for k in arrays.keys() if k.startswith("persona") and "lora" in k)
    assert any(arrays[k].numpy().any() for k in _lora_b("global"))


def test_user_tier_stays_on_device_and_the_accountant_persists(setup):
    cfg, ctx, store_path = setup
    app(server_message(cfg, "train", 1), ctx)
    store = device.DeviceStore(store_path)
    assert store.get_state(device.USER_TIER) is not None
    app(server_message(cfg, "evaluate", 1), ctx)
    eps1 = device.get_json(store, device.EVAL_RESULTS, None)["epsilon"]
    app(server_message(cfg, "train", 2), ctx)
    app(server_message(cfg, "evaluate", 2), ctx)
    eps2 = device.get_json(store, device.EVAL_RESULTS, None)["epsilon"]
    assert 0 < eps1 < eps2  # the accountant is not reset between rounds
    # Persisted through Opacus' state_dict, not a bare history list.
    state = json.loads(store.get_state(device.ACCOUNTANT))
    assert state["mechanism"] == cfg.train.accountant == "prv" and len(state["history"]) >= 1


def test_evaluate_reply_carries_no_metrics_and_the_results_stay_on_the_device(setup):
    cfg, ctx, store_path = setup
    reply = app(server_message(cfg, "evaluate"), ctx)
    assert set(reply.content.keys()) == {"metrics"} and len(reply.content["metrics"]) == 0
    results = device.get_json(device.DeviceStore(store_path), device.EVAL_RESULTS, None)
    assert set(results["nll"]) == {"base", "global", "persona", "personal", "served"}
    assert results["routing_group"] == 2 and results["nll"]["served"] == results["nll"]["personal"]  # ~40 train tasks: a frequent user


def test_server_cannot_overwrite_the_user_tier(setup):
    from common.wire import refusal_reason

    cfg, ctx, _ = setup
    msg = server_message(cfg, "train")
    msg.content["arrays"][PROMPT_KEY] = Array(np.zeros((4, 64), dtype=np.float32))
    reply = app(Message(content=RecordDict(dict(msg.content.items())), dst_node_id=1, message_type="train"), ctx)
    assert refusal_reason(reply.content) == Reason.PROTOCOL_ERROR


def test_a_device_without_training_tasks_declines_with_a_reason(tiny_data, task_identity, tmp_path):
    only_docs = tmp_path / "docs.jsonl"
    only_docs.write_text('{"type":"document","id":"d1","text":"Just a note."}\n{"type":"task","id":"t1","split":"test","input":"a","output":"b"}\n')
    cfg = quick(secagg=False)
    ctx = device_context(tmp_path, 1, only_docs, cfg)
    reply = app(server_message(cfg, "train"), ctx)
    assert set(reply.content.keys()) == {REFUSAL} and Reason(reply.content[REFUSAL]["reason"]) == Reason.NO_TRAINING_DATA
    only_train = tmp_path / "train.jsonl"
    only_train.write_text('{"type":"task","id":"t1","split":"train","input":"a","output":"b"}\n')
    ctx = device_context(tmp_path, 2, only_train, cfg)
    reply = app(server_message(cfg, "evaluate"), ctx)
    assert Reason(reply.content[REFUSAL]["reason"]) == Reason.NO_TEST_DATA
    # An empty user file is an ingest error (it names the file), not a device with no data.
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    ctx = device_context(tmp_path, 3, empty, cfg)
    reply = app(server_message(cfg, "evaluate"), ctx)
    assert Reason(reply.content[REFUSAL]["reason"]) == Reason.INGEST_ERROR
    assert not (tmp_path / "device-3" / "store.sqlite").exists() and not (tmp_path / "device-3" / "store.key").exists()
