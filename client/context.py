"""In-context personalization: how a user opens and closes what they write, released under record-level DP.

Why: a small instruction model copies a writing style from its prompt far
better than a few DP-SGD steps can teach it one. Shown one of the user's own
answers, SmolLM2 predicts the held-out answers of the default data at an NLL
of 1.57 against 5.76 with the bare prompt, better than any federated
fine-tuning measured without DP (docs/results.md, issue 13). A raw answer
cannot be shown under record-level DP. What can be is what *many* of the
user's records share, and a personal style concentrates at a text's edges: a
greeting or an opener, a sign-off or a catchphrase at the end. So each record
offers two candidates, its first ``WINDOW`` words as an opening and its last
``WINDOW`` words as a closing (a role and the words: the same words as an
opening and as a closing are two candidates), and the model is told which is
which. Windows of words, not sentences: a sign-off is often not a sentence of
its own ("... was kinda mid tbh lol ~wild walnuts forever~ xoxo").

The release is the weighted Gaussian mechanism for set union (Gopi et al.
2020, "Differentially Private Set Union", ICML, its Gaussian weighting with
threshold): each record contributes its ``t <= k`` distinct candidates, each
with weight ``1/sqrt(t)`` (so one record moves the weight vector by L2 norm
1); every candidate's total gets Gaussian noise of std ``sigma`` from OS
entropy; candidates above the threshold ``rho`` are released. The ``t``
candidates of the added or removed record that no other record holds are
released with probability at most ``t * P[N(0, sigma^2) > rho - 1/sqrt(t)]``,
which ``rho = max over t <= k of (1/sqrt(t) + sigma * Phi^-1(1 - delta_threshold
/ t))`` holds to ``delta_threshold``; on the other candidates the mechanism is
the Gaussian mechanism with sensitivity 1. So the release costs one step of
(noise ``sigma``, rate 1) in the device's record-level accountant, composed
with its DP-SGD steps, plus ``delta_threshold`` added to its delta. The device
computes it once, on its own records, before its first DP-SGD step; nothing of
it leaves the device (the shared tiers it conditions are DP-SGD outputs as
before).

Without DP the same candidates are released when at least two records share
them (``exact_phrases``): the same mechanism, without its noise.
"""

from __future__ import annotations

import math
from collections import Counter
from statistics import NormalDist
from typing import Iterable, Sequence

from common import csprng

# The roles a candidate can have, and how the prompt names them.
OPENING, CLOSING = "opening", "closing"
ROLE_LINES = {OPENING: "I often begin with: ", CLOSING: "I often end with: ", "": "I often write: "}
# Words in a candidate: enough to carry a greeting or a sign-off, few enough to recur word for word.
WINDOW = 4
# What the model is shown before the task's own prompt.
HEADER = "About my writing:\n"
# Candidates a record contributes at most (k above), phrases shown at most, and the
# context's token budget (on top of max-len, client.train.encode_pairs).
PER_RECORD = 2
MAX_PHRASES = 8
CONTEXT_TOKENS = 48


def candidates(text: str, per_record: int = PER_RECORD) -> list[tuple[str, str]]:
    """A record's candidates, (role, words): its opening and closing windows (a function of the record alone)."""
    words = text.split()
    if not words:
        return []
    return [(OPENING, " ".join(words[:WINDOW])), (CLOSING, " ".join(words[-WINDOW:]))][:per_record]


def threshold(noise_multiplier: float, delta_threshold: float, per_record: int) -> float:
    """rho: for every t <= per_record, ``t * P[N(0, sigma^2) > rho - 1/sqrt(t)] <= delta_threshold`` (Gopi et al. 2020)."""
    if not (noise_multiplier > 0 and 0 < delta_threshold < 1 and per_record >= 1):
        raise ValueError("the phrase release needs noise > 0, delta in (0, 1) and at least one candidate a record")
    return max(1 / math.sqrt(t) + noise_multiplier * -NormalDist().inv_cdf(delta_threshold / t)
               for t in range(1, per_record + 1))


def weighted_counts(texts: Iterable[str], per_record: int) -> Counter:
    """Each candidate's summed weight: ``1/sqrt(t)`` from every record that holds it among its ``t`` candidates."""
    counts: Counter = Counter()
    for text in texts:
        held = candidates(text, per_record)
        for candidate in held:
            counts[candidate] += 1 / math.sqrt(len(held))
    return counts


def private_phrases(texts: Sequence[str], noise_multiplier: float, delta_threshold: float,
                    per_record: int, max_phrases: int) -> list[tuple[str, str]]:
    """The DP release: candidates whose noised weight clears the threshold, the largest first, at most ``max_phrases``.

    The noise comes from the operating system (``common.csprng``), never from
    the run's seed, which the server knows.
    """
    counts = weighted_counts(texts, per_record)
    rho = threshold(noise_multiplier, delta_threshold, per_record)
    names = sorted(counts)  # a fixed order, so the noise draw does not depend on insertion order
    noise = csprng.gaussian(len(names), noise_multiplier) if names else []
    noised = {name: counts[name] + float(z) for name, z in zip(names, noise)}
    released = [name for name in names if noised[name] > rho]
    return sorted(released, key=lambda name: -noised[name])[:max_phrases]


def exact_phrases(texts: Sequence[str], per_record: int, max_phrases: int) -> list[tuple[str, str]]:
    """Without DP: the candidates at least two records share, the most shared first, at most ``max_phrases``."""
    records: Counter = Counter(candidate for text in texts for candidate in candidates(text, per_record))
    shared = [name for name in sorted(records) if records[name] >= 2]
    return sorted(shared, key=lambda name: -records[name])[:max_phrases]


def prefix(phrases: Sequence) -> str:
    """The text placed before every prompt of this user ('' when nothing was released).

    ``phrases`` as released, (role, words) pairs (as lists once read back from the device's store).
    """
    # A store written by the earlier sentence release holds plain strings: shown without a role.
    pairs = [("", item) if isinstance(item, str) else tuple(item) for item in phrases]
    lines = []
    for role, line in ROLE_LINES.items():
        words = [w for r, w in pairs if r == role]
        if words:
            lines.append(line + " / ".join(words))
    return HEADER + "\n".join(lines) + "\n\n" if lines else ""
