"""One-run DP audit on randomly included canaries (Steinke, Nasr & Jagielski 2023, NeurIPS).

The generator gave each canary user ``m`` random audit phrases and put each
one in that user's train data independently with probability 1/2; the coins
come from OS entropy and only ``manifest.json`` records them (no device or
server reads it). After training, every phrase, included or not, is scored on
its own device's personalised model (NLL under the base model minus NLL under
global + persona + user: higher means "more likely trained on"). The auditor
guesses "included" for the ``k+`` highest scores and "excluded" for the ``k-``
lowest, abstains on the rest, and counts correct guesses. Because the coins
are independent fair flips, a device that is (eps, delta)-DP for each of its
records cannot make many more guesses correct than eps-randomized response
would; :func:`~simulations.audits.stats.one_run_epsilon` turns the count into a
lower bound on eps at confidence 1 - beta.

One test per canary device against that device's own record-level epsilon
(``report.json``'s ``users``), and one pooled over the canary devices against
the largest of theirs (a canary only touches its own device, so each canary is
covered by that device's epsilon). Each test tries the guess rules in
:data:`GUESS_RULES`; beta is split over tests and rules (Bonferroni), so the
chance that a correct DP implementation fails this audit is at most beta.

It fails only when a certified lower bound exceeds the formal epsilon: a DP
bug. A pass is **not** evidence that DP holds: the largest epsilon these sizes
can certify (every guess correct) is reported next to the formal one (where it
is below, that test cannot fail at all), and a weak attack certifies ~0 and
passes trivially.
"""

from __future__ import annotations

import math

import numpy as np

from simulations.audits.base import Audit, AuditContext, register, skipped
from simulations.audits.report_html import Plot, Section, format_epsilon, line_chart
from simulations.audits.stats import one_run_epsilon, one_run_guesses, one_run_max_epsilon, roc_auc

BETA = 0.05  # the audit's total false-failure probability
# (share of canaries guessed "included", share guessed "excluded"): guess on
# every canary (a strong attack), or only the top quarter "included" (an attack
# that memorised a few of the canaries it sampled).
GUESS_RULES = ((0.5, 0.5), (0.25, 0.0))
CURVE_CANARIES = (50, 100, 500, 1000)


def guess_counts(m: int) -> list[tuple[int, int]]:
    """(k+, k-) of each rule in :data:`GUESS_RULES` for ``m`` canaries (never more than m guesses)."""
    rules = []
    for plus, minus in GUESS_RULES:
        k_plus = max(1, math.floor(plus * m))
        rules.append((k_plus, min(math.floor(minus * m), m - k_plus)))
    return rules


def certifiable_curve(canaries=CURVE_CANARIES, beta: float = BETA, delta: float = 1e-5) -> list[dict]:
    """The largest epsilon a one-run audit of ``m`` canaries can certify at confidence 1 - beta, per m.

    Every canary guessed and every guess correct (the best any attack can do),
    one test, delta as given. For the numbers in ``docs/results.md``.
    """
    return [{"canaries": m, "beta": beta, "delta": delta, "max_epsilon": round(one_run_max_epsilon(m, delta, beta), 3)} for m in canaries]


def _floor(value: float, digits: int = 4) -> float:
    """A lower bound rounded down (rounding must never raise it)."""
    return math.floor(value * 10**digits) / 10**digits


def _test(label: str, scores: np.ndarray, included: np.ndarray, formal: float | None, delta: float, beta: float) -> dict:
    """One audit test: each guess rule at level ``beta``, the best bound, and the largest certifiable."""
    m = int(scores.size)
    rules = []
    for k_plus, k_minus in guess_counts(m):
        guesses = one_run_guesses(scores, k_plus, k_minus)
        r = int(np.count_nonzero(guesses))
        v = int(np.sum((guesses == 1) & included) + np.sum((guesses == -1) & ~included))
        rules.append({"k_plus": k_plus, "k_minus": k_minus, "guesses": r, "correct": v, "epsilon_lower_bound": _floor(one_run_epsilon(m, r, v, delta, beta))})
    best = max(rules, key=lambda x: x["epsilon_lower_bound"])
    bound = best["epsilon_lower_bound"]
    return {
        "test": label,
        "canaries": m,
        "included": int(included.sum()),
        "guesses": best["guesses"],
        "correct": best["correct"],
        "epsilon_lower_bound": bound,
        "max_certifiable_epsilon": round(max(one_run_max_epsilon(m, delta, beta, x["guesses"]) for x in rules), 4),
        "formal_epsilon": formal,
        "exceeds_formal": formal is not None and bound > formal,
        "auc": round(roc_auc(scores[included], scores[~included]), 4) if 0 < included.sum() < m else None,
        "rules": rules,
    }


