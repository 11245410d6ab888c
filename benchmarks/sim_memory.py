"""Peak memory of a whole simulation at 10, 100 and 1,000 users (issue #15, figure b).

For each population size N the benchmark writes N users' files from the
embedded persona generator (several generated datasets side by side beyond
its 400 users) and runs one round of fedpersona's real simulation (the ServerApp
and the ClientApp on Flower's simulation engine), every setting at its
default except those given. A sampler thread reads the resident set size
(RSS) of the driver process and of every process below it (the Ray head,
its raylet and the worker that hosts the ClientApp) every 0.2 s, and keeps
the peak of their sum and the peak of the driver alone. In the simulation the
ServerApp runs inside the driver process, so "driver" is the closest thing to
the server process alone; it also holds the simulation engine.

RSS is sampled, so a peak shorter than the interval can be missed; each size
runs in a fresh Ray session so that no size inherits another's heap.

    python -m benchmarks.sim_memory                      # tiny-random model, N = 10, 100, 1000, one round
    python -m benchmarks.sim_memory --users 10,100 --model smollm2-135m
    python -m benchmarks.sim_memory --quick              # tiny-random model, N = 10 and 40
    python -m benchmarks.sim_memory --smoke              # tiny-random model, N = 3 (seconds; figures meaningless)

Last line: ``RESULT sim_memory model=... nN_peak_mb=... nN_driver_mb=... nN_wall_s=... ratio_100=... ratio_1000=...``
(ratios: the peak at N over the peak at the smallest N).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

from benchmarks._common import add_set_flag, add_size_flags, parse_sets, result_line  # noqa: E402

MB = 2**20


class TreeRSS:
    """Samples the RSS of this process and all its descendants in a background thread."""

    def __init__(self, interval: float = 0.2):
        import psutil

        self._me = psutil.Process()
        self._interval = interval
        self._stop = threading.Event()
        self.peak_total = self.peak_driver = 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        import psutil

        driver = self._me.memory_info().rss
        total = driver
        for child in self._me.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.Error:  # a process that ended between listing and reading
                pass
        self.peak_driver = max(self.peak_driver, driver)
        self.peak_total = max(self.peak_total, total)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self._interval)

    def __enter__(self) -> "TreeRSS":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def population(n: int, root: Path) -> Path:
    """A folder of ``n`` per-user files from the embedded persona generator.

    One generated dataset holds at most ``MAX_USERS`` (400) users, each with a
    unique signature; a larger population is several datasets (seeds 0, 1, ...)
    side by side, so signatures repeat across them, which a memory figure does
    not care about. Every size goes through the same ``--data`` path.
    """
    import shutil

    from simulations.personas import MAX_USERS, MIN_PERSONAS, DatasetSpec, generate_dataset

    folder = root / f"users-{n}"
    folder.mkdir(parents=True)
    made = seed = 0
    while made < n:
        take = min(MAX_USERS, n - made)
        generated = root / f"generated-{n}-{seed}"
        spec = DatasetSpec(num_users=max(take, MIN_PERSONAS), num_personas=MIN_PERSONAS if take < 4 else 4, seed=seed)
        users = [u for u in generate_dataset(generated, spec)["users"] if not u.get("holdout")][:take]
        for user in users:
            shutil.copy(generated / user["file"], folder / f"user_{made:04d}.jsonl")
            made += 1
        shutil.rmtree(generated)
        seed += 1
    return folder


def measure(n: int, overrides: dict, root: Path) -> dict:
    """One round at ``n`` users: peak RSS (total and driver) in MB, wall time, and whether every device contributed."""
    from simulations.run import prepare, simulate

    harness = prepare("default", overrides, root / f"n{n}", data=population(n, root))
    started = time.perf_counter()
    with TreeRSS() as rss:
        report = simulate(harness)
    wall = time.perf_counter() - started
    rounds = report["server"]["rounds"]
    contributors = sum(r["contributors"] for r in rounds)
    return {"peak_mb": rss.peak_total / MB, "driver_mb": rss.peak_driver / MB, "wall_s": wall,
            "contributors": contributors, "failed": sum(r["failed"] for r in rounds)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", default=None, help="comma-separated population sizes (default 10,100,1000)")
    ap.add_argument("--model", default="tiny-random", help="base model (default tiny-random)")
    add_set_flag(ap, "every size's run")
    add_size_flags(ap, quick="tiny-random model, N = 10 and 40")
    args = ap.parse_args(argv)
    sizes = [10, 100, 1000]
    if args.quick:
        sizes = [10, 40]
    if args.smoke:
        sizes = [3]
    if args.users:
        sizes = [int(x) for x in args.users.split(",")]
    # One round, one local step; the persona tier sized for the smallest N (the config needs a slot
    # per at most one client) so that every size runs the same configuration.
    overrides = {"model": args.model, "num-server-rounds": 1, "local-steps": 1, "scrub-mode": "patterns",
                 "persona-slots": min(4, min(sizes)), "num-personas": min(4, min(sizes)), **parse_sets(args.sets)}
    rows = {}
    with tempfile.TemporaryDirectory(prefix="sim-memory-") as tmp:
        for n in sizes:
            rows[n] = measure(n, overrides, Path(tmp))
            r = rows[n]
            print(f"N={n}: peak {r['peak_mb']:.0f} MB (driver {r['driver_mb']:.0f} MB), {r['wall_s']:.1f} s, "
                  f"{r['contributors']} contributed, {r['failed']} failed", flush=True)
    first = rows[sizes[0]]["peak_mb"]
    res: dict = {"model": args.model}
    for n, r in rows.items():
        res.update({f"n{n}_peak_mb": round(r["peak_mb"]), f"n{n}_driver_mb": round(r["driver_mb"]),
                    f"n{n}_wall_s": round(r["wall_s"], 1), f"n{n}_failed": r["failed"]})
    for n in sizes[1:]:
        res[f"ratio_{n}"] = round(rows[n]["peak_mb"] / first, 3)
    print(result_line("sim_memory", res), flush=True)
    if any(r["failed"] for r in rows.values()):
        raise SystemExit("some devices failed: the figures above are not of a complete run")
    return res


if __name__ == "__main__":
    main()
