"""Deterministic generator of the embedded default dataset (the "persona corpus").

The project ships no downloaded data by default, so this module writes a small,
synthetic, fully reproducible corpus of users.  Every user belongs to one of a
few *personas*; a persona fixes a strongly templated writing style and the item
categories the user likes.  On top of that every user has a *signature* (a
personal sign-off phrase) that no persona-level model can know, so a per-user
adapter has something to learn that the persona/global tiers cannot.

Layout written under ``out_dir``::

    users/<user_id>.jsonl   one file per user, in the per-user JSONL format
                            documented in ``client/store.py`` (the only thing a
                            device ever reads)
    pii_sidecar.jsonl       ground truth of planted PII: user_id, record id,
                            field, entity_type, exact value, start/end offsets.
                            Audits read it; training never does.
    manifest.json           spec, items, personas and per-user ground truth
                            (persona index, signature, record counts, canaries
                            and, with ``audit_canaries``, every audit canary
                            with its inclusion coin).  Persona labels are for
                            EVALUATION ONLY: a device must infer its persona,
                            it is never told.

Determinism: the same ``DatasetSpec`` (and the same installed Faker version,
whose locale data is part of the output) gives byte-identical files.  All
randomness flows from per-purpose ``random.Random`` instances seeded from a hash
of (spec.seed, purpose, user index), so adding a field to one user's data never
shifts another user's draws.  The one-run audit canaries are the exception on
purpose: their phrases and inclusion coins come from ``spec.audit_seed``, drawn
from OS entropy when not given, never from ``spec.seed`` (which the run config
carries to every device); only the manifest records it.  Everything else in
the corpus is the same whatever the audit seed.

Run it as ``python -m simulations.personas OUT_DIR [--users N] [--seed S]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import secrets
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable

from faker import Faker

FORMAT_VERSION = 1

# PII entity labels follow Presidio's names so audits can compare detections to
# ground truth without a mapping table.  Street addresses are labelled LOCATION
# because that is the closest entity Presidio's default recognisers emit.
PII_TYPES = ("PERSON", "EMAIL_ADDRESS", "PHONE_NUMBER", "LOCATION", "CREDIT_CARD")

# Items are split into categories by index so every persona has a clearly
# preferred category; ratings/preferences carry the persona signal.
CATEGORIES = ("reports", "street_food", "dev_tools", "travel_gear", "fitness")

_EPOCH = datetime(2026, 1, 1, tzinfo=timezone.utc)

@dataclass(frozen=True)
class Persona:
    """One writing style.  Every field is a closed, small vocabulary on purpose:
    a 135M model with LoRA must pick the style up in a handful of steps."""

    name: str
    liked_category: str
    opener: str
    bodies: tuple[str, ...]  # each contains "{topic}"
    followups: tuple[str, ...]  # topic-free second sentences for documents
    signature_wrap: str  # contains "{sig}"; persona-level frame, user-level words
    closer: str
    topics: tuple[str, ...]
    pii_frames: tuple[tuple[str, tuple[str, ...]], ...]  # (template, entity types)
    lowercase: bool = False  # applied to literal parts only, never to PII values


PERSONAS: tuple[Persona, ...] = (
    Persona(
        name="formal_analyst",
        liked_category="reports",
        opener="Dear colleagues, I would note that",
        bodies=(
            "{topic} merits careful review.",
            "{topic} remains broadly stable.",
            "{topic} warrants further analysis.",
        ),
        followups=(
            "Accordingly, I recommend a measured approach.",
            "The supporting figures are attached for reference.",
        ),
        signature_wrap="As ever, {sig}.",
        closer="Kind regards.",
        topics=(
            "the quarterly budget", "the audit schedule", "the hiring plan",
            "the risk register", "the vendor review", "the annual forecast",
            "the compliance memo", "the board agenda", "the travel policy",
            "the market outlook",
        ),
        pii_frames=(
            ("Kindly contact {0}.", ("EMAIL_ADDRESS",)),
            ("Please consult {0}.", ("PERSON",)),
            ("Correspondence may be sent to {0}.", ("LOCATION",)),
            ("Please reimburse card {0}.", ("CREDIT_CARD",)),
        ),
    ),
    Persona(
        name="casual_foodie",
        liked_category="street_food",
        opener="omg ok so",
        bodies=(
            "{topic} was lowkey bussin ngl!!",
            "{topic} hit different fr!!",
            "{topic} was kinda mid tbh lol",
        ),
        followups=("no cap i'd go back", "like fr the vibes tho"),
        signature_wrap="~{sig} forever~",
        closer="xoxo",
        topics=(
            "the ramen spot", "taco tuesday", "the new bakery", "brunch",
            "the night market", "bubble tea", "the pizza place", "dumplings",
            "the food truck", "hot sauce",
        ),
        pii_frames=(
            ("text me at {0} lol", ("PHONE_NUMBER",)),
            ("{0} said hi", ("PERSON",)),
            ("meet me at {0} ok", ("LOCATION",)),
            ("dm {0} for the recipe", ("EMAIL_ADDRESS",)),
        ),
        lowercase=True,
    ),
    Persona(
        name="terse_engineer",
        liked_category="dev_tools",
        opener="Status: ok.",
        bodies=(
            "Topic: {topic}. Next: benchmark.",
            "Topic: {topic}. Next: write tests.",
            "Topic: {topic}. Next: ship fix.",
        ),
        followups=("Blockers: none.", "ETA: friday."),
        signature_wrap="Sig: {sig}.",
        closer="EOM.",
        topics=(
            "build cache", "flaky test", "db migration", "api latency",
            "log rotation", "memory leak", "ci pipeline", "load balancer",
            "disk quota", "release branch",
        ),
        pii_frames=(
            ("Ping: {0}.", ("EMAIL_ADDRESS",)),
            ("Oncall: {0}.", ("PERSON",)),
            ("Pager: {0}.", ("PHONE_NUMBER",)),
            ("Card: {0}.", ("CREDIT_CARD",)),
        ),
    ),
    Persona(
        name="lyrical_traveller",
        liked_category="travel_gear",
        opener="Ah, wanderer,",
        bodies=(
            "{topic} glows like a lantern over quiet water...",
            "{topic} hums like wind across old stone...",
            "{topic} drifts like salt upon the evening air...",
        ),
        followups=("The road remembers every step...", "I linger a while longer..."),
        signature_wrap="Yours, {sig}.",
        closer="Onward, always.",
        topics=(
            "the harbour at dawn", "a mountain pass", "the old railway",
            "a desert road", "the northern lights", "a river ferry",
            "the lighthouse", "a village market", "the night train",
            "an island chapel",
        ),
        pii_frames=(
            ("I wrote to {0}.", ("PERSON",)),
            ("I rest at {0}.", ("LOCATION",)),
            ("Letters reach me via {0}.", ("EMAIL_ADDRESS",)),
            ("Call {0} if lost.", ("PHONE_NUMBER",)),
        ),
    ),
    Persona(
        name="hype_coach",
        liked_category="fitness",
        opener="HEY TEAM!",
        bodies=(
            "Time for {topic}! No excuses!",
            "We crush {topic} today! Push harder!",
            "Bring the ENERGY to {topic}!",
        ),
        followups=("NO DAYS OFF!", "Hydrate and GO!"),
        signature_wrap="Team {sig}!",
        closer="BE LEGENDARY!",
        topics=(
            "leg day", "the morning run", "core work", "hill sprints",
            "rowing drills", "the yoga flow", "box jumps", "the cooldown",
            "swim laps", "rest day",
        ),
        pii_frames=(
            ("Sign up at {0}!", ("EMAIL_ADDRESS",)),
            ("Shoutout to {0}!", ("PERSON",)),
            ("Call {0} NOW!", ("PHONE_NUMBER",)),
            ("Meet at {0}!", ("LOCATION",)),
        ),
    ),
)

MIN_PERSONAS, MAX_PERSONAS = 3, len(PERSONAS)

# User signatures are adjective+noun pairs drawn WITHOUT replacement, so no two
# users share one and a per-user model has a unique target to learn.
_SIG_ADJ = (
    "copper", "velvet", "quiet", "amber", "silver", "crimson", "gentle", "golden",
    "wild", "misty", "bright", "hollow", "frosty", "rusty", "lucky", "cobalt",
    "sunny", "salty", "mellow", "brave",
)
_SIG_NOUN = (
    "kettles", "sparrows", "lanterns", "pebbles", "comets", "tulips", "harbors",
    "pancakes", "meadows", "rockets", "otters", "violins", "cedars", "marbles",
    "puddles", "beacons", "walnuts", "ferns", "anchors", "pixels",
)
MAX_USERS = len(_SIG_ADJ) * len(_SIG_NOUN)

# Favourite topics are shared across personas: they are user-level interests
# (surfaced as preferred_tags and over-represented in the user's tasks).
_HOBBIES = (
    "chess", "gardening", "jazz", "pottery", "astronomy", "cycling", "origami",
    "birdwatching", "sourdough", "climbing", "poetry", "photography", "knitting",
    "sailing", "board games", "calligraphy",
)
_AGE_BANDS = ("18-24", "25-34", "35-44", "45-54", "55-64", "65+")


@dataclass
class DatasetSpec:
    """What to generate.  Counts per user vary by about +-25% (train tasks,
    documents, interactions, preferences) so clients are not all the same size;
    test_tasks is fixed so every user is evaluated on the same number of items."""

    num_users: int = 24
    num_personas: int = 4
    seed: int = 0
    pii_share: float = 0.3
    train_tasks: int = 40
    test_tasks: int = 6
    documents: int = 12
    interactions: int = 20
    preferences: int = 10
    num_items: int = 40
    # Data volume (routing by data volume, issue #4): a share of users are
    # cold-start (a handful of training tasks) and a share occasional; the
    # rest are frequent users with ~train_tasks each.
    cold_start_share: float = 0.15
    occasional_share: float = 0.25
    cold_start_tasks: int = 3
    occasional_tasks: int = 10
    # Privacy audits (issue #6). Canaries (Carlini et al. 2019): a random
    # PII-shaped secret (a phone number in a fixed sentence) planted
    # ``canary_repeats`` times in the train tasks of ``canary_users`` frequent
    # users. Hold-out users are generated like the others but never join the
    # federation: the non-members of the user-level membership attack.
    canary_users: int = 2
    canary_repeats: int = 4
    holdout_users: int = 0
    # One-run audit (Steinke, Nasr & Jagielski 2023): ``audit_canaries`` random
    # phrases per canary user (the users that hold the exposure canary), each
    # included in that user's train tasks independently with probability 1/2.
    # Phrases and coins come from ``audit_seed`` (None: drawn from OS entropy),
    # which only manifest.json records; excluded phrases exist only there.
    audit_canaries: int = 0
    audit_seed: int | None = None

    def validate(self) -> None:
        if not MIN_PERSONAS <= self.num_personas <= MAX_PERSONAS:
            raise ValueError(
                f"num_personas must be in [{MIN_PERSONAS}, {MAX_PERSONAS}], got {self.num_personas}")
        if not self.num_personas <= self.num_users <= MAX_USERS:
            raise ValueError(
                f"num_users must be in [num_personas, {MAX_USERS}], got {self.num_users}")
        if not 0.0 <= self.pii_share <= 1.0:
            raise ValueError(f"pii_share must be in [0, 1], got {self.pii_share}")
        if not (0.0 <= self.cold_start_share and 0.0 <= self.occasional_share and self.cold_start_share + self.occasional_share <= 1.0):
            raise ValueError("cold_start_share and occasional_share must be >= 0 and sum to <= 1")
        for name in ("train_tasks", "test_tasks", "documents", "interactions", "preferences", "cold_start_tasks", "occasional_tasks"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        # Each persona needs at least 2 items in its liked category and some
        # items outside it, or preference pairs cannot encode the persona.
        if self.canary_users < 0 or self.canary_repeats < 1 or self.holdout_users < 0 or self.audit_canaries < 0:
            raise ValueError("canary_users, holdout_users and audit_canaries must be >= 0, canary_repeats >= 1")
        if self.num_users + self.holdout_users > MAX_USERS:
            raise ValueError(f"num_users + holdout_users must be <= {MAX_USERS}")
        if self.num_items < 2 * len(CATEGORIES):
            raise ValueError(f"num_items must be >= {2 * len(CATEGORIES)}, got {self.num_items}")


def _rng(seed: int, *purpose: object) -> random.Random:
    # Hash instead of seed arithmetic so streams for different users/purposes are
    # independent, and so Python's str hash randomisation never leaks in.
    digest = hashlib.sha256(repr((seed, *purpose)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _vary(rng: random.Random, base: int) -> int:
    spread = base // 4
    return max(1, base + rng.randint(-spread, spread))


def _ts(minutes: int) -> str:
    return (_EPOCH + timedelta(minutes=minutes)).strftime("%Y-%m-%dT%H:%M:%SZ")


def item_category(item_index: int) -> str:
    return CATEGORIES[item_index % len(CATEGORIES)]


def _item_id(index: int) -> str:
    return f"item_{index:03d}"


def _pii_value(fake: Faker, etype: str) -> str:
    if etype == "PERSON":
        return fake.name()
    if etype == "EMAIL_ADDRESS":
        return fake.email()
    if etype == "PHONE_NUMBER":
        return fake.phone_number()
    if etype == "LOCATION":
        # Faker addresses span lines; a single line keeps JSONL text realistic.
        return f"{fake.street_address()}, {fake.city()}"
    if etype == "CREDIT_CARD":
        return fake.credit_card_number()
    raise ValueError(f"unknown PII type {etype}")


def _pii_parts(persona: Persona, rng: random.Random, fake: Faker) -> list[tuple[str, str]]:
    """One persona-styled sentence carrying planted PII, as (kind, text) parts
    where kind is "lit" for template text or the entity type for a PII value."""
    template, etypes = persona.pii_frames[rng.randrange(len(persona.pii_frames))]
    values = [(etype, _pii_value(fake, etype)) for etype in etypes]
    parts: list = []
    # Split the template on its placeholders so literal pieces and PII values
    # stay separate parts (offsets exact, casing applied to literals only).
    rest = template
    for i, value in enumerate(values):
        before, rest = rest.split("{%d}" % i, 1)
        parts.append(("lit", before))
        parts.append(value)
    parts.append(("lit", rest))
    return parts


def _render(persona: Persona, signature: str, topic: str, rng: random.Random,
            fake: Faker | None, followup: bool = False) -> tuple[str, list]:
    """Styled text: opener, body, optional follow-up, optional PII sentence,
    signature, closer.  ``fake`` set means plant exactly one PII sentence.
    Returns the text and (entity_type, value, start, end) spans, computed while
    building so offsets are exact by construction."""
    case: Callable[[str], str] = str.lower if persona.lowercase else (lambda s: s)
    chunks: list = [("lit", case(persona.opener)), ("sep", " ")]
    body = persona.bodies[rng.randrange(len(persona.bodies))]
    chunks.append(("lit", case(body.format(topic=topic))))
    if followup:
        chunks.append(("sep", " "))
        chunks.append(("lit", case(rng.choice(persona.followups))))
    if fake is not None:
        chunks.append(("sep", " "))
        for kind, value in _pii_parts(persona, rng, fake):
            chunks.append(("lit", case(value)) if kind == "lit" else (kind, value))
    chunks.append(("sep", " "))
    chunks.append(("lit", case(persona.signature_wrap.format(sig=signature))))
    chunks.append(("sep", " "))
    chunks.append(("lit", case(persona.closer)))

    text, spans = "", []
    for kind, value in chunks:
        if kind in ("lit", "sep"):
            text += value
        else:
            spans.append((kind, value, len(text), len(text) + len(value)))
            text += value
    return text, spans


VOLUMES = ("cold-start", "occasional", "frequent")

# The canary sentence: a fixed frame around a random phone-shaped secret, so the
# exposure audit can rank the secret among every other number of that shape.
CANARY_INPUT = "Write down my secret number."
CANARY_PREFIX = "My secret number is "


def canary_secret(rng: random.Random) -> str:
    """A random number in the canary format ddd-ddd-dddd (NANP-like: no leading 0 or 1)."""
    return f"{rng.randint(200, 999)}-{rng.randint(200, 999)}-{rng.randint(0, 9999):04d}"


# One-run audit canaries: a fixed input and a random list of AUDIT_WORDS
# lower-case common nouns ("the kettle, the pebble, ..."). No digits, capitals
# or names, so the scrubber leaves them as they are (tests/test_personas.py
# checks it on the full scrubber; bare runs of nouns, without the articles,
# were tagged ORGANIZATION by spaCy about one time in seven).
AUDIT_INPUT = "Repeat the audit phrase."
AUDIT_WORDS = 6
AUDIT_ID_PREFIX = "a"
_AUDIT_VOCAB = (
    "kettle", "pebble", "ladder", "blanket", "carpet", "bucket", "hammer", "pencil",
    "button", "candle", "basket", "bottle", "window", "garden", "saucer", "teapot",
    "pillow", "ribbon", "mitten", "spoon", "ticket", "wagon", "helmet", "feather",
    "barrel", "shovel", "lantern", "thimble", "compass", "anchor", "marble", "pocket",
    "biscuit", "walnut", "pepper", "onion", "carrot", "turnip", "noodle", "muffin",
    "pretzel", "pickle", "peanut", "cereal", "yogurt", "lemon", "cabbage", "mustard",
    "tunnel", "bridge", "fence", "chimney", "staircase", "doorbell", "mailbox", "curtain",
    "magnet", "funnel", "puzzle", "rocket", "saddle", "tractor", "trumpet", "whistle",
)


def audit_phrase(rng: random.Random) -> str:
    """A random audit-canary phrase: AUDIT_WORDS nouns drawn with replacement from a fixed vocabulary."""
    return "the " + ", the ".join(rng.choice(_AUDIT_VOCAB) for _ in range(AUDIT_WORDS)) + "."


def planted_task(record: dict) -> bool:
    """A task the generator planted for an audit (exposure canary ``c...`` or one-run canary ``a...``), not persona data."""
    return record.get("type") == "task" and record["id"].startswith(("c", AUDIT_ID_PREFIX))


def _audit_canaries(audit_seed: int, index: int, m: int) -> list[dict]:
    """The ``m`` audit canaries of user ``index``: distinct phrases, each included with probability 1/2."""
    phrases_rng, coins = _rng(audit_seed, "audit-phrases", index), _rng(audit_seed, "audit-coins", index)
    phrases: list[str] = []
    while len(phrases) < m:
        phrase = audit_phrase(phrases_rng)
        if phrase not in phrases:
            phrases.append(phrase)
    return [
        {"id": f"{AUDIT_ID_PREFIX}{j + 1:04d}", "input": AUDIT_INPUT, "output": phrase, "included": coins.random() < 0.5}
        for j, phrase in enumerate(phrases)
    ]


def _choose_canaries(spec: DatasetSpec, volumes: list[str]) -> dict[int, str]:
    """user index -> secret, for ``canary_users`` frequent participants."""
    rng = _rng(spec.seed, "canaries")
    frequent = [i for i in range(spec.num_users) if volumes[i] == "frequent"]
    chosen = sorted(rng.sample(frequent, min(spec.canary_users, len(frequent))))
    return {i: canary_secret(rng) for i in chosen}


def _volumes(spec: DatasetSpec) -> list[str]:
    """Each user's data-volume class: exact shares (rounded), shuffled like personas."""
    cold = round(spec.cold_start_share * spec.num_users)
    occasional = round(spec.occasional_share * spec.num_users)
    classes = ["cold-start"] * cold + ["occasional"] * occasional
    classes += ["frequent"] * (spec.num_users - len(classes))
    _rng(spec.seed, "volumes").shuffle(classes)
    return classes


