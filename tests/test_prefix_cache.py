"""Adapters on the top layers only (``adapter-layers``): the deep prompt and the per-record cache of the frozen layers."""

from __future__ import annotations

import pytest
import torch

from helpers import quick, spec

from client.train import TrainResult, _grad_sample_module, _trainable, encode_pairs, train_local, trim_batch
from common.models import PROMPT_KEY, PersonalLM, PrefixCache, personal_model

PAIRS = [
    ("Write a note.", "Back by six, dinner is in the oven."),
    ("Reply to Sam.", "Sounds good, see you at the lake on Sunday."),
    ("Sum up the week.", "Busy but fine."),
    ("Thank the team.", "Thanks all, the release went out without a hitch and on time."),
]


def _batch(model):
    return trim_batch(*encode_pairs(model.tokenizer, PAIRS, 64)[:])


def _perturb(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.trainable_state().values():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))


def _per_sample_grads(model, ids, att, labels):
    """Opacus' per-sample gradients of the mean per-sample token NLL, by canonical tensor name."""
    gsm = _grad_sample_module(model)
    gsm.enable_hooks()
    model.train()
    try:
        for p in model.parameters():
            p.grad, p.grad_sample = None, None
        nll, count = gsm(ids, att, labels)
        ((nll / count.clamp(min=1)).sum() / len(ids)).backward()
        names = {id(p): k for k, p in model.trainable_state().items()}
        return {names[id(p)]: p.grad_sample.clone() for p in _trainable(model)}, nll.detach()
    finally:
        gsm.disable_hooks()
        model.eval()


def test_adapters_sit_in_the_top_layers_only_and_a_bad_depth_is_refused():
    model = personal_model(spec(**{"adapter-layers": 1}))
    lora = [k for k in model.trainable_state() if k != PROMPT_KEY]
    assert lora and all(".layers.1." in f".{k.split('/', 1)[1]}" for k in lora)
    assert model.first_adapted == 1
    with pytest.raises(ValueError, match="adapter-layers = 3"):
        PersonalLM(spec(**{"adapter-layers": 3}))  # the tiny model has 2 layers


def test_the_deep_path_over_every_layer_is_the_whole_model():
    """adapter-layers = every layer runs the cached path from the embeddings: the same loss and the same
    Opacus per-sample gradients as the whole peft model with the soft prompt at the input."""
    whole, deep = personal_model(spec()), personal_model(spec(**{"adapter-layers": 2}))
    assert deep.first_adapted == 0 and deep.prefix_cache is not None
    _perturb(whole)
    deep.load_trainable({k: v.detach().clone() for k, v in whole.trainable_state().items()})
    try:
        ids, att, labels = _batch(whole)
        for model in (whole, deep):
            model.use(*model.tiers)
        g_whole, nll_whole = _per_sample_grads(whole, ids, att, labels)
        g_deep, nll_deep = _per_sample_grads(deep, ids, att, labels)
        assert torch.allclose(nll_whole, nll_deep, atol=1e-4)
        assert g_whole.keys() == g_deep.keys()
        assert all(torch.allclose(g_whole[k], g_deep[k], atol=1e-5) for k in g_whole)
    finally:
        whole.reset_to_initial()
        deep.reset_to_initial()


def test_per_sample_gradients_of_the_deep_prompt_match_each_sample_alone():
    """Opacus' hooks see the top layers and the deep prompt: its per-sample gradients are each
    record's own gradient (autograd, one record at a time)."""
    model = personal_model(spec(**{"adapter-layers": 1}))
    _perturb(model, seed=1)
    try:
        model.use(*model.tiers)
        ids, att, labels = _batch(model)
        per_sample, _ = _per_sample_grads(model, ids, att, labels)
        assert per_sample[PROMPT_KEY].abs().sum() > 0
        params = model.trainable_state()
        for i in range(len(ids)):
            row = trim_batch(ids[i : i + 1], att[i : i + 1], labels[i : i + 1])
            for p in params.values():
                p.grad = None
            nll, count = model(*row)
            (nll / count.clamp(min=1)).sum().backward()
            for k, p in params.items():
                if not p.requires_grad:
                    continue
                alone = p.grad if p.grad is not None else torch.zeros_like(p)
                # under loss_reduction="mean" Opacus undoes the 1/batch: the sample's own gradient
                assert torch.allclose(per_sample[k][i], alone, atol=1e-6), k
    finally:
        for p in model.parameters():
            p.grad, p.grad_sample = None, None
        model.reset_to_initial()


