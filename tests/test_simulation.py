"""One whole federated simulation on Flower's simulation engine (Ray), tiny model."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


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
        for key in ("nll_base", "nll_global", "nll_personal"):
            assert user[key] > 0
    # Every round, each client sent exactly the global adapter (float32).
    schema_bytes = report["rounds"][0]["bytes_per_client"][0]
    assert all(b == schema_bytes for r in report["rounds"] for b in r["bytes_per_client"])
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
    # Each train reply is one masked uint32 vector (plus the .npy header), not float tensors.
    from common.models import AdapterSpec, personal_model
    from common.config import build_config

    length = sum(v.numel() for v in personal_model(AdapterSpec.from_run_config(build_config("quick"))).shared_state().values())
    assert all(4 * length <= b < 4 * length + 256 for r in report["rounds"] for b in r["bytes_per_client"])
    eps = list(report["user_level"]["epsilon_per_round"].values())
    assert len(eps) == 2 and 0 < eps[0] < eps[1]
    assert len(report["users"]) == 4
