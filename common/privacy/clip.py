"""User-level clipping of the whole K-slot update (DP-FedAvg's sensitivity bound), fixed or adaptive.

The update has up to three parts (``common.kslot``): the model change, the
profile row and the one-hot count. Each part gets an equal share of the
squared budget, so with P parts each is bounded by ``C / sqrt(P)`` and the
whole vector by ``C``: one Gaussian mechanism of std ``z*C`` then covers the
model change, the centroids and the counts together.

The profile row and the count have norm 1 before this step, so clipping scales
them by a public factor ``min(1, C / sqrt(P))``; the server half divides the
sum's profile and count parts by the same factor to read counts and centroids
back (their noise is scaled up with them).

**Adaptive C** (``user-adaptive-clip-quantile`` γ > 0; Andrew, Thakkar, McMahan
and Ramaswamy, "Differentially Private Learning with Adaptive Clipping", 2021).
Each device also reports, inside the same sum, whether its model change was
within its part's bound, as a centred bit ``b − ½``. The server reads the
noised mean of the bits, ``b̄``, and moves C geometrically toward the γ
quantile of the update norms: ``C ← C · exp(−η (b̄ − γ))``, never above
``user-clip-norm``, and sends the next round's C in the train message
(``common.wire.MESSAGE_CONFIG``).

The bit travels as one more coordinate of the vector that is noised, so it
needs no noise of its own. With a share ``s`` of the squared sensitivity for
the bit, the mechanism's sensitivity is ``S = C / sqrt(1 − s)``: the parts keep
their bound of C as before, and the bit is scaled by ``a = 2 sqrt(s) S`` so
that ``|a (b − ½)| = sqrt(s) S``. The noise std is ``z S`` on every coordinate,
so the whole release, bits included, is one Gaussian mechanism with noise
multiplier ``z`` (the accountant's, unchanged). Read back in count units, the
bits carry noise ``z S / a = z / (2 sqrt(s))`` and the model change
``z / sqrt(1 − s)`` times C: exactly the split of Andrew et al.'s Theorem 1,
z⁻² = z_Δ⁻² + (2σ_b)⁻², as the record-level ``client/adaptive_clip.py`` uses.

A device not drawn this round sends zeros, its bit included, so under the
zero-out relation the bit's sensitivity is still ``sqrt(s) S``; the server
divides the bits' sum by the *expected* cohort, which is public.

The server must send the same C to every device: a server that sent different
values could make some devices' distributed noise shares smaller than the
others assume. That is the malicious server the threat model leaves out
(README), as it leaves out one that lies about dropouts.
"""

from __future__ import annotations

import math

import numpy as np

from common.kslot import CLIP_BIT, CLIP_BIT_KEY, MODEL, KSlotCodec, part_norms
from common.privacy.base import DeviceUpdate, ServerAggregate, ServerRound, Step
from common.wire import CONFIG, ROUND_CLIP_KEY

# float32 on the wire rounds a clipped norm up by at most a few ulps
NORM_TOLERANCE = 1e-4


def quantile_step(clip: float, unclipped: float, quantile: float, lr: float, ceiling: float) -> float:
    """Andrew et al.'s geometric update, C · exp(−η (b̄ − γ)), never above the ceiling (both levels use it)."""
    return min(ceiling, clip * math.exp(-lr * (unclipped - quantile)))


