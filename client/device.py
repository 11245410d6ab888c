"""This device for one message: its admitted settings, its store, and its private state swapped in and out.

Order matters for the privacy floor. :func:`admit` reads the device's policy,
the run config and the message's per-round values and refuses before anything
is read from or written to the store; only then does :func:`open_device` open
the store (ingesting and scrubbing whatever is new in the user's file) and
load the model.

A client process serves many users over its life (Flower's simulation runs
many virtual SuperNodes per worker; an edge device may host several
profiles). The frozen base model stays loaded; per user we swap in and out
the user tier (private LoRA adapter + soft prompt), the optimizer state and
the record-level accountant, all kept in that user's SQLite store and never
sent anywhere.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from client.policy import DevicePolicy, Refused
from client.store import DeviceStore, ProgressFn, default_key_file
from common.config import ConfigError, RunConfig
from common.models import USER, AdapterSpec, PersonalLM, cache_dir, personal_model, tier_of
from common.wire import CONFIG, DEVICE_PATH_KEYS, ROUND_CLIP_KEY, SECAGG, Reason, message_config_violation

log = logging.getLogger(__name__)

USER_TIER = "user-tier.safetensors"
ACCOUNTANT = "accountant-state.json"
OPTIMIZER = "optimizer.pt"
PARTICIPATION = "participation.json"
EVAL_RESULTS = "eval-results.json"
DIAGNOSTICS = "diagnostics.json"
CALIBRATION = "noise-calibration.json"
CONTEXT = "context-phrases.json"  # the phrases this device released for its prompts (client/context.py)
CLIP_NORM = "adaptive-clip.json"  # where adaptive clipping left the record-level clip norm
LAST_UPDATE = "last-update.npz"  # the last released (clipped, noised, unmasked) update and its request's fingerprint


class DeviceDataMissing(FileNotFoundError):
    pass


@dataclass
class Admission:
    policy: DevicePolicy
    cfg: RunConfig  # the run config as this device admitted it (tightened to its floor)
    server_round: int
    round_clip: float | None = None  # this round's user-level C (adaptive clipping only)


@dataclass
class Device:
    policy: DevicePolicy
    cfg: RunConfig
    server_round: int
    store: DeviceStore
    model: PersonalLM
    round_clip: float | None = None


def admit(msg, context) -> Admission:
    """Policy, run config and message checks; reads no store and writes nothing. Raises :class:`Refused`."""
    policy = DevicePolicy.for_node(dict(context.node_config))
    run = dict(context.run_config)
    if any(key in DEVICE_PATH_KEYS for key in run):
        raise Refused(Reason.DEVICE_PATH_FROM_SERVER)
    try:
        cfg = RunConfig.from_flat(run)
    except ConfigError as err:
        raise Refused(Reason.CONFIG_INVALID, err.key) from None
    per_round = dict(msg.content[CONFIG]) if CONFIG in msg.content.keys() else {}
    violation = message_config_violation(per_round)
    if violation is not None:
        raise Refused(violation)
    admitted = policy.admit(cfg)
    round_clip = per_round.get(ROUND_CLIP_KEY)
    if round_clip is not None:
        # Only an adaptive run's train message carries a C; the clip step caps it at user-clip-norm.
        if not (admitted.user_dp.adaptive and msg.metadata.message_type == "train"):
            raise Refused(Reason.CONFIG_KEY_NOT_ALLOWED)
        if not (math.isfinite(round_clip) and round_clip > 0):
            raise Refused(Reason.CONFIG_INVALID, ROUND_CLIP_KEY)
    elif admitted.user_dp.adaptive and msg.metadata.message_type == "train":
        raise Refused(Reason.PROTOCOL_ERROR)
    if msg.metadata.message_type == "train" and (policy.require_secagg or admitted.secagg.enabled) and SECAGG not in msg.content.keys():
        # A plain round in a secure run (or to a device that requires secure aggregation) is refused.
        raise Refused(Reason.SECAGG_REQUIRED)
    return Admission(policy, admitted, int(per_round.get("server-round", 0)), round_clip)


def open_device(msg, context) -> Device:
    """Admit the message, then open this user's store and load its private tier into the model."""
    adm = admit(msg, context)
    store = open_store(adm.cfg, adm.policy, dict(context.node_config))
    model = personal_model(AdapterSpec.from_config(adm.cfg))
    swap_in_user(model, store)
    return Device(adm.policy, adm.cfg, adm.server_round, store, model, adm.round_clip)


def locate_user(cfg: RunConfig, policy: DevicePolicy, node_config: dict) -> tuple[Path, Path]:
    """Return (raw JSONL file, SQLite store path) for this node.

    A deployed device names its own files in its policy. A simulated node with
    no policy (Flower's own simulation engine, ``flwr run .``) takes the n-th
    user file of the simulation's data folder and keeps its store in this
    machine's cache, never in a folder a server message names.
    """
    if policy.user_file:
        user_file = Path(policy.user_file)
        return user_file, Path(policy.store_path) if policy.store_path else user_file.with_suffix(".sqlite")
    if "partition-id" not in node_config:
        raise DeviceDataMissing("this device has no policy naming its user file (policy-file in --node-config)")
    data_dir = Path(cfg.data.data_dir)
    users = sorted((data_dir / "users").glob("*.jsonl"))
    if not users:
        raise DeviceDataMissing(f"no user files under {data_dir / 'users'} (run `fedpersona generate` first)")
    pid = int(node_config["partition-id"])
    if pid >= len(users):
        raise DeviceDataMissing(f"partition {pid} has no user file ({len(users)} users in {data_dir})")
    user_file = users[pid]
    store = Path(policy.store_path) if policy.store_path else cache_dir() / "devices" / _folder_key(data_dir) / f"{user_file.stem}.sqlite"
    return user_file, store


