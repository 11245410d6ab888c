"""Single-core scrubbing throughput and recall on planted Faker PII.

    python -m benchmarks.scrub_throughput [--docs N] [--seed S]   # 600 documents, 2 repeats
    python -m benchmarks.scrub_throughput --quick    # 150 documents, one repeat
    python -m benchmarks.scrub_throughput --smoke    # 4 documents, one repeat (seconds)

Documents are ~200 words of seeded Faker filler with PII planted at known
offsets (names from several locales, e-mails, phones in Faker's formats,
credit cards, IBANs, IPv4, SSNs, street addresses, URLs), half of them next
to a cue word ("call", "card", ...) and half without. Reported:

* docs/s for full mode batched (spaCy nlp.pipe), full mode unbatched
  (one nlp() call per document) and patterns mode (no NER), all on ONE core
  (BLAS/OpenMP/torch threads = 1 and the process pinned to one CPU);
* recall per planted type (overlap with a finding of the same type) for the
  full and patterns modes.

The last line is ``RESULT scrub_throughput key=value ...``.
"""

from __future__ import annotations

import os

# Thread limits must be in place before numpy/thinc/torch are imported.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
             "NUMEXPR_NUM_THREADS", "VECLIB_MAXIMUM_THREADS"):
    os.environ[_var] = "1"
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import random  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402

from faker import Faker  # noqa: E402

from benchmarks._common import add_size_flags, result_line  # noqa: E402

TARGET_WORDS = 200

# (entity type, generator name, templates with a cue, templates without)
_PLANTS = [
    ("PERSON", "name", ["My name is {v}.", "Please forward this to Mr. {v} today."],
     ["{v} said the meeting went well.", "I had lunch with {v} yesterday."]),
    ("EMAIL_ADDRESS", "email", ["Email me at {v} when ready."], ["Reply to {v} please."]),
    ("PHONE_NUMBER", "phone", ["Call me on {v} after six.", "My phone number is {v}."],
     ["Reach the office via {v} tomorrow.", "Try {v} if nobody answers."]),
    ("CREDIT_CARD", "card", ["My credit card is {v}, expiring soon."],
     ["Charge {v} for the order."]),
    ("IBAN_CODE", "iban", ["Wire it to IBAN {v} please."], ["Transfer to {v} by Friday."]),
    ("IP_ADDRESS", "ip", ["The server IP is {v} now."], ["Traffic came from {v} overnight."]),
    ("US_SSN", "ssn", ["My SSN is {v} for the form."], ["Use {v} on the tax return."]),
    ("STREET_ADDRESS", "address", ["I live at {v} with my dog."],
     ["The parcel went to {v} instead."]),
    ("URL", "url", ["See the website {v} for details."], ["More at {v} later."]),
]


# Short keys for the RESULT line (recall_PHONE=..., recall_CARD=...).
_SHORT = {"PHONE_NUMBER": "PHONE", "CREDIT_CARD": "CARD", "EMAIL_ADDRESS": "EMAIL",
          "IBAN_CODE": "IBAN", "IP_ADDRESS": "IP", "US_SSN": "SSN"}


@dataclass
class Doc:
    text: str
    spans: list[tuple[str, int, int]]


