"""The device store at rest: encryption, the key file, and surviving a writer killed mid-batch."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import pytest

from client.store import DeviceStore, ScrubOutcome, StoreError, default_key_file

ROOT = Path(__file__).resolve().parents[1]
PLANTED_TEXT = "the planted document about Zanzibar and 4 purple elephants"
PLANTED_VALUE = "Quuxborough-on-Sea"
PLANTED_ID = "5551234567"  # a record id that is a phone number


def identity(texts: list[str]) -> list[ScrubOutcome]:
    return [ScrubOutcome(t, 0, None) for t in texts]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def planted(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "u.jsonl", [
        {"type": "document", "id": PLANTED_ID, "text": PLANTED_TEXT},
        {"type": "attribute", "key": "hometown", "value": PLANTED_VALUE},
        {"type": "task", "id": "t1", "split": "train", "input": "Where?", "output": PLANTED_VALUE},
    ])


def files_of(store: DeviceStore) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(store.path.parent.glob(store.path.name + "*")))


@pytest.mark.parametrize("encrypt", [True, False])
def test_the_database_and_its_wal_hold_no_plaintext_of_records_ids_or_state(tmp_path, encrypt):
    store = DeviceStore(tmp_path / "s.sqlite", encrypt=encrypt)
    # A reader held open keeps the WAL file in place (the last connection to close checkpoints and removes it).
    with closing(sqlite3.connect(store.path)) as reader:
        reader.execute("SELECT COUNT(*) FROM documents").fetchone()
        store.ingest_jsonl(planted(tmp_path), identity)
        store.put_state("user-tier.safetensors", b"PRIVATE-TIER-" + PLANTED_VALUE.encode())
        wal = store.path.with_name(store.path.name + "-wal")
        assert wal.is_file() and wal.stat().st_size > 0
        raw = files_of(store)
    assert store.documents() == [PLANTED_TEXT] and store.attributes() == {"hometown": PLANTED_VALUE}
    assert store.get_state("user-tier.safetensors").startswith(b"PRIVATE-TIER-")
    if encrypt:
        for secret in (PLANTED_TEXT, "Zanzibar", PLANTED_VALUE, "PRIVATE-TIER", "hometown"):
            assert secret.encode() not in raw and secret.encode("utf-16-le") not in raw
        assert store.device_secret() not in raw
    else:  # the control arm: the same check sees plaintext when there is some
        assert PLANTED_TEXT.encode() in raw and PLANTED_VALUE.encode() in raw
    assert PLANTED_ID.encode() not in raw  # record ids are never stored, encrypted or not


def test_the_key_file_is_separate_owner_only_and_required(tmp_path):
    path = tmp_path / "s.sqlite"
    store = DeviceStore(path)
    store.put_state("k", b"v")
    key = default_key_file(path)
    assert key == tmp_path / "s.key" and key.is_file()
    assert key.stat().st_mode & 0o777 == 0o600 and path.stat().st_mode & 0o777 == 0o600
    assert key.read_bytes() not in path.read_bytes()
    secret = store.device_secret()
    assert len(secret) == 32 and DeviceStore(path).device_secret() == secret
    key.chmod(0o644)
    with pytest.raises(StoreError, match="readable by group or others"):
        DeviceStore(path)
    key.chmod(0o600)
    other = DeviceStore(tmp_path / "other.sqlite")
    with pytest.raises(StoreError, match="does not belong to this store"):
        DeviceStore(path, key_file=other.key_file)
    key.rename(tmp_path / "elsewhere.key")
    with pytest.raises(StoreError, match="key file .* is missing"):
        DeviceStore(path)
    assert DeviceStore(path, key_file=tmp_path / "elsewhere.key").get_state("k") == b"v"


def test_stores_sharing_one_device_key_derive_separate_secrets(tmp_path):
    key = tmp_path / "keys" / "device.key"
    a, b = DeviceStore(tmp_path / "a.sqlite", key), DeviceStore(tmp_path / "b.sqlite", key)
    assert not (tmp_path / "a.key").exists() and a.device_secret() != b.device_secret()


def test_rows_cannot_be_swapped_between_rows_or_tables(tmp_path):
    store = DeviceStore(tmp_path / "s.sqlite")
    write_jsonl(tmp_path / "u.jsonl", [{"type": "document", "id": "d1", "text": "first"},
                                       {"type": "document", "id": "d2", "text": "second"}])
    store.ingest_jsonl(tmp_path / "u.jsonl", identity)
    store.put_state("a", b"alpha")
    store.put_state("b", b"beta")
    with closing(sqlite3.connect(store.path)) as conn, conn:
        conn.execute("UPDATE state SET blob = (SELECT blob FROM state WHERE key = 'a') WHERE key = 'b'")
    with pytest.raises(StoreError, match="table state fails authentication"):
        store.get_state("b")
    with closing(sqlite3.connect(store.path)) as conn, conn:
        conn.execute("UPDATE documents SET body = (SELECT body FROM documents WHERE line = 1) WHERE line = 2")
    with pytest.raises(StoreError, match="table documents fails authentication"):
        store.documents()


def test_a_store_of_the_old_schema_is_refused_with_a_clear_message(tmp_path):
    path = tmp_path / "old.sqlite"
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        conn.execute("INSERT INTO meta VALUES ('schema_version', '1')")
        conn.execute("CREATE TABLE documents (id TEXT PRIMARY KEY, text TEXT NOT NULL)")
    before = path.read_bytes()
    with pytest.raises(StoreError, match="schema version 1, expected 3 .*kept records in clear.*Move it aside"):
        DeviceStore(path)
    assert path.read_bytes() == before and not default_key_file(path).exists()


def test_a_store_opened_with_the_other_encryption_setting_is_refused(tmp_path):
    DeviceStore(tmp_path / "s.sqlite", encrypt=False)
    with pytest.raises(StoreError, match="encryption"):
        DeviceStore(tmp_path / "s.sqlite")


# -- a writer killed mid-batch ------------------------------------------------------------

WRITER = r"""
import sys, time
from pathlib import Path
import client.store as st

