"""DP disparate impact (Bagdasaryan et al. 2019): what record-level DP costs each group.

Needs a non-private ``--baseline`` run of the same users; skipped without one.
"""

from __future__ import annotations

import statistics

from simulations.audits.base import Audit, AuditContext, register, skipped
from simulations.audits.disparity import evaluated, personas, user_groups
from simulations.audits.report_html import Section


def _worst_decile(values: list[float], higher_is_better: bool) -> float:
    """Mean of the worst tenth of users (at least one)."""
    ordered = sorted(values, reverse=not higher_is_better)
    k = max(1, len(ordered) // 10)
    return statistics.fmean(ordered[:k])


def dp_impact(view, baseline) -> dict:
    """What DP costs each group: served NLL (and accuracy on label data) against a non-private ``baseline``, on the same users.

    Per persona, routing group and any group the data's manifest records
    (e.g. annotator gender), and for the worst decile of users.
    """
    base_rows = {r["user_id"]: r for r in evaluated(baseline)}
    rows = [r for r in evaluated(view) if r["user_id"] in base_rows]
    if not rows:
        return skipped("the baseline run evaluated none of this run's users")
    metrics = [("nll_served", False)] + ([("accuracy_served", True)] if all("accuracy_served" in r for r in rows) else [])
    increase = [r["nll_served"] - base_rows[r["user_id"]]["nll_served"] for r in rows]
    out = {"users": len(rows), "mean_increase": statistics.fmean(increase), "worst_decile": {}}
    for metric, higher in metrics:
        out["worst_decile"][metric] = {
            "private": _worst_decile([r[metric] for r in rows], higher),
            "non_private": _worst_decile([base_rows[r["user_id"]][metric] for r in rows], higher),
        }
    names = personas(view)
    groupings = {"by_routing_group": lambda r: r["routing_group"]}
    if names:
        groupings = {"by_persona": lambda r: names[r["user_id"]], **groupings}
    for key, of_user in user_groups(view).items():
        groupings[f"by_{key}"] = lambda r, of_user=of_user: of_user.get(r["user_id"], "?")
    for grouping, key in groupings.items():
        table: dict[str, list[dict]] = {}
        for r in rows:
            table.setdefault(key(r), []).append(r)
        out[grouping] = {}
        for g, members in sorted(table.items()):
            entry = {"users": len(members), "mean_increase": statistics.fmean(r["nll_served"] - base_rows[r["user_id"]]["nll_served"] for r in members)}
            for metric, _ in metrics:
                entry[f"{metric}_private"] = statistics.fmean(r[metric] for r in members)
                entry[f"{metric}_non_private"] = statistics.fmean(base_rows[r["user_id"]][metric] for r in members)
            out[grouping][g] = entry
    return out


@register
class DPImpact(Audit):
    name = "dp_impact"
    title = "DP disparate impact"
    level = "fast"
    order = 70
    method = (
        "DP disparate impact (Bagdasaryan et al. 2019): served utility of this run against a non-private "
        "baseline run on the same users (NLL, and accuracy on label data), per persona, routing group and "
        "any group the data records (e.g. annotator gender), and for the worst decile of users."
    )

    def run(self, ctx: AuditContext) -> dict:
        if ctx.baseline is None:
            return skipped("no --baseline run given (a non-private run of the same data to compare with)")
        return dp_impact(ctx.view, ctx.baseline)

    def summary(self, result: dict) -> str:
        return f"mean served-NLL increase {result['mean_increase']:.4f} over {result['users']} users"

    def section(self, result: dict, ctx: AuditContext) -> Section:
        groupings = [k for k in result if k.startswith("by_")]
        rows = [
            [grouping[3:].replace("_", " "), g, v["users"], round(v["mean_increase"], 4),
             round(v.get("accuracy_served_non_private", float("nan")), 4), round(v.get("accuracy_served_private", float("nan")), 4)]
            for grouping in groupings
            for g, v in result[grouping].items()
        ]
        decile = [[m, round(v["non_private"], 4), round(v["private"], 4)] for m, v in result.get("worst_decile", {}).items()]
        note = "" if "by_persona" in result else "No persona ground truth: no persona breakdown."
        tables = [
            ("Served utility vs the non-private baseline", ["grouping", "group", "users", "NLL increase", "accuracy non-private", "accuracy private"], rows),
            ("Worst decile of users (mean of the worst tenth)", ["metric", "non-private", "private"], decile),
        ]
        return Section(self.section_id, self.title, self.method, tables, note=note)
