"""Tests for the on-device store and JSONL ingestion."""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path

import pytest

from client.store import DeviceStore, IngestError, ScrubOutcome
from simulations.personas import DatasetSpec, generate_dataset

_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
SECRET = "alice.secret@example.org"


def email_scrub(texts: list[str]) -> list[ScrubOutcome]:
    """Deterministic test double for the scrub callable: replaces e-mail
    addresses; a text containing the marker QUARANTINE_ME fails with a code."""
    out = []
    for t in texts:
        if "QUARANTINE_ME" in t:
            out.append(ScrubOutcome(None, 0, "analyzer_failed"))
        else:
            new, n = _EMAIL.subn("<EMAIL_ADDRESS>", t)
            out.append(ScrubOutcome(new, n, None))
    return out


def write_jsonl(path: Path, records: list[dict | str]) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


GOOD = [
    {"type": "document", "id": "d0001", "text": f"mail me at {SECRET} today",
     "timestamp": "2026-01-03T10:00:00Z"},
    {"type": "document", "id": "d0002", "text": "no pii here"},
    "",
    {"type": "attribute", "key": "city", "value": "Lisbon"},
    {"type": "interaction", "item": "item_012", "rating": 4, "timestamp": "2026-01-03T10:00:00Z"},
    {"type": "interaction", "item": "item_003", "rating": 2, "timestamp": "2026-01-02T09:00:00+01:00"},
    {"type": "preference", "preferred": "item_003", "other": "item_009"},
    {"type": "task", "id": "t0001", "split": "train", "input": "Write a note.",
     "output": f"Contact {SECRET}."},
    {"type": "task", "id": "t0002", "split": "test", "input": "Write another.", "output": "Done."},
]


@pytest.fixture
def store(tmp_path) -> DeviceStore:
    return DeviceStore(tmp_path / "dev" / "user_000.sqlite")


def test_round_trip_returns_scrubbed_text_only(tmp_path, store):
    counts = store.ingest_jsonl(write_jsonl(tmp_path / "u.jsonl", GOOD), email_scrub)
    assert counts == {"document": 2, "attribute": 1, "interaction": 2, "preference": 1,
                      "task": 2, "quarantined": 0, "scrubbed_entities": 2}
    assert store.is_ingested()
    assert store.documents() == ["mail me at <EMAIL_ADDRESS> today", "no pii here"]
    assert store.tasks("train") == [("Write a note.", "Contact <EMAIL_ADDRESS>.")]
    assert store.tasks("test") == [("Write another.", "Done.")]
    assert store.attributes() == {"city": "Lisbon"}
    # Timestamps normalised to UTC; ordered by time.
    assert store.interactions() == [("item_003", 2, "2026-01-02T08:00:00Z"),
                                     ("item_012", 4, "2026-01-03T10:00:00Z")]
    assert store.preferences() == [("item_003", "item_009")]
    assert store.num_records() == 8
    # Raw PII is nowhere in the database file.
    assert SECRET.encode() not in store.path.read_bytes()


def test_fresh_store_is_not_ingested(store):
    assert not store.is_ingested()
    assert store.num_records() == 0
    assert store.tasks("train") == []


def test_reingest_is_idempotent(tmp_path, store):
    src = write_jsonl(tmp_path / "u.jsonl", GOOD)
    store.ingest_jsonl(src, email_scrub)
    before = (store.documents(), store.tasks("train"), store.interactions(),
              store.preferences(), store.attributes(), store.num_records())
    store.ingest_jsonl(src, email_scrub)
    after = (store.documents(), store.tasks("train"), store.interactions(),
             store.preferences(), store.attributes(), store.num_records())
    assert before == after


def test_reingest_updates_record_and_leaves_quarantine(tmp_path, store):
    first = [{"type": "document", "id": "d1", "text": "QUARANTINE_ME please"}]
    store.ingest_jsonl(write_jsonl(tmp_path / "a.jsonl", first), email_scrub)
    assert store.quarantined() == [("line 1", "analyzer_failed")]
    fixed = [{"type": "document", "id": "d1", "text": "fine now"}]
    store.ingest_jsonl(write_jsonl(tmp_path / "b.jsonl", fixed), email_scrub)
    assert store.quarantined() == []
    assert store.documents() == ["fine now"]