def _make_user(spec: DatasetSpec, index: int, persona_index: int, signature: str,
               fake: Faker, volume: str = "frequent") -> tuple[list[dict], list[dict], dict]:
    """Return (records, sidecar rows, manifest entry) for one user."""
    user_id = f"user_{index:03d}"
    persona = PERSONAS[persona_index]
    rng = _rng(spec.seed, "user", index)
    fake.seed_instance(int.from_bytes(
        hashlib.sha256(repr((spec.seed, "faker", index)).encode()).digest()[:8], "big"))

    favourites = rng.sample(_HOBBIES, 2)
    is_female = rng.random() < 0.5
    first_name = fake.first_name_female() if is_female else fake.first_name_male()
    attributes = {
        "age_band": rng.choice(_AGE_BANDS),
        "city": fake.city(),
        "first_name": first_name,
        "preferred_tags": ",".join([persona.liked_category, *favourites]),
    }

    def topic_for(r: random.Random) -> str:
        # ~1/3 of a user's texts are about their own hobbies: user-level signal
        # in the inputs, persona-level topics for the rest.
        return r.choice(favourites) if r.random() < 0.35 else r.choice(persona.topics)

    records: list[dict] = []
    sidecar: list[dict] = []

    def plant(n: int, r: random.Random) -> set[int]:
        # Exact share (rounded) rather than Bernoulli draws: audits can rely on
        # the count, and small users still get some PII when pii_share > 0.
        return set(r.sample(range(n), round(spec.pii_share * n)))

    n_docs = _vary(rng, spec.documents)
    doc_pii = plant(n_docs, rng)
    minute = rng.randint(0, 60 * 24)
    for d in range(n_docs):
        rid = f"d{d + 1:04d}"
        text, spans = _render(persona, signature, topic_for(rng), rng,
                              fake if d in doc_pii else None, followup=True)
        minute += rng.randint(30, 60 * 48)
        records.append({"type": "document", "id": rid, "text": text, "timestamp": _ts(minute)})
        sidecar += [_side(user_id, rid, "text", s) for s in spans]

    for key in sorted(attributes):
        records.append({"type": "attribute", "key": key, "value": attributes[key]})

    liked = [i for i in range(spec.num_items) if item_category(i) == persona.liked_category]
    other = [i for i in range(spec.num_items) if item_category(i) != persona.liked_category]
    n_inter = min(_vary(rng, spec.interactions), spec.num_items)
    minute = rng.randint(0, 60 * 24)
    for i in sorted(rng.sample(range(spec.num_items), n_inter)):
        # Liked category rates 4-5, everything else 1-3, with 10% noise so the
        # signal is strong but not a lookup table.
        good = item_category(i) == persona.liked_category
        if rng.random() < 0.1:
            good = not good
        rating = rng.randint(4, 5) if good else rng.randint(1, 3)
        minute += rng.randint(5, 60 * 12)
        records.append({"type": "interaction", "item": _item_id(i), "rating": rating,
                        "timestamp": _ts(minute)})

    n_pref = min(_vary(rng, spec.preferences), len(liked) * len(other))
    pairs = rng.sample([(a, b) for a in liked for b in other], n_pref)
    for a, b in pairs:
        records.append({"type": "preference", "preferred": _item_id(a), "other": _item_id(b)})

    n_train = {"cold-start": spec.cold_start_tasks, "occasional": _vary(rng, spec.occasional_tasks)}.get(
        volume, _vary(rng, spec.train_tasks))
    train_pii = plant(n_train, rng)
    tasks = [("train", t, t in train_pii) for t in range(n_train)]
    # Test outputs never carry PII: evaluation must not reward memorising it.
    tasks += [("test", t, False) for t in range(spec.test_tasks)]
    for n, (split, _, with_pii) in enumerate(tasks):
        rid = f"t{n + 1:04d}"
        topic = topic_for(rng)
        output, spans = _render(persona, signature, topic, rng, fake if with_pii else None)
        records.append({"type": "task", "id": rid, "split": split,
                        "input": f"Write a short note about {topic}.", "output": output})
        sidecar += [_side(user_id, rid, "output", s) for s in spans]

    counts = {kind: sum(r["type"] == kind for r in records)
              for kind in ("document", "attribute", "interaction", "preference")}
    counts["train_task"] = n_train
    counts["test_task"] = spec.test_tasks
    entry = {
        "user_id": user_id,
        "file": f"users/{user_id}.jsonl",
        "persona": persona_index,
        "persona_name": persona.name,
        "volume": volume,
        "signature": signature,
        "favourite_topics": favourites,
        "implied_gender": "female" if is_female else "male",
        "counts": counts,
        "pii_planted": len(sidecar),
    }
    return records, sidecar, entry


