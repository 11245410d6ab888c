"""Quantile-based adaptive clipping of per-sample gradients on the device (Andrew et al. 2021).

A fixed clip norm C is a guess. Once most per-sample gradients are smaller
than C, the noise (σ·C per coordinate) is larger than it needs to be while the
clipped signal is not, and the signal-to-noise ratio falls for no gain. The
instruments show this on the persona data: the share of clipped samples falls
from 0.73 in round 1 to 0.12 in round 3 (docs/results.md, issue 13).

Andrew, Thakkar, McMahan and Ramaswamy ("Differentially Private Learning with
Adaptive Clipping", NeurIPS 2021) track a target quantile γ of the norms
privately. After each step, with ``b_i = 1[‖g_i‖ ≤ C]`` for the step's samples,

    b̄ = (Σ (b_i − ½) + N(0, σ_b²)) / m + ½,     C ← C · exp(−η (b̄ − γ)),

where ``m`` is the expected batch. Centring the bits makes the count's
sensitivity ½ under adding or removing one record. Releasing the clipped
gradient sum with noise multiplier ``z_Δ`` and the count with noise ``σ_b``
is then, jointly, one Gaussian mechanism with noise multiplier ``z``, where

    z⁻² = z_Δ⁻² + (2 σ_b)⁻²          (their Theorem 1),

so the accountant is charged ``z``, the multiplier the device calibrated to
its target ε, and nothing else changes in the privacy analysis. The
device gives a fixed ``share`` of that budget (of z⁻², the zCDP ρ or GDP μ²)
to the count. Then ``2 σ_b = z / √share`` and ``z_Δ = z / √(1 − share)``: a
share of 0.1 costs 5.4% more gradient noise.

Two choices differ from the paper's federated setting:
- ``m`` is the expected batch, q·n, which Opacus already treats as public when it
  averages (``expected_batch_size``). Opacus' own ``AdaClipDPOptimizer`` divides
  by the batch the sampler actually drew, which moves with one record's presence
  and is not covered by the accountant.
- C never rises above the admitted ``max-grad-norm``, the device policy's ceiling
  (client/policy.py): the adaptation can only make clipping stricter.

The count noise is drawn from a generator seeded from the OS, like the gradient
noise: nothing the server knows decides it.
"""

from __future__ import annotations

import math

import torch

from common.privacy.clip import quantile_step


def split_noise(z: float, share: float) -> tuple[float, float]:
    """(gradient noise multiplier z_Δ, count noise std σ_b) for a step accounted at noise multiplier ``z``.

    ``share`` of the step's privacy (of z⁻²) goes to the count. z = 0 (clipping
    without noise) gives (0, 0): nothing is private, so nothing is split.
    """
    if not 0 < share < 1:
        raise ValueError("share must lie strictly between 0 and 1")
    if z == 0:
        return 0.0, 0.0
    return z / math.sqrt(1 - share), z / (2 * math.sqrt(share))


class QuantileClip:
    """The clip norm of one device's DP-SGD steps, moved toward a quantile of the per-sample gradient norms.

    Call :meth:`observe` with each physical batch's per-sample norms (before
    the optimizer clips them) and :meth:`step_done` once per logical step; read
    :attr:`clip` for the norm the next step clips to.
    """

    def __init__(self, clip: float, ceiling: float, quantile: float, lr: float, count_noise: float,
                 expected_batch: float, generator: torch.Generator):
        if not 0 < quantile < 1:
            raise ValueError("quantile must lie strictly between 0 and 1")
        self.ceiling = float(ceiling)
        self.clip = min(float(clip), self.ceiling)
        self.quantile, self.lr = float(quantile), float(lr)
        self.count_noise, self.expected_batch = float(count_noise), float(expected_batch)
        self.generator = generator
        self._centred = 0.0  # Σ (b_i − ½) over the step's samples so far

    def observe(self, norms: torch.Tensor) -> None:
        """Per-sample gradient norms of one physical batch of the current logical step."""
        self._centred += float((norms <= self.clip).sum()) - 0.5 * len(norms)

    def step_done(self) -> float:
        """The logical step ended: release its noised count and move the clip norm; returns the new norm."""
        noise = float(torch.normal(0.0, 1.0, (), generator=self.generator)) * self.count_noise
        unclipped = (self._centred + noise) / self.expected_batch + 0.5
        self._centred = 0.0
        self.clip = quantile_step(self.clip, unclipped, self.quantile, self.lr, self.ceiling)
        return self.clip
