"""Membership signal: a measurement, per record (personalised model) and per user (shared tiers), with no epsilon claim.

Members and non-members here are fixed, different records of one training
run, so the trials are neither randomised nor independent, and the sample
sizes could not certify the formal epsilon anyway: the scores give an AUC and
a TPR at 1% FPR, never an epsilon bound or a pass/fail. The epsilon claim lives
in the one-run audit (``one_run.py``), whose canaries are randomly included.

The user-level measurement needs hold-out users (generated, never federated)
as its non-members and is skipped without them. Without the PII sidecar the
record-level members cannot be restricted to PII-free train tasks; the
measurement still runs and says so.
"""

from __future__ import annotations

import random
import statistics

from simulations.audits.base import Audit, AuditContext, is_skipped, register, skipped
from simulations.audits.report_html import Section
from simulations.audits.stats import roc_auc, tpr_at_fpr
from simulations.personas import planted_task

MEMBERS_PER_USER = 8
LEVELS = ("record_level", "user_level")


def _task_pairs(view, user: dict, split: str, exclude: set[str]) -> list[tuple[str, str]]:
    """Raw (input, output) of a split's persona tasks (no planted canaries), minus ``exclude``d ids."""
    return [
        (r["input"], r["output"])
        for r in view.raw_records(user)
        if r["type"] == "task" and r["split"] == split and r["id"] not in exclude and not planted_task(r)
    ]


def _signal(members: list[float], nonmembers: list[float]) -> dict:
    return {
        "members": len(members),
        "nonmembers": len(nonmembers),
        "auc": round(roc_auc(members, nonmembers), 4),
        "tpr_at_1pct_fpr": round(tpr_at_fpr(members, nonmembers, 0.01), 4),
    }


def _sample(pairs: list, k: int | None, seed: str) -> list:
    """At most ``k`` of ``pairs``, a seeded sample (scoring every record of a 135M model on 2 cores takes minutes)."""
    if k is None or len(pairs) <= k:
        return pairs
    return random.Random(seed).sample(pairs, k)


def _record_level(view, members_per_user: int | None) -> dict:
    members, nonmembers = [], []
    for user in view.participants:
        train = _sample(_task_pairs(view, user, "train", view.pii_record_ids(user)), members_per_user, f"mia:{user['user_id']}")
        test = _task_pairs(view, user, "test", set())
        with view.device(user):
            for pairs, out in ((train, members), (test, nonmembers)):
                base = view.record_nll(pairs, "base")
                personal = view.record_nll(pairs, "personal")
                out += [b - p for b, p in zip(base, personal)]
    record = _signal(members, nonmembers)
    if view.sidecar is None:
        record["note"] = "no PII sidecar: members include train tasks whose raw text held PII that scrubbing changed"
    return record


def _user_level(view, members_per_user: int | None) -> dict:
    if not view.holdouts:
        return skipped("no hold-out users (users generated but never federated) to serve as non-members")
    scores = {"member": [], "nonmember": []}
    for user in [*view.participants, *view.holdouts]:
        pairs = _sample(_task_pairs(view, user, "train", view.pii_record_ids(user)), members_per_user, f"umia:{user['user_id']}")
        with view.device(user):
            base = view.record_nll(pairs, "base")
            shared = view.record_nll(pairs, "persona")
        scores["nonmember" if user.get("holdout") else "member"].append(statistics.fmean(b - s for b, s in zip(base, shared)))
    return _signal(scores["member"], scores["nonmember"])


def membership_inference(view, members_per_user: int | None = MEMBERS_PER_USER) -> dict:
    return {"record_level": _record_level(view, members_per_user), "user_level": _user_level(view, members_per_user)}


@register
class MembershipInference(Audit):
    name = "membership_inference"
    title = "Membership signal (a measurement, no epsilon claim)"
    level = "full"
    order = 40
    method = (
        "A measurement of how well a membership attack separates members from non-members; it makes no "
        "epsilon claim and never passes or fails (the epsilon claim is the one-run audit's). Record level: "
        "a reference-model attack (a LiRA-style calibration with the never-trained base model as the "
        "reference): score = NLL_base - NLL_personal of a record on its own device's personalised model; "
        "members are the PII-free persona train tasks (no planted canaries), non-members the held-out test "
        "tasks, pooled over devices. User level: the server's view; score = mean over a user's train tasks of "
        "NLL_base - NLL_(global+persona); members are the participants, non-members hold-out users that never "
        f"joined. Records are a seeded sample of up to {MEMBERS_PER_USER} train tasks per user. Reported: AUC "
        "and TPR at 1% FPR. Why no epsilon: members and non-members are fixed, different records of one "
        "training run, so the trials are neither randomised nor independent and no confidence interval over "
        "them bounds epsilon; and the sizes could not certify much anyway (the user level has a handful of "
        "hold-out users: its epsilon claim was dropped, it is a measurement only)."
    )

    def run(self, ctx: AuditContext) -> dict:
        return membership_inference(ctx.view)

    def summary(self, result: dict) -> str:
        parts = []
        for level in LEVELS:
            m = result[level]
            parts.append(f"{level}: skipped" if is_skipped(m) else f"{level}: AUC {m['auc']}, TPR@1%FPR {m['tpr_at_1pct_fpr']}")
        return "; ".join(parts)

    def section(self, result: dict, ctx: AuditContext) -> Section:
        header = ["attack", "members", "non-members", "AUC", "TPR @ 1% FPR"]
        rows, notes = [], []
        for level in LEVELS:
            m, label = result[level], level.replace("_", "-")
            if is_skipped(m):
                notes.append(f"{label} measurement skipped: {m['skipped']}.")
                continue
            rows.append([label, m["members"], m["nonmembers"], m["auc"], m["tpr_at_1pct_fpr"]])
            if m.get("note"):
                notes.append(f"{label}: {m['note']}.")
        return Section(self.section_id, self.title, self.method, [("Membership signal", header, rows)], note=" ".join(notes))
