"""Utility disparity: how unequal the served model's utility is, over users, personas and routing groups.

Personas are the generator's ground truth (``manifest.json``), which only the
simulation harness knows; without it the persona breakdown is skipped and the
routing-group one stays. Group tables go through fairlearn's ``MetricFrame``
(:func:`simulations.audits.stats.group_table`).
"""

from __future__ import annotations

from simulations.audits.base import Audit, AuditContext, is_skipped, register, skipped
from simulations.audits.report_html import Plot, Section, bar_chart
from simulations.audits.stats import disparity, group_table, share_worse

GROUP_HEADER = ["group", "users", "mean", "std", "worst", "p10", "worst/mean"]
NO_PERSONAS = "no persona ground truth (manifest.json) for every device"


def evaluated(view) -> list[dict]:
    """``report.json``'s rows of the devices that evaluated."""
    return [r for r in view.report["users"] if r["evaluated"]]


def personas(view) -> dict[str, str] | None:
    """The generator's persona name per user id, or None when it is not known for every device."""
    names = {u["user_id"]: u.get("persona_name") for u in view.participants}
    return None if any(n is None for n in names.values()) else names


def group_rows(table: dict) -> list[list]:
    """Rows of a :func:`group_table` result, under :data:`GROUP_HEADER`."""
    return [[g, s["n"], round(s["mean"], 4), round(s["std"], 4), round(s["worst"], 4), round(s["p10"], 4), round(s["worst_to_mean"], 4)] for g, s in table["by_group"].items()]


def disparity_audit(view) -> dict:
    rows = evaluated(view)
    if not rows:
        return skipped("no device evaluated")
    served = [r["nll_served"] for r in rows]
    names = personas(view)
    out = {
        "metric": "served NLL per target token (lower is better)",
        "overall": disparity(served, higher_is_better=False),
        "share_personal_worse_than_global": share_worse([r["nll_personal"] for r in rows], [r["nll_global"] for r in rows], False),
        "by_persona": group_table(served, [names[r["user_id"]] for r in rows], higher_is_better=False) if names else skipped(NO_PERSONAS),
        "by_routing_group": group_table(served, [r["routing_group"] for r in rows], higher_is_better=False),
    }
    groups = user_groups(view)
    labelled = all("accuracy_served" in r for r in rows)
    if labelled:
        # Classification by scoring the label options: accuracy and macro-F1 per user, higher is better.
        for metric in ("accuracy", "macro_f1"):
            values = [r[f"{metric}_served"] for r in rows]
            out[f"{metric}_overall"] = disparity(values, higher_is_better=True)
    for key, of_user in groups.items():
        members = [r for r in rows if r["user_id"] in of_user]
        labels = [of_user[r["user_id"]] for r in members]
        out[f"by_{key}"] = group_table([r["nll_served"] for r in members], labels, higher_is_better=False)
        if labelled:
            out[f"accuracy_by_{key}"] = group_table([r["accuracy_served"] for r in members], labels, higher_is_better=True)
    return out


def user_groups(view) -> dict[str, dict[str, str]]:
    """Attributes the data's manifest records per user (e.g. an annotator's gender): key -> user id -> group."""
    out: dict[str, dict[str, str]] = {}
    for u in view.participants:
        for key, value in (u.get("groups") or {}).items():
            out.setdefault(key, {})[u["user_id"]] = value
    return out


@register
class UtilityDisparity(Audit):
    name = "disparity"
    title = "Utility disparity"
    level = "fast"
    order = 60
    method = (
        "Per-user held-out NLL per target token of the stack each user is served (lower is better), "
        "summarised over users and per group (persona from the generator's ground truth; routing group): "
        "mean, standard deviation, worst user, 10th percentile and worst-to-mean ratio (>= 1 for a loss; "
        "further from 1 is more unequal), and the share of users whose personalised model is worse than "
        "the global model."
    )

    def run(self, ctx: AuditContext) -> dict:
        return disparity_audit(ctx.view)

    def summary(self, result: dict) -> str:
        return f"served NLL worst-to-mean ratio {result['overall']['worst_to_mean']:.3f} over {result['overall']['n']} users"

    def section(self, result: dict, ctx: AuditContext) -> Section:
        o = result["overall"]
        tables = [(
            "Over users (" + result["metric"] + ")",
            ["users", "mean", "std", "worst", "p10", "worst/mean", "share personal worse than global"],
            [[o["n"], round(o["mean"], 4), round(o["std"], 4), round(o["worst"], 4), round(o["p10"], 4), round(o["worst_to_mean"], 4), round(result["share_personal_worse_than_global"], 3)]],
        )]
        note = ""
        if is_skipped(result["by_persona"]):
            note = f"By persona: skipped ({result['by_persona']['skipped']})."
        else:
            tables.append(("By persona", GROUP_HEADER, group_rows(result["by_persona"])))
        tables.append(("By routing group", GROUP_HEADER, group_rows(result["by_routing_group"])))
        for metric in ("accuracy", "macro_f1"):
            if f"{metric}_overall" in result:
                m = result[f"{metric}_overall"]
                tables.append((f"Served {metric.replace('_', '-')} over users (higher is better)", ["users", "mean", "std", "worst", "p10", "worst/mean"],
                               [[m["n"], round(m["mean"], 4), round(m["std"], 4), round(m["worst"], 4), round(m["p10"], 4), round(m["worst_to_mean"], 4)]]))
        for key in sorted(k[3:] for k in result if k.startswith("by_") and k not in ("by_persona", "by_routing_group")):
            tables.append((f"Served NLL by {key}", GROUP_HEADER, group_rows(result[f"by_{key}"])))
            if f"accuracy_by_{key}" in result:
                tables.append((f"Served accuracy by {key}", GROUP_HEADER, group_rows(result[f"accuracy_by_{key}"])))
        users = evaluated(ctx.view)
        chart = bar_chart([u["user_index"] for u in users], [u["nll_served"] for u in users], title="served NLL per user", ylabel="NLL / token", reference_line=o["mean"], reference_label="mean")
        return Section(self.section_id, self.title, self.method, tables, [Plot("served NLL per user", chart)], note=note)
