"""The K-slot update: one codec for the layout both halves agree on.

The server holds and sends the global tier, K persona slots (copies of the
persona adapter, ``persona{k}/...``) and a K x 384 block of persona centroids.
A device replies with an *update* in the same layout plus a K-vector of
counts:

* the global tier's change;
* all K slots, zero except the one the device chose, which carries its
  persona change;
* the centroid block, zero except the device's profile embedding in its own
  row (federated k-means through the same sums);
* a one-hot count.

Summed over devices (under secure aggregation the server sees nothing else)
this gives per-slot sums, centroid sums and counts, never one device's
choice. With ``num_slots = 0`` the layout is the global tier alone. Under
user-level adaptive clipping the update ends with one more coordinate, the
device's scaled clip bit (``common/privacy/clip.py``), which the server reads
from the sum and never holds as a tensor.

The update has three *parts*: the model change, the profile row and the count.
Privacy steps (``common.privacy``) clip and noise the flat vector part by part;
this codec only lays values out and reads them back. Segments are
:class:`common.secagg_codec.Segment`, so a secure-aggregation packer can be
built from the same layout.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from common.secagg_codec import Segment
from common.models import PERSONA

COUNT_KEY = "persona-count"
CENTROID_KEY = "persona-centroids"
# all-MiniLM-L6-v2, the profile encoder (client/profile.py)
PROFILE_DIM = 384

# Under user-level adaptive clipping, one more coordinate: the device's centred clip bit
# (common/privacy/clip.py). It is part of the update, never of the server's tensors.
CLIP_BIT_KEY = "user-clip-bit"

MODEL, PROFILE, COUNT, CLIP_BIT = "model", "profile", "count", "clip-bit"
PARTS = (MODEL, PROFILE, COUNT, CLIP_BIT)


def slot_key(live_key_: str, k: int) -> str:
    """``persona/layers.0...`` (the live adapter) -> ``persona{k}/layers.0...`` (slot k)."""
    return f"{PERSONA}{k}/" + live_key_.split("/", 1)[1]


def live_key(slot_key_: str) -> str:
    """``persona{k}/layers.0...`` -> ``persona/layers.0...``."""
    return f"{PERSONA}/" + slot_key_.split("/", 1)[1]


def slot_of(key: str) -> int | None:
    """The slot index of a server-side key, or None for non-slot keys."""
    head = key.split("/", 1)[0]
    if head.startswith(PERSONA) and head[len(PERSONA):].isdigit():
        return int(head[len(PERSONA):])
    return None


@dataclass
class KSlotSum:
    """A decoded sum of updates (or one update): the parts, by meaning."""

    global_: dict[str, np.ndarray]  # global key -> summed change
    slots: list[dict[str, np.ndarray]]  # slot k: live persona key -> summed change
    centroid_rows: np.ndarray  # (K, PROFILE_DIM) summed profiles per slot
    counts: np.ndarray  # (K,) summed one-hot counts


class KSlotCodec:
    """Layout of the server's tensors and of one device's update, from the model's live shared shapes."""

    def __init__(self, shared_shapes: Mapping[str, tuple[int, ...]], num_slots: int, clip_bit: bool = False):
        self.num_slots = int(num_slots)
        self.clip_bit = bool(clip_bit)
        shapes = {k: tuple(int(d) for d in s) for k, s in shared_shapes.items()}
        self.global_shapes = {k: s for k, s in shapes.items() if not k.startswith(f"{PERSONA}/")}
        self.persona_shapes = {k: s for k, s in shapes.items() if k.startswith(f"{PERSONA}/")}
        if self.num_slots and not self.persona_shapes:
            raise ValueError("persona slots requested but the model has no persona adapter")
        server = dict(self.global_shapes)
        for k in range(self.num_slots):
            server.update({slot_key(key, k): shape for key, shape in self.persona_shapes.items()})
        if self.num_slots:
            server[CENTROID_KEY] = (self.num_slots, PROFILE_DIM)
        self.server_shapes: dict[str, tuple[int, ...]] = server
        update = dict(server)
        if self.num_slots:
            update[COUNT_KEY] = (self.num_slots,)
        if self.clip_bit:
            update[CLIP_BIT_KEY] = (1,)
        self.segments: tuple[Segment, ...] = tuple(Segment(k, s, 1.0) for k, s in update.items())
        self.offsets: dict[str, slice] = {}
        start = 0
        for seg in self.segments:
            self.offsets[seg.name] = slice(start, start + seg.size)
            start += seg.size
        self.length = start

    @classmethod
    def from_tensors(cls, shared: Mapping[str, Any], num_slots: int, clip_bit: bool = False) -> "KSlotCodec":
        """The codec for a model's shared tensors (anything with a ``.shape``), as both sides build it."""
        return cls({k: tuple(v.shape) for k, v in shared.items()}, num_slots, clip_bit)

    # -- layout -----------------------------------------------------------------
    @property
    def update_shapes(self) -> dict[str, tuple[int, ...]]:
        return {s.name: s.shape for s in self.segments}

    def part_of(self, key: str) -> str:
        return {CENTROID_KEY: PROFILE, COUNT_KEY: COUNT, CLIP_BIT_KEY: CLIP_BIT}.get(key, MODEL)

    def part_slices(self) -> dict[str, list[slice]]:
        """Where each part lives in the flat update (parts absent without persona slots are omitted)."""
        out: dict[str, list[slice]] = {}
        for seg in self.segments:
            out.setdefault(self.part_of(seg.name), []).append(self.offsets[seg.name])
        return out

    def flatten(self, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
        """One float64 vector in segment order (``arrays`` may be numpy arrays or Flower ``Array``s)."""
        out = np.empty(self.length, dtype=np.float64)
        for seg in self.segments:
            value = arrays[seg.name]
            value = value.numpy() if hasattr(value, "numpy") else np.asarray(value)
            if tuple(value.shape) != seg.shape:
                raise ValueError(f"{seg.name}: shape {tuple(value.shape)} != {seg.shape}")
            out[self.offsets[seg.name]] = value.reshape(-1)
        return out

    def unflatten(self, vector: np.ndarray, server_only: bool = False) -> dict[str, np.ndarray]:
        """float32 arrays keyed by segment (``server_only`` drops the count and the clip bit, which the server does not hold)."""
        if vector.shape != (self.length,):
            raise ValueError(f"vector has {vector.size} values, the layout needs {self.length}")
        return {
            seg.name: vector[self.offsets[seg.name]].reshape(seg.shape).astype(np.float32)
            for seg in self.segments
            if not (server_only and seg.name in (COUNT_KEY, CLIP_BIT_KEY))
        }

    # -- the server's starting state ------------------------------------------------
    def initial_state(self, shared: Mapping[str, np.ndarray], slot_init_std: float, seed: int) -> dict[str, np.ndarray]:
        """The server's initial tensors, in :attr:`server_shapes` order.

        Slots start from small, *distinct* seeded values rather than the live
        adapter's zeros, so IFCA's loss comparison can act from round 1.
        Centroids start at zero: no centroid yet, so devices pick uniformly.
        """
        values = {k: np.asarray(v, dtype=np.float32) for k, v in shared.items()}
        gen = np.random.default_rng(seed)
        out = {}
        for key, shape in self.server_shapes.items():
            k = slot_of(key)
            if key == CENTROID_KEY:
                out[key] = np.zeros(shape, dtype=np.float32)
            elif k is None:
                out[key] = values[key]
            else:
                base = values[live_key(key)]
                out[key] = base + gen.normal(0.0, slot_init_std, size=base.shape).astype(np.float32)
        return out

    # -- device side ------------------------------------------------------------------
    def split_received(self, tensors: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[int, dict[str, np.ndarray]], np.ndarray | None]:
        """What the server sent, as (global tensors, slot k -> live persona tensors, centroids or None)."""
        direct, slots = {}, {}
        for key, value in tensors.items():
            if key == CENTROID_KEY:
                continue
            k = slot_of(key)
            if k is None:
                direct[key] = value
            else:
                slots.setdefault(k, {})[live_key(key)] = value
        return direct, dict(sorted(slots.items())), tensors.get(CENTROID_KEY)

    def encode(
        self,
        sent: Mapping[str, np.ndarray],
        trained: Mapping[str, np.ndarray],
        chosen: int | None,
        profile: np.ndarray | None,
    ) -> np.ndarray:
        """One device's raw update as a flat float64 vector (not clipped, not noised).

        ``sent``: the server's tensors this round; ``trained``: the live
        shared tensors after local training (``global/``, ``persona/``);
        ``chosen``: the device's slot, or None when it stays out of the
        persona tier (its slots, profile row and count are then zero). The
        count is one-hot (1.0) and the profile row is unit-norm; privacy steps
        scale both.
        """
        update = np.zeros(self.length, dtype=np.float64)
        for key in self.global_shapes:
            update[self.offsets[key]] = (np.asarray(trained[key], np.float64) - np.asarray(sent[key], np.float64)).reshape(-1)
        if self.num_slots and chosen is not None:
            if not 0 <= chosen < self.num_slots:
                raise ValueError("chosen slot out of range")
            for key in self.persona_shapes:
                sk = slot_key(key, chosen)
                update[self.offsets[sk]] = (np.asarray(trained[key], np.float64) - np.asarray(sent[sk], np.float64)).reshape(-1)
            if profile is not None:
                row = np.asarray(profile, np.float64).reshape(-1)
                norm = float(np.linalg.norm(row))
                if norm > 0:
                    start = self.offsets[CENTROID_KEY].start + chosen * PROFILE_DIM
                    update[start : start + PROFILE_DIM] = row / norm
            update[self.offsets[COUNT_KEY].start + chosen] = 1.0
        return update

    # -- server side -----------------------------------------------------------------
    def decode(self, total: np.ndarray) -> KSlotSum:
        """A summed update, by meaning."""
        if total.shape != (self.length,):
            raise ValueError(f"update sum has {total.size} values, the layout needs {self.length}")
        glob = {k: total[self.offsets[k]].reshape(s) for k, s in self.global_shapes.items()}
        slots = [
            {key: total[self.offsets[slot_key(key, k)]].reshape(s) for key, s in self.persona_shapes.items()}
            for k in range(self.num_slots)
        ]
        if self.num_slots:
            rows = total[self.offsets[CENTROID_KEY]].reshape(self.num_slots, PROFILE_DIM)
            counts = total[self.offsets[COUNT_KEY]].copy()
        else:
            rows, counts = np.zeros((0, PROFILE_DIM)), np.zeros(0)
        return KSlotSum(global_=glob, slots=slots, centroid_rows=rows, counts=counts)


def part_norms(codec: KSlotCodec, vector: np.ndarray) -> dict[str, float]:
    """L2 norm of each part of a flat update."""
    return {
        part: math.sqrt(sum(float(np.dot(vector[sl], vector[sl])) for sl in slices))
        for part, slices in codec.part_slices().items()
    }
