"""The per-user JSONL format: reading and validating a user's file, one line at a time.

This module only reads. It never logs or raises with user text: every failure
is a reason code plus a hint built from our own constants. What is done with
the records (scrubbing, storing, quarantining) is ``client.store``'s job.

Per-user JSONL input format
---------------------------
UTF-8 (no byte order mark), one JSON object per line (LF or CRLF line
endings), blank lines allowed.  Every object has a ``"type"`` field; the
allowed fields per type are closed (an unknown or misspelt field is an error,
so typos never silently drop data).

=========== ==================================================================
type        fields (all required unless marked optional)
=========== ==================================================================
document    ``id`` (record id), ``text`` (non-empty string),
            ``timestamp`` (optional, ISO 8601 with timezone)
attribute   ``key`` (lowercase identifier ``[a-z][a-z0-9_]*``), ``value``
            (non-empty string)
interaction ``item`` (item id), ``rating`` (integer 1-5), ``timestamp``
            (ISO 8601 with timezone)
preference  ``preferred`` (item id), ``other`` (item id, different from
            ``preferred``)
task        ``id`` (record id), ``split`` (``"train"`` or ``"test"``),
            ``input`` and ``output`` (non-empty strings), ``options``
            (optional: a classification task's label names, 2-50 distinct
            labels of at most 64 characters, kept verbatim; ``output`` must
            be one of them)
=========== ==================================================================

Examples::

    {"type":"document","id":"d0001","text":"...","timestamp":"2026-01-03T10:00:00Z"}
    {"type":"attribute","key":"city","value":"Lisbon"}
    {"type":"interaction","item":"item_012","rating":4,"timestamp":"2026-01-03T10:00:00Z"}
    {"type":"preference","preferred":"item_003","other":"item_009"}
    {"type":"task","id":"t0001","split":"train","input":"...","output":"..."}

Record ids and item ids match ``[A-Za-z0-9_.:-]{1,128}``.  Ids of documents and
tasks are unique within a file; so are attribute keys, (item, timestamp) of
interactions and (preferred, other) of preferences.  Free text is at most
20,000 characters (a longer text is not an error: its record is quarantined,
see ``client.store``).  Timestamps are normalised to UTC (``...Z``).  A file
is at most :data:`MAX_FILE_BYTES` (64 MiB) and a line at most
:data:`MAX_LINE_BYTES` (1 MiB).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO, Iterator

SPLITS = ("train", "test")
MAX_TEXT_CHARS = 20_000
MAX_ATTRIBUTE_CHARS = 1_000
MAX_OPTIONS, MAX_OPTION_CHARS = 50, 64
MAX_FILE_BYTES = 64 * 1024 * 1024
# A valid line holds at most two texts of 20,000 characters, each at most
# 6 bytes per character (\uXXXX escapes): well under 1 MiB.
MAX_LINE_BYTES = 1024 * 1024

_ID_RE = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
_KEY_RE = re.compile(r"[a-z][a-z0-9_]{0,63}")

FIELDS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    # type -> (required fields, optional fields); "type" itself is implicit.
    "document": (frozenset({"id", "text"}), frozenset({"timestamp"})),
    "attribute": (frozenset({"key", "value"}), frozenset()),
    "interaction": (frozenset({"item", "rating", "timestamp"}), frozenset()),
    "preference": (frozenset({"preferred", "other"}), frozenset()),
    "task": (frozenset({"id", "split", "input", "output"}), frozenset({"options"})),
}
# Free-text fields per type: these go through the scrubber.
TEXT_FIELDS = {"document": ("text",), "task": ("input", "output"), "attribute": ("value",)}

_BOM = "\ufeff"
_CR_HINT = "lines end in CR only; save the file with LF (or CRLF) line endings"


class IngestError(ValueError):
    """Bad input file.  The message names the file, the line and a reason
    code; by construction it never contains the offending text or values."""

    def __init__(self, path: Path, line: int | None, reason: str, hint: str = "") -> None:
        self.path, self.line, self.reason = Path(path), line, reason
        where = f"{path}:{line}" if line is not None else f"{path}"
        super().__init__(f"{where}: {reason}" + (f" ({hint})" if hint else ""))


class Bad(Exception):
    """A validation failure on the current line (reason code and a hint built
    only from our own constants); the reader turns it into an IngestError."""

    def __init__(self, reason: str, hint: str = "") -> None:
        super().__init__(reason)
        self.reason, self.hint = reason, hint


@dataclass
class Line:
    number: int  # 1-based
    start: int  # byte offset of the line's first byte
    end: int  # byte offset just past its line ending
    data: bytes  # the raw bytes, line ending included (what the prefix MAC covers)


def _need_str(obj: dict, field: str) -> str:
    value = obj[field]
    if not isinstance(value, str):
        raise Bad(f"bad_type:{field}", "expected a string")
    if not value.strip():
        raise Bad(f"empty:{field}")
    return value


def _need_id(obj: dict, field: str) -> str:
    value = obj[field]
    if not isinstance(value, str):
        raise Bad(f"bad_type:{field}", "expected a string")
    if not _ID_RE.fullmatch(value):
        raise Bad(f"bad_id:{field}", "ids match [A-Za-z0-9_.:-]{1,128}")
    return value


def _need_timestamp(obj: dict, field: str) -> str:
    value = obj[field]
    if not isinstance(value, str):
        raise Bad(f"bad_type:{field}", "expected a string")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise Bad(f"bad_timestamp:{field}", "expected ISO 8601") from None
    if parsed.tzinfo is None:
        raise Bad(f"bad_timestamp:{field}", "timezone required, e.g. trailing Z")
    # Normalised so the same instant written two ways dedupes on re-ingest.
    return parsed.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    obj: dict = {}
    for key, value in pairs:
        if key in obj:
            raise Bad("duplicate_key")
        obj[key] = value
    return obj


def _no_constants(name: str) -> None:
    raise Bad("invalid_number", "NaN and Infinity are not JSON numbers")


# Duplicate keys would let one value silently shadow another.
_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constants)


def _decode_json(line: str) -> Any:
    try:
        return _DECODER.decode(line)
    except Bad:
        raise
    except json.JSONDecodeError:
        # json's message quotes nothing from the input, but we do not even
        # rely on that: the reason is a fixed code.
        raise Bad("invalid_json") from None
    except RecursionError:
        raise Bad("too_deep", "JSON nested too deeply") from None
    except ValueError:
        # Python refuses integers of more than 4300 digits with a ValueError
        # of its own (sys.set_int_max_str_digits).
        raise Bad("invalid_number", "a number has too many digits") from None
    except Exception:  # noqa: BLE001 - whatever else the parser raises is a code too
        raise Bad("unparseable") from None


def parse_line(raw: bytes, number: int = 0) -> dict | None:
    """Decode one line (no line ending) into a validated record, or None for a blank line.

    A text over its length limit is not an error: the record gets
    ``"too_long"`` set to the reason code, and the store quarantines it.
    """
    if b"\r" in raw:
        raise Bad("cr_line_endings", _CR_HINT)
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        if raw[:2] in (b"\xff\xfe", b"\xfe\xff") or (number == 1 and b"\x00" in raw[:4]):
            raise Bad("invalid_utf8", "the file looks like UTF-16; save it as UTF-8") from None
        raise Bad("invalid_utf8", "save the file as UTF-8") from None
    if line.startswith(_BOM):
        raise Bad("utf8_bom", "the file starts with a byte order mark; save it as UTF-8 without BOM")
    if not line.strip():
        return None
    obj = _decode_json(line)
    if not isinstance(obj, dict):
        raise Bad("not_an_object")
    kind = obj.get("type")
    if not isinstance(kind, str) or kind not in FIELDS:
        # The unknown value is user data, so only the allowed set is shown.
        raise Bad("bad_type_field", "type must be one of " + ", ".join(sorted(FIELDS)))
    required, optional = FIELDS[kind]
    keys = set(obj) - {"type"}
    allowed = ", ".join(sorted(required | optional))
    if keys - required - optional:
        raise Bad("unknown_field", f"allowed fields for {kind}: {allowed}")
    for field in sorted(required - keys):
        raise Bad(f"missing_field:{field}", f"required fields for {kind}: " + ", ".join(sorted(required)))

    if kind == "document":
        rec = {"kind": kind, "id": _need_id(obj, "id"), "text": _need_str(obj, "text"),
               "timestamp": _need_timestamp(obj, "timestamp") if "timestamp" in obj else None}
    elif kind == "attribute":
        key = obj["key"]
        if not isinstance(key, str) or not _KEY_RE.fullmatch(key):
            raise Bad("bad_key:key", "keys match [a-z][a-z0-9_]{0,63}")
        rec = {"kind": kind, "key": key, "value": _need_str(obj, "value")}
    elif kind == "interaction":
        rating = obj["rating"]
        # bool is an int subclass; true/false is never a rating.
        if isinstance(rating, bool) or not isinstance(rating, int):
            raise Bad("bad_type:rating", "expected an integer 1-5")
        if not 1 <= rating <= 5:
            raise Bad("out_of_range:rating", "expected an integer 1-5")
        rec = {"kind": kind, "item": _need_id(obj, "item"), "rating": rating,
               "timestamp": _need_timestamp(obj, "timestamp")}
    elif kind == "preference":
        rec = {"kind": kind, "preferred": _need_id(obj, "preferred"), "other": _need_id(obj, "other")}
        if rec["preferred"] == rec["other"]:
            raise Bad("same_item:other", "preferred and other must differ")
    else:
        split = obj["split"]
        if not isinstance(split, str) or split not in SPLITS:
            raise Bad("bad_split:split", "split must be train or test")
        rec = {"kind": kind, "id": _need_id(obj, "id"), "split": split,
               "input": _need_str(obj, "input"), "output": _need_str(obj, "output"),
               "options": _need_options(obj) if "options" in obj else None}
        if rec["options"] is not None and rec["output"] not in rec["options"]:
            raise Bad("output_not_an_option:output", "output must be one of the options")
    limit = MAX_ATTRIBUTE_CHARS if kind == "attribute" else MAX_TEXT_CHARS
    for field in TEXT_FIELDS.get(kind, ()):
        if len(rec[field]) > limit:
            rec["too_long"] = f"too_long:{field}"
            break
    return rec


def _need_options(obj: dict) -> list[str]:
    """A classification task's label options: 2-50 distinct short label names (kept verbatim)."""
    options = obj["options"]
    if not isinstance(options, list) or not 2 <= len(options) <= MAX_OPTIONS:
        raise Bad("bad_options:options", f"a list of 2 to {MAX_OPTIONS} labels")
    if not all(isinstance(o, str) and o.strip() and len(o) <= MAX_OPTION_CHARS for o in options) or len(set(options)) != len(options):
        raise Bad("bad_options:options", f"distinct non-empty labels of at most {MAX_OPTION_CHARS} characters")
    return options


