"""In-context personalization: the phrases a user writes again and again, released under record-level DP.

Why: a small instruction model copies a writing style from its prompt far
better than a few DP-SGD steps can teach it one. Shown one of the user's own
answers, SmolLM2 predicts the held-out answers of the default data at an NLL
of 1.57 against 5.76 with the bare prompt, better than any federated
fine-tuning measured without DP (docs/results.md, issue 13). A raw answer
cannot be shown under record-level DP. What can be is the set of sentences
that *many* of the user's records share (a greeting, a sign-off, a
catchphrase): no single record decides whether such a sentence appears.

The release is the weighted Gaussian mechanism for set union (Gopi et al.
2020, "Differentially Private Set Union", ICML, its Gaussian weighting with
threshold): each record contributes its ``t <= k`` first distinct candidate
sentences, each with weight ``1/sqrt(t)`` (so one record moves the weight
vector by L2 norm 1); every candidate's total gets Gaussian noise of std
``sigma`` from OS entropy; candidates above the threshold ``rho`` are
released. The ``t`` candidates of the added or removed record that no other
record holds are released with probability at most ``t * P[N(0, sigma^2) >
rho - 1/sqrt(t)]``, which ``rho = max over t <= k of (1/sqrt(t) + sigma *
Phi^-1(1 - delta_threshold / t))`` holds to ``delta_threshold``; on the other
candidates the mechanism is the Gaussian mechanism with sensitivity 1. So
the release costs one step of (noise ``sigma``, rate 1) in the device's
record-level accountant, composed with its DP-SGD steps, plus
``delta_threshold`` added to its delta. The device computes it once, on its
own records, before its first DP-SGD step; nothing of it leaves the device
(the shared tiers it conditions are DP-SGD outputs as before).

Without DP the same candidates are released when at least two records share
them (``exact_phrases``): the same mechanism, without its noise.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from statistics import NormalDist
from typing import Iterable, Sequence

from common import csprng

# A candidate is a sentence: the text between sentence-final punctuation (or a
# line break) and the next. Long sentences rarely repeat and would crowd the
# prompt, so only sentences of at most MAX_WORDS words are candidates.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
MAX_WORDS = 12
# What the model is shown before the task's own prompt.
HEADER = "Example of my writing:\n"
# Candidates a record contributes at most (k above), phrases shown at most, and the
# context's token budget (on top of max-len, client.train.encode_pairs).
PER_RECORD = 4
MAX_PHRASES = 8
CONTEXT_TOKENS = 48


def candidates(text: str, per_record: int) -> list[str]:
    """A record's distinct candidate sentences, the first ``per_record`` of them (a function of the record alone)."""
    seen: dict[str, None] = {}
    for sentence in _SENTENCE_END.split(text):
        sentence = sentence.strip()
        if sentence and len(sentence.split()) <= MAX_WORDS:
            seen.setdefault(sentence, None)
        if len(seen) == per_record:
            break
    return list(seen)


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
        sentences = candidates(text, per_record)
        for sentence in sentences:
            counts[sentence] += 1 / math.sqrt(len(sentences))
    return counts


def private_phrases(texts: Sequence[str], noise_multiplier: float, delta_threshold: float,
                    per_record: int, max_phrases: int) -> list[str]:
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


def exact_phrases(texts: Sequence[str], per_record: int, max_phrases: int) -> list[str]:
    """Without DP: the candidates at least two records share, the most shared first, at most ``max_phrases``."""
    records: Counter = Counter(sentence for text in texts for sentence in candidates(text, per_record))
    shared = [name for name in sorted(records) if records[name] >= 2]
    return sorted(shared, key=lambda name: -records[name])[:max_phrases]


def prefix(phrases: Sequence[str]) -> str:
    """The text placed before every prompt of this user ('' when nothing was released)."""
    return HEADER + " ".join(phrases) + "\n\n" if phrases else ""
