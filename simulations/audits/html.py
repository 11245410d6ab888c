"""``report.html``: one run's main results, then its audits, as one self-contained page.

Order on the page: the audits' verdict (a pass/fail banner and one row per
audit), the held-out utility per tier stack and per routing group, training
loss per round, the per-user table, the DP settings with the record-level and
user-level epsilon, then one section per audit (from the registry) and, with
``--compare``, a privacy-utility chart across runs. Everything above the audit
sections comes from the harness's ``report.json``.
"""

from __future__ import annotations

import math
from pathlib import Path

from simulations.audits.base import FAILED, MEASURED, NOT_RUN, PASSED, SKIPPED, AuditContext, is_skipped, registered
from simulations.audits.report_html import Banner, Plot, Section, bar_chart, format_epsilon, line_chart, render_report

TIERS = (
    ("base", "base model"),
    ("global", "global tier"),
    ("persona", "global + persona"),
    ("personal", "global + persona + user"),
    ("served", "as served (by routing group)"),
)
SERVED_TIERS = ("global", "persona", "personal", "served")


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def banner(result: dict) -> Banner:
    verdicts = result["verdicts"]
    failed = [name for name, v in verdicts.items() if v["status"] == FAILED]
    if failed:
        return Banner(f"AUDIT FAILED: {len(failed)} of {len(verdicts)} audits failed ({', '.join(failed)})", ok=False)
    counts = {s: sum(v["status"] == s for v in verdicts.values()) for s in (PASSED, MEASURED, SKIPPED, NOT_RUN)}
    return Banner(
        f"Audits passed: {counts[PASSED]} passed, {counts[MEASURED]} measured, {counts[SKIPPED]} skipped, "
        f"{counts[NOT_RUN]} not run at level {result['level']}",
        ok=True,
    )


def verdict_section(result: dict) -> Section:
    audits = {a.name: a for a in registered()}
    rows = [
        [audits[name].title, audits[name].level, v["status"], v["detail"], audits[name].criterion or "none (a measurement)"]
        for name, v in result["verdicts"].items()
    ]
    return Section(
        "audits",
        "Audit verdicts",
        "An audit fails when it finds what it looks for; a measurement has no pass/fail criterion. An audit "
        "that needs ground truth this run does not have (canaries, planted PII, hold-out users, a baseline run) "
        "is skipped and says why.",
        [("Audits", ["audit", "level", "status", "detail", "passes when"], rows)],
    )


def utility_section(report: dict) -> Section:
    u = report["utility"]
    tiers = [[label, u[t]["nll"], u[t]["ppl"]] for t, label in TIERS]
    groups = [[name, g["users"], *[g[t] for t in SERVED_TIERS]] for name, g in u["routing_groups"].items()]
    note = (
        f"{u['users']} of {u['users_total']} devices evaluated. Persona beats global for {u['users_persona_beats_global']} "
        f"users; personal beats global for {u['users_personal_beats_global']}."
    )
    figures = []
    shown = [(t, u[t]["nll"]) for t, _ in TIERS if _finite(u[t]["nll"])]
    if shown:
        chart = bar_chart([t for t, _ in shown], [v for _, v in shown], title="held-out NLL per tier stack", ylabel="NLL / token")
        figures.append(Plot("token-weighted mean held-out NLL per tier stack (lower is better)", chart))
    return Section(
        "utility",
        "Held-out utility",
        report["metric"] + ". Read from the simulated devices' stores by the harness; devices never send it.",
        [
            ("Per tier stack", ["model", "NLL / token", "perplexity"], tiers),
            ("Per routing group (cold-start: global; occasional: + persona; frequent: + persona + user)", ["group", "users", *SERVED_TIERS], groups),
        ],
        figures,
        note=note,
    )


def training_section(report: dict) -> Section:
    rows = [
        [r["round"], r["devices"], r["train_loss"], r.get("clip_fraction"), r.get("update_norm", {}).get("q50")]
        for r in report["training"]
    ]
    figures = []
    points = [(r["round"], r["train_loss"]) for r in report["training"] if _finite(r["train_loss"])]
    if points:
        chart = line_chart({"mean train loss": ([x for x, _ in points], [y for _, y in points])}, title="training loss", xlabel="round", ylabel="loss", integer_x=True)
        figures.append(Plot("mean training loss over the devices that trained, per round", chart))
    return Section(
        "training",
        "Training",
        "Per round, from each device's own diagnostics (kept in its store, never sent): mean training loss, the share "
        "of devices whose update was clipped, and the median pre-clip update norm.",
        [("Per round", ["round", "devices", "mean train loss", "clip fraction", "update norm (median)"], rows)],
        figures,
    )


def users_section(report: dict) -> Section:
    rows = []
    for x in report["users"]:
        if not x["evaluated"]:
            rows.append([x["user_index"], None, "not evaluated", None, None, None, None, None, None, None])
            continue
        rows.append([
            x["user_index"], x["records"], x["routing_group"], x["persona"],
            *[x[f"nll_{t}"] for t, _ in TIERS], format_epsilon(x["epsilon_record_level"]),
        ])
    header = ["user", "records", "routing group", "persona slot", *[f"NLL {t}" for t, _ in TIERS], "record-level epsilon"]
    return Section("users", "Per-user results", "Held-out NLL per target token of each tier stack on the device's own test split.", [("Devices", header, rows)])


