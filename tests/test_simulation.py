"""One whole federated simulation on Flower's simulation engine (Ray), tiny model."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


def _update_length(num_slots: int) -> int:
    from common.config import build_config
    from common.models import AdapterSpec, personal_model
    from common.tiers import update_layout, update_length, wire_shapes

    shared = personal_model(AdapterSpec.from_run_config(build_config("quick"))).shared_params()
    return update_length(update_layout(wire_shapes({k: tuple(v.shape) for k, v in shared.items()}, num_slots), num_slots))


def test_quick_simulation_writes_a_three_way_report(tmp_path):
    from simulations.run import prepare, simulate

    cfg = prepare("quick", {"num-supernodes": 4, "scrub-mode": "patterns"}, tmp_path / "run")
    report = simulate(cfg)
    on_disk = json.loads((tmp_path / "run" / "report.json").read_text())
    assert on_disk["utility"] == report["utility"]
    assert (tmp_path / "run" / "report.md").read_text().startswith("# fedpersona simulation report")
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    assert all(r["clients"] == 4 and r["rejected_replies"] == 0 for r in report["rounds"])
    assert len(report["users"]) == 4
    for user in report["users"]:
        assert user["epsilon_record_level"] is not None and user["epsilon_record_level"] > 0
        for key in ("nll_base", "nll_global", "nll_persona", "nll_personal", "nll_served"):
            assert user[key] > 0
    # Per tier stack and per routing group (the generator makes 1 cold-start, 1 occasional, 2 frequent of 4).
    assert {"base", "global", "persona", "personal", "served"} <= set(report["utility"])
    groups = report["utility"]["routing_groups"]
    assert {g: groups[g]["users"] for g in groups} == {"cold-start": 1, "occasional": 1, "frequent": 2}
    # Every round, each client sent one K-slot update (float32) and its metrics;
    # the server learned per-slot counts summing to the 4 clients.
    payload = 4 * _update_length(3)
    assert all(payload <= b < 1.2 * payload for r in report["rounds"] for b in r["bytes_per_client"])  # + npy headers, names, metrics
    assert all(sum(r["persona_counts"]) == 4 for r in report["rounds"])
    # The raw data never reaches the server's report.
    text = (tmp_path / "run" / "report.json").read_text()
    sidecar = (tmp_path / "run" / "data" / "pii_sidecar.jsonl").read_text().splitlines()
    planted = [json.loads(line)["value"] for line in sidecar]
    assert planted and not any(value in text for value in planted)


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
    ul = report["user_level"]
    eps = [ul["epsilon_per_round"][k] for k in sorted(ul["epsilon_per_round"], key=int)]
    assert ul["rounds_planned"] == 4 and 0 < ul["rounds_run"] < 4  # budget 8 stops it early
    assert eps == sorted(eps) and eps[-1] <= 8.0
    assert eps[-1] == pytest.approx(ul["epsilon_independent"], rel=0.02)
    assert len(report["rounds"]) == ul["rounds_run"]


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
    assert [r["clients"] for r in report["rounds"]] == [4, 4]
    assert all(r["rejected_replies"] == 0 for r in report["rounds"])
    # Each train reply is one masked uint32 vector as long as the K-slot update
    # (plus headers and metrics), not float tensors; key, share and unmask
    # replies are counted on top.
    length = _update_length(3)
    for r in report["rounds"]:
        assert all(4 * length <= b < 4 * length + 1024 for b in r["bytes_train_reply"])
        assert all(b > 0 for b in r["bytes_secagg_replies"])
        assert r["bytes_per_client"] == [a + b for a, b in zip(r["bytes_train_reply"], r["bytes_secagg_replies"])]
    eps = list(report["user_level"]["epsilon_per_round"].values())
    assert len(eps) == 2 and 0 < eps[0] < eps[1]
    assert len(report["users"]) == 4


def test_poisson_sampled_user_level_dp_on_the_simulation_engine(tmp_path):
    """fraction-train < 1 with user-level DP: Poisson client sampling, accounted with amplification."""
    from common.dp import independent_user_epsilon
    from simulations.run import prepare, simulate

    overrides = {
        "num-supernodes": 6,
        "fraction-train": 0.5,
        "num-server-rounds": 3,
        "scrub-mode": "patterns",
        "user-dp": True,
        "user-noise-multiplier": 1.0,
        "user-clip-norm": 0.5,
    }
    report = simulate(prepare("quick", overrides, tmp_path / "run"))
    ul = report["user_level"]
    assert ul["sample_rate"] == 0.5 and "Poisson" in ul["sampling"]
    eps = [ul["epsilon_per_round"][k] for k in sorted(ul["epsilon_per_round"], key=int)]
    assert len(eps) == 3 and eps == sorted(eps)
    assert eps[-1] == pytest.approx(independent_user_epsilon(1.0, 3, 1e-3, 0.5), rel=0.02)
    assert eps[-1] < independent_user_epsilon(1.0, 3, 1e-3)  # amplification by sampling
    # Cohorts vary round to round (each node kept with probability 1/2).
    assert all(0 <= r["clients"] <= 6 for r in report["rounds"])
