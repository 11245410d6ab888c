"""The device's record-level privacy accounting: its Opacus accountant, kept in the store, and its noise calibration.

The accountant history (noise multiplier, Poisson rate, steps) is persisted
in the device store across rounds and never reset. Epsilon is Opacus' RDP
analysis (or its PRV accountant, ``accountant=prv``).

Why a subclass of Opacus' RDP accountant: Opacus recomputes the per-step RDP
curve of every history entry (151 orders; the 90 fractional ones by a
series in pure Python, ~0.2 s) on every ``get_epsilon``. A device asks for
epsilon several times a round with the same (noise, rate) entries (its cap
check, the end of training, evaluation), and a calibration asks for it
many times. :class:`MemoRDPAccountant` computes each (noise, rate) curve
once per process with Opacus' own function and scales it by the steps, as
Opacus does: the same numbers, bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import warnings

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

from common.config import TrainConfig


@functools.lru_cache(maxsize=4096)
def _step_rdp(noise_multiplier: float, sample_rate: float, orders: tuple[float, ...]) -> np.ndarray:
    curve = rdp_analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=list(orders))
    curve.setflags(write=False)  # shared by every caller
    return curve


class MemoRDPAccountant(RDPAccountant):
    """Opacus' RDP accountant with each (noise, rate) step curve computed once per process (see the module doc)."""

    def get_privacy_spent(self, *, delta: float, alphas=None) -> tuple[float, float]:
        if not self.history:
            return 0, 0
        orders = tuple(alphas if alphas is not None else self.DEFAULT_ALPHAS)
        rdp = sum([_step_rdp(float(z), float(q), orders) * steps for z, q, steps in self.history])
        eps, best_alpha = rdp_analysis.get_privacy_spent(orders=list(orders), rdp=rdp, delta=delta)
        return float(eps), float(best_alpha)


def new_accountant(mechanism: str = "rdp"):
    """A fresh record-level accountant of ``mechanism`` (``rdp`` or ``prv``)."""
    from opacus.accountants import create_accountant

    if mechanism == "prv":
        return QuietPRVAccountant()
    return MemoRDPAccountant() if mechanism == "rdp" else create_accountant(mechanism=mechanism)


@contextlib.contextmanager
def _prv_quiet():
    """Silence what Opacus' PRV analysis warns about when nothing is wrong.

    At q = 1 (``batch-size = 0``) it evaluates log(1 - q) = -inf inside an
    ``np.where`` that discards it; and it sizes its domain from an RDP bound,
    which warns that the best order is the largest (a looser domain, not a
    looser epsilon). The results are right; the warnings are noise in every
    device's log.
    """
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        yield


def safe_domain_size(history, eps_error: float, delta_error: float) -> float:
    """Opacus' ``compute_safe_domain_size`` (Gopi et al. 2021, remark 5.6) on the memoised RDP curves.

    Opacus sizes the PRV's discretisation domain from two RDP epsilons of the
    history, each through a fresh ``RDPAccountant`` that recomputes the
    (noise, rate) curve: about 95% of one PRV evaluation here. The curves are
    :func:`_step_rdp`'s, so the size is Opacus' own number, bit for bit, and a
    device's cap check after its calibration finds its curve already computed.
    """
    total = sum(n for _, _, n in history)
    size = MemoRDPAccountant()
    size.history = [tuple(h) for h in history]
    size_max = size.get_epsilon(delta_error / 4)
    for z, q, _ in history:
        one = MemoRDPAccountant()
        one.history = [(z, q, 1)]
        size_max = max(size_max, one.get_epsilon(delta=delta_error / (8 * total)))
    return max(size_max, eps_error) + 3


class _MemoDomainPRVAccountant(PRVAccountant):
    """Opacus' PRV accountant whose domain comes from :func:`safe_domain_size` (the same numbers, faster)."""

    def _get_domain(self, prvs, num_self_compositions, eps_error, delta_error):
        from opacus.accountants.analysis.prv import Domain

        history = [(p.noise_multiplier, p.sample_rate, n) for p, n in zip(prvs, num_self_compositions)]
        half_width = safe_domain_size(history, eps_error, delta_error)
        mesh_size = eps_error / np.sqrt(sum(num_self_compositions) * np.log(12 / delta_error) / 2)  # as Opacus
        return Domain.create_aligned(-half_width, half_width, mesh_size)