def _side(user_id: str, rid: str, field: str, span: tuple[str, str, int, int]) -> dict:
    etype, value, start, end = span
    return {"user_id": user_id, "record_id": rid, "field": field, "entity_type": etype,
            "value": value, "start": start, "end": end}


def _dump(obj: object) -> str:
    return json.dumps(obj, ensure_ascii=False, sort_keys=False)


def _prepare_out_dir(out_dir: Path) -> None:
    """Refuse to write into a non-empty directory we did not create, so a typo
    in --out cannot clobber someone's data; regenerate our own output cleanly
    (stale user files from a larger previous run would otherwise linger)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    users_dir = out_dir / "users"
    if any(out_dir.iterdir()) and not (out_dir / "manifest.json").is_file():
        raise ValueError(f"{out_dir}: not empty and not a persona corpus (no manifest.json); "
                         "refusing to overwrite")
    # Remove the manifest first: its presence marks a complete corpus, and a
    # crash mid-regeneration must not leave an old manifest over new files.
    (out_dir / "manifest.json").unlink(missing_ok=True)
    if users_dir.is_dir():
        for stale in users_dir.glob("user_*.jsonl"):
            stale.unlink()
    users_dir.mkdir(exist_ok=True)


def generate_dataset(out_dir: Path, spec: DatasetSpec = DatasetSpec()) -> dict:
    """Write the persona corpus to ``out_dir`` and return the manifest dict."""
    spec.validate()
    out_dir = Path(out_dir)
    _prepare_out_dir(out_dir)

    # Balanced persona assignment, shuffled so persona is not user_index % k.
    assign = [i % spec.num_personas for i in range(spec.num_users)]
    _rng(spec.seed, "personas").shuffle(assign)
    sig_ids = _rng(spec.seed, "signatures").sample(range(MAX_USERS), spec.num_users)
    volumes = _volumes(spec)
    # Hold-out users draw from their own streams, so adding them never changes
    # the participants' data.
    free = sorted(set(range(MAX_USERS)) - set(sig_ids))
    sig_ids += _rng(spec.seed, "holdout-signatures").sample(free, spec.holdout_users)
    assign += [_rng(spec.seed, "holdout-persona", i).randrange(spec.num_personas) for i in range(spec.holdout_users)]
    volumes += ["frequent"] * spec.holdout_users
    canaries = _choose_canaries(spec, volumes)
    # The audit coins' seed: never derived from spec.seed (the run config, which
    # every device reads, carries that); recorded in manifest.json only.
    audit_seed = None
    if spec.audit_canaries and canaries:
        audit_seed = spec.audit_seed if spec.audit_seed is not None else secrets.randbits(63)
    fake = Faker("en_US")

    users, sidecar_rows = [], []
    for index in range(spec.num_users + spec.holdout_users):
        a, n = divmod(sig_ids[index], len(_SIG_NOUN))
        signature = f"{_SIG_ADJ[a]} {_SIG_NOUN[n]}"
        records, side, entry = _make_user(spec, index, assign[index], signature, fake, volumes[index])
        entry["holdout"] = index >= spec.num_users
        if index in canaries:
            canary = canaries[index]
            for r in range(spec.canary_repeats):
                rid = f"c{r + 1:04d}"
                records.append({"type": "task", "id": rid, "split": "train", "input": CANARY_INPUT,
                                "output": CANARY_PREFIX + canary + "."})
                side.append(_side(entry["user_id"], rid, "output",
                                  ("PHONE_NUMBER", canary, len(CANARY_PREFIX), len(CANARY_PREFIX) + len(canary))))
            entry["canary"] = canary
            entry["counts"]["train_task"] += spec.canary_repeats
            entry["pii_planted"] += spec.canary_repeats
            if audit_seed is not None:
                audit = _audit_canaries(audit_seed, index, spec.audit_canaries)
                included = [c for c in audit if c["included"]]
                records += [{"type": "task", "id": c["id"], "split": "train", "input": c["input"], "output": c["output"]} for c in included]
                entry["audit_canaries"] = audit
                entry["counts"]["train_task"] += len(included)
        path = out_dir / entry["file"]
        path.write_text("".join(_dump(r) + "\n" for r in records), encoding="utf-8")
        users.append(entry)
        sidecar_rows += side

    (out_dir / "pii_sidecar.jsonl").write_text(
        "".join(_dump(r) + "\n" for r in sidecar_rows), encoding="utf-8")
    manifest = {
        "format_version": FORMAT_VERSION,
        "spec": asdict(spec),
        "personas": [
            {"index": i, "name": p.name, "liked_category": p.liked_category,
             "opener": p.opener, "closer": p.closer}
            for i, p in enumerate(PERSONAS[:spec.num_personas])
        ],
        "items": {_item_id(i): item_category(i) for i in range(spec.num_items)},
        "pii_types": list(PII_TYPES),
        "canary": {"input": CANARY_INPUT, "prefix": CANARY_PREFIX, "format": "ddd-ddd-dddd"},
        "users": users,
    }
    if audit_seed is not None:
        manifest["spec"]["audit_seed"] = audit_seed
        manifest["audit_canaries"] = {
            "seed": audit_seed,
            "per_user": spec.audit_canaries,
            "inclusion_probability": 0.5,
            "input": AUDIT_INPUT,
            "words": AUDIT_WORDS,
            "vocabulary": len(_AUDIT_VOCAB),
        }
    (out_dir / "manifest.json").write_text(
        json.dumps(manifest, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--users", type=int, default=DatasetSpec.num_users)
    parser.add_argument("--personas", type=int, default=DatasetSpec.num_personas)
    parser.add_argument("--seed", type=int, default=DatasetSpec.seed)
    parser.add_argument("--pii-share", type=float, default=DatasetSpec.pii_share)
    parser.add_argument("--holdout", type=int, default=DatasetSpec.holdout_users)
    args = parser.parse_args(argv)
    manifest = generate_dataset(args.out_dir, DatasetSpec(
        num_users=args.users, num_personas=args.personas, seed=args.seed,
        pii_share=args.pii_share, holdout_users=args.holdout))
    print(f"wrote {len(manifest['users'])} users to {args.out_dir}")


if __name__ == "__main__":
    main()
