"""The error channel is a wire too: a failure crosses as a reason code, never as an exception's text.

Flower sends a ClientApp's exception text to the SuperLink as an Error reply,
past the egress guard and the wire recorder. Here a planted value and a device
path sit in the failures; neither may reach the server, its report, or the
wire recording.
"""

from __future__ import annotations

import json

import pytest
from flwr.app import ConfigRecord
from helpers import LoopbackGrid, device_context, quick, strategy_for, user_files

from client.app import make_app
from common.wire import REFUSAL, Reason
from simulations.wire_recorder import recorder_mod

PLANTED = "Jane Q. Planted, 555-0199"


def _run_round(cfg, contexts, wire_dir, tmp_path):
    from server.report import build_report

    app = make_app([recorder_mod(wire_dir)])
    strategy = strategy_for(cfg)
    grid = LoopbackGrid(app, contexts)
    from helpers import initial_arrays

    replies = grid.send_and_receive(strategy.configure_train(1, initial_arrays(cfg), ConfigRecord(), grid))
    strategy.aggregate_train(1, replies)
    report = json.dumps(build_report(cfg, strategy, 0.0, 1))
    wire = b"".join(p.read_bytes() for p in sorted(wire_dir.glob("*.bin")))
    return strategy, replies, report, wire


def test_a_crash_in_training_crosses_as_a_reason_code_only(tiny_data, task_identity, tmp_path, monkeypatch):
    from client import app as client_app

    cfg = quick(secagg=False, persona_slots=0, num_supernodes=3)
    contexts = {10 + i: device_context(tmp_path, 10 + i, f, cfg) for i, f in enumerate(user_files(tiny_data))}
    secret_path = str(tmp_path / "device-10" / "store.sqlite")

    def crash(*args, **kwargs):
        raise RuntimeError(f"third-party failure while reading {PLANTED} from {secret_path}")

    monkeypatch.setattr(client_app, "train_local", crash)
    strategy, replies, report, wire = _run_round(cfg, contexts, tmp_path / "wire", tmp_path)
    assert all(set(r.content.keys()) == {REFUSAL} for r in replies) and not any(r.has_error() for r in replies)
    assert strategy.rounds[1]["refused"] == {"DEVICE_ERROR": 3} and strategy.rounds[1]["contributors"] == 0
    for text in (PLANTED, "555-0199", secret_path, "third-party"):
        assert text not in report
        assert text.encode() not in wire and text.encode("utf-16-le") not in wire
    assert wire  # the refusals were recorded: the recorder sees what leaves


def test_a_bad_user_file_is_an_ingest_refusal_without_its_path_or_content(tiny_data, task_identity, tmp_path, caplog):
    cfg = quick(secagg=False, persona_slots=0, scrub_mode="patterns", num_supernodes=3)
    bad = tmp_path / "private-folder" / "bad_user_001.jsonl"
    bad.parent.mkdir()
    good = user_files(tiny_data)[0].read_text().splitlines()
    bad.write_text("\n".join(good[:5] + [json.dumps({"type": "document", "id": "d9", "text": PLANTED, "unknown_field": PLANTED})] + good[5:]) + "\n")
    contexts = {20: device_context(tmp_path, 20, bad, cfg), 21: device_context(tmp_path, 21, user_files(tiny_data)[1], cfg), 22: device_context(tmp_path, 22, user_files(tiny_data)[2], cfg)}
    strategy, replies, report, wire = _run_round(cfg, contexts, tmp_path / "wire", tmp_path)
    assert strategy.rounds[1]["refused"] == {"INGEST_ERROR": 1} and strategy.rounds[1]["contributors"] == 2
    for text in (PLANTED, str(bad), "bad_user_001", "private-folder"):
        assert text not in report and text.encode() not in wire
    # The device's own log names the file and line (its owner needs them) but never the content.
    local = "\n".join(r.getMessage() for r in caplog.records)
    assert "bad_user_001.jsonl:6: unknown_field" in local and PLANTED not in local
    assert not (tmp_path / "device-20" / "store.sqlite").exists()  # a failed ingest leaves nothing half-written


@pytest.mark.slow
def test_on_the_simulation_engine_failed_devices_are_counted_and_leak_nothing(tmp_path):
    """A run where one device's file is malformed: the report counts the refusal; nothing of it leaks."""
    from simulations.run import prepare, simulate

    harness = prepare("quick", {"num-supernodes": 4, "scrub-mode": "patterns", "persona-slots": 0, "num-server-rounds": 1}, tmp_path / "run")
    victim = harness["devices"][1]["user_file"]
    with open(victim, "a") as f:
        f.write(json.dumps({"type": "task", "id": "zz", "split": "train", "input": PLANTED, "output": "x", "extra": 1}) + "\n")
    report = simulate(harness, record_wire=True)
    rounds = report["server"]["rounds"]
    assert rounds[0]["refused"] == {"INGEST_ERROR": 1} and rounds[0]["contributors"] == 3
    assert report["server"]["evaluation"]["refused"] == {"INGEST_ERROR": 1}
    assert report["utility"]["users"] == 3 and report["utility"]["users_total"] == 4  # the means say whom they cover
    blobs = [(tmp_path / "run" / name).read_text() for name in ("server.json", "report.json", "report.md", "server.md")]
    wire = b"".join(p.read_bytes() for p in (tmp_path / "run" / "wire").glob("*.bin"))
    for text in (PLANTED, victim):
        assert not any(text in b for b in blobs) and text.encode() not in wire
