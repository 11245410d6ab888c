"""The guarantees as stated: what the project reported before issue 12, what held, and what it reports now.

Each row recomputes one figure from the published analyses with dp-accounting
(RDP and PLD) or Opacus, independently of the code paths it checks:

* ``record_sample``: a record-level epsilon assumes the Poisson sample is
  secret. If the server knows the sample (it did: the batch generator was
  seeded from the run config), a record drawn in k of the steps has the
  epsilon of k *unsampled* Gaussian steps.
* ``user_sampling``: user-level epsilon with client sampling, against
  observers of the released model (amplified) and against a server that drew
  the cohort itself (no amplification, over the rounds the user took part in).
* ``distributed_noise``: shares sized z*C/sqrt(m) give variance (zC)^2 only
  while the target user is present; under add-or-remove, removing the user
  removes its share too, so the released noise is z*sqrt((m-1)/m) (and less
  with colluders). Shares sized for the honest floor restore z.
* ``calibration``: noise_for_epsilon rounded to nearest overshot its target;
  rounded up it never does.

    python -m benchmarks.guarantees            # the table (seconds)
    python -m benchmarks.guarantees --smoke    # the same
"""

from __future__ import annotations

import argparse
import math

DELTA = 1e-5


def _rdp_eps(events: list[tuple[float, float, int]], delta: float) -> float:
    """(noise multiplier, sample rate, steps) events composed with dp-accounting's RDP accountant."""
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    # Opacus' orders, so the figures compare with the ones the project reports.
    acc = RdpAccountant([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))
    for z, q, steps in events:
        event = dp_accounting.GaussianDpEvent(z) if q >= 1 else dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z))
        acc.compose(event, steps)
    return float(acc.get_epsilon(delta))


def _pld_eps(events: list[tuple[float, float, int]], delta: float) -> float:
    import dp_accounting
    from dp_accounting.pld import PLDAccountant

    acc = PLDAccountant()
    for z, q, steps in events:
        event = dp_accounting.GaussianDpEvent(z) if q >= 1 else dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z))
        acc.compose(event, steps)
    return float(acc.get_epsilon(delta))


def record_sample() -> dict:
    """N = 40 records, batch 6 (q = 1/7), sigma = 1, 6 steps: the report vs a record drawn 3 times in a known sample."""
    reported = _rdp_eps([(1.0, 1 / 7, 6)], DELTA)
    known_rdp = _rdp_eps([(1.0, 1.0, 3)], DELTA)
    known_pld = _pld_eps([(1.0, 1.0, 3)], DELTA)
    return {"reported": reported, "known_sample_rdp": known_rdp, "known_sample_pld": known_pld, "after": reported}


def user_sampling(z: float = 1.0, q: float = 0.1, rounds: int = 100, delta: float = 1e-3) -> dict:
    """z = 1, q = 0.1, 100 rounds: amplified (observers; a self-sampled cohort) vs a server that drew the cohort."""
    observers = _rdp_eps([(z, q, rounds)], delta)
    taken_part = round(q * rounds)  # the rounds a typical user took part in
    server_drawn = _rdp_eps([(z, 1.0, taken_part)], delta)
    return {"observers": observers, "server_drew_cohort": server_drawn, "rounds_taken_part": taken_part}


