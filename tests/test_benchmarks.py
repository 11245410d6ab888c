"""Every benchmark's smoke mode runs, so that no benchmark rots unseen.

Each module of ``benchmarks/`` is a benchmark unless it is ``__init__``, its
name starts with an underscore, or it is listed in ``HELPERS``; a new file is
covered without touching this test. Each runs as ``python -m benchmarks.NAME
--smoke`` in its own process (the simulation engine and Opacus hooks hold
process-wide state) and must exit 0 with ``RESULT NAME ...`` as its last line.
Its figures are never checked: smoke mode uses the tiny random model and toy
sizes, and timings depend on the machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HELPERS = {"secagg_driver", "loopback"}  # imported by benchmarks and tests; not benchmarks themselves
SMOKE_TIMEOUT_S = 600  # a stuck run fails instead of hanging the suite

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


@pytest.mark.slow
@pytest.mark.parametrize("name", BENCHMARKS)
def test_smoke_run_ends_with_its_result_line(name):
    if name in SMOKED_ELSEWHERE:
        pytest.skip(f"its --smoke runs in {SMOKED_ELSEWHERE[name]}")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{name}", "--smoke"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=SMOKE_TIMEOUT_S,
    )
    tail = proc.stderr[-4000:]
    assert proc.returncode == 0, f"benchmarks.{name} --smoke exited {proc.returncode}:\n{tail}"
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert lines and lines[-1].startswith(f"RESULT {name} "), f"benchmarks.{name} --smoke: last line is not its RESULT line:\n{lines[-3:]}\n{tail}"
