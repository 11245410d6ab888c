"""The device's persona choice: which of the server's K persona slots this device uses and updates.

The choice is made here, from this device's own data, and kept in its store;
the server never learns it (the K-slot update of ``common.kslot`` hides it in
a sum):

* ``random`` (default): a slot drawn once from the device's own secret. It
  derives nothing from the data, so nothing about the data leaves with it;
* ``kmeans``: the persona centroid nearest to the device's profile embedding
  (federated k-means; centroids are per-slot means of the devices' profiles,
  learned through the same sums);
* ``ifca`` (Ghosh et al. 2020): the slot whose global + persona model has the
  lowest loss on a few training examples.

``kmeans`` and ``ifca`` make the choice (and kmeans the profile row it sends)
a function of the device's data, so the run config allows them only under
user-level DP with device-added noise and secure aggregation, where that whole
update is clipped, noised and summed. Ties (round 1 has no centroids, or
identical slots) are broken by a generator keyed with HMAC(device secret,
round): device randomness the server neither chooses nor can predict.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import random

import numpy as np
import torch
from torch.utils.data import TensorDataset

from client.store import DeviceStore
from common.config import RunConfig
from common.models import GLOBAL, PERSONA, PersonalLM

CHOICE_STATE = "persona-choice.json"
PROFILE_STATE = "profile-embedding.npy"


def nearest_centroid(profile: np.ndarray, centroids: np.ndarray | None, num_slots: int, rng: random.Random) -> int:
    """The slot whose centroid is nearest to this device's profile embedding.

    Slots without a centroid yet (all-zero row) are skipped; with none at all
    (round 1) the device picks uniformly: a random-partition start of k-means.
    """
    rows = np.zeros((num_slots, 1)) if centroids is None else np.asarray(centroids, dtype=np.float64)
    ks = [k for k in range(num_slots) if float(np.linalg.norm(rows[k])) > 0]
    if not ks:
        return rng.randrange(num_slots)
    dist = [float(np.sum((profile - rows[k]) ** 2)) for k in ks]
    best = min(dist)
    return rng.choice([k for k, d in zip(ks, dist) if d <= best + 1e-12])


def tie_break_rng(store: DeviceStore, server_round: int | str) -> random.Random:
    """Device-local randomness for the persona choice, keyed by the device's own secret."""
    digest = hmac.new(store.device_secret(), f"fedpersona/persona-tie-break/{server_round}".encode(), hashlib.sha256).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _identical(slots: dict[int, dict[str, torch.Tensor]]) -> bool:
    first = next(iter(slots.values()))
    return all(all(torch.equal(first[k], s[k]) for k in first) for s in slots.values())


@torch.no_grad()
def choose_persona(
    model: PersonalLM,
    slots: dict[int, dict[str, torch.Tensor]],
    data: TensorDataset,
    num_examples: int,
    rng: random.Random,
) -> tuple[int, list[float]]:
    """IFCA: the slot with the lowest mean NLL of global + persona on ``num_examples`` training examples.

    Returns (slot, per-slot losses). Ties (identical slots, or no data) are
    broken uniformly at random: that is how round 1 spreads users over slots.
    """
    from client.train import evaluate_nll

    subset = data[: max(1, num_examples)] if len(data) else None
    if subset is None or _identical(slots):
        return rng.choice(list(slots)), []
    sample = TensorDataset(*subset)
    losses = []
    for k in sorted(slots):
        model.load_trainable(slots[k])
        nll, _ = evaluate_nll(model, sample, (GLOBAL, PERSONA))
        losses.append(nll)
    best = min(losses)
    ties = [k for k, v in zip(sorted(slots), losses) if v <= best + 1e-9]
    return rng.choice(ties), losses


def pick_and_load(
    model: PersonalLM,
    slots: dict[int, dict[str, torch.Tensor]],
    centroids: np.ndarray | None,
    data: TensorDataset,
    cfg: RunConfig,
    store: DeviceStore,
    server_round: int,
    phase: str,
) -> int:
    """Choose this device's persona, load that slot into the live adapter, note the choice locally."""
    if cfg.persona.assign == "random":
        k = tie_break_rng(store, "random-slot").randrange(len(slots))  # the same slot every round
    elif cfg.persona.assign == "kmeans":
        rng = tie_break_rng(store, server_round)
        k = nearest_centroid(device_profile(store), centroids, len(slots), rng)
    else:
        k, _ = choose_persona(model, slots, data, cfg.persona.ifca_examples, tie_break_rng(store, server_round))
    model.load_trainable(slots[k])
    record_choice(store, phase, server_round, k)
    return k


def device_profile(store: DeviceStore) -> np.ndarray:
    """This device's profile embedding, computed once from its scrubbed text and kept in its store."""
    from client.profile import profile_embedding

    blob = store.get_state(PROFILE_STATE)
    if blob is not None:
        return np.load(io.BytesIO(blob))
    texts = store.documents()[:16] + [out for _, out in store.tasks("train")[:8]]
    vec = profile_embedding(texts)
    buf = io.BytesIO()
    np.save(buf, vec)
    store.put_state(PROFILE_STATE, buf.getvalue())
    return vec


def record_choice(store: DeviceStore, phase: str, server_round: int, slot: int) -> None:
    """Keep the choice on the device (simulation diagnostics read it; it is never sent)."""
    blob = store.get_state(CHOICE_STATE)
    history = json.loads(blob) if blob else {}
    history.setdefault(phase, {})[str(server_round)] = slot
    store.put_state(CHOICE_STATE, json.dumps(history).encode())
