"""Privacy audits on a real (tiny) simulation run, with negative controls.

The audits must be able to fail: a planted PII value that really is on the wire
must be found (in UTF-16 and as token ids), and a tampered epsilon must break
the ledger.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from simulations.report_html import chromium_binary

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def audited_run(tmp_path_factory):
    from simulations.run import prepare, simulate

    run = tmp_path_factory.mktemp("audit") / "run"
    cfg = prepare("quick", {"num-supernodes": 3, "scrub-mode": "full"}, run)
    cfg["wire-audit-dir"] = str(run / "wire")
    simulate(cfg)
    return run


@pytest.fixture(scope="module")
def audit_result(audited_run):
    from simulations.audit import run_audits

    return run_audits(audited_run)


@pytest.fixture(scope="module")
def memorising_run(tmp_path_factory):
    """The negative control: no DP, no scrubbing, many large local steps.

    Without the persona tier, so nothing depends on the devices' random
    round-1 persona tie-break (seeded by their store paths, i.e. by tmp dirs).
    """
    from simulations.run import prepare, simulate

    run = tmp_path_factory.mktemp("memorise") / "run"
    overrides = {"num-supernodes": 3, "dp": False, "scrub-mode": "off", "local-steps": 30, "lr": 0.05, "batch-size": 16, "persona-slots": 0}
    simulate(prepare("quick", overrides, run))
    return run


def test_clean_run_has_zero_wire_hits_and_a_consistent_ledger(audit_result):
    result = audit_result
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
        run_audits(run, level="fast")


def test_needle_finder_counts_overlapping_and_repeated_occurrences():
    from simulations.audit import NeedleFinder

    blob = b"xxabcdabcdyyabcd" + "Jane".encode("utf-16-le") + b"\x00"
    finder = NeedleFinder([b"abcd", b"abcdabcd", "Jane".encode("utf-16-le"), b"zzzz"])
    # abcd x3, abcdabcd x1, UTF-16 "Jane" x1
    assert finder.count(blob) == 5
    assert finder.count(b"abc") == 0


def test_every_audit_reports_on_the_clean_run(audited_run, audit_result):
    r = audit_result
    ex = r["exposure"]
    assert ex["canaries"] == 2 and ex["scrub_mode"] == "full"
    assert all(0 <= row[k] <= ex["max_exposure_bits"] for row in ex["rows"] for k in ("global", "persona", "personal", "reference_base"))
    # Scrubbing removed the phone-shaped canary before training (so its exposure is
    # a random rank; benchmarks/audit_figures.py compares scrub on and off).
    import sqlite3

    for user in json.loads((audited_run / "data" / "manifest.json").read_text())["users"]:
        if user.get("canary"):
            with sqlite3.connect(audited_run / "devices" / f"{user['user_id']}.sqlite") as db:
                outputs = [row[0] for row in db.execute("SELECT output FROM tasks WHERE id LIKE 'c%'")]
            assert outputs and all(user["canary"] not in o and "<PHONE_NUMBER>" in o for o in outputs)
    mia = r["membership_inference"]
    rec, usr = mia["record_level"], mia["user_level"]
    assert rec["members"] > 0 and rec["nonmembers"] == 3 * 6 and 0 <= rec["auc"] <= 1
    assert rec["formal_epsilon"] > 0 and not rec["bound_exceeds_formal"]
    assert (usr["members"], usr["nonmembers"]) == (3, 4)  # participants vs hold-out users
    assert r["regurgitation"]["prompts"] > 0 and r["regurgitation"]["pii_hits"] == 0
    d = r["disparity"]
    assert d["overall"]["n"] == 3 and d["overall"]["worst_to_mean"] >= 1.0
    assert set(d["by_routing_group"]["by_group"]) <= {"cold-start", "occasional", "frequent"}
    assert set(r["counterfactual"]) == {"name", "city"}
    assert 0.0 <= r["personalization"]["personal"] <= 1.0
    page = (audited_run / "report.html").read_text()
    for section in ("ledger", "exposure", "membership-inference", "regurgitation", "wire", "disparity", "counterfactual", "personalization"):
        assert f'id="{section}"' in page
    # Hold-out users never became devices of the federation.
    assert not any(p.name.startswith("user_003") for p in (audited_run / "devices").iterdir())


def test_exposure_and_membership_see_a_memorising_model(memorising_run):
    """Without DP and without scrubbing the canary's own device ranks it near the top."""
    from simulations import audit_privacy
    from simulations.audit_view import RunView

    view = RunView(memorising_run)
    ex = audit_privacy.canary_exposure(view, references=199)
    assert ex["mean"]["personal"] > 3.0 > ex["mean"]["reference_base"]
    mia = audit_privacy.membership_inference(view)
    assert mia["record_level"]["formal_epsilon"] is None  # no DP: nothing to exceed


def test_an_empirical_bound_above_the_formal_epsilon_fails_the_audit(memorising_run, monkeypatch):
    from simulations import audit_privacy
    from simulations.audit_view import RunView

    view = RunView(memorising_run)
    view.config["dp"] = True
    for u in view.report["users"]:
        u["epsilon_record_level"] = 1e-6  # a (wrong) claim that nothing can be learned
    # A perfectly separating attack: members score 1, non-members 0.
    monkeypatch.setattr(view, "record_nll", lambda pairs, stack, batch_size=32: [0.0 if stack == "personal" else 1.0] * len(pairs))
    real = audit_privacy._task_pairs
    monkeypatch.setattr(audit_privacy, "_task_pairs", lambda v, u, split, ex: real(v, u, split, ex) * (50 if split == "train" else 1))
    rec = audit_privacy.membership_inference(view, members_per_user=None)["record_level"]
    assert rec["bound_exceeds_formal"] is False  # identical scores separate nothing...
    monkeypatch.setattr(
        view, "record_nll", lambda pairs, stack, batch_size=32: [0.0 if stack == "personal" and len(pairs) > 20 else 1.0] * len(pairs)
    )
    rec = audit_privacy.membership_inference(view, members_per_user=None)["record_level"]
    assert rec["auc"] == 1.0 and rec["empirical_epsilon_lower_bound"] > 1e-6 and rec["bound_exceeds_formal"]


def test_regurgitation_counts_a_reproduced_value(audited_run, monkeypatch):
    from simulations import audit_privacy
    from simulations.audit_view import RunView

    view = RunView(audited_run)
    canaries = {u["canary"] for u in view.participants if u.get("canary")}
    monkeypatch.setattr(view, "generate", lambda prompt, stack, tokens=20: "it is " + " ".join(sorted(canaries)))
    out = audit_privacy.regurgitation(view)
    assert out["canary_hits"] == len(canaries) and out["pii_hits"] == 0
    assert out["rescrub_entities_found"] >= len(canaries)  # what it generated is scrubbed again


@pytest.mark.skipif(chromium_binary() is None, reason="no chromium on PATH (make test installs it where apt is available)")
def test_the_real_audit_report_renders_in_headless_chromium(audited_run, audit_result, tmp_path):
    from simulations.report_html import dump_dom

    dom = dump_dom(audited_run / "report.html", tmp_path / "profile")
    for section in ("ledger", "exposure", "membership-inference", "regurgitation", "wire", "disparity", "counterfactual", "personalization"):
        assert f'id="{section}"' in dom
    assert "Canary exposure" in dom and "data:image/png;base64," in dom
