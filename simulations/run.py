"""Run one federated simulation on Flower's simulation engine (Ray backend).

The harness plays every device's owner: it generates the embedded persona
dataset into the run directory and writes each device's policy file from the
run's own settings (so a non-private baseline or an audit control arm stays
one ``--set`` away), then starts the real ServerApp and ClientApp with one
virtual SuperNode per user. ``config.json`` records the run config and where
every device keeps its data; the audits read device locations from there.

The ClientApp gets its run config the way a deployed one does: from the app's
``pyproject.toml`` (the harness writes one for the run), never from a server
message. Devices find their policies through :data:`SIM_POLICY_DIR_ENV`, a
setting of the machine they run on.
"""

from __future__ import annotations

import json
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from client.policy import SIM_POLICY_DIR_ENV, DevicePolicy, sim_policy_name, write_policy
from common.config import RunConfig, build_config
from simulations.personas import DatasetSpec, generate_dataset

HARNESS_CONFIG = "config.json"


def new_run_dir(root: Path = Path("runs")) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = root / stamp
    n = 1
    while path.exists():
        path = root / f"{stamp}-{n}"
        n += 1
    return path


def device_policy(cfg: RunConfig, user_file: Path, store: Path) -> DevicePolicy:
    """The policy the harness writes for a simulated device: the run's own settings as the floor."""
    t = cfg.train
    return DevicePolicy(
        user_file=str(user_file.resolve()),
        store_path=str(store.resolve()),
        min_scrub_mode=cfg.scrub.mode,
        audit_control_arm=cfg.scrub.mode == "off",
        scrub_operator=cfg.scrub.operator,
        scrub_config=cfg.scrub.config,
        dp_required=t.dp,
        # With a target epsilon each device calibrates its own noise: the cap is then the floor.
        min_noise_multiplier=t.noise_multiplier if t.dp and t.target_epsilon == 0 else 0.0,
        max_clip_norm=t.max_grad_norm,
        max_delta=t.delta,
        max_epsilon=t.max_epsilon,
        require_secagg=cfg.secagg.enabled,
        persona_tier=cfg.persona.slots > 0,
    )


class DataFolderError(ValueError):
    """A user folder that cannot be simulated: every bad file as ``file:line: reason``, never content."""


def user_files(folder: Path) -> list[Path]:
    """The per-user JSONL files of a data folder: ``folder/users/*.jsonl``, else ``folder/*.jsonl``."""
    folder = Path(folder)
    files = sorted((folder / "users").glob("*.jsonl")) or sorted(folder.glob("*.jsonl"))
    if not files:
        raise DataFolderError(f"{folder}: no per-user .jsonl files (in users/ or at the top level)")
    return files


def validate_folder(folder: Path) -> list[dict]:
    """Validate every user file first; returns the participants (from ``manifest.json`` if present)."""
    from client.jsonl import IngestError, validate_file

    folder = Path(folder)
    files = user_files(folder)
    errors = []
    for path in files:
        try:
            validate_file(path)
        except IngestError as err:
            errors.append(str(err))
    if errors:
        raise DataFolderError(f"{len(errors)} of {len(files)} user files are malformed; nothing was ingested:\n" + "\n".join(errors))
    manifest_path = folder / "manifest.json"
    if manifest_path.is_file():
        users = [u for u in json.loads(manifest_path.read_text())["users"] if not u.get("holdout")]
        missing = [u["file"] for u in users if not (folder / u["file"]).is_file()]
        if missing:
            raise DataFolderError(f"{manifest_path}: {len(missing)} listed user file(s) missing")
        return users
    return [{"user_id": p.stem, "file": str(p.relative_to(folder))} for p in files]


def prepare(profile: str = "default", overrides: dict | None = None, run_dir: Path | None = None, data: Path | None = None,
            audit_seed: int | None = None) -> dict:
    """Validate the config (and a user data folder, if given), write every device's policy; returns the harness config.

    Without ``data`` (or a ``data-dir`` override) the embedded persona dataset
    is generated into the run folder. With it, every user file is validated
    first, one device per file, and nothing is generated; ``num-supernodes``
    becomes the number of users. Validation happens before anything is
    written: a bad value or a bad file leaves no run folder behind.

    ``audit_seed`` fixes the audit canaries' phrases and inclusion coins (a
    reproducible test run); by default they come from OS entropy, so no one who
    reads the run config can know them.
    """
    overrides = dict(overrides or {})
    data = Path(data) if data is not None else (Path(str(overrides.pop("data-dir"))) if "data-dir" in overrides else None)
    participants = None
    if data is not None:
        participants = validate_folder(data)
        overrides["num-supernodes"] = len(participants)
    cfg = build_config(profile, overrides)
    run_dir = Path(run_dir) if run_dir else new_run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    if data is None:
        data_dir = run_dir / "data"
        spec = DatasetSpec(
            num_users=cfg.federation.num_supernodes,
            num_personas=cfg.data.num_personas,
            seed=cfg.seed,
            holdout_users=cfg.data.holdout_users,
            audit_canaries=cfg.data.audit_canaries,  # their inclusion coins: OS entropy, kept in the manifest only
            audit_seed=audit_seed,
        )
        participants = [u for u in generate_dataset(data_dir, spec)["users"] if not u.get("holdout")]
    else:
        data_dir = data.resolve()
    cfg = cfg.with_values(**{"data-dir": str(data_dir), "run-dir": str(run_dir)})
    devices_dir, policies = run_dir / "devices", run_dir / "devices" / "policies"
    policies.mkdir(parents=True, exist_ok=True)
    devices = []
    for pid, user in enumerate(participants):
        user_file = data_dir / user["file"]
        store = devices_dir / f"{user_file.stem}.sqlite"
        policy = policies / sim_policy_name(pid)
        write_policy(policy, device_policy(cfg, user_file, store))
        devices.append({"partition": pid, "user_id": user["user_id"], "user_file": str(user_file), "store": str(store), "policy": str(policy)})
    harness = {
        "run": cfg.flat(),
        "data_dir": str(data_dir),
        "devices": devices,
        "policies_dir": str(policies),
        "holdout_devices_dir": str(run_dir / "holdout-devices"),
        "wire_dir": None,
    }
    (run_dir / HARNESS_CONFIG).write_text(json.dumps(harness, indent=2))
    return harness