@functools.lru_cache(maxsize=1024)
def _prv_epsilon(history: tuple[tuple[float, float, int], ...], delta: float, eps_error: float, delta_error: float | None) -> float:
    """Opacus' PRV epsilon of a history, once per process for each (history, delta, errors)."""
    if any(z == 0 and q > 0 and n > 0 for z, q, n in history):
        # A step without noise (``noise-multiplier = 0``: clipping only) has no finite epsilon;
        # Opacus' PRV would try to build an infinite domain and raise instead of saying so.
        return math.inf
    acc = _MemoDomainPRVAccountant()
    acc.history = [tuple(h) for h in history]
    with _prv_quiet():
        return PRVAccountant.get_epsilon(acc, delta, eps_error=eps_error, delta_error=delta_error)


class QuietPRVAccountant(PRVAccountant):
    """Opacus' PRV accountant, quiet where nothing is wrong (:func:`_prv_quiet`), its epsilon memoised.

    Why the memo: Opacus builds and convolves a discretised privacy-loss distribution on every
    ``get_epsilon`` (about a fifth of a tiny-model device's time in a 1,000-user round). A device
    asks for the same history's epsilon at the end of training and again at evaluation, and under
    the default full batch every device of a run has the same (noise, rate = 1, steps) history.
    The answer is a pure function of the history, so it is computed once: the same number.
    """

    def get_epsilon(self, delta: float, *, eps_error: float = 0.01, delta_error: float | None = None, **kwargs) -> float:
        history = tuple((float(z), float(q), int(n)) for z, q, n in self.history)
        return _prv_epsilon(history, float(delta), float(eps_error), delta_error)


def dump_state(accountant) -> str:
    """The accountant as JSON, for the device store."""
    state = accountant.state_dict()
    return json.dumps({"history": [list(h) for h in state["history"]], "mechanism": state["mechanism"]})


def load_state(blob: str) -> dict:
    state = json.loads(blob)
    return {"history": [tuple(h) for h in state["history"]], "mechanism": state["mechanism"]}


def restore(accountant_state: str | None, mechanism: str = "rdp"):
    """An accountant of the mechanism the state was kept with, holding its history."""
    state = load_state(accountant_state) if accountant_state else None
    acc = new_accountant(state["mechanism"] if state else mechanism)
    if state:
        acc.load_state_dict(state)
    return acc


def accountant_history(accountant_state: str | None) -> list[tuple[float, float, int]]:
    """(noise multiplier, sample rate, steps) entries of a persisted accountant state."""
    return list(restore(accountant_state).history)


def epsilon_from_history(accountant_state: str | None, delta: float) -> float:
    """Record-level epsilon of a persisted accountant state (0 before any step)."""
    acc = restore(accountant_state)
    return acc.get_epsilon(delta=delta) if acc.history else 0.0


def sample_rate(cfg: TrainConfig, num_records: int) -> float:
    """The Poisson sampling rate of one DP-SGD step: batch / records, at most 1 (as Opacus' DPDataLoader)."""
    return 1 / max(1, math.ceil(num_records / cfg.batch_for(num_records))) if num_records else 1.0


def would_exceed(accountant_state: str | None, cfg: TrainConfig, num_records: int, cap: float) -> bool:
    """Would one more round of ``cfg.local_steps`` DP-SGD steps take this device past ``cap`` (0 = none)?"""
    if not cfg.dp or cap <= 0:
        return False
    acc = restore(accountant_state, cfg.accountant)
    acc.history.append((cfg.noise_multiplier, sample_rate(cfg, num_records), cfg.local_steps))
    return acc.get_epsilon(delta=cfg.accountant_delta) > cap


EPSILON_TOLERANCE = 0.01  # a calibrated device ends within this of its target, never above it
MAX_NOISE = 1e6


def calibrated_noise(cfg: TrainConfig, num_records: int, planned_rounds: int) -> float:
    """The noise multiplier that ends this device's planned rounds at its target epsilon (never above it).

    Each device calibrates from its own record count, batch and planned
    rounds, so a data-rich device needs less noise and a cold-start one (whose
    batch holds every record, q = 1) more, and every one ends at the target:
    ``target - EPSILON_TOLERANCE <= epsilon <= target``, the contract of
    Opacus' ``get_noise_multiplier``. With the phrase release on, ``cfg`` is
    resolved (:func:`resolve_release`) and the release's step is in the history.
    """
    rate, steps = sample_rate(cfg, num_records), max(1, planned_rounds) * cfg.local_steps
    delta = cfg.accountant_delta
    if cfg.accountant == "prv":
        alone = _prv_noise_memo(cfg.target_epsilon, delta, rate, steps)
    else:
        alone = rdp_noise_for_epsilon(cfg.target_epsilon, delta, rate, steps)  # the config allows rdp and prv only
    if not cfg.phrase_release:
        return alone
    return _noise_after(phrase_step(cfg), cfg.target_epsilon, delta, rate, steps, cfg.accountant, alone)