def test_quarantine_never_returns_text(tmp_path, store):
    recs = GOOD + [
        {"type": "document", "id": "d0009", "text": "QUARANTINE_ME my secret"},
        {"type": "task", "id": "t0009", "split": "train", "input": "ok",
         "output": "QUARANTINE_ME hidden"},
    ]
    counts = store.ingest_jsonl(write_jsonl(tmp_path / "u.jsonl", recs), email_scrub)
    assert counts["quarantined"] == 2 and counts["document"] == 2 and counts["task"] == 2
    assert store.quarantined() == [("line 10", "analyzer_failed"), ("line 11", "analyzer_failed")]
    assert all("QUARANTINE_ME" not in d for d in store.documents())
    assert all("QUARANTINE_ME" not in o for _, o in store.tasks("train"))
    assert b"QUARANTINE_ME" not in store.path.read_bytes()


def test_scrubber_error_that_is_not_a_code_is_replaced(tmp_path, store):
    def leaky(texts):
        return [ScrubOutcome(None, 0, f"failed on {t}") for t in texts]
    src = write_jsonl(tmp_path / "u.jsonl", [{"type": "document", "id": "d1", "text": SECRET}])
    store.ingest_jsonl(src, leaky)
    assert store.quarantined() == [("line 1", "scrub_error")]
    assert SECRET.encode() not in store.path.read_bytes()


def test_none_text_without_error_is_quarantined(tmp_path, store):
    src = write_jsonl(tmp_path / "u.jsonl", [{"type": "document", "id": "d1", "text": "x"}])
    store.ingest_jsonl(src, lambda texts: [ScrubOutcome(None, 0, None) for _ in texts])
    assert store.quarantined() == [("line 1", "scrub_no_text")] and store.documents() == []


def test_scrubber_returning_wrong_count_writes_nothing(tmp_path, store):
    src = write_jsonl(tmp_path / "u.jsonl", GOOD)
    with pytest.raises(RuntimeError, match="outcomes"):
        store.ingest_jsonl(src, lambda texts: email_scrub(texts)[:-1])
    assert store.num_records() == 0 and not store.is_ingested()


BAD_LINES = [
    ('{"type":"document","id":"d9","text":"%s","txt":"oops"}' % SECRET, "unknown_field"),
    ('{"type":"document","id":"d9"}', "missing_field:text"),
    ('{"type":"document","id":"d9","text":%s}' % json.dumps(SECRET)[:-3], "invalid_json"),
    ('{"type":"%s","id":"d9"}' % SECRET, "bad_type_field"),
    ('{"type":"interaction","item":"i1","rating":6,"timestamp":"2026-01-01T00:00:00Z"}',
     "out_of_range:rating"),
    ('{"type":"interaction","item":"i1","rating":true,"timestamp":"2026-01-01T00:00:00Z"}',
     "bad_type:rating"),
    ('{"type":"interaction","item":"i1","rating":3,"timestamp":"%s"}' % SECRET,
     "bad_timestamp:timestamp"),
    ('{"type":"interaction","item":"i1","rating":3,"timestamp":"2026-01-01T00:00:00"}',
     "bad_timestamp:timestamp"),
    ('{"type":"task","id":"t9","split":"%s","input":"a","output":"b"}' % SECRET, "bad_split:split"),
    ('{"type":"task","id":"%s","split":"train","input":"a","output":"b"}' % SECRET, "bad_id:id"),
    ('{"type":"document","id":"d0001","text":"%s"}' % SECRET, "duplicate_id:id"),
    ('{"type":"attribute","key":"city","value":"%s"}' % SECRET, "duplicate_attribute:key"),
    ('{"type":"preference","preferred":"item_1","other":"item_1"}', "same_item:other"),
    ('{"type":"document","id":"d9","text":"%s","text":"x"}' % SECRET, "duplicate_key"),
    ('["%s"]' % SECRET, "not_an_object"),
    ('{"type":"document","id":"d9","text":"   "}', "empty:text"),
]


@pytest.mark.parametrize("line,reason", BAD_LINES)
def test_bad_line_names_file_and_line_without_leaking(tmp_path, store, line, reason):
    # GOOD has 9 lines (one blank), so the bad line is line 10.
    src = write_jsonl(tmp_path / "u.jsonl", GOOD + [line])
    with pytest.raises(IngestError) as info:
        store.ingest_jsonl(src, email_scrub)
    err = info.value
    msg = str(err)
    assert err.line == 10 and err.reason == reason and err.path == src
    assert msg.startswith(f"{src}:10: {reason}")
    assert SECRET not in msg and "alice" not in msg and "Lisbon" not in msg
    # No partial write: the good lines before the bad one were not stored.
    assert store.num_records() == 0 and store.quarantined() == [] and not store.is_ingested()


