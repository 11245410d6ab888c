"""Statistics for the privacy and bias audits (issue #6).

Everything here is a pure function of arrays of numbers or strings, so the
audits that read a finished run can stay thin and these can be unit tested on
constructed inputs.

Privacy
    * :func:`roc_auc`, :func:`tpr_at_fpr`: membership-inference attack quality.
      Carlini et al. 2022 ("Membership Inference Attacks From First Principles")
      argue for the TPR at a low FPR over the AUC; the report shows both.
    * :func:`empirical_epsilon`: a *lower* bound on epsilon from member and
      non-member scores (Jagielski, Ullman & Oprea 2020, "Auditing
      Differentially Private Machine Learning: How Private is Private SGD?").
      Valid only when every score is an independent trial (one training run
      per trial); the audits of one run use the one-run bound below instead.
    * :func:`one_run_p_value`, :func:`one_run_epsilon`,
      :func:`one_run_max_epsilon`, :func:`one_run_guesses`: the one-run audit
      of Steinke, Nasr & Jagielski 2023 ("Privacy Auditing with One (1)
      Training Run"): canaries included independently with probability 1/2,
      guesses on the highest and lowest scores, and the binomial-tail bound
      that turns the number of correct guesses into a lower bound on epsilon.
    * :func:`exposure`: canary exposure (Carlini et al. 2019, "The Secret
      Sharer").

Bias / disparity
    * :func:`disparity`, :func:`share_worse`: spread of per-client utility and
      how many clients personalization made worse.
    * :func:`group_table`: the same statistics per group, through fairlearn's
      ``MetricFrame``.
    * :func:`degree_of_personalization`: an EGISES-style score (Vansh et al.
      2023, "Accuracy is not Enough: Evaluating Personalization in
      Summarizers") of how much of the users' reference differences the model's
      outputs reproduce.

Score convention for the membership functions: a *higher* score means "more
likely a member" (e.g. the negated loss).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Hashable, Mapping, Sequence
from itertools import combinations

import numpy as np
from scipy.special import expit
from scipy.stats import beta as beta_distribution
from scipy.stats import binom

# ---------------------------------------------------------------- helpers


def _as_scores(name: str, scores) -> np.ndarray:
    array = np.asarray(scores, dtype=float).ravel()
    if array.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return array


def _count_at_least(sorted_scores: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """How many of ``sorted_scores`` are >= each threshold (the "predict member" side)."""
    return sorted_scores.size - np.searchsorted(sorted_scores, thresholds, side="left")


# ---------------------------------------------------------------- membership inference


def roc_auc(member_scores, nonmember_scores) -> float:
    """Area under the ROC curve of the attack "member iff score >= t".

    Computed as the Mann–Whitney statistic: the probability that a random
    member scores higher than a random non-member, a tie counting 1/2. This is
    exactly the trapezoidal AUC over all thresholds, without building the curve.
    0.5 is chance; 1.0 a perfect attack; below 0.5 the score is inverted.
    """
    members = _as_scores("member_scores", member_scores)
    nonmembers = np.sort(_as_scores("nonmember_scores", nonmember_scores))
    below = np.searchsorted(nonmembers, members, side="left")  # non-members strictly lower
    below_or_tied = np.searchsorted(nonmembers, members, side="right")
    wins = below.sum() + 0.5 * (below_or_tied - below).sum()
    return float(wins / (members.size * nonmembers.size))


def tpr_at_fpr(member_scores, nonmember_scores, fpr: float = 0.01) -> float:
    """Best true-positive rate of "member iff score >= t" whose FPR is <= ``fpr``.

    Every distinct observed score (and +inf, the attack that never says
    "member") is tried as the threshold. With n non-members the smallest
    non-zero FPR is 1/n, so an ``fpr`` below that only admits thresholds above
    every non-member score; report ``n`` alongside so a reader knows the
    resolution.
    """
    if not 0.0 <= fpr <= 1.0:
        raise ValueError(f"fpr must be in [0, 1], got {fpr}")
    members = np.sort(_as_scores("member_scores", member_scores))
    nonmembers = np.sort(_as_scores("nonmember_scores", nonmember_scores))
    thresholds = np.append(np.unique(np.concatenate([members, nonmembers])), np.inf)
    false_positive_rate = _count_at_least(nonmembers, thresholds) / nonmembers.size
    true_positive_rate = _count_at_least(members, thresholds) / members.size
    admissible = false_positive_rate <= fpr + 1e-12  # +inf is always admissible
    return float(true_positive_rate[admissible].max())


def clopper_pearson_upper(errors, trials, alpha: float):
    """One-sided (1 - alpha) Clopper–Pearson upper bound on a binomial rate.

    The exact bound: the largest p with P[Binomial(trials, p) <= errors] >= alpha,
    i.e. the (1 - alpha) quantile of Beta(errors + 1, trials - errors). When every
    trial is an error the bound is 1. Vectorised over ``errors``.
    """
    errors = np.asarray(errors, dtype=float)
    trials = float(trials)
    with np.errstate(invalid="ignore"):
        upper = beta_distribution.ppf(1.0 - alpha, errors + 1.0, trials - errors)
    return np.where(errors >= trials, 1.0, upper)


def empirical_epsilon(member_scores, nonmember_scores, delta: float, alpha: float = 0.05, thresholds=None) -> float:
    """Lower bound on epsilon that holds with confidence 1 - alpha (Jagielski et al. 2020).

    An (epsilon, delta)-DP mechanism forces every membership test to satisfy
    ``FPR + e^eps * FNR >= 1 - delta`` and ``FNR + e^eps * FPR >= 1 - delta``
    (Kairouz et al. 2015). So an observed test gives

        eps >= max(log((1 - delta - FPR) / FNR), log((1 - delta - FNR) / FPR)).

    The observed rates are noisy, so, as in Jagielski et al., each is replaced by
    its Clopper–Pearson upper bound. Each bound is one-sided at level alpha / 2,
    so by the union bound both hold together with probability >= 1 - alpha.

    The test is "member iff score >= t". With ``thresholds=None`` every observed
    score is tried and the maximum is returned. Choosing the threshold on the
    same scores makes that maximum slightly optimistic. For a strict audit, pick
    the threshold on held-out scores and pass it as ``thresholds=[t]``.

    The bound assumes every member and non-member score is an independent
    trial (a fresh training run per trial, as in Jagielski et al.). Scores of
    many records from one training run are not independent, so on one run use
    :func:`one_run_epsilon` with randomly included canaries instead.

    Returns 0.0 when no threshold gives a positive bound, i.e. the scores show
    no significant privacy loss. With n samples per side the bound is at most
    about log(n / log(2 / alpha)), however well the attack separates them. A
    small audit cannot certify a large epsilon.
    """
    if not 0.0 <= delta < 1.0:
        raise ValueError(f"delta must be in [0, 1), got {delta}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    members = np.sort(_as_scores("member_scores", member_scores))
    nonmembers = np.sort(_as_scores("nonmember_scores", nonmember_scores))
    if thresholds is None:
        thresholds = np.unique(np.concatenate([members, nonmembers]))
    thresholds = np.asarray(thresholds, dtype=float).ravel()

    false_positives = _count_at_least(nonmembers, thresholds)
    false_negatives = members.size - _count_at_least(members, thresholds)
    fpr_upper = clopper_pearson_upper(false_positives, nonmembers.size, alpha / 2)
    fnr_upper = clopper_pearson_upper(false_negatives, members.size, alpha / 2)

    # Clopper–Pearson upper bounds are > 0 for any finite sample, so the
    # denominators are safe; a numerator <= 0 means that direction proves nothing.
    best = 0.0
    for numerator, denominator in ((1 - delta - fpr_upper, fnr_upper), (1 - delta - fnr_upper, fpr_upper)):
        valid = numerator > 0
        if valid.any():
            best = max(best, float(np.max(np.log(numerator[valid] / denominator[valid]))))
    return best


# ---------------------------------------------------------------- one-run audit


def _check_counts(m: int, r: int, v: int) -> None:
    if not (0 <= v <= r <= m):
        raise ValueError(f"need 0 <= correct ({v}) <= guesses ({r}) <= canaries ({m})")


def one_run_p_value(m: int, r: int, v: int, epsilon: float, delta: float = 0.0) -> float:
    """P[at least ``v`` of ``r`` guesses correct] for an (epsilon, delta)-DP mechanism (an upper bound).

    Steinke, Nasr & Jagielski 2023, Theorems 3.1 (pure DP) and 3.3
    (approximate DP). ``m`` canaries are each included independently with
    probability 1/2; the auditor guesses "in" or "out" for ``r`` of them from
    the mechanism's output alone (abstaining on the rest) and ``v`` guesses are
    right. With q = e^eps / (1 + e^eps), the accuracy of eps-DP randomized
    response, and B ~ Binomial(r, q):

        p = P[B >= v] + 2 m delta * max_{i = 1..v} P[v - i <= B < v] / i

    (the second term vanishes for delta = 0), capped at 1. A small p rejects
    the hypothesis "the mechanism is (epsilon, delta)-DP".
    """
    _check_counts(m, r, v)
    if epsilon < 0 or not 0.0 <= delta <= 1.0:
        raise ValueError(f"need epsilon >= 0 and delta in [0, 1], got {epsilon}, {delta}")
    if v == 0:
        return 1.0
    q = float(expit(epsilon))
    tail = float(binom.sf(v - 1, r, q))  # P[B >= v]
    if delta == 0.0:
        return min(tail, 1.0)
    i = np.arange(1, v + 1)
    below = binom.sf(v - i - 1, r, q) - tail  # P[v - i <= B < v]
    return float(min(tail + 2 * m * delta * float(np.max(below / i)), 1.0))


def one_run_epsilon(m: int, r: int, v: int, delta: float = 0.0, beta: float = 0.05, tol: float = 1e-6) -> float:
    """Lower bound on epsilon at confidence ``1 - beta`` from ``v`` correct of ``r`` guesses on ``m`` canaries.

    The largest epsilon whose hypothesis "(epsilon, delta)-DP" the observation
    rejects at level ``beta`` (:func:`one_run_p_value` < ``beta``), found by
    bisection to ``tol``: with probability at least 1 - beta over the canaries'
    inclusion coins, the mechanism is not (eps', delta)-DP for any eps' below
    the returned value. 0.0 when even epsilon = 0 is not rejected.
    """
    _check_counts(m, r, v)
    if not 0.0 < beta < 1.0:
        raise ValueError(f"beta must lie in (0, 1), got {beta}")

    def rejected(eps: float) -> bool:
        return one_run_p_value(m, r, v, eps, delta) < beta

    if not rejected(0.0):
        return 0.0
    lo, hi = 0.0, 1.0
    while rejected(hi):
        lo, hi = hi, 2 * hi
        if hi > 1e3:  # p -> 1 as epsilon grows for any v <= r; this is a safeguard only
            return lo
    while hi - lo > tol:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if rejected(mid) else (lo, mid)
    return lo


def one_run_max_epsilon(m: int, delta: float = 0.0, beta: float = 0.05, guesses: int | None = None) -> float:
    """The largest lower bound an audit of ``m`` canaries can certify: every one of ``guesses`` (default m) correct.

    For delta = 0 this has the closed form logit(beta ** (1 / guesses)): no
    attack, however strong, certifies more at these sizes.
    """
    r = m if guesses is None else guesses
    return one_run_epsilon(m, r, r, delta, beta)


def one_run_guesses(scores, k_plus: int, k_minus: int) -> np.ndarray:
    """Guesses from attack scores: +1 ("included") for the ``k_plus`` highest, -1 for the ``k_minus`` lowest, 0 else.

    Ties are broken by position (a stable sort), which is independent of the
    inclusion coins, so the guesses remain a function of the output alone.
    """
    array = _as_scores("scores", scores)
    if k_plus < 0 or k_minus < 0 or k_plus + k_minus > array.size:
        raise ValueError(f"need k_plus, k_minus >= 0 and k_plus + k_minus <= {array.size}")
    order = np.argsort(array, kind="stable")
    guesses = np.zeros(array.size, dtype=int)
    guesses[order[array.size - k_plus :]] = 1
    guesses[order[:k_minus]] = -1
    return guesses


# ---------------------------------------------------------------- canaries


def exposure(canary_score: float, reference_scores) -> float:
    """Exposure of a canary in bits (Carlini et al. 2019, "The Secret Sharer").

    Scores are *losses* (e.g. the canary's negative log-likelihood under the
    model): lower means the model finds that candidate more likely.

    Convention (as in the paper, where the canary is one of the candidates):
    the candidate set R is the reference candidates plus the canary, so
    ``|R| = len(reference_scores) + 1``; ``rank = 1 + number of reference
    candidates with a strictly lower loss``.

        exposure = log2 |R| - log2 rank

    It ranges from 0 (the canary is the least likely candidate) to log2 |R|
    (the canary is the most likely). A tie counts in the canary's favour, so
    exposure can be overestimated but never underestimated. That is the safe
    direction for a privacy audit. With |R| fixed, an untrained model's canary
    sits at a uniformly random rank, so its expected exposure is about
    log2(e) ~ 1.44 bits, not 0.
    """
    references = _as_scores("reference_scores", reference_scores)
    canary = float(canary_score)
    if not math.isfinite(canary):
        raise ValueError("canary_score must be finite")
    rank = 1 + int(np.count_nonzero(references < canary))
    return math.log2(references.size + 1) - math.log2(rank)


# ---------------------------------------------------------------- disparity


def _goodness(values: np.ndarray, higher_is_better: bool) -> np.ndarray:
    """Values flipped so that larger is always better, for the percentile logic."""
    return values if higher_is_better else -values


def disparity(values, higher_is_better: bool) -> dict[str, float]:
    """Spread of a per-client metric, in the metric's own units.

    * ``mean``, ``std`` (population, ddof=0: the clients are the whole
      population being described, not a sample of one);
    * ``worst``: the worst client's value (min if higher is better, else max);
    * ``p10``: the value at the 10th percentile of *goodness*, i.e. 90% of
      clients do at least this well (for a loss that is the 90th percentile of
      the values), linear interpolation;
    * ``worst_to_mean``: worst / mean. It is <= 1 when higher is better and
      >= 1 when lower is better, and the further from 1 the more unequal. NaN
      when the mean is 0.
    """
    array = _as_scores("values", values)
    goodness = _goodness(array, higher_is_better)
    sign = 1.0 if higher_is_better else -1.0
    mean = float(array.mean())
    worst = float(sign * goodness.min())
    return {
        "n": int(array.size),
        "mean": mean,
        "std": float(array.std()),
        "worst": worst,
        "p10": float(sign * np.percentile(goodness, 10)),
        "worst_to_mean": worst / mean if mean != 0 else float("nan"),
    }


def share_worse(personal, global_, higher_is_better: bool) -> float:
    """Fraction of clients whose personalized metric is strictly worse than the global model's.

    ``personal[i]`` and ``global_[i]`` must describe the same client.
    """
    personal_array = _as_scores("personal", personal)
    global_array = _as_scores("global_", global_)
    if personal_array.shape != global_array.shape:
        raise ValueError(f"personal has {personal_array.size} clients, global_ has {global_array.size}")
    gain = _goodness(personal_array, higher_is_better) - _goodness(global_array, higher_is_better)
    return float(np.mean(gain < 0))


def group_table(values, groups, higher_is_better: bool = True) -> dict:
    """Per-group :func:`disparity` statistics via fairlearn's ``MetricFrame``.

    ``values[i]`` is client i's metric and ``groups[i]`` its group (e.g. the
    persona or a demographic attribute). Returns::

        {"by_group": {group: {"n", "mean", "std", "worst", "p10", "worst_to_mean"}},
         "overall": {...same keys...},
         "mean_gap": largest minus smallest group mean,
         "worst_group": the group whose mean is worst}

    Why fairlearn: it is the standard tool for disaggregated metrics, and
    ``MetricFrame`` also handles several sensitive features at once if the
    audit grows to need them.
    """
    from fairlearn.metrics import MetricFrame  # pulls pandas + scikit-learn; import only when used

    array = _as_scores("values", values)
    group_labels = np.asarray(groups)
    if group_labels.shape != array.shape:
        raise ValueError(f"{array.size} values but {group_labels.size} group labels")
    statistic_names = ("n", "mean", "std", "worst", "p10", "worst_to_mean")

    def statistic(name: str) -> Callable:
        # MetricFrame calls metric(y_true, y_pred); the values ride in y_true.
        return lambda y_true, _y_pred: disparity(np.asarray(y_true), higher_is_better)[name]

    frame = MetricFrame(
        metrics={name: statistic(name) for name in statistic_names},
        y_true=array,
        y_pred=array,
        sensitive_features=group_labels,
    )
    by_group = {
        group: {name: _plain(row[name]) for name in statistic_names}
        for group, row in frame.by_group.to_dict(orient="index").items()
    }
    overall = {name: _plain(frame.overall[name]) for name in statistic_names}
    means = {group: stats["mean"] for group, stats in by_group.items()}
    pick_worst = min if higher_is_better else max
    return {
        "by_group": by_group,
        "overall": overall,
        "mean_gap": float(frame.difference()["mean"]),
        "worst_group": pick_worst(means, key=means.get),
    }


def _plain(value):
    """pandas hands back numpy scalars and floats for integer columns; keep the dict JSON-friendly."""
    number = float(value)
    return int(number) if number.is_integer() and abs(number) < 2**53 else number


# ---------------------------------------------------------------- degree of personalization

_WORD = re.compile(r"\w+", re.UNICODE)


def token_jaccard(text_a: str, text_b: str) -> float:
    """Jaccard similarity of the two texts' lower-cased word sets (1 = same words)."""
    words_a = set(_WORD.findall(text_a.lower()))
    words_b = set(_WORD.findall(text_b.lower()))
    if not words_a and not words_b:
        return 1.0
    return len(words_a & words_b) / len(words_a | words_b)


