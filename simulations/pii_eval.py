"""Span-level evaluation of the scrubber on Presidio-evaluator style JSON.

Input: a JSON list of records ``{"full_text": str, "spans": [{"entity_type",
"start_position", "end_position", ["entity_value"]}, ...]}`` (the format of
microsoft/presidio-research's ``synth_dataset_v2.json``).

Matching is by overlap: a predicted span matches a gold span when both have
the same (mapped) entity type and their character ranges intersect. Recall
counts gold spans matched by at least one prediction; precision counts
predictions that match at least one gold span. F2 weighs recall four times
as much as precision, because for a privacy filter a missed entity leaks
while an over-scrubbed word only costs a little utility.

Dataset entity names are mapped onto the scrubber's (Presidio) names with
``DEFAULT_ENTITY_MAPPING``. Gold types with no equivalent (mapped to None)
are reported as "unmapped" with their counts and excluded from the overall
scores; predictions of types that no mapped gold type produces are likewise
excluded from precision (the dataset cannot tell whether they are right).

This is a developer tool, not device code: it reads labelled (synthetic)
evaluation data and never runs on a device, so it lives in simulations/ and
takes the scrubber as a ``predict`` function rather than importing client.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

# Dataset (presidio-research synth_dataset_v2) name -> Presidio/scrubber name.
DEFAULT_ENTITY_MAPPING: dict[str, str | None] = {
    "PERSON": "PERSON",
    "GPE": "LOCATION",
    "LOCATION": "LOCATION",
    "NRP": "NRP",
    "ORGANIZATION": "ORGANIZATION",
    "ORG": "ORGANIZATION",
    "DATE_TIME": "DATE_TIME",
    "PHONE_NUMBER": "PHONE_NUMBER",
    "EMAIL_ADDRESS": "EMAIL_ADDRESS",
    "CREDIT_CARD": "CREDIT_CARD",
    "US_SSN": "US_SSN",
    "IBAN_CODE": "IBAN_CODE",
    "IP_ADDRESS": "IP_ADDRESS",
    "US_DRIVER_LICENSE": "US_DRIVER_LICENSE",
    # Presidio has no street-address entity; client/pii/scrub_default.yaml adds a
    # STREET_ADDRESS recognizer, which also covers postal codes.
    "STREET_ADDRESS": "STREET_ADDRESS",
    "ZIP_CODE": "STREET_ADDRESS",
    # The dataset's DOMAIN_NAME values are full URLs ("http://x.be/").
    "DOMAIN_NAME": "URL",
    "URL": "URL",
    # No Presidio equivalent: honorifics/job titles and ages.
    "TITLE": None,
    "AGE": None,
}


class EvalDataError(ValueError):
    """Malformed evaluation file; the message names file and record index only."""


@dataclass(frozen=True)
class Span:
    entity_type: str
    start: int
    end: int


@dataclass
class Record:
    text: str
    spans: list[Span]


def load_spans_file(path: Path | str) -> list[Record]:
    """Load and validate a span file. Errors never quote record text."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except OSError as exc:
        raise EvalDataError(f"{path}: cannot read file ({exc.strerror})") from None
    except json.JSONDecodeError as exc:
        raise EvalDataError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}") from None
    if not isinstance(data, list):
        raise EvalDataError(f"{path}: top level must be a JSON list of records")
    records = []
    for i, rec in enumerate(data):
        where = f"{path}: record {i}"
        if not isinstance(rec, dict):
            raise EvalDataError(f"{where}: not an object")
        text = rec.get("full_text")
        if not isinstance(text, str):
            raise EvalDataError(f"{where}: missing or non-string 'full_text'")
        spans_raw = rec.get("spans")
        if not isinstance(spans_raw, list):
            raise EvalDataError(f"{where}: missing or non-list 'spans'")
        spans = []
        for j, sp in enumerate(spans_raw):
            if not isinstance(sp, dict):
                raise EvalDataError(f"{where}, span {j}: not an object")
            et, s, e = sp.get("entity_type"), sp.get("start_position"), sp.get("end_position")
            if not isinstance(et, str) or not et:
                raise EvalDataError(f"{where}, span {j}: missing 'entity_type'")
            if (not isinstance(s, int) or not isinstance(e, int) or isinstance(s, bool)
                    or isinstance(e, bool) or not 0 <= s < e <= len(text)):
                raise EvalDataError(f"{where}, span {j}: invalid start/end positions")
            if "entity_value" in sp and sp["entity_value"] != text[s:e]:
                raise EvalDataError(f"{where}, span {j}: entity_value does not match offsets")
            spans.append(Span(et, s, e))
        records.append(Record(text, spans))
    return records


def _overlaps(a: Span, b: Span) -> bool:
    return a.start < b.end and b.start < a.end


def _prf(tp_gold: int, n_gold: int, tp_pred: int, n_pred: int) -> dict[str, float | int | None]:
    recall = tp_gold / n_gold if n_gold else None
    precision = tp_pred / n_pred if n_pred else None
    if recall is None or precision is None or (precision == 0 and recall == 0):
        f2 = 0.0 if recall is not None and precision is not None else None
    else:
        f2 = 5 * precision * recall / (4 * precision + recall)
    return {"precision": precision, "recall": recall, "f2": f2,
            "gold": n_gold, "pred": n_pred, "tp_gold": tp_gold, "tp_pred": tp_pred}


