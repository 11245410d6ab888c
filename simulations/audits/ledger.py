"""The epsilon ledger: every device's mechanism derived independently, checked against its accountant, and recomputed twice.

* **record level**, for every device listed in the harness's ``config.json``:

  - the **expected** mechanism, from nothing the device reported about its
    privacy: the noise multiplier of the run config (``noise-multiplier``; a
    device may only refuse a lower one), the Poisson rate
    ``client.accounting.sample_rate(train config, records)`` with the number of
    train records in its store, ``local-steps`` steps per round, and the rounds
    it trained, from its own diagnostics (``DIAGNOSTICS``) cross-checked
    against the server's log (``report.json["server"]["rounds"]``): a device
    cannot have trained in a round the server did not run, and in every round
    the number of devices whose diagnostics say they trained must equal the
    server's count of contributions;
  - the expected history must equal the history the device's Opacus
    accountant kept (``(noise multiplier, sampling rate, steps)``, entry by
    entry, consecutive equal mechanisms merged as Opacus merges them);
  - epsilon of the expected history is recomputed with Google's dp-accounting,
    both its RDP accountant (the analysis Opacus uses, so the reported epsilon
    must agree with it within :data:`LEDGER_TOLERANCE`) and its PLD accountant
    (tight up to discretisation: it must not exceed RDP's by more than
    :data:`PLD_SLACK`, and the reported epsilon must not be below it by more
    than the tolerance: a reported epsilon that is too small is the dangerous
    direction);

* **user level**: the server's per-round epsilon (``server.json``'s
  ``user_level``, Flower's accountant) recomputed with Opacus' RDP analysis
  and with dp-accounting's PLD accountant.

Any failed check fails the audit. The orchestrator can read the device
stores because a simulation holds every device on one machine; on a real
deployment each device would run its own ledger check.
"""

from __future__ import annotations

import functools
import dataclasses
import math
from pathlib import Path

from simulations.audits.base import Audit, AuditContext, register
from simulations.audits.report_html import Plot, Section, bar_chart, format_epsilon

LEDGER_TOLERANCE = 0.05  # relative; the two RDP implementations use the same orders
PLD_SLACK = 0.02  # relative: PLD (pessimistic, discretised) may exceed RDP by this much at most
PLD_DISCRETISATION = 1e-3  # dp-accounting's value_discretization_interval (1e-4: ~10x slower, same to 3 decimals here)
# Opacus' default RDP orders (RDPAccountant.DEFAULT_ALPHAS), written out: the ledger recomputes
# with dp-accounting and must not take them from the accountant it checks.
OPACUS_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
Mechanism = tuple[float, float, int]  # (noise multiplier, sampling rate, steps)


def _quiet_absl() -> None:
    import logging

    # dp-accounting logs each RDP order it cannot evaluate and then excludes it;
    # epsilon is the minimum over the remaining orders, so this is noise here.
    logging.getLogger("absl").setLevel(logging.ERROR)


def _event(noise: float, rate: float):
    import dp_accounting

    gaussian = dp_accounting.GaussianDpEvent(noise)
    return gaussian if rate >= 1.0 else dp_accounting.PoissonSampledDpEvent(rate, gaussian)


def record_level_epsilon_independent(history: list, delta: float) -> float:
    """Epsilon of an Opacus accountant history via dp-accounting's RDP accountant (Opacus' orders)."""
    from dp_accounting.rdp import RdpAccountant

    _quiet_absl()
    acc = RdpAccountant(OPACUS_ORDERS)
    for noise, rate, steps in history:
        acc.compose(_event(noise, rate), int(steps))
    return float(acc.get_epsilon(delta))


@functools.lru_cache(maxsize=256)
def _pld_epsilon(history: tuple[Mechanism, ...], delta: float) -> float:
    from dp_accounting.pld import PLDAccountant

    acc = PLDAccountant(value_discretization_interval=PLD_DISCRETISATION)
    for noise, rate, steps in history:
        acc.compose(_event(noise, rate), int(steps))
    return float(acc.get_epsilon(delta))


