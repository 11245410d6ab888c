"""On-device record store: one SQLite file per user, holding SCRUBBED text only.

This is the device side of the trust boundary.  Raw user text passes through
``ingest_jsonl`` exactly once, on its way to the scrubber; only the scrubbed
result is persisted, and nothing here ever logs or raises with user text.

Per-user JSONL input format
---------------------------
UTF-8, one JSON object per line, blank lines allowed.  Every object has a
``"type"`` field; the allowed fields per type are closed (an unknown or
misspelt field is an error, so typos never silently drop data).

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
            ``input`` and ``output`` (non-empty strings)
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
20,000 characters.  Timestamps are stored normalised to UTC (``...Z``).

Ingestion semantics
-------------------
* The whole file is validated first.  The first bad line raises
  ``IngestError`` naming the file, the line number and a reason code, and
  nothing is written: the user fixes the file and retries, no data lost.
* All free text (document text, task input and output) is scrubbed in ONE
  batch call to the supplied ``ScrubFn``; then everything is written in one
  SQLite transaction.
* A record whose scrub outcome has ``error`` set (or ``text`` None) is
  quarantined: only its id and the reason code are stored, and it is never
  returned by ``tasks()`` / ``documents()``.
* Re-ingesting is idempotent: documents and tasks are upserted by id,
  attributes by key, interactions by (item, timestamp), preferences by pair.
  A newer version of a record replaces the older one (and may move it into or
  out of quarantine).
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import sqlite3
from contextlib import closing, contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
# Private-state key of the pseudonymisation secret (see DeviceStore.device_secret).
DEVICE_SECRET_KEY = "device-secret"
SPLITS = ("train", "test")
MAX_TEXT_CHARS = 20_000
MAX_ATTRIBUTE_CHARS = 1_000
MAX_OPTIONS, MAX_OPTION_CHARS = 50, 64

_ID_RE = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
_KEY_RE = re.compile(r"[a-z][a-z0-9_]{0,63}")
# Reason codes come from our validators or from the scrubber.  A scrubber bug
# could put text into its error; anything that is not a short code is replaced
# so quarantine rows can never hold user text.
_REASON_RE = re.compile(r"[a-z0-9_.:-]{1,64}")

FIELDS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    # type -> (required fields, optional fields); "type" itself is implicit.
    "document": (frozenset({"id", "text"}), frozenset({"timestamp"})),
    "attribute": (frozenset({"key", "value"}), frozenset()),
    "interaction": (frozenset({"item", "rating", "timestamp"}), frozenset()),
    "preference": (frozenset({"preferred", "other"}), frozenset()),
    "task": (frozenset({"id", "split", "input", "output"}), frozenset({"options"})),
}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS documents (
    id TEXT PRIMARY KEY, text TEXT NOT NULL, timestamp TEXT,
    entity_count INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS tasks (
    id TEXT PRIMARY KEY, split TEXT NOT NULL CHECK (split IN ('train', 'test')),
    input TEXT NOT NULL, output TEXT NOT NULL, entity_count INTEGER NOT NULL, options TEXT);
CREATE TABLE IF NOT EXISTS attributes (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS interactions (
    item TEXT NOT NULL, rating INTEGER NOT NULL CHECK (rating BETWEEN 1 AND 5),
    timestamp TEXT NOT NULL, PRIMARY KEY (item, timestamp));
CREATE TABLE IF NOT EXISTS preferences (
    preferred TEXT NOT NULL, other TEXT NOT NULL, PRIMARY KEY (preferred, other));
CREATE TABLE IF NOT EXISTS quarantine (
    kind TEXT NOT NULL, id TEXT NOT NULL, reason TEXT NOT NULL, PRIMARY KEY (kind, id));
CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, blob BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS ingests (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, records INTEGER NOT NULL,
    quarantined INTEGER NOT NULL);
"""


class IngestError(ValueError):
    """Bad input file.  The message names the file, the line and a reason
    code; by construction it never contains the offending text or values."""

    def __init__(self, path: Path, line: int | None, reason: str, hint: str = "") -> None:
        self.path, self.line, self.reason = Path(path), line, reason
        where = f"{path}:{line}" if line is not None else f"{path}"
        super().__init__(f"{where}: {reason}" + (f" ({hint})" if hint else ""))


