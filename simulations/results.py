"""The full simulation report: the server's report plus what the devices kept to themselves.

A simulation holds every device on one machine, so the harness can read each
device's store after the run: its held-out scores per tier stack, its routing
group, its record-level epsilon, and its per-round diagnostics (training loss,
whether its update was clipped, the privacy steps' device-side metrics).
None of this crossed the wire; the report says so. ``report.json`` holds:

* ``server``: the server's own report (``server.json``), unchanged;
* ``users``: one row per device, and ``utility``: token-weighted means over the
  devices that evaluated (``users`` says how many of how many);
* ``training``: per round, the mean training loss, the share of devices whose
  update was clipped and the quantiles of their pre-clip norms;
* ``epsilon_record_level``: each device's epsilon, its maximum and mean;
* ``diagnostics``: persona recovery against the generator's ground truth.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from client import device
from client.store import DeviceStore
from common.models import GROUP_NAMES
from server.report import SERVER_REPORT, render_markdown as render_server
from simulations.diagnostics import persona_recovery

TIERS = ("base", "global", "persona", "personal", "served")


def device_results(harness: dict) -> list[dict]:
    """One row per federated device, from its store (devices that never stored a result are listed without scores)."""
    rows = []
    for dev in harness["devices"]:
        path = Path(dev["store"])
        store = DeviceStore(path) if path.is_file() else None
        ev = device.get_json(store, device.EVAL_RESULTS, None) if store else None
        diag = device.get_json(store, device.DIAGNOSTICS, {"rounds": {}}) if store else {"rounds": {}}
        row = {"user_index": dev["partition"], "user_id": dev["user_id"], "evaluated": ev is not None, "rounds_trained": len(diag["rounds"]), "diagnostics": diag["rounds"]}
        if ev is not None:
            row.update(
                {
                    "records": ev["records"],
                    "train_records": ev["train_records"],
                    "test_examples": ev["test_examples"],
                    "test_tokens": ev["test_tokens"],
                    "routing_group": GROUP_NAMES[ev["routing_group"]],
                    "persona": ev["persona"],
                    **{f"nll_{t}": ev["nll"][t] for t in TIERS},
                    "epsilon_record_level": ev["epsilon"],
                    "user_epsilon_against_server": ev.get("user_epsilon_against_server"),
                    # how many context phrases the device released (client/context.py); the phrases stay on it
                    "context_phrases": ev.get("context_phrases", 0),
                }
            )
            if ev.get("classification"):
                row.update({f"{m}_{t}": ev["classification"][t][m] for t in TIERS for m in ("accuracy", "macro_f1")})
        rows.append(row)
    return rows


def _token_mean(rows: list[dict], key: str) -> float:
    tokens = sum(r["test_tokens"] for r in rows)
    return sum(r[key] * r["test_tokens"] for r in rows) / tokens if tokens else float("nan")


def summarise(rows: list[dict]) -> dict:
    """Token-weighted mean held-out NLL per tier stack, overall and per routing group, over the devices that evaluated."""
    scored = [r for r in rows if r["evaluated"]]
    out: dict = {"users": len(scored), "users_total": len(rows)}
    for t in TIERS:
        nll = _token_mean(scored, f"nll_{t}")
        out[t] = {"nll": nll, "ppl": math.exp(nll) if math.isfinite(nll) else float("nan")}
    out["users_personal_beats_global"] = sum(r["nll_personal"] < r["nll_global"] for r in scored)
    out["users_persona_beats_global"] = sum(r["nll_persona"] < r["nll_global"] for r in scored)
    out["users_with_context"] = sum(r.get("context_phrases", 0) > 0 for r in scored)
    out["routing_groups"] = {
        name: {"users": len(members), **{t: _token_mean(members, f"nll_{t}") for t in TIERS if t != "base"}}
        for name in GROUP_NAMES.values()
        for members in [[r for r in scored if r["routing_group"] == name]]
    }
    labelled = [r for r in scored if "accuracy_served" in r]
    if labelled:
        # Classification by scoring the label options: the unweighted mean over users, as LaMP reports it.
        out["classification"] = {
            t: {m: statistics.fmean(r[f"{m}_{t}"] for r in labelled) for m in ("accuracy", "macro_f1")} for t in TIERS
        }
        out["classification"]["users"] = len(labelled)
    return out


def by_group(rows: list[dict], manifest_users: list[dict]) -> dict:
    """Served utility per user group (an attribute the data's manifest records, e.g. an annotator's gender)."""
    groups_of = {u["user_id"]: u.get("groups", {}) for u in manifest_users}
    keys = sorted({k for g in groups_of.values() for k in g})
    scored = [r for r in rows if r["evaluated"]]
    out = {}
    for key in keys:
        values = sorted({groups_of.get(r["user_id"], {}).get(key) for r in scored} - {None})
        out[key] = {}
        for value in values:
            members = [r for r in scored if groups_of.get(r["user_id"], {}).get(key) == value]
            entry = {"users": len(members), "nll_served": _token_mean(members, "nll_served")}
            if all("accuracy_served" in r for r in members):
                entry.update({m: statistics.fmean(r[f"{m}_served"] for r in members) for m in ("accuracy", "macro_f1")})
            out[key][value] = entry
    return out


def _quantiles(values: list[float]) -> dict:
    if not values:
        return {}
    if len(values) == 1:
        return {"q10": values[0], "q50": values[0], "q90": values[0]}
    q = statistics.quantiles(values, n=10, method="inclusive")
    return {"q10": q[0], "q50": statistics.median(values), "q90": q[-1]}


def training_rounds(rows: list[dict]) -> list[dict]:
    """Per round, from the devices' own diagnostics: mean loss, clip fraction, pre-clip norm quantiles."""
    rounds = sorted({int(r) for row in rows for r in row["diagnostics"]})
    out = []
    for rnd in rounds:
        entries = [row["diagnostics"][str(rnd)] for row in rows if row["diagnostics"].get(str(rnd), {}).get("sampled", False)]
        losses = [e["train_loss"] for e in entries if e.get("train_loss") is not None and math.isfinite(e["train_loss"])]
        clip = [e["privacy"]["clip"] for e in entries if "clip" in e.get("privacy", {})]
        item = {"round": rnd, "devices": len(entries), "train_loss": statistics.fmean(losses) if losses else float("nan")}
        if clip:
            item["clip_fraction"] = statistics.fmean(c["clipped"] for c in clip)
            item["update_norm"] = _quantiles([c["model-norm"] for c in clip])
        sgd = [e["dp_sgd"] for e in entries if e.get("dp_sgd")]
        if sgd:
            # Record-level DP-SGD on the devices: mean over devices of each device's round figures.
            item["dp_sgd"] = {k: statistics.fmean(d[k] for d in sgd if d.get(k) is not None)
                              for k in ("clip_fraction", "grad_norm_q50", "noise_std", "clip_norm", "snr") if any(d.get(k) is not None for d in sgd)}
            tiers = sorted({t for d in sgd for t in d.get("snr_by_tier", {})})
            if tiers:
                item["dp_sgd"]["snr_by_tier"] = {t: statistics.fmean(d["snr_by_tier"][t] for d in sgd if t in d.get("snr_by_tier", {}))
                                                 for t in tiers}
        out.append(item)
    return out


