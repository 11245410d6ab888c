"""Tests for simulations/pii_eval.py: span-overlap P/R/F2 on hand-made data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from simulations.pii_eval import (
    EvalDataError,
    Span,
    evaluate,
    evaluate_file,
    load_spans_file,
    render_markdown,
)

TEXT0 = "Call Ann Lee at 555-0100 in Paris."
TEXT1 = "Mr. Bob lives at 12 Oak Street, age 40."


def _span(text: str, value: str, etype: str) -> dict:
    s = text.index(value)
    return {"entity_type": etype, "entity_value": value,
            "start_position": s, "end_position": s + len(value)}


@pytest.fixture()
def span_file(tmp_path: Path) -> Path:
    data = [
        {"full_text": TEXT0, "spans": [_span(TEXT0, "Ann Lee", "PERSON"),
                                       _span(TEXT0, "555-0100", "PHONE_NUMBER"),
                                       _span(TEXT0, "Paris", "GPE")]},
        {"full_text": TEXT1, "spans": [_span(TEXT1, "Mr.", "TITLE"),
                                       _span(TEXT1, "Bob", "PERSON"),
                                       _span(TEXT1, "12 Oak Street", "STREET_ADDRESS"),
                                       _span(TEXT1, "40", "AGE")]},
    ]
    p = tmp_path / "spans.json"
    p.write_text(json.dumps(data), encoding="utf-8")
    return p


def _at(text: str, value: str, etype: str, trim: int = 0) -> Span:
    s = text.index(value)
    return Span(etype, s + trim, s + len(value))


def test_precision_recall_f2_with_overlap_and_mapping(span_file: Path):
    preds = [
        [
            _at(TEXT0, "Ann Lee", "PERSON", trim=4),      # partial overlap ("Lee") -> TP
            _at(TEXT0, "555-0100", "US_SSN"),             # right span, wrong type -> FP
            _at(TEXT0, "Paris", "LOCATION"),              # GPE maps to LOCATION -> TP
            _at(TEXT0, "Call", "PERSON"),                 # no gold there -> FP
        ],
        [
            _at(TEXT1, "12 Oak", "STREET_ADDRESS"),       # overlap -> TP
            _at(TEXT1, "Mr.", "TITLE"),                   # unmapped type: ignored
        ],
    ]
    result = evaluate_file(span_file, lambda texts: preds)
    pe = result["per_entity"]
    assert pe["PERSON"]["gold"] == 2 and pe["PERSON"]["tp_gold"] == 1
    assert pe["PERSON"]["recall"] == pytest.approx(0.5)
    assert pe["PERSON"]["precision"] == pytest.approx(0.5)
    assert pe["PERSON"]["f2"] == pytest.approx(0.5)
    assert pe["LOCATION"]["recall"] == 1.0 and pe["LOCATION"]["precision"] == 1.0
    assert pe["PHONE_NUMBER"]["recall"] == 0.0 and pe["PHONE_NUMBER"]["precision"] is None
    assert pe["US_SSN"]["precision"] == 0.0
    assert pe["STREET_ADDRESS"]["recall"] == 1.0
    assert "GPE" not in pe and "TITLE" not in pe
    assert result["unmapped"] == {"AGE": 1, "TITLE": 1}

    o = result["overall"]
    # gold (mapped): PERSON 2, PHONE 1, LOCATION 1, STREET 1 = 5; matched 3.
    # preds (mapped types): 5, of which 3 match.
    assert (o["gold"], o["tp_gold"], o["pred"], o["tp_pred"]) == (5, 3, 5, 3)
    p, r = 3 / 5, 3 / 5
    assert o["f2"] == pytest.approx(5 * p * r / (4 * p + r))
    # Any-type recall: the phone span is covered (by US_SSN) -> 4 of 5.
    assert result["any_type_recall"] == pytest.approx(4 / 5)

    md = render_markdown(result)
    assert "| PERSON | 2 | 2 | 0.500 | 0.500 | 0.500 |" in md
    assert "AGE (1)" in md and "TITLE (1)" in md and "GPE->LOCATION" in md


def test_f2_weights_recall():
    rec = load_records_inline()
    # 1 gold, 4 predictions of which 1 matches: P=0.25, R=1 -> F2=5*.25/(1+1)=0.625
    preds = [[Span("PERSON", 0, 3), Span("PERSON", 4, 6), Span("PERSON", 7, 9),
              Span("PERSON", 10, 12)]]
    res = evaluate(rec, preds)
    assert res["overall"]["f2"] == pytest.approx(0.625)


def load_records_inline():
    from simulations.pii_eval import Record

    return [Record("Ann is ok or no", [Span("PERSON", 0, 3)])]


def test_non_overlapping_adjacent_spans_do_not_match():
    rec = load_records_inline()
    res = evaluate(rec, [[Span("PERSON", 3, 6)]])  # touches end=3, no overlap
    assert res["overall"]["recall"] == 0.0 and res["overall"]["precision"] == 0.0
    assert res["overall"]["f2"] == 0.0


@pytest.mark.parametrize("record,fragment", [
    ({"spans": []}, "full_text"),
    ({"full_text": "Secret Name here", "spans": [{"entity_type": "PERSON",
                                                  "start_position": 0, "end_position": 99}]},
     "start/end"),
    ({"full_text": "Secret Name here", "spans": [{"entity_type": "PERSON", "entity_value": "x",
                                                  "start_position": 0, "end_position": 6}]},
     "entity_value"),
    ({"full_text": "Secret Name here", "spans": "nope"}, "spans"),
])
def test_malformed_record_names_file_and_index_not_text(tmp_path: Path, record, fragment):
    good = {"full_text": "fine", "spans": []}
    p = tmp_path / "bad.json"
    p.write_text(json.dumps([good, good, record]), encoding="utf-8")
    with pytest.raises(EvalDataError) as exc:
        load_spans_file(p)
    msg = str(exc.value)
    assert "bad.json" in msg and "record 2" in msg and fragment in msg
    assert "Secret" not in msg


def test_invalid_json_names_file(tmp_path: Path):
    p = tmp_path / "broken.json"
    p.write_text('[{"full_text": "Secret", ', encoding="utf-8")
    with pytest.raises(EvalDataError, match="broken.json") as exc:
        load_spans_file(p)
    assert "Secret" not in str(exc.value)
