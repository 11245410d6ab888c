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
