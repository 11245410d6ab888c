"""The epsilon ledger: every reported epsilon recomputed by an independent implementation.

* **record level**: for every device listed in the harness's ``config.json``,
  read the accountant state its store kept (the Opacus accountant's
  ``state_dict``: ``(noise multiplier, sampling rate, steps)`` per entry),
  recompute epsilon through Google's dp-accounting (the device used Opacus) and
  compare with the epsilon the device reported (``report.json``'s
  ``users[i].epsilon_record_level``; None means no DP-SGD);
* **user level**: recompute the server's per-round epsilon (``server.json``'s
  ``user_level``, Flower's accountant) with Opacus' RDP analysis.

Any disagreement beyond :data:`LEDGER_TOLERANCE` fails the audit. The
orchestrator can read the device stores because a simulation holds every
device on one machine; on a real deployment each device would run its own
ledger check.
"""

from __future__ import annotations

import math
from pathlib import Path

from simulations.audits.base import Audit, AuditContext, register
from simulations.audits.report_html import Plot, Section, bar_chart, format_epsilon

LEDGER_TOLERANCE = 0.05  # relative; the two RDP implementations use the same orders
OPACUS_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))


def record_level_epsilon_independent(history: list, delta: float) -> float:
    """Record-level epsilon of an Opacus accountant history, via dp-accounting."""
    import logging

    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    # dp-accounting logs each RDP order it cannot evaluate and then excludes it;
    # epsilon is the minimum over the remaining orders, so this is noise here.
    logging.getLogger("absl").setLevel(logging.ERROR)
    acc = RdpAccountant(OPACUS_ORDERS)
    for noise, rate, steps in history:
        acc.compose(dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(noise)), int(steps))
    return float(acc.get_epsilon(delta))


def _device_history(store_path: Path) -> list:
    from client import device
    from client.store import DeviceStore
    from client.train import accountant_history

    if not store_path.is_file():
        return []
    return accountant_history(device.accountant_state(DeviceStore(store_path)))


def _record_row(user: dict, reported: dict | None, delta: float, dp: bool) -> dict:
    history = _device_history(Path(user["store"]))
    independent = record_level_epsilon_independent(history, delta) if history else 0.0
    row = {
        "user_index": user["user_index"],
        "delta": delta,
        "mechanism": [{"noise_multiplier": z, "sample_rate": q, "steps": int(n)} for z, q, n in history],
        "epsilon_independent": independent,
    }
    if reported is None or not reported.get("evaluated"):
        # Nothing reported to check (the device never stored a result); listed, not failed.
        return {**row, "epsilon_reported": None, "agrees": None}
    claimed = reported.get("epsilon_record_level")
    agrees = (claimed is None and not dp) or (claimed is not None and math.isclose(claimed, independent, rel_tol=LEDGER_TOLERANCE, abs_tol=1e-9))
    return {**row, "epsilon_reported": claimed, "agrees": agrees}


def _user_level_row(user_level: dict) -> dict | None:
    from common.privacy.accounting import independent_user_epsilon

    if not user_level.get("dp"):
        return None
    per_round = user_level["epsilon_per_round"]
    last = per_round[max(per_round, key=int)] if per_round else 0.0
    again = independent_user_epsilon(
        float(user_level["noise_multiplier"]), len(per_round), float(user_level["delta"]), float(user_level.get("sample_rate", 1.0))
    )
    return {"epsilon_reported": last, "epsilon_independent": again, "agrees": math.isclose(last, again, rel_tol=LEDGER_TOLERANCE)}


def epsilon_ledger(view) -> dict:
    delta, dp = float(view.config["delta"]), bool(view.config["dp"])
    reported = view.reported()
    rows = [_record_row(user, reported.get(user["user_index"]), delta, dp) for user in view.participants]
    failures: list = [r["user_index"] for r in rows if r["agrees"] is False]
    user_row = _user_level_row(view.report["server"]["user_level"])
    if user_row is not None and not user_row["agrees"]:
        failures.append("user-level")
    return {"record_level": rows, "user_level": user_row, "failures": failures}


def _mechanism(history: list[dict]) -> tuple[str, str, int]:
    """(noise multipliers, sampling rates, total steps) of a device's logged DP-SGD mechanism."""
    zs = sorted({round(h["noise_multiplier"], 4) for h in history})
    qs = sorted({round(h["sample_rate"], 4) for h in history})
    return ", ".join(map(str, zs)) or "-", ", ".join(map(str, qs)) or "-", sum(h["steps"] for h in history)


def _agrees(value: bool | None) -> str | bool:
    return "not reported (device never evaluated)" if value is None else value


@register
class EpsilonLedger(Audit):
    name = "ledger"
    title = "Epsilon ledger"
    level = "fast"
    order = 10
    method = (
        "Every device's record-level epsilon is recomputed from the mechanism its store kept (the Opacus "
        "accountant's history: noise multiplier, sampling rate, steps) with Google's dp-accounting, and compared "
        "with the epsilon the device reported; the user-level epsilon of every round is recomputed with Opacus' "
        "RDP analysis, where the server used Flower's accountant."
    )
    criterion = f"every reported epsilon within {LEDGER_TOLERANCE:.0%} of its independent recomputation"

    def run(self, ctx: AuditContext) -> dict:
        return epsilon_ledger(ctx.view)

    def failure(self, result: dict) -> str | None:
        if result["failures"]:
            return f"epsilon ledger disagrees for {result['failures']}"
        return None

    def summary(self, result: dict) -> str:
        rows = result["record_level"]
        checked = sum(r["agrees"] is not None for r in rows)
        line = f"{checked} of {len(rows)} devices checked, {len(result['failures'])} disagreement(s)"
        if result["user_level"]:
            line += f"; user level {format_epsilon(result['user_level']['epsilon_reported'])}"
        return line

    def section(self, result: dict, ctx: AuditContext) -> Section:
        view = ctx.view
        rows = [
            [r["user_index"], r["delta"], *_mechanism(r["mechanism"]), view.config["max-grad-norm"], format_epsilon(r["epsilon_reported"]), f"{r['epsilon_independent']:.3f}", _agrees(r["agrees"])]
            for r in result["record_level"]
        ]
        header = ["user", "delta", "z", "sampling rate", "steps", "C", "reported (Opacus)", "independent (dp-accounting)", "agrees"]
        tables = [("Record-level epsilon per device", header, rows)]
        if result["user_level"]:
            u, ul = result["user_level"], view.report["server"]["user_level"]
            tables.append((
                f"User-level epsilon ({ul['sampling']})",
                ["delta", "z", "C", "rounds", "reported (Flower RdpAccountant)", "independent (Opacus RDP)", "agrees"],
                [[ul["delta"], ul["noise_multiplier"], ul["clip_norm"], ul["rounds_run"], f"{u['epsilon_reported']:.3f}", f"{u['epsilon_independent']:.3f}", u["agrees"]]],
            ))
        finite = [r for r in result["record_level"] if r["epsilon_reported"] is not None]
        figures = []
        if finite:
            chart = bar_chart([r["user_index"] for r in finite], [r["epsilon_reported"] for r in finite], title="record-level epsilon", ylabel="epsilon")
            figures.append(Plot("record-level epsilon per device", chart))
        return Section(self.section_id, self.title, self.method, tables, figures)
