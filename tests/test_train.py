"""DP training on the device: weights really change, and epsilon accumulates."""

from __future__ import annotations

import json
import math

import pytest
import torch

from helpers import quick, spec

from client.accounting import epsilon_from_history
from client.train import encode_pairs, evaluate_nll, train_local
from common.models import personal_model, tier_of

PAIRS = [(f"Write a short note about topic {i}.", f"Status: ok. Topic: {i}. Next: ship it. EOM.") for i in range(24)]


@pytest.fixture(scope="module", params=["separate", "ffa"])
def model(request):
    return personal_model(spec(lora_split=request.param))


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.trainable_state().items()}


def test_dp_step_changes_every_trainable_tensor(model):
    """Guards against the Opacus+peft silent no-op (opacus#820)."""
    model.reset_to_initial()
    data = encode_pairs(model.tokenizer, PAIRS, 64)
    before = _snapshot(model)
    result, history, _ = train_local(model, data, quick(local_steps=1, batch_size=8).train, None, None, torch.Generator().manual_seed(0))
    assert result.steps == 1
    after = _snapshot(model)
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert unchanged == [], f"tensors that did not change under DP: {unchanged[:5]}"
    # Both tiers' LoRA B matrices (initialised to zero by peft) must move.
    assert any(tier_of(k) == "global" and "lora_B" in k and after[k].abs().sum() > 0 for k in after)
    assert any(tier_of(k) == "user" and "lora_B" in k and after[k].abs().sum() > 0 for k in after)


def test_ffa_keeps_every_lora_a_frozen(model):
    if model.spec.lora_split != "ffa":
        pytest.skip("FFA only")
    model.reset_to_initial()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_A." in n}
    assert frozen and not any(k.endswith("lora_A") for k in model.trainable_state())
    data = encode_pairs(model.tokenizer, PAIRS, 64)
    train_local(model, data, quick(local_steps=2, batch_size=8).train, None, None)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_accountant_persists_across_rounds(model):
    model.reset_to_initial()
    data = encode_pairs(model.tokenizer, PAIRS, 64)
    cfg = quick(local_steps=2, batch_size=8, noise_multiplier=1.0).train
    r1, h1, o1 = train_local(model, data, cfg, None, None)
    r2, h2, _ = train_local(model, data, cfg, h1, o1)
    assert 0 < r1.epsilon < r2.epsilon
    steps = sum(h[2] for h in json.loads(h2)["history"])
    assert steps == 4  # two rounds of two steps, not reset between rounds
    assert epsilon_from_history(h2, cfg.accountant_delta) == pytest.approx(r2.epsilon)


def test_accountant_matches_independent_rdp_computation(model):
    """Opacus' RDP epsilon agrees with Google's dp-accounting for the same mechanism."""
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    history = json.dumps({"history": [[0.9, 0.25, 12]], "mechanism": "rdp"})
    ours = epsilon_from_history(history, 1e-5)
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    acc = RdpAccountant(orders)
    acc.compose(dp_accounting.PoissonSampledDpEvent(0.25, dp_accounting.GaussianDpEvent(0.9)), 12)
    theirs = acc.get_epsilon(1e-5)
    assert ours == pytest.approx(theirs, rel=0.05)


def test_without_dp_epsilon_is_infinite_and_training_still_learns(model):
    model.reset_to_initial()
    data = encode_pairs(model.tokenizer, PAIRS, 64)
    before, _ = evaluate_nll(model, data, ("global", "user"))
    result, history, _ = train_local(model, data, quick(local_steps=8, batch_size=8, dp=False, lr=1e-2).train, None, None)
    after, _ = evaluate_nll(model, data, ("global", "user"))
    assert math.isinf(result.epsilon) and history is None
    assert after < before


