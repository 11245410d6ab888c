"""Reading and validating the scrubber's Presidio-format YAML.

The format is Presidio's ``AnalyzerEngineProvider`` analyzer configuration
(see ``client/pii/scrub_default.yaml``), so recognizers - regex patterns or
deny lists, with context words - can be added without code. The file is
checked with Presidio's own validators, but not loaded through
``AnalyzerEngineProvider``: that provider silently falls back to Presidio's
*default* configuration when a file is missing or malformed. For a privacy
filter a typo must be an error, not a quiet switch to a configuration that
lacks the user's recognizers (and that would try to download
en_core_web_lg).

Errors name the file and the offending key but never a value: a deny_list
may hold names, and a client's exception can reach the server.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from presidio_analyzer.input_validation import ConfigurationValidator
from pydantic import ValidationError

# Imported for its side effect: it registers fedpersona's typed recognizer
# schemas in Presidio's CONFIG_MODEL_MAP, which the validation below reads.
# Without them a typo such as `supported_region:` would pass silently.
import client.pii.recognizers  # noqa: F401

DEFAULT_CONFIG_PATH = Path(__file__).with_name("scrub_default.yaml")
# Our own section of the YAML; removed before Presidio validates the rest
# (Presidio rejects unknown top-level keys).
_EXTENSION_KEY = "fedpersona"
_EXTENSION_DEFAULTS: dict[str, Any] = {
    "spacy_exclude": [],
    "batch_size": 32,
    "patterns_nlp": "blank",
}


class ScrubConfigError(ValueError):
    """The scrubber configuration is invalid (message names the file/key)."""


def read_config(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
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
        # Only locations and messages are kept, never the offending values.
        cause = exc.__cause__
        detail = ""
        if isinstance(cause, ValidationError):
            detail = " (" + "; ".join(
                f"{'.'.join(map(str, e['loc']))}: {e['msg']}"
                for e in cause.errors(include_input=False, include_url=False)) + ")"
        raise ScrubConfigError(f"{path}: {exc}{detail}") from exc
    return raw, ext


__all__ = ["DEFAULT_CONFIG_PATH", "ScrubConfigError", "read_config"]
