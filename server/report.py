"""The server's report: ``server.json`` and ``server.md``, built only from what the server holds.

Per round: the cohort drawn, how many devices contributed, failed (Flower
errors) or refused (by reason code), how many replies the server rejected,
the bytes each client sent, the persona counts it learned from the sum, and
each server-side privacy step's metrics (noise std, signal-to-noise, the
user-level epsilon). No per-device value is here: devices send none. The
simulation harness adds what the devices kept (``simulations/results.py``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from common.config import RunConfig
from common.privacy.accounting import independent_user_epsilon

SERVER_REPORT = "server.json"
SHARED_TIERS_FILE = "shared-tiers.safetensors"


def _round_row(row: dict) -> dict:
    train, query = row["train_bytes"], row["secagg_bytes"]
    nodes = sorted(set(train) | set(query))
    out = {
        "round": row["round"],
        "sampled": row["sampled"],
        "expected_cohort": row["expected"],
        "contributors": row["contributors"],
        "failed": row["failed"] + row["failed_queries"],
        "refused": dict(sorted(row["refused"].items())),
        "rejected": row["rejected"],
        "bytes_per_client": [train.get(n, 0) + query.get(n, 0) for n in nodes],
        "bytes_train_reply": [train.get(n, 0) for n in nodes],
        "bytes_secagg_replies": [query.get(n, 0) for n in nodes],
        "privacy": {step: {k: float(v) for k, v in m.items()} for step, m in row.get("steps", {}).items() if m},
    }
    if "persona_counts" in row:
        out["persona_counts"] = [round(c, 3) for c in row["persona_counts"]]
        out["persona_folded"] = row["persona_folded"]
    return out


NOISE_COHORT_WARNING = (
    "NOT a privacy guarantee for this run: its sum carried {scale:.4g} times the noise of the accounted "
    "mechanism. The user-level epsilon is that of a deployment sampling {cohort} of {population} users per round "
    "with this noise multiplier; this run shows the utility such a deployment would get."
)


def build_report(cfg: RunConfig, strategy, wall_s: float, planned_rounds: int) -> dict:
    rounds = [_round_row(strategy.rounds[r]) for r in sorted(strategy.rounds)]
    user_level: dict = {"dp": cfg.user_dp.enabled}
    accounting = strategy.pipeline.step("accounting")
    if accounting is not None:
        ud = cfg.user_dp
        q = accounting.sample_rate
        per_round = {str(k): v for k, v in sorted(accounting.epsilon_per_round.items())}
        clip_p = sum(r.get("steps", {}).get("secure-sum", {}).get("fixed-point-clip-probability", 0.0) for r in strategy.rounds.values())
        user_level.update(
            {
                "noise_multiplier": ud.noise_multiplier,
                "clip_norm": ud.clip_norm,
                # Adaptive C: each round's C and noised unclipped share are in the rounds' privacy steps.
                "adaptive_clip": {"quantile": ud.adaptive_clip_quantile, "lr": ud.adaptive_clip_lr, "share": ud.adaptive_clip_share} if ud.adaptive else None,
                "delta": ud.delta,
                # Each round's chance that a noise share's tail was clipped by the fixed-point range.
                "delta_effective": ud.delta + clip_p,
                "noise_placement": cfg.noise_placement,
                **against_server(cfg, per_round),
                "sampling": "all clients every round (no amplification)" if q >= 1 else f"Poisson client sampling, q = {q:.3f} of {accounting.population}",
                "sample_rate": q,
                "epsilon_per_round": per_round,
                # The same figure through Opacus' RDP code, as a cross-check.
                "epsilon_independent": independent_user_epsilon(ud.noise_multiplier, len(per_round), ud.delta, q),
                "max_epsilon": ud.max_epsilon or None,
                "rounds_planned": planned_rounds,
                "rounds_run": len(per_round),
            }
        )
        if ud.noise_cohort:
            user_level["noise_cohort"] = {
                "cohort": ud.noise_cohort, "population": cfg.user_population, "noise_scale": cfg.noise_scale,
                "guarantee": NOISE_COHORT_WARNING.format(cohort=ud.noise_cohort, population=cfg.user_population, scale=cfg.noise_scale),
            }
    return {
        "config": cfg.flat(),
        "wall_time_s": wall_s,
        "privacy_pipeline": strategy.pipeline.names(),
        "rounds": rounds,
        "contributions": sum(r["contributors"] for r in rounds),
        "evaluation": strategy.evaluation,
        "user_level": user_level,
    }


def against_server(cfg: RunConfig, per_round: dict) -> dict:
    """User-level epsilon against the server, next to the one against observers of the released model.

    The accountant's epsilon holds against anyone who sees only the released,
    noised sum. The server sees more unless the devices add the noise under
    secure aggregation: without secure aggregation it sees each update, and
    with server-added noise it holds the noiseless sum. With distributed noise
    (and, for q < 1, devices sampling themselves) it sees only what observers
    see, as long as colluders stay within the stated budget.
    """
    if cfg.noise_placement == "distributed":
        return {
            "epsilon_against_server": dict(per_round),
            "server_view": f"only the noised sum (distributed noise; holds with up to a {cfg.secagg.colluder_fraction:g} share of colluding clients)",
            "neighbouring_relation": "zero-out: every device adds its noise share, drawn or not",
        }
    view = "each device's clipped update (no secure aggregation)" if not cfg.secagg.enabled else "the noiseless sum (it adds the noise itself)"
    return {
        "epsilon_against_server": {r: None for r in per_round},  # no user-level guarantee against the server
        "server_view": view,
        "neighbouring_relation": "add-or-remove",
    }


def _fmt(value: float) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3g}"


def render_markdown(report: dict) -> str:
    cfg = report["config"]
    lines = [
        "# fedpersona server report",
        "",
        f"Model `{cfg['model']}`, {cfg['num-supernodes']} devices, {len(report['rounds'])} of {cfg['num-server-rounds']} rounds, "
        f"wall time {report['wall_time_s']:.0f} s. Privacy pipeline: {' -> '.join(report['privacy_pipeline'])}.",
        "",
        "Only what the server holds: counts of replies, sums, and its own state. Devices send no per-user",
        "metrics. Bytes: what each client sent in the round as Flower serialises it (train reply plus its",
        "secure-aggregation replies); max over clients. Persona counts: decoded from the sum (noisy under",
        "user-level DP); folded slots went into the global tier.",
        "",
        "| round | cohort | contributed | refused | failed | rejected | bytes per client | persona counts | folded |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rounds"]:
        refused = ", ".join(f"{k} {v}" for k, v in r["refused"].items()) or "0"
        counts = ", ".join(f"{c:.1f}" for c in r.get("persona_counts", [])) or "-"
        sent = r["bytes_per_client"]
        lines.append(
            f"| {r['round']} | {r['sampled']} | {r['contributors']} | {refused} | {r['failed']} | {r['rejected']} "
            f"| {max(sent) if sent else 0:,} | {counts} | {r.get('persona_folded') or '-'} |"
        )
    steps = sorted({s for r in report["rounds"] for s in r["privacy"]})
    if steps:
        lines += ["", "## Privacy steps (server halves)", "", "| round | " + " | ".join(steps) + " |", "|---|" + "---|" * len(steps)]
        for r in report["rounds"]:
            cells = [", ".join(f"{k} {_fmt(v)}" for k, v in r["privacy"].get(s, {}).items()) or "-" for s in steps]
            lines.append(f"| {r['round']} | " + " | ".join(cells) + " |")
    ev = report["evaluation"]
    if ev:
        lines += ["", f"Evaluation (final round): {ev['evaluated']} devices evaluated on their own data and kept the results; "
                  f"refused {sum(ev['refused'].values())}, failed {ev['failed']}."]
    ul = report["user_level"]
    lines += ["", "## User-level DP (DP-FedAvg on everything shared)", ""]
    if not ul["dp"]:
        lines.append("Off: no user-level clipping or noise (user-level epsilon = inf).")
    else:
        if "noise_cohort" in ul:
            lines += [f"**Noise cohort (simulation only).** {ul['noise_cohort']['guarantee']}", ""]
        lines += [
            f"Clip norm C = {ul['clip_norm']}, noise multiplier z = {ul['noise_multiplier']} (std z*C on the sum, "
            f"added {'by the devices (distributed)' if ul['noise_placement'] == 'distributed' else 'by the server'}), "
            f"delta = {ul['delta']}, {ul['sampling']}; {ul['rounds_run']} of {ul['rounds_planned']} planned rounds run"
            + (f" (budget {ul['max_epsilon']})" if ul["max_epsilon"] else "")
            + ".",
            "",
            *(
                [f"Adaptive C (Andrew et al. 2021): toward the {ul['adaptive_clip']['quantile']} quantile of the update norms, "
                 f"step {ul['adaptive_clip']['lr']}, ceiling {ul['clip_norm']}; the clip bit takes {ul['adaptive_clip']['share']} "
                 "of each release's privacy inside the same noised sum, so epsilon is unchanged. Each round's C is under "
                 "Privacy steps (clip).", ""]
                if ul.get("adaptive_clip") else []
            ),
            f"The server sees {ul['server_view']}; neighbouring relation: {ul['neighbouring_relation']}. "
            f"Effective delta (with the fixed-point clipping probability): {ul['delta_effective']:.3g}.",
            "",
            "| round | epsilon against observers of the released model (Flower RdpAccountant) | epsilon against the server |",
            "|---|---|---|",
        ]
        lines += [
            f"| {r} | {e:.3f} | {'inf' if ul['epsilon_against_server'][r] is None else format(ul['epsilon_against_server'][r], '.3f')} |"
            for r, e in ul["epsilon_per_round"].items()
        ]
        lines += ["", f"Independent recomputation (Opacus RDP analysis): {ul['epsilon_independent']:.3f}."]
    return "\n".join(lines) + "\n"


def save_shared_tiers(path: Path, arrays) -> None:
    """The final global tier and persona slots: the server's own state, kept for audits and serving."""
    from safetensors.numpy import save_file

    save_file({k: v.numpy() for k, v in arrays.items()}, str(path))


def write_report(run_dir: Path, cfg: RunConfig, strategy, wall_s: float, planned_rounds: int) -> dict:
    run_dir.mkdir(parents=True, exist_ok=True)
    report = build_report(cfg, strategy, wall_s, planned_rounds)
    (run_dir / SERVER_REPORT).write_text(json.dumps(report, indent=2, default=str))
    (run_dir / "server.md").write_text(render_markdown(report))
    return report
