"""The server's checkpoint: one file, written atomically after every round, read on restart.

Flower's ``Strategy.start()`` has no resume: killing the SuperLink or the
ServerApp mid-run loses the run, while the devices have already spent privacy
budget on the lost rounds. After every round the server writes
``checkpoint.safetensors`` in its run folder: the shared tiers (tensors) and,
as the file's metadata, the round number and the strategy's state (per-round
report rows and the user-level accountant). It writes a temporary file,
fsyncs it, and renames it over the old one, so a crash at any point leaves
either the previous round's checkpoint or this one, never half of one. The
server's randomness (cohort coins, noise) comes from the OS and needs no
state; the initial slots are seeded by the run config.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

CHECKPOINT_FILE = "checkpoint.safetensors"
FORMAT = "fedpersona-checkpoint-1"


def save(run_dir: Path, server_round: int, arrays: dict[str, np.ndarray], state: dict, run_config: dict) -> Path:
    from safetensors.numpy import save_file

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / CHECKPOINT_FILE
    tmp = path.with_name(f".{CHECKPOINT_FILE}.{os.getpid()}.tmp")
    meta = {"format": FORMAT, "round": str(server_round), "state": json.dumps(state), "run_config": json.dumps(run_config, sort_keys=True)}
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp), metadata=meta)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(run_dir, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself is durable
    finally:
        os.close(dir_fd)
    return path


def load(run_dir: Path, run_config: dict) -> tuple[int, dict[str, np.ndarray], dict] | None:
    """(last complete round, shared tiers, strategy state), or None when there is no checkpoint.

    A checkpoint of another run configuration is an error, not a silent restart.
    """
    from safetensors import safe_open
    from safetensors.numpy import load_file

    path = Path(run_dir) / CHECKPOINT_FILE
    if not path.is_file():
        return None
    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a fedpersona checkpoint")
    if json.loads(meta["run_config"]) != json.loads(json.dumps(run_config, sort_keys=True)):
        raise ValueError(f"{path}: the checkpoint belongs to a different run configuration; use a new run folder")
    return int(meta["round"]), load_file(str(path)), json.loads(meta["state"])
