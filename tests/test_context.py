"""In-context personalization: the DP phrase release (client/context.py), its accounting, and its use on the device."""

from __future__ import annotations

import math
from dataclasses import replace
from statistics import NormalDist

import pytest
from helpers import device_context, quick, server_message, user_files

from client import context, device
from client.accounting import accountant_history, calibrated_noise, history_epsilon, phrase_step
from client.app import app
from common.config import ConfigError, TrainConfig

# Forty records that open and close alike, each with its own middle.
TEXTS = [f"Hello there my friend, item number {i} is fine, see you soon then." for i in range(40)]
O, C = context.OPENING, context.CLOSING


def test_candidates_are_a_records_opening_and_closing_words():
    assert context.candidates("one two three four five six") == [(O, "one two three four"), (C, "three four five six")]
    # The same words as an opening and as a closing are two candidates; a record has two whatever its length.
    assert context.candidates("ok cool") == [(O, "ok cool"), (C, "ok cool")]
    assert context.candidates("a b c d e", 1) == [(O, "a b c d")]
    assert context.candidates("  \n ") == []


def test_threshold_holds_the_unique_candidates_to_delta():
    # A record with t candidates of weight 1/sqrt(t) held by it alone: each clears rho with probability
    # P[N(0, sigma^2) > rho - 1/sqrt(t)], and the t of them together at most delta, for every t <= k.
    for sigma, k, delta in ((0.7, 4, 1e-6), (1.0, 1, 1e-6), (2.0, 8, 1e-7), (0.64, 2, 1e-6)):
        rho = context.threshold(sigma, delta, k)
        tails = [t * (1 - NormalDist(0, sigma).cdf(rho - 1 / math.sqrt(t))) for t in range(1, k + 1)]
        assert max(tails) == pytest.approx(delta, rel=1e-3) and all(tail <= delta * (1 + 1e-9) for tail in tails)
    with pytest.raises(ValueError):
        context.threshold(0.0, 1e-6, 4)


@pytest.mark.parametrize("text, t", [("a b c d e f g h", 2), ("ok", 2), ("a b c d e f g h", 1)])
def test_weighted_counts_give_each_record_l2_norm_one(text, t):
    counts = context.weighted_counts([text], t)
    assert len(counts) == t and all(v == pytest.approx(1 / math.sqrt(t)) for v in counts.values())
    assert math.sqrt(sum(v * v for v in counts.values())) == pytest.approx(1.0)


def test_private_release_finds_the_shared_opening_and_closing_and_not_a_single_records():
    phrases = context.private_phrases(TEXTS, 1.0, 1e-6, 2, 8)
    assert set(phrases) == {(O, "Hello there my friend,"), (C, "see you soon then.")}
    # A record's own window has weight 1/sqrt(2) against a threshold near 5.8 at sigma 1: never released here.
    unique = [f"w{i} x y z middle a b c" for i in range(40)]
    assert not any(p[0] == O for _ in range(20) for p in context.private_phrases(unique, 1.0, 1e-6, 2, 8))
    assert context.private_phrases(TEXTS[:2], 1.0, 1e-6, 2, 8) == []  # two records cannot clear it


def test_private_release_uses_fresh_noise():
    # Near the threshold the outcome varies between calls: the noise is not seeded.
    rho = context.threshold(1.0, 1e-6, 2)
    texts = [f"Shared open ing here then {i} a b c {i}" for i in range(round(math.sqrt(2) * rho))]  # near rho
    outcomes = {tuple(context.private_phrases(texts, 1.0, 1e-6, 2, 8)) for _ in range(40)}
    assert len(outcomes) == 2


def test_exact_release_and_prefix():
    assert context.exact_phrases(["hi a b c d e", "hi a b c f g", "other"], 2, 8) == [(O, "hi a b c")]
    assert context.prefix([]) == ""
    assert context.prefix([(O, "Hi all,"), (C, "Best, Ann"), (O, "Hey,")]) == (
        context.HEADER + "I often begin with: Hi all, / Hey,\nI often end with: Best, Ann\n\n")
    # As read back from the store (JSON lists), and a store the earlier sentence release wrote (strings).
    assert context.prefix([[C, "Best, Ann"]]) == context.HEADER + "I often end with: Best, Ann\n\n"
    assert context.prefix(["See you."]) == context.HEADER + "I often write: See you.\n\n"


