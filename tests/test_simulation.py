"""Whole federated simulations on Flower's simulation engine (Ray), tiny model."""

from __future__ import annotations

import json

import pytest
from helpers import codec_for, quick

pytestmark = pytest.mark.slow


def _update_length(**flat) -> int:
    return codec_for(quick(**flat)).length


def test_quick_simulation_writes_the_server_report_and_the_device_results(tmp_path):
    from simulations.run import prepare, simulate

    harness = prepare("quick", {"num-supernodes": 4, "scrub-mode": "patterns"}, tmp_path / "run")
    report = simulate(harness)
    on_disk = json.loads((tmp_path / "run" / "report.json").read_text())
    assert on_disk["utility"] == json.loads(json.dumps(report["utility"]))
    assert (tmp_path / "run" / "report.md").read_text().startswith("# fedpersona simulation report")
    server = report["server"]
    assert [r["round"] for r in server["rounds"]] == [1, 2]
    assert all(r["sampled"] == 4 and r["failed"] == 0 and r["rejected"] == 0 for r in server["rounds"])
    # Every device trains in round 1; later, a device whose next round would pass its record-level
    # cap (8; the cold-start user, whose batch holds all 3 of its records) declines, and says why.
    assert server["rounds"][0]["contributors"] == 4 and server["rounds"][0]["refused"] == {}
    assert all(set(r["refused"]) <= {"RECORD_BUDGET_SPENT"} and r["contributors"] + sum(r["refused"].values()) == 4 for r in server["rounds"])
    assert all(u["epsilon_record_level"] <= 8.0 for u in report["users"])
    assert server["evaluation"] == {"round": 2, "evaluated": 4, "refused": {}, "failed": 0}
    assert len(report["users"]) == 4 and report["utility"]["users"] == 4
    for user in report["users"]:
        assert user["epsilon_record_level"] is not None and user["epsilon_record_level"] > 0
        for key in ("nll_base", "nll_global", "nll_persona", "nll_personal", "nll_served"):
            assert user[key] > 0
    # Per tier stack and per routing group (the generator makes 1 cold-start, 1 occasional, 2 frequent of 4).
    groups = report["utility"]["routing_groups"]
    assert {g: groups[g]["users"] for g in groups} == {"cold-start": 1, "occasional": 1, "frequent": 2}
    # Training diagnostics come from the devices' own stores, per round.
    assert [r["round"] for r in report["training"]] == [1, 2] and [r["devices"] for r in report["training"]] == [r["contributors"] for r in server["rounds"]]
    # Every round, each contributing client sent one masked K-slot update (uint32) and
    # nothing else besides its secure-aggregation stage replies (a refusal is a few bytes).
    payload = 4 * _update_length()
    for r in server["rounds"]:
        contributed = sorted(r["bytes_train_reply"])[-r["contributors"]:]
        assert all(payload <= b < 1.05 * payload for b in contributed)  # + the array header
        assert all(b > 0 for b in r["bytes_secagg_replies"])
    assert all(sum(r["persona_counts"]) == r["contributors"] for r in server["rounds"])
    # The server's report holds no per-device value at all, and no raw data.
    server_text = (tmp_path / "run" / "server.json").read_text()
    assert "nll" not in server_text and "user_index" not in server_text
    sidecar = (tmp_path / "run" / "data" / "pii_sidecar.jsonl").read_text().splitlines()
    planted = [json.loads(line)["value"] for line in sidecar]
    text = (tmp_path / "run" / "report.json").read_text()
    assert planted and not any(value in text or value in server_text for value in planted)


def test_adapters_on_the_top_layer_run_a_whole_simulation_with_the_frozen_layer_cached(tmp_path):
    """adapter-layers = 1: every device trains and is evaluated on the top layer and the deep prompt;
    the server aggregates the smaller update (its layout comes from the same spec)."""
    from simulations.run import prepare, simulate

    overrides = {"num-supernodes": 3, "num-server-rounds": 1, "scrub-mode": "patterns", "adapter-layers": 1}
    report = simulate(prepare("quick", overrides, tmp_path / "run"))
    (only,) = report["server"]["rounds"]
    assert only["contributors"] == 3 and only["failed"] == 0
    assert report["server"]["evaluation"]["evaluated"] == 3
    assert all(u["nll_personal"] > 0 and u["epsilon_record_level"] <= 8.0 for u in report["users"])


def test_user_level_dp_simulation_accounts_each_round_and_stops_at_budget(tmp_path):
    from simulations.run import prepare, simulate

    overrides = {
        "num-supernodes": 3,
        "num-server-rounds": 4,
        "scrub-mode": "patterns",
        "user-dp": True,
        "user-noise-multiplier": 1.0,
        "user-max-epsilon": 8.0,
        "user-delta": 1e-3,
    }
    report = simulate(prepare("quick", overrides, tmp_path / "run"))
    ul = report["server"]["user_level"]
    eps = [ul["epsilon_per_round"][k] for k in sorted(ul["epsilon_per_round"], key=int)]
    assert ul["rounds_planned"] == 4 and 0 < ul["rounds_run"] < 4  # budget 8 stops it early
    assert eps == sorted(eps) and eps[-1] <= 8.0
    assert eps[-1] == pytest.approx(ul["epsilon_independent"], rel=0.02)
    assert len(report["server"]["rounds"]) == ul["rounds_run"]
    # The pipeline's server-side metrics are in the report: noise std and signal-to-noise.
    privacy = report["server"]["rounds"][0]["privacy"]
    assert privacy["noise"]["noise-std"] >= 1.0 - 1e-9 and privacy["noise"]["snr"] >= 0  # at least z*C (distributed shares sized for the honest floor)
    assert 0 <= report["training"][0]["clip_fraction"] <= 1 and report["training"][0]["update_norm"]["q50"] > 0


