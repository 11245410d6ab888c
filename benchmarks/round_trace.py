"""Which project files one federated round passes through: the newcomer's reading list, measured.

Runs a round of the default configuration in-process (the real ServerApp
strategy, the real ClientApp with its mods, devices with their own policies,
the in-process grid of ``benchmarks/loopback.py``) and records every project
source file whose code runs between the server configuring the round and the
server applying the sum.
The stores are opened once beforehand, so ingestion and scrubbing (first
contact only) are not part of the round.

    python -m benchmarks.round_trace            # default config on the tiny model, 3 devices
    python -m benchmarks.round_trace --smoke    # the same (it takes seconds)
    python -m benchmarks.round_trace --secagg --user-dp   # the privacy pipeline's other steps
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("client", "server", "common")


def _project_file(filename: str) -> str | None:
    path = Path(filename)
    try:
        rel = path.resolve().relative_to(ROOT)
    except ValueError:
        return None
    return str(rel) if rel.parts and rel.parts[0] in PACKAGES else None


def trace_round(secagg: bool = False, user_dp: bool = False) -> list[str]:
    from flwr.app import ConfigRecord
    from flwr.supercore.task_identity import TaskIdentity

    from benchmarks.loopback import LoopbackGrid, device_context, initial_arrays, strategy_for
    from client.app import app
    from common.config import build_config
    from simulations.personas import DatasetSpec, generate_dataset

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    cfg = build_config("quick", {"num-supernodes": 3, "scrub-mode": "patterns", "secagg": secagg, "user-dp": user_dp})
    with tempfile.TemporaryDirectory() as tmp:
        manifest = generate_dataset(Path(tmp) / "data", DatasetSpec(num_users=3, num_personas=3, seed=1))
        contexts = {100 + i: device_context(Path(tmp), 100 + i, Path(tmp) / "data" / user["file"], cfg) for i, user in enumerate(manifest["users"])}
        arrays = initial_arrays(cfg)
        strategy = strategy_for(cfg, num_rounds=2)
        grid = LoopbackGrid(app, contexts)
        # Round 1 ingests every device's data (first contact); round 2 is the traced one.
        strategy.aggregate_train(1, grid.send_and_receive(strategy.configure_train(1, arrays, ConfigRecord(), grid)))
        seen: set[str] = set()

        def profile(frame, event, arg):
            if event == "call":
                name = _project_file(frame.f_code.co_filename)
                if name:
                    seen.add(name)

        sys.setprofile(profile)
        try:
            strategy.aggregate_train(2, grid.send_and_receive(strategy.configure_train(2, arrays, ConfigRecord(), grid)))
        finally:
            sys.setprofile(None)
    return sorted(seen)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="the same run (it takes seconds)")
    ap.add_argument("--secagg", action="store_true")
    ap.add_argument("--user-dp", action="store_true")
    args = ap.parse_args(argv)
    files = trace_round(args.secagg, args.user_dp)
    for f in files:
        print(f)
    res = {"files": len(files), "secagg": args.secagg, "user_dp": args.user_dp}
    print("RESULT round_trace " + " ".join(f"{k}={v}" for k, v in res.items()))
    return res


if __name__ == "__main__":
    main()
