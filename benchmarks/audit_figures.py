"""Issue #6's figures: the audits on the default dataset at record-level epsilon = inf and = 8.

Three runs of the default profile, each audited in full (``run_audits``):

* ``eps-inf``: DP-SGD off, scrubbing on;
* ``eps-inf-noscrub``: DP-SGD off, scrubbing off (``scrub-mode=off``), the
  control arm for canaries and regurgitation (canaries are PII-shaped, so
  scrubbing should remove them);
* ``eps-8``: DP-SGD with the noise multiplier that gives a typical frequent
  user (40 records, batch 6, 2 steps x 3 rounds) epsilon = 8 at delta = 1e-5;
  scrubbing on. Its DP disparate impact is measured against ``eps-inf``.

Reports per run: canary exposure (personalised model, mean over canaries, and
the base-model reference), the membership signal (AUC and TPR at 1% FPR, no
epsilon claim), the one-run audit's certified epsilon lower bound over all
canary devices with the largest epsilon its sizes can certify, wire-audit
hits, the worst-to-mean ratio of served NLL, and the regurgitation counts.
Then the largest epsilon a one-run audit can certify at 50, 100, 500 and 1000
canaries (beta = 0.05), which needs no run.

    python -m benchmarks.audit_figures            # default profile, ~40 min
    python -m benchmarks.audit_figures --quick    # tiny model, 3 users, 2 rounds
    python -m benchmarks.audit_figures --smoke    # tiny model, 3 users, 1 round, pattern scrubbing,
                                                  # fast audits, no eps-inf-noscrub arm (~1.5 min)

Last line: ``RESULT audit_figures key=value ...``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from benchmarks._common import SMOKE_PROFILE, SMOKE_SIM, add_size_flags, result_line
from common.config import RunConfig, build_config


def noise_for_record_epsilon(target: float, cfg: RunConfig, records: int = 40) -> float:
    """DP-SGD noise multiplier giving a ``records``-record user ``target`` epsilon over the run (the device's own calibration)."""
    import dataclasses

    from client.accounting import calibrated_noise, resolve_release

    train = resolve_release(dataclasses.replace(cfg.train, target_epsilon=target), records, cfg.routing.frequent_from)
    return round(calibrated_noise(train, records, cfg.federation.num_server_rounds), 3)


def _measured(result) -> dict:
    """An audit's result, or {} where it was skipped (or did not run)."""
    from simulations.audits.base import is_skipped

    return {} if not isinstance(result, dict) or is_skipped(result) else result


def _row(name: str, run: Path, audit: dict, report: dict) -> dict:
    ex = _measured(audit.get("exposure")).get("mean", {})
    mia = _measured(audit.get("membership_inference"))
    rec, usr = _measured(mia.get("record_level")), _measured(mia.get("user_level"))
    pooled = (_measured(audit.get("one_run")).get("tests") or [{}])[-1]
    wire, regurgitation = _measured(audit.get("wire")), _measured(audit.get("regurgitation"))
    eps = [u.get("epsilon_record_level") for u in report["users"] if u["evaluated"]]
    return {
        "run": name,
        "epsilon_max": None if not eps or None in eps else round(max(eps), 2),
        "epsilon_median": None if not eps or None in eps else round(sorted(eps)[len(eps) // 2], 2),
        "exposure_personal": ex.get("personal"),
        "exposure_global": ex.get("global"),
        "exposure_base_reference": ex.get("reference_base"),
        "mia_auc": rec.get("auc"),
        "mia_tpr_1pct": rec.get("tpr_at_1pct_fpr"),
        "one_run_eps_lb": pooled.get("epsilon_lower_bound"),
        "one_run_eps_max_certifiable": pooled.get("max_certifiable_epsilon"),
        "user_mia_auc": usr.get("auc"),
        "wire_hits": wire.get("hits"),
        "wire_bytes": wire.get("bytes_scanned"),
        "worst_to_mean": round(audit["disparity"]["overall"]["worst_to_mean"], 4),
        "served_nll": round(report["utility"]["served"]["nll"], 4),
        "regurgitated_pii": regurgitation.get("pii_hits"),
        "regurgitated_canaries": regurgitation.get("canary_hits"),
        "dp_impact_mean": _measured(audit.get("dp_impact")).get("mean_increase"),
    }


def main(argv=None) -> dict:
    from simulations.audits import run_audits
    from simulations.run import prepare, simulate

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_size_flags(ap, quick="tiny model, 3 users")
    ap.add_argument("--keep", type=Path, default=None, help="keep the run folders (with report.html) here")
    args = ap.parse_args(argv)
    profile, extra, level = "default", {}, "full"
    if args.quick:
        profile, extra = "quick", {"num-supernodes": 3}
    if args.smoke:
        # Fast audits only: the full level generates text and trains attack models.
        profile, extra, level = SMOKE_PROFILE, SMOKE_SIM, "fast"
    sigma8 = noise_for_record_epsilon(8.0, build_config(profile, extra))
    arms = [
        ("eps-inf", {"dp": False}),
        ("eps-inf-noscrub", {"dp": False, "scrub-mode": "off"}),
        ("eps-8", {"noise-multiplier": sigma8, "target-epsilon": 0.0}),  # one sigma for all, as in issue 6
    ]
    if args.smoke:
        # The control arm runs the same code as eps-inf; eps-8 also covers the baseline comparison.
        arms = [arm for arm in arms if arm[0] != "eps-inf-noscrub"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        for name, overrides in arms:
            run = root / name
            harness = prepare(profile, {**extra, **overrides}, run)
            report = simulate(harness, record_wire=True)
            baseline = root / "eps-inf" if name == "eps-8" else None
            compare = [root / "eps-inf"] if name == "eps-8" else []
            audit = run_audits(run, level=level, baseline=baseline, compare=compare)
            rows.append(_row(name, run, audit, report))
            print(f"audit_figures {name}: " + json.dumps(rows[-1]), flush=True)
    from simulations.audits.one_run import certifiable_curve

    fields = {"sigma8": sigma8, **{f"one_run_max_eps_m{c['canaries']}": c["max_epsilon"] for c in certifiable_curve()}}
    for row in rows:
        tag = row["run"].replace("-", "_")
        fields.update({f"{tag}_{k}": v for k, v in row.items() if k != "run"})
    print(result_line("audit_figures", fields))
    return {**fields, "rows": rows}


if __name__ == "__main__":
    main()