def test_a_record_scores_the_same_alone_in_a_padded_batch_and_from_the_cache():
    model = PersonalLM(spec(**{"adapter-layers": 1}))
    _perturb(model, seed=2)
    model.use(*model.tiers)
    ids, att, labels = _batch(model)
    with torch.no_grad():
        batched, _ = model(ids, att, labels)
        assert (model.prefix_cache.hits, model.prefix_cache.misses) == (0, len(ids))
        again, _ = model(ids, att, labels)
        assert model.prefix_cache.hits == len(ids)
        fresh = PersonalLM(spec(**{"adapter-layers": 1}))
        fresh.load_trainable({k: v.detach() for k, v in model.trainable_state().items()})
        fresh.use(*fresh.tiers)
        alone = torch.cat([fresh(*trim_batch(ids[i : i + 1], att[i : i + 1], labels[i : i + 1]))[0] for i in range(len(ids))])
    assert torch.equal(batched, again)
    assert torch.allclose(batched, alone, atol=1e-4)


def test_cache_misses_run_in_length_buckets_with_the_states_of_one_padded_pass(monkeypatch):
    import common.models as models

    model = PersonalLM(spec(**{"adapter-layers": 1}))
    ids, att, _ = _batch(model)
    lengths = att.sum(1).tolist()
    assert len(set(lengths)) == len(lengths)  # the fixture's rows differ in length
    monkeypatch.setattr(models, "PREFIX_CHUNK_ROWS", 0)
    one_pass = model._cached_prefix(ids, att)
    widths = []
    run_layers = model._run_layers
    monkeypatch.setattr(model, "_run_layers", lambda x, mask, a, b: (widths.append(x.shape[:2]), run_layers(x, mask, a, b))[1])
    monkeypatch.setattr(models, "PREFIX_CHUNK_ROWS", 2)
    model.prefix_cache = PrefixCache()
    bucketed = model._cached_prefix(ids, att)
    by_length = sorted(lengths)
    assert widths == [(2, by_length[1]), (2, by_length[3])]  # shortest first, each chunk cut to its longest
    assert torch.allclose(bucketed, one_pass, atol=1e-5)
    assert torch.equal(bucketed[att == 0], torch.zeros_like(bucketed[att == 0]))  # padding stays zero


def test_left_padded_rows_are_refused():
    model = personal_model(spec(**{"adapter-layers": 1}))
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(ValueError, match="right-padded"):
        model(ids, torch.tensor([[0, 1, 1]]))


def test_the_cache_is_bounded_and_drops_the_least_recently_used():
    row = torch.zeros(10, 4)  # 160 bytes
    cache = PrefixCache(max_bytes=400)
    keys = [PrefixCache.key(torch.tensor([i])) for i in range(3)]
    cache.put(keys[0], row)
    cache.put(keys[1], row)
    assert cache.get(keys[0]) is row  # 0 is now the most recently used
    cache.put(keys[2], row)  # 480 bytes > 400: 1 goes
    assert cache.get(keys[1]) is None and cache.get(keys[0]) is row and cache.get(keys[2]) is row
    cache.put(PrefixCache.key(torch.tensor([9])), torch.zeros(200))  # larger than the bound: not kept
    assert cache.get(PrefixCache.key(torch.tensor([9]))) is None


def test_dp_training_with_a_deep_prompt_trains_the_top_layers_and_the_prompt():
    model = PersonalLM(spec(**{"adapter-layers": 1}))
    before = {k: v.detach().clone() for k, v in model.trainable_state().items()}
    cfg = quick(local_steps=2, batch_size=4, noise_multiplier=0.5, lr=0.05).train
    data = encode_pairs(model.tokenizer, PAIRS * 3, 64)
    result, history, _ = train_local(model, data, cfg, None, None)
    assert isinstance(result, TrainResult) and result.steps == 2 and 0 < result.epsilon < float("inf")
    moved = {k for k, v in model.trainable_state().items() if not torch.equal(v, before[k])}
    assert PROMPT_KEY in moved and any(k.startswith("global/") for k in moved)
    assert model.prefix_cache.misses <= len(data)  # each record's frozen layers ran at most once
