"""What the benchmarks share (a helper, not a benchmark): the smoke settings and the RESULT line.

Every benchmark has three sizes: the full run (the figures in docs/results.md),
``--quick`` (the real model, under a minute) and ``--smoke`` (the tiny random
model and the smallest sizes: seconds, no ``../shared`` data, figures
meaningless). ``tests/test_benchmarks.py`` runs every ``--smoke`` so that no
benchmark rots unseen; it never looks at the figures.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

# A simulation in smoke mode: the quick profile (tiny random model) cut to
# 3 users and 1 round with pattern-only scrubbing (no spaCy load on the devices).
SMOKE_PROFILE = "quick"
SMOKE_SIM: dict[str, Any] = {"num-supernodes": 3, "num-server-rounds": 1, "scrub-mode": "patterns"}


def add_size_flags(ap: argparse.ArgumentParser, quick: str) -> None:
    """``--quick`` (its meaning given per benchmark) and ``--smoke``, mutually exclusive."""
    sizes = ap.add_mutually_exclusive_group()
    sizes.add_argument("--quick", action="store_true", help=quick)
    sizes.add_argument("--smoke", action="store_true", help="tiny random model, smallest sizes, seconds; figures meaningless (the test suite runs this)")


def result_line(name: str, values: Mapping[str, Any]) -> str:
    """``RESULT name key=value ...``: the machine-readable last line of every benchmark."""
    return f"RESULT {name} " + " ".join(f"{k}={v}" for k, v in values.items())


def add_set_flag(ap: argparse.ArgumentParser, what: str) -> None:
    """``--set KEY=VALUE`` (repeatable): run-config overrides, read with :func:`parse_sets`; ``what`` says which runs they reach."""
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE", help=f"a run-config override for {what}; repeatable")


def parse_sets(items: list[str]) -> dict[str, Any]:
    """``--set key=value`` options as run-config overrides (values parsed as JSON where they parse)."""
    import json

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects key=value, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out
