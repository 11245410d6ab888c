"""This device's data and private state: where they live and how they are swapped in.

A client process serves many users over its life (Flower simulation runs many
virtual SuperNodes per worker; an edge device may host several profiles). The
frozen base model stays loaded; per user we swap in and out:

* the user tier (private LoRA adapter + soft prompt), as safetensors bytes,
* the optimizer state,
* the record-level accountant history,

all kept in that user's SQLite store and never sent anywhere.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from client.store import DeviceStore
from common.models import PersonalLM, tier_of

log = logging.getLogger(__name__)

USER_TIER = "user-tier.safetensors"
ACCOUNTANT = "accountant-history.json"
OPTIMIZER = "optimizer.pt"


class DeviceDataMissing(FileNotFoundError):
    pass


def locate_user(config: dict, node_config: dict) -> tuple[Path, Path]:
    """Return (raw JSONL file, SQLite store path) for this node.

    A deployed SuperNode names its own files in ``--node-config`` (``user-file``,
    ``store-path``): the server never learns device paths. In simulation the
    partition id picks the n-th user file of the shared data directory.
    """
    if "user-file" in node_config:
        user_file = Path(str(node_config["user-file"]))
        store = Path(str(node_config.get("store-path", user_file.with_suffix(".sqlite"))))
        return user_file, store
    data_dir = Path(str(config["data-dir"]))
    users = sorted((data_dir / "users").glob("*.jsonl"))
    if not users:
        raise DeviceDataMissing(f"no user files under {data_dir / 'users'} (run `fedpersona generate` first)")
    pid = int(node_config["partition-id"])
    if pid >= len(users):
        raise DeviceDataMissing(f"partition {pid} has no user file ({len(users)} users in {data_dir})")
    user_file = users[pid]
    store_dir = Path(str(config.get("store-dir") or data_dir / "devices"))
    return user_file, store_dir / f"{user_file.stem}.sqlite"


@functools.lru_cache(maxsize=4)
def scrubber(mode: str, operator: str, config_path: str = "", secret: bytes = b""):
    """A Presidio scrubber (the engine is loaded once per process and config).

    ``config_path`` is a Presidio-format YAML (``scrub-config``; "" = the
    packaged client/scrub_default.yaml). ``secret`` keys the ``pseudonym``
    operator and comes from the device store. ``off`` exists only for the
    privacy audits' control arm (canary exposure and regurgitation "with
    scrubbing off"): it stores raw text and says so.
    """
    if mode == "off":
        from client.store import ScrubOutcome

        log.warning("scrub-mode=off: raw text is stored UNSCRUBBED on this device (an audit control arm, never for real data)")
        return lambda texts: [ScrubOutcome(text, 0, None) for text in texts]
    from client.pii import Scrubber

    return Scrubber.from_config(Path(config_path) if config_path else None, mode=mode,
                                operator=operator, device_secret=secret or None)


def open_store(config: dict, node_config: dict) -> DeviceStore:
    """Open this user's store, ingesting (and scrubbing) the raw file on first use."""
    user_file, store_path = locate_user(config, node_config)
    store_path.parent.mkdir(parents=True, exist_ok=True)
    store = DeviceStore(store_path)
    if not store.is_ingested():
        operator = str(config.get("scrub-operator", "tag"))
        secret = store.device_secret() if operator == "pseudonym" else b""
        scrub = scrubber(str(config.get("scrub-mode", "full")), operator,
                         str(config.get("scrub-config", "")), secret)
        counts = store.ingest_jsonl(user_file, scrub=scrub)
        log.info("ingested %s records into the device store (%d quarantined)", sum(counts.values()), counts.get("quarantined", 0))
    return store


def swap_in_user(model: PersonalLM, store: DeviceStore) -> None:
    """Load this user's private tier, or the seeded initial values for a new user."""
    blob = store.get_state(USER_TIER)
    user_keys = {k for k in model.trainable_state() if tier_of(k) == "user"}
    if blob is None:
        model.reset_to_initial(user_keys)
    else:
        tensors = load_tensors(blob)
        if set(tensors) != user_keys:
            raise RuntimeError("stored user tier does not match the model spec; delete the device store to start afresh")
        model.load_trainable(tensors)


def swap_out_user(model: PersonalLM, store: DeviceStore, accountant: str | None, optimizer: bytes) -> None:
    tensors = {k: v.detach().contiguous().clone() for k, v in model.trainable_state().items() if tier_of(k) == "user"}
    store.put_state(USER_TIER, save_tensors(tensors))
    if accountant is not None:
        store.put_state(ACCOUNTANT, accountant.encode())
    store.put_state(OPTIMIZER, optimizer)


def accountant_history(store: DeviceStore) -> str | None:
    blob = store.get_state(ACCOUNTANT)
    return blob.decode() if blob else None