def pld_epsilon(history: list, delta: float) -> float:
    """Epsilon of a (noise, rate, steps) history via dp-accounting's PLD accountant (0 for no steps).

    Cached: devices with the same number of records share a mechanism.
    """
    history = tuple((float(z), float(q), int(n)) for z, q, n in history)
    return _pld_epsilon(history, float(delta)) if history else 0.0


def merged(history: list) -> list[Mechanism]:
    """Consecutive entries with the same (noise, rate) folded into one, as Opacus' accountant keeps them."""
    out: list[Mechanism] = []
    for noise, rate, steps in history:
        if out and math.isclose(out[-1][0], noise, rel_tol=1e-9) and math.isclose(out[-1][1], rate, rel_tol=1e-9):
            out[-1] = (out[-1][0], out[-1][1], out[-1][2] + int(steps))
        else:
            out.append((float(noise), float(rate), int(steps)))
    return out


def expected_history(noise: float, rate: float, steps_per_round: int, rounds: int) -> list[Mechanism]:
    """The DP-SGD mechanism a device must have run: ``steps_per_round`` Poisson-sampled Gaussian steps per round trained."""
    return merged([(noise, rate, steps_per_round)] * rounds)


def _same_mechanism(a: list, b: list) -> bool:
    a, b = merged(a), merged(b)
    return len(a) == len(b) and all(
        math.isclose(za, zb, rel_tol=1e-9) and math.isclose(qa, qb, rel_tol=1e-9) and int(na) == int(nb)
        for (za, qa, na), (zb, qb, nb) in zip(a, b)
    )


def _device_state(store_path: Path) -> tuple[list, int, list[int], list[int], list[int]]:
    """(accountant history, train records, rounds its diagnostics say it trained, rounds it sent an update in,
    rounds it was drawn in and declined DP-SGD).

    Under secure aggregation with client sampling a device joins every round
    but trains only in the rounds it drew itself; the others carry a zero update.
    A device served a shared stack under ``shared-stack-dp-sgd = false`` sends a
    zero update in every round it is drawn, having released its phrases in the first.
    """
    from client import device
    from client.store import DeviceStore
    from client.accounting import accountant_history

    if not store_path.is_file():
        return [], 0, [], [], []
    store = DeviceStore(store_path)
    rounds = device.get_json(store, device.DIAGNOSTICS, {"rounds": {}})["rounds"]
    joined = sorted(int(r) for r in rounds)
    trained = sorted(int(r) for r, e in rounds.items() if e.get("sampled", True))
    declined = sorted(int(r) for r, e in rounds.items() if e.get("declined", False))
    return accountant_history(device.accountant_state(store)), len(store.tasks("train")), trained, joined, declined


def device_target(train):
    """The settings a device calibrates with: the target epsilon, never above the cap."""
    if train.target_epsilon > 0 and train.max_epsilon > 0:
        return dataclasses.replace(train, target_epsilon=min(train.target_epsilon, train.max_epsilon))
    return train


def expected_noise(train, records: int, planned_rounds: int) -> float:
    """The noise multiplier a device should have trained with: the run's, or its calibration to the target epsilon.

    ``train`` is the device's resolved config (``client.accounting.resolve_release``).
    """
    from client.accounting import calibrated_noise

    if train.target_epsilon > 0:
        return calibrated_noise(device_target(train), records, planned_rounds)
    return train.noise_multiplier


