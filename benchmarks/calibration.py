"""A device's record-level noise calibration with the PRV accountant: fedpersona's search against Opacus' bisection.

Each device calibrates its noise multiplier from its own record count (its Poisson rate), so
with small batches nearly every device asks a new question. Both arms answer the same questions
in one invocation, each from a cold start (no memo): (a) Opacus' ``get_noise_multiplier`` with
``accountant="prv"`` and the same tolerance, (b) ``client.accounting.prv_noise_for_epsilon``
(the RDP answer as a start from above, then regula falsi on PRV's own curve). Both answers are
judged by Opacus' PRV accountant: each must end within the tolerance below the target.

    python -m benchmarks.calibration            # rates of devices with 12..60 records at batch 6, 6 steps, epsilon 8
    python -m benchmarks.calibration --quick    # three rates
    python -m benchmarks.calibration --smoke    # one rate (the test suite runs this)

Last line: ``RESULT calibration key=value ...``.
"""

from __future__ import annotations

import argparse
import time

from benchmarks._common import add_size_flags, result_line


def _judge(z: float, rate: float, steps: int, delta: float) -> float:
    from opacus.accountants import PRVAccountant

    from client.accounting import _prv_quiet

    acc = PRVAccountant()
    acc.history = [(z, rate, steps)]
    with _prv_quiet():
        return acc.get_epsilon(delta=delta)


def main(argv=None) -> dict:
    from opacus.accountants.utils import get_noise_multiplier

    from client.accounting import EPSILON_TOLERANCE, _prv_epsilon, _prv_quiet, _step_rdp, prv_noise_for_epsilon

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", type=float, default=8.0)
    ap.add_argument("--steps", type=int, default=6)
    add_size_flags(ap, quick="three rates")
    args = ap.parse_args(argv)
    records = [12, 20, 28, 36, 44, 52, 60]
    if args.quick:
        records = [12, 31, 60]
    if args.smoke:
        records = [30]
    delta, out, t_opacus, t_ours = 1e-5, {}, 0.0, 0.0
    for n in records:
        rate = 1 / -(-n // 6)  # a device's Poisson rate at batch 6, as client.accounting.sample_rate
        _prv_epsilon.cache_clear()
        _step_rdp.cache_clear()
        t = time.perf_counter()
        with _prv_quiet():
            z_opacus = float(get_noise_multiplier(target_epsilon=args.target, target_delta=delta, sample_rate=rate,
                                                  steps=args.steps, accountant="prv", epsilon_tolerance=EPSILON_TOLERANCE))
        t_opacus += (a := time.perf_counter() - t)
        t = time.perf_counter()
        z_ours = prv_noise_for_epsilon(args.target, delta, rate, args.steps)
        t_ours += (b := time.perf_counter() - t)
        e_opacus, e_ours = _judge(z_opacus, rate, args.steps, delta), _judge(z_ours, rate, args.steps, delta)
        for e in (e_opacus, e_ours):
            assert args.target - EPSILON_TOLERANCE <= e <= args.target, f"rate {rate}: epsilon {e} outside the tolerance"
        print(f"{n:>3} records (q = {rate:.3f}): Opacus z = {z_opacus:.4f} (eps {e_opacus:.4f}) in {a:.2f} s; "
              f"ours z = {z_ours:.4f} (eps {e_ours:.4f}) in {b:.2f} s", flush=True)
    out.update({"rates": len(records), "steps": args.steps, "target": args.target,
                "opacus_s": round(t_opacus, 2), "ours_s": round(t_ours, 2), "speedup": round(t_opacus / t_ours, 2)})
    print(result_line("calibration", out))
    return out


if __name__ == "__main__":
    main()
