"""User-level DP-FedAvg: Flower's accountant, its budget stop, and device-side clipping."""

from __future__ import annotations

import math

import numpy as np
import pytest
from helpers import device_context, quick, server_message, user_files

from common.privacy.accounting import independent_user_epsilon, make_user_accountant, noise_for_epsilon, rounds_within_budget


def _compose(acc, z, n, rounds):
    from flwr.serverapp import GaussianPrivacyEvent

    acc.compose(GaussianPrivacyEvent(noise_multiplier=z, sample_size=n, population_size=n), count=rounds)


@pytest.mark.parametrize("z,rounds", [(0.8, 3), (1.0, 5), (2.0, 20)])
def test_flower_accountant_matches_independent_computation(z, rounds):
    acc = make_user_accountant(population=20, delta=1e-3, max_epsilon=None)
    _compose(acc, z, 20, rounds)
    assert acc.get_epsilon(1e-3) == pytest.approx(independent_user_epsilon(z, rounds, 1e-3), rel=0.02)


@pytest.mark.parametrize("z,rounds,sampled", [(1.0, 10, 5), (0.8, 30, 2)])
def test_poisson_sampled_accounting_matches_independent_computation_and_amplifies(z, rounds, sampled):
    from flwr.serverapp import GaussianPrivacyEvent

    acc = make_user_accountant(population=20, delta=1e-3, max_epsilon=None, poisson=True)
    acc.compose(GaussianPrivacyEvent(noise_multiplier=z, sample_size=sampled, population_size=20), count=rounds)
    q = sampled / 20
    assert acc.get_epsilon(1e-3) == pytest.approx(independent_user_epsilon(z, rounds, 1e-3, q), rel=0.02)
    assert acc.get_epsilon(1e-3) < independent_user_epsilon(z, rounds, 1e-3)  # sampling amplifies


def _exact_gaussian_epsilon(mu: float, delta: float) -> float:
    """Tight epsilon of a Gaussian mechanism with mu = sensitivity/sigma (Balle & Wang 2018)."""
    from scipy.stats import norm

    def delta_of(eps: float) -> float:
        return norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2)

    lo, hi = 0.0, 100.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if delta_of(mid) > delta else (lo, mid)
    return hi


@pytest.mark.parametrize("z,rounds", [(1.0, 4), (2.0, 10)])
def test_rdp_epsilon_is_a_tight_upper_bound_of_the_exact_gaussian_curve(z, rounds):
    # T un-subsampled Gaussian releases at noise z compose exactly to one
    # Gaussian with mu = sqrt(T)/z. RDP's conversion can only over-state epsilon,
    # and for these settings by well under 40%.
    delta = 1e-3
    exact = _exact_gaussian_epsilon(math.sqrt(rounds) / z, delta)
    rdp = independent_user_epsilon(z, rounds, delta)
    assert exact < rdp < 1.4 * exact


def test_budget_stops_before_it_would_be_exceeded():
    acc = make_user_accountant(population=10, delta=1e-3, max_epsilon=8.0)
    allowed = rounds_within_budget(acc, noise_multiplier=1.0, sample_size=10, planned=50)
    assert 0 < allowed < 50
    _compose(acc, 1.0, 10, allowed)
    assert acc.get_epsilon(1e-3) <= 8.0
    _compose(acc, 1.0, 10, 1)
    assert acc.get_epsilon(1e-3) > 8.0
    assert rounds_within_budget(make_user_accountant(10, 1e-3, None), 1.0, 10, 7) == 7


def _update_norm(arrays) -> float:
    return math.sqrt(sum(float((v.astype(np.float64) ** 2).sum()) for v in arrays.values()))


def test_device_clips_the_whole_shared_update(tiny_data, task_identity, tmp_path):
    """Without the persona tier: the global tier's change is clipped to C (the same pipeline, K = 0)."""
    from client.app import app

    clip = 1e-3
    cfg = quick(secagg=False, lr=0.5, persona_slots=0, user_dp=True, user_clip_norm=clip)
    ctx = device_context(tmp_path, 1, user_files(tiny_data)[2], cfg)
    reply = app(server_message(cfg, "train"), ctx)
    update = {k: v.numpy() for k, v in reply.content["arrays"].items()}
    assert 0 < _update_norm(update) <= clip * (1 + 1e-4)


def test_k_slot_update_is_clipped_with_its_count(tiny_data, task_identity, tmp_path):
    """Persona tier + user-level DP: the whole K-slot vector (update, count, profile) has norm <= C.

    (With the default random persona choice the profile row is empty; its share of C stays reserved.)"""
    from client.app import app

    clip = 1e-3
    cfg = quick(secagg=False, lr=0.5, user_dp=True, user_clip_norm=clip)
    ctx = device_context(tmp_path, 1, user_files(tiny_data)[2], cfg)
    reply = app(server_message(cfg, "train"), ctx)
    arrays = {k: v.numpy() for k, v in reply.content["arrays"].items()}
    count = arrays.pop("persona-count")
    profile = arrays.pop("persona-centroids")
    share = clip / math.sqrt(3)  # update, count and profile each get a third of C^2
    assert sorted(count.tolist()) == pytest.approx([0, 0, share])
    assert not profile.any()
    assert 0 < _update_norm(arrays) <= share * (1 + 1e-4)