def phrase_step(cfg: TrainConfig) -> tuple[tuple[float, float, int], ...]:
    """The accountant entries of the phrase release (client/context.py): one Gaussian step at rate 1.

    ``cfg`` is the device's resolved config (:func:`resolve_release`): its ``context_noise`` is the
    release's noise.
    """
    return ((float(cfg.context_noise), 1.0, 1),) if cfg.phrase_release else ()


def release_noise(cfg: TrainConfig, num_records: int, frequent_from: int, floor: float = 0.0) -> float:
    """The noise of this device's phrase release, from its own budget and record count, never below ``floor``.

    The budget is the target epsilon (else the cap) read as a Gaussian mechanism's mu (mu-GDP, Dong,
    Roth and Su; :func:`budget_mu`); a release at mu_r takes the share (mu_r / mu)^2 of it, since
    Gaussian mechanisms compose as mu^2 = sum of mu_i^2. The split follows what the device is served (README, "Routing by
    data volume"):

    * With at least ``frequent_from`` training records it is served its personal stack, which DP-SGD
      trains: the release runs at ``context-noise-multiplier``, raised so that it takes at most
      ``CONTEXT_MAX_SHARE`` of the budget. (Without the raise, a device under a tight cap, epsilon 2
      say, would spend it all on the release at noise 1 and could never train.) At epsilon 8 and
      delta 1e-5 the bound is noise 0.86, so the configured 1.0 stands.
    * With fewer it is served a shared stack, so its DP-SGD steps only feed the shared tiers, where one
      device's step is almost all noise (docs/results.md, the per-tier instruments), and its own
      writing reaches its answers only through the release: the release takes ``context-budget-share``
      of the budget, ``noise = 1 / (mu * sqrt(share))``, and DP-SGD the rest. A release's threshold
      grows with its noise (client/context.py), so this is what lets a device with 8-19 records show
      how its records open and close.
    """
    budget = cfg.target_epsilon or cfg.max_epsilon
    if budget <= 0:
        return max(float(cfg.context_noise), floor)
    mu = budget_mu(budget, cfg.accountant_delta, cfg.accountant)
    if num_records < frequent_from:
        # A device that runs no DP-SGD (runs_dp_sgd) spends all of its budget here.
        share = cfg.context_budget_share if cfg.shared_stack_dp_sgd else 1.0
        return max(1 / (mu * math.sqrt(share)), floor)
    return max(float(cfg.context_noise), 1 / (mu * math.sqrt(CONTEXT_MAX_SHARE)), floor)


def runs_dp_sgd(cfg: TrainConfig, num_records: int, frequent_from: int) -> bool:
    """Whether this device runs DP-SGD at all (``shared-stack-dp-sgd``).

    A device with fewer than ``frequent_from`` training records is served a shared stack, so its steps
    only feed the shared tiers. The server averages every update with equal weight (DP-FedAvg's fixed
    denominator), and the noise on a device's update grows as its batch shrinks (sigma * C / B), so such a
    device's update mostly adds noise to everyone's tiers: on the real chat set its coordinates left the
    secure sum's fixed-point range by thousands (docs/results.md, issue 13, thirteenth session). With
    ``shared-stack-dp-sgd = false`` it runs none and sends a zero update. Without DP every device trains.
    """
    return not cfg.dp or cfg.shared_stack_dp_sgd or num_records >= frequent_from


def resolve_release(cfg: TrainConfig, num_records: int, frequent_from: int, floor: float = 0.0) -> TrainConfig:
    """``cfg`` with ``context_noise`` set to this device's release noise (:func:`release_noise`)."""
    if not cfg.phrase_release:
        return cfg
    return dataclasses.replace(cfg, context_noise=release_noise(cfg, num_records, frequent_from, floor))


CONTEXT_MAX_SHARE = 0.5  # the most of its budget (of mu^2) the release may take on a device served its personal stack


@functools.lru_cache(maxsize=256)
def budget_mu(epsilon: float, delta: float, mechanism: str) -> float:
    """The budget read as a Gaussian mechanism's mu, by the device's own accountant: 1 / the noise of one
    step at rate 1 that it puts at exactly ``epsilon``.

    Not the exact mu (:func:`gaussian_mu`): RDP's conversion, and PRV's error bound at a small epsilon, read
    a Gaussian step as costlier than it is, so a release sized on the exact mu could leave DP-SGD nothing
    by the accountant that charges it. Both accountants compose Gaussian steps at rate 1 as one Gaussian
    (RDP exactly, alpha / (2 sigma^2) adds; PRV up to its error), so shares of this mu^2 add up. Where the
    accountant reaches no such epsilon the device cannot train at all (its calibration refuses); the exact
    mu is returned then.
    """
    try:
        noise = _prv_noise_memo(epsilon, delta, 1.0, 1) if mechanism == "prv" else rdp_noise_for_epsilon(epsilon, delta, 1.0, 1)
    except ValueError:
        return gaussian_mu(epsilon, delta)
    return 1 / noise