def char_ngram_cosine(text_a: str, text_b: str, n: int = 3) -> float:
    """Cosine similarity of character n-gram counts (1 = same n-gram profile).

    Character n-grams tolerate inflection and tokenization differences that a
    word-set measure counts as entirely different, and need no model.
    Whitespace is collapsed so that formatting alone does not count as a
    difference. Texts shorter than n are compared as a single gram.
    """
    grams_a, grams_b = _char_ngrams(text_a, n), _char_ngrams(text_b, n)
    if not grams_a and not grams_b:
        return 1.0
    dot = sum(count * grams_b[gram] for gram, count in grams_a.items())
    norm_a = math.sqrt(sum(c * c for c in grams_a.values()))
    norm_b = math.sqrt(sum(c * c for c in grams_b.values()))
    if norm_a == 0 or norm_b == 0:
        return 0.0
    return min(1.0, dot / (norm_a * norm_b))  # clip float round-off above 1


def _char_ngrams(text: str, n: int) -> Counter:
    normalized = " ".join(text.lower().split())
    if len(normalized) < n:
        return Counter([normalized]) if normalized else Counter()
    return Counter(normalized[i : i + n] for i in range(len(normalized) - n + 1))


def degree_of_personalization(
    outputs_by_user: Mapping[Hashable, str | Sequence[str]],
    references_by_user: Mapping[Hashable, str | Sequence[str]],
    similarity: Callable[[str, str], float] = char_ngram_cosine,
    min_reference_divergence: float = 1e-9,
) -> float:
    """How much of the users' reference differences the model reproduces, in [0, 1].

    EGISES-style (Vansh et al. 2023): a personalized model should produce
    outputs that differ across users to the extent that the users' own
    references differ. For every pair of users (i, j) and every prompt k, with
    divergence d = 1 - similarity,

        ratio = min(1, d(out_i[k], out_j[k]) / d(ref_i[k], ref_j[k]))

    and the score is the mean ratio. 0 means the model says the same thing to
    everybody; 1 means output differences are at least as large as the
    reference differences. Pairs whose references are identical
    (divergence <= ``min_reference_divergence``) carry no signal and are skipped.

    Values may be one string per user or a list of strings per user, aligned by
    prompt (k-th entry = the same prompt for every user), which is the EGISES
    per-document setting.

    Caveat: this measures *sensitivity* to the user, not accuracy. A model
    emitting random text also scores 1, so always show it next to an accuracy
    metric.
    """
    if set(outputs_by_user) != set(references_by_user):
        raise ValueError("outputs_by_user and references_by_user must have the same users")
    users = list(references_by_user)
    outputs = {user: _as_text_list(outputs_by_user[user]) for user in users}
    references = {user: _as_text_list(references_by_user[user]) for user in users}
    prompt_counts = {len(texts) for texts in (*outputs.values(), *references.values())}
    if len(prompt_counts) != 1:
        raise ValueError("every user needs the same number of outputs and references (aligned by prompt)")
    (num_prompts,) = prompt_counts

    ratios = []
    for user_i, user_j in combinations(users, 2):
        for k in range(num_prompts):
            reference_divergence = 1.0 - similarity(references[user_i][k], references[user_j][k])
            if reference_divergence <= min_reference_divergence:
                continue
            output_divergence = 1.0 - similarity(outputs[user_i][k], outputs[user_j][k])
            ratios.append(min(1.0, max(0.0, output_divergence) / reference_divergence))
    if not ratios:
        raise ValueError("need at least two users whose references differ")
    return float(np.mean(ratios))


def _as_text_list(value: str | Sequence[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)
