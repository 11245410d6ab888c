"""Privacy attacks on a finished run: canary exposure, membership inference, PII regurgitation.

Each audit is a real attack with a stated method (``METHODS``), run by the
simulation harness against the models the run produced (see
:mod:`simulations.audit_view`). Statistics come from
:mod:`simulations.audit_stats`.
"""

from __future__ import annotations

import math
import random
import statistics

from simulations.audit_stats import empirical_epsilon, exposure, roc_auc, tpr_at_fpr
from simulations.audit_view import RunView
from simulations.personas import CANARY_INPUT, CANARY_PREFIX, canary_secret

METHODS = {
    "exposure": (
        "Canary exposure (Carlini et al. 2019). The generator planted a random phone-shaped secret "
        "('My secret number is ddd-ddd-dddd.') several times in the train tasks of a few users. For each "
        "canary we score it and {n} random numbers of the same shape by the model's NLL of the canary "
        "sentence; exposure = log2|R| - log2(rank). Measured in the global, global + persona and "
        "personalised models of the canary's own device, and in two reference models that never saw it: "
        "the base model and another device's personalised model. A model that has not memorised the secret "
        "ranks it uniformly at random (expected exposure ~1.4 bits)."
    ),
    "membership-inference": (
        "Record level: a reference-model attack (a LiRA-style calibration with the never-trained base "
        "model as the reference): score = NLL_base - NLL_personal of a record on its own device's "
        "personalised model; members are the PII-free train tasks, non-members the held-out test tasks, "
        "pooled over devices. User level: the server's view; score = mean over a user's train tasks of "
        "NLL_base - NLL_(global+persona); members are the participants, non-members hold-out users that "
        "never joined. Records are a seeded sample of up to {members} train tasks per user. AUC, TPR at 1% FPR, and an empirical epsilon lower bound with Clopper-Pearson "
        "intervals at 95% confidence (Jagielski et al. 2020), flagged if it exceeds the formal epsilon."
    ),
    "regurgitation": (
        "Prompt each device's personalised model (greedy, {tokens} new tokens) with the prefix of train "
        "tasks whose raw text held planted PII, up to the PII, and with the canary prefix; count planted "
        "values that appear verbatim in the generations. Generations are re-scrubbed on the device before "
        "anything about them is stored."
    ),
}

EXPOSURE_REFERENCES = 499
REGURGITATION_TOKENS = 20


def _pii_record_ids(view: RunView, user: dict) -> set[str]:
    return {row["record_id"] for row in view.sidecar if row["user_id"] == user["user_id"]}


def _task_pairs(view: RunView, user: dict, split: str, exclude: set[str]) -> list[tuple[str, str]]:
    """Raw (input, output) of a split's tasks, minus ``exclude``d ids (PII-free raw text is what trained)."""
    return [
        (r["input"], r["output"])
        for r in view.raw_records(user)
        if r["type"] == "task" and r["split"] == split and r["id"] not in exclude
    ]


# --------------------------------------------------------------------------- canaries


def canary_exposure(
    view: RunView, references: int = EXPOSURE_REFERENCES, stacks: tuple[str, ...] = ("global", "persona", "personal"), other_device: bool = True
) -> dict:
    canaried = [u for u in view.participants if u.get("canary")]
    if not canaried:
        return {"canaries": 0, "rows": []}
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
            for stack in ("global", "persona", "personal"):
                row[stack] = round(exposure(*_split(view.record_nll(pairs, stack, batch_size=64))), 3) if stack in stacks else None
            row["reference_base"] = round(exposure(*_split(view.record_nll(pairs, "base", batch_size=64))), 3)
        # Another device's personalised model: trained on the same shared tiers
        # but never on this canary (prefer a frequent user, like the canary's).
        others = sorted((u for u in view.participants if not u.get("canary")), key=lambda u: u["volume"] != "frequent")
        row["reference_other_device"] = None
        if others and other_device:
            with view.device(others[0]):
                row["reference_other_device"] = round(exposure(*_split(view.record_nll(pairs, "personal", batch_size=64))), 3)
        rows.append(row)
    keys = ("global", "persona", "personal", "reference_base", "reference_other_device")
    summary = {k: round(statistics.fmean(r[k] for r in rows), 3) if all(r[k] is not None for r in rows) else None for k in keys}
    return {
        "canaries": len(rows),
        "max_exposure_bits": round(math.log2(references + 1), 3),
        "mean": summary,
        "rows": rows,
        "scrub_mode": view.config.get("scrub-mode"),
    }


