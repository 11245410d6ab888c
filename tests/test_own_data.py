"""Bring your own per-user data: a folder of user files, and per-annotator label data as users."""

from __future__ import annotations

import json

import pytest

from simulations.annotators import AnnotatorDataError, read_long, read_wide, write_users
from simulations.run import DataFolderError, prepare

WIDE = """id,text,label_M_1,label_F_2,label_M_3
1,great day for a walk,Positive,Positive,Negative
2,this is awful,Negative,Negative,Negative
3,not sure about this,Negative,Positive,Negative
4,what a lovely gift,Positive,Positive,Positive
"""


def _wide(tmp_path, rows=12):
    lines = WIDE.strip().splitlines()
    body = [f"{i},text number {i} is {'good' if i % 2 else 'bad'},{'Positive' if i % 2 else 'Negative'},{'Positive' if i % 3 else 'Negative'},Negative" for i in range(5, 5 + rows)]
    path = tmp_path / "wide.csv"
    path.write_text("\n".join(lines + body) + "\n")
    return path


def test_wide_annotator_csv_becomes_one_user_per_annotator_with_groups(tmp_path):
    data = read_wide(_wide(tmp_path))
    assert sorted(data.labels) == ["1", "2", "3"] and data.attributes["2"] == {"gender": "F"}
    manifest = write_users(data, tmp_path / "out", test_share=0.25, seed=0)
    assert manifest["options"] == ["Negative", "Positive"] and len(manifest["users"]) == 3
    user = manifest["users"][1]
    assert user["groups"] == {"gender": "F"}
    records = [json.loads(line) for line in (tmp_path / "out" / user["file"]).read_text().splitlines()]
    tasks = [r for r in records if r["type"] == "task"]
    assert {r["split"] for r in tasks} == {"train", "test"} and sum(r["split"] == "test" for r in tasks) == 4
    assert all(r["options"] == ["Negative", "Positive"] and r["output"] in r["options"] and "Options: Negative, Positive" in r["input"] for r in tasks)
    assert {"type": "attribute", "key": "gender", "value": "F"} in records
    # The split is seeded per annotator: the same seed gives the same split.
    again = write_users(data, tmp_path / "again", test_share=0.25, seed=0)
    assert (tmp_path / "again" / again["users"][1]["file"]).read_text() == (tmp_path / "out" / user["file"]).read_text()


def test_long_layout_and_errors_name_file_and_line_not_content(tmp_path):
    texts = tmp_path / "texts.csv"
    texts.write_text("id,text\n1,first\n2,second\n")
    labels = tmp_path / "labels.csv"
    labels.write_text("text_id,annotator,label\n1,a,yes\n2,a,no\n1,b,no\n")
    people = tmp_path / "people.csv"
    people.write_text("annotator,gender\na,F\nb,M\n")
    data = read_long(texts, labels, people)
    assert data.labels == {"a": {"1": "yes", "2": "no"}, "b": {"1": "no"}} and data.attributes["b"] == {"gender": "M"}
    labels.write_text("text_id,annotator,label\n1,a,yes\n99,a,SECRET-LABEL\n")
    with pytest.raises(AnnotatorDataError, match=r"labels.csv:3: unknown text id") as err:
        read_long(texts, labels)
    assert "SECRET" not in str(err.value)


def test_a_data_folder_is_validated_whole_before_anything_is_written(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "alice.jsonl").write_text('{"type":"task","id":"t1","split":"train","input":"a","output":"b"}\n')
    (folder / "bob.jsonl").write_text('{"type":"task","id":"t1","split":"train","input":"Jane Doe 555-0100","output":"b","oops":1}\n')
    with pytest.raises(DataFolderError) as err:
        prepare("quick", {}, tmp_path / "run", data=folder)
    assert "bob.jsonl:1: unknown_field" in str(err.value) and "Jane" not in str(err.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_simulate_on_annotator_data_reports_accuracy_f1_and_groups(tmp_path):
    from simulations.run import simulate

    write_users(read_wide(_wide(tmp_path, rows=20)), tmp_path / "ann", test_share=0.25, seed=0)
    harness = prepare("quick", {"scrub-mode": "patterns", "persona-slots": 2, "num-server-rounds": 1}, tmp_path / "run", data=tmp_path / "ann")
    assert harness["run"]["num-supernodes"] == 3 and [d["user_id"] for d in harness["devices"]] == ["annotator_1", "annotator_2", "annotator_3"]
    report = simulate(harness)
    c = report["utility"]["classification"]
    assert c["users"] == 3 and 0 <= c["base"]["accuracy"] <= 1 and 0 <= c["served"]["macro_f1"] <= 1
    assert set(report["utility"]["by_group"]["gender"]) == {"F", "M"}
    assert "diagnostics" not in report  # no persona ground truth for annotators
