"""The device's NLP engine: installed spaCy models only, and a fast path to NLP artifacts.

Presidio's recognizers read tokens, lemmas and NER entities from an
``NlpArtifacts`` object that the NLP engine builds per document. Presidio's
own ``SpacyNlpEngine`` downloads a missing model, runs the whole spaCy
pipeline and builds a spaCy ``Token`` per word; on a device the first is
forbidden and the other two are most of the scrubbing time. The engine here
keeps Presidio's interface and changes those three things; it also stops
spaCy's stop-word list from hiding the recognizers' context words.
"""

from __future__ import annotations

from typing import Any, Sequence

import spacy
from presidio_analyzer.input_validation import ConfigurationValidator
from presidio_analyzer.nlp_engine import (
    NerModelConfiguration,
    NlpArtifacts,
    NlpEngine,
    NoOpNlpEngine,
    SpacyNlpEngine,
)
from spacy.attrs import IDX, LOWER, ORTH

from client.pii.config import ScrubConfigError


class LocalSpacyNlpEngine(SpacyNlpEngine):
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
        # Recognizers' context words; set by the analyzer builder
        # (client.pii.scrubber) once the registry exists. See is_stopword.
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
                          and super(LocalSpacyNlpEngine, self).is_stopword(word, language))

    def is_punct(self, word: str, language: str) -> bool:  # noqa: D102 - cached, see is_stopword
        return self._memo("punct", word, language,
                          lambda: super(LocalSpacyNlpEngine, self).is_punct(word, language))

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


def build_nlp_engine(config: dict[str, Any], ext: dict[str, Any], mode: str) -> NlpEngine:
    """The loaded NLP engine for ``mode`` from a validated config (see client.pii.config).

    ``patterns`` mode never loads the NER model: a blank spaCy tokenizer
    keeps context-word enhancement working, or, with ``patterns_nlp: no_op``,
    Presidio's no-op engine gives no tokens at all.
    """
    nlp_conf = config["nlp_configuration"]
    ConfigurationValidator.validate_nlp_configuration(nlp_conf)
    if nlp_conf["nlp_engine_name"] != "spacy":
        raise ScrubConfigError("only nlp_engine_name 'spacy' is supported on device")
    models = nlp_conf["models"]
    if mode == "patterns" and ext["patterns_nlp"] == "no_op":
        engine: NlpEngine = NoOpNlpEngine(models=models)
    else:
        ner_conf = nlp_conf.get("ner_model_configuration")
        engine = LocalSpacyNlpEngine(
            models=models,
            ner_model_configuration=NerModelConfiguration.from_dict(ner_conf) if ner_conf else None,
            exclude=ext["spacy_exclude"],
            blank=(mode == "patterns"),
        )
    engine.load()
    return engine


__all__ = ["LocalSpacyNlpEngine", "build_nlp_engine"]
