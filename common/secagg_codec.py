"""Fixed-point encoding of float vectors into Z_{2^bits} for secure summation.

Secure aggregation adds vectors modulo ``M = 2**modulus_bits``; floats must
first become integers. Each coordinate is clipped to ``[-R, R]``, shifted by
``+R`` and scaled onto the integer grid ``{0, 1, ..., L}`` with

    L = min(floor((M - 1) / max_summands), 2**53)     (``levels``)
    step = 2R / L                                       (one grid unit, in float units)

so that a sum of up to ``max_summands`` encodings never exceeds ``M - 1``: the
modular sum *is* the integer sum. The grid stops at 2**53 levels because the
encoder computes in float64, whose integers end there: a finer grid would put
``+R`` one float ulp above ``L`` and ``max_summands`` such inputs would wrap the
modulus. Moduli wider than ``53 + log2(max_summands)`` bits therefore buy
headroom, not precision, and every modulus up to 64 bits decodes exactly. The
decoder of a sum ``S`` of ``n`` encodings centres it in exact integer
arithmetic before converting to float, ``sum = (S - n*floor(L/2)) * step`` (plus
``-n*R/L`` when ``L`` is odd), so no ``n*R``-sized offset cancels in float.

Quantisation error of a decoded sum of ``n`` encodings, per coordinate, for
inputs inside ``[-R, R]``:

* deterministic rounding (round-to-nearest): ``|err| <= n * step / 2``;
* stochastic rounding (``floor(v + U[0,1))``): unbiased, ``|err| < n * step``,
  standard deviation ``<= sqrt(n) * step / 2``;
* plus float64 arithmetic slack of at most ``4 * n * R * 2**-52`` (it only
  matters once ``L`` approaches 2**53, i.e. ``modulus_bits`` of 53 and more).

:meth:`FixedPointCodec.error_bound` returns exactly this bound. Values outside
``[-R, R]`` are clipped (their error is unbounded by construction) and
*counted*; ``strict=True`` raises instead. Non-finite values always raise:
there is no meaningful fixed-point image of NaN, and silently mapping it to a
number would corrupt the aggregate.

Noise shares and the range. A client that adds a Gaussian noise share of std
``sigma`` to a value of magnitude ``<= C`` before encoding should set
``R = C + k * sigma`` with ``k`` of 8 to 10, not 6, and count the clipping
event against ``delta``: :func:`clip_probability` gives
``P(|x + N(0, sigma^2)| > R)`` for the worst ``|x| = C``, union-bounded over the
coordinates (about ``6e-16`` per coordinate at ``k = 8``, ``8e-24`` at 10, ``1e-9``
at 6).
A clipped noise share is no longer Gaussian, so the DP guarantee holds with
``delta`` increased by that probability (times the clients that add shares).

The modulus is a power of two on purpose: numpy's unsigned arithmetic wraps
modulo 2**32 / 2**64 for free, and reducing a uniform PRG word to ``bits``
bits with a bit mask has no modulo bias.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from common.csprng import rounding_rng

MAX_LEVELS = 1 << 53  # float64 represents every integer up to here


def clip_probability(clip_range: float, bound: float, sigma: float, coords: int = 1) -> float:
    """Probability that some coordinate of ``x + N(0, sigma^2 I)`` leaves ``[-R, R]``.

    ``x`` has ``coords`` coordinates of magnitude ``<= bound`` (``C``); ``R`` is
    ``clip_range``. Per coordinate the worst case is ``|x| = C``:
    ``Q((R - C) / sigma) + Q((R + C) / sigma)`` with ``Q`` the standard normal
    upper tail; coordinates are union-bounded, so the result is at most 1 and
    needs no independence between them. Add it to the mechanism's ``delta``.
    """
    if not (sigma >= 0 and bound >= 0 and coords >= 0) or not all(map(math.isfinite, (clip_range, bound, sigma))):
        raise ValueError("clip_probability needs finite ranges, sigma >= 0 and coords >= 0")
    if sigma == 0:
        return 0.0 if bound <= clip_range or coords == 0 else 1.0
    tail = 0.5 * math.erfc((clip_range - bound) / (sigma * math.sqrt(2))) + 0.5 * math.erfc(
        (clip_range + bound) / (sigma * math.sqrt(2))
    )
    return min(1.0, coords * tail)


@dataclass(frozen=True)
class EncodedVector:
    """An encoded vector plus the number of coordinates that had to be clipped."""

    values: np.ndarray
    num_clipped: int


@dataclass(frozen=True)
class FixedPointCodec:
    """Clip-shift-scale encoder into ``Z_{2**modulus_bits}`` (see module docstring)."""

    clip_range: float = 8.0
    modulus_bits: int = 32
    max_summands: int = 1024
    stochastic: bool = True
    strict: bool = False

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip_range) and self.clip_range > 0):
            raise ValueError("clip_range must be a positive finite float")
        if not 2 <= self.modulus_bits <= 64:
            raise ValueError("modulus_bits must be in [2, 64]")
        if self.max_summands < 1:
            raise ValueError("max_summands must be >= 1")
        if self.levels < 1:
            raise ValueError(
                f"2**{self.modulus_bits} is too small for {self.max_summands} summands: no grid left"
            )

    @property
    def modulus(self) -> int:
        return 1 << self.modulus_bits

    @property
    def dtype(self) -> type:
        # uint32 halves the memory traffic of masking whenever the modulus fits.
        return np.uint32 if self.modulus_bits <= 32 else np.uint64

    @property
    def levels(self) -> int:
        # Capped at 2**53: every level must be an exactly representable float64.
        return min((self.modulus - 1) // self.max_summands, MAX_LEVELS)

    @property
    def scale(self) -> float:
        return self.levels / (2.0 * self.clip_range)

    @property
    def step(self) -> float:
        return 2.0 * self.clip_range / self.levels

    def error_bound(self, num_summands: int) -> float:
        """Max per-coordinate |decoded sum - true sum| for in-range inputs."""
        rounding = self.step if self.stochastic else self.step / 2
        return num_summands * (rounding + 4.0 * self.clip_range * 2.0**-52)

    def clip_probability(self, bound: float, sigma: float, coords: int = 1) -> float:
        """:func:`clip_probability` at this codec's ``clip_range``."""
        return clip_probability(self.clip_range, bound, sigma, coords)

    def encode(self, x: np.ndarray, rng: np.random.Generator | None = None) -> EncodedVector:
        """Encode a float vector; returns values in ``[0, levels]`` of :attr:`dtype`."""
        v = np.array(x, dtype=np.float64, copy=True).reshape(-1)
        if not np.isfinite(v).all():
            raise ValueError("cannot encode non-finite values (NaN/inf)")
        num_clipped = int(np.count_nonzero(np.abs(v) > self.clip_range))
        if num_clipped and self.strict:
            raise ValueError(f"{num_clipped} coordinate(s) outside [-{self.clip_range}, {self.clip_range}]")
        np.clip(v, -self.clip_range, self.clip_range, out=v)
        v += self.clip_range
        v *= self.scale
        if self.stochastic:
            # Quantisation noise is not a secret, so a fast non-cryptographic
            # generator is enough; it only has to be independent of the data
            # (the default one is seeded from OS entropy all the same).
            rng = rng if rng is not None else rounding_rng()
            v += rng.random(v.shape)
            np.floor(v, out=v)
        else:
            np.rint(v, out=v)
        # Float rounding at the top edge could land on levels + 1; the clamp keeps
        # the no-overflow guarantee unconditional.
        np.clip(v, 0, self.levels, out=v)
        return EncodedVector(v.astype(self.dtype), num_clipped)

    def decode_sum(self, total: np.ndarray, num_summands: int) -> np.ndarray:
        """Decode the modular sum of ``num_summands`` encodings (removes the offsets)."""
        if not 1 <= num_summands <= self.max_summands:
            raise ValueError(
                f"num_summands={num_summands} outside [1, {self.max_summands}]: the sum may have wrapped"
            )
        t = np.asarray(total)
        if t.dtype != self.dtype:
            raise ValueError(f"expected {np.dtype(self.dtype).name}, got {t.dtype}")
        # Centre on S - n*half in exact integer arithmetic before scaling. Up to
        # 53 bits S and n*half are float64 integers, so their float difference
        # is exact (and one conversion is cheapest); wider sums subtract mod
        # 2**64 in uint64 and are read as signed: |S - n*half| <= n*L/2 < 2**63.
        half = self.levels // 2
        if self.modulus_bits <= 53:
            out = t.astype(np.float64)
            out -= float(num_summands * half)
        else:
            centred = t.astype(np.uint64)
            np.subtract(centred, np.uint64(num_summands * half), out=centred)
            out = centred.view(np.int64).astype(np.float64)
        out *= self.step
        if self.levels % 2:  # the offset of an odd grid: half * step = R - R/L
            out -= num_summands * self.clip_range / self.levels
        return out


