"""A run's privacy pipeline, built the same way on both halves from the run config.

Order (device; the server runs the reverse): user-level ``clip``, ``noise``,
``accounting`` (only with user-level DP), one summation step (``plain-sum`` or
``secure-sum``), and the egress ``guard`` last. Without user-level DP the
pipeline is just the sum and the guard. Without the persona tier it is the
same pipeline over a K-slot layout with K = 0.
"""

from __future__ import annotations

from common.config import RunConfig
from common.kslot import CLIP_BIT_KEY, KSlotCodec
from common.privacy.accounting import Accounting
from common.privacy.base import Pipeline
from common.privacy.clip import Clip
from common.privacy.guard import Guard
from common.privacy.noise import GaussianNoise
from common.privacy.sums import PlainSum, SecureSum
from common.wire import train_reply_schema



def masked_dtype(modulus_bits: int) -> str:
    return "uint32" if modulus_bits <= 32 else "uint64"


def run_codec(shared, cfg: RunConfig) -> KSlotCodec:
    """The run's K-slot codec for a model's shared tensors, as both halves build it (with the clip bit under adaptive C)."""
    return KSlotCodec.from_tensors(shared, cfg.persona.slots, clip_bit=cfg.user_dp.adaptive)


def build_pipeline(cfg: RunConfig, codec: KSlotCodec) -> Pipeline:
    ud, sa = cfg.user_dp, cfg.secagg
    steps = []
    clip = noise = None
    if ud.enabled:
        clip = Clip(ud.clip_norm, codec, ud.adaptive_clip_quantile, ud.adaptive_clip_lr, ud.adaptive_clip_share)
        noise = GaussianNoise(ud.noise_multiplier, clip.max_sensitivity, cfg.noise_placement, scale=cfg.noise_scale,
                              signal=slice(0, codec.offsets[CLIP_BIT_KEY].start) if codec.clip_bit else None)
        steps += [
            clip,
            noise,
            Accounting(ud.noise_multiplier, cfg.user_population, cfg.user_sample_rate, ud.delta, ud.max_epsilon or None),
        ]
    if sa.enabled:
        distributed = noise if noise is not None and noise.placement == "distributed" else None
        bound = clip.max_sensitivity if clip is not None else 0.0  # no coordinate of a clipped update exceeds it
        steps.append(SecureSum(codec, sa.clip_range, sa.modulus_bits, sa.max_dropout, sa.colluder_fraction, distributed, bound))
        schema = train_reply_schema(codec.update_shapes, masked_dtype(sa.modulus_bits))
    else:
        steps.append(PlainSum(codec))
        schema = train_reply_schema(codec.update_shapes)
    steps.append(Guard(schema))
    return Pipeline(steps)