def privacy_section(report: dict, cfg: dict) -> Section:
    """The DP settings (``cfg``: the harness's flat run config) and the epsilons the run reached."""
    eps, ul = report["epsilon_record_level"], report["server"]["user_level"]
    record = [
        ["DP-SGD (Opacus, on each device)", "on" if cfg["dp"] else "off (epsilon = inf)"],
        ["noise multiplier z", cfg["noise-multiplier"] if cfg["dp"] else None],
        ["clip norm C", cfg["max-grad-norm"] if cfg["dp"] else None],
        ["delta", eps["delta"]],
        ["max record-level epsilon over devices", format_epsilon(eps["max"]) if cfg["dp"] else "inf"],
        ["mean record-level epsilon", format_epsilon(eps["mean"]) if cfg["dp"] else "inf"],
    ]
    if ul["dp"]:
        per_round = ul["epsilon_per_round"]
        user = [
            ["DP-FedAvg on everything shared", "on"],
            ["noise multiplier z", ul["noise_multiplier"]],
            ["clip norm C", ul["clip_norm"]],
            ["noise added", "by the devices (distributed)" if ul["noise_placement"] == "distributed" else "by the server"],
            ["delta", ul["delta"]],
            ["sampling", ul["sampling"]],
            ["rounds run / planned", f"{ul['rounds_run']} / {ul['rounds_planned']}"],
            ["user-level epsilon (Flower RdpAccountant)", format_epsilon(per_round[max(per_round, key=int)]) if per_round else "0"],
            ["independent recomputation (Opacus RDP)", format_epsilon(ul["epsilon_independent"])],
        ]
        if "noise_cohort" in ul:
            user.insert(0, ["noise cohort (simulation only)", ul["noise_cohort"]["guarantee"]])
    else:
        user = [["DP-FedAvg on everything shared", "off (user-level epsilon = inf)"]]
    other = [
        ["secure aggregation", "on" if cfg["secagg"] else "off"],
        ["scrub mode", cfg["scrub-mode"]],
        ["server privacy pipeline", " -> ".join(report["server"]["privacy_pipeline"])],
    ]
    return Section(
        "privacy",
        "Privacy settings",
        "Record-level epsilon is each device's own (its Opacus accountant over its records, all rounds); user-level "
        "epsilon is the server's over the rounds run.",
        [("Record level", ["setting", "value"], record), ("User level", ["setting", "value"], user), ("Other", ["setting", "value"], other)],
    )


def audit_sections(result: dict, ctx: AuditContext) -> list[Section]:
    sections = []
    for audit in registered():
        if audit.name not in result:
            continue  # not run at this level (listed in the verdicts)
        out = result[audit.name]
        if is_skipped(out):
            sections.append(Section(audit.section_id, audit.title, audit.method, note=f"Skipped: {out['skipped']}."))
            continue
        section = audit.section(out, ctx)
        if section is not None:
            sections.append(section)
    return sections


def _auc(audit: dict) -> float:
    mia = audit.get("membership_inference")
    record = mia.get("record_level") if isinstance(mia, dict) and not is_skipped(mia) else None
    return record["auc"] if record and not is_skipped(record) else float("nan")


def privacy_utility_section(runs: list[tuple[str, dict, dict]]) -> Section:
    """x = record-level epsilon (max over users; inf drawn at 2x the largest finite), y = served NLL and MIA AUC."""
    eps = [r["epsilon_record_level"]["max"] for _, r, _ in runs]
    finite = [e for e in eps if e is not None]
    inf_x = 2 * max(finite) if finite else 1.0
    xs = [inf_x if e is None else e for e in eps]
    nll = [r["utility"]["served"]["nll"] for _, r, _ in runs]
    auc = [_auc(a) for _, _, a in runs]
    rows = [[name, format_epsilon(e), round(n, 4), a] for (name, _, _), e, n, a in zip(runs, eps, nll, auc)]
    figs = [
        Plot("served NLL vs record-level epsilon (inf drawn at the right edge)", line_chart({"served NLL": (xs, nll)}, title="privacy-utility", xlabel="record-level epsilon", ylabel="NLL / token")),
        Plot("record-level MIA AUC vs epsilon", line_chart({"MIA AUC": (xs, auc)}, title="attack success", xlabel="record-level epsilon", ylabel="AUC")),
    ]
    return Section("privacy-utility", "Privacy-utility across runs", "One point per run given to `fedpersona audit --compare`.", [("Runs", ["run", "epsilon (max)", "served NLL", "MIA AUC"], rows)], figs)


def write_html(ctx: AuditContext, result: dict, compare: list[tuple[str, dict, dict]] = ()) -> Path:
    report = ctx.view.report
    run_dir = ctx.run_dir
    sections = [
        verdict_section(result),
        utility_section(report),
        training_section(report),
        users_section(report),
        privacy_section(report, ctx.view.config),
        *audit_sections(result, ctx),
    ]
    if compare:
        sections.append(privacy_utility_section([(run_dir.name, report, result), *compare]))
    meta = {
        "run": run_dir.name,
        "model": ctx.view.config["model"],
        "devices": len(report["users"]),
        "rounds": len(report["server"]["rounds"]),
        "audit level": result["level"],
    }
    return render_report(run_dir / "report.html", title=f"fedpersona run {run_dir.name}", sections=sections, meta=meta, banner=banner(result))