@dataclass(frozen=True)
class Segment:
    """One named block of a packed vector with its own clipping range."""

    name: str
    shape: tuple[int, ...]
    clip_range: float

    @property
    def size(self) -> int:
        return math.prod(self.shape)


class VectorPacker:
    """Sum several differently-ranged vectors in ONE secure-aggregation run.

    The application concatenates its tiers (adapter deltas, persona slots, a
    count vector, ...) into one flat vector so the protocol runs once; each
    segment keeps its own clipping range (and thus its own step), because a
    count vector and a weight delta have nothing in common. All segments share
    the modulus and ``max_summands`` so that one modular sum decodes them all.
    """

    def __init__(
        self,
        segments: Sequence[Segment] | Mapping[str, tuple[tuple[int, ...], float]],
        *,
        modulus_bits: int = 32,
        max_summands: int = 1024,
        stochastic: bool = True,
        strict: bool = False,
    ) -> None:
        if isinstance(segments, Mapping):
            segments = [Segment(name, tuple(shape), float(clip)) for name, (shape, clip) in segments.items()]
        names = [s.name for s in segments]
        if len(set(names)) != len(names):
            raise ValueError("segment names must be unique")
        self.segments = tuple(segments)
        self.codecs = {
            s.name: FixedPointCodec(s.clip_range, modulus_bits, max_summands, stochastic, strict) for s in self.segments
        }
        self.offsets: dict[str, tuple[int, int]] = {}
        pos = 0
        for s in self.segments:
            self.offsets[s.name] = (pos, pos + s.size)
            pos += s.size
        self.size = pos
        self.dtype = next(iter(self.codecs.values())).dtype if self.segments else np.uint32

    def encode(
        self, arrays: Mapping[str, np.ndarray], rng: np.random.Generator | None = None
    ) -> tuple[np.ndarray, dict[str, int]]:
        """Encode every segment into one flat vector; also return per-segment clip counts."""
        if set(arrays) != set(self.offsets):
            raise ValueError("arrays must have exactly the packer's segment names")
        rng = rng if rng is not None else rounding_rng()
        flat = np.empty(self.size, dtype=self.dtype)
        clipped = {}
        for s in self.segments:
            a = np.asarray(arrays[s.name])
            if tuple(a.shape) != s.shape:
                raise ValueError(f"segment {s.name!r}: shape {a.shape} != {s.shape}")
            enc = self.codecs[s.name].encode(a, rng)
            lo, hi = self.offsets[s.name]
            flat[lo:hi] = enc.values
            clipped[s.name] = enc.num_clipped
        return flat, clipped

    def decode_sum(self, total: np.ndarray, num_summands: int) -> dict[str, np.ndarray]:
        if total.shape != (self.size,):
            raise ValueError(f"expected a flat vector of {self.size}, got {total.shape}")
        out = {}
        for s in self.segments:
            lo, hi = self.offsets[s.name]
            out[s.name] = self.codecs[s.name].decode_sum(total[lo:hi], num_summands).reshape(s.shape)
        return out

    def error_bounds(self, num_summands: int) -> dict[str, float]:
        return {name: c.error_bound(num_summands) for name, c in self.codecs.items()}