@dataclass
class ScrubOutcome:
    text: str | None
    entity_count: int
    error: str | None  # a reason CODE, never text


ScrubFn = Callable[[list[str]], list[ScrubOutcome]]


class _Bad(Exception):
    """Internal: a validation failure on the current line (reason code and a
    hint built only from our own constants)."""

    def __init__(self, reason: str, hint: str = "") -> None:
        super().__init__(reason)
        self.reason, self.hint = reason, hint


@dataclass
class _Parsed:
    documents: list[dict]
    attributes: dict[str, str]
    interactions: list[tuple[str, int, str]]
    preferences: list[tuple[str, str]]
    tasks: list[dict]

    def texts(self) -> list[str]:
        # Order fixes how scrub outcomes map back: docs, then (input, output) per task.
        return [d["text"] for d in self.documents] + [
            t[f] for t in self.tasks for f in ("input", "output")]


def _sanitize_reason(reason: object) -> str:
    return reason if isinstance(reason, str) and _REASON_RE.fullmatch(reason) else "scrub_error"


def _need_str(obj: dict, field: str, max_len: int = MAX_TEXT_CHARS) -> str:
    value = obj[field]
    if not isinstance(value, str):
        raise _Bad(f"bad_type:{field}", "expected a string")
    if not value.strip():
        raise _Bad(f"empty:{field}")
    if len(value) > max_len:
        raise _Bad(f"too_long:{field}", f"at most {max_len} characters")
    return value


def _need_id(obj: dict, field: str) -> str:
    value = obj[field]
    if not isinstance(value, str):
        raise _Bad(f"bad_type:{field}", "expected a string")
    if not _ID_RE.fullmatch(value):
        raise _Bad(f"bad_id:{field}", "ids match [A-Za-z0-9_.:-]{1,128}")
    return value


def _need_timestamp(obj: dict, field: str) -> str:
    value = obj[field]
    if not isinstance(value, str):
        raise _Bad(f"bad_type:{field}", "expected a string")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise _Bad(f"bad_timestamp:{field}", "expected ISO 8601") from None
    if parsed.tzinfo is None:
        raise _Bad(f"bad_timestamp:{field}", "timezone required, e.g. trailing Z")
    # Normalised so the same instant written two ways dedupes on re-ingest.
    return parsed.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def _parse_line(raw: bytes) -> dict | None:
    """Decode one line into a validated record dict, or None for a blank line."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _Bad("invalid_utf8") from None
    if not line.strip():
        return None
    try:
        # Duplicate keys would let one value silently shadow another.
        obj = json.loads(line, object_pairs_hook=_no_duplicate_keys)
    except _Bad:
        raise
    except (json.JSONDecodeError, RecursionError):
        # json's message quotes nothing from the input, but we do not even
        # rely on that: the reason is a fixed code.
        raise _Bad("invalid_json") from None
    if not isinstance(obj, dict):
        raise _Bad("not_an_object")
    kind = obj.get("type")
    if not isinstance(kind, str) or kind not in FIELDS:
        # The unknown value is user data, so only the allowed set is shown.
        raise _Bad("bad_type_field", "type must be one of " + ", ".join(sorted(FIELDS)))
    required, optional = FIELDS[kind]
    keys = set(obj) - {"type"}
    allowed = ", ".join(sorted(required | optional))
    if keys - required - optional:
        raise _Bad("unknown_field", f"allowed fields for {kind}: {allowed}")
    for field in sorted(required - keys):
        raise _Bad(f"missing_field:{field}", f"required fields for {kind}: "
                   + ", ".join(sorted(required)))

    if kind == "document":
        rec = {"kind": kind, "id": _need_id(obj, "id"), "text": _need_str(obj, "text"),
               "timestamp": _need_timestamp(obj, "timestamp") if "timestamp" in obj else None}
    elif kind == "attribute":
        key = obj["key"]
        if not isinstance(key, str) or not _KEY_RE.fullmatch(key):
            raise _Bad("bad_key:key", "keys match [a-z][a-z0-9_]{0,63}")
        rec = {"kind": kind, "key": key, "value": _need_str(obj, "value", MAX_ATTRIBUTE_CHARS)}
    elif kind == "interaction":
        rating = obj["rating"]
        # bool is an int subclass; true/false is never a rating.
        if isinstance(rating, bool) or not isinstance(rating, int):
            raise _Bad("bad_type:rating", "expected an integer 1-5")
        if not 1 <= rating <= 5:
            raise _Bad("out_of_range:rating", "expected an integer 1-5")
        rec = {"kind": kind, "item": _need_id(obj, "item"), "rating": rating,
               "timestamp": _need_timestamp(obj, "timestamp")}
    elif kind == "preference":
        rec = {"kind": kind, "preferred": _need_id(obj, "preferred"),
               "other": _need_id(obj, "other")}
        if rec["preferred"] == rec["other"]:
            raise _Bad("same_item:other", "preferred and other must differ")
    else:
        split = obj["split"]
        if not isinstance(split, str) or split not in SPLITS:
            raise _Bad("bad_split:split", "split must be train or test")
        rec = {"kind": kind, "id": _need_id(obj, "id"), "split": split,
               "input": _need_str(obj, "input"), "output": _need_str(obj, "output"),
               "options": _need_options(obj) if "options" in obj else None}
        if rec["options"] is not None and rec["output"] not in rec["options"]:
            raise _Bad("output_not_an_option:output", "output must be one of the options")
    return rec


def _need_options(obj: dict) -> list[str]:
    """A classification task's label options: 2-50 distinct short label names (kept verbatim)."""
    options = obj["options"]
    if not isinstance(options, list) or not 2 <= len(options) <= MAX_OPTIONS:
        raise _Bad("bad_options:options", f"a list of 2 to {MAX_OPTIONS} labels")
    if not all(isinstance(o, str) and o.strip() and len(o) <= MAX_OPTION_CHARS for o in options) or len(set(options)) != len(options):
        raise _Bad("bad_options:options", f"distinct non-empty labels of at most {MAX_OPTION_CHARS} characters")
    return options


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    obj: dict = {}
    for key, value in pairs:
        if key in obj:
            raise _Bad("duplicate_key")
        obj[key] = value
    return obj