@functools.lru_cache(maxsize=256)
def gaussian_mu(epsilon: float, delta: float) -> float:
    """The mu of the Gaussian mechanism that is exactly (epsilon, delta)-DP (Dong, Roth and Su 2019, Corollary 2.13)."""
    def delta_of(mu: float) -> float:
        # Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2), with Phi(x) = erfc(-x / sqrt 2) / 2 for tail precision
        return (math.erfc((epsilon / mu - mu / 2) / math.sqrt(2))
                - math.exp(epsilon) * math.erfc((epsilon / mu + mu / 2) / math.sqrt(2))) / 2
    lo, hi = 1e-6, 1.0
    while delta_of(hi) < delta:
        hi *= 2
    for _ in range(100):  # delta grows with mu: bisect to float precision
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if delta_of(mid) < delta else (lo, mid)
    return lo


def history_epsilon(history, delta: float, mechanism: str) -> float:
    """The record-level epsilon of an accountant history under ``mechanism`` (0 for an empty one).

    The device's own accountants (:func:`new_accountant`), so every answer is memoised as theirs are.
    """
    if not history:
        return 0.0
    acc = new_accountant(mechanism)
    acc.history = [(float(z), float(q), int(n)) for z, q, n in history]
    with warnings.catch_warnings():
        # A calibration probes noise levels far from the answer, where RDP's best order is at an end of its range.
        warnings.simplefilter("ignore", UserWarning)
        return acc.get_epsilon(delta=delta)


@functools.lru_cache(maxsize=256)
def _noise_after(prefix: tuple[tuple[float, float, int], ...], target: float, delta: float, rate: float, steps: int,
                 mechanism: str, alone: float) -> float:
    """The DP-SGD noise that ends ``prefix`` + ``steps`` steps at the target epsilon (never above it).

    ``alone`` is the answer without the prefix. At rate 1 every entry is a Gaussian mechanism and they
    compose exactly as one (mu-GDP: mu^2 = sum of steps / sigma^2), so the answer with the prefix is
    solved in closed form from ``alone`` and only checked on the accountant; otherwise the search starts
    above ``alone``.
    """
    def eps(z: float) -> float:
        return history_epsilon(prefix + ((z, rate, steps),), delta, mechanism)

    if history_epsilon(prefix, delta, mechanism) >= target:
        raise ValueError(f"the phrase release alone reaches epsilon {target}")
    hi = alone * 1.5
    if rate == 1.0 and all(q == 1.0 for _, q, _ in prefix):
        rest = steps / alone**2 - sum(n / z**2 for z, _, n in prefix)
        hi = math.sqrt(steps / rest) if rest > 0 else alone * 4
    while eps(hi) > target:
        hi *= 1.1
        if hi > MAX_NOISE:
            raise ValueError(f"no noise multiplier reaches epsilon {target} after the phrase release")
    return _close_from_above(eps, target, hi, EPSILON_TOLERANCE)


@functools.lru_cache(maxsize=1024)
def _prv_noise_memo(target: float, delta: float, rate: float, steps: int) -> float:
    """:func:`prv_noise_for_epsilon` once per process: with ``batch-size = 0`` every device has rate 1,
    so devices with the same planned steps share one answer."""
    return prv_noise_for_epsilon(target, delta, rate, steps)


def rdp_noise_for_epsilon(target: float, delta: float, rate: float, steps: int, tolerance: float = EPSILON_TOLERANCE) -> float:
    """The noise multiplier whose RDP epsilon after ``steps`` steps lies in ``[target - tolerance, target]``.

    Opacus' bisection from [0, 20] needs ~15 evaluations of the full RDP
    curve. Here the integer orders alone (a finite sum, ~50x cheaper) bracket
    the answer first: epsilon over all orders is a minimum over a superset,
    so it never exceeds the integer-order one, and the integer-order solution
    is an upper end. Regula falsi (the Illinois variant) on the full curve
    then closes the bracket in a few evaluations. Raises ``ValueError`` when
    no noise reaches the target (RDP's orders floor epsilon near 0.2 at
    delta 1e-5).
    """
    return _close_from_above(functools.partial(_rdp_epsilon, rate=rate, steps=steps, delta=delta), target,
                             _integer_order_upper_end(target, delta, rate, steps), tolerance)


