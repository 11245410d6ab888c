"""Devices that drop mid-round: the round is correct, or skipped with a clear reason and nothing lost.

Runs the core of ``benchmarks/dropout_matrix.py`` (the real strategy, the real
ClientApp, the tiny model) on five devices: secure aggregation at every
fraction of the matrix and a plain round at the largest. A dropped device
takes part in the key and share stages, trains, masks, and its train reply
never arrives. With five devices the fractions round to 0, 1, 2 and 3
dropouts (halves round up), and the secure sum's unmask floor is
``max(threshold 3, ceil((1 - 0.3) * 5)) = 4`` with the default
``secagg-max-dropout`` of 0.3: one dropout leaves exactly the floor, two leave
one device too few.

The error bound asserted for a secure sum is the fixed-point codec's own
worst case (:meth:`FixedPointCodec.error_bound`): with stochastic rounding each
of the ``s`` survivors' coordinates lands within one grid step
``2R / floor((2**32 - 1) / n)`` of its value (about 2.3e-9 here for ``R = 1``),
plus float64 slack, so ``|decoded - exact| <= s * (step + 4R * 2**-52)`` per
coordinate as long as no coordinate left ``[-R, R]`` (checked: none did). That
is about 1e-8 here, under 1e-6 of the sum's largest coordinate too.
"""

from __future__ import annotations

import math

import pytest

from benchmarks.dropout_matrix import FRACTIONS, main

N = 5


@pytest.fixture(scope="module")
def matrix():
    # The benchmark's own --smoke run (this is the suite's smoke of benchmarks/dropout_matrix.py).
    result = main(["--smoke"])
    assert result["devices"] == N and result["cells"] == len(FRACTIONS) + 1 and result["raised"] == 0
    return {(r["mode"], r["fraction"]): r for r in result["rows"]}


def test_nothing_raises_out_of_the_strategy(matrix):
    assert [key for key, row in matrix.items() if row["outcome"] == "raised"] == []
    assert [row["dropped"] for key, row in sorted(matrix.items()) if key[0] == "secure"] == [0, 1, 2, 3]


def test_a_secure_round_aggregates_exactly_down_to_its_floor_and_is_skipped_below_it(matrix):
    for fraction in FRACTIONS:
        row = matrix["secure", fraction]
        floor = max(row["threshold"], math.ceil((1 - row["max_dropout"]) * N))
        assert row["min_survivors"] == floor == 4
        assert row["survivors"] == N - row["dropped"] and row["refused"] == 0
        assert row["outcome"] == ("aggregated" if row["survivors"] >= floor else "skipped"), row
    for fraction in (0.0, 0.1):
        row = matrix["secure", fraction]
        assert row["outcome"] == "aggregated" and row["contributors"] == row["survivors"]
        assert row["clipped"] == 0  # the bound holds for in-range inputs only
        assert row["sum_err"] <= row["bound"] and row["rel_err"] <= 1e-6, row
        assert row["tier_err"] <= 1e-6


def test_a_skipped_round_keeps_the_tiers_says_why_and_keeps_every_charge(matrix):
    for fraction in (0.3, 0.5):
        row = matrix["secure", fraction]
        assert row["outcome"] == "skipped" and row["contributors"] == 0
        assert row["tiers_unchanged"] is True
        assert f"only {row['survivors']} masked inputs arrived; need 4" in row["reason"]


def test_every_device_that_trained_was_charged_the_dropped_ones_included(matrix):
    for row in matrix.values():
        assert len(row["steps_dropped"]) == row["dropped"] and len(row["steps_survivors"]) == row["survivors"]
        assert all(steps == 1 for steps in row["steps_dropped"] + row["steps_survivors"]), row  # one local step each


def test_a_plain_round_sums_whoever_answered_exactly(matrix):
    row = matrix["plain", 0.5]
    assert row["outcome"] == "aggregated" and row["contributors"] == row["survivors"] == N - 3
    assert row["rel_err"] <= 1e-12 and row["tier_err"] <= 1e-6