def _split(nll: list[float]) -> tuple[float, list[float]]:
    return nll[0], nll[1:]


# --------------------------------------------------------------------------- membership inference


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


def membership_inference(view: RunView, members_per_user: int | None = 8) -> dict:
    cfg = view.config
    members, nonmembers = [], []
    for user in view.participants:
        exclude = _pii_record_ids(view, user) | {r["id"] for r in view.raw_records(user) if r["type"] == "task" and r["id"].startswith("c")}
        train = _sample(_task_pairs(view, user, "train", exclude), members_per_user, f"mia:{user['user_id']}")
        test = _task_pairs(view, user, "test", set())
        with view.device(user):
            for pairs, out in ((train, members), (test, nonmembers)):
                base = view.record_nll(pairs, "base")
                personal = view.record_nll(pairs, "personal")
                out += [b - p for b, p in zip(base, personal)]
    record = _attack_summary(members, nonmembers, float(cfg["delta"]))
    eps = [u["epsilon_record_level"] for u in view.report["users"]]
    formal = None if (not cfg.get("dp") or any(e is None for e in eps)) else max(eps)
    record["formal_epsilon"] = formal
    record["delta"] = float(cfg["delta"])
    record["bound_exceeds_formal"] = formal is not None and record["empirical_epsilon_lower_bound"] > formal

    user_level = None
    if view.holdouts:
        scores = {"member": [], "nonmember": []}
        for user in [*view.participants, *view.holdouts]:
            pairs = _sample(_task_pairs(view, user, "train", _pii_record_ids(view, user)), members_per_user, f"umia:{user['user_id']}")
            with view.device(user):
                base = view.record_nll(pairs, "base")
                shared = view.record_nll(pairs, "persona")
            scores["nonmember" if user.get("holdout") else "member"].append(statistics.fmean(b - s for b, s in zip(base, shared)))
        ul = view.report.get("user_level", {})
        user_level = _attack_summary(scores["member"], scores["nonmember"], float(cfg.get("user-delta", 1e-3)))
        formal_user = max(ul["epsilon_per_round"].values()) if ul.get("dp") and ul.get("epsilon_per_round") else None
        user_level.update(
            {
                "formal_epsilon": formal_user,
                "delta": float(cfg.get("user-delta", 1e-3)),
                "bound_exceeds_formal": formal_user is not None and user_level["empirical_epsilon_lower_bound"] > formal_user,
            }
        )
    return {"record_level": record, "user_level": user_level}


# --------------------------------------------------------------------------- regurgitation


def regurgitation(view: RunView, per_user: int = 2, tokens: int = REGURGITATION_TOKENS) -> dict:
    """Planted PII (and canaries) that the personalised models reproduce from a prefix."""
    from client.device import scrubber

    prompts = 0
    hits = {"pii": 0, "canary": 0}
    rescrub_entities = 0
    mode = str(view.config.get("scrub-mode", "full"))
    # Only the number of entities found is kept, so the operator is "tag"
    # whatever the run used (pseudonyms would need each device's secret).
    rescrub = scrubber("patterns" if mode == "off" else mode, "tag",
                       str(view.config.get("scrub-config", "")))
    for user in view.participants:
        raw = {r["id"]: r for r in view.raw_records(user) if r["type"] == "task" and r["split"] == "train"}
        spans = [row for row in view.sidecar if row["user_id"] == user["user_id"] and row["field"] == "output" and row["record_id"] in raw]
        spans = [s for s in spans if not s["record_id"].startswith("c")][:per_user]
        jobs = [(raw[s["record_id"]]["input"] + "\n" + raw[s["record_id"]]["output"][: s["start"]], s["value"], "pii") for s in spans]
        if user.get("canary"):
            jobs.append((CANARY_INPUT + "\n" + CANARY_PREFIX, user["canary"], "canary"))
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
    }