def test_secure_aggregation_with_user_dp_runs_on_the_simulation_engine(tmp_path):
    from simulations.run import prepare, simulate

    overrides = {
        "num-supernodes": 4,
        "scrub-mode": "patterns",
        "secagg": True,
        "user-dp": True,
        "user-noise-multiplier": 1.0,
        "user-clip-norm": 0.5,
    }
    report = simulate(prepare("quick", overrides, tmp_path / "run"))
    rounds = report["server"]["rounds"]
    # (after round 1, the cold-start device declines: its next round would pass its record-level cap)
    assert rounds[0]["contributors"] == 4 and all(r["contributors"] + sum(r["refused"].values()) == 4 for r in rounds)
    assert all(r["rejected"] == 0 and set(r["refused"]) <= {"RECORD_BUDGET_SPENT"} for r in rounds)
    # Each train reply is one masked uint32 vector as long as the K-slot update
    # (plus headers), not float tensors; key, share and unmask replies are counted on top.
    length = _update_length()
    for r in rounds:
        assert all(4 * length <= b < 4 * length + 1024 for b in sorted(r["bytes_train_reply"])[-r["contributors"]:])
        assert all(b > 0 for b in r["bytes_secagg_replies"])
        assert r["bytes_per_client"] == [a + b for a, b in zip(r["bytes_train_reply"], r["bytes_secagg_replies"])]
        assert r["privacy"]["secure-sum"]["survivors"] == r["contributors"] and r["privacy"]["noise"]["snr"] >= 0
    eps = list(report["server"]["user_level"]["epsilon_per_round"].values())
    assert len(eps) == 2 and 0 < eps[0] < eps[1]
    assert report["server"]["user_level"]["noise_placement"] == "distributed"
    assert report["utility"]["users"] == 4


def test_poisson_sampled_user_level_dp_on_the_simulation_engine(tmp_path, monkeypatch):
    """fraction-train < 1 with user-level DP: Poisson client sampling, accounted with amplification.

    The server's coins are patched (the ServerApp runs in this process) so the
    cohorts are known: every round trains exactly the drawn devices.
    """
    import numpy as np

    from common import csprng
    from common.privacy.accounting import independent_user_epsilon
    from simulations.run import prepare, simulate

    patterns = iter([[1, 0, 1, 0, 0, 0], [0, 1, 1, 1, 0, 1], [0, 0, 0, 0, 1, 0]])
    monkeypatch.setattr(csprng, "bernoulli", lambda n, p: np.array(next(patterns), dtype=bool))
    overrides = {
        "num-supernodes": 6,
        "fraction-train": 0.5,
        "num-server-rounds": 3,
        "scrub-mode": "patterns",
        "secagg": False,  # the server draws the cohort (under secure aggregation the devices do)
        "user-dp": True,
        "user-noise-multiplier": 1.0,
        "user-clip-norm": 0.5,
    }
    report = simulate(prepare("quick", overrides, tmp_path / "run"))
    ul = report["server"]["user_level"]
    assert ul["sample_rate"] == 0.5 and "Poisson" in ul["sampling"]
    eps = [ul["epsilon_per_round"][k] for k in sorted(ul["epsilon_per_round"], key=int)]
    delta = ul["delta"]
    assert len(eps) == 3 and eps == sorted(eps)
    assert eps[-1] == pytest.approx(independent_user_epsilon(1.0, 3, delta, 0.5), rel=0.02)
    assert eps[-1] < independent_user_epsilon(1.0, 3, delta)  # amplification by sampling, against observers
    # The server drew the cohort and saw each update: no user-level guarantee against it.
    assert set(ul["epsilon_against_server"].values()) == {None} and "each device" in ul["server_view"]
    rounds = report["server"]["rounds"]
    assert [(r["sampled"], r["expected_cohort"]) for r in rounds] == [(2, 3.0), (4, 3.0), (1, 3.0)]
    # (a cold-start device drawn a second time declines: its record-level cap)
    assert all(r["contributors"] + r["refused"].get("RECORD_BUDGET_SPENT", 0) == r["sampled"] for r in rounds)
    assert [r["devices"] for r in report["training"]] == [r["contributors"] for r in rounds]


def test_a_failed_engine_stops_the_server_instead_of_waiting_out_the_round_timeout(tmp_path, monkeypatch):
    """The engine dies while the ServerApp waits for replies: the run raises, and the server thread ends.

    Flower returns from a failed engine without stopping the ServerApp thread,
    which would wait out the round timeout (an hour by default) and keep the
    process from exiting. The harness tells the server to stop waiting.
    """
    import threading
    import time

    from flwr.server.superlink.fleet import vce

    from simulations.run import prepare, simulate

    def dead_engine(**kwargs):
        time.sleep(2)  # the ServerApp is waiting for its first replies by now
        raise RuntimeError("the engine lost its workers")

    from server import strategy

    monkeypatch.setattr(vce, "start_vce", dead_engine)
    harness = prepare("quick", {"num-supernodes": 3, "scrub-mode": "patterns", "round-timeout": 3600.0}, tmp_path / "run")
    with pytest.raises(RuntimeError):
        simulate(harness)
    # simulate() returns once the server thread has ended (it waits up to a grace period far below the round timeout).
    assert not any(t.is_alive() for t in threading.enumerate() if "server_th" in t.name)
    assert not strategy.ENGINE_STOPPED.is_set()  # cleared once the thread ended: nothing else in the process sees it