def test_the_release_is_one_gaussian_step_and_calibration_still_ends_at_the_target():
    t = replace(TrainConfig(), context="phrases")
    assert t.phrase_release and phrase_step(t) == ((1.0, 1.0, 1),)
    assert t.accountant_delta + t.context_delta == pytest.approx(t.delta)
    for mechanism in ("prv", "rdp"):
        c = replace(t, accountant=mechanism)
        z = calibrated_noise(c, 30, 3)
        eps = history_epsilon(phrase_step(c) + ((z, 1.0, 3 * c.local_steps),), c.accountant_delta, mechanism)
        assert c.target_epsilon - 0.011 <= eps <= c.target_epsilon
        assert z > calibrated_noise(replace(c, context="none"), 30, 3)  # DP-SGD pays for the release
    # Without DP the release is not accounted and delta is whole.
    off = replace(t, dp=False)
    assert not off.phrase_release and phrase_step(off) == () and off.accountant_delta == off.delta


def test_config_checks_the_context_keys():
    with pytest.raises(ConfigError):
        quick(context="examples")
    with pytest.raises(ConfigError):
        quick(context_noise_multiplier=0)


def test_device_releases_once_charges_its_accountant_and_serves_the_phrases(tiny_data, task_identity, tmp_path):
    cfg = quick(secagg=False, context="phrases", target_epsilon=8.0)
    ctx = device_context(tmp_path, 1, user_files(tiny_data)[1], cfg)
    store_path = tmp_path / "device-1" / "store.sqlite"
    app(server_message(cfg, "train", 1), ctx)
    store = device.DeviceStore(store_path)
    released = device.get_json(store, device.CONTEXT, None)
    # This user holds 35 records that share a persona's sign-off: weight 17.5 against a threshold near 5.5.
    assert len(store.tasks("train")) >= 30 and released["phrases"]
    history = accountant_history(device.accountant_state(store))
    assert history[0] == (cfg.train.context_noise, 1.0, 1) and len(history) == 2
    app(server_message(cfg, "train", 2), ctx)
    # Released once: the second round adds DP-SGD steps only, and the phrases are the same.
    assert device.get_json(store, device.CONTEXT, None) == released
    history = accountant_history(device.accountant_state(store))
    assert history[0] == (cfg.train.context_noise, 1.0, 1) and sum(n for z, q, n in history[1:]) == 2 * cfg.train.local_steps
    app(server_message(cfg, "evaluate", 2), ctx)
    results = device.get_json(store, device.EVAL_RESULTS, None)
    assert results["context_phrases"] == len(released["phrases"])
    assert results["epsilon"] <= cfg.train.target_epsilon
    from client.served import read_served

    stack, _ = read_served(store)
    assert stack.context == context.prefix(released["phrases"])


def test_without_dp_the_device_uses_the_shared_sentences_without_noise(tiny_data, task_identity, tmp_path):
    cfg = quick(secagg=False, context="phrases", dp=False)
    ctx = device_context(tmp_path, 1, user_files(tiny_data)[1], cfg)
    app(server_message(cfg, "train", 1), ctx)
    store = device.DeviceStore(tmp_path / "device-1" / "store.sqlite")
    outputs = [o for _, o in store.tasks("train")]
    kept = [tuple(p) for p in device.get_json(store, device.CONTEXT, None)["phrases"]]
    assert kept and kept == context.exact_phrases(outputs, context.PER_RECORD, context.MAX_PHRASES)
    assert device.accountant_state(store) is None or accountant_history(device.accountant_state(store)) == []