def _record_row(view, user: dict, reported: dict | None, server_rounds: set[int]) -> dict:
    from client.accounting import phrase_step, resolve_release, runs_dp_sgd, sample_rate
    from simulations.run import device_policy

    # The accountant is read at delta less the phrase release's threshold share (client/context.py).
    delta = float(view.cfg.train.accountant_delta)
    history, records, rounds, joined, declined = _device_state(Path(user["store"]))
    # The release's noise follows the device's record count and policy floor, as on the device
    # (client.app._device_train_config); a simulated device's policy is the harness's.
    frequent_from = view.cfg.routing.frequent_from
    floor = device_policy(view.cfg, Path(user["store"]), Path(user["store"])).min_noise_multiplier
    train = resolve_release(device_target(view.cfg.train), records, frequent_from, floor)
    problems = []
    if runs_dp_sgd(train, records, frequent_from):
        rate = sample_rate(train, records)
        noise = expected_noise(train, records, view.cfg.federation.num_server_rounds)
        sgd = expected_history(noise, rate, train.local_steps, len(rounds)) if train.dp else []
        released = bool(sgd)  # a device that trained released its context phrases once, before its first step
        if declined:
            problems.append(f"declined DP-SGD in rounds {declined}, though a device with {records} records trains")
    else:
        # Served a shared stack, it runs no DP-SGD: the release alone, in the first round it was drawn.
        sgd, released = [], bool(declined)
    expected = merged(list(phrase_step(train)) + sgd) if released else []
    unknown = [r for r in rounds if r not in server_rounds]
    if unknown:
        problems.append(f"trained in rounds {unknown} that the server did not run")
    matches = _same_mechanism(history, expected)
    if not matches:
        problems.append(f"accountant history {merged(history)} is not the expected {expected}")
    rdp, pld = record_level_epsilon_independent(expected, delta), pld_epsilon(expected, delta)
    if pld > rdp * (1 + PLD_SLACK) + PLD_DISCRETISATION:
        problems.append(f"PLD epsilon {pld:.4f} above RDP epsilon {rdp:.4f}: implausible")
    row = {
        "user_index": user["user_index"],
        "delta": delta,
        "train_records": records,
        "rounds_trained": rounds,
        "rounds_joined": joined,
        "mechanism": [{"noise_multiplier": z, "sample_rate": q, "steps": int(n)} for z, q, n in history],
        "expected": [{"noise_multiplier": z, "sample_rate": q, "steps": n} for z, q, n in expected],
        "history_matches": matches,
        "epsilon_independent": record_level_epsilon_independent(history, delta) if history else 0.0,
        "epsilon_rdp": rdp,
        "epsilon_pld": pld,
    }
    if reported is None or not reported.get("evaluated"):
        # Nothing reported to compare (the device never stored a result); the mechanism is still checked.
        return {**row, "epsilon_reported": None, "problems": problems, "agrees": None if not problems else False}
    claimed = reported.get("epsilon_record_level")
    if claimed is None:
        if train.dp:
            problems.append("reported no epsilon (infinite) under DP-SGD")
    elif not train.dp:
        problems.append(f"reported epsilon {claimed} without DP-SGD")
    elif train.accountant == "rdp":
        if not math.isclose(claimed, rdp, rel_tol=LEDGER_TOLERANCE, abs_tol=1e-9):
            problems.append(f"reported epsilon {claimed:.4f} is not the RDP recomputation {rdp:.4f}")
        if claimed < pld * (1 - LEDGER_TOLERANCE) - 1e-9:
            problems.append(f"reported epsilon {claimed:.4f} is below the PLD recomputation {pld:.4f}")
    else:
        # Opacus' PRV accountant is a numerical privacy-loss-distribution analysis, like PLD.
        if not math.isclose(claimed, pld, rel_tol=LEDGER_TOLERANCE, abs_tol=1e-3):
            problems.append(f"reported PRV epsilon {claimed:.4f} is not the PLD recomputation {pld:.4f}")
    return {**row, "epsilon_reported": claimed, "problems": problems, "agrees": not problems}


