"""Person names by lexicon: a Presidio recognizer for what spaCy small misses.

spaCy's small English NER finds about two thirds of the person names in the
presidio-research set. Its misses fall into a few categories (measured,
docs/results.md): names from outside the anglophone world labelled ORG or
LOC ("Tomomi Nishiyama", "Elínborg Guðmundsdóttir"), bare first names in
lists or dialogue ("They had 6: Efimiya, Mary, ...") and names written with
a middle initial ("Ravil G Yefimov"). Most of these are recognisable by
knowing which words are given names and family names.

The lexicon is built from Faker's person providers (all of its locales, so
it is international, MIT-licensed and already a pinned dependency) plus any
user-supplied word lists. It is independent of the evaluation data: the
presidio-research names come from FakeNameGenerator, not Faker. Common
English words (spaCy's stop words, Faker's en_US lorem vocabulary, month
and day names) and two-letter entries are removed, because "Will", "May",
"Young" or "Ah" in running text are far more often words than names.

Rules:

1. A run of capitalised words (initials and name particles allowed inside)
   that contains a given name: PERSON over the run, from its first name on.
2. Otherwise, "Given I. Family" (a middle initial): PERSON, no lexicon needed.
3. Otherwise, each family name on its own ("founders: Kónya, Becker and
   Vasquez"): PERSON at a lower score.
4. An ORG/LOC span from the NER model made of names: the same span as
   PERSON with a score above the NER score, so the overlap policy in
   client/pii/scrubber.py keeps the PERSON reading.

Runs that read as organisations, streets or places ("Conway Inc", "East
Lauren", "Thompson Curve") are skipped, and where the NER model labelled a
run, rules 1-3 defer to it. The recognizer works without NER (patterns
mode); rule 4 needs the NER entities.

Names typed in lower case are not handled: a "lucky meadows" rule found 4
names in the presidio set and 56 false ones in our own persona data.
"""

from __future__ import annotations

import functools
import importlib
import re
from pathlib import Path
from typing import Iterable, Sequence

from presidio_analyzer import EntityRecognizer, RecognizerResult
from presidio_analyzer.nlp_engine import NlpArtifacts


# Calendar words double as given names (April, June, August...) and are
# handled by the date recognizers instead.
_CALENDAR = {
    "january", "february", "march", "april", "may", "june", "july", "august",
    "september", "october", "november", "december", "monday", "tuesday",
    "wednesday", "thursday", "friday", "saturday", "sunday",
}
# Lower-case words allowed inside a capitalised name ("Willemine ten Pas").
_PARTICLES = {"van", "von", "der", "den", "de", "del", "della", "di", "da", "dos",
              "du", "la", "le", "ten", "ter", "bin", "ibn", "al", "el", "af", "zu"}
_CONJUNCTIONS = {"and", "or", "und", "et", "y", "e"}
# NER labels (after Presidio's mapping) that rule 4 may relabel.
_RELABEL_FROM = {"ORGANIZATION", "LOCATION"}
# Words that make a capitalised run an organisation, a street or a place, not
# a person ("Conway Inc", "Rua Cyro Schmutzer Franco", "East Lauren",
# "Thompson Curve"); rules 1, 2 and 4 skip such runs. Organisation and unit
# words count anywhere in the run, place prefixes only first, street types
# only last (client code adds Faker's 225 US street types to the latter).
_ORG_WORDS = {
    "inc", "ltd", "llc", "llp", "plc", "corp", "corporation", "company", "co", "group",
    "partners", "holdings", "investments", "technologies", "solutions", "systems",
    "services", "bank", "capital", "associates", "foundation", "institute",
    "university", "college", "school", "hospital", "orchestra", "band", "union",
    "club", "society", "agency", "markets", "labs", "gmbh", "ag", "sa", "srl", "bv",
    "suite", "apt", "apartment", "unit", "floor", "city", "county",
    "royal", "princess", "prince", "king", "queen",
}
_PLACE_PREFIXES = {
    "north", "south", "east", "west", "new", "lake", "port", "fort", "mount", "saint",
    "st", "rua", "rue", "via", "calle", "avenida", "paseo", "piazza", "plaza", "praça",
    "quinta",
}
_STREET_TYPES = {
    "street", "st", "avenue", "ave", "road", "rd", "lane", "ln", "drive", "dr",
    "boulevard", "blvd", "way", "court", "ct", "place", "pl", "square", "loop", "hill",
    "hills", "park", "bridge", "coves", "strasse", "straße",
}

