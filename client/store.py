"""On-device record store: one SQLite file per user, holding SCRUBBED text only, encrypted at rest.

This is the device side of the trust boundary.  Raw user text passes through
``ingest_jsonl`` on its way to the scrubber; only the scrubbed result is
persisted, and nothing here ever logs or raises with user text.  The input
format is described in ``client.jsonl``.

Ingestion
---------
* **Incremental.**  The store keeps a cursor: how many bytes and lines of the
  user's file it has ingested, a MAC of that prefix, and the file's size,
  mtime and inode when it finished.  An unchanged file costs a ``stat`` and a
  read of at most 4 KiB (:meth:`DeviceStore.needs_ingest`): no parse, no
  scrub.  (An edit that keeps the size, mtime, inode and last 4 KiB, which
  takes restoring the mtime on purpose, is seen only once the file changes
  again.)  Lines appended since are ingested on the next call.  If the
  ingested prefix changed (an edit, a truncation, another file, or a last
  line without a newline that was extended) the whole file is ingested again
  from line 1, idempotently (upserts below).
* **Validate first, then scrub and commit in bounded batches.**  The new
  region (from the cursor to the end of the file as it was when ingestion
  began) is read and validated line by line, streaming, before anything of it
  is scrubbed or written.  The first bad line raises ``IngestError``
  (``path:LINE: reason_code``) and nothing of that region is written; what
  earlier ingestions committed stays.  Then the region is parsed again and
  scrubbed and written in batches of at most :data:`BATCH_LINES` lines or
  :data:`BATCH_BYTES` bytes, each batch in one SQLite transaction together
  with the cursor, so a killed ingestion resumes at the last committed batch
  and a half-written batch is never visible.
* **Bad input** (a reason code with the file and line, never the content):
  a line that is not a well-formed record of the format rejects the region:
  ``invalid_utf8`` (with a hint for UTF-16), ``utf8_bom``, ``cr_line_endings``,
  ``invalid_json``, ``invalid_number`` (NaN, Infinity, or an integer of more
  than 4300 digits), ``too_deep``, ``unparseable``, ``line_too_long`` (over
  1 MiB), ``not_an_object``, ``bad_type_field``, ``unknown_field``,
  ``missing_field:F``, ``duplicate_key``, ``bad_type:F``, ``empty:F``,
  ``bad_id:F``, ``bad_key:key``, ``bad_timestamp:F``, ``out_of_range:rating``,
  ``bad_split:split``, ``same_item:other`` and the ``duplicate_*`` codes (a
  record key seen earlier in the file, in this region or an ingested one).
  The whole file is refused with ``file_too_large`` (over 64 MiB),
  ``empty_file`` (no record at all) or ``unreadable_file``.
* **Quarantine** (the record is not used, the rest is): a well-formed record
  whose free text is over its limit (``too_long:F``: 20,000 characters, 1,000
  for an attribute value) or that the scrubber could not scrub (its reason
  code, e.g. ``analyzer_error``; ``scrub_no_text``).  Only the record's keyed
  id, kind, line number and reason code are stored; ``quarantined()`` lists
  ``("line N", reason)``.
* **Everything that is free text is scrubbed**: document text, task input and
  output, and attribute values.  Record ids are never stored: documents,
  tasks, attributes, interactions and preferences are keyed by a keyed HMAC
  of their natural key (record id, attribute key, (item, timestamp),
  (preferred, other)), which is all an upsert needs, so an id that happens to
  be a phone number or any other personal datum never reaches the store.
  Records keep their file order (by line).
* Re-ingesting is idempotent: every record is upserted by its keyed id.  A
  newer version replaces the older one (and may move it into or out of
  quarantine).  A record deleted from the file stays in the store.

At rest
-------
SQLite in WAL mode.  Every record body (document text and timestamp, task
input and output, attribute key and value, interaction, preference) and every
``state`` blob (user tier, optimizer, accountant, profile, choices,
diagnostics, evaluation results, the served model) is sealed with AES-256-GCM, a random 96-bit
nonce per write and, as associated data, the table and the row's key, so
rows cannot be swapped between rows or tables.  What stays in clear: keyed
row ids, a task's split, line numbers, state key names, quarantine reason
codes, counts and the ingestion cursor (offsets, file size and mtime).

Keys: a 32-byte random device key lives in a separate key file (0600; next
to the store as ``<store>.key`` unless the device's policy names one with
``key-file``).  Per store, HKDF-SHA256 with a random salt kept in the store
derives, with separate ``info`` labels, the AEAD key, the row-id key, the
file-MAC key, a key check (a wrong key file is refused by name, not by a
decryption error) and the pseudonymisation secret (``device_secret``), so
the pseudonym key no longer sits in the store file.  Without the key file
the store cannot be read; losing it loses the store.  An OS keyring could
hold the device key instead of a file; that is not implemented.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import sqlite3
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from client.jsonl import (DUPLICATE_REASON, MAX_FILE_BYTES, SPLITS, TEXT_FIELDS, IngestError, Line,
                          natural_key, records)

__all__ = ["BATCH_BYTES", "BATCH_LINES", "DeviceStore", "IngestError", "MAX_FILE_BYTES",
           "SCHEMA_VERSION", "ScrubFn", "ScrubOutcome", "StoreError", "default_key_file"]

log = logging.getLogger(__name__)

SCHEMA_VERSION = 3
BATCH_LINES = 512
BATCH_BYTES = 4 * 1024 * 1024
TAIL_BYTES = 4096
KEY_BYTES = 32
_KEY_HEADER = b"fedpersona device key v1\n"
_AES = "aes-256-gcm"

# Reason codes come from our validators or from the scrubber.  A scrubber bug
# could put text into its error; anything that is not a short code is replaced
# so quarantine rows can never hold user text.
_REASON_RE = re.compile(r"[a-z0-9_.:-]{1,64}")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS documents (rid BLOB PRIMARY KEY, line INTEGER NOT NULL, body BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS tasks (
    rid BLOB PRIMARY KEY, split TEXT NOT NULL CHECK (split IN ('train', 'test')),
    line INTEGER NOT NULL, body BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS attributes (rid BLOB PRIMARY KEY, body BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS interactions (rid BLOB PRIMARY KEY, body BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS preferences (rid BLOB PRIMARY KEY, body BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS quarantine (
    rid BLOB PRIMARY KEY, kind TEXT NOT NULL, line INTEGER NOT NULL, reason TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, blob BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS ingest_cursor (
    id INTEGER PRIMARY KEY CHECK (id = 1), byte_offset INTEGER NOT NULL, line INTEGER NOT NULL,
    prefix_mac BLOB NOT NULL, complete INTEGER NOT NULL, size INTEGER, mtime_ns INTEGER,
    ino INTEGER, tail_mac BLOB, open_line INTEGER);
CREATE TABLE IF NOT EXISTS ingest_keys (digest BLOB PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS ingests (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, records INTEGER NOT NULL, quarantined INTEGER NOT NULL);
"""
_TABLE_OF = {"document": "documents", "task": "tasks", "attribute": "attributes",
             "interaction": "interactions", "preference": "preferences"}


