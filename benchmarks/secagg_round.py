"""A secure-aggregation round against a plain round, both with real local training.

Runs the same federated simulation twice on Flower's simulation engine: once
plain, once with ``secagg=true``, which runs the SecAgg+ stages as extra
Message-API round trips. Each warm round (round 2 on) is timed from the end of
one aggregation to the end of the next, so it includes local DP training,
messaging, masking and unmasking.

    python -m benchmarks.secagg_round            # SmolLM2-135M, 10 clients, 3 rounds
    python -m benchmarks.secagg_round --quick    # tiny random model, 4 clients (< 1 min)
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def _round_times(secagg: bool, args) -> tuple[list[float], dict]:
    from simulations.run import prepare, simulate

    marks: list[float] = []
    overrides = {
        "model": args.model,
        "num-supernodes": args.clients,
        "num-server-rounds": args.rounds,
        "local-steps": args.local_steps,
        "scrub-mode": "patterns",  # ingestion happens in round 1 only; keep it short
        "secagg": secagg,
    }
    with tempfile.TemporaryDirectory() as tmp:
        cfg = prepare("default", overrides, Path(tmp) / ("secagg" if secagg else "plain"))
        report = simulate(cfg, on_round=lambda *_: marks.append(time.perf_counter()))
    warm = [b - a for a, b in zip(marks, marks[1:])]
    return warm, report


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--local-steps", type=int, default=1)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.model, args.clients, args.rounds = "tiny-random", 4, 3

    plain, plain_report = _round_times(False, args)
    secure, secure_report = _round_times(True, args)
    res = {
        "model": args.model,
        "clients": args.clients,
        "plain_round_s": round(statistics.median(plain), 3),
        "secagg_round_s": round(statistics.median(secure), 3),
    }
    res["ratio"] = round(res["secagg_round_s"] / res["plain_round_s"], 3)
    res["overhead_s"] = round(res["secagg_round_s"] - res["plain_round_s"], 3)
    res["bytes_plain"] = plain_report["rounds"][-1]["bytes_per_client"][0]
    res["bytes_secagg"] = secure_report["rounds"][-1]["bytes_per_client"][0]
    print(f"warm rounds plain:  {[round(t, 2) for t in plain]}")
    print(f"warm rounds secagg: {[round(t, 2) for t in secure]}")
    print("RESULT secagg_round " + " ".join(f"{k}={v}" for k, v in res.items()))
    return res


if __name__ == "__main__":
    main()