def _round_checks(rows: list[dict], server_rows: list[dict]) -> list[dict]:
    """Per server round: its contributions against the devices whose diagnostics say they trained in it."""
    out = []
    for srow in server_rows:
        trained = sum(srow["round"] in r.get("rounds_joined", r["rounds_trained"]) for r in rows)
        # A device charges its accountant when it trains, before the server sees
        # anything, so updates the round then lost (an aborted secure sum, a
        # rejected or failed reply) leave devices charged for nothing: safe. The
        # dangerous direction, a contribution no device was charged for, never is.
        lost = srow.get("failed", 0) + srow.get("rejected", 0) + int(srow.get("privacy", {}).get("secure-sum", {}).get("aborted", 0.0) > 0)
        agrees = trained == srow["contributors"] or (lost > 0 and trained > srow["contributors"])
        out.append({"round": srow["round"], "contributions": srow["contributors"], "devices_trained": trained,
                    "charged_not_aggregated": max(0, trained - srow["contributors"]), "agrees": agrees})
    return out


def _user_level_row(user_level: dict) -> dict | None:
    from common.privacy.accounting import independent_user_epsilon

    if not user_level.get("dp"):
        return None
    per_round = user_level["epsilon_per_round"]
    last = per_round[max(per_round, key=int)] if per_round else 0.0
    z, delta, q = float(user_level["noise_multiplier"]), float(user_level["delta"]), float(user_level.get("sample_rate", 1.0))
    again = independent_user_epsilon(z, len(per_round), delta, q)
    pld = pld_epsilon([(z, q, len(per_round))], delta)
    problems = []
    if not math.isclose(last, again, rel_tol=LEDGER_TOLERANCE):
        problems.append(f"reported {last:.4f} is not the RDP recomputation {again:.4f}")
    if last < pld * (1 - LEDGER_TOLERANCE):
        problems.append(f"reported {last:.4f} is below the PLD recomputation {pld:.4f}")
    if pld > again * (1 + PLD_SLACK) + PLD_DISCRETISATION:
        problems.append(f"PLD {pld:.4f} above RDP {again:.4f}: implausible")
    return {"epsilon_reported": last, "epsilon_independent": again, "epsilon_pld": pld, "problems": problems, "agrees": not problems}


def epsilon_ledger(view) -> dict:
    server_rows = view.report["server"]["rounds"]
    reported = view.reported()
    rows = [_record_row(view, user, reported.get(user["user_index"]), {r["round"] for r in server_rows}) for user in view.participants]
    failures: list = [r["user_index"] for r in rows if r["agrees"] is False]
    rounds = _round_checks(rows, server_rows)
    failures += [f"round {r['round']}" for r in rounds if not r["agrees"]]
    user_row = _user_level_row(view.report["server"]["user_level"])
    if user_row is not None and not user_row["agrees"]:
        failures.append("user-level")
    return {"record_level": rows, "rounds": rounds, "user_level": user_row, "failures": failures}


def _mechanism(history: list[dict]) -> tuple[str, str, int]:
    """(noise multipliers, sampling rates, total steps) of a device's logged DP-SGD mechanism."""
    zs = sorted({round(h["noise_multiplier"], 4) for h in history})
    qs = sorted({round(h["sample_rate"], 4) for h in history})
    return ", ".join(map(str, zs)) or "-", ", ".join(map(str, qs)) or "-", sum(h["steps"] for h in history)


def _agrees(row: dict) -> str:
    if row["agrees"] is None:
        return "not reported (device never evaluated)"
    return "yes" if row["agrees"] else "NO: " + "; ".join(row["problems"])