def test_loss_covers_only_output_tokens(model):
    data = encode_pairs(model.tokenizer, [("in put", "out")], 64)
    ids, mask, labels = data.tensors
    prompt_len = len(model.tokenizer("in put\n", add_special_tokens=False)["input_ids"])
    assert (labels[0, :prompt_len] == -100).all()
    assert (labels[0, prompt_len:][mask[0, prompt_len:] == 1] != -100).all()


def test_a_long_prompt_leaves_its_answer_room():
    """A label keeps the text before it (the window minus the label), a long
    written answer keeps half the window; the answer is never cut first."""
    tok = personal_model(spec()).tokenizer
    n = lambda text: len(tok(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    source = "Label the text. Options: yes, no. Text: " + "word " * 40
    for target, room in (("yes", n("yes") + 1), ("z " * 40, 32)):
        ids, mask, labels = encode_pairs(tok, [(source, target)], 64).tensors
        prompt_len = int((labels[0] == -100).sum() - (mask[0] == 0).sum())
        assert prompt_len == 64 - room and n(source + "\n") > prompt_len
        assert int(mask[0].sum()) == 64
    # Passed explicitly, the room replaces the answer's own length.
    ids, mask, labels = encode_pairs(tok, [(source, "yes")], 64, answer_room=[10]).tensors
    assert int((labels[0] == -100).sum() - (mask[0] == 0).sum()) == 54


def test_every_option_is_scored_after_the_same_prompt(monkeypatch):
    """Options of different lengths: the prompt is cut once, for the longest."""
    import client.train as train

    model = personal_model(spec())
    seen = []
    real = train.encode_pairs
    monkeypatch.setattr(train, "encode_pairs", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    source = "Label the text. Options: no, certainly not. Text: " + "word " * 40
    picks = train.option_predictions(model, [(source, ["no", "certainly not"])], model.tiers, 64)
    assert len(picks) == 1
    ids, mask, labels = seen[0].tensors
    prompt_lens = [int((labels[r] == -100).sum() - (mask[r] == 0).sum()) for r in range(2)]
    assert prompt_lens[0] == prompt_lens[1] and torch.equal(ids[0, : prompt_lens[0]], ids[1, : prompt_lens[1]])


def test_would_exceed_charges_one_more_round_at_the_device_rate():
    from client.accounting import sample_rate, would_exceed

    cfg = quick(local_steps=2, batch_size=6).train
    assert sample_rate(cfg, 60) == pytest.approx(0.1) and sample_rate(cfg, 3) == 1.0
    state = json.dumps({"history": [[1.0, 0.1, 2]], "mechanism": "rdp"})
    now = epsilon_from_history(state, cfg.accountant_delta)
    after = epsilon_from_history(json.dumps({"history": [[1.0, 0.1, 4]], "mechanism": "rdp"}), cfg.accountant_delta)
    assert not would_exceed(state, cfg, 60, after + 1e-6) and would_exceed(state, cfg, 60, (now + after) / 2)
    assert not would_exceed(state, cfg, 60, 0.0)  # no cap


from client.train import trim_batch as _REAL_TRIM_BATCH  # noqa: E402


def _batches_drawn(model, data, cfg, generator, monkeypatch):
    """The input ids of every batch train_local draws (recorded at trim_batch)."""
    from client import train as train_mod

    seen = []
    real = _REAL_TRIM_BATCH

    def spy(input_ids, attention, labels):
        seen.append(input_ids.clone())
        return real(input_ids, attention, labels)

    monkeypatch.setattr(train_mod, "trim_batch", spy)
    model.reset_to_initial()
    train_local(model, data, cfg, None, None, generator)
    return seen


def test_under_dp_the_poisson_sample_comes_from_the_os_not_the_run_seed(model, monkeypatch):
    """The server knows the run seed; a batch drawn from it would void amplification by sampling."""
    data = encode_pairs(model.tokenizer, PAIRS, 64)
    dp = quick(local_steps=4, batch_size=8).train
    a = _batches_drawn(model, data, dp, None, monkeypatch)
    b = _batches_drawn(model, data, dp, None, monkeypatch)
    assert [x.shape[0] for x in a] != [x.shape[0] for x in b] or any(not torch.equal(x, y) for x, y in zip(a, b))
    # Without DP the seeded order stays (reproducible non-private baselines and tests).
    plain = quick(local_steps=4, batch_size=8, dp=False).train
    c = _batches_drawn(model, data, plain, torch.Generator().manual_seed(7), monkeypatch)
    d = _batches_drawn(model, data, plain, torch.Generator().manual_seed(7), monkeypatch)
    assert all(torch.equal(x, y) for x, y in zip(c, d)) and len(c) == len(d)


def test_an_empty_poisson_batch_runs_the_noise_only_step(model, monkeypatch):
    """The accounted mechanism releases noise every step; an empty batch must not skip it."""
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    monkeypatch.setattr(UniformWithReplacementSampler, "__iter__", lambda self: iter([[] for _ in range(self.steps)]))
    model.reset_to_initial()
    data = encode_pairs(model.tokenizer, PAIRS, 64)
    before = _snapshot(model)
    result, history, _ = train_local(model, data, quick(local_steps=2, batch_size=8).train, None, None)
    after = _snapshot(model)
    assert result.steps == 2 and sum(h[2] for h in json.loads(history)["history"]) == 2
    assert all(not torch.equal(before[k], after[k]) for k in before)  # noise moved every trainable tensor


def test_a_logical_batch_larger_than_memory_is_split_and_charged_once_per_step(model):
    """BatchMemoryManager: physical batches of 4 inside a logical batch of 12; the accountant sees 2 steps at q = 12/24."""
    model.reset_to_initial()
    data = encode_pairs(model.tokenizer, PAIRS, 64)
    result, history, _ = train_local(model, data, quick(local_steps=2, batch_size=12, physical_batch=4).train, None, None)
    entries = json.loads(history)["history"]
    assert result.steps == 2 and sum(h[2] for h in entries) == 2 and entries[0][1] == pytest.approx(0.5)
    assert result.instruments and 0 <= result.instruments["clip_fraction"] <= 1 and result.instruments["snr"] is not None
    assert set(result.instruments["snr_by_tier"]) == {tier_of(k) for k in model.trainable_state()}


def test_instruments_signal_to_noise_per_tier_counts_only_the_tiers_own_coordinates():
    """Noise in one tier's coordinates never moves another tier's weights: each tier's ratio uses its own d."""
    from client.train import _Instruments

    user, shared = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(1))
    user.grad_sample = torch.tensor([[0.3, 0.0, 0.4], [3.0, 0.0, 4.0]])  # norms 0.5 and 5: the second is clipped to 1
    shared.grad_sample = torch.zeros(2, 1)
    inst = _Instruments([user, shared], expected_batch=2, tiers=["user", "global"])
    inst.observe([user, shared], clip=1.0)
    inst.step_done(clip=1.0, noise_multiplier=2.0)
    out = inst.summary()
    mean_clipped = math.hypot(0.3 + 0.6, 0.4 + 0.8) / 2  # (0.3, 0, 0.4) + (5 -> 1 scaled) (0.6, 0, 0.8), over B = 2
    noise = lambda d: 2.0 * 1.0 * math.sqrt(d) / 2  # noqa: E731  sigma * C * sqrt(d) / B
    assert out["snr_by_tier"]["user"] == pytest.approx(mean_clipped / noise(3), rel=1e-5)
    assert out["snr_by_tier"]["global"] == 0.0
    assert out["snr"] == pytest.approx(mean_clipped / noise(4), rel=1e-5)  # the whole vector counts the idle coordinate too
    assert out["clip_fraction"] == 0.5


def test_batch_size_zero_takes_every_record_in_every_step_at_rate_one(model):
    """``batch-size = 0``: the whole local set per step; the accountant sees q = 1 (no amplification claimed)."""
    from client.accounting import sample_rate

    model.reset_to_initial()
    data = encode_pairs(model.tokenizer, PAIRS, 64)
    cfg = quick(local_steps=2, batch_size=0, physical_batch=5).train
    assert cfg.batch_for(24) == 24 and cfg.batch_for(3) == 3 and sample_rate(cfg, 24) == 1.0
    result, history, _ = train_local(model, data, cfg, None, None)
    entries = json.loads(history)["history"]
    assert result.steps == 2 and entries == [[cfg.noise_multiplier, 1.0, 2]]
    with pytest.raises(ValueError, match="batch-size"):
        quick(batch_size=-1)


def test_length_sorted_physical_batches_pad_less_and_train_the_same(model, monkeypatch):
    """Under DP a logical batch is cut into physical batches of similar length: less padding, the same clipped sum."""
    from client import train as train_mod

    # Rows of very different lengths, interleaved so that index order mixes them.
    pairs = [(f"Note {i}.", ("word " * (2 + (i % 4) * 9)).strip()) for i in range(16)]
    data = encode_pairs(model.tokenizer, pairs, 64)
    cfg = quick(local_steps=1, batch_size=0, physical_batch=4, noise_multiplier=0.0, target_epsilon=0.0).train
    cells = []  # rows x trimmed width of every physical batch

    def spy(input_ids, attention, labels):
        cells.append(input_ids.shape[0] * int(attention.sum(1).max()))
        return _REAL_TRIM_BATCH(input_ids, attention, labels)

    monkeypatch.setattr(train_mod, "trim_batch", spy)
    results = {}
    for arm, sort in (("sorted", train_mod.length_sorted), ("index order", lambda d: d)):
        monkeypatch.setattr(train_mod, "length_sorted", sort)
        cells.clear()
        model.reset_to_initial()
        train_local(model, data, cfg, None, None)
        results[arm] = (len(cells), sum(cells), _snapshot(model))
    tokens = int(data.tensors[1].sum())
    assert results["sorted"][0] == results["index order"][0] == 4  # four physical batches of 4 at q = 1
    assert results["sorted"][1] < results["index order"][1] and results["sorted"][1] - tokens < (results["index order"][1] - tokens) / 2
    after_sorted, after_index = results["sorted"][2], results["index order"][2]
    assert all(torch.allclose(after_sorted[k], after_index[k], atol=1e-6) for k in after_sorted)


def test_without_dp_chunked_gradients_equal_the_whole_batch(model):
    from client.train import _backward

    data = encode_pairs(model.tokenizer, PAIRS[:8], 64)
    grads = []
    for chunk in (None, 3):
        model.reset_to_initial()
        model.use(*model.tiers)
        for p in model.trainable_state().values():
            p.grad = None
        _backward(model, *data.tensors, chunk)
        grads.append({k: v.grad.clone() for k, v in model.trainable_state().items() if v.grad is not None})
    assert grads[0].keys() == grads[1].keys() and all(torch.allclose(grads[0][k], grads[1][k], atol=1e-6) for k in grads[0])


def test_private_tier_prompt_trains_the_soft_prompt_but_not_the_user_adapter(model):
    model.reset_to_initial()
    data = encode_pairs(model.tokenizer, PAIRS, 64)
    before = _snapshot(model)
    train_local(model, data, quick(local_steps=1, batch_size=8, private_tier="prompt").train, None, None)
    after = _snapshot(model)
    user_lora = [k for k in before if tier_of(k) == "user" and k != "user_embedding"]
    assert user_lora and all(torch.equal(before[k], after[k]) for k in user_lora)
    assert not torch.equal(before["user_embedding"], after["user_embedding"])


def test_prv_accounting_is_tighter_than_rdp_for_the_same_mechanism(model):

    model.reset_to_initial()
    data = encode_pairs(model.tokenizer, PAIRS, 64)
    _, history, _ = train_local(model, data, quick(local_steps=2, batch_size=8, accountant="prv").train, None, None)
    state = json.loads(history)
    assert state["mechanism"] == "prv"
    rdp = epsilon_from_history(json.dumps({**state, "mechanism": "rdp"}), 1e-5)
    assert 0 < epsilon_from_history(history, 1e-5) < rdp


def test_calibrated_noise_ends_the_planned_rounds_at_the_target_not_above():
    from client.accounting import calibrated_noise, sample_rate

    for accountant in ("rdp", "prv"):
        for batch in (6, 0):
            for records in (3, 40, 400):
                # DP-SGD alone (tests/test_context.py covers calibration with the phrase release before it)
                cfg = quick(target_epsilon=4.0, local_steps=2, batch_size=batch, accountant=accountant, context="none").train
                z = calibrated_noise(cfg, records, planned_rounds=3)
                history = json.dumps({"history": [[z, sample_rate(cfg, records), 6]], "mechanism": accountant})
                assert 3.8 <= epsilon_from_history(history, cfg.delta) <= 4.0


def test_dp_adambc_moves_signal_coordinates_further_than_adam_under_the_same_noise():
    from client.train import DPAdamBC

    torch.manual_seed(0)
    signal = torch.cat([torch.full((500,), 1.0), torch.zeros(500)])  # half the coordinates carry signal (SNR 1)
    w_plain, w_bc = torch.zeros(1000, requires_grad=True), torch.zeros(1000, requires_grad=True)
    plain, bc = torch.optim.Adam([w_plain], lr=0.01), DPAdamBC([w_bc], lr=0.01, noise_variance=1.0)
    for _ in range(50):
        grad = signal + torch.randn(1000)  # DP noise of variance 1
        for w, opt in ((w_plain, plain), (w_bc, bc)):
            w.grad = grad.clone()
            opt.step()
    # Descending the signal: Adam divides it by the noise's scale, DP-AdamBC by the signal's.
    assert (-w_bc[:500]).mean() > 1.2 * (-w_plain[:500]).mean() > 0
    # Coordinates without signal move about as they do under Adam.
    assert w_bc[500:].abs().mean() < 1.5 * w_plain[500:].abs().mean()


def test_the_head_at_target_positions_only_gives_the_same_loss_and_per_sample_gradients(model):
    """The LM head runs only where a target token is predicted; Opacus sees the same per-sample gradients as with full logits."""
    from client.train import _grad_sample_module, _trainable, trim_batch
    from common.models import per_sample_nll

    model.reset_to_initial()
    model.use(*model.tiers)
    ids, att, labels = trim_batch(*encode_pairs(model.tokenizer, PAIRS[:5] + [("x", "y")], 64)[:])
    labels[0, :] = -100  # a row without targets
    gsm = _grad_sample_module(model)
    gsm.enable_hooks()
    model.train()  # Opacus records activations only in training mode
    grads = []
    try:
        for at_targets in (True, False):
            for p in model.parameters():  # a previous step's per-sample gradients would accumulate
                p.grad, p.grad_sample = None, None
            model._head_at_targets = at_targets
            nll, count = gsm(ids, att, labels) if at_targets else per_sample_nll(gsm(ids, att), labels)
            ((nll / count.clamp(min=1)).sum() / len(ids)).backward()
            grads.append(({id(p): p.grad_sample.clone() for p in _trainable(model)}, nll.detach(), count))
    finally:
        model._head_at_targets = True
        gsm.disable_hooks()
        model.eval()
    (fast, nll_fast, n_fast), (full, nll_full, n_full) = grads
    assert torch.equal(n_fast, n_full) and n_fast[0] == 0
    assert torch.allclose(nll_fast, nll_full, atol=1e-4)
    assert fast.keys() == full.keys() and all(torch.allclose(fast[k], full[k], atol=1e-5) for k in fast)


def test_group_clipping_clips_each_group_to_its_share_and_keeps_the_sensitivity():
    from client.train import group_clip_factors

    prompt = torch.tensor([[8.0, 0.0], [0.1, 0.0]])  # sample 0: the prompt holds the norm; sample 1: tiny
    lora = torch.tensor([[0.0, 0.26, 0.0], [3.0, 4.0, 0.0]])
    norms, (f_prompt, f_lora) = group_clip_factors([prompt, lora], [0, 1], 1.0, (0.5, 0.5))
    c = math.sqrt(0.5)
    assert torch.allclose(norms, torch.tensor([math.hypot(8.0, 0.26), math.hypot(0.1, 5.0)]))
    assert f_prompt.tolist() == pytest.approx([c / 8.0, 1.0], rel=1e-5) and f_lora.tolist() == pytest.approx([1.0, c / 5.0], rel=1e-5)
    torch.manual_seed(0)
    for _ in range(20):  # whatever the parts, a clipped sample's norm stays within C
        parts = [torch.randn(16, 4) * 10 ** torch.randn(1), torch.randn(16, 6) * 10 ** torch.randn(1)]
        _, factors = group_clip_factors(parts, [0, 1], 2.0, (0.2, 0.8))
        clipped = torch.cat([g * f[:, None] for g, f in zip(parts, factors)], dim=1)
        assert bool((clipped.norm(dim=1) <= 2.0 + 1e-5).all())


def test_group_clipping_replaces_opacus_flat_clip_on_the_optimizer():
    """The optimizer's summed gradient is the per-group clipped sum of Opacus' own per-sample gradients."""
    from opacus import PrivacyEngine

    from client.train import group_clip_factors, install_group_clipping

    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    x, y = torch.randn(8, 3) * 5, torch.randn(8, 2)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    net, opt, _ = PrivacyEngine().make_private(module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
                                               data_loader=loader, noise_multiplier=0.0, max_grad_norm=1.0)
    install_group_clipping(opt, [0, 1], (0.3, 0.7))  # weight, then bias
    torch.nn.functional.mse_loss(net(x), y).backward()
    samples = [p.grad_sample.reshape(8, -1) for p in opt.params]
    _, factors = group_clip_factors(samples, [0, 1], 1.0, (0.3, 0.7))
    opt.clip_and_accumulate()
    for p, g, f in zip(opt.params, samples, factors):
        assert torch.allclose(p.summed_grad.reshape(-1), (g * f[:, None]).sum(0), atol=1e-6)
    flat = torch.cat(samples, 1)
    assert not torch.allclose(opt.params[1].summed_grad.reshape(-1), (flat * (1.0 / flat.norm(dim=1)).clamp(max=1)[:, None]).sum(0)[-2:], atol=1e-4)


def test_prompt_clip_share_is_validated_and_excludes_adaptive_clipping():
    from common.config import ConfigError

    assert quick(prompt_clip_share=0.5).train.prompt_clip_share == 0.5
    with pytest.raises(ConfigError, match="prompt-clip-share"):
        quick(prompt_clip_share=1.0)
    with pytest.raises(ConfigError, match="prompt-clip-share"):
        quick(prompt_clip_share=0.5, adaptive_clip_quantile=0.5)


def test_train_local_with_per_group_clipping_runs_and_reports(model):
    model.reset_to_initial()
    data = encode_pairs(model.tokenizer, PAIRS, 64)
    cfg = quick(local_steps=2, batch_size=0, physical_batch=5, prompt_clip_share=0.5).train
    result, history, _ = train_local(model, data, cfg, None, None)
    assert result.steps == 2 and json.loads(history)["history"] == [[cfg.noise_multiplier, 1.0, 2]]
    assert 0 <= result.instruments["clip_fraction"] <= 1 and result.instruments["snr_by_tier"]
