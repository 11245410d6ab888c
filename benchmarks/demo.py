"""The main job's wall time and held-out utility (issue #3's figures).

Runs the simulation in-process for a profile (what ``fedpersona simulate``
runs, without the audits) and reports its wall time and the three-way utility
comparison from the run's report. `make demo` adds the install (and, on a
fresh cache, the one-off GGUF conversion) to this figure; docs/results.md
records both.

    python -m benchmarks.demo            # the default profile (SmolLM2, 20 users)
    python -m benchmarks.demo --quick    # the quick profile (tiny model, 6 users, 2 rounds)
    python -m benchmarks.demo --smoke    # tiny model, 3 users, 1 round, pattern scrubbing (~1 min)

Last line: ``RESULT demo key=value ...``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from benchmarks._common import SMOKE_PROFILE, SMOKE_SIM, add_size_flags, result_line


def main(argv=None) -> dict:
    from simulations.run import prepare, simulate

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="default")
    add_size_flags(ap, quick="the quick profile (tiny model, 6 users)")
    args = ap.parse_args(argv)
    profile, overrides = args.profile, {}
    if args.quick:
        profile = "quick"
    if args.smoke:
        profile, overrides = SMOKE_PROFILE, SMOKE_SIM

    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        report = simulate(prepare(profile, overrides, Path(tmp) / "run"))
        wall = time.perf_counter() - started
    u = report["utility"]
    eps = report["epsilon_record_level"]
    res = {
        "profile": profile + ("-smoke" if args.smoke else ""),
        "model": report["config"]["model"],
        "users": u["users"],
        "wall_s": round(wall, 1),
        "nll_base": round(u["base"]["nll"], 4),
        "nll_global": round(u["global"]["nll"], 4),
        "nll_personal": round(u["personal"]["nll"], 4),
        "personal_beats_global": u["users_personal_beats_global"],
        "eps_max": round(eps["max"], 2) if eps["max"] is not None else "inf",
    }
    print(result_line("demo", res))
    return res


if __name__ == "__main__":
    main()
