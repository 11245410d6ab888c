"""Tests for client/pii/name_lexicon.py: person names found by given/family-name lexicons.

The lexicon is Faker's (a pinned dependency, no data from ../shared). The
recognizer is exercised alone (patterns mode, no NER) and inside the full
scrubber, where rule 4 relabels NER organisations that are names.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from client.pii.name_lexicon import (
    LexiconError,
    NameLexiconRecognizer,
    build_lexicon,
)
from client.pii import DEFAULT_CONFIG_PATH, Scrubber, ScrubConfigError


@pytest.fixture(scope="module")
def rec() -> NameLexiconRecognizer:
    return NameLexiconRecognizer()


def _found(rec: NameLexiconRecognizer, text: str) -> list[tuple[str, str]]:
    return [(text[r.start:r.end], r.recognition_metadata["rule"])
            for r in rec.analyze(text, ["PERSON"], None)]


def test_lexicon_is_international_and_has_no_common_words():
    first, last = build_lexicon()
    # Given names from several of Faker's locales, case-folded.
    for name in ("maria", "sigrid", "árpád", "yuki", "chinedu"):
        assert name in first, name
    for name in ("nyström", "schmidt", "kowalski"):
        assert name in last, name
    # Words that are also names but mostly words are removed.
    for word in ("will", "may", "june", "the", "young", "white"):
        assert word not in first and word not in last, word


def test_given_name_run_covers_initials_and_family_name(rec):
    text = "Have you been to a Maria J. Kowalczyk concert before?"
    assert _found(rec, text) == [("Maria J. Kowalczyk", "given_name")]
    # Leading words that are not names are dropped from the run.
    assert _found(rec, "Yesterday Sigrid Nyström called.") == [("Sigrid Nyström", "given_name")]
    # Particles inside a name are kept, not at its edges.
    assert _found(rec, "Anna van der Berg said so.") == [("Anna van der Berg", "given_name")]


def test_given_initial_family_shape_needs_no_lexicon(rec):
    # Neither word is in any lexicon; the middle initial makes it a name.
    assert _found(rec, "Directed by: Zorblax Q. Vintaquor") == [("Zorblax Q. Vintaquor", "initial_shape")]
    assert _found(rec, "Directed by: Zorblax Vintaquor") == []
    # An initial between particles or at the edge is not the shape.
    assert _found(rec, "Plan B Forward") == []


def test_common_words_calendar_and_shouting_are_not_names(rec):
    for text in ("Will you come? May I join? See you in June.",
                 "PLEASE ANSWER THE PHONE", "The meeting is on Monday."):
        assert _found(rec, text) == [], text


def test_organisations_and_streets_are_not_people(rec):
    for text in ("She works at Conway Inc now.", "It is on Maria Street.",
                 "The Anna Freud Institute opened.", "They moved to East Lauren.",
                 "Turn into Thompson Curve.", "Ship to Ryan Track Suite 4."):
        assert _found(rec, text) == [], text


def test_family_names_alone_but_not_lower_case_or_two_letter_words(rec):
    found = _found(rec, "The founders: Becker, Schmidt and Kowalski.")
    assert [w for w, _ in found] == ["Becker", "Schmidt", "Kowalski"]
    assert {r for _, r in found} == {"family_name"}
    # Lower-case pairs are too often ordinary words ("lucky meadows").
    assert _found(rec, "please ask anna schmidt about the lucky meadows") == []
    # "Ah" and "Ho" are names in some locales and interjections in English.
    assert _found(rec, "Ah, I see. Ho ho.") == []


def test_entities_filter(rec):
    assert rec.analyze("Maria Lopez", ["PHONE_NUMBER"], None) == []


def test_full_scrubber_relabels_ner_organisation_that_is_a_name():
    full = Scrubber.from_config(mode="full")
    text = "Follow up with Sigrid Nyström in a couple of months."
    res = full.analyze_batch([text])[0]
    people = [text[r.start:r.end] for r in res if r.entity_type == "PERSON"]
    assert people == ["Sigrid Nyström"]
    # Whatever the NER model called it, no ORGANIZATION reading is left.
    assert not [r for r in res if r.entity_type == "ORGANIZATION"]
    assert "Nyström" not in full([text])[0].text


def _config_with(tmp_path: Path, entry_lines: str) -> Path:
    base = DEFAULT_CONFIG_PATH.read_text(encoding="utf-8")
    marker = "    - name: NameLexiconRecognizer\n      type: predefined\n"
    assert marker in base
    cfg = tmp_path / "lexicon.yaml"
    cfg.write_text(base.replace(marker, marker + entry_lines), encoding="utf-8")
    return cfg


def test_user_name_files_from_yaml(tmp_path: Path):
    names = tmp_path / "first.txt"
    names.write_text("# given names of our users\nZorblax\n\nQuintavia\n", encoding="utf-8")
    cfg = _config_with(tmp_path, f"      use_faker: false\n      first_name_files: [{names}]\n")
    s = Scrubber.from_config(cfg, mode="patterns")
    out = s(["I met Zorblax Quimby and Maria Lopez at noon."])[0].text
    assert out == "I met <PERSON> and Maria Lopez at noon."


def test_yaml_typo_is_an_error_naming_the_key_but_not_its_value(tmp_path: Path):
    cfg = _config_with(tmp_path, "      use_fakr: false\n")
    with pytest.raises(ScrubConfigError, match="use_fakr"):
        Scrubber.from_config(cfg, mode="patterns")
    # A bad value (here a name list given as a string) is named by its key only.
    cfg = _config_with(tmp_path, "      first_name_files: Jane Doe 555-0100\n")
    with pytest.raises(ScrubConfigError, match="first_name_files") as err:
        Scrubber.from_config(cfg, mode="patterns")
    assert "Jane" not in str(err.value) and "555" not in str(err.value)


def test_bad_name_file_names_file_and_line_without_echoing(tmp_path: Path):
    bad = tmp_path / "names.txt"
    bad.write_text("Anna\nJane Doe 555-0100\n", encoding="utf-8")
    with pytest.raises(LexiconError) as err:
        build_lexicon(first_name_files=(str(bad),), use_faker=False)
    assert f"{bad}:2" in str(err.value)
    assert "Jane" not in str(err.value) and "555" not in str(err.value)
    with pytest.raises(LexiconError, match="cannot read"):
        build_lexicon(first_name_files=(str(tmp_path / "missing.txt"),), use_faker=False)