def build_full_report(run_dir: Path, harness: dict, wall_s: float) -> dict:
    server = json.loads((Path(run_dir) / SERVER_REPORT).read_text())
    rows = device_results(harness)
    eps = [r["epsilon_record_level"] for r in rows if r["evaluated"] and r["epsilon_record_level"] is not None]
    report = {
        "config": harness["run"],
        "wall_time_s": wall_s,
        "source": "server: what the server learned; everything else: read from the simulated devices' stores by the harness (never sent)",
        "server": server,
        "metric": "held-out negative log-likelihood per target token (lower is better); ppl = exp(nll)",
        "utility": summarise(rows),
        "users": [{k: v for k, v in r.items() if k != "diagnostics"} for r in rows],
        "training": training_rounds(rows),
        "epsilon_record_level": {
            "delta": harness["run"]["delta"],
            "dp": bool(harness["run"]["dp"]),
            "max": max(eps) if eps else None,
            "mean": statistics.fmean(eps) if eps else None,
        },
    }
    manifest_path = Path(harness["data_dir"]) / "manifest.json"
    manifest_users = json.loads(manifest_path.read_text())["users"] if manifest_path.is_file() else []
    if any(u.get("groups") for u in manifest_users):
        report["utility"]["by_group"] = by_group(rows, manifest_users)
    if harness["run"]["persona-slots"] and any("persona" in u for u in manifest_users):
        report["diagnostics"] = {"persona_recovery": persona_recovery(harness)}
    return report


def _f(value, spec: str = ".4f") -> str:
    return "-" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


