"""Built-in audits that read a finished simulation run (orchestrated by :func:`run_audits`).

The attacks live in ``audit_privacy.py`` (canary exposure, membership
inference, PII regurgitation) and ``audit_bias.py`` (disparity, DP disparate
impact, counterfactual swaps, degree of personalization); the page in
``audit_html.py``. This module holds the two bookkeeping audits:

* **epsilon ledger**: for every user, recompute the record-level epsilon from the
  mechanism parameters the device logged (its accountant history: noise
  multiplier, sampling rate, steps) through an *independent* implementation
  (Google's dp-accounting, where the device used Opacus), and the user-level
  epsilon (Opacus' RDP analysis, where the server used Flower's accountant). Any
  disagreement beyond tolerance fails the audit loudly.
* **wire audit**: every message a client sent during the run was recorded in
  Flower's protobuf wire format (``wire-audit=true``). Scan those bytes for every
  planted PII string, in UTF-8 and UTF-16 and as the model's token-id sequences
  (int32 and int64). The expected count is zero.

The orchestrator can read the device stores because a simulation holds every
device on one machine; on a real deployment each device would run its own
ledger check.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np

LEDGER_TOLERANCE = 0.05  # relative; the two RDP implementations use the same orders
OPACUS_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))


class AuditFailure(RuntimeError):
    pass


def _timed(timings: dict, name: str, fn, *args):
    started = time.perf_counter()
    try:
        return fn(*args)
    finally:
        timings[name] = time.perf_counter() - started


def record_level_epsilon_independent(history: list[list[float]], delta: float) -> float:
    """Record-level epsilon of an Opacus accountant history, via dp-accounting."""
    import logging

    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    # dp-accounting logs each RDP order it cannot evaluate and then excludes it;
    # epsilon is the minimum over the remaining orders, so this is noise here.
    logging.getLogger("absl").setLevel(logging.ERROR)
    acc = RdpAccountant(OPACUS_ORDERS)
    for noise, rate, steps in history:
        acc.compose(dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(noise)), int(steps))
    return float(acc.get_epsilon(delta))


def epsilon_ledger(run_dir: Path) -> dict:
    from client.device import ACCOUNTANT
    from client.store import DeviceStore

    run_dir = Path(run_dir)
    report = json.loads((run_dir / "report.json").read_text())
    cfg = report["config"]
    delta = float(cfg["delta"])
    stores = sorted(Path(cfg["store-dir"]).glob("*.sqlite"))
    reported = {u["user_index"]: u["epsilon_record_level"] for u in report["users"]}
    rows, failures = [], []
    for index, path in enumerate(stores):
        blob = DeviceStore(path).get_state(ACCOUNTANT)
        history = json.loads(blob.decode()) if blob else []
        independent = record_level_epsilon_independent(history, delta) if history else 0.0
        claimed = reported.get(index)
        ok = (claimed is None and not cfg["dp"]) or (
            claimed is not None and math.isclose(claimed, independent, rel_tol=LEDGER_TOLERANCE, abs_tol=1e-9)
        )
        rows.append(
            {
                "user_index": index,
                "delta": delta,
                "mechanism": [{"noise_multiplier": h[0], "sample_rate": h[1], "steps": int(h[2])} for h in history],
                "epsilon_reported": claimed,
                "epsilon_independent": independent,
                "agrees": ok,
            }
        )
        if not ok:
            failures.append(index)
    user = report.get("user_level", {})
    user_row = None
    if user.get("dp"):
        from common.dp import independent_user_epsilon

        per_round = user["epsilon_per_round"]
        last = per_round[max(per_round, key=int)] if per_round else 0.0
        again = independent_user_epsilon(float(user["noise_multiplier"]), len(per_round), float(user["delta"]), float(user.get("sample_rate", 1.0)))
        user_row = {"epsilon_reported": last, "epsilon_independent": again, "agrees": math.isclose(last, again, rel_tol=LEDGER_TOLERANCE)}
        if not user_row["agrees"]:
            failures.append("user-level")
    return {"record_level": rows, "user_level": user_row, "failures": failures}


# --------------------------------------------------------------------------- #
# Wire audit
# --------------------------------------------------------------------------- #


def _needles(values: list[str], tokenizer) -> list[bytes]:
    out = []
    for value in values:
        out.append(value.encode("utf-8"))
        out.append(value.encode("utf-16-le"))
        out.append(value.encode("utf-16-be"))
        if tokenizer is not None:
            ids = tokenizer(value, add_special_tokens=False)["input_ids"]
            if len(ids) >= 2:  # one token id alone is far too common to mean anything
                out.append(np.asarray(ids, dtype="<i4").tobytes())
                out.append(np.asarray(ids, dtype="<i8").tobytes())
    return out


class NeedleFinder:
    """Count occurrences of many byte strings in a blob, in one vectorised pass.

    Every 4-byte window of the blob is read as a uint32 and matched against the
    needles' 4-byte prefixes with ``np.isin``; only those rare candidate
    positions get an exact comparison. (A regex alternation of ~2,000 needles
    tries each one at every position and takes minutes on a run's wire.)
    """

    def __init__(self, needles: list[bytes]):
        if any(len(n) < 4 for n in needles):
            raise ValueError("needles must be at least 4 bytes long")
        self.by_prefix: dict[int, list[bytes]] = {}
        for n in needles:
            self.by_prefix.setdefault(int.from_bytes(n[:4], "little"), []).append(n)
        self.prefixes = np.array(sorted(self.by_prefix), dtype=np.uint32)

    def count(self, blob: bytes) -> int:
        if len(blob) < 4:
            return 0
        b = np.frombuffer(blob, dtype=np.uint8).astype(np.uint32)
        windows = b[:-3] | (b[1:-2] << 8) | (b[2:-1] << 16) | (b[3:] << 24)
        hits = 0
        for pos in np.flatnonzero(np.isin(windows, self.prefixes)):
            hits += sum(blob.startswith(n, int(pos)) for n in self.by_prefix[int(windows[pos])])
        return hits


def wire_audit(run_dir: Path, tokenizer=None) -> dict:
    run_dir = Path(run_dir)
    report = json.loads((run_dir / "report.json").read_text())
    data_dir = Path(report["config"]["data-dir"])
    sidecar = data_dir / "pii_sidecar.jsonl"
    planted = sorted({json.loads(line)["value"] for line in sidecar.read_text().splitlines() if line.strip()})
    messages = sorted((run_dir / "wire").glob("*.bin"))
    if not messages:
        raise AuditFailure(f"no recorded messages under {run_dir / 'wire'}: run with --set wire-audit=true")
    needles = sorted(set(_needles(planted, tokenizer)))
    finder = NeedleFinder(needles)
    hits, scanned = 0, 0
    for path in messages:
        blob = path.read_bytes()
        scanned += len(blob)
        hits += finder.count(blob)
    return {
        "messages": len(messages),
        "bytes_scanned": scanned,
        "planted_values": len(planted),
        "patterns": len(set(needles)),
        "encodings": ["utf-8", "utf-16-le", "utf-16-be"] + (["token-ids int32", "token-ids int64"] if tokenizer else []),
        "hits": hits,
    }


# Scoring a record on SmolLM2 costs ~0.1 s on two cores, so the levels trade
# sample sizes for time: "fast" fits the end of `make demo`, "full" is for the
# figures (benchmarks/audit_figures.py).
LEVELS = {
    "fast": {"exposure_references": 63, "exposure_stacks": ("global", "personal"), "other_device": False, "mia": False, "generation": False},
    "full": {"exposure_references": 199, "exposure_stacks": ("global", "persona", "personal"), "other_device": True, "mia": True, "generation": True},
}


def run_audits(run_dir: Path, level: str = "full", baseline: Path | None = None, compare: list[Path] = ()) -> dict:
    """Run the audits on a finished run; write ``audit.json`` and ``report.html``.

    * both levels: the epsilon ledger, the wire audit (if the wire was
      recorded), canary exposure and utility disparity (and DP disparate
      impact against a non-private ``baseline`` run);
    * ``full``: more exposure candidates and models, membership inference,
      and the audits that generate text (PII regurgitation, counterfactual
      swaps, degree of personalization);
    * ``compare``: other audited runs for the privacy-utility chart.

    Raises :class:`AuditFailure` when the ledger disagrees, the wire audit finds
    planted PII, or a membership attack's empirical epsilon bound exceeds the
    formal epsilon (which would mean a bug in the DP machinery or accounting).
    """
    from simulations import audit_bias, audit_privacy
    from simulations.audit_html import write_html
    from simulations.audit_view import RunView

    if level not in LEVELS:
        raise ValueError(f"audit level must be one of {sorted(LEVELS)}")
    opts = LEVELS[level]
    run_dir = Path(run_dir)
    report = json.loads((run_dir / "report.json").read_text())
    timings = {}
    started = time.perf_counter()
    result = {"level": level, "ledger": epsilon_ledger(run_dir)}
    view = RunView(run_dir)
    if (run_dir / "wire").is_dir():
        result["wire"] = wire_audit(run_dir, view.tokenizer)
    timings["ledger+wire"] = time.perf_counter() - started
    result["exposure"] = _timed(timings, "exposure", audit_privacy.canary_exposure, view, opts["exposure_references"], opts["exposure_stacks"], opts["other_device"])
    result["disparity"] = audit_bias.disparity_audit(view)
    if baseline is not None:
        result["dp_impact"] = audit_bias.dp_impact(view, RunView(baseline))
    if opts["mia"]:
        result["membership_inference"] = _timed(timings, "membership_inference", audit_privacy.membership_inference, view)
    if opts["generation"]:
        result["regurgitation"] = _timed(timings, "regurgitation", audit_privacy.regurgitation, view)
        result["counterfactual"] = _timed(timings, "counterfactual", audit_bias.counterfactual_swaps, view)
        result["personalization"] = _timed(timings, "personalization", audit_bias.degree_of_personalization_audit, view)
    result["seconds"] = {k: round(v, 1) for k, v in timings.items()}
    (run_dir / "audit.json").write_text(json.dumps(result, indent=2, default=str))
    others = [(Path(c).name, json.loads((Path(c) / "report.json").read_text()), json.loads((Path(c) / "audit.json").read_text())) for c in compare]
    write_html(run_dir, report, result, others)
    if result["ledger"]["failures"]:
        raise AuditFailure(f"epsilon ledger disagrees for {result['ledger']['failures']}; see {run_dir / 'audit.json'}")
    if result.get("wire", {}).get("hits"):
        raise AuditFailure(f"wire audit found {result['wire']['hits']} planted PII occurrence(s) in sent messages")
    for level, m in (result.get("membership_inference") or {}).items():
        if m and m["bound_exceeds_formal"]:
            raise AuditFailure(f"{level} membership attack: empirical epsilon {m['empirical_epsilon_lower_bound']} exceeds the formal {m['formal_epsilon']}")
    return result
