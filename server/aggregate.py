"""The server's arithmetic on a summed K-slot update: new global tier, persona slots and centroids.

From the (noised) sum of the contributors' updates (``common.kslot``):

* the global tier moves by ``server_lr * sum / expected``, DP-FedAvg's fixed
  denominator (the cohort size, or ``q*N`` under Poisson client sampling), so a
  dropout cannot change the sensitivity;
* centroid k becomes the mean profile of the devices that chose k (federated
  k-means); a slot nobody (noisily) chose keeps its centroid;
* slot k moves by ``server_lr * sum_k / count_k`` when ``count_k`` reaches the minimum
  persona size; otherwise the slot keeps its values and its sum is folded into
  the global tier's. Persona adapters share the global adapter's LoRA
  subspace, so the sums are compatible, and per-persona noise divided by a
  tiny count would swamp the slot.

``server_lr`` (run config ``server-lr``, 1 = FedAvg) scales both moves, as
FedAvgM's server learning rate does; the centroids are means and never scaled.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.kslot import CENTROID_KEY, KSlotCodec, slot_key
from common.models import GLOBAL


@dataclass
class SlotRound:
    """What the server learned about personas in one round (numbers only, no per-client data)."""

    counts: list[float]  # decoded per-persona counts (noisy under user-level DP)
    folded: list[int]  # slots below the minimum size, folded into the global tier


def apply_sum(
    arrays: dict[str, np.ndarray],
    codec: KSlotCodec,
    total: np.ndarray,
    expected: float,
    min_size: float,
    exact_counts: bool,
    server_lr: float = 1.0,
) -> tuple[dict[str, np.ndarray], SlotRound]:
    """New server tensors (float32, keyed like ``arrays``) from the sum of updates."""
    s = codec.decode(total)
    # Without DP noise the counts are integers by construction; rounding removes
    # secure aggregation's fixed-point error (0.9999999 must not fall below 1).
    counts = np.rint(s.counts) if exact_counts else s.counts
    new = {k: np.asarray(v, dtype=np.float64).copy() for k, v in arrays.items()}
    if codec.num_slots:
        for k in range(codec.num_slots):
            if counts[k] >= 1:
                new[CENTROID_KEY][k] = s.centroid_rows[k] / counts[k]
    global_sum = {key: value.copy() for key, value in s.global_.items()}
    folded = []
    for k, slot in enumerate(s.slots):
        if counts[k] >= min_size:
            for key, value in slot.items():
                new[slot_key(key, k)] += server_lr * value / counts[k]
        else:
            folded.append(k)
            for key, value in slot.items():
                global_sum[f"{GLOBAL}/" + key.split("/", 1)[1]] += value
    for key, value in global_sum.items():
        new[key] += server_lr * value / expected
    return {k: v.astype(np.float32) for k, v in new.items()}, SlotRound(counts=[float(c) for c in counts], folded=folded)