store_path, src, marker, where = sys.argv[1:5]
st.BATCH_LINES = 10
calls = {"scrub": 0, "seal": 0}

def scrub(texts):
    calls["scrub"] += 1
    if where == "scrub" and calls["scrub"] == 3:  # batches 1 and 2 are committed
        Path(marker).write_text("x"); time.sleep(120)
    return [st.ScrubOutcome(t.upper(), 0, None) for t in texts]

seal = st._Keys.seal
def slow_seal(self, table, rid, plaintext):
    if table == "documents":
        calls["seal"] += 1
        if where == "write" and calls["seal"] == 25:  # 4 rows of batch 3 written, not committed
            Path(marker).write_text("x"); time.sleep(120)
    return seal(self, table, rid, plaintext)
st._Keys.seal = slow_seal
st.DeviceStore(Path(store_path)).ingest_jsonl(Path(src), scrub)
"""


@pytest.mark.parametrize("where", ["scrub", "write"])
def test_a_writer_killed_mid_batch_leaves_the_last_committed_batch_and_resumes(tmp_path, where):
    src = write_jsonl(tmp_path / "u.jsonl", [{"type": "document", "id": f"d{i:02d}", "text": f"note {i}"} for i in range(50)])
    store_path, marker = tmp_path / "s.sqlite", tmp_path / "marker"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(store_path), str(src), str(marker), where], cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the writer ended before the kill point"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    store = DeviceStore(store_path)
    assert store.documents() == [f"NOTE {i}" for i in range(20)]  # batches 1-2, nothing of batch 3
    assert not store.is_ingested() and store.needs_ingest(src)
    calls = []

    def scrub(texts):
        calls.append(len(texts))
        return [ScrubOutcome(t.upper(), 0, None) for t in texts]
    counts = store.ingest_jsonl(src, scrub)
    assert sum(calls) == 30 and counts["document"] == 30  # resumed at line 21
    assert store.documents() == [f"NOTE {i}" for i in range(50)] and store.is_ingested()
