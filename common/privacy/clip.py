"""User-level clipping of the whole K-slot update (DP-FedAvg's sensitivity bound).

The update has up to three parts (``common.kslot``): the model change, the
profile row and the one-hot count. Each part gets an equal share of the
squared budget, so with P parts each is bounded by ``C / sqrt(P)`` and the
whole vector by ``C``: one Gaussian mechanism of std ``z*C`` then covers the
model change, the centroids and the counts together.

The profile row and the count have norm 1 before this step, so clipping scales
them by a fixed, public factor ``min(1, C / sqrt(P))``; the server half divides
the sum's profile and count parts by the same factor to read counts and
centroids back (their noise is scaled up with them).
"""

from __future__ import annotations

import math

import numpy as np

from common.kslot import MODEL, KSlotCodec, part_norms
from common.privacy.base import DeviceUpdate, ServerAggregate, ServerRound, Step

# float32 on the wire rounds a clipped norm up by at most a few ulps
NORM_TOLERANCE = 1e-4


class Clip(Step):
    name = "clip"
    rank = 10

    def __init__(self, clip_norm: float, codec: KSlotCodec):
        self.clip_norm = float(clip_norm)
        self.codec = codec
        self.parts = codec.part_slices()
        self.share = self.clip_norm / math.sqrt(len(self.parts))

    @property
    def fixed_part_scale(self) -> float:
        """The factor a unit-norm part (profile, count) is multiplied by."""
        return min(1.0, self.share)

    def device(self, update: DeviceUpdate) -> dict[str, float]:
        norms = part_norms(self.codec, update.vector)
        for part, slices in self.parts.items():
            if norms[part] > self.share:
                for sl in slices:
                    update.vector[sl] *= self.share / norms[part]
        return {"model-norm": norms[MODEL], "clipped": float(norms[MODEL] > self.share)}

    def check_reply(self, vector: np.ndarray) -> bool:
        return float(np.linalg.norm(vector)) <= self.clip_norm * (1 + NORM_TOLERANCE)

    def server(self, agg: ServerAggregate, rnd: ServerRound) -> dict[str, float]:
        if agg.total is not None:
            for part, slices in self.parts.items():
                if part != MODEL:
                    for sl in slices:
                        agg.total[sl] /= self.fixed_part_scale
        return {"clip-norm": self.clip_norm, "part-bound": self.share}