def _score_device(view, user: dict) -> tuple[np.ndarray, np.ndarray, dict]:
    """Scores (NLL_base - NLL_personal) of every audit canary on its own device, the coins, and a store check."""
    canaries = user["audit_canaries"]
    pairs = [(c["input"], c["output"]) for c in canaries]
    included = np.array([bool(c["included"]) for c in canaries])
    with view.device(user) as store:
        base = view.record_nll(pairs, "base", batch_size=64)
        personal = view.record_nll(pairs, "personal", batch_size=64)
        trained = set(store.tasks("train"))
    in_store = np.array([p in trained for p in pairs])
    check = {
        # Included phrases the device stored verbatim (scrubbing left them alone),
        # and excluded phrases it holds anyway (must be 0: the design's premise).
        "included_in_store": int(np.sum(in_store & included)),
        "excluded_in_store": int(np.sum(in_store & ~included)),
    }
    return np.asarray(base) - np.asarray(personal), included, check


def one_run_audit(view, beta: float = BETA) -> dict:
    devices = [u for u in view.participants if u.get("audit_canaries")]
    if not devices:
        return skipped("no audit canaries (manifest.json lists none): only a run on generated data with audit-canaries > 0 has them")
    delta, dp = float(view.config["delta"]), bool(view.config["dp"])
    reported = view.reported()
    scored, notes = [], []
    for user in devices:
        row = reported.get(user["user_index"], {})
        if not row.get("evaluated"):
            notes.append(f"device {user['user_index']} reported no epsilon (never evaluated); its canaries are not audited")
            continue
        formal = row.get("epsilon_record_level")  # None: no DP-SGD, epsilon = inf
        scores, included, check = _score_device(view, user)
        scored.append((user, scores, included, None if formal is None else float(formal), check))
    if not scored:
        return skipped("no canary device reported an epsilon (none evaluated)")
    groups = [(f"device {u['user_index']}", s, inc, f) for u, s, inc, f, _ in scored]
    if len(scored) > 1:
        formals = [f for *_, f, _ in scored]
        pooled_formal = None if any(f is None for f in formals) else max(formals)
        groups.append(("all canary devices", np.concatenate([s for _, s, *_ in scored]), np.concatenate([i for _, _, i, *_ in scored]), pooled_formal))
    beta_each = beta / (len(groups) * len(GUESS_RULES))
    tests = [_test(label, s, inc, f, delta, beta_each) for label, s, inc, f in groups]
    checks = [{"user_index": u["user_index"], "user_id": u["user_id"], **c} for u, *_, c in scored]
    if not dp:
        notes.append("DP-SGD is off (epsilon = inf): there is no formal epsilon to exceed")
    return {
        "beta": beta,
        "beta_per_test": beta_each,
        "delta": delta,
        "tests": tests,
        "store_checks": checks,
        "curve": certifiable_curve(beta=beta, delta=delta),
        "notes": notes,
    }