def test_invalid_utf8_is_reported_by_line(tmp_path, store):
    src = tmp_path / "u.jsonl"
    src.write_bytes(b'{"type":"attribute","key":"a","value":"b"}\n\xff\xfe\n')
    with pytest.raises(IngestError, match=r"u\.jsonl:2: invalid_utf8"):
        store.ingest_jsonl(src, email_scrub)


def test_missing_file_is_an_ingest_error(tmp_path, store):
    with pytest.raises(IngestError, match="unreadable_file"):
        store.ingest_jsonl(tmp_path / "nope.jsonl", email_scrub)


def test_error_on_second_ingest_keeps_existing_data(tmp_path, store):
    store.ingest_jsonl(write_jsonl(tmp_path / "a.jsonl", GOOD), email_scrub)
    before = store.num_records()
    bad = write_jsonl(tmp_path / "b.jsonl", [{"type": "document", "id": "z", "text": "new"}, "{"])
    with pytest.raises(IngestError):
        store.ingest_jsonl(bad, email_scrub)
    assert store.num_records() == before and "new" not in store.documents()


def test_a_small_file_is_scrubbed_in_one_batch_attribute_values_included(tmp_path, store):
    calls = []

    def counting(texts):
        calls.append(list(texts))
        return email_scrub(texts)
    store.ingest_jsonl(write_jsonl(tmp_path / "u.jsonl", GOOD), counting)
    # 2 documents, the attribute value, 2 tasks x (input, output).
    assert len(calls) == 1 and len(calls[0]) == 2 + 1 + 2 * 2 and "Lisbon" in calls[0]


def test_state_put_get_and_persistence(store):
    assert store.get_state("adapter") is None
    store.put_state("adapter", b"\x00\x01weights")
    store.put_state("adapter", b"v2")
    store.put_state("accountant", bytearray(b"eps"))
    again = DeviceStore(store.path)
    assert again.get_state("adapter") == b"v2"
    assert again.get_state("accountant") == b"eps"
    with pytest.raises(TypeError):
        store.put_state("x", "not bytes")  # type: ignore[arg-type]


def test_invalid_split_rejected(store):
    with pytest.raises(ValueError):
        store.tasks("validation")


def test_schema_mismatch_is_refused(tmp_path):
    path = tmp_path / "s.sqlite"
    DeviceStore(path)
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE meta SET value = '999' WHERE key = 'schema_version'")
    with pytest.raises(RuntimeError, match="schema version"):
        DeviceStore(path)


def test_generated_corpus_ingests_cleanly(tmp_path):
    """The persona generator's files are valid input for the store."""
    manifest = generate_dataset(tmp_path / "corpus", DatasetSpec(num_users=3, num_personas=3))
    for entry in manifest["users"]:
        st = DeviceStore(tmp_path / "dev" / f"{entry['user_id']}.sqlite")
        counts = st.ingest_jsonl(tmp_path / "corpus" / entry["file"], email_scrub)
        c = entry["counts"]
        assert counts["task"] == c["train_task"] + c["test_task"]
        assert counts["document"] == c["document"] and counts["quarantined"] == 0
        assert len(st.tasks("test")) == c["test_task"]
        assert all("@" not in o for _, o in st.tasks("train"))


# -- incremental ingestion ------------------------------------------------------------

def append(path: Path, records: list[dict | str]) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))


def counting_scrub(calls: list):
    def scrub(texts):
        calls.append(list(texts))
        return email_scrub(texts)
    return scrub


def test_appended_lines_are_ingested_on_the_next_call_and_only_they_are_scrubbed(tmp_path, store):
    src = write_jsonl(tmp_path / "u.jsonl", GOOD)
    store.ingest_jsonl(src, email_scrub)
    append(src, [{"type": "document", "id": "d0003", "text": f"new note to {SECRET}"},
                 {"type": "interaction", "item": "item_044", "rating": 5, "timestamp": "2026-02-01T00:00:00Z"}])
    assert store.needs_ingest(src)
    calls: list = []
    counts = store.ingest_jsonl(src, counting_scrub(calls))
    assert calls == [[f"new note to {SECRET}"]]
    assert counts["document"] == 1 and counts["interaction"] == 1 and counts["task"] == 0
    assert store.documents()[-1] == "new note to <EMAIL_ADDRESS>" and store.num_records() == 10
    assert not store.needs_ingest(src)