def parse_jsonl(path: Path) -> _Parsed:
    """Read and validate a whole file; raise IngestError on the first bad line."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise IngestError(path, None, "unreadable_file", type(exc).__name__) from None
    parsed = _Parsed([], {}, [], [], [])
    text_ids: set[str] = set()
    seen_inter: set[tuple[str, str]] = set()
    seen_pref: set[tuple[str, str]] = set()
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        try:
            rec = _parse_line(raw.rstrip(b"\r"))
            if rec is None:
                continue
            kind = rec["kind"]
            if kind in ("document", "task"):
                # One id namespace for free-text records, so quarantine and
                # audit sidecars can refer to a record by id alone.
                if rec["id"] in text_ids:
                    raise _Bad("duplicate_id:id")
                text_ids.add(rec["id"])
                (parsed.documents if kind == "document" else parsed.tasks).append(rec)
            elif kind == "attribute":
                if rec["key"] in parsed.attributes:
                    raise _Bad("duplicate_attribute:key")
                parsed.attributes[rec["key"]] = rec["value"]
            elif kind == "interaction":
                nat = (rec["item"], rec["timestamp"])
                if nat in seen_inter:
                    raise _Bad("duplicate_interaction")
                seen_inter.add(nat)
                parsed.interactions.append((rec["item"], rec["rating"], rec["timestamp"]))
            else:
                nat = (rec["preferred"], rec["other"])
                if nat in seen_pref:
                    raise _Bad("duplicate_preference")
                seen_pref.add(nat)
                parsed.preferences.append(nat)
        except _Bad as bad:
            raise IngestError(path, lineno, bad.reason, bad.hint) from None
    return parsed


class DeviceStore:
    """One user's private store.  Opens a short-lived connection per call so an
    instance can be used from whichever thread or actor the simulation engine
    runs a client on (sqlite3 connections are bound to their thread)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._tx() as conn:
            conn.executescript(_SCHEMA)
            conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)",
                         (str(SCHEMA_VERSION),))
            version = conn.execute(
                "SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0]
        if version != str(SCHEMA_VERSION):
            raise RuntimeError(f"{self.path}: schema version {version}, expected {SCHEMA_VERSION}")
        # The file holds private data; keep it owner-only where the OS allows.
        try:
            os.chmod(self.path, 0o600)
        except OSError:
            pass

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with closing(sqlite3.connect(self.path)) as conn:
            with conn:  # commits on success, rolls back on any exception
                yield conn

    # -- ingestion ---------------------------------------------------------

    def ingest_jsonl(self, path: Path, scrub: ScrubFn) -> dict:
        parsed = parse_jsonl(path)
        texts = parsed.texts()
        outcomes = scrub(texts) if texts else []
        self._check_outcomes(outcomes, len(texts))

        def verdict(i: int) -> tuple[str | None, str | None, int]:
            out = outcomes[i]
            if out.error is not None:
                return None, _sanitize_reason(out.error), 0
            if out.text is None:
                return None, "scrub_no_text", 0
            return out.text, None, out.entity_count

        counts = {"document": 0, "attribute": len(parsed.attributes),
                  "interaction": len(parsed.interactions),
                  "preference": len(parsed.preferences), "task": 0,
                  "quarantined": 0, "scrubbed_entities": 0}
        with self._tx() as conn:
            for i, doc in enumerate(parsed.documents):
                text, reason, n = verdict(i)
                self._upsert_text(conn, "document", doc["id"], reason,
                                  "INSERT INTO documents VALUES (?, ?, ?, ?)",
                                  (doc["id"], text, doc["timestamp"], n))
                counts["quarantined" if reason else "document"] += 1
                counts["scrubbed_entities"] += n
            base = len(parsed.documents)
            for j, task in enumerate(parsed.tasks):
                t_in, r_in, n_in = verdict(base + 2 * j)
                t_out, r_out, n_out = verdict(base + 2 * j + 1)
                reason = r_in or r_out  # either half unusable -> whole task is
                if not reason and task["options"] is not None and t_out != task["output"]:
                    # A label the scrubber changed no longer names an option: never train on it.
                    reason = "label_scrubbed"
                options = json.dumps(task["options"]) if task["options"] is not None else None
                self._upsert_text(conn, "task", task["id"], reason,
                                  "INSERT INTO tasks VALUES (?, ?, ?, ?, ?, ?)",
                                  (task["id"], task["split"], t_in, t_out, n_in + n_out, options))
                counts["quarantined" if reason else "task"] += 1
                counts["scrubbed_entities"] += 0 if reason else n_in + n_out
            conn.executemany("INSERT OR REPLACE INTO attributes VALUES (?, ?)",
                             sorted(parsed.attributes.items()))
            conn.executemany("INSERT OR REPLACE INTO interactions VALUES (?, ?, ?)",
                             parsed.interactions)
            conn.executemany("INSERT OR IGNORE INTO preferences VALUES (?, ?)",
                             parsed.preferences)
            total = sum(v for k, v in counts.items() if k != "scrubbed_entities")
            conn.execute("INSERT INTO ingests (records, quarantined) VALUES (?, ?)",
                         (total, counts["quarantined"]))
        # Counts only: never text, ids or values.
        log.info("ingested %s: %s", self.path.name, counts)
        return counts

    @staticmethod
    def _check_outcomes(outcomes: object, expected: int) -> None:
        # A misbehaving scrubber is a programming error, not bad user data; fail
        # before writing anything so no record is stored unscrubbed or lost.
        if not isinstance(outcomes, list) or len(outcomes) != expected:
            got = len(outcomes) if isinstance(outcomes, list) else type(outcomes).__name__
            raise RuntimeError(f"scrub returned {got} outcomes for {expected} texts")
        for out in outcomes:
            if not isinstance(out, ScrubOutcome) or (
                    out.text is not None and not isinstance(out.text, str)) or (
                    isinstance(out.entity_count, bool) or not isinstance(out.entity_count, int)):
                raise RuntimeError("scrub returned a malformed ScrubOutcome")

    @staticmethod
    def _upsert_text(conn: sqlite3.Connection, kind: str, rid: str, reason: str | None,
                     insert_sql: str, row: tuple) -> None:
        table = "documents" if kind == "document" else "tasks"
        conn.execute(f"DELETE FROM {table} WHERE id = ?", (rid,))
        conn.execute("DELETE FROM quarantine WHERE kind = ? AND id = ?", (kind, rid))
        if reason is None:
            conn.execute(insert_sql, row)
        else:
            conn.execute("INSERT INTO quarantine VALUES (?, ?, ?)", (kind, rid, reason))

    def is_ingested(self) -> bool:
        with self._tx() as conn:
            return conn.execute("SELECT 1 FROM ingests LIMIT 1").fetchone() is not None

    # -- reads (scrubbed only) ---------------------------------------------

    def labelled_tasks(self, split: str) -> list[tuple[str, str, list[str] | None]]:
        """(input, output, label options or None) of a split's usable tasks."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}")
        with self._tx() as conn:
            return [(i, o, json.loads(opts) if opts else None) for i, o, opts in conn.execute(
                "SELECT input, output, options FROM tasks WHERE split = ? ORDER BY id", (split,))]

    def tasks(self, split: str) -> list[tuple[str, str]]:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}")
        with self._tx() as conn:
            return [tuple(r) for r in conn.execute(
                "SELECT input, output FROM tasks WHERE split = ? ORDER BY id", (split,))]

    def documents(self) -> list[str]:
        with self._tx() as conn:
            return [r[0] for r in conn.execute("SELECT text FROM documents ORDER BY id")]

    def attributes(self) -> dict[str, str]:
        with self._tx() as conn:
            return dict(conn.execute("SELECT key, value FROM attributes ORDER BY key"))

    def interactions(self) -> list[tuple[str, int, str]]:
        """(item, rating, timestamp) in time order."""
        with self._tx() as conn:
            return [tuple(r) for r in conn.execute(
                "SELECT item, rating, timestamp FROM interactions ORDER BY timestamp, item")]

    def preferences(self) -> list[tuple[str, str]]:
        """(preferred, other) pairs."""
        with self._tx() as conn:
            return [tuple(r) for r in conn.execute(
                "SELECT preferred, other FROM preferences ORDER BY preferred, other")]

    def num_records(self) -> int:
        """Usable records of every kind (quarantined ones excluded)."""
        with self._tx() as conn:
            return sum(conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in (
                "documents", "tasks", "attributes", "interactions", "preferences"))

    def quarantined(self) -> list[tuple[str, str]]:
        """(record id, reason code) for every quarantined record."""
        with self._tx() as conn:
            return [tuple(r) for r in conn.execute(
                "SELECT id, reason FROM quarantine ORDER BY kind, id")]

    # -- private training state --------------------------------------------

    def put_state(self, key: str, blob: bytes) -> None:
        """Private per-user state (user-tier adapter, accountant) that never
        leaves the device; overwrites any previous value for ``key``."""
        if not isinstance(key, str) or not key:
            raise ValueError("state key must be a non-empty string")
        if not isinstance(blob, (bytes, bytearray, memoryview)):
            raise TypeError("state blob must be bytes")
        with self._tx() as conn:
            conn.execute("INSERT OR REPLACE INTO state VALUES (?, ?)", (key, bytes(blob)))

    def get_state(self, key: str) -> bytes | None:
        with self._tx() as conn:
            row = conn.execute("SELECT blob FROM state WHERE key = ?", (key,)).fetchone()
        return None if row is None else bytes(row[0])

    def device_secret(self) -> bytes:
        """This device's pseudonymisation key: 32 random bytes, made on first use.

        It keys the scrubber's HMAC pseudonyms, so the same name maps to the
        same token on this device and to unrelated tokens on any other. It is
        private state like the user tier: never sent, never logged.
        """
        secret = self.get_state(DEVICE_SECRET_KEY)
        if secret is None:
            secret = secrets.token_bytes(32)
            with self._tx() as conn:
                # INSERT OR IGNORE: a concurrent first use keeps one secret.
                conn.execute("INSERT OR IGNORE INTO state VALUES (?, ?)",
                             (DEVICE_SECRET_KEY, secret))
            secret = self.get_state(DEVICE_SECRET_KEY)
        return secret