@register
class EpsilonLedger(Audit):
    name = "ledger"
    title = "Epsilon ledger"
    level = "fast"
    order = 10
    method = (
        "Checks the mechanism, not only the arithmetic. For every device the expected DP-SGD mechanism is derived "
        "from nothing the device reported about its privacy: the run config's noise multiplier, the Poisson rate "
        "client.accounting.sample_rate(config, number of train records in the device's store), local-steps steps per "
        "round, and the rounds it trained from its own diagnostics, cross-checked against the server's log (no "
        "round the server did not run; in every round, as many devices trained as the server counted "
        "contributions, or more where the round lost updates: an aborted secure sum, a rejected or failed reply). That history must equal the one the device's Opacus accountant kept, entry by entry. "
        "Epsilon of the expected history is then recomputed with Google's dp-accounting, RDP (the analysis "
        f"Opacus uses: the reported epsilon must agree within {LEDGER_TOLERANCE:.0%}) and PLD (tight up to "
        f"discretisation: it must not exceed RDP by more than {PLD_SLACK:.0%}, and the reported epsilon must not "
        "be below it: too small an epsilon is the dangerous direction). The user-level epsilon is recomputed "
        "with Opacus' RDP analysis, where the server used Flower's accountant, and with dp-accounting's PLD."
    )
    criterion = (
        f"every device's accountant holds the expected mechanism, every round's contributions match the devices "
        f"that trained, and every reported epsilon is within {LEDGER_TOLERANCE:.0%} of the RDP recomputation and not below the PLD one"
    )

    def run(self, ctx: AuditContext) -> dict:
        return epsilon_ledger(ctx.view)

    def failure(self, result: dict) -> str | None:
        if result["failures"]:
            return f"epsilon ledger disagrees for {result['failures']}"
        return None

    def summary(self, result: dict) -> str:
        rows = result["record_level"]
        checked = sum(r["agrees"] is not None for r in rows)
        line = f"{checked} of {len(rows)} devices checked against their expected mechanism, {len(result['failures'])} disagreement(s)"
        if result["user_level"]:
            line += f"; user level {format_epsilon(result['user_level']['epsilon_reported'])}"
        return line

    def section(self, result: dict, ctx: AuditContext) -> Section:
        view = ctx.view
        rows = [
            [
                r["user_index"], r["delta"], r["train_records"], len(r["rounds_trained"]), *_mechanism(r["mechanism"]), *_mechanism(r["expected"]),
                view.config["max-grad-norm"], format_epsilon(r["epsilon_reported"]), f"{r['epsilon_rdp']:.3f}", f"{r['epsilon_pld']:.3f}", _agrees(r),
            ]
            for r in result["record_level"]
        ]
        header = [
            "user", "delta", "train records", "rounds trained", "z (accountant)", "q (accountant)", "steps (accountant)",
            "z (expected)", "q (expected)", "steps (expected)", "C", "reported (Opacus)", "RDP (dp-accounting)", "PLD (dp-accounting)", "agrees",
        ]
        tables = [("Record-level mechanism and epsilon per device", header, rows)]
        tables.append((
            "Server rounds against the devices' diagnostics",
            ["round", "contributions (server)", "devices that trained (diagnostics)", "agrees"],
            [[r["round"], r["contributions"], r["devices_trained"], r["agrees"]] for r in result["rounds"]],
        ))
        if result["user_level"]:
            u, ul = result["user_level"], view.report["server"]["user_level"]
            tables.append((
                f"User-level epsilon ({ul['sampling']})",
                ["delta", "z", "C", "rounds", "reported (Flower RdpAccountant)", "independent (Opacus RDP)", "PLD (dp-accounting)", "agrees"],
                [[ul["delta"], ul["noise_multiplier"], ul["clip_norm"], ul["rounds_run"], f"{u['epsilon_reported']:.3f}", f"{u['epsilon_independent']:.3f}", f"{u['epsilon_pld']:.3f}", _agrees(u)]],
            ))
        finite = [r for r in result["record_level"] if r["epsilon_reported"] is not None]
        figures = []
        if finite:
            chart = bar_chart([r["user_index"] for r in finite], [r["epsilon_reported"] for r in finite], title="record-level epsilon", ylabel="epsilon")
            figures.append(Plot("record-level epsilon per device", chart))
        return Section(self.section_id, self.title, self.method, tables, figures)
