"""Membership inference, per record (on each device's personalised model) and per user (on the shared tiers).

The user-level attack needs hold-out users (generated, never federated) as
its non-members and is skipped without them. Without the PII sidecar the
record-level members cannot be restricted to PII-free train tasks; the
attack still runs (a weaker attack never overstates the empirical bound) and
says so.
"""

from __future__ import annotations

import random
import statistics

from simulations.audits.base import Audit, AuditContext, is_skipped, register, skipped
from simulations.audits.report_html import Section, format_epsilon
from simulations.audits.stats import empirical_epsilon, roc_auc, tpr_at_fpr

MEMBERS_PER_USER = 8
LEVELS = ("record_level", "user_level")


def _task_pairs(view, user: dict, split: str, exclude: set[str]) -> list[tuple[str, str]]:
    """Raw (input, output) of a split's tasks, minus ``exclude``d ids (PII-free raw text is what trained)."""
    return [
        (r["input"], r["output"])
        for r in view.raw_records(user)
        if r["type"] == "task" and r["split"] == split and r["id"] not in exclude
    ]


def _attack_summary(members: list[float], nonmembers: list[float], delta: float) -> dict:
    return {
        "members": len(members),
        "nonmembers": len(nonmembers),
        "auc": round(roc_auc(members, nonmembers), 4),
        "tpr_at_1pct_fpr": round(tpr_at_fpr(members, nonmembers, 0.01), 4),
        "empirical_epsilon_lower_bound": round(empirical_epsilon(members, nonmembers, delta), 4),
    }


def _sample(pairs: list, k: int | None, seed: str) -> list:
    """At most ``k`` of ``pairs``, a seeded sample (scoring every record of a 135M model on 2 cores takes minutes)."""
    if k is None or len(pairs) <= k:
        return pairs
    return random.Random(seed).sample(pairs, k)


def _with_formal(attack: dict, formal: float | None, delta: float) -> dict:
    return {**attack, "formal_epsilon": formal, "delta": delta, "bound_exceeds_formal": formal is not None and attack["empirical_epsilon_lower_bound"] > formal}


def _record_level(view, members_per_user: int | None) -> dict:
    cfg = view.config
    members, nonmembers = [], []
    for user in view.participants:
        canary_ids = {r["id"] for r in view.raw_records(user) if r["type"] == "task" and r["id"].startswith("c")}
        train = _sample(_task_pairs(view, user, "train", view.pii_record_ids(user) | canary_ids), members_per_user, f"mia:{user['user_id']}")
        test = _task_pairs(view, user, "test", set())
        with view.device(user):
            for pairs, out in ((train, members), (test, nonmembers)):
                base = view.record_nll(pairs, "base")
                personal = view.record_nll(pairs, "personal")
                out += [b - p for b, p in zip(base, personal)]
    eps = [u.get("epsilon_record_level") for u in view.report["users"] if u["evaluated"]]
    formal = None if (not cfg["dp"] or not eps or any(e is None for e in eps)) else max(eps)
    record = _with_formal(_attack_summary(members, nonmembers, float(cfg["delta"])), formal, float(cfg["delta"]))
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
    ul = view.report["server"]["user_level"]
    delta = float(view.config["user-delta"])
    formal = max(ul["epsilon_per_round"].values()) if ul.get("dp") and ul.get("epsilon_per_round") else None
    return _with_formal(_attack_summary(scores["member"], scores["nonmember"], delta), formal, delta)


def membership_inference(view, members_per_user: int | None = MEMBERS_PER_USER) -> dict:
    return {"record_level": _record_level(view, members_per_user), "user_level": _user_level(view, members_per_user)}


@register
class MembershipInference(Audit):
    name = "membership_inference"
    title = "Membership inference"
    level = "full"
    order = 40
    method = (
        "Record level: a reference-model attack (a LiRA-style calibration with the never-trained base "
        "model as the reference): score = NLL_base - NLL_personal of a record on its own device's "
        "personalised model; members are the PII-free train tasks, non-members the held-out test tasks, "
        "pooled over devices. User level: the server's view; score = mean over a user's train tasks of "
        "NLL_base - NLL_(global+persona); members are the participants, non-members hold-out users that "
        f"never joined. Records are a seeded sample of up to {MEMBERS_PER_USER} train tasks per user. AUC, TPR "
        "at 1% FPR, and an empirical epsilon lower bound with Clopper-Pearson intervals at 95% confidence "
        "(Jagielski et al. 2020), flagged if it exceeds the formal epsilon."
    )
    criterion = "no empirical epsilon lower bound above the formal epsilon"

    def run(self, ctx: AuditContext) -> dict:
        return membership_inference(ctx.view)

    def failure(self, result: dict) -> str | None:
        for level in LEVELS:
            m = result[level]
            if not is_skipped(m) and m["bound_exceeds_formal"]:
                return f"{level} membership attack: empirical epsilon {m['empirical_epsilon_lower_bound']} exceeds the formal {m['formal_epsilon']}"
        return None

    def summary(self, result: dict) -> str:
        parts = []
        for level in LEVELS:
            m = result[level]
            parts.append(f"{level}: skipped" if is_skipped(m) else f"{level}: AUC {m['auc']}, TPR@1%FPR {m['tpr_at_1pct_fpr']}, empirical eps >= {m['empirical_epsilon_lower_bound']}")
        return "; ".join(parts)

    def section(self, result: dict, ctx: AuditContext) -> Section:
        header = ["attack", "members", "non-members", "AUC", "TPR @ 1% FPR", "empirical eps (95% LB)", "formal eps", "bound exceeds formal?"]
        rows, notes = [], []
        for level in LEVELS:
            m, label = result[level], level.replace("_", "-")
            if is_skipped(m):
                notes.append(f"{label} attack skipped: {m['skipped']}.")
                continue
            rows.append([label, m["members"], m["nonmembers"], m["auc"], m["tpr_at_1pct_fpr"], m["empirical_epsilon_lower_bound"], format_epsilon(m["formal_epsilon"]), "YES - check for a bug" if m["bound_exceeds_formal"] else "no"])
            if m.get("note"):
                notes.append(f"{label}: {m['note']}.")
        return Section(self.section_id, self.title, self.method, [("Attack results", header, rows)], note=" ".join(notes))
