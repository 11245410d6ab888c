"""The audits of a finished simulation run: one module per audit, found through a registry.

Each audit (``ledger.py``, ``wire.py``, ``exposure.py``, ...) is an
:class:`~simulations.audits.base.Audit` that registers itself with
``@register``; :func:`run_audits` runs every registered audit of the level,
writes ``audit.json`` and ``report.html`` (``html.py``: the run's main results
first, then one section per audit), and raises :class:`AuditFailure` if any
audit failed. ``view.py`` is what the audits may look at (:class:`RunView`),
``stats.py`` their statistics, ``report_html.py`` the page renderer.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from simulations.audits.base import FAILED, LEVELS, NOT_RUN, AuditContext, AuditFailure, registered

__all__ = ["AuditFailure", "LEVELS", "run_audits"]


def _compared(run: Path) -> tuple[str, dict, dict]:
    run = Path(run)
    return run.name, json.loads((run / "report.json").read_text()), json.loads((run / "audit.json").read_text())


def run_audits(run_dir: Path, level: str = "full", baseline: Path | None = None, compare: list[Path] = ()) -> dict:
    """Run the registered audits of ``level`` on a finished run; write ``audit.json`` and ``report.html``.

    * ``fast`` runs the audits of level fast (the epsilon ledger, the wire
      audit, canary exposure with fewer candidates, the one-run DP audit,
      utility disparity, DP disparate impact); ``full`` adds the rest (the
      membership signal and the audits that generate text);
    * ``baseline``: a non-private run of the same data, for DP disparate impact;
    * ``compare``: other audited runs, for the privacy-utility chart.

    ``audit.json`` holds each audit's result under its name (``{"skipped":
    reason}`` when the run lacks the ground truth it needs), a verdict per
    audit and the seconds each took. Raises :class:`AuditFailure`, after both
    files are written, when any audit failed.
    """
    if level not in LEVELS:
        raise ValueError(f"audit level must be one of {list(LEVELS)}")
    from simulations.audits.html import write_html

    run_dir = Path(run_dir)
    ctx = AuditContext(run_dir, level, Path(baseline) if baseline is not None else None)
    result: dict = {"level": level}
    verdicts, seconds = {}, {}
    for audit in registered():
        if not audit.runs_at(level):
            verdicts[audit.name] = {"status": NOT_RUN, "detail": f"a {audit.level}-level audit"}
            continue
        started = time.perf_counter()
        result[audit.name] = audit.run(ctx)
        seconds[audit.name] = round(time.perf_counter() - started, 1)
        verdicts[audit.name] = audit.verdict(result[audit.name])
    result["verdicts"], result["seconds"] = verdicts, seconds
    (run_dir / "audit.json").write_text(json.dumps(result, indent=2, default=str))
    write_html(ctx, result, [_compared(c) for c in compare])
    failed = [f"{name}: {v['detail']}" for name, v in verdicts.items() if v["status"] == FAILED]
    if failed:
        raise AuditFailure("; ".join(failed) + f" (see {run_dir / 'audit.json'})", result)
    return result
