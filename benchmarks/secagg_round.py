"""A secure-aggregation round against a plain round, both with real local training.

Runs the same federated simulation twice on Flower's simulation engine: once
plain, once with ``secagg=true``, which runs the SecAgg+ stages as extra
Message-API round trips. Each warm round (round 2 on) is timed from the end of
one aggregation to the end of the next, so it includes local DP training,
messaging, masking and unmasking.

    python -m benchmarks.secagg_round            # SmolLM2-135M, 10 clients, 3 rounds
    python -m benchmarks.secagg_round --quick    # tiny random model, 4 clients, 3 rounds (< 1 min)
    python -m benchmarks.secagg_round --smoke    # tiny random model, 3 clients, 2 rounds: one warm round (~1.5 min)

Last line: ``RESULT secagg_round key=value ...``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks._common import SMOKE_PROFILE, SMOKE_SIM, add_size_flags, result_line


def _round_times(secagg: bool, profile: str, overrides: dict) -> tuple[list[float], dict]:
    from simulations.run import prepare, simulate

    marks: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        harness = prepare(profile, {**overrides, "secagg": secagg}, Path(tmp) / ("secagg" if secagg else "plain"))
        report = simulate(harness, on_round=lambda *_: marks.append(time.perf_counter()))
    warm = [b - a for a, b in zip(marks, marks[1:])]
    return warm, report


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--local-steps", type=int, default=1)
    add_size_flags(ap, quick="tiny random model, 4 clients (< 1 min)")
    args = ap.parse_args(argv)
    profile = "default"
    if args.quick:
        args.model, args.clients, args.rounds = "tiny-random", 4, 3
    if args.smoke:
        # Two rounds: the first is the cold one, so the second is the only warm round.
        profile, args.model, args.clients, args.rounds = SMOKE_PROFILE, "tiny-random", SMOKE_SIM["num-supernodes"], 2
    if args.rounds < 2:
        raise SystemExit("--rounds must be >= 2 (round 1 is cold and not timed)")
    overrides = {
        **(SMOKE_SIM if args.smoke else {}),
        "model": args.model,
        "num-supernodes": args.clients,
        "num-server-rounds": args.rounds,
        "local-steps": args.local_steps,
        "scrub-mode": "patterns",  # ingestion happens in round 1 only; keep it short
    }

    plain, plain_report = _round_times(False, profile, overrides)
    secure, secure_report = _round_times(True, profile, overrides)
    res = {
        "model": args.model,
        "clients": args.clients,
        "plain_round_s": round(statistics.median(plain), 3),
        "secagg_round_s": round(statistics.median(secure), 3),
    }
    res["ratio"] = round(res["secagg_round_s"] / res["plain_round_s"], 3)
    res["overhead_s"] = round(res["secagg_round_s"] - res["plain_round_s"], 3)
    res["bytes_plain"] = plain_report["server"]["rounds"][-1]["bytes_per_client"][0]
    res["bytes_secagg"] = secure_report["server"]["rounds"][-1]["bytes_per_client"][0]
    print(f"warm rounds plain:  {[round(t, 2) for t in plain]}")
    print(f"warm rounds secagg: {[round(t, 2) for t in secure]}")
    print(result_line("secagg_round", res))
    return res


if __name__ == "__main__":
    main()
