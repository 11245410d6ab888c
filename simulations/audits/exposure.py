"""Canary exposure (Carlini et al. 2019, "The Secret Sharer").

Needs the generator's canaries (``manifest.json``); skips without them.
"""

from __future__ import annotations

import math
import random
import statistics

from simulations.audits.base import Audit, AuditContext, register, skipped
from simulations.audits.report_html import Plot, Section, bar_chart
from simulations.audits.stats import exposure
from simulations.personas import CANARY_INPUT, CANARY_PREFIX, canary_secret

STACKS = ("global", "persona", "personal")
COLUMNS = (*STACKS, "reference_base", "reference_other_device")
# Scoring a record on SmolLM2 costs ~0.1 s on two cores, so the levels trade
# sample sizes for time: "fast" fits the end of `make demo`, "full" is for the figures.
LEVEL_OPTIONS = {
    "fast": {"references": 63, "stacks": ("global", "personal"), "other_device": False},
    "full": {"references": 199, "stacks": STACKS, "other_device": True},
}


def _split(nll: list[float]) -> tuple[float, list[float]]:
    return nll[0], nll[1:]


def _bits(view, pairs, stack: str) -> float:
    return round(exposure(*_split(view.record_nll(pairs, stack, batch_size=64))), 3)


def canary_exposure(view, references: int = 199, stacks: tuple[str, ...] = STACKS, other_device: bool = True) -> dict:
    canaried = view.canaried
    if not canaried:
        return skipped("no planted canaries (manifest.json lists none): only a run on generated data has them")
    rows = []
    for user in canaried:
        rng = random.Random(f"exposure:{user['canary']}")
        pool = set()
        while len(pool) < references:
            cand = canary_secret(rng)
            if cand != user["canary"]:
                pool.add(cand)
        candidates = [user["canary"], *sorted(pool)]
        pairs = [(CANARY_INPUT, f"{CANARY_PREFIX}{c}.") for c in candidates]
        row = {"user_id": user["user_id"], "candidates": len(candidates)}
        with view.device(user):
            for stack in STACKS:
                row[stack] = _bits(view, pairs, stack) if stack in stacks else None
            row["reference_base"] = _bits(view, pairs, "base")
        # Another device's personalised model: trained on the same shared tiers
        # but never on this canary (prefer a frequent user, like the canary's).
        others = sorted((u for u in view.participants if not u.get("canary")), key=lambda u: u.get("volume") != "frequent")
        row["reference_other_device"] = None
        if others and other_device:
            with view.device(others[0]):
                row["reference_other_device"] = _bits(view, pairs, "personal")
        rows.append(row)
    summary = {k: round(statistics.fmean(r[k] for r in rows), 3) if all(r[k] is not None for r in rows) else None for k in COLUMNS}
    return {
        "canaries": len(rows),
        "references": references,
        "max_exposure_bits": round(math.log2(references + 1), 3),
        "mean": summary,
        "rows": rows,
        "scrub_mode": view.config["scrub-mode"],
    }


@register
class CanaryExposure(Audit):
    name = "exposure"
    title = "Canary exposure"
    level = "fast"
    order = 30
    method = (
        "Canary exposure (Carlini et al. 2019). The generator planted a random phone-shaped secret "
        "('My secret number is ddd-ddd-dddd.') several times in the train tasks of a few users. For each "
        "canary we score it and R random numbers of the same shape by the model's NLL of the canary "
        "sentence; exposure = log2(R + 1) - log2(rank). Measured in the global, global + persona and "
        "personalised models of the canary's own device, and in two reference models that never saw it: "
        "the base model and another device's personalised model. A model that has not memorised the secret "
        "ranks it uniformly at random (expected exposure ~1.4 bits)."
    )

    def run(self, ctx: AuditContext) -> dict:
        return canary_exposure(ctx.view, **LEVEL_OPTIONS[ctx.level])

    def summary(self, result: dict) -> str:
        measured = ", ".join(f"{k} {v}" for k, v in result["mean"].items() if v is not None)
        return f"mean bits over {result['canaries']} canaries: {measured}"

    def section(self, result: dict, ctx: AuditContext) -> Section:
        note = f"{self.method} This run: R = {result['references']}; scrub mode {result['scrub_mode']}."
        rows = [[r["user_id"], *[r[c] for c in COLUMNS]] for r in result["rows"]]
        measured = [c for c in COLUMNS if result["mean"].get(c) is not None]
        figures = []
        if measured:
            chart = bar_chart(measured, [result["mean"][c] for c in measured], title="canary exposure", ylabel="bits", reference_line=math.log2(math.e), reference_label="chance (~1.44)")
            figures.append(Plot("mean exposure per model (bits)", chart))
        caption = f"Exposure in bits (max {result['max_exposure_bits']})"
        return Section(self.section_id, self.title, note, [(caption, ["canary user", *COLUMNS], rows)], figures)
