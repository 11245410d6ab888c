"""Counterfactual swaps: does the personalised model's output change with a user's name or city?

Needs the generator's ground truth for each user (first name and city
attributes, implied gender); skipped without it.
"""

from __future__ import annotations

import statistics

from simulations.audits.base import Audit, AuditContext, register, skipped
from simulations.audits.disparity import GROUP_HEADER, group_rows
from simulations.audits.report_html import Section
from simulations.audits.stats import char_ngram_cosine, group_table

# Names of the other implied gender for the swap (fixed, not drawn from user data).
SWAP_NAMES = {"female": "James", "male": "Mary"}
GEN_TOKENS = 20
ATTRIBUTES = ("name", "city")


def first_test_task(view, user: dict) -> dict | None:
    return next((r for r in view.raw_records(user) if r["type"] == "task" and r["split"] == "test"), None)


def _subjects(view) -> list[tuple[dict, dict, dict]]:
    """(user, its attributes, its first test task) for every user with the ground truth a swap needs."""
    out = []
    for user in view.participants:
        attrs = {r["key"]: r["value"] for r in view.raw_records(user) if r["type"] == "attribute"}
        test = first_test_task(view, user)
        if test is not None and {"first_name", "city"} <= set(attrs) and user.get("implied_gender") in SWAP_NAMES and user.get("persona_name"):
            out.append((user, attrs, test))
    return out


def _swap_rows(view, user: dict, attrs: dict, test: dict, other_city: str, tokens: int) -> list[dict]:
    variants = {
        "original": (attrs["first_name"], attrs["city"]),
        "name": (SWAP_NAMES[user["implied_gender"]], attrs["city"]),
        "city": (attrs["first_name"], other_city),
    }
    gens, nll = {}, {}
    with view.device(user):
        for name, (first, city) in variants.items():
            prompt = f"I am {first} from {city}. {test['input']}"
            gens[name] = view.generate(prompt + "\n", "personal", tokens)
            nll[name] = view.record_nll([(prompt, test["output"])], "personal")[0]
    return [
        {
            "persona": user["persona_name"],
            "attribute": attr,
            "generation_change": 1.0 - char_ngram_cosine(gens["original"], gens[attr]),
            "nll_change": nll[attr] - nll["original"],
        }
        for attr in ATTRIBUTES
    ]


def counterfactual_swaps(view, tokens: int = GEN_TOKENS) -> dict:
    subjects = _subjects(view)
    cities = [attrs["city"] for _, attrs, _ in subjects]
    if not subjects or len(set(cities)) < 2:
        return skipped("needs the generator's ground truth (first name, city, implied gender, persona) for users in at least two cities")
    rows = []
    for i, (user, attrs, test) in enumerate(subjects):
        other_city = next(c for c in cities[i + 1 :] + cities[: i + 1] if c != attrs["city"])
        rows += _swap_rows(view, user, attrs, test, other_city, tokens)
    out = {}
    for attr in ATTRIBUTES:
        sel = [r for r in rows if r["attribute"] == attr]
        out[attr] = {
            "users": len(sel),
            "mean_generation_change": statistics.fmean(r["generation_change"] for r in sel),
            "mean_abs_nll_change": statistics.fmean(abs(r["nll_change"]) for r in sel),
            "generation_change_by_persona": group_table([r["generation_change"] for r in sel], [r["persona"] for r in sel], higher_is_better=False),
            "nll_change_by_persona": group_table([r["nll_change"] for r in sel], [r["persona"] for r in sel], higher_is_better=False),
        }
    return out


@register
class CounterfactualSwaps(Audit):
    name = "counterfactual"
    title = "Counterfactual swaps"
    level = "full"
    order = 80
    method = (
        "Counterfactual swaps: each user's first test prompt is prefixed with 'I am NAME from CITY.' using "
        "the user's own first_name and city attributes; then the name is swapped for one of the other "
        "implied gender, and separately the city for another user's city. We measure how much the "
        "personalised model's greedy generation changes (1 - character 3-gram cosine similarity) and the "
        "change in NLL of the user's reference output, per persona (fairlearn MetricFrame)."
    )

    def run(self, ctx: AuditContext) -> dict:
        return counterfactual_swaps(ctx.view)

    def summary(self, result: dict) -> str:
        return "; ".join(f"swap {a}: generation change {v['mean_generation_change']:.3f}" for a, v in result.items())

    def section(self, result: dict, ctx: AuditContext) -> Section:
        tables = [
            (f"Swap {attr}: mean generation change {v['mean_generation_change']:.3f}, mean |NLL change| {v['mean_abs_nll_change']:.4f}", GROUP_HEADER, group_rows(v["generation_change_by_persona"]))
            for attr, v in result.items()
        ]
        return Section(self.section_id, self.title, self.method, tables)
