"""Randomness that protects privacy, from the operating system's CSPRNG.

DP noise and cohort draws must not come from anything a server knows or can
choose (a run seed, a store path). Each call keys AES-256-CTR with 32 fresh
bytes from ``os.urandom`` and turns its keystream into uniforms; Gaussians come
from the Box-Muller transform in float64.
"""

from __future__ import annotations

import os

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes


def _uniform(n: int) -> np.ndarray:
    """``n`` float64 uniforms in (0, 1), 53 random bits each."""
    enc = Cipher(algorithms.AES(os.urandom(32)), modes.CTR(bytes(16))).encryptor()
    words = np.frombuffer(enc.update(bytes(8 * n)) + enc.finalize(), dtype=np.uint64)
    return ((words >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53


def gaussian(shape, std: float) -> np.ndarray:
    """float64 N(0, std^2) draws of ``shape``."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    n = int(np.prod(shape))
    half = (n + 1) // 2
    u = _uniform(2 * half)
    r = np.sqrt(-2.0 * np.log(u[:half]))
    theta = 2.0 * np.pi * u[half:]
    z = np.concatenate([r * np.cos(theta), r * np.sin(theta)])[:n]
    return (std * z).reshape(shape)


def bernoulli(n: int, p: float) -> np.ndarray:
    """``n`` independent coin flips with probability ``p`` (bool array)."""
    return _uniform(n) < p