def distributed_noise(z: float = 1.0, rounds: int = 3, delta: float = 1e-3, colluder_fraction: float = 0.1) -> dict:
    """Old shares z*C/sqrt(m): with the target removed the noise is z*sqrt((m-1)/m); new shares hold z."""
    from common.privacy.sums import honest_contributors

    out = {"centralised": _rdp_eps([(z, 1.0, rounds)], delta), "centralised_pld": _pld_eps([(z, 1.0, rounds)], delta)}
    for m in (14, 4):
        # Before: shares of std zC/sqrt(m), m of them; removing the target leaves m - 1. An
        # equal-variance estimate at the smaller noise: a lower bound on the mismatched pair's epsilon.
        out[f"old_m{m}"] = _rdp_eps([(z * math.sqrt((m - 1) / m), 1.0, rounds)], delta)
        out[f"old_m{m}_pld"] = _pld_eps([(z * math.sqrt((m - 1) / m), 1.0, rounds)], delta)
        # After: zero-out with every device's share present, sized for the honest floor after colluders.
        n = m  # a cohort whose unmask floor is m
        h = honest_contributors(m, n, colluder_fraction)
        # The honest shares alone carry variance h * (zC)^2 / h: a Gaussian mechanism at exactly z.
        out[f"new_m{m}"] = _rdp_eps([(z, 1.0, rounds)], delta)
        out[f"new_m{m}_honest"] = h
    return out


def _old_noise_for_epsilon(target: float, rounds: int, delta: float, population: int) -> float:
    """The calibration as it was before issue 12: the same bisection, rounded to *nearest*."""
    from common.privacy.accounting import smallest_fitting_noise

    return round(smallest_fitting_noise(target, rounds, delta, population), 3)


def calibration(rounds: int = 3, delta: float = 1e-3, population: int = 20) -> dict:
    """How many of 40 targets the calibrated noise overshoots: rounded to nearest (before) and up (now)."""
    from common.privacy.accounting import independent_user_epsilon, noise_for_epsilon

    targets = [0.5 + 0.25 * i for i in range(40)]
    over = {"before": 0, "now": 0}
    for target in targets:
        for name, z in (("before", _old_noise_for_epsilon(target, rounds, delta, population)), ("now", noise_for_epsilon(target, rounds, delta, population))):
            over[name] += independent_user_epsilon(z, rounds, delta) > target * (1 + 1e-9)
    return {"targets": len(targets), "overshoot_before": over["before"], "overshoot_now": over["now"]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="the same table (it takes seconds)")
    ap.parse_args(argv)
    rec, user, dist, cal = record_sample(), user_sampling(), distributed_noise(), calibration()
    print(f"record-level, known sample: reported {rec['reported']:.2f}; a record drawn 3 times: RDP {rec['known_sample_rdp']:.2f}, PLD {rec['known_sample_pld']:.2f}")
    print(f"user-level, z=1 q=0.1 100 rounds: observers {user['observers']:.2f}; a server that drew the cohort {user['server_drew_cohort']:.2f}")
    print(f"distributed noise, 3 rounds, RDP (PLD): centralised {dist['centralised']:.2f} ({dist['centralised_pld']:.2f}); "
          f"old shares at least m=14 {dist['old_m14']:.2f} ({dist['old_m14_pld']:.2f}), m=4 {dist['old_m4']:.2f} ({dist['old_m4_pld']:.2f}); "
          f"new {dist['new_m14']:.2f}, {dist['new_m4']:.2f}")
    print(f"noise calibration: {cal['overshoot_before']} of {cal['targets']} targets overshot before, {cal['overshoot_now']} now")
    res = {
        "record_reported": round(rec["reported"], 2),
        "record_known_sample_rdp": round(rec["known_sample_rdp"], 2),
        "record_known_sample_pld": round(rec["known_sample_pld"], 2),
        "user_observers": round(user["observers"], 2),
        "user_server_drew_cohort": round(user["server_drew_cohort"], 2),
        "distributed_centralised": round(dist["centralised"], 2),
        "distributed_centralised_pld": round(dist["centralised_pld"], 2),
        "distributed_old_m14": round(dist["old_m14"], 2),
        "distributed_old_m4": round(dist["old_m4"], 2),
        "distributed_new": round(dist["new_m4"], 2),
        "calibration_overshoot_before": cal["overshoot_before"],
        "calibration_overshoot_now": cal["overshoot_now"],
    }
    print("RESULT guarantees " + " ".join(f"{k}={v}" for k, v in res.items()))
    return res


if __name__ == "__main__":
    main()