def _rdp_epsilon(z: float, orders=None, *, rate: float, steps: int, delta: float) -> float:
    acc = MemoRDPAccountant()
    acc.history = [(z, rate, steps)]
    with warnings.catch_warnings():
        # The search probes noise levels far from the answer, where the best order is at an end of
        # the range and Opacus warns; the answer itself is judged on the full range.
        warnings.simplefilter("ignore", UserWarning)
        return acc.get_epsilon(delta=delta, alphas=orders)


def _integer_order_upper_end(target: float, delta: float, rate: float, steps: int) -> float:
    """The noise whose RDP epsilon over the integer orders alone is the target (to 1e-3): an upper end.

    Epsilon over every order is a minimum over a superset of orders, so it is never above the
    integer-order one; and the integer orders are a finite sum, about 50x cheaper than the
    fractional ones. Raises ``ValueError`` when no noise reaches the target.
    """
    integer_orders = [a for a in RDPAccountant.DEFAULT_ALPHAS if float(a).is_integer()]
    eps = functools.partial(_rdp_epsilon, orders=integer_orders, rate=rate, steps=steps, delta=delta)
    hi = 1.0
    while eps(hi) > target:
        hi *= 2
        if hi > MAX_NOISE:
            raise ValueError(f"no noise multiplier reaches epsilon {target}")
    lo = hi / 2 if hi > 1.0 else 0.0
    while hi - lo > 1e-3 * hi:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if eps(mid) <= target else (mid, hi)
    return hi


def prv_noise_for_epsilon(target: float, delta: float, rate: float, steps: int, tolerance: float = EPSILON_TOLERANCE) -> float:
    """The noise multiplier whose PRV epsilon (Opacus' accountant) lies in ``[target - tolerance, target]``.

    Opacus' ``get_noise_multiplier`` bisects from [0, 20] with a full PRV
    evaluation per probe (5-9 s a calibration here). RDP's integer-order
    answer lies above the PRV one (PRV is the tighter analysis), so the search
    starts there, checked on PRV itself and raised until PRV's epsilon is
    within the target, and the same regula falsi as RDP's closes it in a few
    PRV evaluations. (Starting from RDP's full answer instead cost three or
    four more fractional-order curves, about a third of a calibration.)
    """
    def eps(z: float) -> float:
        acc = QuietPRVAccountant()
        acc.history = [(z, rate, steps)]
        return acc.get_epsilon(delta=delta)

    try:
        hi = _integer_order_upper_end(target, delta, rate, steps)
    except ValueError:
        # RDP's orders cannot reach a small target (near 0.2 at delta 1e-5) that PRV can:
        # find an upper end on PRV's curve alone.
        hi = 1.0
    while eps(hi) > target:  # from RDP not expected; an upper end must hold on PRV's own curve
        hi *= 2
        if hi > MAX_NOISE:
            raise ValueError(f"no noise multiplier reaches epsilon {target}")
    return _close_from_above(eps, target, hi, tolerance)


def _close_from_above(eps, target: float, hi: float, tolerance: float) -> float:
    """From ``hi`` with ``eps(hi) <= target``, the noise multiplier whose epsilon is within ``tolerance`` below the target."""
    eps_hi = eps(hi)
    if target - eps_hi <= tolerance:
        return hi
    # 2. A lower end on the full curve: step down until epsilon exceeds the target.
    lo = hi
    while True:
        lo *= 0.9
        eps_lo = eps(lo) if lo > 1e-3 else math.inf
        if eps_lo > target:
            break
        hi, eps_hi = lo, eps_lo
        if target - eps_hi <= tolerance:
            return hi
    # 3. Illinois regula falsi on epsilon(z) - target; hi always keeps epsilon <= target.
    # (f_lo, f_hi are the interpolation weights, halved on a stuck side; eps_hi stays the true value.)
    f_lo, f_hi, side = eps_lo - target, eps_hi - target, 0
    while target - eps_hi > tolerance and hi - lo > 1e-9 * hi:
        mid = hi - f_hi * (hi - lo) / (f_hi - f_lo) if math.isfinite(f_lo) else (lo + hi) / 2
        if not lo < mid < hi:
            mid = (lo + hi) / 2
        e = eps(mid)
        if e <= target:
            hi, eps_hi, f_hi = mid, e, e - target
            if side == -1:
                f_lo /= 2
            side = -1
        else:
            lo, f_lo = mid, e - target
            if side == 1:
                f_hi /= 2
            side = 1
    return hi
