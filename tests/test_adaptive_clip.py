"""Quantile-based adaptive clipping (Andrew et al. 2021) on the device: the clip norm, the noise split, the accountant."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import device_context, quick, server_message, spec, user_files

from client import device
from client.adaptive_clip import QuantileClip, split_noise
from client.app import app
from client.train import encode_pairs, train_local
from common.config import ConfigError
from common.models import personal_model

PAIRS = [(f"Write a short note about topic {i}.", f"Status: ok. Topic: {i}. Next: ship it. EOM.") for i in range(24)]


@pytest.mark.parametrize("z", [0.5, 1.0, 3.0])
@pytest.mark.parametrize("share", [0.05, 0.1, 0.5])
def test_the_noised_gradient_and_count_are_one_gaussian_mechanism_at_the_accounted_z(z, share):
    """z^-2 = z_delta^-2 + (2 sigma_b)^-2 (their Theorem 1), and the count takes ``share`` of z^-2."""
    grad, count = split_noise(z, share)
    assert grad ** -2 + (2 * count) ** -2 == pytest.approx(z ** -2, rel=1e-12)
    assert (2 * count) ** -2 == pytest.approx(share * z ** -2, rel=1e-12)
    assert grad > z
    assert split_noise(0.0, share) == (0.0, 0.0)  # clipping only: nothing private to split
    with pytest.raises(ValueError):
        split_noise(z, 1.0)


def test_the_clip_norm_settles_at_the_target_quantile():
    norms = torch.linspace(0.01, 2.0, 200)  # the median is about 1.0, the 0.8 quantile about 1.6
    for quantile, expected in ((0.5, 1.0), (0.8, 1.6)):
        clip = QuantileClip(0.3, 5.0, quantile, 0.2, count_noise=0.0, expected_batch=200, generator=torch.Generator())
        for _ in range(300):
            clip.observe(norms[:120])  # two physical batches of one logical step
            clip.observe(norms[120:])
            clip.step_done()
        assert clip.clip == pytest.approx(expected, abs=0.04)


def test_the_clip_norm_never_rises_above_the_ceiling():
    """The admitted max-grad-norm (the device policy's ceiling) bounds it: adaptation only makes clipping stricter."""
    clip = QuantileClip(3.0, 1.0, 0.5, 1.0, count_noise=0.0, expected_batch=8, generator=torch.Generator())
    assert clip.clip == 1.0  # a start above the ceiling is cut to it
    for _ in range(20):
        clip.observe(torch.full((8,), 10.0))  # every sample clipped: the rule wants a larger norm
        assert clip.step_done() == 1.0


def test_the_count_is_noised_with_the_stated_std():
    """Recover each step's noise from the geometric update: its std is sigma_b, its mean 0."""
    sigma_b, batch, lr = 3.0, 10.0, 0.1
    clip = QuantileClip(1.0, 1e9, 0.5, lr, count_noise=sigma_b, expected_batch=batch, generator=torch.Generator().manual_seed(1))
    noises = []
    for _ in range(4000):
        before = clip.clip
        clip.observe(torch.zeros(6))  # 6 samples unclipped: centred count 6 - 3 = 3
        after = clip.step_done()
        unclipped = -math.log(after / before) / lr + 0.5
        noises.append((unclipped - 0.5) * batch - 3.0)
    t = torch.tensor(noises)
    assert float(t.std()) == pytest.approx(sigma_b, rel=0.05)
    assert abs(float(t.mean())) < 0.2


@pytest.fixture(scope="module")
def model():
    return personal_model(spec())


def test_training_charges_the_accountant_z_and_noises_the_gradient_at_z_delta(model):
    model.reset_to_initial()
    data = encode_pairs(model.tokenizer, PAIRS, 64)
    cfg = quick(local_steps=2, batch_size=8, noise_multiplier=1.2, adaptive_clip_quantile=0.5, adaptive_clip_share=0.2).train
    result, history, _ = train_local(model, data, cfg, None, None)
    assert json.loads(history)["history"] == [[1.2, pytest.approx(8 / 24), 2]]
    fixed, fixed_history, _ = train_local(model, data, quick(local_steps=2, batch_size=8, noise_multiplier=1.2).train, None, None)
    assert result.epsilon == pytest.approx(fixed.epsilon)  # the same accounted mechanism
    grad_z, _ = split_noise(1.2, 0.2)
    # Each step's noise std is z_delta times that step's clip norm, over the expected batch.
    assert result.instruments["noise_std"] == pytest.approx(grad_z * result.instruments["clip_norm"] / 8)
    assert result.clip_norm is not None and 0 < result.clip_norm <= cfg.max_grad_norm
    assert fixed.clip_norm is None


def test_the_clip_norm_falls_under_a_loose_ceiling_and_carries_over_rounds(model):
    """Every sample far below the clip norm, the whole local set in each step (three physical batches), no noise:
    each step multiplies the norm by exp(-lr (1 - quantile))."""
    model.reset_to_initial()
    data = encode_pairs(model.tokenizer, PAIRS, 64)
    cfg = quick(local_steps=2, batch_size=0, physical_batch=10, noise_multiplier=0.0, max_grad_norm=1000.0, accountant="rdp",
                adaptive_clip_quantile=0.5, adaptive_clip_lr=0.2).train
    first, history, opt = train_local(model, data, cfg, None, None)
    assert first.clip_norm == pytest.approx(1000 * math.exp(-0.2))
    second, _, _ = train_local(model, data, cfg, history, opt, clip_start=first.clip_norm)
    assert second.clip_norm == pytest.approx(1000 * math.exp(-0.4))
    assert first.instruments["clip_fraction"] == 0


def test_the_device_keeps_its_clip_norm_in_its_store_between_rounds(tiny_data, task_identity, tmp_path, monkeypatch):
    import client.app as client_app

    starts = []
    real = client_app.train_local

    def spy(*args, clip_start=None, **kwargs):
        starts.append(clip_start)
        return real(*args, clip_start=clip_start, **kwargs)

    monkeypatch.setattr(client_app, "train_local", spy)
    cfg = quick(secagg=False, adaptive_clip_quantile=0.5)
    ctx = device_context(tmp_path, 1, user_files(tiny_data)[1], cfg)
    store = device.DeviceStore(tmp_path / "device-1" / "store.sqlite")
    app(server_message(cfg, "train", 1), ctx)
    first = device.get_json(store, device.CLIP_NORM, None)["clip-norm"]
    assert 0 < first <= cfg.train.max_grad_norm
    app(server_message(cfg, "train", 2), ctx)
    assert starts == [None, first]  # round 2 starts where round 1 ended
    assert device.get_json(store, device.DIAGNOSTICS, None)["rounds"]["2"]["dp_sgd"]["clip_norm"] <= cfg.train.max_grad_norm


@pytest.mark.parametrize("key,value", [("adaptive-clip-quantile", 1.0), ("adaptive-clip-quantile", -0.1),
                                       ("adaptive-clip-share", 0.0), ("adaptive-clip-lr", 0.0)])
def test_bad_adaptive_clipping_settings_name_their_key(key, value):
    with pytest.raises(ConfigError, match=key):
        quick(**{key.replace("-", "_"): value})