class Clip(Step):
    name = "clip"
    rank = 10

    def __init__(self, clip_norm: float, codec: KSlotCodec, quantile: float = 0.0, lr: float = 0.2, share: float = 0.1):
        self.ceiling = float(clip_norm)  # user-clip-norm: the fixed C, or adaptive C's ceiling and start
        self.codec = codec
        self.quantile, self.lr, self.bit_share = float(quantile), float(lr), float(share)
        if self.adaptive != codec.clip_bit:
            raise ValueError("adaptive user-level clipping needs a codec with the clip bit, and only then")
        if self.adaptive and not 0 < self.bit_share < 1:
            raise ValueError("the clip bit's share must lie strictly between 0 and 1")
        self.parts = {p: s for p, s in codec.part_slices().items() if p != CLIP_BIT}
        self.current = self.ceiling  # server: the C this (or the next) round clips to

    @property
    def adaptive(self) -> bool:
        return self.quantile > 0

    # -- what a round's C implies -------------------------------------------------------
    def part_bound(self, clip: float) -> float:
        """Each part's norm bound at clip norm C: C / sqrt(P)."""
        return clip / math.sqrt(len(self.parts))

    def fixed_part_scale(self, clip: float) -> float:
        """The factor a unit-norm part (profile, count) is multiplied by at clip norm C."""
        return min(1.0, self.part_bound(clip))

    def sensitivity(self, clip: float) -> float:
        """The norm bound of the whole update at clip norm C, the clip bit included: what the noise is scaled to."""
        return clip / math.sqrt(1 - self.bit_share) if self.adaptive else clip

    def bit_scale(self, clip: float) -> float:
        """The factor on the centred bit, ``2 sqrt(s) S``: its magnitude is sqrt(s) S, its share of S²."""
        return 2 * math.sqrt(self.bit_share) * self.sensitivity(clip)

    @property
    def max_sensitivity(self) -> float:
        return self.sensitivity(self.ceiling)

    # -- device ---------------------------------------------------------------------
    def device(self, update: DeviceUpdate) -> dict[str, float]:
        clip = self.ceiling if update.clip_norm is None else min(update.clip_norm, self.ceiling)
        bound = self.part_bound(clip)
        norms = part_norms(self.codec, update.vector)
        for part, slices in self.parts.items():
            if norms[part] > bound:
                for sl in slices:
                    update.vector[sl] *= bound / norms[part]
        update.sensitivity = self.sensitivity(clip)
        metrics = {"model-norm": norms[MODEL], "clipped": float(norms[MODEL] > bound)}
        if self.adaptive:
            # A device not drawn sends zeros, its bit included (zero-out).
            bit = float(norms[MODEL] <= bound) - 0.5 if update.trained else 0.0
            update.vector[self.codec.offsets[CLIP_BIT_KEY]] = self.bit_scale(clip) * bit
            metrics["clip-norm"] = clip
        return metrics

    # -- server ---------------------------------------------------------------------
    def setup(self, rnd: ServerRound) -> dict[int, dict]:
        rnd.state["round-clip"] = self.current
        rnd.state["round-sensitivity"] = self.sensitivity(self.current)
        if not self.adaptive:
            return {}
        return {nid: {CONFIG: {ROUND_CLIP_KEY: self.current}} for nid in rnd.node_ids}

    def check_reply(self, vector: np.ndarray) -> bool:
        return float(np.linalg.norm(vector)) <= self.sensitivity(self.current) * (1 + NORM_TOLERANCE)

    def server(self, agg: ServerAggregate, rnd: ServerRound) -> dict[str, float]:
        clip = rnd.state.get("round-clip", self.current)
        metrics = {"clip-norm": clip, "part-bound": self.part_bound(clip)}
        if agg.total is None:
            return metrics
        for part, slices in self.parts.items():
            if part != MODEL:
                for sl in slices:
                    agg.total[sl] /= self.fixed_part_scale(clip)
        if self.adaptive:
            unclipped = self.unclipped_share(agg.total, clip, agg.expected)
            self.current = quantile_step(clip, unclipped, self.quantile, self.lr, self.ceiling)
            metrics.update({"unclipped-share": unclipped, "next-clip-norm": self.current})
        return metrics

    def unclipped_share(self, total: np.ndarray, clip: float, expected: float) -> float:
        """The noised share of devices whose model change was within its bound: Σ(b − ½)/m + ½ over the expected cohort m."""
        centred = float(total[self.codec.offsets[CLIP_BIT_KEY]][0]) / self.bit_scale(clip)
        return centred / max(expected, 1.0) + 0.5
