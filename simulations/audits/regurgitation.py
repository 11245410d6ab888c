"""PII regurgitation: planted values (and canaries) that the personalised models reproduce from a prefix.

Needs planted ground truth: the PII sidecar and/or the canaries; skips with
neither.
"""

from __future__ import annotations

from simulations.audits.base import Audit, AuditContext, register, skipped
from simulations.audits.report_html import Section
from simulations.personas import CANARY_INPUT, CANARY_PREFIX

REGURGITATION_TOKENS = 20


def _jobs(view, user: dict, per_user: int) -> list[tuple[str, str, str]]:
    """(prompt, planted value, kind) for a user: train tasks whose output held planted PII, cut before it; its canary."""
    raw = {r["id"]: r for r in view.raw_records(user) if r["type"] == "task" and r["split"] == "train"}
    spans = [row for row in view.sidecar or [] if row["user_id"] == user["user_id"] and row["field"] == "output" and row["record_id"] in raw]
    spans = [s for s in spans if not s["record_id"].startswith("c")][:per_user]
    jobs = [(raw[s["record_id"]]["input"] + "\n" + raw[s["record_id"]]["output"][: s["start"]], s["value"], "pii") for s in spans]
    if user.get("canary"):
        jobs.append((CANARY_INPUT + "\n" + CANARY_PREFIX, user["canary"], "canary"))
    return jobs


def regurgitation(view, per_user: int = 2, tokens: int = REGURGITATION_TOKENS) -> dict:
    from client.device import scrubber

    if view.sidecar is None and not view.canaried:
        return skipped("no planted PII to prompt for (no pii_sidecar.jsonl and no canaries in manifest.json)")
    prompts = 0
    hits = {"pii": 0, "canary": 0}
    rescrub_entities = 0
    mode = str(view.config["scrub-mode"])
    # Only the number of entities found is kept, so the operator is "tag"
    # whatever the run used (pseudonyms would need each device's secret).
    rescrub = scrubber("patterns" if mode == "off" else mode, "tag", str(view.config["scrub-config"]))
    for user in view.participants:
        jobs = _jobs(view, user, per_user)
        if not jobs:
            continue
        generations = []
        with view.device(user):
            for prompt, value, kind in jobs:
                text = view.generate(prompt, "personal", tokens)
                prompts += 1
                hits[kind] += value in text
                generations.append(text)
        # What the model generated is scrubbed again before anything about it is kept.
        rescrub_entities += sum(o.entity_count for o in rescrub(generations))
    return {
        "prompts": prompts,
        "pii_hits": hits["pii"],
        "canary_hits": hits["canary"],
        "rescrub_entities_found": rescrub_entities,
        "scrub_mode": mode,
        "max_new_tokens": tokens,
        "pii_sidecar": view.sidecar is not None,
    }


@register
class Regurgitation(Audit):
    name = "regurgitation"
    title = "PII regurgitation"
    level = "full"
    order = 50
    method = (
        f"Prompt each device's personalised model (greedy, {REGURGITATION_TOKENS} new tokens) with the prefix of train "
        "tasks whose raw text held planted PII, up to the PII, and with the canary prefix; count planted "
        "values that appear verbatim in the generations. Generations are re-scrubbed on the device before "
        "anything about them is stored."
    )

    def run(self, ctx: AuditContext) -> dict:
        return regurgitation(ctx.view)

    def summary(self, result: dict) -> str:
        return f"{result['pii_hits']} planted PII and {result['canary_hits']} canaries reproduced in {result['prompts']} prompts"

    def section(self, result: dict, ctx: AuditContext) -> Section:
        r = result
        rows = [[r["prompts"], r["pii_hits"], r["canary_hits"], r["rescrub_entities_found"], r["scrub_mode"]]]
        note = "" if r["pii_sidecar"] else "No PII sidecar: only canaries were prompted for."
        header = ["prompts", "planted PII reproduced", "canaries reproduced", "entities found by re-scrub", "scrub mode"]
        return Section(self.section_id, self.title, self.method, [("Generations", header, rows)], note=note)