# A word: a letter then letters, apostrophes or hyphens; Unicode-aware.
_WORD = re.compile(r"[^\W\d_][^\W\d_'’-]*(?:['’-][^\W\d_]+)*")
_INITIAL = re.compile(r"[A-Z]\.?$")


def _is_titlecase(word: str) -> bool:
    """"Anna", "O'Neil", "J" - but not "ANNA": all-caps words are headings,
    shouting or address lines far more often than names."""
    return word[0].isupper() and (len(word) == 1 or not word.isupper())


def _initial_shape(run: list[re.Match]) -> re.Match | None:
    """First word of a "Given I. Family" shape in a run, else None.

    A capitalised word, a one-letter initial and another capitalised word
    ("Ravil G Yefimov", "Faina D. Yefremova") is how people's names are
    written, whatever the language, so it needs no lexicon.
    """
    for a, b, c in zip(run, run[1:], run[2:]):
        if (_INITIAL.match(b.group()) and len(a.group()) > 1 and len(c.group()) > 1
                and a.group() not in _PARTICLES and c.group() not in _PARTICLES):
            return a
    return None


def _key(word: str) -> str:
    """Lexicon key: case-folded, possessive removed ("Yefremova's")."""
    key = word.casefold()
    return key[:-2] if key.endswith(("'s", "’s")) else key


_FAKER_NAME_ATTR = re.compile(r"^(first|middle|last)_|_last_names$")


class LexiconError(ValueError):
    """A lexicon file could not be read (the message names the file and line)."""


def _faker_names(locales: Sequence[str] | None) -> tuple[set[str], set[str]]:
    """Given and family names from Faker's person providers."""
    from faker.config import AVAILABLE_LOCALES

    first: set[str] = set()
    last: set[str] = set()
    for loc in locales or AVAILABLE_LOCALES:
        try:
            provider = importlib.import_module(f"faker.providers.person.{loc}").Provider
        except ModuleNotFoundError:
            continue  # locales without a person provider fall back to others
        for attr in dir(provider):
            # Faker's naming varies by locale: first_names_female_rus,
            # first_romanized_names, middle_names, male_last_names,
            # last_name_pairs (tuples of spellings), ...
            if not _FAKER_NAME_ATTR.search(attr):
                continue
            values = getattr(provider, attr, None)
            if not isinstance(values, (tuple, list, dict)):
                continue  # methods and properties
            target = last if "last_" in attr else first
            for v in values:
                target.update(v if isinstance(v, tuple) else (v,))
    return first, last


def _faker_street_types() -> set[str]:
    """The USPS street types Faker's en_US addresses use (Alley ... Wells)."""
    from faker.providers.address.en_US import Provider as UsAddress

    return {w.casefold() for w in UsAddress.street_suffixes}