@register
class OneRunAudit(Audit):
    name = "one_run"
    title = "One-run DP audit (randomly included canaries)"
    level = "fast"
    order = 35
    method = (
        "One-run privacy audit (Steinke, Nasr & Jagielski 2023, 'Privacy Auditing with One (1) Training Run'). "
        "The generator gave each canary user m random phrases of a fixed shape ('the kettle, the pebble, ...') "
        "and put each one in that user's training data independently with probability 1/2 (coins from OS "
        "entropy, recorded only in the generator's manifest, which no device or server reads). After training, "
        "every phrase, included or not, is scored on its own device's personalised model: score = NLL under "
        "the base model - NLL under global + persona + user. The auditor guesses 'included' for the k+ highest "
        "scores and 'excluded' for the k- lowest (rules: every canary, k+ = k- = m/2; or the top quarter "
        "only, k+ = m/4, k- = 0) and counts correct guesses. For an (eps, delta)-DP device, P[at least v of r "
        "guesses correct] <= P[Binomial(r, e^eps/(1+e^eps)) >= v] + 2 m delta max_i P[v-i <= Binomial < v]/i; "
        "the certified lower bound is the largest eps this rejects at confidence 1 - beta, with beta = 0.05 "
        "split over the tests (each canary device against its own record-level epsilon, and all canary "
        "devices pooled against the largest of theirs) and the rules. The audit FAILS only if a certified "
        "lower bound exceeds the formal epsilon, which means a DP bug. A PASS IS NOT EVIDENCE THAT DP HOLDS: "
        "a weak attack certifies ~0 and passes trivially, and even a perfect attack cannot certify more than "
        "the 'largest certifiable' column (every guess correct): where that is below the formal epsilon the "
        "test cannot fail at all, whatever the implementation does. "
        "Membership of the persona records themselves is in the separate membership-signal measurement, "
        "which makes no epsilon claim."
    )
    criterion = "no certified epsilon lower bound above the device's formal epsilon (a pass does not show DP holds)"

    def run(self, ctx: AuditContext) -> dict:
        return one_run_audit(ctx.view)

    def failure(self, result: dict) -> str | None:
        over = [f"{t['test']}: certified eps >= {t['epsilon_lower_bound']} > formal {t['formal_epsilon']:.3f}" for t in result["tests"] if t["exceeds_formal"]]
        leaked = [c["user_index"] for c in result["store_checks"] if c["excluded_in_store"]]
        if leaked:
            over.append(f"excluded audit canaries found in the training data of devices {leaked} (the audit's premise is broken)")
        return "; ".join(over) or None

    def summary(self, result: dict) -> str:
        return "; ".join(
            f"{t['test']}: {t['correct']}/{t['guesses']} correct, eps >= {t['epsilon_lower_bound']} "
            f"(at most {t['max_certifiable_epsilon']} certifiable; formal {format_epsilon(t['formal_epsilon'])})"
            for t in result["tests"]
        )

    def section(self, result: dict, ctx: AuditContext) -> Section:
        header = ["test", "canaries", "included", "guesses", "correct", "certified eps (lower bound)", "largest certifiable eps", "formal eps", "AUC (in vs out)", "exceeds formal?"]
        rows = [
            [t["test"], t["canaries"], t["included"], t["guesses"], t["correct"], t["epsilon_lower_bound"], t["max_certifiable_epsilon"], format_epsilon(t["formal_epsilon"]), t["auc"], "YES - a DP bug" if t["exceeds_formal"] else "no"]
            for t in result["tests"]
        ]
        checks = [[c["user_index"], c["included_in_store"], c["excluded_in_store"]] for c in result["store_checks"]]
        curve = [[c["canaries"], c["max_epsilon"]] for c in result["curve"]]
        tables = [
            (f"Tests at beta = {result['beta']} in all ({result['beta_per_test']:.4f} per test and rule), delta = {result['delta']}", header, rows),
            ("Canaries in each device's store (scrubbing must leave included ones alone; excluded ones must be absent)", ["device", "included, stored verbatim", "excluded, found in store"], checks),
            (f"Largest certifiable epsilon by number of canaries (one test, all guessed and correct, beta = {result['beta']})", ["canaries", "largest certifiable eps"], curve),
        ]
        ms = [c["canaries"] for c in result["curve"]]
        series = {"largest certifiable eps": (ms, [c["max_epsilon"] for c in result["curve"]])}
        formals = [t["formal_epsilon"] for t in result["tests"] if t["formal_epsilon"] is not None]
        if formals:
            series["formal eps (largest canary device)"] = (ms, [max(formals)] * len(ms))
        chart = line_chart(series, title="what a one-run audit can certify", xlabel="canaries", ylabel="epsilon", logx=True)
        note = " ".join(result["notes"])
        return Section(self.section_id, self.title, self.method, tables, [Plot("largest certifiable epsilon vs number of canaries (beta = 0.05)", chart)], note=note)
