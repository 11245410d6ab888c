"""Cryptographically secure random draws for privacy-relevant noise and sampling.

``numpy``'s generators (PCG64, Mersenne Twister) are fast but predictable: from
enough outputs, or from a guessable seed, an observer can reconstruct the
stream, and with it noise that was meant to hide something. Everything here
draws from AES-256-CTR under a fresh 32-byte key from ``os.urandom`` per call
(OpenSSL's AES-NI path: ~8 MB of keystream in a few milliseconds), so no two
calls share a key and no state persists between calls.

* :func:`gaussian` -- float64 Gaussian noise (e.g. a client's distributed-DP
  noise share), by the Box-Muller transform of 53-bit uniforms in ``(0, 1]``.
  One million draws take under 0.1 s on two CPU cores.
* :func:`bernoulli` -- independent coin flips (e.g. Poisson cohort sampling).
* :func:`rounding_rng` -- a ``numpy`` generator seeded with 128 bits from the OS,
  for stochastic rounding in :mod:`common.secagg_codec`. Rounding noise is not
  a secret (it only has to be independent of the data, and the masked vector
  hides it anyway), so a fast non-cryptographic stream seeded from the OS is
  enough there.

Limitation: the Gaussian is a floating-point sampler, not an exact discrete
Gaussian. Floating-point noise has a non-uniform pattern of representable
values (Mironov 2012 for the Laplace case); under secure aggregation the sum
is re-quantised onto the fixed-point grid, whose step is far coarser than a
float64 ulp, which removes the low-order bits such attacks read, but this
module makes no formal claim about them.
"""

from __future__ import annotations

import math
import os
import secrets

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

_TWO_POW_53 = float(1 << 53)


def _words(n: int) -> np.ndarray:
    """``n`` uniform uint64 words from AES-256-CTR under a fresh OS-random key."""
    # A key is used for one stream only, so a zero initial counter block is safe.
    enc = Cipher(algorithms.AES(os.urandom(32)), modes.CTR(bytes(16))).encryptor()
    return np.frombuffer(enc.update(bytes(8 * n)), dtype=np.uint64)


def _unit_floats(n: int) -> np.ndarray:
    """``n`` uniforms on the 2**-53 grid of ``[0, 1)`` (the top 53 bits of each word)."""
    return (_words(n) >> np.uint64(11)).astype(np.float64) / _TWO_POW_53


def gaussian(shape: int | tuple[int, ...], std: float) -> np.ndarray:
    """Float64 samples of ``N(0, std**2)`` with the given shape, from a CSPRNG."""
    if not (math.isfinite(std) and std >= 0):
        raise ValueError("std must be a finite number >= 0")
    size = math.prod(shape) if isinstance(shape, tuple) else int(shape)
    pairs = (size + 1) // 2
    u = _unit_floats(2 * pairs)
    # 1 - u lies in (0, 1]: the logarithm is finite.
    radius = np.sqrt(-2.0 * np.log1p(-u[:pairs]))
    angle = (2.0 * np.pi) * u[pairs:]
    z = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:size]
    z *= std
    return z.reshape(shape)


def bernoulli(n: int, p: float) -> np.ndarray:
    """``n`` independent booleans, each True with probability ``p`` (to 2**-53)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError("p must be in [0, 1]")
    return _unit_floats(int(n)) < p


def rounding_rng() -> np.random.Generator:
    """A fresh ``numpy`` generator seeded with 128 bits of OS entropy (for stochastic rounding)."""
    return np.random.default_rng(secrets.randbits(128))