def test_the_ledger_expects_the_phrase_release_and_fails_a_device_that_hid_it(tmp_path):
    import json

    from client.store import DeviceStore
    from client.accounting import epsilon_from_history
    from simulations.audits.ledger import epsilon_ledger
    from simulations.audits.view import RunView
    from simulations.run import prepare, simulate

    from client.accounting import release_noise
    from common.config import build_config

    run = tmp_path / "run"
    overrides = {"num-supernodes": 3, "context": "phrases", "frequent-from": 30}
    simulate(prepare("quick", overrides, run))
    result = epsilon_ledger(RunView(run))
    assert result["failures"] == []
    train = replace(build_config("quick", overrides).train, target_epsilon=8.0)
    released_at = set()
    for row in result["record_level"]:
        first = row["expected"][0]
        noise = release_noise(train, row["train_records"], 30)
        assert (first["noise_multiplier"], first["sample_rate"], first["steps"]) == (noise, 1.0, 1)
        assert row["agrees"] and row["epsilon_pld"] <= 8.0
        released_at.add(noise)
    assert len(released_at) == 2  # devices on either side of frequent-from: the two budget splits, both agreed
    # A device whose accountant leaves the release out, its reported epsilon made to match: caught.
    report = json.loads((run / "report.json").read_text())
    store = DeviceStore(run / "devices" / f"{report['users'][0]['user_id']}.sqlite")
    state = json.loads(device.accountant_state(store))
    state["history"] = state["history"][1:]
    store.put_state(device.ACCOUNTANT, json.dumps(state).encode())
    report["users"][0]["epsilon_record_level"] = epsilon_from_history(json.dumps(state), 0.9e-5)
    (run / "report.json").write_text(json.dumps(report))
    assert epsilon_ledger(RunView(run))["failures"] == [0]


def test_a_tight_budget_raises_the_release_noise_so_the_device_still_trains():
    from client.accounting import budget_mu, gaussian_mu, release_noise, resolve_release

    # mu of an exactly (epsilon, delta)-DP Gaussian mechanism: delta(mu) back at delta.
    mu = gaussian_mu(8.0, 1e-5)
    phi = NormalDist().cdf
    assert phi(-8 / mu + mu / 2) - math.exp(8) * phi(-8 / mu - mu / 2) == pytest.approx(1e-5, rel=1e-6)
    for target in (8.0, 2.0, 0.5):
        c = resolve_release(replace(TrainConfig(), context="phrases", target_epsilon=target), 40, 20)
        alone = history_epsilon(phrase_step(c), c.accountant_delta, "prv")
        z = calibrated_noise(c, 40, 3)  # raises if the release left DP-SGD nothing
        total = history_epsilon(phrase_step(c) + ((z, 1.0, 3 * c.local_steps),), c.accountant_delta, "prv")
        assert alone < target and target - 0.011 <= total <= target
        # at most half the budget in mu^2: the release's mu is at most mu(target) / sqrt(2)
        assert 1 / c.context_noise <= budget_mu(target, c.accountant_delta, "prv") / math.sqrt(2) * (1 + 1e-9) or c.context_noise == 1.0
        # the accountant's mu is never above the exact one: it reads a Gaussian step as at least as costly
        assert budget_mu(target, c.accountant_delta, "prv") <= gaussian_mu(target, c.accountant_delta) * (1 + 1e-9)
    t = replace(TrainConfig(), context="phrases")
    assert release_noise(t, 40, 20) == 1.0  # at epsilon 8 the configured noise stands
    assert release_noise(replace(t, target_epsilon=2.0), 40, 20) > 2.5
    assert release_noise(t, 40, 20, floor=1.5) == 1.5  # never below the device's floor


@pytest.mark.parametrize("target", [8.0, 2.0])
def test_a_device_served_a_shared_stack_spends_its_share_of_the_budget_on_the_release(target):
    """Fewer than frequent-from records: the release takes context-budget-share of mu^2, DP-SGD the rest, and the
    device still ends at its target."""
    from client.accounting import budget_mu, release_noise, resolve_release

    t = replace(TrainConfig(), context="phrases", target_epsilon=target, shared_stack_dp_sgd=True)
    for share in (0.5, t.context_budget_share):
        c = resolve_release(replace(t, context_budget_share=share), 12, 20)
        mu = budget_mu(target, c.accountant_delta, "prv")
        assert (1 / c.context_noise) ** 2 == pytest.approx(share * mu**2)
        z = calibrated_noise(c, 12, 3)
        total = history_epsilon(phrase_step(c) + ((z, 1.0, 3 * c.local_steps),), c.accountant_delta, "prv")
        assert target - 0.011 <= total <= target
    # Less noise, so a lower threshold, than on a device served its personal stack at the same budget.
    assert release_noise(t, 12, 20) < release_noise(t, 20, 20)
    assert release_noise(t, 12, 20, floor=5.0) == 5.0
    with pytest.raises(ConfigError):
        quick(context_budget_share=1.0)


