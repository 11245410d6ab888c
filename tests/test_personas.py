"""Tests for the embedded persona corpus generator."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from simulations.personas import PERSONAS, PII_TYPES, DatasetSpec, generate_dataset

SMALL = DatasetSpec(num_users=8, num_personas=4, seed=3)


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("corpus")
    return out, generate_dataset(out, SMALL)


def _users(out: Path, manifest: dict) -> dict[str, list[dict]]:
    return {u["user_id"]: _read_jsonl(out / u["file"]) for u in manifest["users"]}


def test_same_spec_gives_byte_identical_files(tmp_path, corpus):
    out, _ = corpus
    generate_dataset(tmp_path / "again", SMALL)
    assert _tree_bytes(out) == _tree_bytes(tmp_path / "again")


def test_different_seed_changes_output(tmp_path, corpus):
    out, _ = corpus
    generate_dataset(tmp_path / "other", DatasetSpec(num_users=8, num_personas=4, seed=4))
    assert _tree_bytes(out) != _tree_bytes(tmp_path / "other")


def test_layout_and_manifest(corpus):
    out, manifest = corpus
    assert json.loads((out / "manifest.json").read_text()) == manifest
    ids = [u["user_id"] for u in manifest["users"]]
    assert ids == [f"user_{i:03d}" for i in range(8)]
    assert sorted(p.name for p in (out / "users").iterdir()) == [f"{i}.jsonl" for i in ids]
    # Balanced persona assignment: 8 users over 4 personas -> 2 each.
    assert Counter(u["persona"] for u in manifest["users"]) == {0: 2, 1: 2, 2: 2, 3: 2}
    assert manifest["spec"]["seed"] == 3


def test_every_user_has_all_record_kinds_and_counts_match(corpus):
    out, manifest = corpus
    users = _users(out, manifest)
    sizes = set()
    for entry in manifest["users"]:
        recs = users[entry["user_id"]]
        kinds = Counter(r["type"] for r in recs)
        assert set(kinds) == {"document", "attribute", "interaction", "preference", "task"}
        splits = Counter(r["split"] for r in recs if r["type"] == "task")
        c = entry["counts"]
        assert (kinds["document"], kinds["attribute"], kinds["interaction"], kinds["preference"]) \
            == (c["document"], c["attribute"], c["interaction"], c["preference"])
        assert (splits["train"], splits["test"]) == (c["train_task"], c["test_task"])
        assert splits["test"] == SMALL.test_tasks
        sizes.add(len(recs))
        attrs = {r["key"]: r["value"] for r in recs if r["type"] == "attribute"}
        assert {"age_band", "city", "first_name", "preferred_tags"} <= set(attrs)
        for r in recs:
            if r["type"] == "interaction":
                assert 1 <= r["rating"] <= 5
            if _styled(r):
                assert r["input"].startswith("Write a short note about ")
    assert len(sizes) > 1, "users should not all have the same amount of data"


def test_personas_have_distinct_styles(corpus):
    out, manifest = corpus
    users = _users(out, manifest)
    openers: dict[int, set[str]] = {}
    closers: dict[int, set[str]] = {}
    for entry in manifest["users"]:
        persona = PERSONAS[entry["persona"]]
        for r in users[entry["user_id"]]:
            if _styled(r):
                text = r["output"]
                expected_open = persona.opener.lower() if persona.lowercase else persona.opener
                assert text.startswith(expected_open)
                openers.setdefault(entry["persona"], set()).add(text.split(" ")[0])
                closers.setdefault(entry["persona"], set()).add(text.split(" ")[-1])
                if persona.lowercase and r["split"] == "test":
                    assert text == text.lower()
    assert len(openers) == SMALL.num_personas
    # Each persona uses a single opener/closer token, and no two personas share one.
    for table in (openers, closers):
        assert all(len(v) == 1 for v in table.values())
        firsts = [next(iter(v)) for v in table.values()]
        assert len(set(firsts)) == len(firsts)


def test_user_signatures_are_unique_and_present(corpus):
    out, manifest = corpus
    users = _users(out, manifest)
    sigs = [u["signature"] for u in manifest["users"]]
    assert len(set(sigs)) == len(sigs)
    for entry in manifest["users"]:
        outputs = [r["output"] for r in users[entry["user_id"]] if _styled(r)]
        assert all(entry["signature"] in o for o in outputs)
        # A signature never appears in another user's outputs.
        others = [s for s in sigs if s != entry["signature"]]
        assert not any(s in o for s in others for o in outputs)


def test_preferences_follow_persona(corpus):
    out, manifest = corpus
    users = _users(out, manifest)
    items = manifest["items"]
    for entry in manifest["users"]:
        liked = manifest["personas"][entry["persona"]]["liked_category"]
        recs = users[entry["user_id"]]
        prefs = [r for r in recs if r["type"] == "preference"]
        assert prefs and all(items[p["preferred"]] == liked != items[p["other"]] for p in prefs)
        good = [r["rating"] for r in recs if r["type"] == "interaction" and items[r["item"]] == liked]
        bad = [r["rating"] for r in recs if r["type"] == "interaction" and items[r["item"]] != liked]
        assert sum(good) / max(len(good), 1) > sum(bad) / max(len(bad), 1)


def test_sidecar_offsets_are_exact_and_share_is_respected(corpus):
    out, manifest = corpus
    users = _users(out, manifest)
    side = _read_jsonl(out / "pii_sidecar.jsonl")
    assert side, "pii_share=0.3 must plant some PII"
    by_id = {(uid, r["id"]): r for uid, recs in users.items() for r in recs if "id" in r}
    for row in side:
        rec = by_id[(row["user_id"], row["record_id"])]
        text = rec[row["field"]]
        assert text[row["start"]:row["end"]] == row["value"]
        assert row["entity_type"] in PII_TYPES
        assert rec["type"] == "document" or rec["split"] == "train"
    assert {row["entity_type"] for row in side} == set(PII_TYPES)
    for uid, recs in users.items():
        docs = [r for r in recs if r["type"] == "document"]
        with_pii = {row["record_id"] for row in side if row["user_id"] == uid}
        assert len([d for d in docs if d["id"] in with_pii]) == round(SMALL.pii_share * len(docs))


def test_test_split_free_of_planted_pii(corpus):
    out, manifest = corpus
    users = _users(out, manifest)
    values = {row["value"] for row in _read_jsonl(out / "pii_sidecar.jsonl")}
    for recs in users.values():
        for r in recs:
            if r["type"] == "task" and r["split"] == "test":
                assert not any(v in r["output"] or v in r["input"] for v in values)


def test_zero_pii_share_plants_nothing(tmp_path):
    generate_dataset(tmp_path, DatasetSpec(num_users=3, num_personas=3, pii_share=0.0, canary_users=0))
    assert (tmp_path / "pii_sidecar.jsonl").read_text() == ""


def _styled(record: dict) -> bool:
    """A persona-styled task (canary tasks, ids c0001..., have their own fixed frame)."""
    return record["type"] == "task" and not record["id"].startswith("c")


def test_canaries_are_planted_in_frequent_users_and_listed_as_pii(corpus):
    out, manifest = corpus
    users = _users(out, manifest)
    with_canary = [u for u in manifest["users"] if u.get("canary")]
    assert len(with_canary) == SMALL.canary_users
    side = [json.loads(line) for line in (out / "pii_sidecar.jsonl").read_text().splitlines()]
    for entry in with_canary:
        assert entry["volume"] == "frequent" and re.fullmatch(r"[2-9]\d\d-[2-9]\d\d-\d{4}", entry["canary"])
        canary_tasks = [r for r in users[entry["user_id"]] if r["type"] == "task" and r["id"].startswith("c")]
        assert len(canary_tasks) == SMALL.canary_repeats
        assert all(r["split"] == "train" and r["output"] == f"My secret number is {entry['canary']}." for r in canary_tasks)
        # The wire audit scans for every sidecar value, canaries included.
        assert sum(row["value"] == entry["canary"] for row in side) == SMALL.canary_repeats
    assert len({u["canary"] for u in with_canary}) == len(with_canary)


def test_holdout_users_never_change_the_participants(tmp_path, corpus):
    _, manifest = corpus
    spec = DatasetSpec(**{**SMALL.__dict__, "holdout_users": 3})
    more = generate_dataset(tmp_path / "h", spec)
    assert more["users"][: SMALL.num_users] == manifest["users"]
    held = more["users"][SMALL.num_users :]
    assert len(held) == 3 and all(u["holdout"] and not u.get("canary") for u in held)
    assert not any(u["holdout"] for u in manifest["users"])


def test_outputs_stay_short(corpus):
    out, manifest = corpus
    for recs in _users(out, manifest).values():
        for r in recs:
            if r["type"] == "task":
                # Rough word budget keeping input+output under ~64 tokens.
                assert len(r["output"].split()) <= 32


@pytest.mark.parametrize("bad", [
    {"num_personas": 2}, {"num_personas": 6}, {"pii_share": 1.5},
    {"num_users": 2, "num_personas": 3}, {"train_tasks": 0},
])
def test_invalid_spec_rejected(tmp_path, bad):
    with pytest.raises(ValueError):
        generate_dataset(tmp_path, DatasetSpec(**bad))


def test_refuses_to_clobber_foreign_directory(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(ValueError, match="refusing"):
        generate_dataset(tmp_path, DatasetSpec(num_users=3, num_personas=3))
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_regeneration_removes_stale_users(tmp_path):
    generate_dataset(tmp_path, DatasetSpec(num_users=6, num_personas=3))
    generate_dataset(tmp_path, DatasetSpec(num_users=3, num_personas=3))
    assert len(list((tmp_path / "users").iterdir())) == 3


AUDITED = DatasetSpec(**{**SMALL.__dict__, "audit_canaries": 40, "audit_seed": 11})


def _without_audit_canaries(root: Path) -> dict[str, bytes]:
    """The user files with the one-run audit canaries (ids a...) taken out."""
    out = {}
    for path in sorted((root / "users").glob("*.jsonl")):
        lines = path.read_text(encoding="utf-8").splitlines()
        out[path.name] = "\n".join(line for line in lines if not str(json.loads(line).get("id", "")).startswith("a")).encode()
    return out


def test_audit_canaries_are_fair_coins_and_excluded_ones_exist_only_in_the_manifest(tmp_path):
    from simulations.personas import AUDIT_INPUT, planted_task

    manifest = generate_dataset(tmp_path, AUDITED)
    assert manifest["audit_canaries"]["seed"] == 11 == manifest["spec"]["audit_seed"]
    users = _users(tmp_path, manifest)
    holders = [u for u in manifest["users"] if u.get("audit_canaries")]
    assert [u["user_id"] for u in holders] == [u["user_id"] for u in manifest["users"] if u.get("canary")]
    every_file = "".join((tmp_path / u["file"]).read_text(encoding="utf-8") for u in manifest["users"])
    for entry in holders:
        canaries = entry["audit_canaries"]
        assert len(canaries) == 40 and len({c["output"] for c in canaries}) == 40
        assert all(re.fullmatch(r"the [a-z]+(, the [a-z]+){5}\.", c["output"]) and c["input"] == AUDIT_INPUT for c in canaries)
        planted = {r["id"]: r for r in users[entry["user_id"]] if planted_task(r) and r["id"].startswith("a")}
        included = [c for c in canaries if c["included"]]
        assert set(planted) == {c["id"] for c in included}
        assert all(planted[c["id"]] == {"type": "task", "id": c["id"], "split": "train", "input": c["input"], "output": c["output"]} for c in included)
        assert not any(c["output"] in every_file for c in canaries if not c["included"])
        tasks = [r for r in users[entry["user_id"]] if r["type"] == "task" and r["split"] == "train"]
        assert len(tasks) == entry["counts"]["train_task"]
    # Fair coins: 80 flips, included share well inside a 99.99% binomial interval.
    flips = [c["included"] for u in holders for c in u["audit_canaries"]]
    assert 22 <= sum(flips) <= 58


def test_audit_canaries_leave_the_persona_data_unchanged(tmp_path, corpus):
    out, _ = corpus
    generate_dataset(tmp_path / "a", AUDITED)
    generate_dataset(tmp_path / "b", AUDITED)
    assert _tree_bytes(tmp_path / "a") == _tree_bytes(tmp_path / "b")  # deterministic for (seed, audit seed)
    fresh = [generate_dataset(tmp_path / f"os{i}", DatasetSpec(**{**AUDITED.__dict__, "audit_seed": None})) for i in range(2)]
    assert fresh[0]["audit_canaries"]["seed"] != fresh[1]["audit_canaries"]["seed"]  # drawn from OS entropy
    for root in (tmp_path / "a", tmp_path / "os0", tmp_path / "os1"):
        assert _without_audit_canaries(root) == _without_audit_canaries(out)
        assert (root / "pii_sidecar.jsonl").read_bytes() == (out / "pii_sidecar.jsonl").read_bytes()


@pytest.mark.slow
def test_audit_phrases_survive_the_scrubber():
    """The device stores scrubbed text: an audit phrase the scrubber changed would be a different record."""
    import random

    from client.pii import Scrubber
    from simulations.personas import audit_phrase

    rng = random.Random(0)
    phrases = [audit_phrase(rng) for _ in range(400)]
    for mode in ("full", "patterns"):
        outcomes = Scrubber.from_config(mode=mode)(phrases)
        assert [o.text for o in outcomes] == phrases
