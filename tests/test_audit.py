"""The audits (``simulations.audits``) on a real (tiny) simulation run, with negative controls.

The audits must be able to fail: a planted PII value that really is on the wire
must be found (in UTF-16 and as token ids), a tampered epsilon or accountant
history must break the ledger, and a memorising device that claims a small
epsilon must fail the one-run audit. Audits that need planted ground truth must skip, with a reason,
on a run that has none.
"""

from __future__ import annotations

import json
import shutil
from html.parser import HTMLParser

import numpy as np
import pytest

from simulations.audits.report_html import chromium_binary

pytestmark = pytest.mark.slow

AUDITS = {"ledger", "wire", "exposure", "one_run", "membership_inference", "regurgitation", "disparity", "dp_impact", "counterfactual", "personalization"}
MAIN_SECTIONS = ["audits", "utility", "training", "users", "privacy"]
AUDIT_SECTIONS = ["ledger", "wire", "exposure", "one-run", "membership-inference", "regurgitation", "disparity", "dp-impact", "counterfactual", "personalization"]


class SectionIds(HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids: list[str] = []
        self.banner: str | None = None

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        if tag == "section":
            self.ids.append(attributes["id"])
        elif tag == "p" and "banner" in (attributes.get("class") or "") and self.banner is None:
            self.banner = attributes["class"]


def page_structure(page: str) -> SectionIds:
    parser = SectionIds()
    parser.feed(page)
    return parser


@pytest.fixture(scope="module")
def audited_run(tmp_path_factory):
    from simulations.run import prepare, simulate

    run = tmp_path_factory.mktemp("audit") / "run"
    simulate(prepare("quick", {"num-supernodes": 3, "scrub-mode": "full"}, run), record_wire=True)
    return run


@pytest.fixture(scope="module")
def audit_result(audited_run):
    from simulations.audits import run_audits

    return run_audits(audited_run)


@pytest.fixture(scope="module")
def memorising_run(tmp_path_factory):
    """The negative control: no DP, no scrubbing, many large local steps.

    Without the persona tier, so nothing depends on the devices' random
    round-1 persona tie-break (keyed by their device secrets).
    """
    from simulations.run import prepare, simulate

    run = tmp_path_factory.mktemp("memorise") / "run"
    overrides = {"num-supernodes": 3, "dp": False, "scrub-mode": "off", "local-steps": 60, "lr": 0.05, "batch-size": 16, "persona-slots": 0}
    # A fixed audit seed: the audit canaries' coins change the training data, so with OS entropy the canary's exposure would vary run to run.
    simulate(prepare("quick", overrides, run, audit_seed=11))
    return run


def copy_run(run, tmp_path):
    """A copy of a run folder (the audits re-root config.json's paths under it)."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy


def test_the_registry_holds_each_audit_exactly_once():
    from simulations.audits.base import LEVELS, REGISTRY, register, registered

    audits = registered()
    names = [a.name for a in audits]
    assert sorted(names) == sorted(AUDITS) and len(names) == len(set(names))
    assert set(REGISTRY) == AUDITS and all(REGISTRY[a.name] is a for a in audits)
    assert all(a.level in LEVELS and a.method and a.title for a in audits)
    assert len({a.section_id for a in audits}) == len(audits)
    assert registered() == audits  # discovery runs once

    class Impostor(type(REGISTRY["wire"])):
        pass

    with pytest.raises(ValueError, match="two audits named 'wire'"):
        register(Impostor)
    assert type(REGISTRY["wire"]).__name__ == "WireAudit"


def test_clean_run_has_zero_wire_hits_and_a_consistent_ledger(audit_result):
    result = audit_result
    wire = result["wire"]
    # 3 clients x 2 rounds x (a train reply + 3 secure-aggregation stage replies) + 3 evaluations
    assert wire["messages"] == 3 * 2 * (1 + 3) + 3
    assert wire["bytes_scanned"] > 0 and wire["planted_values"] > 0
    assert wire["hits"] == 0
    ledger = result["ledger"]
    assert len(ledger["record_level"]) == 3 and ledger["failures"] == []
    assert all(r["agrees"] and r["epsilon_independent"] > 0 and r["mechanism"] for r in ledger["record_level"])
    for row in ledger["record_level"]:
        # The accountant holds exactly the expected mechanism: 2 rounds x 2 local steps at the device's own rate,
        # with the noise the device calibrated to end the planned rounds at the default target (epsilon 8).
        assert row["history_matches"] and row["rounds_trained"] == [1, 2]
        # First the context phrases' release (client/context.py, the default), once, then DP-SGD.
        # Its noise follows the device's side of frequent-from (client.accounting.release_noise).
        release, *steps = row["expected"]
        assert release["noise_multiplier"] in (1.0, pytest.approx(0.6361, abs=1e-4))
        assert (release["sample_rate"], release["steps"]) == (1.0, 1)
        sigma = steps[0]["noise_multiplier"]
        assert steps == [{"noise_multiplier": sigma, "sample_rate": steps[0]["sample_rate"], "steps": 4}]
        # At the target, never above it by the device's own (Opacus) accountant; dp-accounting's RDP may
        # differ from it in the fourth decimal (the line below allows 5 %).
        assert 7.9 <= row["epsilon_reported"] <= 8.0
        assert 0 < row["epsilon_pld"] <= row["epsilon_rdp"]  # PLD is the tighter accountant
        # The default accountant is Opacus' PRV, a privacy-loss-distribution analysis like dp-accounting's PLD.
        assert row["epsilon_reported"] == pytest.approx(row["epsilon_pld"], rel=0.05)
    assert [(r["contributions"], r["devices_trained"]) for r in ledger["rounds"]] == [(3, 3), (3, 3)]
    assert result["verdicts"]["ledger"]["status"] == "passed" and result["verdicts"]["wire"]["status"] == "passed"


def test_wire_audit_finds_pii_that_is_really_on_the_wire(audited_run, tmp_path):
    from simulations.audits.view import RunView
    from simulations.audits.wire import wire_audit

    run = copy_run(audited_run, tmp_path)
    view = RunView(run)
    assert view.wire_dir == run / "wire"  # the copy's own recording, not the original's
    value = view.sidecar[0]["value"]
    tok = view.tokenizer
    ids = np.asarray(tok(value, add_special_tokens=False)["input_ids"], dtype="<i8").tobytes()
    (run / "wire" / "smuggled.bin").write_bytes(b"\x00header" + value.encode("utf-16-le") + b"\x01" + ids)
    assert wire_audit(view, tok)["hits"] == 2


def test_ledger_fails_loudly_on_a_wrong_epsilon(audited_run, tmp_path):
    from simulations.audits import AuditFailure, run_audits

    run = copy_run(audited_run, tmp_path)
    report = json.loads((run / "report.json").read_text())
    report["users"][0]["epsilon_record_level"] *= 0.5
    (run / "report.json").write_text(json.dumps(report))
    with pytest.raises(AuditFailure, match="ledger") as failure:
        run_audits(run, level="fast")
    assert failure.value.result["ledger"]["failures"] == [0]
    # Both files are written before the audit fails, and the page leads with the failure.
    page = page_structure((run / "report.html").read_text())
    assert page.banner == "banner fail"
    assert json.loads((run / "audit.json").read_text())["verdicts"]["ledger"]["status"] == "FAILED"


def test_round_checks_allow_devices_charged_for_a_lost_round_but_never_an_uncharged_contribution():
    """A device charges itself before the server sees anything: an aborted secure sum leaves it charged for nothing (safe)."""
    from simulations.audits.ledger import _round_checks

    devices = [{"rounds_joined": [1, 2], "rounds_trained": [1, 2]}, {"rounds_joined": [1, 2], "rounds_trained": [1, 2]}]
    aborted = {"round": 1, "contributors": 0, "failed": 0, "rejected": 0, "privacy": {"secure-sum": {"aborted": 1.0}}}
    silent = {"round": 2, "contributors": 0, "failed": 0, "rejected": 0, "privacy": {}}
    checks = _round_checks(devices, [aborted, silent])
    assert [c["agrees"] for c in checks] == [True, False]  # two charged, nothing aggregated, and no reason why: a bug
    assert checks[0]["charged_not_aggregated"] == 2
    over = {"round": 1, "contributors": 3, "failed": 1, "rejected": 0, "privacy": {}}
    assert not _round_checks(devices, [over])[0]["agrees"]  # a contribution no device was charged for


def _tamper_accountant(run, user_index: int, change) -> None:
    """Rewrite one device's accountant history with ``change`` and make its reported epsilon match the new history.

    The arithmetic then agrees (what the old ledger checked); only the mechanism is wrong.
    """
    from client import device
    from client.store import DeviceStore
    from client.accounting import epsilon_from_history

    report = json.loads((run / "report.json").read_text())
    store = DeviceStore(run / "devices" / f"{report['users'][user_index]['user_id']}.sqlite")
    state = json.loads(device.accountant_state(store))
    # The first entry is the context phrases' release (the default); the tampering is with DP-SGD's entries.
    release, *steps = state["history"]
    state["history"] = [release] + [change(list(h)) for h in steps]
    store.put_state(device.ACCOUNTANT, json.dumps(state).encode())
    report["users"][user_index]["epsilon_record_level"] = epsilon_from_history(json.dumps(state), 1e-5)
    (run / "report.json").write_text(json.dumps(report))


@pytest.mark.parametrize(
    "change, needle",
    [
        (lambda h: [h[0], h[1], h[2] - 1], "accountant history"),  # one step never accounted
        (lambda h: [h[0], h[1] / 2, h[2]], "accountant history"),  # accounted at half the real sampling rate
        (lambda h: [h[0] * 2, h[1], h[2]], "accountant history"),  # twice the noise that was used
    ],
    ids=["step-removed", "rate-halved", "noise-doubled"],
)
def test_ledger_fails_on_a_tampered_accountant_whose_arithmetic_agrees(audited_run, tmp_path, change, needle):
    from simulations.audits.ledger import epsilon_ledger
    from simulations.audits.view import RunView

    run = copy_run(audited_run, tmp_path)
    _tamper_accountant(run, 1, change)
    result = epsilon_ledger(RunView(run))
    assert result["failures"] == [1]
    row = result["record_level"][1]
    assert not row["history_matches"] and any(needle in p for p in row["problems"])
    # The reported epsilon matches the tampered history (the arithmetic agrees) but understates the real
    # mechanism's, by dp-accounting's PLD recomputation (the device's accountant is PRV, the default).
    assert row["epsilon_reported"] < row["epsilon_pld"] <= row["epsilon_rdp"]


def test_ledger_checks_an_rdp_accountant_against_the_rdp_recomputation(audited_run, tmp_path):
    """The same run as if accounted with RDP: the RDP figures agree; a smaller figure claimed as RDP does not."""
    from client import device
    from client.accounting import epsilon_from_history
    from client.store import DeviceStore
    from simulations.audits.ledger import epsilon_ledger
    from simulations.audits.view import RunView

    run = copy_run(audited_run, tmp_path)
    harness = json.loads((run / "config.json").read_text())
    assert harness["run"]["accountant"] == "prv"  # the default; the run's devices accounted with PRV
    harness["run"]["accountant"] = "rdp"
    (run / "config.json").write_text(json.dumps(harness))
    # RDP calibrates to another noise multiplier: give each device the history an RDP device would hold.
    expected = {r["user_index"]: r["expected"] for r in epsilon_ledger(RunView(run))["record_level"]}
    report = json.loads((run / "report.json").read_text())
    for user in report["users"]:
        store = DeviceStore(run / "devices" / f"{user['user_id']}.sqlite")
        state = json.loads(device.accountant_state(store))
        state["history"] = [[e["noise_multiplier"], e["sample_rate"], e["steps"]] for e in expected[user["user_index"]]]
        state["mechanism"] = "rdp"
        store.put_state(device.ACCOUNTANT, json.dumps(state).encode())
        user["epsilon_record_level"] = epsilon_from_history(json.dumps(state), 1e-5)
    (run / "report.json").write_text(json.dumps(report))
    rows = epsilon_ledger(RunView(run))["record_level"]
    assert all(r["agrees"] and r["epsilon_reported"] == pytest.approx(r["epsilon_rdp"], rel=0.05) for r in rows), [r["problems"] for r in rows]
    report["users"][1]["epsilon_record_level"] = rows[1]["epsilon_pld"] * 0.9  # below both recomputations
    (run / "report.json").write_text(json.dumps(report))
    assert epsilon_ledger(RunView(run))["failures"] == [1]


def test_ledger_cross_checks_the_devices_rounds_against_the_servers_log(audited_run, tmp_path):
    from simulations.audits.ledger import epsilon_ledger
    from simulations.audits.view import RunView

    run = copy_run(audited_run, tmp_path)
    report = json.loads((run / "report.json").read_text())
    report["server"]["rounds"][0]["contributors"] = 2  # one contribution the devices' diagnostics do not explain
    del report["server"]["rounds"][1]  # and a round the devices trained in that the server never ran
    (run / "report.json").write_text(json.dumps(report))
    result = epsilon_ledger(RunView(run))
    assert result["failures"] == [0, 1, 2, "round 1"]
    assert all(any("did not run" in p for p in r["problems"]) for r in result["record_level"])


def test_needle_finder_counts_overlapping_and_repeated_occurrences():
    from simulations.audits.wire import NeedleFinder

    blob = b"xxabcdabcdyyabcd" + "Jane".encode("utf-16-le") + b"\x00"
    finder = NeedleFinder([b"abcd", b"abcdabcd", "Jane".encode("utf-16-le"), b"zzzz"])
    # abcd x3, abcdabcd x1, UTF-16 "Jane" x1
    assert finder.count(blob) == 5
    assert finder.count(b"abc") == 0


def test_needle_finder_agrees_with_a_plain_search_on_random_bytes():
    import random

    from simulations.audits.wire import NeedleFinder

    rng = random.Random(0)
    needles = [bytes(rng.randrange(256) for _ in range(rng.randrange(4, 12))) for _ in range(300)]
    needles += [needles[0][:3] + bytes([(needles[0][3] + 1) % 256]) + b"tail"]  # same 3-byte prefix, another 4th byte
    blob = bytearray(rng.randbytes(200_000))
    for n in rng.sample(needles, 40):
        at = rng.randrange(len(blob) - len(n))
        blob[at : at + len(n)] = n
    blob = bytes(blob)
    plain = sum(blob.count(n) for n in needles)  # bytes.count skips overlaps; these random needles do not overlap themselves
    assert NeedleFinder(needles).count(blob) == plain >= 40


def test_every_audit_reports_on_the_clean_run(audited_run, audit_result):
    r = audit_result
    assert set(r["verdicts"]) == AUDITS
    assert r["verdicts"]["dp_impact"] == {"status": "skipped", "detail": r["dp_impact"]["skipped"]}
    assert "--baseline" in r["dp_impact"]["skipped"]
    assert not any(v["status"] in ("FAILED", "not run") for v in r["verdicts"].values())
    ex = r["exposure"]
    assert ex["canaries"] == 2 and ex["scrub_mode"] == "full"
    assert all(0 <= row[k] <= ex["max_exposure_bits"] for row in ex["rows"] for k in ("global", "persona", "personal", "reference_base"))
    # Scrubbing removed the phone-shaped canary before training (so its exposure is
    # a random rank; benchmarks/audit_figures.py compares scrub on and off).
    from client.store import DeviceStore
    from simulations.personas import CANARY_PREFIX

    for user in json.loads((audited_run / "data" / "manifest.json").read_text())["users"]:
        if user.get("canary"):
            # The store keeps no record ids (and encrypts its text): the canary tasks are found by their frame.
            outputs = [o for _, o in DeviceStore(audited_run / "devices" / f"{user['user_id']}.sqlite").tasks("train") if o.startswith(CANARY_PREFIX)]
            assert outputs and all(user["canary"] not in o and "<PHONE_NUMBER>" in o for o in outputs)
    mia = r["membership_inference"]
    rec, usr = mia["record_level"], mia["user_level"]
    assert rec["members"] > 0 and rec["nonmembers"] == 3 * 6 and 0 <= rec["auc"] <= 1
    assert (usr["members"], usr["nonmembers"]) == (3, 4)  # participants vs hold-out users
    assert r["verdicts"]["membership_inference"]["status"] == "measured"  # a signal, no epsilon claim
    assert not any("epsilon" in key for level in (rec, usr) for key in level)
    one = r["one_run"]
    assert r["verdicts"]["one_run"]["status"] == "passed"
    reported = {u["user_index"]: u["epsilon_record_level"] for u in json.loads((audited_run / "report.json").read_text())["users"]}
    devices = [t for t in one["tests"] if t["test"].startswith("device")]
    assert len(devices) == 2 and one["tests"][-1]["test"] == "all canary devices" and one["tests"][-1]["canaries"] == 100
    for t in devices:
        assert t["canaries"] == 50 and t["formal_epsilon"] == reported[int(t["test"].split()[1])]  # its own epsilon
        assert 0.0 <= t["epsilon_lower_bound"] <= t["max_certifiable_epsilon"] and not t["exceeds_formal"]
    assert one["beta_per_test"] == pytest.approx(0.05 / (3 * 2))
    # Scrubbing left every included phrase alone, and no excluded phrase reached a device.
    assert all(c["excluded_in_store"] == 0 and c["included_in_store"] == t["included"] for c, t in zip(one["store_checks"], devices))
    assert [c["max_epsilon"] for c in one["curve"]] == sorted(c["max_epsilon"] for c in one["curve"])
    assert r["regurgitation"]["prompts"] > 0 and r["regurgitation"]["pii_hits"] == 0
    d = r["disparity"]
    assert d["overall"]["n"] == 3 and d["overall"]["worst_to_mean"] >= 1.0
    assert set(d["by_routing_group"]["by_group"]) <= {"cold-start", "occasional", "frequent"}
    assert set(r["counterfactual"]) == {"name", "city"}
    assert 0.0 <= r["personalization"]["personal"] <= 1.0
    # Hold-out users became devices only under holdout_devices_dir, never among the federation's.
    assert not any(p.name.startswith("user_003") for p in (audited_run / "devices").iterdir())
    assert (audited_run / "holdout-devices" / "user_003.sqlite").is_file()


def test_the_page_puts_the_main_results_first(audited_run, audit_result):
    raw = (audited_run / "report.html").read_text()
    page = page_structure(raw)
    assert page.banner == "banner pass"
    assert page.ids == MAIN_SECTIONS + AUDIT_SECTIONS
    assert "Skipped: no --baseline run given" in raw
    assert "Content-Security-Policy" in raw and "data:image/png;base64," in raw
    assert 'src="http' not in raw and "<script" not in raw


def test_a_run_without_planted_ground_truth_skips_those_audits_with_a_reason(audited_run, tmp_path):
    """A run on a user's own data has no canaries, no PII sidecar and no hold-out users."""
    from simulations.audits import run_audits

    run = copy_run(audited_run, tmp_path)
    (run / "data" / "pii_sidecar.jsonl").unlink()
    manifest_path = run / "data" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["users"] = [{k: v for k, v in u.items() if k not in ("canary", "audit_canaries")} for u in manifest["users"] if not u.get("holdout")]
    manifest_path.write_text(json.dumps(manifest))
    result = run_audits(run, level="full")
    verdicts = result["verdicts"]
    for name, needle in (("wire", "no planted PII"), ("exposure", "no planted canaries"), ("one_run", "no audit canaries"), ("regurgitation", "no planted PII")):
        assert result[name] == {"skipped": verdicts[name]["detail"]} and needle in verdicts[name]["detail"]
        assert verdicts[name]["status"] == "skipped"
    assert result["membership_inference"]["user_level"] == {"skipped": result["membership_inference"]["user_level"]["skipped"]}
    assert "hold-out" in result["membership_inference"]["user_level"]["skipped"]
    assert "no PII sidecar" in result["membership_inference"]["record_level"]["note"]
    assert verdicts["ledger"]["status"] == "passed" and verdicts["disparity"]["status"] == "measured"
    page = (run / "report.html").read_text()
    assert page_structure(page).ids == MAIN_SECTIONS + AUDIT_SECTIONS
    assert "Skipped: no planted canaries" in page and "Skipped: no planted PII" in page and "Skipped: no audit canaries" in page


def test_a_run_without_a_manifest_still_audits_what_it_can(audited_run, tmp_path):
    """No generator ground truth at all: personas are unknown, counterfactual swaps skip, the rest runs."""
    from simulations.audits import run_audits

    run = copy_run(audited_run, tmp_path)
    (run / "data" / "pii_sidecar.jsonl").unlink()
    (run / "data" / "manifest.json").unlink()
    from simulations.audits.counterfactual import counterfactual_swaps
    from simulations.audits.view import RunView

    result = run_audits(run, level="fast")
    assert result["verdicts"]["membership_inference"] == {"status": "not run", "detail": "a full-level audit"}
    assert result["verdicts"]["exposure"]["status"] == "skipped" and result["verdicts"]["wire"]["status"] == "skipped"
    assert result["verdicts"]["one_run"]["status"] == "skipped"
    assert "persona ground truth" in result["disparity"]["by_persona"]["skipped"]
    assert result["verdicts"]["ledger"]["status"] == "passed"
    view = RunView(run)
    assert view.manifest is None and view.holdouts == [] and len(view.participants) == 3
    assert "first name, city" in counterfactual_swaps(view)["skipped"]


def test_exposure_and_membership_see_a_memorising_model(memorising_run):
    """Without DP and without scrubbing the canary's own device ranks it near the top."""
    from simulations.audits import exposure, membership
    from simulations.audits.view import RunView

    view = RunView(memorising_run)
    ex = exposure.canary_exposure(view, references=199)
    assert ex["mean"]["personal"] > 3.0 > ex["mean"]["reference_base"]
    mia = membership.membership_inference(view)
    assert 0.0 <= mia["record_level"]["auc"] <= 1.0 and "formal_epsilon" not in mia["record_level"]


def test_a_certified_bound_above_the_formal_epsilon_fails_the_one_run_audit(memorising_run, monkeypatch):
    """A device whose model tells its included canaries apart while it claims a (wrong) tiny epsilon: a DP bug."""
    from simulations.audits import one_run
    from simulations.audits.base import REGISTRY
    from simulations.audits.view import RunView

    view = RunView(memorising_run)
    real = one_run.one_run_audit(view)  # the real scores; no DP-SGD, so nothing to exceed
    assert all(t["formal_epsilon"] is None and not t["exceeds_formal"] for t in real["tests"])
    assert REGISTRY["one_run"].verdict(real)["status"] == "passed" and "DP-SGD is off" in real["notes"][0]

    for u in view.report["users"]:
        u["epsilon_record_level"] = 0.1
    included = {c["output"] for u in view.participants for c in u.get("audit_canaries", []) if c["included"]}

    def nll(penalty: float):
        # The personalised model's NLL of an included phrase is lower (penalty < 0) or higher than the base model's.
        return lambda pairs, stack, batch_size=32: [1.0 + penalty if stack == "personal" and out in included else 1.0 for _, out in pairs]

    monkeypatch.setattr(view, "record_nll", nll(-1.0))
    result = one_run.one_run_audit(view)
    for t in result["tests"]:
        # Guessing on all: only the surplus of included over k+ = m/2 can be wrong.
        assert t["correct"] == t["canaries"] - abs(t["included"] - t["canaries"] // 2) or t["guesses"] < t["canaries"]
        assert 0.1 < t["epsilon_lower_bound"] <= t["max_certifiable_epsilon"] and t["exceeds_formal"]
    verdict = REGISTRY["one_run"].verdict(result)
    assert verdict["status"] == "FAILED" and "all canary devices" in verdict["detail"]
    monkeypatch.setattr(view, "record_nll", nll(+1.0))  # the same attack, inverted, certifies nothing
    assert all(t["epsilon_lower_bound"] == 0.0 for t in one_run.one_run_audit(view)["tests"])


def test_regurgitation_counts_a_reproduced_value(audited_run, monkeypatch):
    from simulations.audits import regurgitation
    from simulations.audits.view import RunView

    view = RunView(audited_run)
    canaries = {u["canary"] for u in view.canaried}
    monkeypatch.setattr(view, "generate", lambda prompt, stack, tokens=20: "it is " + " ".join(sorted(canaries)))
    out = regurgitation.regurgitation(view)
    assert out["canary_hits"] == len(canaries) and out["pii_hits"] == 0
    assert out["rescrub_entities_found"] >= len(canaries)  # what it generated is scrubbed again


@pytest.mark.skipif(chromium_binary() is None, reason="no chromium on PATH (make test installs it where apt is available)")
def test_the_real_audit_report_renders_in_headless_chromium(audited_run, audit_result, tmp_path):
    from simulations.audits.report_html import dump_dom

    dom = dump_dom(audited_run / "report.html", tmp_path / "profile")
    assert page_structure(dom).ids == MAIN_SECTIONS + AUDIT_SECTIONS
    assert "Canary exposure" in dom and "data:image/png;base64," in dom


def test_the_personal_stack_is_audited_as_its_device_serves_it_with_its_phrases(audited_run, tmp_path):
    """Inside ``device()`` the personal stack is scored after the device's released phrases, the server's stacks bare."""
    from client import context as in_context
    from client import device
    from client.store import DeviceStore
    from simulations.audits.view import RunView

    run = copy_run(audited_run, tmp_path)
    view = RunView(run)
    user = view.participants[0]
    phrases = [[in_context.OPENING, "Hello there my friend"], [in_context.CLOSING, "see you soon then."]]
    device.put_json(DeviceStore(user["store"]), device.CONTEXT, {"phrases": phrases})
    pairs = [("Write a note.", "Hello there my friend, the plan is fine, see you soon then.")]
    with view.device(user):
        assert view.head == in_context.prefix(phrases) != ""
        served = {stack: view.record_nll(pairs, stack)[0] for stack in ("base", "persona", "personal")}
        view.head = ""
        bare = {stack: view.record_nll(pairs, stack)[0] for stack in ("base", "persona", "personal")}
    assert view.head == ""
    assert served["personal"] != pytest.approx(bare["personal"], abs=1e-6)  # the phrases are in front
    assert served["base"] == bare["base"] and served["persona"] == bare["persona"]  # the server's view stays bare