def test_an_unchanged_file_is_neither_parsed_nor_scrubbed_nor_read_in_full(tmp_path, store, monkeypatch):
    import client.jsonl
    import client.store

    src = write_jsonl(tmp_path / "u.jsonl", GOOD)
    store.ingest_jsonl(src, email_scrub)

    def forbidden(*args, **kwargs):
        raise AssertionError("an unchanged file was parsed or read in full")
    monkeypatch.setattr(client.jsonl, "parse_line", forbidden)
    monkeypatch.setattr(client.store, "_read_range", forbidden)
    assert not store.needs_ingest(src)
    assert store.ingest_jsonl(src, forbidden)["document"] == 0
    assert store.ingest_jsonl(src, forbidden)["quarantined"] == 0


def test_an_edited_prefix_is_ingested_again_from_line_1_idempotently(tmp_path, store):
    src = write_jsonl(tmp_path / "u.jsonl", GOOD)
    store.ingest_jsonl(src, email_scrub)
    edited = [dict(GOOD[1], text="edited, no pii here")] + GOOD[:1] + GOOD[2:]
    write_jsonl(src, edited)
    calls: list = []
    store.ingest_jsonl(src, counting_scrub(calls))
    assert len(calls[0]) == 7  # the whole file again
    assert sorted(store.documents()) == ["edited, no pii here", "mail me at <EMAIL_ADDRESS> today"]
    assert store.num_records() == 8
    # Touching the file (same bytes, new mtime) re-checks the prefix but ingests nothing.
    import os
    os.utime(src, ns=(1, 1))
    assert store.needs_ingest(src)
    assert store.ingest_jsonl(src, counting_scrub(calls))["document"] == 0 and len(calls) == 1
    assert not store.needs_ingest(src)


def test_a_last_line_without_newline_that_grows_is_handled(tmp_path, store):
    src = tmp_path / "u.jsonl"
    src.write_text(json.dumps(GOOD[1]), encoding="utf-8")  # no trailing newline
    store.ingest_jsonl(src, email_scrub)
    with src.open("a", encoding="utf-8") as f:
        f.write("\n" + json.dumps({"type": "document", "id": "d0003", "text": "later"}) + "\n")
    store.ingest_jsonl(src, email_scrub)
    assert store.documents() == ["no pii here", "later"] and store.num_records() == 2


def test_a_duplicate_of_an_ingested_record_in_appended_lines_rejects_that_region(tmp_path, store):
    src = write_jsonl(tmp_path / "u.jsonl", GOOD)
    store.ingest_jsonl(src, email_scrub)
    append(src, [{"type": "document", "id": "d0100", "text": "fine"},
                 {"type": "document", "id": "d0001", "text": "a second d0001"}])
    with pytest.raises(IngestError) as info:
        store.ingest_jsonl(src, email_scrub)
    assert (info.value.line, info.value.reason) == (11, "duplicate_id:id")
    assert "fine" not in store.documents() and store.num_records() == 8  # nothing of the region
    # The owner fixes the line; the region goes in.
    lines = src.read_text().splitlines()
    src.write_text("\n".join(lines[:-1] + [json.dumps({"type": "document", "id": "d0101", "text": "ok"})]) + "\n")
    store.ingest_jsonl(src, email_scrub)
    assert store.documents()[-2:] == ["fine", "ok"]


def test_large_files_go_in_bounded_batches_each_committed_with_progress(tmp_path, store, monkeypatch, caplog):
    import logging

    import client.store

    monkeypatch.setattr(client.store, "BATCH_LINES", 4)
    recs = [{"type": "document", "id": f"d{i:03d}", "text": f"note {i}"} for i in range(10)]
    src = write_jsonl(tmp_path / "u.jsonl", recs)
    calls: list = []
    seen: list = []
    with caplog.at_level(logging.INFO, logger="client.store"):
        store.ingest_jsonl(src, counting_scrub(calls), progress=lambda *a: seen.append(a))
    assert [len(c) for c in calls] == [4, 4, 2]
    # A device logs one line per batch: the file's name and line numbers, never its text.
    batches = [r.getMessage() for r in caplog.records if "committed lines" in r.getMessage()]
    assert batches == [f"u.jsonl: committed lines up to {n} ({k} records)" for n, k in ((4, 4), (8, 4), (10, 2))]
    assert "note" not in caplog.text
    size = src.stat().st_size
    assert [p for p in seen if p[0] == "ingest"][-1] == ("ingest", size, size)
    assert store.documents() == [f"note {i}" for i in range(10)]


