"""User-level Gaussian noise on the summed update: where it is added, and how much.

The released sum carries noise of std ``z*C`` on every coordinate. Where it
comes from (``placement``):

* ``server``: the server adds it to the unmasked sum and is trusted to do so;
* ``distributed`` (secure aggregation only): every device adds a share of std
  ``z*C / sqrt(h)`` before masking, where ``h`` is the fewest *honest*
  contributors the secure sum will unmask: its unmask floor minus the colluder
  budget (``secagg-colluder-fraction``), since colluders can subtract their
  own shares. The released sum then carries variance at least ``(z*C)**2``
  from honest shares alone, and no party, the server included, ever holds a
  noiseless sum.

  The neighbouring relation is *zero-out*: every device of the round adds its
  share whether or not it was sampled (devices sample themselves and a
  non-sampled one sends a zero update), so the noise total does not depend on
  whether the target user takes part, and removing the user's data replaces
  its update by zeros. For the Poisson-sampled Gaussian this gives the same
  RDP curve the add-or-remove accountant computes.

Under adaptive user-level clipping (``clip.py``) the round's C, and so the
noise, is the round's: ``z`` times the update's sensitivity that round, which
the clip step sets on the device and in the round's state on the server.
``clip_norm`` here is the largest sensitivity, which sizes the secure sum's
fixed-point range.

Noise is drawn from a CSPRNG (``common.csprng``): the server never knows, or
chooses, a seed.

The server half reports the noise std of the released sum and a
signal-to-noise estimate from the sum alone: the norm the sum has beyond what
noise explains, ``sqrt(max(0, |sum|^2 - d*std^2))``, over the noise's expected
norm ``std*sqrt(d)``.
"""

from __future__ import annotations

import math

import numpy as np

from common import csprng
from common.privacy.base import DeviceUpdate, ServerAggregate, ServerRound, Step

PLACEMENTS = ("server", "distributed")


class GaussianNoise(Step):
    name = "noise"
    rank = 20

    def __init__(self, noise_multiplier: float, clip_norm: float, placement: str, scale: float = 1.0, signal: slice | None = None):
        if placement not in PLACEMENTS:
            raise ValueError(f"noise placement must be one of {PLACEMENTS}")
        if scale != 1.0 and placement != "server":
            raise ValueError("a noise cohort scales server-added noise only; devices never lower their shares")
        self.noise_multiplier = float(noise_multiplier)
        self.clip_norm = float(clip_norm)
        self.placement = placement
        self.scale = float(scale)  # < 1 only for a simulated noise cohort (RunConfig.noise_scale)
        # The coordinates the signal-to-noise estimate reads (all by default); adaptive clipping's
        # bit is left out, since every device's bit is large next to its share of the model change.
        self.signal = signal

    @property
    def std(self) -> float:
        """Noise std of the released sum, per coordinate, at the largest sensitivity."""
        return self.std_at(self.clip_norm)

    def std_at(self, sensitivity: float | None) -> float:
        """Noise std of the released sum, per coordinate, for updates bounded by ``sensitivity``."""
        return self.noise_multiplier * (self.clip_norm if sensitivity is None else sensitivity) * self.scale

    def share_std(self, min_contributors: int, sensitivity: float | None = None) -> float:
        return self.std_at(sensitivity) / math.sqrt(min_contributors)

    def device(self, update: DeviceUpdate) -> dict[str, float]:
        if self.placement != "distributed":
            return {}
        if not update.min_contributors:
            raise ValueError("distributed noise needs the secure sum's minimum number of contributors")
        share = self.share_std(update.min_contributors, update.sensitivity)
        update.vector += csprng.gaussian(update.vector.shape, share)
        return {"noise-share-std": share}

    def server(self, agg: ServerAggregate, rnd: ServerRound) -> dict[str, float]:
        if agg.total is None:
            return {}
        sensitivity = rnd.state.get("round-sensitivity")
        if self.placement == "server":
            std = self.std_at(sensitivity)
            agg.total += csprng.gaussian(agg.total.shape, std)
        else:
            std = math.sqrt(agg.contributors) * self.share_std(rnd.state["min_contributors"], sensitivity)
        total = agg.total if self.signal is None else agg.total[self.signal]
        d = total.size
        excess = float(np.dot(total, total)) - d * std**2
        return {"noise-std": std, "snr": math.sqrt(max(0.0, excess)) / (std * math.sqrt(d))}
