"""The device's record-level accounting: the memoised RDP accountant and the noise calibration."""

import json
import math

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from client.accounting import (
    EPSILON_TOLERANCE,
    MemoRDPAccountant,
    QuietPRVAccountant,
    _prv_epsilon,
    _step_rdp,
    epsilon_from_history,
    prv_noise_for_epsilon,
    rdp_noise_for_epsilon,
    restore,
    safe_domain_size,
)

HISTORIES = [
    [(1.0, 0.2, 6)],
    [(0.7, 6 / 38, 2), (0.7, 6 / 38, 4), (1.3, 1.0, 2)],
    [(2.5, 0.01, 300)],
]


@pytest.mark.parametrize("history", HISTORIES)
def test_memoised_rdp_accountant_gives_opacus_numbers_bit_for_bit(history):
    ours, theirs = MemoRDPAccountant(), RDPAccountant()
    for _ in range(2):  # the second time from the cache
        ours.history, theirs.history = list(history), list(history)
        assert ours.get_privacy_spent(delta=1e-5) == theirs.get_privacy_spent(delta=1e-5)
        assert ours.get_epsilon(delta=1e-6, alphas=[2, 8, 32]) == theirs.get_epsilon(delta=1e-6, alphas=[2, 8, 32])


@pytest.mark.parametrize("history", HISTORIES[:2])
def test_memoised_prv_accountant_gives_opacus_numbers_and_computes_each_history_once(history):
    theirs = PRVAccountant()
    theirs.history = list(history)
    expected = theirs.get_epsilon(delta=1e-5)
    _prv_epsilon.cache_clear()
    for _ in range(2):  # the second time from the cache
        ours = QuietPRVAccountant()
        ours.history = list(history)
        assert ours.get_epsilon(delta=1e-5) == expected
    assert (_prv_epsilon.cache_info().misses, _prv_epsilon.cache_info().hits) == (1, 1)
    ours.step(noise_multiplier=history[-1][0], sample_rate=history[-1][1])  # a new history is a new entry
    theirs.step(noise_multiplier=history[-1][0], sample_rate=history[-1][1])
    assert ours.get_epsilon(delta=1e-5) == theirs.get_epsilon(delta=1e-5) > expected


@pytest.mark.parametrize("history", HISTORIES)
def test_the_prv_domain_is_opacus_own_size_from_curves_computed_once(history):
    from opacus.accountants.analysis.prv import PoissonSubsampledGaussianPRV, compute_safe_domain_size

    prvs = [PoissonSubsampledGaussianPRV(q, z) for z, q, _ in history]
    for delta_error in (1e-8, 1e-9):
        expected = compute_safe_domain_size(prvs, [n for *_, n in history], eps_error=0.01, delta_error=delta_error)
        assert safe_domain_size(history, 0.01, delta_error) == expected
    # A cap check on a longer history of the same mechanisms computes no new curve.
    misses = _step_rdp.cache_info().misses
    safe_domain_size([(z, q, 2 * n) for z, q, n in history], 0.01, 1e-8)
    assert _step_rdp.cache_info().misses == misses


def test_a_restored_state_keeps_its_mechanism_and_history():
    state = json.dumps({"history": [[1.0, 0.2, 6]], "mechanism": "rdp"})
    acc = restore(state)
    assert isinstance(acc, MemoRDPAccountant) and acc.history == [(1.0, 0.2, 6)]
    assert epsilon_from_history(None, 1e-5) == 0.0


@pytest.mark.parametrize("target,rate,steps", [(8.0, 0.2, 6), (8.0, 1.0, 6), (1.0, 0.15, 6), (3.0, 0.1, 60), (0.5, 1.0, 6), (2.0, 0.5, 12)])
def test_calibration_ends_within_the_tolerance_below_the_target_never_above(target, rate, steps):
    z = rdp_noise_for_epsilon(target, 1e-5, rate, steps)
    acc = RDPAccountant()  # Opacus' own accountant judges the result
    acc.history = [(z, rate, steps)]
    assert target - EPSILON_TOLERANCE <= acc.get_epsilon(delta=1e-5) <= target


def test_calibration_refuses_a_target_no_noise_reaches():
    with pytest.raises(ValueError):
        rdp_noise_for_epsilon(0.05, 1e-5, 0.2, 6)  # RDP's orders floor epsilon near 0.2 at delta 1e-5


def test_the_ledgers_written_out_rdp_orders_are_opacus_own():
    """The ledger keeps its own copy (it must not read the accountant it checks); it must not drift from Opacus'."""
    from opacus.accountants import RDPAccountant

    from simulations.audits.ledger import OPACUS_ORDERS

    assert OPACUS_ORDERS == RDPAccountant.DEFAULT_ALPHAS


@pytest.mark.parametrize("target,rate,steps", [(8.0, 0.2, 6), (8.0, 1.0, 9), (1.0, 0.15, 6), (3.0, 0.5, 12), (0.1, 1.0, 2)])
def test_prv_calibration_ends_within_the_tolerance_below_the_target_never_above(target, rate, steps):
    z = prv_noise_for_epsilon(target, 1e-5, rate, steps)
    acc = PRVAccountant()  # Opacus' own accountant judges the result
    acc.history = [(z, rate, steps)]
    assert target - EPSILON_TOLERANCE <= acc.get_epsilon(delta=1e-5) <= target
    if target >= 1:  # RDP's orders cannot reach 0.1 at delta 1e-5; PRV can
        assert z <= rdp_noise_for_epsilon(target, 1e-5, rate, steps)  # the tighter analysis needs no more noise


@pytest.mark.parametrize("mechanism", ["prv", "rdp"])
def test_a_step_without_noise_has_no_finite_epsilon(mechanism):
    """``noise-multiplier = 0`` (clipping only) must read as epsilon = inf, not crash the accountant."""
    from client.accounting import new_accountant

    acc = new_accountant(mechanism)
    acc.history = [(1.0, 1.0, 3), (0.0, 1.0, 1)]
    assert acc.get_epsilon(delta=1e-5) == math.inf
    acc.history = [(1.0, 1.0, 3)]
    assert math.isfinite(acc.get_epsilon(delta=1e-5))
