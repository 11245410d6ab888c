"""Utility per tier and per routing group at user-level epsilon in {inf, 8, 2} (issue #4's figure).

For each budget, runs the simulation with the persona tier on, user-level
DP-FedAvg on every shared tier (noise multiplier calibrated with Flower's
accountant so the planned rounds spend exactly the budget) and, by default,
secure aggregation with distributed noise. Reports per epsilon:

* held-out NLL per tier stack: global; global + persona; global + persona + user;
  and "served" (each user's routing group's stack);
* served NLL per routing group (cold-start, occasional, frequent);
* how well the devices' private persona choices recover the generator's
  personas (adjusted Rand index, simulation-only ground truth);
* the bytes each client sent in the last round (train + secure-aggregation replies).

    python -m benchmarks.tiers            # default profile (SmolLM2, 20 users), ~25 min
    python -m benchmarks.tiers --quick    # quick profile (tiny model, 6 users), pattern scrubbing
    python -m benchmarks.tiers --smoke    # tiny model, 3 users, 1 round, epsilon 8 only (~1 min)

Last line: ``RESULT tiers key=value ...``.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

from benchmarks._common import SMOKE_PROFILE, SMOKE_SIM, add_size_flags, result_line
from common.config import build_config
from common.privacy.accounting import noise_for_epsilon

BUDGETS = (math.inf, 8.0, 2.0)
# One finite budget covers every step of a budget's run (calibration, user-level
# DP, secure aggregation with distributed noise); the others differ only in z.
SMOKE_BUDGETS = (8.0,)


def run_one(profile: str, epsilon: float, secagg: bool, root: Path, extra: dict) -> dict:
    from simulations.run import prepare, simulate

    overrides = {"secagg": secagg, **extra}
    z = 0.0  # no user-level noise at epsilon = inf
    if math.isfinite(epsilon):
        cfg = build_config(profile, overrides)
        z = noise_for_epsilon(epsilon, cfg.federation.num_server_rounds, cfg.user_dp.delta, cfg.federation.num_supernodes)
        overrides.update({"user-dp": True, "user-noise-multiplier": z, "user-max-epsilon": epsilon})
    started = time.perf_counter()
    report = simulate(prepare(profile, overrides, root / f"eps-{epsilon}"))
    wall = time.perf_counter() - started
    diag = report["diagnostics"]["persona_recovery"]["rounds"]
    u = report["utility"]
    server = report["server"]
    last = server["rounds"][-1]
    eps_rounds = server["user_level"].get("epsilon_per_round", {})
    return {
        "epsilon": epsilon,
        "epsilon_spent": max(eps_rounds.values()) if eps_rounds else math.inf,
        "z": z,
        "wall_s": round(wall, 1),
        "tiers": {t: round(u[t]["nll"], 4) for t in ("base", "global", "persona", "personal", "served")},
        "groups": {g: {"users": v["users"], "served": round(v["served"], 4), "global": round(v["global"], 4)} for g, v in u["routing_groups"].items()},
        "ari_eval": diag.get(f"evaluate-{len(server['rounds'])}", {}).get("adjusted_rand_index", float("nan")),
        "persona_counts_last_round": last.get("persona_counts"),
        "bytes_per_client_last_round": max(last["bytes_per_client"]),
        "bytes_secagg_last_round": max(last["bytes_secagg_replies"]),
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_size_flags(ap, quick="quick profile (tiny model, 6 users), pattern scrubbing")
    ap.add_argument("--no-secagg", action="store_true", help="plain aggregation with server-added noise")
    ap.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    profile, extra, budgets = "default", {}, BUDGETS
    if args.quick:
        # Pattern scrubbing keeps the devices' first-round ingestion short.
        profile, extra = "quick", {"scrub-mode": "patterns"}
    if args.smoke:
        profile, extra, budgets = SMOKE_PROFILE, SMOKE_SIM, SMOKE_BUDGETS
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for eps in budgets:
            row = run_one(profile, eps, not args.no_secagg, Path(tmp), extra)
            rows.append(row)
            print(f"tiers eps={eps}: " + json.dumps(row), flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))
    fields = {}
    for row in rows:
        tag = "inf" if math.isinf(row["epsilon"]) else f"{row['epsilon']:g}"
        fields.update({f"eps{tag}_{t}": v for t, v in row["tiers"].items() if t != "base"})
        fields.update({f"eps{tag}_{g}": v["served"] for g, v in row["groups"].items()})
        fields.update({f"eps{tag}_ari": row["ari_eval"], f"eps{tag}_z": row["z"]})
    fields.update({"base": rows[0]["tiers"]["base"], "bytes_per_client": rows[0]["bytes_per_client_last_round"], "secagg": not args.no_secagg})
    print(result_line("tiers", fields))
    return {**fields, "rows": rows}


if __name__ == "__main__":
    main()
