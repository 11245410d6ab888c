"""Privacy audits on a real (tiny) simulation run, with negative controls.

The audits must be able to fail: a planted PII value that really is on the wire
must be found (in UTF-16 and as token ids), and a tampered epsilon must break
the ledger.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def audited_run(tmp_path_factory):
    from simulations.run import prepare, simulate

    run = tmp_path_factory.mktemp("audit") / "run"
    cfg = prepare("quick", {"num-supernodes": 3, "scrub-mode": "full"}, run)
    cfg["wire-audit-dir"] = str(run / "wire")
    simulate(cfg)
    return run


def test_clean_run_has_zero_wire_hits_and_a_consistent_ledger(audited_run):
    from simulations.audit import run_audits

    result = run_audits(audited_run)
    wire = result["wire"]
    assert wire["messages"] == 3 * 2 + 3  # 3 clients x 2 train rounds + 3 evaluations
    assert wire["bytes_scanned"] > 0 and wire["planted_values"] > 0
    assert wire["hits"] == 0
    ledger = result["ledger"]
    assert len(ledger["record_level"]) == 3 and ledger["failures"] == []
    assert all(r["epsilon_independent"] > 0 and r["mechanism"] for r in ledger["record_level"])


def test_wire_audit_finds_pii_that_is_really_on_the_wire(audited_run, tmp_path):
    import shutil

    from common.models import AdapterSpec, personal_model
    from common.config import build_config
    from simulations.audit import wire_audit

    run = tmp_path / "run"
    shutil.copytree(audited_run, run)
    report = json.loads((run / "report.json").read_text())
    sidecar = (run / "data" / "pii_sidecar.jsonl").read_text().splitlines()
    value = json.loads(sidecar[0])["value"]
    tok = personal_model(AdapterSpec.from_run_config(build_config("quick"))).tokenizer
    ids = np.asarray(tok(value, add_special_tokens=False)["input_ids"], dtype="<i8").tobytes()
    (run / "wire" / "smuggled.bin").write_bytes(b"\x00header" + value.encode("utf-16-le") + b"\x01" + ids)
    report["config"]["data-dir"] = str(run / "data")
    (run / "report.json").write_text(json.dumps(report))
    assert wire_audit(run, tok)["hits"] == 2


def test_ledger_fails_loudly_on_a_wrong_epsilon(audited_run, tmp_path):
    import shutil

    from simulations.audit import AuditFailure, run_audits

    run = tmp_path / "run"
    shutil.copytree(audited_run, run)
    report = json.loads((run / "report.json").read_text())
    report["users"][0]["epsilon_record_level"] *= 0.5
    (run / "report.json").write_text(json.dumps(report))
    with pytest.raises(AuditFailure, match="ledger"):
        run_audits(run)


def test_needle_finder_counts_overlapping_and_repeated_occurrences():
    from simulations.audit import NeedleFinder

    blob = b"xxabcdabcdyyabcd" + "Jane".encode("utf-16-le") + b"\x00"
    finder = NeedleFinder([b"abcd", b"abcdabcd", "Jane".encode("utf-16-le"), b"zzzz"])
    # abcd x3, abcdabcd x1, UTF-16 "Jane" x1
    assert finder.count(blob) == 5
    assert finder.count(b"abc") == 0
