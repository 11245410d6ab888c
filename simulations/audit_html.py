"""``report.html``: the audits of one run (and a privacy-utility chart across runs), as a self-contained page."""

from __future__ import annotations

import math
from pathlib import Path

from simulations import audit_bias, audit_privacy
from simulations.report_html import Plot, Section, bar_chart, line_chart, render_report

LEDGER_METHOD = (
    "Every user's record-level epsilon is recomputed from the mechanism its device logged (noise multiplier, "
    "sampling rate, steps) with Google's dp-accounting, where the device used Opacus; user-level epsilon is "
    "recomputed with Opacus' RDP analysis, where the server used Flower's accountant. A disagreement fails the audit."
)
WIRE_METHOD = (
    "Every reply a client sent was recorded in Flower's protobuf wire format and scanned for every planted PII "
    "value and canary, in UTF-8, UTF-16 and as the model's token-id sequences (int32/int64). Expected: 0 hits."
)


def _fmt_eps(e) -> str:
    return "inf" if e is None or (isinstance(e, float) and math.isinf(e)) else f"{e:.3f}"


def _mechanism(history: list[dict]) -> tuple[str, str, int]:
    """(noise multipliers, sampling rates, total steps) of a device's logged DP-SGD mechanism."""
    zs = sorted({round(h["noise_multiplier"], 4) for h in history})
    qs = sorted({round(h["sample_rate"], 4) for h in history})
    return ", ".join(map(str, zs)) or "-", ", ".join(map(str, qs)) or "-", sum(h["steps"] for h in history)


def _ledger_section(result: dict, report: dict) -> Section:
    ledger = result["ledger"]
    cfg = report["config"]
    rows = [
        [r["user_index"], r["delta"], *_mechanism(r["mechanism"]), cfg["max-grad-norm"], _fmt_eps(r["epsilon_reported"]), f"{r['epsilon_independent']:.3f}", r["agrees"]]
        for r in ledger["record_level"]
    ]
    header = ["user", "delta", "z", "sampling rate", "steps", "C", "reported (Opacus)", "independent (dp-accounting)", "agrees"]
    tables = [("Record-level epsilon per user", header, rows)]
    if ledger.get("user_level"):
        u, ul = ledger["user_level"], report["user_level"]
        tables.append((
            "User-level epsilon (every client every round: no sampling amplification)",
            ["delta", "z", "C", "rounds", "reported (Flower RdpAccountant)", "independent (Opacus RDP)", "agrees"],
            [[ul["delta"], ul["noise_multiplier"], ul["clip_norm"], ul["rounds_run"], f"{u['epsilon_reported']:.3f}", f"{u['epsilon_independent']:.3f}", u["agrees"]]],
        ))
    finite = [r for r in ledger["record_level"] if r["epsilon_reported"] is not None]
    figures = [Plot("record-level epsilon per user", bar_chart([r["user_index"] for r in finite], [r["epsilon_reported"] for r in finite], title="record-level epsilon", ylabel="epsilon"))] if finite else []
    return Section("ledger", "Epsilon ledger", LEDGER_METHOD, tables, figures)


def _exposure_section(ex: dict) -> Section:
    note = audit_privacy.METHODS["exposure"].format(n=audit_privacy.EXPOSURE_REFERENCES)
    cols = ["global", "persona", "personal", "reference_base", "reference_other_device"]
    rows = [[r["user_id"], *[r[c] for c in cols]] for r in ex.get("rows", [])]
    figures = []
    measured = [c for c in cols if ex.get("mean", {}).get(c) is not None]
    if measured:
        figures.append(Plot("mean exposure per model (bits)", bar_chart(measured, [ex["mean"][c] for c in measured], title="canary exposure", ylabel="bits", reference_line=math.log2(math.e), reference_label="chance (~1.44)")))
    return Section("exposure", "Canary exposure", note + f" Scrub mode of this run: {ex.get('scrub_mode')}.", [("Exposure in bits (max " + str(ex.get("max_exposure_bits")) + ")", ["canary user", *cols], rows)], figures)


def _mia_section(mia: dict) -> Section:
    rows = []
    for level in ("record_level", "user_level"):
        m = mia.get(level)
        if m:
            rows.append([level.replace("_", "-"), m["members"], m["nonmembers"], m["auc"], m["tpr_at_1pct_fpr"], m["empirical_epsilon_lower_bound"], _fmt_eps(m["formal_epsilon"]), "YES - check for a bug" if m["bound_exceeds_formal"] else "no"])
    header = ["attack", "members", "non-members", "AUC", "TPR @ 1% FPR", "empirical eps (95% LB)", "formal eps", "bound exceeds formal?"]
    note = audit_privacy.METHODS["membership-inference"].format(members=8)
    return Section("membership-inference", "Membership inference", note, [("Attack results", header, rows)])


def _regurgitation_section(rg: dict) -> Section:
    note = audit_privacy.METHODS["regurgitation"].format(tokens=rg["max_new_tokens"])
    rows = [[rg["prompts"], rg["pii_hits"], rg["canary_hits"], rg["rescrub_entities_found"], rg["scrub_mode"]]]
    return Section("regurgitation", "PII regurgitation", note, [("Generations", ["prompts", "planted PII reproduced", "canaries reproduced", "entities found by re-scrub", "scrub mode"], rows)])


def _wire_section(w: dict) -> Section:
    rows = [[w["messages"], f"{w['bytes_scanned']:,}", w["planted_values"], ", ".join(w["encodings"]), w["hits"]]]
    return Section("wire", "Wire audit", WIRE_METHOD, [("Scan", ["messages", "bytes scanned", "planted values", "encodings", "hits"], rows)])


