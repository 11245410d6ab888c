"""Per-round overhead of our secure aggregation vs Flower 1.41's legacy SecAgg+.

Both arms sum the SAME client vectors (460,800 float32 per client by default,
drawn from a per-client seed) at N = 10 and N = 30 clients.

* Flower: one legacy simulation (``run_simulation`` on Ray, ``NumPyClient``,
  ``LegacyContext`` + ``DefaultWorkflow``). Every round runs a plain fit
  (``default_fit_workflow``) and then a SecAgg+ fit (``SecAggPlusWorkflow``)
  against the same ClientApp; a tiny routing mod hands only SecAgg+ messages to
  ``secaggplus_mod``. Flower's overhead = SecAgg+ fit time - plain fit time, on
  warm rounds (round 1 excluded: Ray actors and imports warm up there).
* Ours: :func:`benchmarks.secagg_driver.run_secagg_round` end to end in ONE process, one
  thread: every client's key generation, Shamir sharing, share encryption,
  fixed-point encoding and mask expansion, and every server step, minus the
  time of a plain float64 sum of the same vectors. No transport is modelled
  (Flower's number includes its message passing; ours would add ~4 extra
  message hops per round once wired into the Message API).

Same neighbourhood for both: k = default_neighbours(N) neighbours and
threshold t = k//2 + 1 (Flower: num_shares = k + 1, which counts the node
itself and is odd as Flower requires; reconstruction_threshold = t).

    python -m benchmarks.secagg_overhead            # N = 10 and 30, 4 rounds each
    python -m benchmarks.secagg_overhead --quick    # N = 10, 3 rounds (< 1 min)
    python -m benchmarks.secagg_overhead --smoke    # N = 10, 2 rounds, 1,000 floats (~20 s, mostly Ray start-up)

Last line: ``RESULT secagg_overhead ...``.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time

os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

import numpy as np  # noqa: E402

from benchmarks._common import add_size_flags, result_line  # noqa: E402
from benchmarks.secagg_driver import run_secagg_round  # noqa: E402
from common.secagg import SecAggParams, default_neighbours  # noqa: E402

SEED = 20260417


def client_vector(pid: int, dim: int) -> np.ndarray:
    # LoRA-delta-like magnitudes, well inside both arms' ±8 clipping range.
    return np.random.default_rng([SEED, pid]).normal(0.0, 0.05, dim).astype(np.float32)


# ------------------------------------------------------------------ Flower arm

_FLOWER_TIMES: list[dict] = []  # filled by the ServerApp thread (same process as run_simulation)


def _flower_apps(n: int, dim: int, rounds: int, k: int, t: int):
    from flwr.app import Context
    from flwr.client import ClientApp, NumPyClient
    from flwr.client.mod import secaggplus_mod
    from flwr.common import ndarrays_to_parameters
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
    from flwr.server import LegacyContext, ServerApp, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_PARAMS_RECORD
    from flwr.server.workflow.default_workflows import default_fit_workflow

    cache: dict[int, np.ndarray] = {}

    class VectorClient(NumPyClient):
        def __init__(self, pid: int):
            self.pid = pid

        def fit(self, parameters, config):
            if self.pid not in cache:  # actors are reused: generate once per process
                cache[self.pid] = client_vector(self.pid, dim)
            return [cache[self.pid]], 1, {}

    def client_fn(context: Context):
        return VectorClient(int(context.node_config["partition-id"])).to_client()

    def route_secagg(msg, ctxt, call_next):
        # One ClientApp serves both arms: SecAgg+ stage messages carry its config
        # record, the plain fit does not.
        if RECORD_KEY_CONFIGS in msg.content.config_records:
            return secaggplus_mod(msg, ctxt, call_next)
        return call_next(msg, ctxt)

    client_app = ClientApp(client_fn=client_fn, mods=[route_secagg])
    server_app = ServerApp()
    secagg = SecAggPlusWorkflow(num_shares=k + 1, reconstruction_threshold=t, clipping_range=8.0)

    def params_of(context) -> np.ndarray:
        return context.state.array_records[MAIN_PARAMS_RECORD].to_numpy_ndarrays()[0].astype(np.float64)

    def timed_fit(grid, context):
        row = {}
        t0 = time.perf_counter()
        default_fit_workflow(grid, context)
        row["plain"] = time.perf_counter() - t0
        plain_mean = params_of(context)
        t0 = time.perf_counter()
        secagg(grid, context)
        row["secagg"] = time.perf_counter() - t0
        # FedAvg with num_examples=1 returns the mean; x N gives the sum.
        row["err"] = float(np.abs(params_of(context) - plain_mean).max() * n)
        _FLOWER_TIMES.append(row)

    @server_app.main()
    def main(grid, context):
        strategy = FedAvg(
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_fit_clients=n,
            min_available_clients=n,
            initial_parameters=ndarrays_to_parameters([np.zeros(dim, np.float32)]),
        )
        legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=rounds), strategy=strategy)
        DefaultWorkflow(fit_workflow=timed_fit)(grid, legacy)

    return server_app, client_app


def run_flower(n: int, dim: int, rounds: int, k: int, t: int) -> dict:
    from flwr.simulation import run_simulation

    _FLOWER_TIMES.clear()
    server_app, client_app = _flower_apps(n, dim, rounds, k, t)
    t0 = time.perf_counter()
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=n,
        # Two actors on the two cores: Flower's clients run in parallel.
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    wall = time.perf_counter() - t0
    if len(_FLOWER_TIMES) != rounds:
        raise RuntimeError(f"Flower simulation finished {len(_FLOWER_TIMES)}/{rounds} rounds")
    warm = _FLOWER_TIMES[1:]
    plain = statistics.median(r["plain"] for r in warm)
    sec = statistics.median(r["secagg"] for r in warm)
    return {
        "plain_s": plain,
        "secagg_s": sec,
        "overhead_s": sec - plain,
        "max_abs_err": max(r["err"] for r in warm),
        "wall_s": wall,
    }


# --------------------------------------------------------------------- our arm


def _feasible_dropouts(params: SecAggParams, frac: float, rng: np.random.Generator) -> list[int]:
    """A random dropout set of the given fraction that every neighbourhood survives.

    The survivors must also stay connected in the neighbour graph: the server
    aborts rather than unmask a disconnected survivor set.
    """
    n_drop = int(round(frac * len(params.node_ids)))
    for _ in range(200):
        drop = set(rng.choice(params.node_ids, n_drop, replace=False).tolist())
        alive = set(params.node_ids) - drop
        if all(len(params.neighbours_of(i) & alive) >= params.threshold for i in params.node_ids) and params.connected(alive):
            return sorted(drop)
    raise RuntimeError("no tolerable dropout set found; raise k or lower t")


def run_ours(n: int, dim: int, rounds: int, k: int, t: int) -> dict:
    vectors = {pid: client_vector(pid, dim) for pid in range(n)}
    ids = sorted(vectors)

    def plain_sum(members):
        acc = vectors[members[0]].astype(np.float64)
        for i in members[1:]:
            acc += vectors[i]
        return acc

    totals, plains, client_s, server_s = [], [], [], []
    err0 = 0.0
    for r in range(rounds):
        params = SecAggParams.create(ids, dim, neighbours=k, threshold=t)  # fresh session every round
        t0 = time.perf_counter()
        res = run_secagg_round(vectors, params)
        total = time.perf_counter() - t0
        t0 = time.perf_counter()
        ref = plain_sum(ids)
        plain = time.perf_counter() - t0
        err0 = max(err0, float(np.abs(res.sum - ref).max()))
        if r:  # warm rounds only, like the Flower arm
            totals.append(total)
            plains.append(plain)
            client_s.append(res.seconds["clients"])
            server_s.append(res.seconds["server"])

    params = SecAggParams.create(ids, dim, neighbours=k, threshold=t)
    drop = _feasible_dropouts(params, 0.3, np.random.default_rng(SEED))
    t0 = time.perf_counter()
    res = run_secagg_round(vectors, params, drop_after_shares=drop)
    drop_total = time.perf_counter() - t0
    assert set(res.dropped) == set(drop)
    err30 = float(np.abs(res.sum - plain_sum(list(res.survivors))).max())
    total, plain = statistics.median(totals), statistics.median(plains)
    return {
        "total_s": total,
        "plain_s": plain,
        "overhead_s": total - plain,
        "clients_s": statistics.median(client_s),
        "server_s": statistics.median(server_s),
        "drop30_total_s": drop_total,
        "err_drop0": err0,
        "err_drop30": err30,
        "bound": params.codec.error_bound(n),
    }


# ------------------------------------------------------------------------ main


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_size_flags(ap, quick="N=10 only, 3 rounds")
    ap.add_argument("--dim", type=int, default=None, help="floats per client vector (default 460,800; 1,000 with --smoke)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds per arm (first is warm-up)")
    ap.add_argument("--clients", type=str, default=None, help="comma-separated N values")
    args = ap.parse_args(argv)
    small = args.quick or args.smoke
    sizes = [int(s) for s in (args.clients or ("10" if small else "10,30")).split(",")]
    rounds = args.rounds or (2 if args.smoke else 3 if args.quick else 4)
    args.dim = args.dim or (1_000 if args.smoke else 460_800)
    if rounds < 2:
        raise SystemExit("--rounds must be >= 2 (round 1 is excluded as warm-up)")
    logging.getLogger("flwr").setLevel(logging.WARNING)

    rows = {}
    for n in sizes:
        k = default_neighbours(n)
        t = k // 2 + 1
        ours = run_ours(n, args.dim, rounds, k, t)
        flower = run_flower(n, args.dim, rounds, k, t)
        rows[n] = (k, t, ours, flower)

    print()
    print(f"secure aggregation overhead per warm round, dim={args.dim}, {rounds - 1} warm round(s), median")
    hdr = (
        f"{'N':>3} {'k':>3} {'t':>3} | {'flwr plain':>10} {'flwr secagg+':>12} {'flwr ovh':>9} {'flwr err':>9} |"
        f" {'ours total':>10} {'clients':>8} {'server':>7} {'ours ovh':>9} {'30%drop':>8} | {'ratio':>6}"
    )
    print(hdr)
    print("-" * len(hdr))
    for n, (k, t, o, f) in rows.items():
        ratio = o["overhead_s"] / f["overhead_s"] if f["overhead_s"] > 0 else float("nan")
        print(
            f"{n:>3} {k:>3} {t:>3} | {f['plain_s']:>10.3f} {f['secagg_s']:>12.3f} {f['overhead_s']:>9.3f} "
            f"{f['max_abs_err']:>9.2e} | {o['total_s']:>10.3f} {o['clients_s']:>8.3f} {o['server_s']:>7.3f} "
            f"{o['overhead_s']:>9.3f} {o['drop30_total_s']:>8.3f} | {ratio:>6.3f}"
        )
    print("(seconds; 'flwr err' / 'err' = max |secure sum - plain sum| over all coordinates)")
    for n, (_, _, o, _) in rows.items():
        print(
            f"N={n}: ours max abs err 0% dropout {o['err_drop0']:.2e}, 30% dropout {o['err_drop30']:.2e} "
            f"(documented bound {o['bound']:.2e})"
        )

    def fmt(n, key):
        if n not in rows:
            return "na"
        _, _, o, f = rows[n]
        vals = {
            "flower": f["overhead_s"],
            "ours": o["overhead_s"],
            "ratio": o["overhead_s"] / f["overhead_s"] if f["overhead_s"] > 0 else float("nan"),
        }
        return f"{vals[key]:.4f}"

    err0 = max(o["err_drop0"] for _, _, o, _ in rows.values())
    err30 = max(o["err_drop30"] for _, _, o, _ in rows.values())
    res = {}
    for n in (10, 30):
        res.update({f"n{n}_flower_overhead_s": fmt(n, "flower"), f"n{n}_ours_s": fmt(n, "ours"), f"n{n}_ratio": fmt(n, "ratio")})
    res.update({"max_abs_err": f"{max(err0, err30):.3e}", "max_abs_err_drop0": f"{err0:.3e}", "max_abs_err_drop30": f"{err30:.3e}"})
    print(result_line("secagg_overhead", res), flush=True)
    return {**res, "rows": rows}


if __name__ == "__main__":
    main()