def test_runs_dp_sgd_follows_what_the_device_is_served_and_a_decliner_gives_the_release_its_whole_budget():
    from client.accounting import budget_mu, release_noise, runs_dp_sgd

    t = replace(TrainConfig(), context="phrases", shared_stack_dp_sgd=False)
    assert not runs_dp_sgd(t, 19, 20) and runs_dp_sgd(t, 20, 20)
    assert runs_dp_sgd(replace(t, shared_stack_dp_sgd=True), 3, 20)
    assert runs_dp_sgd(replace(t, dp=False), 3, 20)  # without DP there is no budget to spend elsewhere
    mu = budget_mu(8.0, t.accountant_delta, "prv")
    assert release_noise(t, 12, 20) == pytest.approx(1 / mu)  # share 1: context-budget-share does not apply
    assert history_epsilon(((release_noise(t, 12, 20), 1.0, 1),), t.accountant_delta, "prv") <= 8.0
    assert release_noise(t, 12, 20) < release_noise(replace(t, shared_stack_dp_sgd=True), 12, 20)
    assert release_noise(t, 40, 20) == release_noise(replace(t, shared_stack_dp_sgd=True), 40, 20)  # a trainer: unchanged


def test_a_device_served_a_shared_stack_that_runs_no_dp_sgd_releases_once_and_sends_zeros(tiny_data, task_identity, tmp_path):
    import numpy as np

    from client.accounting import epsilon_from_history, release_noise

    # frequent-from above this user's record count: it is served a shared stack.
    cfg = quick(secagg=False, context="phrases", target_epsilon=8.0, shared_stack_dp_sgd=False, frequent_from=1000)
    ctx = device_context(tmp_path, 1, user_files(tiny_data)[1], cfg)
    store = device.DeviceStore(tmp_path / "device-1" / "store.sqlite")
    replies = [app(server_message(cfg, "train", rnd), ctx) for rnd in (1, 2)]
    for reply in replies:
        assert not reply.has_error()
        assert all(not np.any(a.numpy()) for a in reply.content["arrays"].values())  # a zero update, as if not drawn
    records = len(store.tasks("train"))
    noise = release_noise(replace(cfg.train, target_epsilon=8.0), records, 1000)
    # The release alone, once, at the whole budget: no DP-SGD step in either round.
    assert accountant_history(device.accountant_state(store)) == [(noise, 1.0, 1)]
    eps = epsilon_from_history(device.accountant_state(store), cfg.train.accountant_delta)
    assert 7.9 <= eps <= 8.0
    assert device.get_json(store, device.CONTEXT, None)["phrases"]
    rounds = device.get_json(store, device.DIAGNOSTICS, None)["rounds"]
    assert [(e["sampled"], e["declined"]) for e in rounds.values()] == [(False, True), (False, True)]
    app(server_message(cfg, "evaluate", 2), ctx)
    results = device.get_json(store, device.EVAL_RESULTS, None)
    assert results["context_phrases"] > 0 and results["epsilon"] == pytest.approx(eps)


def test_the_ledger_expects_a_decliner_to_release_alone_and_fails_one_that_trained(tmp_path):
    import json

    from client.store import DeviceStore
    from simulations.audits.ledger import epsilon_ledger
    from simulations.audits.view import RunView
    from simulations.run import prepare, simulate

    run = tmp_path / "run"
    overrides = {"num-supernodes": 3, "context": "phrases", "frequent-from": 30, "shared-stack-dp-sgd": False}
    simulate(prepare("quick", overrides, run))
    result = epsilon_ledger(RunView(run))
    assert result["failures"] == []
    rows = result["record_level"]
    decliners = [r for r in rows if r["train_records"] < 30]
    assert decliners and len(decliners) < len(rows)  # devices on both sides of frequent-from
    for row in rows:
        assert row["agrees"] and row["epsilon_pld"] <= 8.0
        if row["train_records"] < 30:
            assert row["rounds_trained"] == [] and len(row["expected"]) == 1 and row["expected"][0]["sample_rate"] == 1.0
        else:
            assert row["rounds_trained"] and len(row["expected"]) == 2
    # A decliner whose accountant holds DP-SGD steps it should not have run: caught.
    report = json.loads((run / "report.json").read_text())
    index = decliners[0]["user_index"]
    user = next(u for u in report["users"] if u["user_index"] == index)
    store = DeviceStore(run / "devices" / f"{user['user_id']}.sqlite")
    state = json.loads(device.accountant_state(store))
    state["history"].append([3.0, 1.0, 3])
    store.put_state(device.ACCOUNTANT, json.dumps(state).encode())
    assert index in epsilon_ledger(RunView(run))["failures"]
