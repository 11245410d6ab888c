"""Unit tests for simulations.audits.stats on constructed inputs with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from simulations.audits.stats import (
    char_ngram_cosine,
    clopper_pearson_upper,
    degree_of_personalization,
    disparity,
    empirical_epsilon,
    exposure,
    group_table,
    one_run_epsilon,
    one_run_guesses,
    one_run_max_epsilon,
    one_run_p_value,
    roc_auc,
    share_worse,
    token_jaccard,
    tpr_at_fpr,
)

# ---------------------------------------------------------------- roc_auc


def test_auc_perfect_inverted_and_chance():
    assert roc_auc([3, 4, 5], [0, 1, 2]) == 1.0
    assert roc_auc([0, 1, 2], [3, 4, 5]) == 0.0
    assert roc_auc([1, 1], [1, 1, 1]) == 0.5  # all ties count one half


def test_auc_counts_ties_as_half_on_a_hand_computed_case():
    # Pairs (m, n): member 2 beats 1, ties 2; member 1 ties 1, loses to 2.
    # wins = 1 + 0.5 + 0.5 + 0 = 2 of 4 pairs.
    assert roc_auc([2, 1], [1, 2]) == 0.5
    # member 3 beats both (2), member 2 beats 1 and ties 2 (1.5): 3.5 / 4.
    assert roc_auc([3, 2], [1, 2]) == pytest.approx(3.5 / 4)


def test_auc_matches_brute_force_pair_count():
    rng = np.random.default_rng(0)
    members = rng.integers(0, 10, 40).astype(float)  # small integers: many ties
    nonmembers = rng.integers(0, 8, 55).astype(float)
    diff = members[:, None] - nonmembers[None, :]
    brute = (np.sum(diff > 0) + 0.5 * np.sum(diff == 0)) / diff.size
    assert roc_auc(members, nonmembers) == pytest.approx(brute)


def test_auc_rejects_empty_and_nan():
    with pytest.raises(ValueError):
        roc_auc([], [1.0])
    with pytest.raises(ValueError):
        roc_auc([1.0, float("nan")], [1.0])


# ---------------------------------------------------------------- tpr_at_fpr


def test_tpr_at_fpr_on_a_hand_computed_case():
    nonmembers = np.arange(100, dtype=float)  # 0..99
    members = np.array([99.5, 98.5, 50.0, 10.0])
    # FPR <= 1%: threshold 98.5 admits one non-member (99, so FPR 1%) and the
    # members 99.5 and 98.5: TPR 2/4. Any lower threshold admits 98 as well (2%).
    assert tpr_at_fpr(members, nonmembers, fpr=0.01) == 0.5
    # FPR 0: the threshold must lie above 99, so only 99.5 counts.
    assert tpr_at_fpr(members, nonmembers, fpr=0.0) == 0.25
    # FPR 50%: threshold 50 admits non-members 50..99 (50%) and members 99.5, 98.5, 50.
    assert tpr_at_fpr(members, nonmembers, fpr=0.5) == 0.75
    assert tpr_at_fpr(members, nonmembers, fpr=1.0) == 1.0


def test_tpr_at_fpr_is_zero_when_members_score_lowest():
    assert tpr_at_fpr([0.0, 0.1], [1.0, 2.0, 3.0], fpr=0.01) == 0.0


def test_tpr_at_fpr_rejects_bad_fpr():
    with pytest.raises(ValueError):
        tpr_at_fpr([1.0], [0.0], fpr=1.5)


# ---------------------------------------------------------------- Clopper-Pearson / empirical epsilon


def test_clopper_pearson_upper_known_values():
    # Zero errors has the closed form 1 - alpha^(1/n) ("rule of three" for 0.05 ~ 3/n).
    assert clopper_pearson_upper(0, 100, 0.05) == pytest.approx(1 - 0.05 ** (1 / 100))
    # All errors: the bound is 1.
    assert clopper_pearson_upper(7, 7, 0.05) == 1.0
    # It bounds the rate from above, and the binomial tail at the bound is alpha.
    from scipy.stats import binom

    bound = float(clopper_pearson_upper(5, 50, 0.05))
    assert bound > 5 / 50
    assert binom.cdf(5, 50, bound) == pytest.approx(0.05, rel=1e-6)


def test_empirical_epsilon_identical_distributions_is_about_zero():
    rng = np.random.default_rng(1)
    scores = rng.normal(size=2000)
    assert empirical_epsilon(scores[:1000], scores[1000:], delta=1e-5) < 0.1
    same = np.zeros(500)
    assert empirical_epsilon(same, same, delta=1e-5) == 0.0


@pytest.mark.parametrize("n", [50, 500, 5000])
def test_empirical_epsilon_perfect_separation_is_positive_and_bounded_by_log_n(n):
    members = np.linspace(1.0, 2.0, n)
    nonmembers = np.linspace(-2.0, -1.0, n)
    eps = empirical_epsilon(members, nonmembers, delta=1e-5)
    assert 0 < eps <= math.log(n)
    # Closed form: FP = FN = 0, each bound is 1 - (alpha/2)^(1/n).
    bound = 1 - 0.025 ** (1 / n)
    assert eps == pytest.approx(math.log((1 - 1e-5 - bound) / bound), rel=1e-6)


def test_empirical_epsilon_grows_with_sample_size():
    epsilons = [
        empirical_epsilon(np.linspace(1, 2, n), np.linspace(-2, -1, n), delta=1e-5) for n in (20, 200, 2000)
    ]
    assert epsilons[0] < epsilons[1] < epsilons[2]


def test_empirical_epsilon_is_never_negative_even_for_an_inverted_attack():
    # Members score lowest: every threshold "proves" nothing.
    assert empirical_epsilon(np.zeros(100), np.ones(100), delta=1e-5) == 0.0
    rng = np.random.default_rng(2)
    for _ in range(5):
        assert empirical_epsilon(rng.normal(size=30), rng.normal(size=30), delta=0.1) >= 0.0


def test_empirical_epsilon_moderate_shift_is_between_zero_and_the_perfect_case():
    rng = np.random.default_rng(3)
    members, nonmembers = rng.normal(1.5, 1, 2000), rng.normal(0, 1, 2000)
    eps = empirical_epsilon(members, nonmembers, delta=1e-5)
    perfect = empirical_epsilon(np.linspace(1, 2, 2000), np.linspace(-2, -1, 2000), delta=1e-5)
    assert 1.0 < eps < perfect


def test_empirical_epsilon_with_a_fixed_threshold_uses_only_that_threshold():
    members, nonmembers = np.linspace(1, 2, 200), np.linspace(-2, -1, 200)
    assert empirical_epsilon(members, nonmembers, delta=1e-5, thresholds=[0.0]) == pytest.approx(
        empirical_epsilon(members, nonmembers, delta=1e-5)
    )
    # A threshold above everything predicts "non-member" always: no evidence.
    assert empirical_epsilon(members, nonmembers, delta=1e-5, thresholds=[10.0]) == 0.0


def test_empirical_epsilon_rejects_bad_parameters():
    with pytest.raises(ValueError):
        empirical_epsilon([1.0], [0.0], delta=1.0)
    with pytest.raises(ValueError):
        empirical_epsilon([1.0], [0.0], delta=1e-5, alpha=0.0)


# ---------------------------------------------------------------- one-run audit (Steinke, Nasr & Jagielski 2023)


def test_one_run_p_value_at_epsilon_zero_is_a_fair_coin_tail():
    # eps = 0: each guess is right with probability 1/2. 9 or more of 10: (C(10,9) + C(10,10)) / 2^10.
    assert one_run_p_value(10, 10, 9, 0.0) == pytest.approx(11 / 1024)
    assert one_run_p_value(10, 10, 0, 0.0) == 1.0  # no correct guess proves nothing


def test_one_run_p_value_matches_a_hand_computed_binomial_tail():
    # eps = ln 3: q = 3/4. P[B >= 4] for B ~ Binomial(5, 3/4) = 5 (3/4)^4 (1/4) + (3/4)^5.
    q = 0.75
    assert one_run_p_value(8, 5, 4, math.log(3)) == pytest.approx(5 * q**4 * (1 - q) + q**5)


def test_one_run_p_value_delta_term_by_hand():
    # m = r = v = 2 at eps = 0 (q = 1/2): P[B >= 2] = 1/4; the delta term is
    # 2 m delta max(P[B = 1] / 1, P[0 <= B < 2] / 2) = 4 delta max(1/2, 3/8) = 2 delta.
    assert one_run_p_value(2, 2, 2, 0.0, delta=1e-3) == pytest.approx(0.25 + 2e-3)
    assert one_run_p_value(2, 2, 2, 0.0, delta=0.5) == 1.0  # capped


@pytest.mark.parametrize("r", [10, 50, 1000])
def test_one_run_all_correct_pure_dp_has_the_closed_form(r):
    # With delta = 0 and every guess right, p(eps) = q^r, so the bound is logit(beta^(1/r)).
    beta = 0.05
    q = beta ** (1 / r)
    assert one_run_epsilon(r, r, r, 0.0, beta) == pytest.approx(math.log(q / (1 - q)), abs=1e-5)
    assert one_run_max_epsilon(r, 0.0, beta) == pytest.approx(math.log(q / (1 - q)), abs=1e-5)


def test_one_run_max_epsilon_values_by_number_of_canaries():
    # logit(0.05^(1/m)): 1.052 (m = 10), 2.785 (50), 3.493 (100), 5.114 (500), 5.809 (1000).
    expected = {10: 1.0519, 50: 2.7847, 100: 3.4930, 500: 5.1144, 1000: 5.8091}
    for m, eps in expected.items():
        assert one_run_max_epsilon(m) == pytest.approx(eps, abs=1e-3)
        assert one_run_max_epsilon(m, delta=1e-5) <= one_run_max_epsilon(m)  # delta only weakens it


def test_one_run_epsilon_is_a_valid_lower_bound_for_randomized_response():
    """The exact false-alarm rate for eps0-randomized response (the worst case of Theorem 3.1) is at most beta.

    Each of r guesses is right with probability q0 = e^eps0 / (1 + e^eps0); the
    bound exceeds eps0 exactly when the count of correct guesses reaches some
    v*, which happens with probability P[Binomial(r, q0) >= v*].
    """
    from scipy.stats import binom

    r, beta = 200, 0.05
    for eps0 in (0.0, 0.5, 1.0, 2.0):
        bounds = [one_run_epsilon(r, r, v, 0.0, beta) for v in range(r + 1)]
        assert bounds == sorted(bounds)  # more correct guesses never certify less
        v_star = next(v for v, b in enumerate(bounds) if b > eps0)
        assert binom.sf(v_star - 1, r, 1 / (1 + math.exp(-eps0))) <= beta


def test_one_run_epsilon_at_chance_is_zero_and_grows_with_correct_guesses():
    assert one_run_epsilon(100, 100, 50) == 0.0
    assert 0.0 < one_run_epsilon(100, 100, 70) < one_run_epsilon(100, 100, 90) < one_run_epsilon(100, 100, 100)
    assert one_run_epsilon(100, 100, 90, delta=1e-5) <= one_run_epsilon(100, 100, 90)
    with pytest.raises(ValueError):
        one_run_epsilon(10, 5, 6)
    with pytest.raises(ValueError):
        one_run_epsilon(10, 10, 5, beta=0.0)


def test_one_run_guesses_take_the_highest_and_lowest_scores():
    scores = [0.3, 0.9, 0.1, 0.5, 0.7, 0.2]
    assert one_run_guesses(scores, 2, 2).tolist() == [0, 1, -1, 0, 1, -1]
    assert one_run_guesses(scores, 1, 0).tolist() == [0, 1, 0, 0, 0, 0]
    assert one_run_guesses([1.0, 1.0, 1.0], 1, 1).tolist() == [-1, 0, 1]  # ties: by position
    with pytest.raises(ValueError):
        one_run_guesses(scores, 4, 3)


# ---------------------------------------------------------------- exposure


def test_exposure_rank_one_is_log2_of_candidate_set_including_canary():
    # 7 references + the canary: |R| = 8; canary has the lowest loss: rank 1.
    assert exposure(0.1, [1, 2, 3, 4, 5, 6, 7]) == pytest.approx(3.0)


def test_exposure_last_rank_is_zero_and_middle_rank_is_hand_computed():
    references = [1, 2, 3, 4, 5, 6, 7]
    assert exposure(100.0, references) == pytest.approx(0.0)  # rank 8 of 8
    assert exposure(3.5, references) == pytest.approx(3.0 - 2.0)  # 3 better: rank 4


def test_exposure_ties_count_in_the_canarys_favour():
    assert exposure(1.0, [1.0, 1.0, 1.0]) == pytest.approx(2.0)  # rank 1 of 4


def test_exposure_rejects_nonfinite_canary():
    with pytest.raises(ValueError):
        exposure(float("nan"), [1.0])


# ---------------------------------------------------------------- disparity


def test_disparity_higher_is_better():
    values = np.arange(1, 11, dtype=float)  # 1..10
    stats = disparity(values, higher_is_better=True)
    assert stats["n"] == 10
    assert stats["mean"] == pytest.approx(5.5)
    assert stats["std"] == pytest.approx(np.std(values))
    assert stats["worst"] == 1.0
    assert stats["p10"] == pytest.approx(np.percentile(values, 10))  # 1.9
    assert stats["worst_to_mean"] == pytest.approx(1 / 5.5)


def test_disparity_lower_is_better_flips_worst_and_percentile():
    values = np.arange(1, 11, dtype=float)
    stats = disparity(values, higher_is_better=False)
    assert stats["worst"] == 10.0
    assert stats["p10"] == pytest.approx(np.percentile(values, 90))  # 9.1
    assert stats["worst_to_mean"] == pytest.approx(10 / 5.5)


def test_disparity_zero_mean_gives_nan_ratio():
    assert math.isnan(disparity([-1.0, 1.0], higher_is_better=True)["worst_to_mean"])


def test_share_worse_respects_direction_and_ignores_ties():
    personal, global_ = [1.0, 2.0, 3.0, 4.0], [2.0, 2.0, 2.0, 2.0]
    assert share_worse(personal, global_, higher_is_better=True) == 0.25  # only 1 < 2
    assert share_worse(personal, global_, higher_is_better=False) == 0.5  # 3 and 4 > 2
    with pytest.raises(ValueError):
        share_worse([1.0], [1.0, 2.0], higher_is_better=True)


# ---------------------------------------------------------------- group_table


def test_group_table_per_group_and_overall():
    values = [1.0, 2.0, 3.0, 4.0, 5.0, 9.0]
    groups = ["a", "a", "b", "b", "b", "c"]
    table = group_table(values, groups, higher_is_better=True)
    assert set(table["by_group"]) == {"a", "b", "c"}
    assert table["by_group"]["a"] == disparity([1.0, 2.0], higher_is_better=True)
    assert table["by_group"]["b"]["n"] == 3
    assert table["by_group"]["b"]["mean"] == pytest.approx(4.0)
    assert table["overall"]["mean"] == pytest.approx(4.0)
    assert table["overall"]["n"] == 6
    assert table["mean_gap"] == pytest.approx(9.0 - 1.5)
    assert table["worst_group"] == "a"
    assert group_table(values, groups, higher_is_better=False)["worst_group"] == "c"


def test_group_table_rejects_misaligned_groups():
    with pytest.raises(ValueError):
        group_table([1.0, 2.0], ["a"])


# ---------------------------------------------------------------- similarity and degree of personalization


def test_similarities_on_known_pairs():
    assert token_jaccard("the cat sat", "The cat, sat!") == 1.0
    assert token_jaccard("a b", "b c") == pytest.approx(1 / 3)
    assert token_jaccard("", "") == 1.0
    assert char_ngram_cosine("hello world", "hello   world") == pytest.approx(1.0)
    assert char_ngram_cosine("abc", "xyz") == 0.0
    assert 0 < char_ngram_cosine("running fast", "runner fast") < 1


REFERENCES = {
    "alice": ["I love hiking in the mountains", "Tea, always green tea"],
    "bob": ["Football every weekend with friends", "Coffee, black and strong"],
    "carol": ["Painting watercolours by the lake", "Hot chocolate with cream"],
}


def test_degree_of_personalization_same_output_for_everybody_is_zero():
    outputs = {user: ["Here is a generic answer.", "Another generic answer."] for user in REFERENCES}
    assert degree_of_personalization(outputs, REFERENCES) == pytest.approx(0.0)


def test_degree_of_personalization_reproducing_references_is_one():
    assert degree_of_personalization(REFERENCES, REFERENCES) == pytest.approx(1.0)
    assert degree_of_personalization(REFERENCES, REFERENCES, similarity=token_jaccard) == pytest.approx(1.0)


def test_degree_of_personalization_partial_model_is_in_between():
    # Only the first prompt is personalised: half the (pair, prompt) ratios are 1, half 0.
    outputs = {user: [texts[0], "generic"] for user, texts in REFERENCES.items()}
    assert degree_of_personalization(outputs, REFERENCES) == pytest.approx(0.5)


def test_degree_of_personalization_accepts_single_strings_and_skips_identical_references():
    references = {"a": "same reference", "b": "same reference", "c": "a very different one"}
    outputs = {"a": "x", "b": "totally unrelated", "c": "x"}
    # Pair (a, b) has identical references and is skipped; (a, c) outputs are equal -> 0;
    # (b, c) outputs differ completely -> 1. Mean of the two counted pairs: 0.5.
    assert degree_of_personalization(outputs, references, similarity=token_jaccard) == pytest.approx(0.5)


def test_degree_of_personalization_clips_over_divergent_outputs_to_one():
    # References differ a little (word-set divergence 1/3), outputs share nothing
    # (divergence 1): the raw ratio 3 is clipped, so unrelated text also scores 1.
    references = {"a": "the cat sat on the mat", "b": "the cat sat on the hat"}
    outputs = {"a": "completely unrelated", "b": "random noise here"}
    assert degree_of_personalization(outputs, references, similarity=token_jaccard) == 1.0


def test_degree_of_personalization_rejects_unusable_input():
    with pytest.raises(ValueError):
        degree_of_personalization({"a": "x"}, {"b": "x"})
    with pytest.raises(ValueError):
        degree_of_personalization({"a": "x", "b": "y"}, {"a": "same", "b": "same"})
    with pytest.raises(ValueError):
        degree_of_personalization({"a": ["x"], "b": ["y", "z"]}, {"a": ["p"], "b": ["q", "r"]})
