"""Bias audit of a finished run: utility disparity, DP disparate impact, counterfactual swaps,
degree of personalization.

Groups are the generator's ground truth (personas) and the routing groups;
only the simulation harness knows personas, which is why this lives here and
not on the server. Group tables go through fairlearn's ``MetricFrame``
(:func:`simulations.audit_stats.group_table`).
"""

from __future__ import annotations

import statistics

from simulations.audit_stats import char_ngram_cosine, degree_of_personalization, disparity, group_table, share_worse
from simulations.audit_view import RunView

METHODS = {
    "disparity": (
        "Per-user held-out NLL per target token of the stack each user is served (lower is better), "
        "summarised over users and per group (persona from the generator's ground truth; routing group): "
        "mean, standard deviation, worst user, 10th percentile and worst-to-mean ratio (>= 1 for a loss; "
        "further from 1 is more unequal), and the share of users whose personalised model is worse than "
        "the global model."
    ),
    "dp-impact": (
        "DP disparate impact (Bagdasaryan et al. 2019): the increase in served NLL from a non-private "
        "baseline run to this run, per persona and per routing group, on the same users."
    ),
    "counterfactual": (
        "Counterfactual swaps: each user's first test prompt is prefixed with 'I am NAME from CITY.' using "
        "the user's own first_name and city attributes; then the name is swapped for one of the other "
        "implied gender, and separately the city for another user's city. We measure how much the "
        "personalised model's greedy generation changes (1 - character 3-gram cosine similarity) and the "
        "change in NLL of the user's reference output, per persona (fairlearn MetricFrame)."
    ),
    "personalization": (
        "Degree of personalization (EGISES-style): for each pair of users, how far apart the model's "
        "outputs for their test prompts are, relative to how far apart their reference outputs are "
        "(ratio clipped to [0, 1], averaged over pairs). Reported for the personalised and the global "
        "model, so a model that ignores the user is visible even when its NLL is fine."
    ),
}

# Names of the other implied gender for the swap (fixed, not drawn from user data).
SWAP_NAMES = {"female": "James", "male": "Mary"}
GEN_TOKENS = 20


def _users_by_index(view: RunView) -> dict[int, dict]:
    return {i: u for i, u in enumerate(view.participants)}


def disparity_audit(view: RunView) -> dict:
    users = _users_by_index(view)
    rows = view.report["users"]
    served = [r["nll_served"] for r in rows]
    personas = [users[r["user_index"]]["persona_name"] for r in rows]
    groups = [r["routing_group"] for r in rows]
    return {
        "metric": "served NLL per target token (lower is better)",
        "overall": disparity(served, higher_is_better=False),
        "share_personal_worse_than_global": share_worse([r["nll_personal"] for r in rows], [r["nll_global"] for r in rows], False),
        "by_persona": group_table(served, personas, higher_is_better=False),
        "by_routing_group": group_table(served, groups, higher_is_better=False),
    }


def dp_impact(view: RunView, baseline: RunView) -> dict:
    """Served-NLL increase from ``baseline`` (non-private) to this run, per persona and routing group."""
    users = _users_by_index(view)
    base = {r["user_index"]: r["nll_served"] for r in baseline.report["users"]}
    rows = [r for r in view.report["users"] if r["user_index"] in base]
    drop = [r["nll_served"] - base[r["user_index"]] for r in rows]
    out = {"users": len(rows), "mean_increase": statistics.fmean(drop) if drop else float("nan")}
    for name, key in (("by_persona", lambda r: users[r["user_index"]]["persona_name"]), ("by_routing_group", lambda r: r["routing_group"])):
        table: dict[str, list[float]] = {}
        for r, d in zip(rows, drop):
            table.setdefault(key(r), []).append(d)
        out[name] = {g: {"users": len(v), "mean_increase": statistics.fmean(v)} for g, v in sorted(table.items())}
    return out


def counterfactual_swaps(view: RunView, tokens: int = GEN_TOKENS) -> dict:
    cities = [a["value"] for u in view.participants for a in view.raw_records(u) if a["type"] == "attribute" and a["key"] == "city"]
    rows = []
    for i, user in enumerate(view.participants):
        raw = view.raw_records(user)
        attrs = {r["key"]: r["value"] for r in raw if r["type"] == "attribute"}
        test = next((r for r in raw if r["type"] == "task" and r["split"] == "test"), None)
        if test is None:
            continue
        variants = {
            "original": (attrs["first_name"], attrs["city"]),
            "name": (SWAP_NAMES[user["implied_gender"]], attrs["city"]),
            "city": (attrs["first_name"], next(c for c in cities[i + 1 :] + cities[: i + 1] if c != attrs["city"])),
        }
        with view.device(user):
            gens, nll = {}, {}
            for name, (first, city) in variants.items():
                prompt = f"I am {first} from {city}. {test['input']}"
                gens[name] = view.generate(prompt + "\n", "personal", tokens)
                nll[name] = view.record_nll([(prompt, test["output"])], "personal")[0]
        for attr in ("name", "city"):
            rows.append(
                {
                    "persona": user["persona_name"],
                    "attribute": attr,
                    "generation_change": 1.0 - char_ngram_cosine(gens["original"], gens[attr]),
                    "nll_change": nll[attr] - nll["original"],
                }
            )
    out = {}
    for attr in ("name", "city"):
        sel = [r for r in rows if r["attribute"] == attr]
        if not sel:
            continue
        out[attr] = {
            "users": len(sel),
            "mean_generation_change": statistics.fmean(r["generation_change"] for r in sel),
            "mean_abs_nll_change": statistics.fmean(abs(r["nll_change"]) for r in sel),
            "generation_change_by_persona": group_table([r["generation_change"] for r in sel], [r["persona"] for r in sel], higher_is_better=False),
            "nll_change_by_persona": group_table([r["nll_change"] for r in sel], [r["persona"] for r in sel], higher_is_better=False),
        }
    return out


def degree_of_personalization_audit(view: RunView, tokens: int = GEN_TOKENS) -> dict:
    outputs = {"personal": {}, "global": {}}
    references = {}
    for user in view.participants:
        test = next((r for r in view.raw_records(user) if r["type"] == "task" and r["split"] == "test"), None)
        if test is None:
            continue
        references[user["user_id"]] = test["output"]
        with view.device(user):
            for stack in outputs:
                outputs[stack][user["user_id"]] = view.generate(test["input"] + "\n", stack, tokens)
    return {stack: degree_of_personalization(outs, references) for stack, outs in outputs.items()} | {"users": len(references)}