# -- bad input ---------------------------------------------------------------------------

@pytest.mark.parametrize("content,line,reason,hint", [
    (b"", None, "empty_file", "no record"),
    (b"\n  \n\n", None, "empty_file", "no record"),
    (b"\xef\xbb\xbf" + json.dumps(GOOD[1]).encode() + b"\n", 1, "utf8_bom", "byte order mark"),
    ((json.dumps(GOOD[1]) + "\r" + json.dumps(GOOD[3]) + "\r").encode(), 1, "cr_line_endings", "CR only"),
    (json.dumps(GOOD[1]).encode("utf-16"), 1, "invalid_utf8", "UTF-16"),
    (json.dumps(GOOD[1]).encode() + b"\n" + '{"type":"document","id":"d9","text":"caf\u00e9"}'.encode("latin-1") + b"\n",
     2, "invalid_utf8", "UTF-8"),
    (b'{"type":"interaction","item":"i1","rating":1' + b"0" * 5000 + b',"timestamp":"2026-01-01T00:00:00Z"}\n',
     1, "invalid_number", "too many digits"),
    (b'{"type":"interaction","item":"i1","rating":NaN,"timestamp":"2026-01-01T00:00:00Z"}\n', 1, "invalid_number", "NaN"),
    (b"[" * 100_000 + b"]" * 100_000 + b"\n", 1, "too_deep", "nested"),
])
def test_bad_files_name_file_line_and_reason_and_write_nothing(tmp_path, store, content, line, reason, hint):
    src = tmp_path / "u.jsonl"
    src.write_bytes(content)
    with pytest.raises(IngestError) as info:
        store.ingest_jsonl(src, email_scrub)
    assert (info.value.line, info.value.reason) == (line, reason)
    where = f"{src}:{line}" if line else f"{src}"
    assert str(info.value).startswith(f"{where}: {reason}") and hint in str(info.value)
    assert store.num_records() == 0 and not store.is_ingested()


def test_file_and_line_size_caps(tmp_path, store, monkeypatch):
    import client.jsonl
    import client.store

    src = write_jsonl(tmp_path / "u.jsonl", GOOD)
    monkeypatch.setattr(client.store, "MAX_FILE_BYTES", 100)
    with pytest.raises(IngestError, match=r"u\.jsonl: file_too_large \(a user file is at most"):
        store.ingest_jsonl(src, email_scrub)
    monkeypatch.undo()
    monkeypatch.setattr(client.jsonl, "MAX_LINE_BYTES", 100)
    with pytest.raises(IngestError, match=r"u\.jsonl:1: line_too_long"):
        store.ingest_jsonl(src, email_scrub)
    assert store.num_records() == 0


def test_the_default_caps_let_a_50_mb_file_through():
    from client.jsonl import MAX_LINE_BYTES, MAX_TEXT_CHARS

    from client.store import MAX_FILE_BYTES
    assert MAX_FILE_BYTES >= 50 * 1000 * 1000 and MAX_LINE_BYTES > 2 * 6 * MAX_TEXT_CHARS + 1000


def test_over_long_texts_are_quarantined_and_the_rest_is_used(tmp_path, store):
    recs = GOOD + [
        {"type": "document", "id": "d0010", "text": "x" * 20_001},
        {"type": "attribute", "key": "bio", "value": "y" * 1_001},
        {"type": "task", "id": "t0010", "split": "train", "input": "ok", "output": "z" * 20_001},
    ]
    counts = store.ingest_jsonl(write_jsonl(tmp_path / "u.jsonl", recs), email_scrub)
    assert counts["quarantined"] == 3 and counts["document"] == 2 and counts["attribute"] == 1
    assert store.quarantined() == [("line 10", "too_long:text"), ("line 11", "too_long:value"),
                                   ("line 12", "too_long:output")]
    assert store.num_records() == 8 and store.attributes() == {"city": "Lisbon"}


def test_attribute_values_are_scrubbed(tmp_path, store):
    recs = [{"type": "attribute", "key": "contact", "value": f"write to {SECRET}"},
            {"type": "attribute", "key": "broken", "value": "QUARANTINE_ME"}]
    store.ingest_jsonl(write_jsonl(tmp_path / "u.jsonl", recs), email_scrub)
    assert store.attributes() == {"contact": "write to <EMAIL_ADDRESS>"}
    assert store.quarantined() == [("line 2", "analyzer_failed")]
