"""Model registry and the personalised model's parameter layout."""

from __future__ import annotations

import pytest
import torch

from helpers import spec

from common.models import (
    PROMPT_KEY,
    ModelNotAvailable,
    canonical_lora_name,
    load_base_model,
    personal_model,
    tier_of,
)


def test_unknown_model_is_a_clear_error():
    with pytest.raises(ModelNotAvailable, match="unknown model"):
        load_base_model("no-such-model")


def test_local_directory_is_loaded_by_path(tmp_path):
    model, tok = load_base_model("tiny-random")
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    again, tok2 = load_base_model(str(tmp_path))
    ids = torch.tensor([tok("hello")["input_ids"]])
    assert torch.allclose(model(ids).logits, again(ids).logits)
    assert not any(p.requires_grad for p in again.parameters())


def test_tiers_and_names():
    model = personal_model(spec())
    keys = set(model.trainable_state())
    assert PROMPT_KEY in keys
    assert {tier_of(k) for k in keys} == {"global", "persona", "user"}
    assert set(model.shared_state()) == {k for k in keys if k.startswith(("global/", "persona/"))}
    # The persona adapter lives in the global adapter's LoRA subspace (same frozen
    # A), which is what lets the server fold a small persona into the global tier.
    for module in model.peft.modules():
        if hasattr(module, "lora_A") and "persona" in module.lora_A:
            assert torch.equal(module.lora_A["persona"].weight, module.lora_A["global"].weight)
    without = personal_model(spec(persona_slots=0))
    assert {tier_of(k) for k in without.trainable_state()} == {"global", "user"}
    assert canonical_lora_name("base_model.model.model.layers.3.self_attn.q_proj.lora_A.global.weight") == "global/layers.3.self_attn.q_proj.lora_A"


def test_same_spec_same_initial_shared_tier_in_every_process():
    """Clients and server derive identical initial global adapters from the seed."""
    from common.models import PersonalLM

    a = personal_model(spec(seed=3)).initial_shared_state()
    b = PersonalLM(spec(seed=3)).shared_state()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_base_model_is_untouched_by_disabled_adapters():
    model = personal_model(spec())
    ids = torch.tensor([[1, 2, 3, 4]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        for p in model.trainable_state().values():
            p.add_(0.5)
        model.use()
        base_logits = model(ids, mask)
        model.use("global", "user")
        tuned = model(ids, mask)
        fresh, _ = load_base_model("tiny-random")
        reference = fresh(ids, attention_mask=mask).logits
    model.reset_to_initial()
    # "base" really is the base: adapters and soft prompt fully bypassed.
    assert torch.allclose(base_logits, reference, atol=1e-5)
    assert not torch.allclose(base_logits, tuned)