def natural_key(rec: dict) -> tuple[str, str]:
    """(namespace, key) that must be unique within a file; documents and tasks share one id namespace."""
    kind = rec["kind"]
    if kind in ("document", "task"):
        return "record", rec["id"]
    if kind == "attribute":
        return "attribute", rec["key"]
    if kind == "interaction":
        return "interaction", f"{rec['item']}\x00{rec['timestamp']}"
    return "preference", f"{rec['preferred']}\x00{rec['other']}"


DUPLICATE_REASON = {"record": "duplicate_id:id", "attribute": "duplicate_attribute:key",
                    "interaction": "duplicate_interaction", "preference": "duplicate_preference"}


class _LineBad(Exception):
    def __init__(self, number: int, bad: Bad) -> None:
        super().__init__(bad.reason)
        self.number, self.bad = number, bad


def read_lines(f: BinaryIO, start: int, first_number: int, end: int) -> Iterator[Line]:
    """The lines of ``f`` from byte ``start`` (line ``first_number``) up to byte ``end``.

    Reads one line at a time, never more than :data:`MAX_LINE_BYTES` of one,
    and never past ``end`` (the file size when ingestion began), so lines
    appended meanwhile wait for the next ingestion.
    """
    f.seek(start)
    pos, number = start, first_number
    while pos < end:
        data = f.readline(min(MAX_LINE_BYTES + 1, end - pos))
        if not data:
            raise Bad("file_changed", "the file shrank while it was read; retry")
        number += 1
        if not data.endswith(b"\n") and pos + len(data) < end:
            if b"\r" in data:
                raise _LineBad(number, Bad("cr_line_endings", _CR_HINT))
            raise _LineBad(number, Bad("line_too_long", f"a line is at most {MAX_LINE_BYTES} bytes"))
        yield Line(number, pos, pos + len(data), data)
        pos += len(data)


