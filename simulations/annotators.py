"""Per-annotator label data as per-user files: each annotator is a user with their own labels.

Two layouts are read:

* **wide**: one CSV, one row per text, one column per annotator
  (``id,text,label_M_1,...,label_F_20``: the tweeteval disaggregated set). An
  annotator's attributes can sit in the column name; a regular expression with
  named groups pulls them out (``annotator`` names the user, any other group
  becomes an attribute, e.g. ``gender``).
* **long**: a texts CSV (``id,text``) plus a labels CSV (``text id, annotator,
  label``), optionally with an annotators CSV (``annotator`` plus attribute
  columns).

Each annotator becomes one user file in the project's JSONL format: an
``attribute`` record per attribute, and one ``task`` per labelled text whose
input names the label options and whose ``options`` list them, so a model is
scored by the likelihood it gives each option. Every annotator gets a seeded
train/test split of their own labels. ``manifest.json`` records who is who
and their attributes (ground truth for the group audits; devices never read
it). Errors name the file and line, never a cell's content.
"""

from __future__ import annotations

import csv
import json
import random
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

WIDE_PATTERN = r"label_(?P<gender>[MF])_(?P<annotator>\d+)"
INSTRUCTION = "Label the text."


class AnnotatorDataError(ValueError):
    """Malformed annotator data: names the file and line (or column), never a value."""


@dataclass
class AnnotatorData:
    texts: dict[str, str]  # text id -> text
    labels: dict[str, dict[str, str]]  # annotator -> text id -> label
    attributes: dict[str, dict[str, str]] = field(default_factory=dict)  # annotator -> attributes

    @property
    def options(self) -> list[str]:
        return sorted({label for by_text in self.labels.values() for label in by_text.values()})


def _rows(path: Path):
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames:
                raise AnnotatorDataError(f"{path}:1: no header")
            for row in reader:
                yield reader.line_num, reader.fieldnames, row
    except UnicodeDecodeError:
        raise AnnotatorDataError(f"{path}: not UTF-8") from None
    except OSError as err:
        raise AnnotatorDataError(f"{path}: cannot read ({type(err).__name__})") from None


def _need(path: Path, line: int, row: dict, column: str) -> str:
    value = row.get(column)
    if value is None or not value.strip():
        raise AnnotatorDataError(f"{path}:{line}: empty or missing column '{column}'")
    return value.strip()


def read_wide(path: Path, id_column: str = "id", text_column: str = "text", pattern: str = WIDE_PATTERN) -> AnnotatorData:
    path = Path(path)
    regex = re.compile(pattern)
    data = AnnotatorData({}, defaultdict(dict), {})
    for line, header, row in _rows(path):
        if line == 2:  # the first data row: the header is known
            columns = {c: regex.fullmatch(c) for c in header}
            annotators = {c: m for c, m in columns.items() if m}
            if not annotators:
                raise AnnotatorDataError(f"{path}:1: no column matches the annotator pattern")
            for c, m in annotators.items():
                groups = m.groupdict()
                name = groups.pop("annotator", c)
                data.attributes[name] = {k: v for k, v in groups.items() if v is not None}
        tid = _need(path, line, row, id_column)
        if tid in data.texts:
            raise AnnotatorDataError(f"{path}:{line}: duplicate text id")
        data.texts[tid] = _need(path, line, row, text_column)
        for c, m in annotators.items():
            label = (row.get(c) or "").strip()
            if label:  # an annotator may skip a text
                data.labels[m.groupdict().get("annotator", c)][tid] = label
    if not data.texts:
        raise AnnotatorDataError(f"{path}: no rows")
    data.labels = dict(data.labels)
    return data


def read_long(texts_path: Path, labels_path: Path, annotators_path: Path | None = None, *, id_column: str = "id",
              text_column: str = "text", text_id_column: str = "text_id", annotator_column: str = "annotator",
              label_column: str = "label") -> AnnotatorData:
    data = AnnotatorData({}, defaultdict(dict), {})
    for line, _, row in _rows(Path(texts_path)):
        tid = _need(texts_path, line, row, id_column)
        if tid in data.texts:
            raise AnnotatorDataError(f"{texts_path}:{line}: duplicate text id")
        data.texts[tid] = _need(texts_path, line, row, text_column)
    for line, _, row in _rows(Path(labels_path)):
        tid = _need(labels_path, line, row, text_id_column)
        if tid not in data.texts:
            raise AnnotatorDataError(f"{labels_path}:{line}: unknown text id")
        annotator = _need(labels_path, line, row, annotator_column)
        if tid in data.labels[annotator]:
            raise AnnotatorDataError(f"{labels_path}:{line}: a second label by the same annotator for the same text")
        data.labels[annotator][tid] = _need(labels_path, line, row, label_column)
    if annotators_path is not None:
        for line, header, row in _rows(Path(annotators_path)):
            name = _need(annotators_path, line, row, annotator_column)
            data.attributes[name] = {k: v.strip() for k, v in row.items() if k != annotator_column and v and v.strip()}
    data.labels = dict(data.labels)
    return data


def _safe_id(name: str) -> str:
    """A record-id-safe form of an annotator or text id ([A-Za-z0-9_.:-])."""
    return re.sub(r"[^A-Za-z0-9_.:-]", "_", name)[:100] or "_"


def _attribute_key(name: str) -> str:
    key = re.sub(r"[^a-z0-9_]", "_", name.lower()).strip("_") or "attribute"
    return key if key[0].isalpha() else f"a_{key}"


def write_users(data: AnnotatorData, out_dir: Path, *, test_share: float = 0.2, seed: int = 0,
                instruction: str = INSTRUCTION, min_labels: int = 10) -> dict:
    """One JSONL file per annotator under ``out_dir/users``, plus ``manifest.json``; returns the manifest."""
    if not 0 < test_share < 1:
        raise ValueError("test_share must lie in (0, 1)")
    out_dir = Path(out_dir)
    (out_dir / "users").mkdir(parents=True, exist_ok=True)
    options = data.options
    users = []
    for annotator in sorted(data.labels, key=lambda a: (len(a), a)):
        labelled = sorted(data.labels[annotator])
        if len(labelled) < min_labels:
            continue
        random.Random(f"{seed}:{annotator}").shuffle(labelled)
        n_test = max(1, round(test_share * len(labelled)))
        user_id = f"annotator_{_safe_id(annotator)}"
        records = [{"type": "attribute", "key": _attribute_key(k), "value": v} for k, v in sorted(data.attributes.get(annotator, {}).items())]
        for i, tid in enumerate(labelled):
            records.append({
                "type": "task",
                "id": f"t{_safe_id(tid)}",
                "split": "test" if i < n_test else "train",
                "input": f"{instruction} Options: {', '.join(options)}.\nText: {data.texts[tid]}",
                "output": data.labels[annotator][tid],
                "options": options,
            })
        path = out_dir / "users" / f"{user_id}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        label_counts = defaultdict(int)
        for tid in labelled:
            label_counts[data.labels[annotator][tid]] += 1
        users.append({
            "user_id": user_id,
            "file": f"users/{user_id}.jsonl",
            "holdout": False,
            "groups": {_attribute_key(k): v for k, v in data.attributes.get(annotator, {}).items()},
            "labels": len(labelled),
            "test": n_test,
            "majority_share": max(label_counts.values()) / len(labelled),
        })
    manifest = {"source": "annotators", "options": options, "test_share": test_share, "seed": seed, "users": users}
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest
