"""The main job's wall time and held-out utility (issue #3's figures).

Runs ``fedpersona simulate`` in-process for a profile and reports its wall time
and the three-way utility comparison from the run's report. `make demo` adds the
install (and, on a fresh cache, the one-off GGUF conversion) to this figure;
docs/results.md records both.

    python -m benchmarks.demo            # the default profile (SmolLM2, 20 users)
    python -m benchmarks.demo --quick    # the quick profile (tiny model, 6 users)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main(argv=None) -> dict:
    from simulations.run import prepare, simulate

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--profile", default="default")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    profile = "quick" if args.quick else args.profile

    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        report = simulate(prepare(profile, {}, Path(tmp) / "run"))
        wall = time.perf_counter() - started
    u = report["utility"]
    eps = report["epsilon_record_level"]
    res = {
        "profile": profile,
        "model": report["config"]["model"],
        "users": u["users"],
        "wall_s": round(wall, 1),
        "nll_base": round(u["base"]["nll"], 4),
        "nll_global": round(u["global"]["nll"], 4),
        "nll_personal": round(u["personal"]["nll"], 4),
        "personal_beats_global": u["users_personal_beats_global"],
        "eps_max": round(eps["max"], 2) if eps["max"] is not None else "inf",
    }
    print("RESULT demo " + " ".join(f"{k}={v}" for k, v in res.items()))
    return res


if __name__ == "__main__":
    main()
