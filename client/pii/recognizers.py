"""fedpersona's own Presidio recognizers and the YAML schemas Presidio checks them with.

Everything fedpersona adds to Presidio's recognizer catalogue is registered
here, because Presidio finds additions in two global places and both are
filled as a side effect of importing a module:

* ``type: predefined`` YAML entries are resolved by class name among all
  loaded ``EntityRecognizer`` subclasses, so a recognizer class must have
  been imported before the registry is built (this module imports
  ``NameLexiconRecognizer`` for that reason too).
* Predefined entries are validated by a pydantic model from
  ``yaml_recognizer_models.CONFIG_MODEL_MAP``; a class without one gets a
  model that silently drops keys it does not declare. The schemas below
  declare the keys and forbid others, so a typo is an error; they must be
  registered before ``client.pii.config`` validates a file, which is why
  that module imports this one.

The recognizers themselves exist to keep the device offline (no public
suffix list download) and to cover shapes Presidio's own miss.
"""

from __future__ import annotations

import re

import tldextract
from presidio_analyzer import Pattern, PatternRecognizer
from presidio_analyzer.input_validation import yaml_recognizer_models
from presidio_analyzer.predefined_recognizers import EmailRecognizer
from pydantic import ConfigDict, Field

from client.pii.name_lexicon import NameLexiconRecognizer

# suffix_list_urls=() disables fetching the public suffix list; cache_dir=None
# stops tldextract from touching ~/.cache. fallback_to_snapshot=True makes it
# use the copy of the list bundled with the package.
_OFFLINE_TLD_EXTRACT = tldextract.TLDExtract(
    suffix_list_urls=(), cache_dir=None, fallback_to_snapshot=True
)


def offline_email_validate(pattern_text: str) -> bool:
    """E-mail domain check against the bundled public-suffix list (never online).

    Public so the analyzer builder can also put it on a stock
    ``EmailRecognizer`` that a user's YAML names.
    """
    return _OFFLINE_TLD_EXTRACT(pattern_text).fqdn != ""


class OfflineEmailRecognizer(EmailRecognizer):
    """Presidio's EmailRecognizer with TLD validation that never goes online.

    The upstream recognizer calls ``tldextract.extract``, whose default
    extractor tries to download the public suffix list on first use.
    """

    def validate_result(self, pattern_text: str) -> bool:  # noqa: D102
        return offline_email_validate(pattern_text)


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


# --------------------------------------------------------------------------
# Typed YAML schemas, registered in Presidio's CONFIG_MODEL_MAP (the
# extension point Presidio uses for its own configurable recognizers,
# HuggingFace and GLiNER).
# --------------------------------------------------------------------------


class NameLexiconRecognizerConfig(yaml_recognizer_models.PredefinedRecognizerConfig):
    """YAML schema of the NameLexiconRecognizer entry.

    Without it Presidio would silently drop unknown keys, and a typo in
    ``first_name_files`` would quietly disable the user's list. The keys
    mirror ``NameLexiconRecognizer.__init__``.
    """

    model_config = ConfigDict(extra="forbid")

    faker_locales: list[str] | None = None
    first_name_files: list[str] = Field(default_factory=list)
    last_name_files: list[str] = Field(default_factory=list)
    use_faker: bool = True
    given_name_score: float = Field(default=0.6, ge=0, le=1)
    family_name_score: float = Field(default=0.4, ge=0, le=1)
    relabel_score: float = Field(default=0.9, ge=0, le=1)


class PhoneRecognizerConfig(yaml_recognizer_models.PredefinedRecognizerConfig):
    """YAML schema for Presidio's PhoneRecognizer options.

    Presidio validates predefined entries with a model that silently drops
    keys it does not declare, so ``supported_regions`` in YAML would be
    ignored. Declaring them (and forbidding others) makes them work, and
    makes a typo an error.
    """

    model_config = ConfigDict(extra="forbid")

    supported_regions: list[str] | None = None
    leniency: int | None = Field(default=None, ge=0, le=3)


yaml_recognizer_models.CONFIG_MODEL_MAP.setdefault(
    NameLexiconRecognizer.__name__, NameLexiconRecognizerConfig)
yaml_recognizer_models.CONFIG_MODEL_MAP.setdefault("PhoneRecognizer", PhoneRecognizerConfig)


__all__ = [
    "LuhnCardRecognizer", "NameLexiconRecognizer", "NameLexiconRecognizerConfig",
    "OfflineEmailRecognizer", "OfflineUrlRecognizer", "PhoneRecognizerConfig",
    "offline_email_validate",
]
