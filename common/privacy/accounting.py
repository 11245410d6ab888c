"""User-level privacy accounting for DP-FedAvg: the step that owns the accountant.

Two granularities of privacy run in fedpersona:

* **record level**: each device's Opacus DP-SGD, accounted on the device
  (``client/train.py``) over that user's own records;
* **user level**: DP-FedAvg on everything shared: each device's update is
  clipped to ``C`` and the released sum carries Gaussian noise ``z*C``
  (``clip.py``, ``noise.py``). Accounted here with Flower 1.41's client-level
  ``RdpAccountant`` (over Google's dp-accounting), one Gaussian event per round,
  Poisson-subsampled when clients are sampled at rate ``q < 1``.

:func:`independent_user_epsilon` recomputes the same epsilon through Opacus'
RDP analysis, a separate implementation, so the report and the audit can
cross-check the two.
"""

from __future__ import annotations

import math

from common.privacy.base import ServerAggregate, ServerRound, Step


def make_user_accountant(population: int, delta: float, max_epsilon: float | None, poisson: bool = False):
    """Flower's client-level RDP accountant: every client every round, or Poisson client sampling."""
    from flwr.serverapp import NeighboringRelation, PrivacyConfig, SamplingMethod
    from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

    return RdpAccountant(
        PrivacyConfig(
            target_delta=delta,
            population_size=population,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.POISSON if poisson else SamplingMethod.NO_AMPLIFICATION,
            max_epsilon=max_epsilon,
        )
    )


def _event(noise_multiplier: float, sample_size: int, population: int):
    from flwr.serverapp import GaussianPrivacyEvent

    return GaussianPrivacyEvent(noise_multiplier=noise_multiplier, sample_size=sample_size, population_size=population)


def rounds_within_budget(accountant, noise_multiplier: float, sample_size: int, planned: int) -> int:
    """How many of the planned rounds fit the accountant's ``max_epsilon`` (Flower's ``would_exceed``)."""
    if accountant.config.max_epsilon is None:
        return planned
    event = _event(noise_multiplier, sample_size, accountant.config.population_size)
    rounds = 0
    while rounds < planned and not accountant.would_exceed(event, count=rounds + 1):
        rounds += 1
    return rounds


def independent_user_epsilon(noise_multiplier: float, rounds: int, delta: float, sample_rate: float = 1.0) -> float:
    """User-level epsilon of ``rounds`` Gaussian releases (Poisson-sampled at ``sample_rate``), via Opacus' RDP code."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    if rounds == 0:
        return 0.0
    orders = RDPAccountant.DEFAULT_ALPHAS  # Opacus' own orders, as its accountant uses them
    rdp = compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=rounds, orders=orders)
    eps, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    return float(eps) if math.isfinite(eps) else math.inf


def noise_for_epsilon(target_epsilon: float, rounds: int, delta: float, population: int) -> float:
    """The smallest noise multiplier z (to 1e-3) whose ``rounds`` releases stay within ``target_epsilon``.

    Calibrated with Flower's accountant (the one that enforces the budget), so
    a run configured with this z is never stopped early by its own budget.
    """

    hi = smallest_fitting_noise(target_epsilon, rounds, delta, population)
    # Round *up* to the grid: rounding to nearest could land just below the
    # smallest noise that fits and overshoot the target.
    return math.ceil(hi * 1000 - 1e-9) / 1000


def smallest_fitting_noise(target_epsilon: float, rounds: int, delta: float, population: int) -> float:
    """Bisection to within 1e-3 for the smallest z whose ``rounds`` releases fit ``target_epsilon`` (unrounded: the upper end)."""

    def fits(z: float) -> bool:
        acc = make_user_accountant(population, delta, None)
        acc.compose(_event(z, population, population), count=rounds)
        return acc.get_epsilon(delta) <= target_epsilon

    lo, hi = 0.05, 1.0
    while not fits(hi):
        lo, hi = hi, hi * 2
        if hi > 1e4:
            raise ValueError(f"no noise multiplier reaches epsilon {target_epsilon} in {rounds} rounds")
    while hi - lo > 1e-3:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    return hi


class Accounting(Step):
    """Server half: compose one Gaussian event per round into Flower's client-level accountant.

    A round is charged whether or not anything comes back: a sampled round
    may release noise even from an empty cohort.
    """

    name = "accounting"
    rank = 30

    def __init__(self, noise_multiplier: float, population: int, sample_rate: float, delta: float, max_epsilon: float | None):
        self.noise_multiplier = float(noise_multiplier)
        self.population = int(population)
        self.sample_rate = float(sample_rate)
        self.sample_size = self.population if sample_rate >= 1 else max(1, round(sample_rate * population))
        self.delta = float(delta)
        self.accountant = make_user_accountant(population, delta, max_epsilon, poisson=sample_rate < 1)
        self.epsilon_per_round: dict[int, float] = {}

    def rounds_allowed(self, planned: int) -> int:
        return rounds_within_budget(self.accountant, self.noise_multiplier, self.sample_size, planned)

    def server(self, agg: ServerAggregate, rnd: ServerRound) -> dict[str, float]:
        self.accountant.compose(_event(self.noise_multiplier, self.sample_size, self.population))
        eps = float(self.accountant.get_epsilon(self.delta))
        self.epsilon_per_round[rnd.server_round] = eps
        return {"epsilon": eps}
