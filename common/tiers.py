"""The three parameter tiers and the K-slot persona update, shared by both halves.

Tiers (see the README's architecture section):

* ``global``: one LoRA adapter, aggregated over every sampled client;
* ``persona``: K LoRA adapters ("slots"), slot k aggregated over the clients
  that chose persona k. The model holds one live ``persona/`` adapter; the
  server holds K copies under ``persona{k}/`` and the device loads the slot it
  chose into the live adapter;
* ``user``: a private LoRA adapter + the soft prompt; never leaves the device.

The K-slot update hides the persona choice (issue #4): every client sends all
K persona slots, zero except its own, its profile embedding in its own row of
a K x 384 centroid block, and a one-hot count vector. Summed under secure
aggregation the server learns per-persona sums, centroids and counts only.

Routing by data volume decides which tiers serve a user: cold-start users the
global tier, occasional users global + persona, frequent users all three.
"""

from __future__ import annotations

import math

import numpy as np

GLOBAL = "global"
PERSONA = "persona"
USER = "user"
COUNT_KEY = "persona-count"  # the one-hot count vector of a K-slot update
# Persona centroids in the profile-embedding space (all-MiniLM-L6-v2, 384-d):
# the server holds and sends K centroids; a K-slot update carries the device's
# profile embedding in its own row (federated k-means through the same sums).
CENTROID_KEY = "persona-centroids"
PROFILE_DIM = 384

# Routing groups, as the integer codes the evaluate metrics carry.
COLD_START, OCCASIONAL, FREQUENT = 0, 1, 2
GROUP_NAMES = {COLD_START: "cold-start", OCCASIONAL: "occasional", FREQUENT: "frequent"}


def slot_prefix(k: int) -> str:
    return f"{PERSONA}{k}/"


def slot_key(live_key: str, k: int) -> str:
    """``persona/layers.0...`` (the live adapter) -> ``persona{k}/layers.0...`` (slot k)."""
    return slot_prefix(k) + live_key.split("/", 1)[1]


def live_key(slot_key_: str) -> str:
    """``persona{k}/layers.0...`` -> ``persona/layers.0...``."""
    return f"{PERSONA}/" + slot_key_.split("/", 1)[1]


def slot_of(key: str) -> int | None:
    """The slot index of a server-side key, or None for non-slot keys."""
    head = key.split("/", 1)[0]
    if head.startswith(PERSONA) and head[len(PERSONA):].isdigit():
        return int(head[len(PERSONA):])
    return None


def wire_shapes(shared_shapes: dict[str, tuple[int, ...]], num_slots: int) -> dict[str, tuple[int, ...]]:
    """Keys and shapes the server holds and sends: the global tier, then slot 0..K-1.

    ``shared_shapes`` are the model's live shared tensors (``global/``,
    ``persona/``). Both halves derive the wire layout from this one function.
    """
    out = {k: v for k, v in shared_shapes.items() if not k.startswith(f"{PERSONA}/")}
    persona = {k: v for k, v in shared_shapes.items() if k.startswith(f"{PERSONA}/")}
    if num_slots and not persona:
        raise ValueError("persona slots requested but the model has no persona adapter")
    for k in range(num_slots):
        out.update({slot_key(key, k): shape for key, shape in persona.items()})
    if num_slots:
        out[CENTROID_KEY] = (num_slots, PROFILE_DIM)
    return out


def server_state(shared: dict, num_slots: int, slot_init_std: float, seed: int) -> dict[str, np.ndarray]:
    """The server's initial tensors, in :func:`wire_shapes` order.

    Slots start from small, *distinct* seeded values rather than the live
    adapter's zeros. Identical slots would give every device identical losses,
    and the device then picks uniformly (the round-1 tie-break); distinct
    starts let IFCA's loss comparison act from the first round on.
    """
    values = {k: np.asarray(v, dtype=np.float32) for k, v in shared.items()}
    gen = np.random.default_rng(seed)
    out = {}
    for key, shape in wire_shapes({k: v.shape for k, v in values.items()}, num_slots).items():
        k = slot_of(key)
        if key == CENTROID_KEY:
            out[key] = np.zeros(shape, dtype=np.float32)  # no centroid yet: devices pick uniformly
        elif k is None:
            out[key] = values[key]
        else:
            base = values[live_key(key)]
            out[key] = base + gen.normal(0.0, slot_init_std, size=base.shape).astype(np.float32)
    return out


def update_layout(shapes: dict[str, tuple[int, ...]], num_slots: int) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of one client's update: the sent tensors, plus the count vector."""
    layout = dict(shapes)
    if num_slots:
        layout[COUNT_KEY] = (num_slots,)
    return layout


def update_length(layout: dict[str, tuple[int, ...]]) -> int:
    return sum(math.prod(s) for s in layout.values())


def count_scale(clip_norm: float | None) -> float:
    """Norm given to each of the three parts of a K-slot update (model update, count, profile).

    Without user-level DP the count (1) and the unit profile embedding are
    exact. With it they are part of the noised sum, so each part gets a third
    of the squared clipping budget: the model update is clipped to C/sqrt(3),
    the count coordinate is C/sqrt(3) and the profile row has norm C/sqrt(3).
    The whole vector then has norm <= C and one Gaussian mechanism with std
    z*C covers all three; the decoded count carries noise of std z*sqrt(3).
    """
    return 1.0 if clip_norm is None else clip_norm / math.sqrt(3.0)


def routing_group(num_train_records: int, cold_start_below: int, frequent_from: int) -> int:
    """Which tiers serve a user, by how much data the device holds."""
    if num_train_records < cold_start_below:
        return COLD_START
    if num_train_records < frequent_from:
        return OCCASIONAL
    return FREQUENT