def _group_rows(table: dict) -> list[list]:
    return [[g, s["n"], round(s["mean"], 4), round(s["std"], 4), round(s["worst"], 4), round(s["p10"], 4), round(s["worst_to_mean"], 4)] for g, s in table["by_group"].items()]


GROUP_HEADER = ["group", "users", "mean", "std", "worst", "p10", "worst/mean"]


def _disparity_section(d: dict, report: dict) -> Section:
    o = d["overall"]
    tables = [
        ("Over users (" + d["metric"] + ")", ["users", "mean", "std", "worst", "p10", "worst/mean", "share personal worse than global"],
         [[o["n"], round(o["mean"], 4), round(o["std"], 4), round(o["worst"], 4), round(o["p10"], 4), round(o["worst_to_mean"], 4), round(d["share_personal_worse_than_global"], 3)]]),
        ("By persona", GROUP_HEADER, _group_rows(d["by_persona"])),
        ("By routing group", GROUP_HEADER, _group_rows(d["by_routing_group"])),
    ]
    users = report["users"]
    fig = bar_chart([u["user_index"] for u in users], [u["nll_served"] for u in users], title="served NLL per user", ylabel="NLL / token", reference_line=o["mean"], reference_label="mean")
    return Section("disparity", "Utility disparity", audit_bias.METHODS["disparity"], tables, [Plot("served NLL per user", fig)])


def _dp_impact_section(di: dict) -> Section:
    rows = [["persona", g, v["users"], round(v["mean_increase"], 4)] for g, v in di["by_persona"].items()]
    rows += [["routing group", g, v["users"], round(v["mean_increase"], 4)] for g, v in di["by_routing_group"].items()]
    return Section("dp-impact", "DP disparate impact", audit_bias.METHODS["dp-impact"], [("Served-NLL increase vs the non-private baseline", ["grouping", "group", "users", "mean increase"], rows)])


def _counterfactual_section(cf: dict) -> Section:
    tables = []
    for attr, v in cf.items():
        tables.append((f"Swap {attr}: mean generation change {v['mean_generation_change']:.3f}, mean |NLL change| {v['mean_abs_nll_change']:.4f}", GROUP_HEADER, _group_rows(v["generation_change_by_persona"])))
    return Section("counterfactual", "Counterfactual swaps", audit_bias.METHODS["counterfactual"], tables)


def _personalization_section(p: dict) -> Section:
    rows = [[stack, round(p[stack], 4)] for stack in ("personal", "global")]
    return Section("personalization", "Degree of personalization", audit_bias.METHODS["personalization"], [(f"{p['users']} users", ["model", "degree of personalization"], rows)])


def _privacy_utility_section(runs: list[tuple[str, dict, dict]]) -> Section:
    """x = record-level epsilon (max over users; inf drawn at 2x the largest finite), y = served NLL and MIA AUC."""
    eps = [r["epsilon_record_level"]["max"] for _, r, _ in runs]
    finite = [e for e in eps if e is not None]
    inf_x = 2 * max(finite) if finite else 1.0
    xs = [inf_x if e is None else e for e in eps]
    nll = [r["utility"]["served"]["nll"] for _, r, _ in runs]
    auc = [a.get("membership_inference", {}).get("record_level", {}).get("auc", float("nan")) for _, _, a in runs]
    rows = [[name, _fmt_eps(e), round(n, 4), a] for (name, _, _), e, n, a in zip(runs, eps, nll, auc)]
    figs = [
        Plot("served NLL vs record-level epsilon (inf drawn at the right edge)", line_chart({"served NLL": (xs, nll)}, title="privacy-utility", xlabel="record-level epsilon", ylabel="NLL / token")),
        Plot("record-level MIA AUC vs epsilon", line_chart({"MIA AUC": (xs, auc)}, title="attack success", xlabel="record-level epsilon", ylabel="AUC")),
    ]
    return Section("privacy-utility", "Privacy-utility across runs", "One point per run given to `fedpersona audit --compare`.", [("Runs", ["run", "epsilon (max)", "served NLL", "MIA AUC"], rows)], figs)


def write_html(run_dir: Path, report: dict, result: dict, compare: list[tuple[str, dict, dict]] = ()) -> Path:
    sections = [_ledger_section(result, report)]
    builders = (
        ("exposure", _exposure_section),
        ("membership_inference", _mia_section),
        ("regurgitation", _regurgitation_section),
        ("wire", _wire_section),
        ("dp_impact", _dp_impact_section),
        ("counterfactual", _counterfactual_section),
        ("personalization", _personalization_section),
    )
    for key, build in builders[:4]:
        if result.get(key):
            sections.append(build(result[key]))
    if result.get("disparity"):
        sections.append(_disparity_section(result["disparity"], report))
    for key, build in builders[4:]:
        if result.get(key):
            sections.append(build(result[key]))
    if compare:
        sections.append(_privacy_utility_section([(run_dir.name, report, result), *compare]))
    cfg = report["config"]
    meta = {
        "run": run_dir.name,
        "model": cfg["model"],
        "users": len(report["users"]),
        "rounds": len(report["rounds"]),
        "record-level DP": f"on (z={cfg['noise-multiplier']}, C={cfg['max-grad-norm']}, delta={cfg['delta']})" if cfg["dp"] else "off",
        "user-level DP": f"on (z={cfg['user-noise-multiplier']})" if cfg.get("user-dp") else "off",
        "secure aggregation": bool(cfg.get("secagg")),
        "scrub mode": cfg.get("scrub-mode"),
    }
    return render_report(run_dir / "report.html", title=f"fedpersona audit: {run_dir.name}", sections=sections, meta=meta)
