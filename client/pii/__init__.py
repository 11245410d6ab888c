"""On-device PII scrubbing with Presidio, one job per module.

* ``recognizers`` - fedpersona's own recognizers and the typed YAML schemas
  registered with Presidio (``name_lexicon`` holds the person-name one).
* ``nlp_engine`` - the offline spaCy engine and its NLP-artifacts fast path.
* ``config`` - reading and validating the Presidio-format YAML.
* ``scrubber`` - building the analyzer and scrubbing documents.

Callers import from the package: ``from client.pii import Scrubber``.
"""

from client.pii.config import DEFAULT_CONFIG_PATH, ScrubConfigError
from client.pii.name_lexicon import NameLexiconRecognizer
from client.pii.scrubber import ScrubError, Scrubber

__all__ = ["DEFAULT_CONFIG_PATH", "NameLexiconRecognizer", "ScrubConfigError", "ScrubError",
           "Scrubber"]