def render_markdown(report: dict) -> str:
    u = report["utility"]
    cfg = report["config"]
    lines = [
        "# fedpersona simulation report",
        "",
        f"Model `{cfg['model']}`, {u['users_total']} devices ({u['users']} evaluated), {len(report['server']['rounds'])} rounds, "
        f"wall time {report['wall_time_s']:.0f} s.",
        "",
        f"Metric: {report['metric']}. Utility, per-user rows and training diagnostics were read from the",
        "simulated devices' stores by the harness: devices never send them.",
        "",
        "## Held-out utility",
        "",
        "| model | NLL/token | perplexity |",
        "|---|---|---|",
    ]
    for name, label in (
        ("base", "base model"),
        ("global", "global tier"),
        ("persona", "global + persona (the device's own choice of slot)"),
        ("personal", "global + persona + user (user adapter + soft prompt)"),
        ("served", "as served: each user's routing group"),
    ):
        lines.append(f"| {label} | {_f(u[name]['nll'])} | {_f(u[name]['ppl'], '.2f')} |")
    if "classification" in u:
        c = u["classification"]
        lines += ["", f"Classification by scoring the label options ({c['users']} users, mean over users):", "",
                  "| model | accuracy | macro-F1 |", "|---|---|---|"]
        lines += [f"| {name} | {_f(c[name]['accuracy'], '.3f')} | {_f(c[name]['macro_f1'], '.3f')} |" for name in TIERS]
    for key, groups in u.get("by_group", {}).items():
        lines += ["", f"Served utility by {key}:", "", "| group | users | NLL | accuracy | macro-F1 |", "|---|---|---|---|---|"]
        lines += [f"| {g} | {e['users']} | {_f(e['nll_served'])} | {_f(e.get('accuracy'), '.3f')} | {_f(e.get('macro_f1'), '.3f')} |" for g, e in groups.items()]
    lines += [
        "",
        f"Persona beats global for {u['users_persona_beats_global']} of {u['users']} users; "
        f"personalised beats global for {u['users_personal_beats_global']}."
        + (f" {u['users_with_context']} devices put context phrases before their trained stacks' prompts"
           " (the base is scored without them)." if u.get("users_with_context") else ""),
        "",
        "### Per routing group (cold-start: global; occasional: + persona; frequent: + persona + user)",
        "",
        "| group | users | global | global + persona | personal | served |",
        "|---|---|---|---|---|---|",
    ]
    for name, g in u["routing_groups"].items():
        lines.append(f"| {name} | {g['users']} | {_f(g['global'])} | {_f(g['persona'])} | {_f(g['personal'])} | {_f(g['served'])} |")
    lines += [
        "", "## Training (device diagnostics, per round)", "",
        "Record-level DP-SGD: the share of per-sample gradients clipped, their median norm, and the signal-to-noise",
        "ratio of a step (norm of the mean clipped gradient over the noise's expected norm), over all coordinates",
        "and per tier over the tier's own. User-level: the share of device updates clipped and their norms before clipping.", "",
        "| round | devices | mean train loss | DP-SGD clip fraction | DP-SGD median grad norm | DP-SGD signal-to-noise | per tier | user-level clip fraction | update norm q10 / q50 / q90 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["training"]:
        q = r.get("update_norm", {})
        norms = " / ".join(_f(q.get(k), ".3g") for k in ("q10", "q50", "q90")) if q else "-"
        sgd = r.get("dp_sgd", {})
        by_tier = ", ".join(f"{t} {_f(v, '.3g')}" for t, v in sgd.get("snr_by_tier", {}).items()) or "-"
        lines.append(
            f"| {r['round']} | {r['devices']} | {_f(r['train_loss'])} | {_f(sgd.get('clip_fraction'), '.2f')} | {_f(sgd.get('grad_norm_q50'), '.3g')} "
            f"| {_f(sgd.get('snr'), '.3g')} | {by_tier} | {_f(r.get('clip_fraction'), '.2f')} | {norms} |"
        )
    e = report["epsilon_record_level"]
    lines += [
        "",
        "## Per-user results (record-level epsilon from each device's Opacus accountant)",
        "",
        f"delta = {e['delta']}; DP-SGD {'on' if e['dp'] else 'off (epsilon = inf)'}; max epsilon {_f(e['max'], '.2f')}.",
        "",
        "| user | records | group | persona | NLL base | NLL global | NLL persona | NLL personal | epsilon |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for x in report["users"]:
        if not x["evaluated"]:
            lines.append(f"| {x['user_index']} | - | - | - | not evaluated | | | | |")
            continue
        eps = "inf" if x["epsilon_record_level"] is None else f"{x['epsilon_record_level']:.2f}"
        lines.append(
            f"| {x['user_index']} | {x['records']} | {x['routing_group']} | {'-' if x['persona'] is None else x['persona']} | {x['nll_base']:.3f} "
            f"| {x['nll_global']:.3f} | {x['nll_persona']:.3f} | {x['nll_personal']:.3f} | {eps} |"
        )
    server_md = render_server(report["server"]).split("\n", 1)[1]
    return "\n".join(lines) + "\n\n## What the server learned" + server_md.replace("\n## ", "\n### ")


def write_full_report(run_dir: Path, harness: dict, wall_s: float) -> dict:
    report = build_full_report(run_dir, harness, wall_s)
    (Path(run_dir) / "report.json").write_text(json.dumps(report, indent=2, default=str))
    (Path(run_dir) / "report.md").write_text(render_markdown(report))
    from simulations.instruments import write_instruments

    write_instruments(run_dir, report["training"])
    return report
