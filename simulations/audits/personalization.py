"""Degree of personalization (EGISES-style): does the model answer different users differently?"""

from __future__ import annotations

from simulations.audits.base import Audit, AuditContext, register, skipped
from simulations.audits.counterfactual import GEN_TOKENS, first_test_task
from simulations.audits.report_html import Section
from simulations.audits.stats import degree_of_personalization

STACKS = ("personal", "global")


def degree_of_personalization_audit(view, tokens: int = GEN_TOKENS) -> dict:
    outputs: dict[str, dict[str, str]] = {stack: {} for stack in STACKS}
    references = {}
    for user in view.participants:
        test = first_test_task(view, user)
        if test is not None:
            references[user["user_id"]] = test["output"]
    if len(set(references.values())) < 2:
        return skipped("needs at least two users whose first test tasks have different reference outputs")
    for user in view.participants:
        if user["user_id"] not in references:
            continue
        prompt = first_test_task(view, user)["input"] + "\n"
        with view.device(user):
            for stack in STACKS:
                outputs[stack][user["user_id"]] = view.generate(prompt, stack, tokens)
    return {stack: degree_of_personalization(outs, references) for stack, outs in outputs.items()} | {"users": len(references)}


@register
class DegreeOfPersonalization(Audit):
    name = "personalization"
    title = "Degree of personalization"
    level = "full"
    order = 90
    method = (
        "Degree of personalization (EGISES-style): for each pair of users, how far apart the model's "
        "outputs for their test prompts are, relative to how far apart their reference outputs are "
        "(ratio clipped to [0, 1], averaged over pairs). Reported for the personalised and the global "
        "model, so a model that ignores the user is visible even when its NLL is fine."
    )

    def run(self, ctx: AuditContext) -> dict:
        return degree_of_personalization_audit(ctx.view)

    def summary(self, result: dict) -> str:
        return ", ".join(f"{stack} {result[stack]:.3f}" for stack in STACKS) + f" over {result['users']} users"

    def section(self, result: dict, ctx: AuditContext) -> Section:
        rows = [[stack, round(result[stack], 4)] for stack in STACKS]
        return Section(self.section_id, self.title, self.method, [(f"{result['users']} users", ["model", "degree of personalization"], rows)])