class _Gen:
    """Seeded PII value generators (Faker, several locales)."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.fakers = {loc: Faker(loc) for loc in ("en_US", "en_GB", "de_DE", "fr_FR", "it_IT",
                                                     "es_ES", "nl_NL", "pl_PL")}
        for i, f in enumerate(self.fakers.values()):
            f.seed_instance(seed + i)
        self.us = self.fakers["en_US"]

    def value(self, kind: str) -> str:
        f = self.us
        if kind == "name":
            return self.rng.choice(list(self.fakers.values())).name()
        if kind == "email":
            return f.email()
        if kind == "phone":
            # en_US formats include 001-...x..., (...)..., +1-..., ...x...
            loc = self.rng.choice(["en_US", "en_US", "en_US", "en_GB", "de_DE", "fr_FR"])
            return self.fakers[loc].phone_number()
        if kind == "card":
            return f.credit_card_number()
        if kind == "iban":
            return self.rng.choice(list(self.fakers.values())).iban()
        if kind == "ip":
            return f.ipv4_public()
        if kind == "ssn":
            return f.ssn()
        if kind == "address":
            return f.street_address()
        if kind == "url":
            return f.url()
        raise ValueError(kind)


def make_docs(n: int, seed: int) -> list[Doc]:
    gen = _Gen(seed)
    rng = gen.rng
    filler = gen.us
    docs = []
    for _ in range(n):
        parts: list[str] = []
        spans: list[tuple[str, int, int]] = []
        pos = 0
        plants = rng.sample(_PLANTS, k=5)
        words = 0
        while words < TARGET_WORDS:
            if plants and rng.random() < 0.3:
                etype, kind, cued, plain = plants.pop()
                tmpl = rng.choice(cued if rng.random() < 0.5 else plain)
                val = gen.value(kind).replace("\n", ", ")
                pre, post = tmpl.split("{v}")
                s = pos + len(pre)
                spans.append((etype, s, s + len(val)))
                sent = pre + val + post
            else:
                sent = filler.sentence(nb_words=12)
            parts.append(sent)
            pos += len(sent) + 1
            words += len(sent.split())
        docs.append(Doc(" ".join(parts), spans))
    return docs


def recall_by_type(docs: list[Doc], results) -> dict[str, float]:
    hit: dict[str, int] = {}
    tot: dict[str, int] = {}
    for d, res in zip(docs, results):
        for etype, s, e in d.spans:
            tot[etype] = tot.get(etype, 0) + 1
            if any(r.entity_type == etype and r.start < e and s < r.end for r in res):
                hit[etype] = hit.get(etype, 0) + 1
    return {t: hit.get(t, 0) / tot[t] for t in sorted(tot)}


def _pin_one_core() -> str:
    try:
        cpu = sorted(os.sched_getaffinity(0))[0]
        os.sched_setaffinity(0, {cpu})
        return f"pinned to CPU {cpu}"
    except (AttributeError, OSError):
        return "not pinned (no sched_setaffinity)"


def _timed(fn, docs_text: list[str], repeat: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn(docs_text)
        best = min(best, time.perf_counter() - t0)
    return len(docs_text) / best, out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_size_flags(ap, quick="150 documents, one repeat")
    ap.add_argument("--docs", type=int, default=None)
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args(argv)
    n = args.docs or (4 if args.smoke else 150 if args.quick else 600)
    repeat = 1 if args.quick or args.smoke else 2

    pin = _pin_one_core()
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass
    # thinc's CPU ops run on numpy/BLAS, covered by the *_NUM_THREADS vars.

    from client.pii import Scrubber

    docs = make_docs(n, args.seed)
    texts = [d.text for d in docs]
    mean_words = sum(len(t.split()) for t in texts) / len(texts)

    t0 = time.perf_counter()
    full = Scrubber.from_config(mode="full")
    patterns = Scrubber.from_config(mode="patterns")
    load_s = time.perf_counter() - t0
    # Warm-up: lazy recognizer loading and regex compilation.
    full.scrub_batch(texts[:8])
    patterns.scrub_batch(texts[:8])

    full_b, _ = _timed(full.scrub_batch, texts, repeat)
    full_u, _ = _timed(lambda ts: [full.anonymize(t, r)
                                   for t, r in zip(ts, full.analyze_unbatched(ts))],
                       texts, repeat)
    pat, _ = _timed(patterns.scrub_batch, texts, repeat)
    full_res = full.analyze_batch(texts)
    pat_res = patterns.analyze_batch(texts)
    rec_full = recall_by_type(docs, full_res)
    rec_pat = recall_by_type(docs, pat_res)

    print(f"# scrub throughput: {n} docs, mean {mean_words:.0f} words, 1 core ({pin}), "
          f"engine load {load_s:.1f}s\n")
    print("| setting | docs/s (1 core) |\n|---|---:|")
    print(f"| full, batched (nlp.pipe) | {full_b:.1f} |")
    print(f"| full, unbatched | {full_u:.1f} |")
    print(f"| patterns (no NER) | {pat:.1f} |\n")
    print("| planted type | recall full | recall patterns |\n|---|---:|---:|")
    for t in rec_full:
        print(f"| {t} | {rec_full[t]:.3f} | {rec_pat.get(t, 0.0):.3f} |")

    kv = {"docs": n, "words_per_doc": f"{mean_words:.0f}",
          "full_batched_docs_s": f"{full_b:.1f}", "full_unbatched_docs_s": f"{full_u:.1f}",
          "patterns_docs_s": f"{pat:.1f}"}
    kv.update({f"recall_{_SHORT.get(t, t)}": f"{v:.3f}" for t, v in rec_full.items()})
    kv.update({f"patterns_recall_{t}": f"{v:.3f}" for t, v in rec_pat.items()})
    print("\n" + result_line("scrub_throughput", kv))
    return kv


if __name__ == "__main__":
    main()