def records(path: Path, f: BinaryIO, start: int, first_number: int, end: int) -> Iterator[tuple[Line, dict | None]]:
    """(line, record or None for a blank line) from ``start`` to ``end``; the first bad line raises IngestError."""
    try:
        for line in read_lines(f, start, first_number, end):
            raw = line.data[:-1] if line.data.endswith(b"\n") else line.data
            if raw.endswith(b"\r"):
                raw = raw[:-1]
            try:
                yield line, parse_line(raw, line.number)
            except Bad as bad:
                raise _LineBad(line.number, bad) from None
    except _LineBad as err:
        raise IngestError(path, err.number, err.bad.reason, err.bad.hint) from None
    except Bad as bad:
        raise IngestError(path, None, bad.reason, bad.hint) from None


def validate_file(path: Path) -> int:
    """Validate a whole user file without storing anything; returns its number of records.

    The checks ingestion makes (every line, duplicate keys within the file, the
    size caps, an empty file), for a harness that must reject a bad folder
    before any device touches it.
    """
    path = Path(path)
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise IngestError(path, None, "unreadable_file", type(exc).__name__) from None
    with f:
        size = os.fstat(f.fileno()).st_size
        if size > MAX_FILE_BYTES:
            raise IngestError(path, None, "file_too_large", f"a user file is at most {MAX_FILE_BYTES >> 20} MiB")
        seen: set[tuple[str, str]] = set()
        n = 0
        for line, rec in records(path, f, 0, 0, size):
            if rec is None:
                continue
            key = natural_key(rec)
            if key in seen:
                raise IngestError(path, line.number, DUPLICATE_REASON[key[0]])
            seen.add(key)
            n += 1
    if not n:
        raise IngestError(path, None, "empty_file", "the file holds no record")
    return n
