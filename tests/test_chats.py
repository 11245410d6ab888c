"""Chat conversations as per-user reply tasks (simulations/chats.py, ``fedpersona import-chats``)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from simulations.chats import OPENING, REPLY, ChatDataError, read_turns, write_users
from simulations.run import validate_folder


def _message(sender: str, text: str) -> dict:
    return {"text": text, "sender": sender, "timestamp": "2018-05-02T19:38:15Z"}


def _conversations(tmp_path, turns_each: int = 12):
    """Two conversations: ann and bob talk, then ann and cy; every turn names its sender and number."""
    data = {}
    for key, (a, b) in {"c1": ("ann", "bob"), "c2": ("cy", "ann")}.items():
        turns = []
        for i in range(turns_each):
            sender = (a, b)[i % 2]
            turns.append([_message(sender, f"{sender} {key} line {i}"), _message(sender, f"{sender} {key} more {i}")])
        data[key] = {"messages": turns, "ratings": {}}
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps(data))
    return path


def test_each_sender_replies_to_the_other_sides_previous_turn(tmp_path):
    turns = read_turns(_conversations(tmp_path))
    assert sorted(turns) == ["ann", "bob", "cy"] and len(turns["ann"]) == 12 and len(turns["bob"]) == 6
    assert turns["ann"][0] == (OPENING, "ann c1 line 0\nann c1 more 0")
    assert turns["bob"][0] == (REPLY + "ann c1 line 0\nann c1 more 0", "bob c1 line 1\nbob c1 more 1")
    assert turns["ann"][6] == (REPLY + "cy c2 line 0\ncy c2 more 0", "ann c2 line 1\nann c2 more 1")


def test_write_users_keeps_eligible_senders_with_a_seeded_split_and_a_valid_folder(tmp_path):
    turns = read_turns(_conversations(tmp_path))
    manifest = write_users(turns, tmp_path / "out", min_turns=6, max_turns=10, seed=3)
    assert [u["sender"] for u in manifest["users"]] == ["ann", "bob", "cy"]
    assert [u["turns"] for u in manifest["users"]] == [10, 6, 6]
    records = [json.loads(line) for line in (tmp_path / "out" / manifest["users"][0]["file"]).read_text().splitlines()]
    assert [r["output"] for r in records] == [out for _, out in turns["ann"][:10]]
    assert sum(r["split"] == "test" for r in records) == 2 and {r["type"] for r in records} == {"task"}
    assert [p["user_id"] for p in validate_folder(tmp_path / "out")] == [u["user_id"] for u in manifest["users"]]
    # The same seed gives the same split; the sample of senders is seeded too.
    again = write_users(turns, tmp_path / "again", min_turns=6, max_turns=10, seed=3)
    assert (tmp_path / "again" / again["users"][0]["file"]).read_text() == (tmp_path / "out" / manifest["users"][0]["file"]).read_text()
    assert len(write_users(turns, tmp_path / "two", min_turns=6, users=2, seed=1)["users"]) == 2
    assert [u["sender"] for u in write_users(turns, tmp_path / "many", min_turns=7)["users"]] == ["ann"]


@pytest.mark.parametrize("body, reason", [
    ('{"c1": {"messages": [[{"text": "SECRET words", "sender": "a"}, {"text": "x", "sender": "b"}]]}}', "conversation 1, turn 1: mixed_senders"),
    ('{"c1": {"nope": 1}}', "conversation 1: missing_field:messages"),
    ('{"c1": {"messages": [[{"text": "SECRET words"}]]}}', "conversation 1, turn 1: missing_field:sender_or_text"),
    ('{"c1": {"messages": []},\n "c2": SECRET}', ":2: invalid_json"),
    ('[]', "not_an_object_of_conversations"),
])
def test_bad_chat_data_names_the_file_and_place_never_the_text(tmp_path, body, reason):
    path = tmp_path / "chats.json"
    path.write_text(body)
    with pytest.raises(ChatDataError) as err:
        read_turns(path)
    assert str(path) in str(err.value) and reason in str(err.value) and "SECRET" not in str(err.value)


def test_the_cli_imports_chats_and_reports_bad_data_with_exit_code_2(tmp_path):
    from simulations.cli import app

    runner = CliRunner()
    ok = runner.invoke(app, ["import-chats", str(tmp_path / "out"), str(_conversations(tmp_path)), "--min-turns", "6"])
    assert ok.exit_code == 0 and "3 participants" in ok.output
    bad = tmp_path / "bad.json"
    bad.write_text('{"c1": {"messages": [[{"text": "SECRET", "sender": "a"}, {"text": "y", "sender": "b"}]]}}')
    failed = runner.invoke(app, ["import-chats", str(tmp_path / "out2"), str(bad)])
    assert failed.exit_code == 2 and "mixed_senders" in failed.output and "SECRET" not in failed.output