def read_harness(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / HARNESS_CONFIG).read_text())


def _flower_app_dir(run_dir: Path, cfg: RunConfig) -> Path:
    """A minimal Flower app folder whose ``pyproject.toml`` carries this run's config.

    Flower fuses an app's ``[tool.flwr.app.config]`` into every ClientApp's
    ``context.run_config``: the same channel a deployed device gets it through.
    """
    import tomli_w

    folder = run_dir / "flower-app"
    folder.mkdir(exist_ok=True)
    project = {
        "project": {"name": "fedpersona-run", "version": "0.1.0", "description": "fedpersona simulation run", "license": "Apache-2.0"},
        "tool": {"flwr": {"app": {
            "publisher": "fedpersona",
            "components": {"serverapp": "server.app:app", "clientapp": "client.app:app"},
            "config": cfg.flat(),
        }}},
    }
    (folder / "pyproject.toml").write_text(tomli_w.dumps(project))
    return folder


# How long a failed run waits for Flower's ServerApp thread to stop (it checks at every wait).
SERVER_STOP_GRACE_S = 30.0


@contextmanager
def _stop_server_if_engine_fails():
    """If the engine fails (Ray lost, a crash, Ctrl-C), the ServerApp thread stops waiting, so the process exits with the error."""
    from server import strategy as strategy_mod

    try:
        yield
    except BaseException:
        strategy_mod.ENGINE_STOPPED.set()
        # Flower's ServerApp thread checks the event at its next wait (within a second). Once it has
        # ended the event is cleared, so nothing else in this process sees a stopped engine; a thread
        # still busy after the grace period keeps it set and stops at its next wait.
        servers = [t for t in threading.enumerate() if t is not threading.current_thread() and "server_th" in t.name]
        for thread in servers:
            thread.join(timeout=SERVER_STOP_GRACE_S)
        if not any(t.is_alive() for t in servers):
            strategy_mod.ENGINE_STOPPED.clear()
        raise


@contextmanager
def _device_environment(policies_dir: str):
    """The simulated devices' machine settings: offline, and where the harness put their policies."""
    settings = {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "RAY_DEDUP_LOGS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        SIM_POLICY_DIR_ENV: policies_dir,
    }
    saved = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def simulation_backend() -> dict:
    """The Ray backend of a simulation on this machine: one client at a time, torch on every core."""
    cpus = os.cpu_count() or 2
    return {
        "client_resources": {"num_cpus": cpus, "num_gpus": 0.0},
        "init_args": {"num_cpus": cpus, "include_dashboard": False},
    }


def simulate(harness: dict, on_round=None, record_wire: bool = False) -> dict:
    """Run the simulation described by the harness config; returns the full report (server + devices)."""
    from flwr.app import Context, RecordDict
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.telemetry import EventType

    from client.app import make_app
    from server import strategy as strategy_mod
    from server.app import app as server_app
    from server.report import SERVER_REPORT
    from simulations.link_state import indexed_link_state
    from simulations.results import write_full_report
    from simulations.wire_recorder import recorder_mod

    cfg = RunConfig.from_flat(harness["run"])
    run_dir = Path(cfg.output.run_dir)
    mods = []
    if record_wire:
        harness["wire_dir"] = str(run_dir / "wire")
        (run_dir / HARNESS_CONFIG).write_text(json.dumps(harness, indent=2))
        mods.append(recorder_mod(Path(harness["wire_dir"])))
    strategy_mod.ROUND_HOOKS[:] = [on_round] if on_round else []
    ctx = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config=cfg.flat())
    started = time.time()
    # The indexed link state: Flower's engine otherwise walks every waiting message for every
    # node on each 0.1 s poll, N^2 per poll (simulations/link_state.py).
    strategy_mod.ENGINE_STOPPED.clear()
    with _device_environment(harness["policies_dir"]), indexed_link_state(), _stop_server_if_engine_fails():
        # run_simulation()'s public wrapper drops the run config; _run_simulation
        # is the same engine with a ServerApp context we can fill (flwr is pinned).
        _run_simulation(
            num_supernodes=cfg.federation.num_supernodes,
            client_app=make_app(mods),
            server_app=server_app,
            backend_config=simulation_backend(),
            server_app_context=ctx,
            app_dir=str(_flower_app_dir(run_dir, cfg)),
            is_app=True,
            exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
        )
    if not (run_dir / SERVER_REPORT).is_file():
        raise RuntimeError("the simulation ended without a server report; see the log above")
    return write_full_report(run_dir, harness, wall_s=time.time() - started)
