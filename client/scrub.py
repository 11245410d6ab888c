"""On-device PII scrubbing (Presidio analyzer + anonymizer, spaCy small NER).

This module runs on the device: raw text enters here and only scrubbed text
leaves. Two invariants follow from that:

* Nothing here may reach the network. The spaCy model is a locally installed
  package (never auto-downloaded) and the e-mail recognizer's public-suffix
  lookup uses tldextract's bundled snapshot instead of fetching the list.
* No error path may carry raw text. Failures are reported as short reason
  codes (``"too_long"``, ``"analyzer_error"``, ...) and the text is dropped
  (``ScrubOutcome.text is None``), never passed through unscrubbed.

Configuration is Presidio's ``AnalyzerEngineProvider`` YAML format (see
``client/scrub_default.yaml``), so recognizers - regex patterns or deny
lists, with context words - can be added without code. We build the engine
from the same sections with Presidio's own validators and providers rather
than calling ``AnalyzerEngineProvider`` itself because the provider silently
falls back to Presidio's *default* configuration when a file is missing or
malformed; for a privacy filter a typo must be an error, not a quiet switch
to a configuration that lacks the user's recognizers (and that would try to
download en_core_web_lg).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import hmac
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import spacy
import tldextract
from spacy.attrs import IDX, LOWER, ORTH
import yaml
from pydantic import ConfigDict, Field, ValidationError
from presidio_analyzer import (
    AnalyzerEngine,
    EntityRecognizer,
    Pattern,
    PatternRecognizer,
    RecognizerResult,
)
from presidio_analyzer.context_aware_enhancers import LemmaContextAwareEnhancer
from presidio_analyzer.input_validation import ConfigurationValidator, yaml_recognizer_models
from presidio_analyzer.nlp_engine import (
    NerModelConfiguration,
    NlpArtifacts,
    NlpEngine,
    NoOpNlpEngine,
    SpacyNlpEngine,
)
from presidio_analyzer.predefined_recognizers import EmailRecognizer
from presidio_analyzer.recognizer_registry import RecognizerRegistryProvider
from presidio_anonymizer import AnonymizerEngine
from presidio_anonymizer.entities import ConflictResolutionStrategy, OperatorConfig

# Imported for its side effect too: Presidio resolves `type: predefined` YAML
# entries among EntityRecognizer subclasses, so the class must be loaded.
from client.name_lexicon import NameLexiconRecognizer  # noqa: F401

logger = logging.getLogger(__name__)

DEFAULT_CONFIG_PATH = Path(__file__).with_name("scrub_default.yaml")
MODES = ("full", "patterns")
OPERATORS = ("tag", "pseudonym", "mask")
# Our own section of the YAML; removed before Presidio validates the rest
# (Presidio rejects unknown top-level keys).
_EXTENSION_KEY = "fedpersona"
_EXTENSION_DEFAULTS: dict[str, Any] = {
    "spacy_exclude": [],
    "batch_size": 32,
    "patterns_nlp": "blank",
}

# Reason codes; the only thing an error may say about a document.
ERR_TOO_LONG = "too_long"
ERR_ANALYZER = "analyzer_error"
ERR_ANONYMIZER = "anonymizer_error"
ERR_NOT_TEXT = "not_text"


# The canonical ScrubOutcome lives with the store, which must not import Presidio.
from client.store import ScrubOutcome  # noqa: E402


class ScrubConfigError(ValueError):
    """The scrubber configuration is invalid (message names the file/key)."""


class ScrubError(RuntimeError):
    """A document could not be analysed; carries a reason code and index only."""

    def __init__(self, code: str, index: int):
        super().__init__(f"document {index}: {code}")
        self.code = code
        self.index = index


# --------------------------------------------------------------------------
# Offline-safe recognizers. They subclass Presidio recognizers, which makes
# them resolvable by class name from YAML (`type: predefined`), because
# Presidio's loader looks names up among all EntityRecognizer subclasses.
# --------------------------------------------------------------------------

# suffix_list_urls=() disables fetching the public suffix list; cache_dir=None
# stops tldextract from touching ~/.cache. fallback_to_snapshot=True makes it
# use the copy of the list bundled with the package.
_OFFLINE_TLD_EXTRACT = tldextract.TLDExtract(
    suffix_list_urls=(), cache_dir=None, fallback_to_snapshot=True
)


def _offline_email_validate(pattern_text: str) -> bool:
    return _OFFLINE_TLD_EXTRACT(pattern_text).fqdn != ""


class OfflineEmailRecognizer(EmailRecognizer):
    """Presidio's EmailRecognizer with TLD validation that never goes online.

    The upstream recognizer calls ``tldextract.extract``, whose default
    extractor tries to download the public suffix list on first use.
    """

    def validate_result(self, pattern_text: str) -> bool:  # noqa: D102
        return _offline_email_validate(pattern_text)


class _ClassDefaultsRecognizer(PatternRecognizer):
    """A PatternRecognizer whose patterns, context and entity default to class attributes.

    Presidio builds recognizers from YAML by calling the constructor with
    optional overrides, so subclasses keep the same keyword signature.
    """

    PATTERNS: list[Pattern] = []
    CONTEXT: list[str] = []
    ENTITY = ""

    def __init__(
        self,
        patterns: list[Pattern] | None = None,
        context: list[str] | None = None,
        supported_language: str = "en",
        supported_entity: str | None = None,
        name: str | None = None,
    ):
        super().__init__(
            supported_entity=supported_entity or self.ENTITY,
            patterns=patterns or self.PATTERNS,
            context=context or self.CONTEXT,
            supported_language=supported_language,
            name=name,
        )


class OfflineUrlRecognizer(_ClassDefaultsRecognizer):
    """URLs and bare domains, validated against the public-suffix list.

    Replaces Presidio's UrlRecognizer for speed: its schemeless pattern
    (``[a-z0-9.\\-]{1,253}[.](?:<~1000 TLDs>)``) is tried at every character
    and took about half of all pattern-matching time on 200-word documents.
    Here the regex is a cheap dotted-label shape and the TLD check is done
    only on candidates, by tldextract's bundled public-suffix snapshot (the
    same offline extractor as the e-mail recognizer).
    """

    PATTERNS = [
        Pattern("url with scheme", r"\bhttps?://[^\s<>\"'()]+", 0.6),
        Pattern("www url", r"\bwww\d{0,3}\.[^\s<>\"'()]+", 0.6),
        Pattern(
            "bare domain",
            r"(?<![@\w.-])(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,24}\b"
            r"(?:/[^\s<>\"'()]*)?",
            0.5,
        ),
    ]
    CONTEXT = ["url", "website", "link", "site", "web", "page", "domain"]

    ENTITY = "URL"

    def validate_result(self, pattern_text: str) -> bool:  # noqa: D102
        # Strip sentence punctuation the greedy path part may have taken.
        ext = _OFFLINE_TLD_EXTRACT(pattern_text.rstrip(".,;:!?"))
        return bool(ext.suffix and ext.domain)


class LuhnCardRecognizer(_ClassDefaultsRecognizer):
    """Card numbers in shapes Presidio's CreditCardRecognizer regex misses.

    Presidio's pattern only accepts numbers starting 4/5[0-5]/6/1/3 in
    4-3/4-3/4-3/5 groups; this adds 2-series Mastercard (2221-2720), Maestro
    (50, 56-58), 4-6-5 grouped Amex and any 12-19 digit run, all gated by
    the Luhn checksum (which is what keeps random digit runs out: ~1 in 10
    passes by chance, so the base score stays moderate).
    """

    PATTERNS = [
        Pattern("card 4-4-4-4(-3) grouped", r"\b\d{4}(?:[ -]\d{4}){2}[ -]\d{4}(?:[ -]?\d{1,3})?\b", 0.4),
        Pattern("card 4-6-5 grouped (amex)", r"\b3[47]\d{2}[ -]\d{6}[ -]\d{5}\b", 0.4),
        Pattern("card 4-6-4 grouped (diners)", r"\b3[068]\d{2}[ -]\d{6}[ -]\d{4}\b", 0.4),
        Pattern("card contiguous 12-19", r"\b\d{12,19}\b", 0.3),
    ]
    CONTEXT = ["credit", "card", "visa", "mastercard", "cc", "amex", "discover",
               "jcb", "diners", "maestro", "debit", "payment", "pay"]

    ENTITY = "CREDIT_CARD"

    def validate_result(self, pattern_text: str) -> bool:  # noqa: D102
        digits = re.sub(r"[ -]", "", pattern_text)
        if not digits.isdigit() or not 12 <= len(digits) <= 19:
            return False
        total = 0
        for i, ch in enumerate(reversed(digits)):
            d = int(ch)
            if i % 2 == 1:
                d = d * 2 - 9 if d > 4 else d * 2
            total += d
        return total % 10 == 0


class PhoneRecognizerConfig(yaml_recognizer_models.PredefinedRecognizerConfig):
    """YAML schema for Presidio's PhoneRecognizer options.

    Presidio validates predefined entries with a model that silently drops
    keys it does not declare, so ``supported_regions`` in YAML would be
    ignored. Declaring them (and forbidding others) through Presidio's
    CONFIG_MODEL_MAP makes them work, and makes a typo an error.
    """

    model_config = ConfigDict(extra="forbid")

    supported_regions: list[str] | None = None
    leniency: int | None = Field(default=None, ge=0, le=3)


yaml_recognizer_models.CONFIG_MODEL_MAP.setdefault("PhoneRecognizer", PhoneRecognizerConfig)


# --------------------------------------------------------------------------
# NLP engines
# --------------------------------------------------------------------------


class _LocalSpacyNlpEngine(SpacyNlpEngine):
    """SpacyNlpEngine that only loads installed models, minus unused components.

    * ``load`` never calls ``spacy.cli.download`` (upstream does when a model
      is missing): a missing model is a configuration error on the device.
    * ``exclude`` drops pipeline components that neither NER nor the context
      enhancer need (see ``spacy_exclude`` in the YAML), which is most of the
      per-document cost of en_core_web_sm.
    * ``blank=True`` builds ``spacy.blank(lang)`` (tokenizer only) for the
      patterns mode: no NER, but tokens for context-word enhancement.
    * Without a lemmatizer spaCy lemmas are empty, which would silently
      disable the context enhancer, so lemmas fall back to the lower-cased
      token text (what the enhancer's substring matching compares anyway).
    """

    def __init__(
        self,
        models: list[dict[str, str]],
        ner_model_configuration: NerModelConfiguration | None = None,
        exclude: Sequence[str] = (),
        blank: bool = False,
    ):
        super().__init__(models=models, ner_model_configuration=ner_model_configuration)
        self._exclude = list(exclude)
        self._blank = blank
        # Recognizers' context words; set by _build_analyzer once the registry
        # exists. See is_stopword.
        self.context_words: frozenset[str] = frozenset()
        self._stop_cache: dict[tuple[str, str, str], bool] = {}

    def is_stopword(self, word: str, language: str) -> bool:
        """spaCy's stop words, except the recognizers' own context words.

        Presidio's context enhancer only looks at non-stop words, and spaCy
        lists cue verbs such as "call" and "give" as stop words, so "call me
        on 9472 7916" would never lift a weak phone pattern. Cached: Presidio
        asks for every token of every document.
        """
        return self._memo("stop", word, language, lambda: word.lower() not in self.context_words
                          and super(_LocalSpacyNlpEngine, self).is_stopword(word, language))

    def is_punct(self, word: str, language: str) -> bool:  # noqa: D102 - cached, see is_stopword
        return self._memo("punct", word, language,
                          lambda: super(_LocalSpacyNlpEngine, self).is_punct(word, language))

    def _memo(self, kind: str, word: str, language: str, compute) -> bool:
        key = (kind, word, language)
        hit = self._stop_cache.get(key)
        if hit is None:
            hit = bool(compute())
            if len(self._stop_cache) < 200_000:  # bounded: vocabularies are open-ended
                self._stop_cache[key] = hit
        return hit

    def load(self) -> None:  # noqa: D102
        self.nlp = {}
        for model in self.models:
            self._validate_model_params(model)
            lang = model["lang_code"]
            if self._blank:
                self.nlp[lang] = spacy.blank(lang)
                continue
            try:
                self.nlp[lang] = spacy.load(model["model_name"], exclude=self._exclude)
            except OSError as exc:
                raise ScrubConfigError(
                    f"spaCy model {model['model_name']!r} is not installed; it must be "
                    "installed as a package (models are never downloaded on device)"
                ) from exc

    def _doc_to_nlp_artifact(self, doc, language: str) -> NlpArtifacts:
        if self._blank:
            entities, scores = [], []
        else:
            entities = self._get_entities(doc)
            scores = self._get_scores_for_entities(doc)
            entities, scores = self._get_updated_entities(entities, scores)
        # Offsets, token texts and lower-cased forms come from one array
        # instead of a spaCy Token object per word (a sixth of patterns-mode
        # time went into building those).
        rows = doc.to_array([IDX, ORTH, LOWER]).tolist() if len(doc) else []
        strings = doc.vocab.strings
        if self._has_lemmas(language):
            lemmas = [t.lemma_ or t.lower_ for t in doc]
        else:
            lemmas = [strings[low] for _, _, low in rows]
        artifacts = NlpArtifacts(
            entities=entities,
            # Presidio's context enhancer walks `tokens` from the start for
            # every finding and only needs each token's length; plain strings
            # make that walk cheap. The Doc stays available as `.doc`.
            # (NlpArtifacts.to_json, used only by Presidio's decision-process
            # log, expects spaCy tokens; that log would record raw text and
            # is never enabled on a device.)
            tokens=[strings[orth] for _, orth, _ in rows],
            tokens_indices=[i for i, _, _ in rows],
            lemmas=lemmas,
            nlp_engine=self,
            language=language,
            scores=scores,
        )
        # Without NER there are no entities to read (and Doc.ents would walk
        # every token to find that out).
        artifacts.doc = None if self._blank else doc
        return artifacts

    def _has_lemmas(self, language: str) -> bool:
        return "lemmatizer" in self.nlp[language].pipe_names


    def get_supported_entities(self) -> list[str]:  # noqa: D102
        return [] if self._blank else super().get_supported_entities()


# --------------------------------------------------------------------------
# Configuration loading
# --------------------------------------------------------------------------


def _read_config(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Return (presidio_config, extension_config); errors name the file."""
    try:
        with open(path, encoding="utf-8") as fh:
            raw = yaml.safe_load(fh)
    except OSError as exc:
        raise ScrubConfigError(f"cannot read scrubber config {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ScrubConfigError(f"scrubber config {path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ScrubConfigError(f"scrubber config {path} must be a YAML mapping")
    raw = copy.deepcopy(raw)
    ext = {**_EXTENSION_DEFAULTS, **(raw.pop(_EXTENSION_KEY, None) or {})}
    unknown = set(ext) - set(_EXTENSION_DEFAULTS)
    if unknown:
        raise ScrubConfigError(f"{path}: unknown {_EXTENSION_KEY} key(s) {sorted(unknown)}")
    for section in ("nlp_configuration", "recognizer_registry"):
        if section not in raw:
            # Presidio would fill in its defaults here (en_core_web_lg, all
            # recognizers); we refuse so the file fully describes the filter.
            raise ScrubConfigError(f"{path}: missing required section {section!r}")
    try:
        ConfigurationValidator.validate_analyzer_configuration(raw)
    except ValueError as exc:
        # Presidio's message is generic; the pydantic cause names the key.
        # Only locations and messages are kept, never the offending values:
        # a deny_list may hold names, and a client's exception can reach the
        # server.
        cause = exc.__cause__
        detail = ""
        if isinstance(cause, ValidationError):
            detail = " (" + "; ".join(
                f"{'.'.join(map(str, e['loc']))}: {e['msg']}"
                for e in cause.errors(include_input=False, include_url=False)) + ")"
        raise ScrubConfigError(f"{path}: {exc}{detail}") from exc
    return raw, ext


def _build_nlp_engine(config: dict[str, Any], ext: dict[str, Any], mode: str) -> NlpEngine:
    nlp_conf = config["nlp_configuration"]
    ConfigurationValidator.validate_nlp_configuration(nlp_conf)
    if nlp_conf["nlp_engine_name"] != "spacy":
        raise ScrubConfigError("only nlp_engine_name 'spacy' is supported on device")
    models = nlp_conf["models"]
    if mode == "patterns" and ext["patterns_nlp"] == "no_op":
        engine: NlpEngine = NoOpNlpEngine(models=models)
    else:
        ner_conf = nlp_conf.get("ner_model_configuration")
        engine = _LocalSpacyNlpEngine(
            models=models,
            ner_model_configuration=NerModelConfiguration.from_dict(ner_conf) if ner_conf else None,
            exclude=ext["spacy_exclude"],
            blank=(mode == "patterns"),
        )
    engine.load()
    return engine


def _build_analyzer(config: dict[str, Any], ext: dict[str, Any], mode: str) -> AnalyzerEngine:
    nlp_engine = _build_nlp_engine(config, ext, mode)
    languages = config.get("supported_languages", ["en"])
    registry = RecognizerRegistryProvider(
        registry_configuration={**config["recognizer_registry"], "supported_languages": languages},
        nlp_engine=nlp_engine,
    ).create_recognizer_registry()
    if mode == "patterns":
        # NER recognizers would find nothing without a model; drop them so
        # the engine does not advertise entities it cannot detect.
        for rec in list(registry.recognizers):
            if rec.name in ("SpacyRecognizer",):
                registry.remove_recognizer(rec.name)
    if isinstance(nlp_engine, _LocalSpacyNlpEngine):
        nlp_engine.context_words = frozenset(
            w.lower() for rec in registry.recognizers for w in (rec.context or []))
    for rec in registry.recognizers:
        if isinstance(rec, EmailRecognizer) and not isinstance(rec, OfflineEmailRecognizer):
            # A config that names Presidio's stock EmailRecognizer must not
            # make the device go online either.
            rec.validate_result = _offline_email_validate  # type: ignore[method-assign]
    enhancer_conf = ConfigurationValidator.validate_context_aware_enhancer_configuration(
        config.get("context_aware_enhancer")
    )
    return AnalyzerEngine(
        nlp_engine=nlp_engine,
        registry=registry,
        supported_languages=languages,
        default_score_threshold=config.get("default_score_threshold", 0),
        context_aware_enhancer=LemmaContextAwareEnhancer(**enhancer_conf),
    )


@functools.lru_cache(maxsize=8)
def _cached_analyzer(config_path: str, mtime_ns: int, mode: str) -> tuple[AnalyzerEngine, int]:
    # mtime is part of the key so an edited YAML is picked up without restart.
    config, ext = _read_config(Path(config_path))
    return _build_analyzer(config, ext, mode), int(ext["batch_size"])


# --------------------------------------------------------------------------
# Overlap policy
# --------------------------------------------------------------------------

# Recognizers whose output is a statistical NER guess rather than a pattern
# (often validated by a checksum). Their spans are the less precise ones.
_NER_RECOGNIZERS = frozenset({"SpacyRecognizer"})


def _is_ner(result: RecognizerResult) -> bool:
    meta = result.recognition_metadata or {}
    return meta.get(RecognizerResult.RECOGNIZER_NAME_KEY) in _NER_RECOGNIZERS


def _trim_outside(text: str, start: int, end: int,
                  blockers: list[tuple[int, int]]) -> tuple[int, int] | None:
    """Longest part of [start, end) outside all blockers, edge-stripped."""
    cuts = sorted((max(s, start), min(e, end)) for s, e in blockers if s < end and e > start)
    pieces, pos = [], start
    for s, e in cuts:
        if s > pos:
            pieces.append((pos, s))
        pos = max(pos, e)
    if pos < end:
        pieces.append((pos, end))
    best = None
    for s, e in pieces:
        while s < e and not text[s].isalnum():
            s += 1
        while e > s and not text[e - 1].isalnum():
            e -= 1
        if e - s >= 2 and (best is None or e - s > best[1] - best[0]):
            best = (s, e)
    return best


def resolve_overlaps(text: str, results: list[RecognizerResult]) -> list[RecognizerResult]:
    """Make pattern findings win over overlapping NER guesses.

    spaCy small often wraps a pattern entity into a wider, wrongly typed
    span ("Email john@x.org" -> PERSON, "IBAN GB73..." -> ORGANIZATION).
    Presidio's anonymizer keeps the *containing* span in that case, which
    mislabels the entity (and loses the e-mail for pseudonymisation). So
    NER spans are trimmed to their part outside pattern spans, and pattern
    spans strictly inside a higher-scored pattern span of another type (a
    URL inside an e-mail) are dropped. Characters stay covered either way.
    """
    patterns = [r for r in results if not _is_ner(r)]
    kept: list[RecognizerResult] = []
    for r in patterns:
        if any(o is not r and o.entity_type != r.entity_type and o.score > r.score
               and o.start <= r.start and r.end <= o.end for o in patterns):
            continue
        kept.append(r)
    blockers = [(r.start, r.end) for r in kept]
    for r in results:
        if not _is_ner(r):
            continue
        span = _trim_outside(text, r.start, r.end, blockers)
        if span is None:
            continue
        if span != (r.start, r.end):
            r = RecognizerResult(r.entity_type, span[0], span[1], r.score,
                                 recognition_metadata=r.recognition_metadata)
        kept.append(r)
    return sorted(kept, key=lambda r: (r.start, r.end))


# --------------------------------------------------------------------------
# Scrubber
# --------------------------------------------------------------------------

# Entity types whose values are compared digits/letters only for pseudonyms,
# so "555-123-4567" and "(555) 123 4567" get the same token.
_ALNUM_NORMALISED = {"PHONE_NUMBER", "CREDIT_CARD", "US_SSN", "IBAN_CODE", "US_ITIN",
                     "US_BANK_NUMBER", "US_PASSPORT", "US_DRIVER_LICENSE"}


class Scrubber:
    """Batch PII scrubber: Presidio analysis + presidio-anonymizer operators."""

    def __init__(
        self,
        analyzer: AnalyzerEngine,
        *,
        mode: str = "full",
        operator: str = "tag",
        device_secret: bytes | None = None,
        max_chars: int = 20000,
        batch_size: int = 32,
        language: str = "en",
    ):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        if operator not in OPERATORS:
            raise ValueError(f"operator must be one of {OPERATORS}")
        if operator == "pseudonym" and not device_secret:
            # A default secret would make pseudonyms linkable across devices.
            raise ValueError("operator 'pseudonym' requires a non-empty device_secret")
        if max_chars <= 0:
            raise ValueError("max_chars must be positive")
        self.analyzer = analyzer
        self.mode = mode
        self.operator = operator
        self.max_chars = max_chars
        self.batch_size = max(1, int(batch_size))
        self.language = language
        self._secret = device_secret
        self._anonymizer = AnonymizerEngine()
        self._operators = self._build_operators()

    @classmethod
    def from_config(
        cls,
        config_path: Path | None = None,
        *,
        mode: str = "full",
        operator: str = "tag",
        device_secret: bytes | None = None,
        max_chars: int = 20000,
    ) -> "Scrubber":
        """Build a scrubber from a Presidio-format YAML (engine load is cached)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        path = Path(config_path) if config_path is not None else DEFAULT_CONFIG_PATH
        try:
            key = (str(path.resolve()), path.stat().st_mtime_ns)
        except OSError as exc:
            raise ScrubConfigError(f"cannot read scrubber config {path}: {exc.strerror}") from exc
        analyzer, batch_size = _cached_analyzer(key[0], key[1], mode)
        return cls(analyzer, mode=mode, operator=operator, device_secret=device_secret,
                   max_chars=max_chars, batch_size=batch_size)

    # ---- operators -----------------------------------------------------

    def pseudonym(self, entity_type: str, value: str) -> str:
        """Per-device stable token for a value: HMAC-SHA256(device_secret)."""
        if entity_type in _ALNUM_NORMALISED:
            norm = re.sub(r"[^0-9a-z]", "", value.casefold())
        else:
            norm = " ".join(value.casefold().split())
        digest = hmac.new(self._secret or b"", f"{entity_type}\x00{norm}".encode(),
                          hashlib.sha256).hexdigest()
        # 32 bits: collisions within one device's vocabulary stay rare while
        # the token remains short enough not to dominate the training text.
        return f"<{entity_type}_{digest[:8]}>"

    def _operator_for(self, entity_type: str) -> OperatorConfig:
        if self.operator == "tag":
            return OperatorConfig("replace", {"new_value": f"<{entity_type}>"})
        if self.operator == "mask":
            # Mask every character (chars_to_mask larger than any value).
            return OperatorConfig("mask", {"masking_char": "*", "chars_to_mask": 10**9,
                                           "from_end": False})
        return OperatorConfig(
            "custom", {"lambda": functools.partial(self.pseudonym, entity_type)}
        )

    def _build_operators(self) -> dict[str, OperatorConfig]:
        ops = {ent: self._operator_for(ent)
               for ent in self.analyzer.get_supported_entities(self.language)}
        ops["DEFAULT"] = self._operator_for("PII")
        return ops

    # ---- analysis ------------------------------------------------------

    def _precheck(self, text: Any) -> str | None:
        if not isinstance(text, str):
            return ERR_NOT_TEXT
        if len(text) > self.max_chars:
            return ERR_TOO_LONG
        return None

    def _analyze_one(self, text: str, artifacts: NlpArtifacts | None) -> list[RecognizerResult]:
        results = self.analyzer.analyze(text=text, language=self.language,
                                        nlp_artifacts=artifacts)
        return resolve_overlaps(text, results)

    def _analyze_safe(self, texts: Sequence[Any]) -> list[list[RecognizerResult] | str]:
        """Analyse a batch; each slot is a result list or a reason code."""
        out: list[list[RecognizerResult] | str] = [""] * len(texts)
        todo: list[int] = []
        for i, t in enumerate(texts):
            code = self._precheck(t)
            if code:
                out[i] = code
            else:
                todo.append(i)
        engine = self.analyzer.nlp_engine
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start:start + self.batch_size]
            try:
                # One nlp.pipe call per chunk: spaCy batches the NER forward
                # pass, the main speed-up over per-document processing.
                arts = [a for _, a in engine.process_batch(
                    [texts[i] for i in chunk], language=self.language,
                    batch_size=self.batch_size)]
            except Exception as exc:  # noqa: BLE001 - isolate the bad document below
                logger.warning("batch NLP failed (%s); retrying per document",
                               type(exc).__name__)
                arts = [None] * len(chunk)
            for i, art in zip(chunk, arts):
                try:
                    out[i] = self._analyze_one(texts[i], art)
                except Exception as exc:  # noqa: BLE001
                    # Exception messages may quote the input; log the type only.
                    logger.warning("analysis failed for document %d (%s)", i,
                                   type(exc).__name__)
                    out[i] = ERR_ANALYZER
        return out

    def analyze_batch(self, texts: list[str]) -> list[list[RecognizerResult]]:
        """Presidio results per document; raises ScrubError (code + index only)."""
        results = self._analyze_safe(texts)
        for i, r in enumerate(results):
            if isinstance(r, str):
                raise ScrubError(r, i)
        return results  # type: ignore[return-value]

    def analyze_unbatched(self, texts: list[str]) -> list[list[RecognizerResult]]:
        """Per-document analysis (no nlp.pipe); for benchmarking the batching."""
        out = []
        for i, t in enumerate(texts):
            code = self._precheck(t)
            if code:
                raise ScrubError(code, i)
            out.append(self._analyze_one(t, None))
        return out

    def anonymize(self, text: str, results: list[RecognizerResult]) -> ScrubOutcome:
        """Apply the configured operator to one analysed document."""
        try:
            res = self._anonymizer.anonymize(
                text=text, analyzer_results=results, operators=self._operators,
                # Trim partially overlapping spans instead of keeping both, so
                # every character covered by any finding is replaced once.
                conflict_resolution=ConflictResolutionStrategy.REMOVE_INTERSECTIONS,
            )
        except Exception as exc:  # noqa: BLE001
            logger.warning("anonymization failed (%s)", type(exc).__name__)
            return ScrubOutcome(text=None, entity_count=0, error=ERR_ANONYMIZER)
        return ScrubOutcome(text=res.text, entity_count=len(res.items), error=None)

    def scrub_batch(self, texts: list[str]) -> list[ScrubOutcome]:
        """Scrub documents; failures are quarantined (text None + reason code)."""
        outcomes = []
        for text, res in zip(texts, self._analyze_safe(texts)):
            if isinstance(res, str):
                outcomes.append(ScrubOutcome(text=None, entity_count=0, error=res))
            else:
                outcomes.append(self.anonymize(text, res))
        return outcomes

    def __call__(self, texts: Iterable[str]) -> list[ScrubOutcome]:
        return self.scrub_batch(list(texts))

    def supported_entities(self) -> list[str]:
        """Entity types this scrubber's configuration can detect."""
        return sorted(self.analyzer.get_supported_entities(self.language))


def get_scrubber(
    config_path: Path | None = None,
    *,
    mode: str = "full",
    operator: str = "tag",
    device_secret: bytes | None = None,
    max_chars: int = 20000,
) -> Scrubber:
    """Module-level factory; the expensive engine load is cached per config/mode."""
    return Scrubber.from_config(config_path, mode=mode, operator=operator,
                                device_secret=device_secret, max_chars=max_chars)


__all__ = [
    "DEFAULT_CONFIG_PATH", "LuhnCardRecognizer", "OfflineEmailRecognizer", "ScrubConfigError",
    "ScrubError", "ScrubOutcome", "Scrubber", "get_scrubber",
]