def _folder_key(path: Path) -> str:
    return hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]


@functools.lru_cache(maxsize=4)
def scrubber(mode: str, operator: str, config_path: str = "", secret: bytes = b""):
    """A Presidio scrubber (the engine is loaded once per process and config).

    ``config_path`` is the owner's Presidio-format YAML ("" = the packaged
    default). ``secret`` keys the ``pseudonym`` operator and comes from the
    device store. ``off`` exists only for the audits' control arm, which the
    device's policy must allow explicitly: it stores raw text and says so.
    """
    if mode == "off":
        from client.store import ScrubOutcome

        log.warning("scrub-mode=off: raw text is stored UNSCRUBBED on this device (an audit control arm, never for real data)")
        return lambda texts: [ScrubOutcome(text, 0, None) for text in texts]
    from client.pii import Scrubber

    return Scrubber.from_config(Path(config_path) if config_path else None, mode=mode,
                                operator=operator, device_secret=secret or None)


def key_file_for(policy: DevicePolicy, store_path: Path) -> Path:
    """The store's key file: where the device's policy says, else next to the store."""
    return Path(policy.key_file) if policy.key_file else default_key_file(store_path)


def open_store(cfg: RunConfig, policy: DevicePolicy, node_config: dict, progress: ProgressFn | None = None) -> DeviceStore:
    """Open this user's store and ingest (and scrub) what is new in the raw file.

    An unchanged file costs a stat and a small read; the scrubber is built
    only when there is something to ingest. A failed first ingest leaves no
    store behind (nor a key file it created).
    """
    user_file, store_path = locate_user(cfg, policy, node_config)
    if not user_file.is_file():
        raise DeviceDataMissing(f"{user_file}: no such user file")
    key_file = key_file_for(policy, store_path)
    fresh, fresh_key = not store_path.exists(), not key_file.exists()
    store_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        store = DeviceStore(store_path, key_file)
        if store.needs_ingest(user_file):
            secret = store.device_secret() if cfg.scrub.operator == "pseudonym" else b""
            scrub = scrubber(cfg.scrub.mode, cfg.scrub.operator, cfg.scrub.config, secret)
            counts = store.ingest_jsonl(user_file, scrub=scrub, progress=progress)
            log.info("ingested %d new records into the device store (%d quarantined)",
                     sum(v for k, v in counts.items() if k != "scrubbed_entities"), counts["quarantined"])
    except Exception:
        if fresh:  # a failed first ingest leaves no empty store behind
            for path in (store_path, *(store_path.with_name(store_path.name + s) for s in ("-wal", "-shm", "-journal"))):
                path.unlink(missing_ok=True)
            if fresh_key:
                key_file.unlink(missing_ok=True)
        raise
    return store


def read_store(policy: DevicePolicy) -> DeviceStore:
    """This device's existing store, opened outside a round to read it (``fedpersona export`` and ``ask``).

    The store and its key file are found as :func:`open_store` finds them
    (the policy's ``store-path``, else next to its user file; the policy's
    ``key-file``, else next to the store), but nothing is ingested and no store
    or key file is ever created.
    """
    if policy.store_path:
        store_path = Path(policy.store_path)
    elif policy.user_file:
        store_path = Path(policy.user_file).with_suffix(".sqlite")
    else:
        raise DeviceDataMissing("no device store named (give --store, or a policy file with store-path)")
    return DeviceStore.open_existing(store_path, key_file_for(policy, store_path))


def swap_in_user(model: PersonalLM, store: DeviceStore) -> None:
    """Load this user's private tier, or the seeded initial values for a new user."""
    blob = store.get_state(USER_TIER)
    user_keys = {k for k in model.trainable_state() if tier_of(k) == USER}
    if blob is None:
        model.reset_to_initial(user_keys)
    else:
        tensors = load_tensors(blob)
        if set(tensors) != user_keys:
            raise RuntimeError("stored user tier does not match the model spec; delete the device store to start afresh")
        model.load_trainable(tensors)


def swap_out_user(model: PersonalLM, store: DeviceStore, accountant: str | None, optimizer: bytes) -> None:
    tensors = {k: v.detach().contiguous().clone() for k, v in model.trainable_state().items() if tier_of(k) == USER}
    store.put_state(USER_TIER, save_tensors(tensors))
    if accountant is not None:
        store.put_state(ACCOUNTANT, accountant.encode())
    store.put_state(OPTIMIZER, optimizer)


def accountant_state(store: DeviceStore) -> str | None:
    blob = store.get_state(ACCOUNTANT)
    return blob.decode() if blob else None


def get_json(store: DeviceStore, key: str, default):
    blob = store.get_state(key)
    return json.loads(blob) if blob else default


def put_json(store: DeviceStore, key: str, value) -> None:
    store.put_state(key, json.dumps(value).encode())


def served_phrases(store: DeviceStore, cfg: RunConfig) -> list:
    """The context phrases this device's trained stacks are served with (none until it released them,
    or with ``context = none``)."""
    if cfg.train.context == "none":
        return []
    return get_json(store, CONTEXT, {"phrases": []})["phrases"]


def put_state_array(store: DeviceStore, key: str, array, tag: str) -> None:
    import io

    import numpy as np

    buf = io.BytesIO()
    np.savez(buf, array=array, tag=np.array(tag))
    store.put_state(key, buf.getvalue())


def get_state_array(store: DeviceStore, key: str):
    """(array, tag) kept with :func:`put_state_array`, or None."""
    import io

    import numpy as np

    blob = store.get_state(key)
    if blob is None:
        return None
    with np.load(io.BytesIO(blob)) as data:
        return data["array"], str(data["tag"])
