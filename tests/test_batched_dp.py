"""The batched many-device DP-SGD path (simulations/batched_dp.py) against per-device Opacus on the tiny model."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from helpers import quick

from client.train import _grad_sample_module, _trainable, encode_pairs, train_local, trim_batch
from common.models import PersonalLM, AdapterSpec
from simulations.batched_dp import BatchedDPSGD, DeviceData

PAIRS = [
    ("Write a note.", "Back by six, dinner is in the oven."),
    ("Reply to Sam.", "Sounds good, see you at the lake on Sunday."),
    ("Sum up the week.", "Busy but fine."),
    ("Thank the team.", "Thanks all, the release went out without a hitch and on time."),
    ("Plan Friday.", "Groceries, then the long walk by the river."),
]
# Three devices with different record counts and different padded widths.
DEVICE_PAIRS = [PAIRS[:2], PAIRS[1:], PAIRS[2:5]]


def _setup(optimizer="sgd", **flat):
    cfg = quick(**{"adapter-layers": 1, "batch-size": 0, "optimizer": optimizer, "context": "none", **flat})
    model = PersonalLM(AdapterSpec.from_config(cfg))
    data = [DeviceData(*encode_pairs(model.tokenizer, pairs, 64)[:]) for pairs in DEVICE_PAIRS]
    gen = torch.Generator().manual_seed(7)
    # Distinct tensors per device; LoRA B is nonzero, so every LoRA A carries gradient too.
    states = [{k: v.detach() + 0.05 * torch.randn(v.shape, generator=gen) for k, v in model.trainable_state().items()}
              for _ in data]
    return cfg, model, data, states


def _opacus_per_sample(model: PersonalLM, data: DeviceData) -> dict[str, torch.Tensor]:
    gsm = _grad_sample_module(model)
    gsm.enable_hooks()
    model.use(*model.tiers)
    model.train()
    try:
        for p in model.parameters():
            p.grad, p.grad_sample = None, None
        ids, att, labels = trim_batch(data.input_ids, data.attention, data.labels)
        nll, count = gsm(ids, att, labels)
        ((nll / count.clamp(min=1)).sum() / len(ids)).backward()
        names = {id(p): k for k, p in model.trainable_state().items()}
        return {names[id(p)]: p.grad_sample.clone() for p in _trainable(model)}
    finally:
        gsm.disable_hooks()
        model.eval()


def test_per_sample_gradients_match_opacus_per_device():
    cfg, model, data, states = _setup()
    batched = BatchedDPSGD(model, data, states, cfg.train, noise_multipliers=[1.0] * 3, devices_per_pass=2)
    picks = [torch.arange(len(d)) for d in data]
    grads, owner = batched.per_sample_grads([0, 1, 2], picks)
    assert type(model.user_embedding) is torch.nn.Embedding  # the row-wise stand-ins are swapped back out
    for i, state in enumerate(states):
        model.load_trainable(state)
        reference = _opacus_per_sample(model, data[i])
        rows = owner == i
        assert set(reference) == set(grads)
        for name, ref in reference.items():
            assert ref.abs().max() > 0, name
            torch.testing.assert_close(grads[name][rows], ref, atol=1e-5, rtol=1e-4, msg=name)


def test_one_clipped_step_matches_train_local_per_device():
    """Noise 0 isolates the deterministic part: per-sample clipping, the per-device sum over the expected batch, the
    optimizer step. A clip norm below most per-sample norms makes the clipping bite."""
    cfg, model, data, states = _setup(**{"max-grad-norm": 0.05, "noise-multiplier": 0.0, "local-steps": 1, "target-epsilon": 0, "accountant": "rdp"})
    batched = BatchedDPSGD(model, data, states, cfg.train, noise_multipliers=[0.0] * 3, devices_per_pass=2)
    stats = batched.step()
    assert stats["clip_fraction"] > 0.5
    for i, state in enumerate(states):
        model.load_trainable(state)
        train_local(model, TensorData(data[i]), cfg.train, None, None)
        for name, value in model.trainable_state().items():
            assert not torch.equal(value.detach(), state[name]), name  # the step moved it
            torch.testing.assert_close(batched.state(i)[name], value.detach(), atol=1e-6, rtol=1e-5, msg=name)


def TensorData(d: DeviceData):
    return torch.utils.data.TensorDataset(d.input_ids, d.attention, d.labels)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_each_device_is_charged_as_train_local_charges_it(accountant):
    cfg, model, data, states = _setup(**{"local-steps": 2, "accountant": accountant})
    sigmas = [0.9, 1.3, 2.0]
    batched = BatchedDPSGD(model, data, states, cfg.train, noise_multipliers=sigmas, devices_per_pass=3)
    for _ in range(2):
        batched.step()
    for i, sigma in enumerate(sigmas):
        train_cfg = dataclasses.replace(cfg.train, noise_multiplier=sigma)
        model.load_trainable(states[i])
        result, history, _ = train_local(model, TensorData(data[i]), train_cfg, None, None)
        assert batched.accountants[i].history == [(sigma, 1.0, 2)]
        assert batched.epsilons()[i] == pytest.approx(result.epsilon, rel=1e-9)


def test_poisson_rate_and_expected_batch_follow_opacus():
    cfg, model, data, states = _setup(**{"batch-size": 2})
    batched = BatchedDPSGD(model, data, states, cfg.train, noise_multipliers=[1.0] * 3)
    # 2 records in batches of 2: q = 1; 4 records: q = 1/2, expected 2; 3 records: q = 1/2, expected int(1.5) = 1.
    assert batched.rates == [1.0, 0.5, 0.5]
    assert batched.expected.tolist() == [2.0, 2.0, 1.0]
    stats = batched.step()  # an empty Poisson batch on a device is a noise-only step, as in Opacus
    assert 0.0 <= stats["clip_fraction"] <= 1.0 or stats["clip_fraction"] != stats["clip_fraction"]


def test_noise_is_per_device_unit_gaussian_and_not_from_torch_seed():
    cfg, model, data, states = _setup()
    sigmas = [0.5, 1.0, 3.0]
    zeros = None
    draws = []
    for _ in range(2):
        torch.manual_seed(0)  # a seed anyone could know must not fix the noise
        batched = BatchedDPSGD(model, data, states, cfg.train, noise_multipliers=sigmas)
        zeros = {n: torch.zeros_like(p) for n, p in batched.params.items()}
        noisy = batched.privatize(zeros)
        flat = torch.cat([noisy[n].reshape(3, -1) for n in sorted(noisy)], dim=1)
        scale = torch.tensor(sigmas)[:, None] * cfg.train.max_grad_norm / batched.expected[:, None]
        draws.append(flat / scale)
    unit = draws[0]
    assert unit.shape[1] > 2000
    for row in unit:
        assert abs(float(row.mean())) < 0.1 and abs(float(row.std()) - 1.0) < 0.06
    assert abs(float(torch.corrcoef(unit)[0, 1])) < 0.1  # devices draw independent noise
    assert not torch.allclose(draws[0], draws[1])  # the OS seeds it, not torch.manual_seed


def test_refuses_what_it_cannot_do_exactly():
    cfg, model, data, states = _setup(optimizer="adambc")
    with pytest.raises(ValueError, match="adam or sgd"):
        BatchedDPSGD(model, data, states, cfg.train, noise_multipliers=[1.0] * 3)
    cfg_c, model_c, data_c, states_c = _setup(context="phrases")  # the phrase release runs per device only
    with pytest.raises(ValueError, match="context = none"):
        BatchedDPSGD(model_c, data_c, states_c, cfg_c.train, noise_multipliers=[1.0] * 3)
    cfg0 = quick(**{"adapter-layers": 0})
    model0 = PersonalLM(AdapterSpec.from_config(cfg0))
    with pytest.raises(ValueError, match="adapter-layers > 0"):
        BatchedDPSGD(model0, data, [model0.trainable_state()] * 3, cfg0.train, noise_multipliers=[1.0] * 3)
