"""The run report: ``report.json`` (machine-readable) and ``report.md``.

Built from what the server legitimately holds: aggregated training metrics per
round and the numeric metrics each client chose to report at evaluation.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from common.tiers import GROUP_NAMES


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


TIERS = ("base", "global", "persona", "personal", "served")


def _token_mean(client_eval: list[dict], key: str) -> float:
    tokens = sum(m["num-tokens"] for m in client_eval)
    return sum(m[key] * m["num-tokens"] for m in client_eval) / tokens if tokens else float("nan")


def summarise(client_eval: list[dict]) -> dict:
    """Token-weighted mean held-out NLL per tier stack, overall and per routing group.

    Tier stacks: base model; global; global + persona; global + persona + user
    ("personal"); and "served", the stack each user's routing group gets.
    """
    out = {}
    for name in TIERS:
        nll = _token_mean(client_eval, f"nll-{name}")
        out[name] = {"nll": nll, "ppl": math.exp(nll) if math.isfinite(nll) else float("nan")}
    out["users_personal_beats_global"] = sum(m["nll-personal"] < m["nll-global"] for m in client_eval)
    out["users_persona_beats_global"] = sum(m["nll-persona"] < m["nll-global"] for m in client_eval)
    out["users"] = len(client_eval)
    groups = {}
    for code, name in GROUP_NAMES.items():
        members = [m for m in client_eval if int(m["routing-group"]) == code]
        groups[name] = {"users": len(members), **{t: _token_mean(members, f"nll-{t}") for t in TIERS if t != "base"}}
    out["routing_groups"] = groups
    return out


def build_report(rc: dict, strategy, result, wall_s: float, planned_rounds: int | None = None) -> dict:
    per_round = []
    slot_rounds = getattr(strategy.inner, "slot_rounds", {})
    for rnd in sorted(strategy.client_train_metrics):
        agg = result.train_metrics_clientapp.get(rnd)
        sent = strategy.bytes_per_client(rnd)
        row = {
            "round": rnd,
            "train_loss": float(agg["train-loss"]) if agg else float("nan"),
            "clients": len(strategy.client_train_metrics[rnd]),
            "rejected_replies": strategy.rejected.get(rnd, 0),
            "bytes_per_client": sent["total"],
            "bytes_train_reply": sent["train_reply"],
            "bytes_secagg_replies": sent["secagg_replies"],
        }
        if rnd in slot_rounds:
            # What the server learned about personas: per-slot sums' counts only.
            row["persona_counts"] = [round(c, 3) for c in slot_rounds[rnd].counts]
            row["persona_folded"] = slot_rounds[rnd].folded
        per_round.append(row)
    clients = sorted(strategy.client_eval_metrics, key=lambda m: m.get("user-index", -1))
    users = [
        {
            "user_index": int(m["user-index"]),
            "records": int(m["num-records"]),
            "test_examples": int(m["num-examples"]),
            "nll_base": m["nll-base"],
            "routing_group": GROUP_NAMES[int(m["routing-group"])],
            "nll_global": m["nll-global"],
            "nll_persona": m["nll-persona"],
            "nll_personal": m["nll-personal"],
            "nll_served": m["nll-served"],
            "epsilon_record_level": None if m["epsilon"] < 0 else m["epsilon"],
        }
        for m in clients
    ]
    eps = [u["epsilon_record_level"] for u in users if u["epsilon_record_level"] is not None]
    user_level = {"dp": bool(rc.get("user-dp"))}
    if user_level["dp"]:
        from common.dp import independent_user_epsilon

        z = float(rc["user-noise-multiplier"])
        n = int(rc.get("num-supernodes", 1))
        rate = getattr(strategy.inner, "poisson_rate", None)
        q = 1.0 if rate is None else rate
        user_level.update(
            {
                "noise_multiplier": z,
                "clip_norm": float(rc["user-clip-norm"]),
                "delta": float(rc["user-delta"]),
                "sampling": "all clients every round (no amplification)" if rate is None else f"Poisson client sampling, q = {q:.3f} of {n}",
                "sample_rate": q,
                "epsilon_per_round": {str(k): v for k, v in sorted(strategy.user_epsilon.items())},
                # The same figure through Opacus' RDP code, as a cross-check.
                "epsilon_independent": independent_user_epsilon(z, len(strategy.user_epsilon), float(rc["user-delta"]), q),
                "max_epsilon": float(rc.get("user-max-epsilon", 0.0)) or None,
                "rounds_planned": planned_rounds,
                "rounds_run": len(strategy.user_epsilon),
            }
        )
    return {
        "config": rc,
        "wall_time_s": wall_s,
        "metric": "held-out negative log-likelihood per target token (lower is better); ppl = exp(nll)",
        "rounds": per_round,
        "utility": summarise(clients),
        "users": users,
        "epsilon_record_level": {
            "delta": rc.get("delta"),
            "max": max(eps) if eps else None,
            "mean": _mean(eps) if eps else None,
            "dp": bool(rc.get("dp")),
        },
        "user_level": user_level,
    }


def render_markdown(report: dict) -> str:
    u = report["utility"]
    lines = [
        "# fedpersona simulation report",
        "",
        f"Model `{report['config']['model']}`, {u['users']} users, "
        f"{report['config']['num-server-rounds']} rounds, wall time {report['wall_time_s']:.0f} s.",
        "",
        f"Metric: {report['metric']}.",
        "",
        "## Per-round training loss",
        "",
        "Bytes: what each client sent in the round as Flower serialises it (train reply plus, under secure",
        "aggregation, its key, share and unmask replies); max over clients. Persona counts: what the server",
        "learned per slot (noisy under user-level DP); folded slots went into the global tier.",
        "",
        "| round | clients | mean train loss | bytes sent per client (train + secagg) | persona counts | folded | rejected |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["rounds"]:
        sent, train, query = r["bytes_per_client"], r["bytes_train_reply"], r["bytes_secagg_replies"]
        counts = ", ".join(f"{c:.1f}" for c in r.get("persona_counts", [])) or "-"
        lines.append(
            f"| {r['round']} | {r['clients']} | {r['train_loss']:.4f} | {max(sent) if sent else 0:,} "
            f"({max(train) if train else 0:,} + {max(query) if query else 0:,}) | {counts} | {r.get('persona_folded') or '-'} | {r['rejected_replies']} |"
        )
    lines += [
        "",
        "## Held-out utility",
        "",
        "| model | NLL/token | perplexity |",
        "|---|---|---|",
    ]
    for name, label in (
        ("base", "base model"),
        ("global", "global tier"),
        ("persona", "global + persona (the device's IFCA-chosen slot)"),
        ("personal", "global + persona + user (user adapter + soft prompt)"),
        ("served", "as served: each user's routing group"),
    ):
        lines.append(f"| {label} | {u[name]['nll']:.4f} | {u[name]['ppl']:.2f} |")
    lines += [
        "",
        f"Persona beats global for {u['users_persona_beats_global']} of {u['users']} users; "
        f"personalised beats global for {u['users_personal_beats_global']}.",
        "",
        "### Per routing group (cold-start: global; occasional: + persona; frequent: + persona + user)",
        "",
        "| group | users | global | global + persona | personal | served |",
        "|---|---|---|---|---|---|",
    ]
    for name, g in u["routing_groups"].items():
        lines.append(f"| {name} | {g['users']} | {g['global']:.4f} | {g['persona']:.4f} | {g['personal']:.4f} | {g['served']:.4f} |")
    lines += [
        "",
        "## Per-user results (record-level epsilon from each device's Opacus RDP accountant)",
        "",
        f"delta = {report['epsilon_record_level']['delta']}; DP-SGD {'on' if report['epsilon_record_level']['dp'] else 'off (epsilon = inf)'}.",
        "",
        "| user | records | group | NLL base | NLL global | NLL persona | NLL personal | epsilon |",
        "|---|---|---|---|---|---|---|---|",
    ]
    ul = report["user_level"]
    for x in report["users"]:
        eps = "inf" if x["epsilon_record_level"] is None else f"{x['epsilon_record_level']:.2f}"
        lines.append(
            f"| {x['user_index']} | {x['records']} | {x['routing_group']} | {x['nll_base']:.3f} | {x['nll_global']:.3f} "
            f"| {x['nll_persona']:.3f} | {x['nll_personal']:.3f} | {eps} |"
        )
    lines += ["", "## User-level DP (DP-FedAvg on the shared tier)", ""]
    if not ul["dp"]:
        lines.append("Off: no user-level clipping or noise on the shared tier (user-level epsilon = inf).")
    else:
        lines += [
            f"Clip norm C = {ul['clip_norm']}, noise multiplier z = {ul['noise_multiplier']} (std z*C on the sum), "
            f"delta = {ul['delta']}, {ul['sampling']}; {ul['rounds_run']} of {ul['rounds_planned']} planned rounds run"
            + (f" (budget {ul['max_epsilon']})" if ul["max_epsilon"] else "")
            + ".",
            "",
            "| round | user-level epsilon (Flower RdpAccountant) |",
            "|---|---|",
        ]
        lines += [f"| {r} | {e:.3f} |" for r, e in ul["epsilon_per_round"].items()]
        lines += ["", f"Independent recomputation (Opacus RDP analysis): {ul['epsilon_independent']:.3f}."]
    return "\n".join(lines) + "\n"


SHARED_TIERS_FILE = "shared-tiers.safetensors"


def save_shared_tiers(path: Path, arrays) -> None:
    """The final global tier and persona slots: the server's own state, kept for audits and serving."""
    from safetensors.numpy import save_file

    save_file({k: v.numpy() for k, v in arrays.items()}, str(path))


def write_report(run_dir: Path, rc: dict, strategy, result, wall_s: float, planned_rounds: int | None = None) -> dict:
    run_dir.mkdir(parents=True, exist_ok=True)
    report = build_report(rc, strategy, result, wall_s, planned_rounds)
    (run_dir / "report.json").write_text(json.dumps(report, indent=2, default=str))
    (run_dir / "report.md").write_text(render_markdown(report))
    return report
