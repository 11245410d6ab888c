"""On-device PII scrubbing: Presidio analysis, overlap policy and anonymizer operators.

This module runs on the device: raw text enters here and only scrubbed text
leaves. Two invariants follow from that:

* Nothing here may reach the network. The spaCy model is a locally installed
  package (never auto-downloaded, client.pii.nlp_engine) and the e-mail and
  URL recognizers check domains against tldextract's bundled public-suffix
  snapshot instead of fetching the list (client.pii.recognizers).
* No error path may carry raw text. Failures are reported as short reason
  codes (``"too_long"``, ``"analyzer_error"``, ...) and the text is dropped
  (``ScrubOutcome.text is None``), never passed through unscrubbed.

The analyzer is built from the YAML that client.pii.config reads and
validates.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

from presidio_analyzer import AnalyzerEngine, RecognizerResult
from presidio_analyzer.context_aware_enhancers import LemmaContextAwareEnhancer
from presidio_analyzer.input_validation import ConfigurationValidator
from presidio_analyzer.nlp_engine import NlpArtifacts
from presidio_analyzer.predefined_recognizers import EmailRecognizer
from presidio_analyzer.recognizer_registry import RecognizerRegistryProvider
from presidio_anonymizer import AnonymizerEngine
from presidio_anonymizer.entities import ConflictResolutionStrategy, OperatorConfig

from client.pii.config import DEFAULT_CONFIG_PATH, ScrubConfigError, read_config
from client.pii.nlp_engine import LocalSpacyNlpEngine, build_nlp_engine
from client.pii.recognizers import OfflineEmailRecognizer, offline_email_validate
# The canonical ScrubOutcome lives with the store, which must not import Presidio.
from client.store import ScrubOutcome

logger = logging.getLogger(__name__)

# Presidio's DEBUG records quote the text being analysed ("Context list is:
# ..."), and its INFO records repeat per engine ("Fetching all recognizers"):
# keep its loggers at WARNING or above, whatever level the process logs at.
for _name in ("presidio-analyzer", "presidio-anonymizer"):
    if logging.getLogger(_name).level < logging.WARNING:  # NOTSET (0) would follow the root logger down to DEBUG
        logging.getLogger(_name).setLevel(logging.WARNING)

MODES = ("full", "patterns")
OPERATORS = ("tag", "pseudonym", "mask")

# Reason codes; the only thing an error may say about a document.
ERR_TOO_LONG = "too_long"
ERR_ANALYZER = "analyzer_error"
ERR_ANONYMIZER = "anonymizer_error"
ERR_NOT_TEXT = "not_text"


class ScrubError(RuntimeError):
    """A document could not be analysed; carries a reason code and index only."""

    def __init__(self, code: str, index: int):
        super().__init__(f"document {index}: {code}")
        self.code = code
        self.index = index


# --------------------------------------------------------------------------
# Analyzer assembly
# --------------------------------------------------------------------------


def _build_analyzer(config: dict[str, Any], ext: dict[str, Any], mode: str) -> AnalyzerEngine:
    """Assemble Presidio's AnalyzerEngine from a validated config.

    Done here rather than by Presidio's AnalyzerEngineProvider, which falls
    back to its defaults on a bad file (see client.pii.config).
    """
    nlp_engine = build_nlp_engine(config, ext, mode)
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
    if isinstance(nlp_engine, LocalSpacyNlpEngine):
        nlp_engine.context_words = frozenset(
            w.lower() for rec in registry.recognizers for w in (rec.context or []))
    for rec in registry.recognizers:
        if isinstance(rec, EmailRecognizer) and not isinstance(rec, OfflineEmailRecognizer):
            # A config that names Presidio's stock EmailRecognizer must not
            # make the device go online either.
            rec.validate_result = offline_email_validate  # type: ignore[method-assign]
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
    config, ext = read_config(Path(config_path))
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


__all__ = ["MODES", "OPERATORS", "ScrubError", "Scrubber", "get_scrubber", "resolve_overlaps"]