@pytest.mark.parametrize("target", [8.0, 2.0])
def test_noise_calibration_hits_the_budget_from_below(target):
    z = noise_for_epsilon(target, rounds=3, delta=1e-3, population=20)
    assert independent_user_epsilon(z, 3, 1e-3) <= target * 1.02
    # z is the smallest such noise (to 0.01): a little less noise overshoots the target.
    assert independent_user_epsilon(z - 0.01, 3, 1e-3) > target
    acc = make_user_accountant(20, 1e-3, target)
    assert rounds_within_budget(acc, z, 20, 3) == 3  # the calibrated run is not cut short
    assert rounds_within_budget(make_user_accountant(20, 1e-3, target), z * 0.8, 20, 3) < 3


@pytest.mark.parametrize("rounds,population", [(1, 3), (1, 6), (2, 6), (3, 20)])
def test_calibrated_noise_never_overshoots_the_budget(rounds, population):
    """z is rounded *up* to its 0.001 grid. Rounded to nearest, one round of 3 users at epsilon 8 got
    z = 0.52, which spends 8.0013: the budget then refused the run its only round."""
    z = noise_for_epsilon(8.0, rounds, 1e-3, population)
    assert rounds_within_budget(make_user_accountant(population, 1e-3, 8.0), z, population, rounds) == rounds


def test_a_noise_cohort_scales_the_server_noise_accounts_the_hypothetical_deployment_and_says_so():
    from common.config import ConfigError, build_config
    from common.privacy import build_pipeline
    from common.kslot import KSlotCodec

    base = {"num-supernodes": 10, "user-dp": True, "secagg": False, "user-delta": 1e-7}
    with pytest.raises(ConfigError) as err:
        build_config("quick", {**base, "noise-cohort": 1000})  # the population defaults to the run's 10
    assert err.value.key == "noise-cohort"
    for bad in ({"user-dp": False, "noise-cohort": 100}, {"secagg": True, "noise-cohort": 100, "noise-population": 1000}, {"noise-population": 1000}):
        with pytest.raises(ConfigError):
            build_config("quick", {**base, **bad})
    cfg = build_config("quick", {**base, "noise-cohort": 1000, "noise-population": 100_000, "fraction-train": 0.5})
    assert cfg.noise_scale == pytest.approx(5 / 1000) and cfg.user_sample_rate == pytest.approx(0.01)
    pipeline = build_pipeline(cfg, KSlotCodec({"w": (4,)}, 0))
    noise, accounting = pipeline.step("noise"), pipeline.step("accounting")
    assert noise.std == pytest.approx(cfg.user_dp.noise_multiplier * cfg.user_dp.clip_norm * 5 / 1000)
    assert (accounting.population, accounting.sample_rate, accounting.sample_size) == (100_000, 0.01, 1000)
    plain = build_config("quick", {**base, "fraction-train": 0.5})
    assert build_pipeline(plain, KSlotCodec({"w": (4,)}, 0)).step("noise").std == plain.user_dp.noise_multiplier * plain.user_dp.clip_norm
    with pytest.raises(ValueError):  # devices never lower their own noise shares
        from common.privacy.noise import GaussianNoise

        GaussianNoise(1.0, 1.0, "distributed", scale=0.1)


def test_the_report_says_a_noise_cohort_run_has_no_guarantee(tiny_data, task_identity, tmp_path):
    from benchmarks.loopback import LoopbackGrid, device_context as loop_context, initial_arrays, strategy_for
    from client.app import app
    from common.config import build_config
    from server.report import build_report, render_markdown

    cfg = build_config("quick", {"num-supernodes": 3, "persona-slots": 0, "user-dp": True, "secagg": False, "user-delta": 1e-7,
                                 "noise-cohort": 100, "noise-population": 10_000, "scrub-mode": "patterns", "num-server-rounds": 1})
    files = user_files(tiny_data)[:3]
    grid = LoopbackGrid(app, {100 + i: loop_context(tmp_path, 100 + i, f, cfg) for i, f in enumerate(files)})
    strategy = strategy_for(cfg, num_rounds=1)
    strategy.run(grid, initial_arrays(cfg))
    report = build_report(cfg, strategy, 0.0, 1)
    ul = report["user_level"]
    assert ul["noise_cohort"]["population"] == 10_000 and ul["sample_rate"] == pytest.approx(0.01)
    assert ul["epsilon_independent"] == pytest.approx(independent_user_epsilon(cfg.user_dp.noise_multiplier, 1, 1e-7, 0.01), rel=1e-9)
    assert "NOT a privacy guarantee for this run" in render_markdown(report)