def evaluate(
    records: Sequence[Record],
    predictions: Sequence[Sequence[Span]],
    mapping: Mapping[str, str | None] = DEFAULT_ENTITY_MAPPING,
) -> dict[str, Any]:
    """Score predictions (already in scrubber entity names) against gold.

    Returns ``{"per_entity": {type: {precision, recall, f2, gold, pred, ...}},
    "overall": {...}, "unmapped": {dataset_type: count}, "any_type_recall":
    float, "mapping": {...}, "n_records": int}``. ``any_type_recall`` is the
    share of mapped gold spans overlapped by a prediction of *any* type,
    i.e. how much was scrubbed at all, whatever the label.
    """
    if len(records) != len(predictions):
        raise ValueError("records and predictions must have the same length")
    unmapped: dict[str, int] = defaultdict(int)
    gold_n: dict[str, int] = defaultdict(int)
    gold_tp: dict[str, int] = defaultdict(int)
    pred_n: dict[str, int] = defaultdict(int)
    pred_tp: dict[str, int] = defaultdict(int)
    any_hit = any_n = 0
    mapped_types = {v for v in mapping.values() if v}
    for rec, preds in zip(records, predictions):
        gold = []
        for g in rec.spans:
            m = mapping.get(g.entity_type)
            if m is None:
                unmapped[g.entity_type] += 1
                continue
            gold.append(Span(m, g.start, g.end))
        for g in gold:
            gold_n[g.entity_type] += 1
            if any(p.entity_type == g.entity_type and _overlaps(p, g) for p in preds):
                gold_tp[g.entity_type] += 1
            any_n += 1
            any_hit += any(_overlaps(p, g) for p in preds)
        for p in preds:
            if p.entity_type not in mapped_types:
                continue
            pred_n[p.entity_type] += 1
            if any(g.entity_type == p.entity_type and _overlaps(p, g) for g in gold):
                pred_tp[p.entity_type] += 1
    types = sorted(set(gold_n) | set(pred_n))
    per_entity = {t: _prf(gold_tp[t], gold_n[t], pred_tp[t], pred_n[t]) for t in types}
    overall = _prf(sum(gold_tp.values()), sum(gold_n.values()),
                   sum(pred_tp.values()), sum(pred_n.values()))
    return {
        "n_records": len(records),
        "per_entity": per_entity,
        "overall": overall,
        "unmapped": dict(sorted(unmapped.items())),
        "any_type_recall": any_hit / any_n if any_n else None,
        "mapping": dict(mapping),
    }


def evaluate_file(
    path: Path | str,
    predict: Callable[[list[str]], list[list[Span]]],
    mapping: Mapping[str, str | None] = DEFAULT_ENTITY_MAPPING,
    limit: int | None = None,
) -> dict[str, Any]:
    """Load ``path``, run ``predict`` on the texts and score the result."""
    records = load_spans_file(path)
    if limit is not None:
        records = records[:limit]
    preds = predict([r.text for r in records])
    result = evaluate(records, preds, mapping)
    result["file"] = str(path)
    return result


def scrubber_predictor(scrubber: Any) -> Callable[[list[str]], list[list[Span]]]:
    """Adapter: a client.pii.Scrubber as a ``predict`` function."""

    def predict(texts: list[str]) -> list[list[Span]]:
        return [[Span(r.entity_type, r.start, r.end) for r in res]
                for res in scrubber.analyze_batch(texts)]

    return predict


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def render_markdown(result: Mapping[str, Any]) -> str:
    """Render an ``evaluate`` result as a markdown table plus notes."""
    lines = ["| entity | gold | pred | precision | recall | F2 |",
             "|---|---:|---:|---:|---:|---:|"]
    for t, m in result["per_entity"].items():
        lines.append(f"| {t} | {m['gold']} | {m['pred']} | {_fmt(m['precision'])} | "
                     f"{_fmt(m['recall'])} | {_fmt(m['f2'])} |")
    o = result["overall"]
    lines.append(f"| **overall** | {o['gold']} | {o['pred']} | {_fmt(o['precision'])} | "
                 f"{_fmt(o['recall'])} | {_fmt(o['f2'])} |")
    lines.append("")
    lines.append(f"Records: {result['n_records']}. Matching: same mapped type, any overlap.")
    lines.append(f"Any-type recall (gold span overlapped by any prediction): "
                 f"{_fmt(result.get('any_type_recall'))}.")
    if result["unmapped"]:
        um = ", ".join(f"{k} ({v})" for k, v in result["unmapped"].items())
        lines.append(f"Unmapped gold types (no Presidio equivalent; excluded from overall): {um}.")
    renamed = ", ".join(f"{k}->{v}" for k, v in result["mapping"].items() if v and v != k)
    if renamed:
        lines.append(f"Name mapping: {renamed}.")
    return "\n".join(lines)
