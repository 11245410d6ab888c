"""DP disparate impact (Bagdasaryan et al. 2019): what record-level DP costs each group.

Needs a non-private ``--baseline`` run of the same users; skipped without one.
"""

from __future__ import annotations

import statistics

from simulations.audits.base import Audit, AuditContext, register, skipped
from simulations.audits.disparity import evaluated, personas
from simulations.audits.report_html import Section


def dp_impact(view, baseline) -> dict:
    """Served-NLL increase from ``baseline`` (non-private) to this run, per persona and routing group, on the same users."""
    base = {r["user_id"]: r["nll_served"] for r in evaluated(baseline)}
    rows = [r for r in evaluated(view) if r["user_id"] in base]
    if not rows:
        return skipped("the baseline run evaluated none of this run's users")
    increase = [r["nll_served"] - base[r["user_id"]] for r in rows]
    out = {"users": len(rows), "mean_increase": statistics.fmean(increase)}
    names = personas(view)
    groupings = {"by_routing_group": lambda r: r["routing_group"]}
    if names:
        groupings = {"by_persona": lambda r: names[r["user_id"]], **groupings}
    for grouping, key in groupings.items():
        table: dict[str, list[float]] = {}
        for r, d in zip(rows, increase):
            table.setdefault(key(r), []).append(d)
        out[grouping] = {g: {"users": len(v), "mean_increase": statistics.fmean(v)} for g, v in sorted(table.items())}
    return out


@register
class DPImpact(Audit):
    name = "dp_impact"
    title = "DP disparate impact"
    level = "fast"
    order = 70
    method = (
        "DP disparate impact (Bagdasaryan et al. 2019): the increase in served NLL from a non-private "
        "baseline run to this run, per persona and per routing group, on the same users."
    )

    def run(self, ctx: AuditContext) -> dict:
        if ctx.baseline is None:
            return skipped("no --baseline run given (a non-private run of the same data to compare with)")
        return dp_impact(ctx.view, ctx.baseline)

    def summary(self, result: dict) -> str:
        return f"mean served-NLL increase {result['mean_increase']:.4f} over {result['users']} users"

    def section(self, result: dict, ctx: AuditContext) -> Section:
        rows = [
            [label, g, v["users"], round(v["mean_increase"], 4)]
            for label, grouping in (("persona", "by_persona"), ("routing group", "by_routing_group"))
            for g, v in result.get(grouping, {}).items()
        ]
        note = "" if "by_persona" in result else "No persona ground truth: by routing group only."
        table = ("Served-NLL increase vs the non-private baseline", ["grouping", "group", "users", "mean increase"], rows)
        return Section(self.section_id, self.title, self.method, [table], note=note)