def _read_word_file(path: Path) -> set[str]:
    words: set[str] = set()
    try:
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                entry = line.split("#", 1)[0].strip()
                if not entry:
                    continue
                if not _WORD.fullmatch(entry):
                    # Do not echo the line: a name list is itself personal data.
                    raise LexiconError(f"{path}:{lineno}: expected one name (letters, "
                                       "apostrophes, hyphens) per line")
                words.add(entry)
    except OSError as exc:
        raise LexiconError(f"cannot read name lexicon {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise LexiconError(f"{path}: not UTF-8 text (byte {exc.start})") from exc
    return words


@functools.lru_cache(maxsize=1)
def _common_words() -> frozenset[str]:
    from faker.providers.lorem.en_US import Provider as EnglishLorem
    from spacy.lang.en.stop_words import STOP_WORDS

    return frozenset({w.casefold() for w in EnglishLorem.word_list} | set(STOP_WORDS) | _CALENDAR)


def _normalise(words: Iterable[str], common: frozenset[str]) -> frozenset[str]:
    out = set()
    for w in words:
        if not isinstance(w, str):
            continue
        key = w.casefold()
        # Two-letter entries ("Ah", "Ho") are interjections and function words
        # in English text far more often than names; NER still sees them.
        if len(key) >= 3 and _WORD.fullmatch(w) and key not in common:
            out.add(key)
    return frozenset(out)


@functools.lru_cache(maxsize=4)
def build_lexicon(
    faker_locales: tuple[str, ...] | None = None,
    first_name_files: tuple[str, ...] = (),
    last_name_files: tuple[str, ...] = (),
    use_faker: bool = True,
) -> tuple[frozenset[str], frozenset[str]]:
    """(given names, family names), case-folded, common English words removed."""
    first: set[str] = set()
    last: set[str] = set()
    if use_faker:
        first, last = _faker_names(faker_locales)
    for f in first_name_files:
        first |= _read_word_file(Path(f))
    for f in last_name_files:
        last |= _read_word_file(Path(f))
    common = _common_words()
    return _normalise(first, common), _normalise(last, common)


class NameLexiconRecognizer(EntityRecognizer):
    """PERSON findings from given/family-name lexicons (see module docstring).

    Constructor arguments are what the YAML entry may set (Presidio passes
    the entry's keys through): ``faker_locales`` (list, default all),
    ``first_name_files`` / ``last_name_files`` (UTF-8, one name per line),
    ``use_faker`` and the three scores. Their YAML schema is
    ``client.pii.recognizers.NameLexiconRecognizerConfig``.
    """

    ENTITY = "PERSON"

    def __init__(
        self,
        supported_language: str = "en",
        name: str | None = None,
        faker_locales: Sequence[str] | None = None,
        first_name_files: Sequence[str] = (),
        last_name_files: Sequence[str] = (),
        use_faker: bool = True,
        given_name_score: float = 0.6,
        family_name_score: float = 0.4,
        relabel_score: float = 0.9,
    ):
        self._lexicon_args = (
            tuple(faker_locales) if faker_locales else None,
            tuple(str(f) for f in first_name_files),
            tuple(str(f) for f in last_name_files),
            bool(use_faker),
        )
        self.given_name_score = float(given_name_score)
        self.family_name_score = float(family_name_score)
        self.relabel_score = float(relabel_score)
        self.first: frozenset[str] = frozenset()
        self.last: frozenset[str] = frozenset()
        self.common: frozenset[str] = frozenset()
        self.street_types: frozenset[str] = frozenset()
        super().__init__(supported_entities=[self.ENTITY], name=name,
                         supported_language=supported_language)

    def load(self) -> None:  # noqa: D102 - called by EntityRecognizer.__init__
        self.first, self.last = build_lexicon(*self._lexicon_args)
        self.common = _common_words()
        # Street types that are not also given names ("Cliff", "Chase" stay names).
        self.street_types = frozenset(_STREET_TYPES | _faker_street_types()) - self.first

    # ---- helpers -------------------------------------------------------

    def _result(self, start: int, end: int, score: float, rule: str) -> RecognizerResult:
        return RecognizerResult(
            self.ENTITY, start, end, score,
            analysis_explanation=None,
            recognition_metadata={
                RecognizerResult.RECOGNIZER_NAME_KEY: self.name,
                RecognizerResult.RECOGNIZER_IDENTIFIER_KEY: self.id,
                "rule": rule,
            },
        )

    def _is_org_or_place(self, words: list[str]) -> bool:
        keys = [_key(w) for w in words]
        return (any(k in _ORG_WORDS for k in keys)
                or (len(keys) > 1 and (keys[0] in _PLACE_PREFIXES
                                       or keys[-1] in self.street_types)))

    def _is_name(self, word: str) -> bool:
        key = _key(word)
        return key in self.first or key in self.last

    def _capitalised_runs(self, text: str) -> list[list[re.Match]]:
        """Runs of capitalised words joined by one space (or ". " after an initial).

        Lower-case particles may sit inside a run ("Willemine ten Pas");
        common words at either edge are dropped ("The Steffen Mauer version"
        -> "Steffen Mauer"); runs with an organisation or street word are
        dropped whole ("Conway Inc", "Maria Street").
        """
        runs: list[list[re.Match]] = []
        current: list[re.Match] = []
        for m in _WORD.finditer(text):
            w = m.group()
            if current:
                prev = current[-1]
                gap = text[prev.end():m.start()]
                joined = gap == " " or (gap == ". " and _INITIAL.match(prev.group() + "."))
            else:
                joined = False
            if _is_titlecase(w) or (joined and w in _PARTICLES):
                if current and not joined:
                    runs.append(current)
                    current = []
                current.append(m)
            elif current:
                runs.append(current)
                current = []
        if current:
            runs.append(current)
        trimmed = []
        for run in runs:
            # Checked before trimming: "Street" is also a common word.
            if self._is_org_or_place([m.group() for m in run]):
                continue
            while run and (run[0].group() in _PARTICLES
                           or run[0].group().casefold() in self.common):
                run = run[1:]
            while run and (run[-1].group() in _PARTICLES
                           or run[-1].group().casefold() in self.common):
                run = run[:-1]
            if run:
                trimmed.append(run)
        return trimmed

    # ---- analysis ------------------------------------------------------

    def analyze(self, text: str, entities: list[str],
                nlp_artifacts: NlpArtifacts | None = None) -> list[RecognizerResult]:
        if entities and self.ENTITY not in entities:
            return []
        ner_spans = self._ner_spans(nlp_artifacts)
        results: list[RecognizerResult] = []
        for run in self._capitalised_runs(text):
            # Where the NER model has labelled any of the run, its reading
            # stands and rule 4 decides whether to relabel it: many names are
            # also places ("Houston"), works ("Metallica") or languages.
            if any(s < run[-1].end() and run[0].start() < e for s, e, _, _ in ner_spans):
                continue
            shaped, run_end = _initial_shape(run), run[-1].end()
            # A run starts at its first lexicon name: "Yesterday Angela
            # Merkel" -> "Angela Merkel".
            while run and not self._is_name(run[0].group()):
                run = run[1:]
            if run and any(_key(m.group()) in self.first
                           for m in run if not _INITIAL.match(m.group())):
                results.append(self._result(run[0].start(), run[-1].end(),
                                            self.given_name_score, "given_name"))
                continue
            if shaped is not None:
                results.append(self._result(shaped.start(), run_end,
                                            self.given_name_score, "initial_shape"))
                continue
            if not run:
                continue
            for m in run:  # no given name: each family name stands alone
                if _key(m.group()) in self.last:
                    results.append(self._result(m.start(), m.end(),
                                                self.family_name_score, "family_name"))
        results += self._relabel_ner(ner_spans)
        return results

    @staticmethod
    def _ner_spans(nlp_artifacts: NlpArtifacts | None) -> list[tuple[int, int, str, str]]:
        """(start, end, Presidio label, text) of every NER entity.

        Read from the spaCy Doc, not ``nlp_artifacts.entities``, because
        Presidio drops the labels it ignores (LANGUAGE, WORK_OF_ART...) and
        those are exactly the readings that should stop a name guess.
        """
        # client/pii/nlp_engine.py's engine keeps the spaCy Doc as `.doc`; Presidio's
        # own engines pass it as `.tokens`.
        if nlp_artifacts is None:
            return []
        doc = (nlp_artifacts.doc if hasattr(nlp_artifacts, "doc")
               else getattr(nlp_artifacts, "tokens", None))
        ents = getattr(doc, "ents", None)
        if not ents:
            return []
        conf = getattr(nlp_artifacts.nlp_engine, "ner_model_configuration", None)
        mapping = (conf.model_to_presidio_entity_mapping if conf else None) or {}
        return [(e.start_char, e.end_char, mapping.get(e.label_, e.label_), e.text)
                for e in ents]

    def _relabel_ner(self, ner_spans: list[tuple[int, int, str, str]]) -> list[RecognizerResult]:
        """Rule 4: NER organisations and places that are really people.

        An ORG span is a person when it has no organisation/street word and
        either holds a given name ("Jouni Hahli") or is made only of names
        ("Usamov and Bowers"). A place needs a given name ("Ariana"), since
        many family names are also towns.
        """
        out = []
        for start, end, label, ent_text in ner_spans:
            if label not in _RELABEL_FROM:
                continue
            matches = list(_WORD.finditer(ent_text))
            words = [m.group() for m in matches]
            names = [w for w in words if not _INITIAL.match(w)
                     and w not in _PARTICLES and w not in _CONJUNCTIONS]
            if (not names or self._is_org_or_place(words)
                    or not all(_is_titlecase(w) for w in names)):
                continue
            has_given = (any(_key(w) in self.first for w in names)
                         or _initial_shape(matches) is not None)
            all_names = all(self._is_name(w) for w in names)
            if has_given or (label == "ORGANIZATION" and all_names):
                out.append(self._result(start, end, self.relabel_score, "ner_relabel"))
        return out