class StoreError(RuntimeError):
    """The store cannot be opened or read (an old schema, a missing or wrong key
    file, a row that fails authentication).  Names paths, never data."""


@dataclass
class ScrubOutcome:
    text: str | None
    entity_count: int
    error: str | None  # a reason CODE, never text


ScrubFn = Callable[[list[str]], list[ScrubOutcome]]
# progress(phase, done, total): phase "validate" or "ingest", bytes of the new region.
ProgressFn = Callable[[str, int, int], None]


def _sanitize_reason(reason: object) -> str:
    return reason if isinstance(reason, str) and _REASON_RE.fullmatch(reason) else "scrub_error"


# -- keys ------------------------------------------------------------------


def default_key_file(store_path: Path) -> Path:
    """Where a store's key file lives unless the device's policy says otherwise."""
    store_path = Path(store_path)
    return store_path.with_name(store_path.name + ".key") if store_path.suffix == ".key" else store_path.with_suffix(".key")


def _read_key(path: Path) -> bytes:
    try:
        st = path.stat()
        raw = path.read_bytes()
    except OSError as exc:
        raise StoreError(f"{path}: cannot read the store's key file ({type(exc).__name__})") from None
    if os.name == "posix" and st.st_mode & 0o077:
        raise StoreError(f"{path}: the key file is readable by group or others (mode {st.st_mode & 0o777:o}); chmod 600 it")
    body = raw[len(_KEY_HEADER):].strip()
    if not raw.startswith(_KEY_HEADER) or len(body) != 2 * KEY_BYTES:
        raise StoreError(f"{path}: not a fedpersona key file")
    try:
        return bytes.fromhex(body.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise StoreError(f"{path}: not a fedpersona key file") from None


def _create_key(path: Path) -> bytes:
    """Write a fresh key file (0600) atomically; a concurrent creator's key wins."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(_KEY_HEADER + secrets.token_bytes(KEY_BYTES).hex().encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # fails if the file exists: never overwrite a key
        except FileExistsError:
            pass
    finally:
        tmp.unlink(missing_ok=True)
    if os.name == "posix":
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return _read_key(path)


class _Keys:
    """Everything derived from the device key for one store (HKDF-SHA256, the store's salt)."""

    def __init__(self, master: bytes, salt: bytes, encryption: str) -> None:
        def derive(label: str, length: int = 32) -> bytes:
            return HKDF(hashes.SHA256(), length, salt, f"fedpersona/store/v2/{label}".encode()).derive(master)

        self.encryption = encryption
        self._aead = AESGCM(derive("aead")) if encryption == _AES else None
        self._rid_key = derive("record-id")
        self._mac_key = derive("file-mac")
        self.check = derive(f"key-check/{encryption}", 16).hex()
        self.device_secret = derive("device-secret")

    @staticmethod
    def _ad(table: str, rid: bytes) -> bytes:
        return b"fedpersona/store/v2\x00" + table.encode() + b"\x00" + rid

    def seal(self, table: str, rid: bytes, plaintext: bytes) -> bytes:
        if self._aead is None:
            return plaintext
        nonce = os.urandom(12)
        return nonce + self._aead.encrypt(nonce, plaintext, self._ad(table, rid))

    def open(self, table: str, rid: bytes, blob: bytes) -> bytes:
        if self._aead is None:
            return bytes(blob)
        try:
            return self._aead.decrypt(bytes(blob[:12]), bytes(blob[12:]), self._ad(table, rid))
        except InvalidTag:
            raise StoreError(f"a row of table {table} fails authentication (tampered, moved, or written under another key)") from None

    def rid(self, namespace: str, key: str) -> bytes:
        return hmac.new(self._rid_key, f"{namespace}\x00{key}".encode(), hashlib.sha256).digest()[:16]

    def file_mac(self, label: bytes) -> "hmac.HMAC":
        return hmac.new(self._mac_key, label + b"\x00", hashlib.sha256)

    def tail_mac(self, data: bytes) -> bytes:
        mac = self.file_mac(b"tail")
        mac.update(data)
        return mac.digest()


# -- ingestion plumbing ------------------------------------------------------


@dataclass
class _Plan:
    start: int  # byte offset where the new region starts
    line: int  # lines before it
    mac: "hmac.HMAC"  # MAC of the file's bytes before ``start``
    fresh: bool  # ingesting from line 1: the file's earlier keys are forgotten


@dataclass
class _Cursor:
    offset: int
    line: int
    prefix_mac: bytes
    complete: bool
    stat: tuple | None
    tail_mac: bytes | None
    open_line: bool


def _stat_key(st: os.stat_result) -> tuple[int, int, int]:
    return st.st_size, st.st_mtime_ns, st.st_ino


def _read_range(f: BinaryIO, start: int, end: int, chunk: int = 1 << 20) -> Iterator[bytes]:
    f.seek(start)
    pos = start
    while pos < end:
        data = f.read(min(chunk, end - pos))
        if not data:
            return
        pos += len(data)
        yield data


def _tail(f: BinaryIO, end: int) -> bytes:
    f.seek(max(0, end - TAIL_BYTES))
    return f.read(min(TAIL_BYTES, end))


class DeviceStore:
    """One user's private store.  Opens a short-lived connection per call so an
    instance can be used from whichever thread or actor the simulation engine
    runs a client on (sqlite3 connections are bound to their thread).

    ``key_file`` defaults to :func:`default_key_file`; it is created (0600)
    together with a new store and must exist for an existing one.
    ``encrypt=False`` stores records and state in clear and exists only for
    the throughput benchmark's control arm; a store keeps the setting it was
    created with and refuses to be opened with the other.
    """

    def __init__(self, path: Path, key_file: Path | None = None, *, encrypt: bool = True) -> None:
        self.path = Path(path)
        self.key_file = Path(key_file) if key_file else default_key_file(self.path)
        if self.key_file.resolve() == self.path.resolve():
            raise StoreError(f"{self.path}: the key file must be another file than the store")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        meta = self._meta()
        if meta is not None and meta.get("schema_version") != str(SCHEMA_VERSION):
            raise StoreError(
                f"{self.path}: schema version {meta.get('schema_version')}, expected {SCHEMA_VERSION} "
                "(a store from another fedpersona version; stores before version 2 kept records in clear). "
                "Move it aside: the device ingests its user file again into a new store on the next message "
                "(its private tier and accountant stay in the old file).")
        if meta is None:
            master = _read_key(self.key_file) if self.key_file.exists() else _create_key(self.key_file)
            meta = self._create(master, _AES if encrypt else "none")
        else:
            if not self.key_file.exists():
                raise StoreError(f"{self.path}: its key file {self.key_file} is missing; "
                                 "the store cannot be decrypted without it")
            master = _read_key(self.key_file)
        self._keys = _Keys(master, bytes.fromhex(meta["salt"]), meta["encryption"])
        if not hmac.compare_digest(self._keys.check, meta["key_check"]):
            raise StoreError(f"{self.path}: the key file {self.key_file} does not belong to this store")
        if (meta["encryption"] == _AES) != encrypt:
            raise StoreError(f"{self.path}: created with encryption {meta['encryption']}; opened with the other setting")
        # The file holds private data; keep it owner-only where the OS allows.
        try:
            os.chmod(self.path, 0o600)
        except OSError:
            pass

    @classmethod
    def open_existing(cls, path: Path, key_file: Path | None = None) -> "DeviceStore":
        """A store that already exists, opened to read it outside a round.

        Unlike the constructor this never creates anything: a missing file, a
        file that is not a fedpersona store or a missing key file is a
        :class:`StoreError` naming the path (the constructor would make a new
        store, or a new schema in a stranger's SQLite file).
        """
        path = Path(path)
        if not path.is_file():
            raise StoreError(f"{path}: no such device store")
        try:
            with closing(sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True)) as conn:
                found = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone()
                found = found is not None and conn.execute("SELECT 1 FROM meta WHERE key = 'key_check'").fetchone()
        except sqlite3.DatabaseError:
            found = None
        if not found:
            raise StoreError(f"{path}: not a fedpersona device store")
        return cls(path, key_file)

    def _meta(self) -> dict[str, str] | None:
        with closing(sqlite3.connect(self.path)) as conn:
            if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone() is None:
                return None
            meta = dict(conn.execute("SELECT key, value FROM meta"))
        return meta or None

    def _create(self, master: bytes, encryption: str) -> dict[str, str]:
        salt = secrets.token_bytes(16)
        check = _Keys(master, salt, encryption).check
        with closing(sqlite3.connect(self.path, isolation_level=None)) as conn:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("BEGIN IMMEDIATE")
            try:
                for stmt in _SCHEMA.split(";"):
                    if stmt.strip():
                        conn.execute(stmt)
                # OR IGNORE: a concurrent creator's salt and check win, and are read back below.
                conn.executemany("INSERT OR IGNORE INTO meta VALUES (?, ?)", [
                    ("schema_version", str(SCHEMA_VERSION)), ("salt", salt.hex()),
                    ("encryption", encryption), ("key_check", check)])
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        return self._meta() or {}

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with closing(sqlite3.connect(self.path, timeout=30.0)) as conn:
            with conn:  # commits on success, rolls back on any exception
                yield conn

    # -- ingestion ---------------------------------------------------------

    def _cursor(self) -> _Cursor | None:
        with closing(sqlite3.connect(self.path)) as conn:
            row = conn.execute("SELECT byte_offset, line, prefix_mac, complete, size, mtime_ns, ino, tail_mac, "
                               "open_line FROM ingest_cursor WHERE id = 1").fetchone()
        if row is None:
            return None
        stat = tuple(row[4:7]) if row[4] is not None else None
        return _Cursor(row[0], row[1], bytes(row[2]), bool(row[3]), stat,
                       None if row[7] is None else bytes(row[7]), bool(row[8]))

    def _unchanged(self, cur: _Cursor | None, f: BinaryIO, st: os.stat_result) -> bool:
        """The fast path: the file is the one fully ingested last time (a stat and one small read)."""
        if cur is None or not cur.complete or cur.stat != _stat_key(st) or cur.offset != st.st_size:
            return False
        return cur.tail_mac is not None and hmac.compare_digest(self._keys.tail_mac(_tail(f, cur.offset)), cur.tail_mac)

    def needs_ingest(self, path: Path) -> bool:
        """Whether ``path`` has anything this store has not ingested (cheap: a stat and a small read)."""
        try:
            with open(path, "rb") as f:
                return not self._unchanged(self._cursor(), f, os.fstat(f.fileno()))
        except OSError:
            return True  # ingest_jsonl reports it

    def _plan(self, f: BinaryIO, st: os.stat_result) -> _Plan | None:
        cur = self._cursor()
        if self._unchanged(cur, f, st):
            return None
        if cur is not None and cur.offset and st.st_size >= cur.offset and not (cur.open_line and st.st_size > cur.offset):
            mac = self._keys.file_mac(b"prefix")
            for chunk in _read_range(f, 0, cur.offset):
                mac.update(chunk)
            if hmac.compare_digest(mac.copy().digest(), cur.prefix_mac):
                return _Plan(cur.offset, cur.line, mac, fresh=False)
        # Never ingested, or the ingested prefix changed: the whole file again.
        return _Plan(0, 0, self._keys.file_mac(b"prefix"), fresh=True)

    def ingest_jsonl(self, path: Path, scrub: ScrubFn, progress: ProgressFn | None = None) -> dict:
        """Ingest what is new in ``path`` (see the module docstring); returns counts for this call."""
        path = Path(path)
        counts = dict.fromkeys(("document", "attribute", "interaction", "preference", "task",
                                "quarantined", "scrubbed_entities"), 0)
        try:
            f = open(path, "rb")
        except OSError as exc:
            raise IngestError(path, None, "unreadable_file", type(exc).__name__) from None
        with f:
            st = os.fstat(f.fileno())
            if st.st_size > MAX_FILE_BYTES:
                raise IngestError(path, None, "file_too_large", f"a user file is at most {MAX_FILE_BYTES >> 20} MiB")
            plan = self._plan(f, st)
            if plan is None:
                return counts
            if not self._validate(path, f, plan, st.st_size, progress) and plan.fresh:
                raise IngestError(path, None, "empty_file", "the file holds no record")
            self._store_region(path, f, plan, st, scrub, counts, progress)
        # Counts only: never text, ids or values.
        log.info("ingested %s into %s: %s", path.name, self.path.name, counts)
        return counts

    def _store_region(self, path: Path, f: BinaryIO, plan: _Plan, st: os.stat_result, scrub: ScrubFn,
                      counts: dict, progress: ProgressFn | None) -> None:
        """Parse the validated region again; scrub and commit it batch by batch, then mark the file done."""
        end, lines = st.st_size, plan.line
        batch: list[tuple[Line, dict | None]] = []
        size = 0
        # One connection for the whole region (one WAL checkpoint when it closes), one transaction per batch.
        with closing(sqlite3.connect(self.path, timeout=30.0)) as conn:
            for line, rec in records(path, f, plan.start, plan.line, end):
                plan.mac.update(line.data)
                batch.append((line, rec))
                size += len(line.data)
                lines = line.number
                if len(batch) >= BATCH_LINES or size >= BATCH_BYTES:
                    self._commit_batch(conn, path, batch, scrub, plan, counts)
                    if progress:
                        progress("ingest", line.end - plan.start, end - plan.start)
                    batch, size = [], 0
            if batch:
                self._commit_batch(conn, path, batch, scrub, plan, counts)
            tail = _tail(f, end)
            total = sum(v for k, v in counts.items() if k != "scrubbed_entities")
            with conn:
                self._put_cursor(conn, end, lines, plan.mac.copy().digest(), True, _stat_key(st),
                                 self._keys.tail_mac(tail), tail[-1:] not in (b"", b"\n"))
                if total:
                    conn.execute("INSERT INTO ingests (records, quarantined) VALUES (?, ?)",
                                 (total, counts["quarantined"]))
        if progress:
            progress("ingest", end - plan.start, end - plan.start)

    def _validate(self, path: Path, f: BinaryIO, plan: _Plan, end: int, progress: ProgressFn | None) -> int:
        """Read and check the whole new region, writing nothing; returns its number of records."""
        seen: set[bytes] = set()
        n = 0
        with closing(sqlite3.connect(self.path)) as conn:
            for line, rec in records(path, f, plan.start, plan.line, end):
                if rec is None:
                    continue
                namespace, key = natural_key(rec)
                digest = self._keys.rid(namespace, key)
                if digest in seen or (not plan.fresh and conn.execute(
                        "SELECT 1 FROM ingest_keys WHERE digest = ?", (digest,)).fetchone()):
                    raise IngestError(path, line.number, DUPLICATE_REASON[namespace])
                seen.add(digest)
                n += 1
                if progress and n % BATCH_LINES == 0:
                    progress("validate", line.end - plan.start, end - plan.start)
        return n

    def _commit_batch(self, conn: sqlite3.Connection, path: Path, batch: list[tuple[Line, dict | None]],
                      scrub: ScrubFn, plan: _Plan, counts: dict) -> None:
        recs = [(line, rec) for line, rec in batch if rec is not None]
        texts: list[str] = []
        slots: list[tuple[int, str]] = []
        for i, (_, rec) in enumerate(recs):
            if "too_long" not in rec:
                for field in TEXT_FIELDS.get(rec["kind"], ()):
                    slots.append((i, field))
                    texts.append(rec[field])
        outcomes = scrub(texts) if texts else []
        self._check_outcomes(outcomes, len(texts))
        reasons: list[str | None] = [rec.get("too_long") for _, rec in recs]
        entities = [0] * len(recs)
        scrubbed: list[dict[str, str]] = [{} for _ in recs]
        for (i, field), out in zip(slots, outcomes):
            if out.error is not None or out.text is None:
                reasons[i] = reasons[i] or (_sanitize_reason(out.error) if out.error is not None else "scrub_no_text")
            else:
                scrubbed[i][field] = out.text
                entities[i] += out.entity_count
        for i, (_, rec) in enumerate(recs):
            if rec.get("options") is not None and not reasons[i] and scrubbed[i].get("output") != rec["output"]:
                # A label the scrubber changed no longer names an option: never train on it.
                reasons[i] = "label_scrubbed"
        last = batch[-1][0]
        with conn:  # one transaction: the batch's rows and the cursor past them, or nothing
            if plan.fresh:
                # Ingesting from line 1: the keys of whatever was ingested before are forgotten
                # (in the same transaction as the first batch, so a kill keeps the old cursor).
                conn.execute("DELETE FROM ingest_keys")
                plan.fresh = False
            for (line, rec), reason, n, text in zip(recs, reasons, entities, scrubbed):
                self._upsert(conn, line.number, rec, reason, text)
                counts["quarantined" if reason else rec["kind"]] += 1
                counts["scrubbed_entities"] += 0 if reason else n
            self._put_cursor(conn, last.end, last.number, plan.mac.copy().digest(), False, None, None,
                             not last.data.endswith(b"\n"))
        log.info("%s: committed lines up to %d (%d records)", path.name, last.number, len(recs))

    def _upsert(self, conn: sqlite3.Connection, line: int, rec: dict, reason: str | None,
                text: dict[str, str]) -> None:
        kind = rec["kind"]
        namespace, key = natural_key(rec)
        rid = self._keys.rid(namespace, key)
        conn.execute("INSERT OR IGNORE INTO ingest_keys VALUES (?)", (rid,))
        table = _TABLE_OF[kind]
        if kind == "interaction":
            body = [rec["item"], rec["rating"], rec["timestamp"]]
        elif kind == "preference":
            body = [rec["preferred"], rec["other"]]
        else:
            # A text record may change kind between versions of a file; its id namespace is shared.
            for t in ("documents", "tasks") if namespace == "record" else (table,):
                conn.execute(f"DELETE FROM {t} WHERE rid = ?", (rid,))
            conn.execute("DELETE FROM quarantine WHERE rid = ?", (rid,))
            if reason is not None:
                conn.execute("INSERT INTO quarantine VALUES (?, ?, ?, ?)", (rid, kind, line, reason))
                return
            body = ([rec["key"], text["value"]] if kind == "attribute" else
                    [text["text"], rec["timestamp"]] if kind == "document" else
                    [text["input"], text["output"], rec.get("options")])
        sealed = self._keys.seal(table, rid, json.dumps(body, ensure_ascii=False).encode())
        if kind == "document":
            conn.execute("INSERT INTO documents VALUES (?, ?, ?)", (rid, line, sealed))
        elif kind == "task":
            conn.execute("INSERT INTO tasks VALUES (?, ?, ?, ?)", (rid, rec["split"], line, sealed))
        else:
            # Interactions: a newer rating replaces the older; preferences: the pair is the record.
            verb = "INSERT OR IGNORE" if kind == "preference" else "INSERT OR REPLACE"
            conn.execute(f"{verb} INTO {table} VALUES (?, ?)", (rid, sealed))

    @staticmethod
    def _put_cursor(conn: sqlite3.Connection, offset: int, line: int, prefix_mac: bytes, complete: bool,
                    stat: tuple | None, tail_mac: bytes | None, open_line: bool) -> None:
        size, mtime_ns, ino = stat if stat is not None else (None, None, None)
        conn.execute("INSERT OR REPLACE INTO ingest_cursor VALUES (1, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                     (offset, line, prefix_mac, int(complete), size, mtime_ns, ino, tail_mac, int(open_line)))

    @staticmethod
    def _check_outcomes(outcomes: object, expected: int) -> None:
        # A misbehaving scrubber is a programming error, not bad user data; fail
        # before writing the batch so no record is stored unscrubbed or lost.
        if not isinstance(outcomes, list) or len(outcomes) != expected:
            got = len(outcomes) if isinstance(outcomes, list) else type(outcomes).__name__
            raise RuntimeError(f"scrub returned {got} outcomes for {expected} texts")
        for out in outcomes:
            if not isinstance(out, ScrubOutcome) or (
                    out.text is not None and not isinstance(out.text, str)) or (
                    isinstance(out.entity_count, bool) or not isinstance(out.entity_count, int)):
                raise RuntimeError("scrub returned a malformed ScrubOutcome")

    def is_ingested(self) -> bool:
        """Whether an ingestion has completed at least once."""
        with self._tx() as conn:
            return conn.execute("SELECT 1 FROM ingests LIMIT 1").fetchone() is not None

    # -- reads (scrubbed only) ---------------------------------------------

    def _bodies(self, table: str, sql: str, args: tuple = ()) -> list:
        with self._tx() as conn:
            rows = conn.execute(sql, args).fetchall()
        return [json.loads(self._keys.open(table, bytes(rid), body)) for rid, body in rows]

    def labelled_tasks(self, split: str) -> list[tuple[str, str, list[str] | None]]:
        """(input, output, label options or None) of a split's usable tasks."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}")
        return [(body[0], body[1], body[2]) for body in self._bodies(
            "tasks", "SELECT rid, body FROM tasks WHERE split = ? ORDER BY line, rid", (split,))]

    def tasks(self, split: str) -> list[tuple[str, str]]:
        return [(i, o) for i, o, _ in self.labelled_tasks(split)]

    def documents(self) -> list[str]:
        return [b[0] for b in self._bodies("documents", "SELECT rid, body FROM documents ORDER BY line, rid")]

    def attributes(self) -> dict[str, str]:
        return dict(sorted((k, v) for k, v in self._bodies("attributes", "SELECT rid, body FROM attributes")))

    def interactions(self) -> list[tuple[str, int, str]]:
        """(item, rating, timestamp) in time order."""
        rows = self._bodies("interactions", "SELECT rid, body FROM interactions")
        return sorted(((i, r, t) for i, r, t in rows), key=lambda x: (x[2], x[0]))

    def preferences(self) -> list[tuple[str, str]]:
        """(preferred, other) pairs."""
        return sorted((p, o) for p, o in self._bodies("preferences", "SELECT rid, body FROM preferences"))

    def num_records(self) -> int:
        """Usable records of every kind (quarantined ones excluded)."""
        with self._tx() as conn:
            return sum(conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in _TABLE_OF.values())

    def quarantined(self) -> list[tuple[str, str]]:
        """("line N", reason code) for every quarantined record (its id is not kept)."""
        with self._tx() as conn:
            return [(f"line {line}", reason) for line, reason in conn.execute(
                "SELECT line, reason FROM quarantine ORDER BY line, rid")]

    # -- private training state --------------------------------------------

    def put_state(self, key: str, blob: bytes) -> None:
        """Private per-user state (user-tier adapter, accountant) that never
        leaves the device; overwrites any previous value for ``key``."""
        if not isinstance(key, str) or not key:
            raise ValueError("state key must be a non-empty string")
        if not isinstance(blob, (bytes, bytearray, memoryview)):
            raise TypeError("state blob must be bytes")
        sealed = self._keys.seal("state", key.encode(), bytes(blob))
        with self._tx() as conn:
            conn.execute("INSERT OR REPLACE INTO state VALUES (?, ?)", (key, sealed))

    def get_state(self, key: str) -> bytes | None:
        with self._tx() as conn:
            row = conn.execute("SELECT blob FROM state WHERE key = ?", (key,)).fetchone()
        return None if row is None else self._keys.open("state", key.encode(), row[0])

    def device_secret(self) -> bytes:
        """This device's pseudonymisation key: 32 bytes derived from the key file's key.

        It keys the scrubber's HMAC pseudonyms, so the same name maps to the
        same token on this device and to unrelated tokens on any other. It is
        never stored, sent or logged; it lives as long as the key file and the
        store's salt.
        """
        return self._keys.device_secret
