"""Every benchmark's smoke mode runs, so that no benchmark rots unseen.

Each module of ``benchmarks/`` is a benchmark unless it is ``__init__``, its
name starts with an underscore, or it is listed in ``HELPERS``; a new file is
covered without touching this test. Each runs as ``python -m benchmarks.NAME
--smoke`` in its own process (the simulation engine and Opacus hooks hold
process-wide state) and must exit 0 with ``RESULT NAME ...`` as its last line.
Its figures are never checked: smoke mode uses the tiny random model and toy
sizes, and timings depend on the machine.

The smoke runs start together when the first of them is asked for, at most
``SMOKE_CONCURRENCY`` at a time, and each test waits for its own. Most of a
smoke run's wall time is the simulation engine starting, polling and
stopping rather than computing (``recipes --smoke``: 54 s wall, 21 s of CPU),
so overlapping them shortens the suite without changing what any test checks.
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HELPERS = {"secagg_driver", "loopback"}  # imported by benchmarks and tests; not benchmarks themselves
SMOKE_TIMEOUT_S = 600  # a stuck run fails instead of hanging the suite
SMOKE_CONCURRENCY = 3  # smoke processes at a time (two cores; each is mostly waiting on the engine)

# Smoke runs another test makes in-process (and checks more of): not run a second time here.
SMOKED_ELSEWHERE = {"dropout_matrix": "tests/test_dropout.py"}

BENCHMARKS = sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py") if not p.stem.startswith("_") and p.stem not in HELPERS)


def test_benchmarks_are_discovered():
    assert {"dp_step", "demo", "secagg_round", "secagg_scale"} <= set(BENCHMARKS)


@pytest.mark.parametrize("name", BENCHMARKS)
def test_every_benchmark_has_a_smoke_mode(name):
    source = (ROOT / "benchmarks" / f"{name}.py").read_text()
    assert '"--smoke"' in source or "add_size_flags(" in source, f"benchmarks/{name}.py has no --smoke flag"
    assert "--smoke" in source.split('"""')[1], f"benchmarks/{name}.py: its docstring does not give the --smoke command"


def _smoke(name: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    return subprocess.run(
        [sys.executable, "-m", f"benchmarks.{name}", "--smoke"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=SMOKE_TIMEOUT_S,
    )


@pytest.fixture(scope="module")
def smoke_runs(request):
    """Every selected smoke run, started at once on a small pool: ``{name: Future[CompletedProcess]}``."""
    selected = [item.callspec.params["name"] for item in request.session.items
                if item.originalname == "test_smoke_run_ends_with_its_result_line"]
    pool = ThreadPoolExecutor(max_workers=SMOKE_CONCURRENCY)
    runs: dict[str, Future] = {name: pool.submit(_smoke, name) for name in selected if name not in SMOKED_ELSEWHERE}
    yield runs
    for run in runs.values():
        run.cancel()
    pool.shutdown(wait=True)


@pytest.mark.slow
@pytest.mark.parametrize("name", BENCHMARKS)
def test_smoke_run_ends_with_its_result_line(name, smoke_runs):
    if name in SMOKED_ELSEWHERE:
        pytest.skip(f"its --smoke runs in {SMOKED_ELSEWHERE[name]}")
    proc = smoke_runs[name].result()
    tail = proc.stderr[-4000:]
    assert proc.returncode == 0, f"benchmarks.{name} --smoke exited {proc.returncode}:\n{tail}"
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert lines and lines[-1].startswith(f"RESULT {name} "), f"benchmarks.{name} --smoke: last line is not its RESULT line:\n{lines[-3:]}\n{tail}"
