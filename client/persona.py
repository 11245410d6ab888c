"""The device's half of the persona tier: choose a persona locally, build the K-slot update.

The server never learns which persona a device chose (issue #4):

* the choice is made here, from this device's own data: by default the
  persona centroid nearest to the device's profile embedding (federated
  k-means; the centroids are per-slot means of the devices' profiles, learned
  through the same sums), or IFCA-style (Ghosh et al. 2020): the slot whose
  global + persona model has the lowest loss on a few training examples;
* the update the device sends has all K persona slots, zero except its own,
  its profile in its own row of the centroid block, and a one-hot count
  vector; under secure aggregation the server sees only their sums over all
  clients.

With user-level DP the whole update (every tier and the count) is clipped so
that one Gaussian mechanism covers it, and under secure aggregation each device
adds its share of that noise before masking ("distributed" noise), so no party
ever holds a noiseless sum.
"""

from __future__ import annotations

import hashlib
import json
import math
import random

import numpy as np
import torch
from torch.utils.data import TensorDataset

from client.store import DeviceStore
from common.models import PersonalLM
from common.tiers import CENTROID_KEY, COUNT_KEY, GLOBAL, PERSONA, count_scale, live_key, slot_of

CHOICE_STATE = "persona-choice.json"


def split_slots(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[int, dict[str, torch.Tensor]]]:
    """Separate the server's tensors into the directly loadable part and the K persona slots.

    Slot k's dict also carries its centroid row under ``CENTROID_KEY``.
    """
    direct, slots = {}, {}
    centroids = tensors.get(CENTROID_KEY)
    for key, value in tensors.items():
        k = slot_of(key)
        if key == CENTROID_KEY:
            continue
        if k is None:
            direct[key] = value
        else:
            slots.setdefault(k, {})[live_key(key)] = value
    if centroids is not None:
        for k in slots:
            slots[k][CENTROID_KEY] = centroids[k]
    return direct, dict(sorted(slots.items()))


def _model_part(slot: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in slot.items() if k != CENTROID_KEY}


def nearest_centroid(profile: np.ndarray, slots: dict[int, dict[str, torch.Tensor]], rng: random.Random) -> int:
    """The slot whose centroid is nearest to this device's profile embedding.

    Slots without a centroid yet (all-zero row) are skipped; with none at all
    (round 1) the device picks uniformly: a random-partition start of k-means.
    """
    ks = [k for k in sorted(slots) if CENTROID_KEY in slots[k] and float(slots[k][CENTROID_KEY].norm()) > 0]
    if not ks:
        return rng.choice(list(slots))
    dist = [float(np.sum((profile - slots[k][CENTROID_KEY].numpy()) ** 2)) for k in ks]
    best = min(dist)
    return rng.choice([k for k, d in zip(ks, dist) if d <= best + 1e-12])


def _tie_break_rng(store: DeviceStore, server_round: int) -> random.Random:
    # Device-local randomness: the store path is this device's own secret-ish
    # identity; the server neither chooses nor sees it.
    digest = hashlib.sha256(f"{store.path}:{server_round}".encode()).digest()
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
    slots = {k: _model_part(v) for k, v in slots.items()}
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


def pick_and_load(model: PersonalLM, slots, data, config: dict, store: DeviceStore, server_round: int, phase: str) -> int:
    """Choose this device's persona, load that slot into the live adapter, note the choice locally.

    ``persona-assign``: ``kmeans`` (default), the nearest centroid to the
    device's profile embedding; ``ifca``, the slot with the lowest loss.
    """
    rng = _tie_break_rng(store, server_round)
    if str(config.get("persona-assign", "kmeans")) == "kmeans":
        k = nearest_centroid(device_profile(store), slots, rng)
    else:
        k, _ = choose_persona(model, slots, data, int(config.get("ifca-examples", 8)), rng)
    load_slot(model, slots[k])
    record_choice(store, phase, server_round, k)
    return k


def load_slot(model: PersonalLM, slot: dict[str, torch.Tensor]) -> None:
    """Load one persona slot's adapter tensors into the live persona adapter."""
    model.load_trainable(_model_part(slot))


PROFILE_STATE = "profile-embedding.npy"


def device_profile(store: DeviceStore) -> np.ndarray:
    """This device's profile embedding, computed once from its scrubbed text and kept in its store."""
    import io

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


def slot_update(
    sent: dict[str, np.ndarray],
    trained: dict[str, np.ndarray],
    chosen: int | None,
    num_slots: int,
    clip_norm: float | None,
    profile: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """This device's update in the wire layout: the sent keys (+ the count vector).

    ``sent``: what the server sent (global + every slot + centroids), in its
    order. ``trained``: the live shared tensors after local training
    (``global/``, ``persona/``). Slot ``chosen`` carries the persona change and
    the centroid block the device's ``profile`` in row ``chosen``; everything
    else of the slots is zero. ``clip_norm`` (user-level DP) bounds the whole
    vector's norm.
    """
    update = {}
    for key, before in sent.items():
        k = slot_of(key)
        if key == CENTROID_KEY:
            continue  # filled in below, outside the model update's clipping
        if k is None:
            update[key] = trained[key] - before
        elif k == chosen:
            update[key] = trained[live_key(key)] - before
        else:
            update[key] = np.zeros_like(before)
    scale = count_scale(clip_norm)
    if clip_norm is not None:
        # Count and profile take their shares of the budget (common.tiers.count_scale).
        limit = clip_norm if not num_slots else scale
        norm = math.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in update.values()))
        if norm > limit:
            update = {k: v * (limit / norm) for k, v in update.items()}
    if num_slots:
        if CENTROID_KEY in sent:
            rows = np.zeros_like(sent[CENTROID_KEY])
            if profile is not None:
                rows[chosen] = scale * profile / max(float(np.linalg.norm(profile)), 1e-12)
            update[CENTROID_KEY] = rows
            update = {k: update[k] for k in sent}  # back in the sent order
        count = np.zeros(num_slots, dtype=np.float32)
        count[chosen] = scale
        update[COUNT_KEY] = count
    return {k: v.astype(np.float32) for k, v in update.items()}


def add_noise_share(update: dict[str, np.ndarray], noise_std: float, min_summands: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Distributed DP: this device's Gaussian share, std ``noise_std / sqrt(min_summands)``.

    Secure aggregation refuses to unmask fewer than ``min_summands`` inputs, so
    the released sum always carries noise of variance >= ``noise_std**2``.
    """
    share = noise_std / math.sqrt(min_summands)
    return {k: v + rng.normal(0.0, share, size=v.shape).astype(np.float32) for k, v in update.items()}
