"""Private personalization recipes, one at a time and together, against the zero-shot base and non-private training.

Runs the simulation once per recipe on the same data and reports, for the
stack each user is served: held-out NLL (lower is better) or, on label data,
accuracy and macro-F1 (higher is better); the largest record-level epsilon of
any device; and the **share of the non-private gain retained**,
``(m_DP - m_base) / (m_nonDP - m_base)``.

Recipes (each a set of ``--set`` overrides on top of the run's defaults):

* ``private``: the defaults: DP-SGD, every device calibrating its noise to end
  at epsilon 8 (``target-epsilon=8``, the default since issue 13);
* ``sigma1``: the old private baseline, one noise multiplier (1.0) for every
  device (``target-epsilon=0``), capped at epsilon 8;
* ``calibrated``: as ``private``, spelled out;
* ``sgd`` / ``adambc``: DP-SGD with momentum / Adam with DP bias correction;
* ``batch``: a larger logical batch (fewer, less noisy steps at the same epsilon);
* ``prompt``: the private tier trains its soft prompt only;
* ``rank1``: LoRA rank 1 in every tier;
* ``prv``: Opacus' PRV accountant (a tighter epsilon for the same mechanism);
* ``top2``: every tier's LoRA in the top two layers only, the soft prompt as a
  deep prompt there (about 14x fewer trainable dimensions);
* ``top2rank1``: ``top2`` with LoRA rank 1 in every tier (about 80x fewer);
* ``fullbatch``: every record in every step (sampling rate 1, no amplification,
  about 3x less noise on the averaged gradient at epsilon 8 over a few steps);
* ``top2full`` / ``top2fullprv``: ``top2`` with the full batch (and the PRV accountant);
* ``top2full4`` / ``top2full4prv`` / ``top2full3prv``: ``top2full`` (``top2fullprv``) with four (three) local steps a round instead of two;
* ``adam`` / ``rdp`` / ``batch6`` / ``alllayers``: the default with one kept recipe taken back out
  (Adam for SGD, RDP for PRV, a Poisson batch of 6 for the full batch, every layer for the top two);
* ``adaclip``: the default with quantile-based adaptive clipping of the record-level C at the median;
* ``useradaclip``: adaptive clipping of the user-level C at the median (with ``--set user-dp=true``);
* ``all``: every recipe the measurements kept, together (today the defaults: ``top2full3prv`` and ``sgd``).

    python -m benchmarks.recipes --smoke                       # tiny model, 3 users, 1 round, 2 recipes
    python -m benchmarks.recipes --quick                       # SmolLM2, 6 users, 2 rounds
    python -m benchmarks.recipes                               # the default persona data (make demo's size)
    python -m benchmarks.recipes --data DIR                    # your own per-user folder, e.g. annotators
    python -m benchmarks.recipes --recipes nonprivate,private,calibrated --out rows.json
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

from benchmarks._common import add_set_flag, parse_sets

RECIPES: dict[str, dict] = {
    "nonprivate": {"dp": False},
    "private": {},
    "sigma1": {"target-epsilon": 0.0},
    "calibrated": {"target-epsilon": 8.0},
    "sgd": {"target-epsilon": 8.0, "optimizer": "sgd", "lr": 0.5},
    "adambc": {"target-epsilon": 8.0, "optimizer": "adambc"},
    "batch": {"target-epsilon": 8.0, "batch-size": 24, "local-steps": 1},
    "prompt": {"target-epsilon": 8.0, "private-tier": "prompt"},
    "rank1": {"target-epsilon": 8.0, "lora-rank": 1, "user-lora-rank": 1},
    "prv": {"target-epsilon": 8.0, "accountant": "prv"},
    "top2": {"target-epsilon": 8.0, "adapter-layers": 2},
    "top2rank1": {"target-epsilon": 8.0, "adapter-layers": 2, "lora-rank": 1, "user-lora-rank": 1},
    # Every record in every step (sampling rate 1): at epsilon 8 over a few steps,
    # amplification by subsampling buys little, so the noise on the averaged gradient,
    # sigma * C / B, is about 3x lower with the whole local set than with B = 6.
    "fullbatch": {"target-epsilon": 8.0, "batch-size": 0},
    "top2full": {"target-epsilon": 8.0, "adapter-layers": 2, "batch-size": 0},
    "top2fullprv": {"target-epsilon": 8.0, "adapter-layers": 2, "batch-size": 0, "accountant": "prv"},
    # ... and twice the steps per round: sigma grows as sqrt(steps) at q = 1, so the
    # summed noise over a run is the same, while Adam moves each coordinate further.
    "top2full4": {"target-epsilon": 8.0, "adapter-layers": 2, "batch-size": 0, "local-steps": 4},
    "top2full4prv": {"target-epsilon": 8.0, "adapter-layers": 2, "batch-size": 0, "local-steps": 4, "accountant": "prv"},
    "top2full3prv": {"target-epsilon": 8.0, "adapter-layers": 2, "batch-size": 0, "local-steps": 3, "accountant": "prv"},
    # The server's step on the averaged shared tiers (post-processing: no epsilon cost). Under DP the
    # average of K devices' updates carries 1/sqrt(K) of one device's noise; a server step of about
    # sqrt(K) (20 devices: 4.5; a persona slot of 5: 2.2) moves the shared signal sqrt(K) times further
    # while its noise is back at one device's level, which the user tier already carries.
    "serverlr2": {"target-epsilon": 8.0, "server-lr": 2.0},
    "serverlr4": {"target-epsilon": 8.0, "server-lr": 4.0},
    # SGD's rate under noise. 0.5 was set to match Adam's step norm, never swept. The training
    # loss still falls every round at 0.5 (the steps are short of the curvature's limit), and the
    # noise a step adds costs loss only along the few directions of high curvature, so a longer
    # step should move the signal further than it hurts: doubled, then doubled again.
    "sgd1": {"target-epsilon": 8.0, "optimizer": "sgd", "lr": 1.0},
    "sgd2": {"target-epsilon": 8.0, "optimizer": "sgd", "lr": 2.0},
    # ... and halved. With nearly every per-sample gradient clipped (0.94-0.98), the clipped sum and
    # its noise both scale with C, so SGD's step is lr * C * (sum of unit gradients + sigma z) / B:
    # lr and C are one knob. A smaller step is also what adaptive clipping to a lower quantile
    # (C below 1) would do; a larger one what clipping at the median (C about 2-3) would do.
    "sgd025": {"target-epsilon": 8.0, "optimizer": "sgd", "lr": 0.25},
    # Four local steps instead of three under SGD (Adam gained 0.04 from it): at q = 1 sigma grows as
    # sqrt(steps), so the run's summed noise keeps its ratio to the summed signal and only compute grows.
    "sgd4": {"target-epsilon": 8.0, "optimizer": "sgd", "lr": 0.5, "local-steps": 4},
    # The default with one of its kept recipes taken back out, one at a time (what each one buys
    # on a given data set): Adam in place of SGD, RDP in place of PRV, a Poisson batch of 6 in place
    # of every record per step, and every layer adapted in place of the top two.
    "adam": {"target-epsilon": 8.0, "optimizer": "adam"},
    "rdp": {"target-epsilon": 8.0, "accountant": "rdp"},
    "batch6": {"target-epsilon": 8.0, "batch-size": 6},
    "alllayers": {"target-epsilon": 8.0, "adapter-layers": 0},
    # The depth sweep around the default two layers: d, and so the noise's norm, grows with the
    # adapted layers (SNR falls as 1/sqrt(layers) for the same signal), while capacity grows with them.
    "top1": {"target-epsilon": 8.0, "adapter-layers": 1},
    "top4": {"target-epsilon": 8.0, "adapter-layers": 4},
    # Per-group clipping: the deep prompt's gradient holds about 99.7% of a record's squared norm at the
    # start, so flat clipping leaves the LoRA adapters (every tier) about 3% of the clip budget's norm.
    "promptclip5": {"target-epsilon": 8.0, "prompt-clip-share": 0.5},
    "promptclip9": {"target-epsilon": 8.0, "prompt-clip-share": 0.9},
    # Quantile-based adaptive clipping (Andrew et al. 2021) at their median target and rate. Once the
    # per-sample norms fall below C (the persona data's clip fraction falls to 0.12 by round 3), a fixed
    # C noises a signal smaller than itself; the median brings sigma * C down with it, at the price of
    # a tenth of each step's privacy for the count (the gradient's noise grows by 1/sqrt(0.9), 5%).
    "adaclip": {"target-epsilon": 8.0, "adaptive-clip-quantile": 0.5},
    # In-context personalization (client/context.py): the sentences many of a device's records share,
    # released once under record-level DP (the weighted Gaussian mechanism for set union, Gopi et al.
    # 2020) at the given noise, and put before every prompt of the trained stacks. The release is one
    # more Gaussian step in the device's accountant, so DP-SGD calibrates to the rest of epsilon 8.
    # Without DP ("nonprivatephrases"), the sentences at least two records share.
    "phrases": {"target-epsilon": 8.0, "context": "phrases"},
    "phrases7": {"target-epsilon": 8.0, "context": "phrases", "context-noise-multiplier": 0.7},
    "nonprivatephrases": {"dp": False, "context": "phrases"},
    # The release's share of the budget on a device served a shared stack (client.accounting.release_noise).
    # 0.36 puts its noise at 1.0 at epsilon 8, as on every other device: the eleventh session's split.
    "evensplit": {"target-epsilon": 8.0, "context": "phrases", "context-budget-share": 0.36},
    # A device served a shared stack runs no DP-SGD and gives the release its whole budget
    # (shared-stack-dp-sgd, client.accounting.runs_dp_sgd); "sharedsgd" keeps its DP-SGD.
    "noshared": {"target-epsilon": 8.0, "shared-stack-dp-sgd": False},
    "sharedsgd": {"target-epsilon": 8.0, "shared-stack-dp-sgd": True},
    # the default with the context taken back out (the one-at-a-time ablation)
    "nocontext": {"target-epsilon": 8.0, "context": "none"},
    # user-level adaptive clipping at the median (needs --set user-dp=true and its settings)
    "useradaclip": {"user-adaptive-clip-quantile": 0.5},
}
# Every recipe the measurements kept, spelled out: the top two layers, every record in every step,
# the PRV accountant, three local steps, SGD at 0.5, every device calibrated to epsilon 8, and the
# device's DP context phrases. They are
# also the run config's defaults now (docs/results.md), so "all" equals "private" until a default
# changes; spelled out, "all" keeps meaning the kept recipes if one does.
ALL = ("top2full3prv", "sgd", "phrases")


def recipe(name: str) -> dict:
    if name == "all":
        out: dict = {}
        for part in ALL:
            out.update(RECIPES[part])
        return out
    return RECIPES[name]


def _served(report: dict) -> dict:
    u = report["utility"]
    out = {"nll": u["served"]["nll"], "base_nll": u["base"]["nll"]}
    if "classification" in u:
        c = u["classification"]
        out.update({"accuracy": c["served"]["accuracy"], "macro_f1": c["served"]["macro_f1"],
                    "base_accuracy": c["base"]["accuracy"], "base_macro_f1": c["base"]["macro_f1"]})
    return out


def retained(private: float, base: float, nonprivate: float) -> float:
    """The share of the non-private gain a private run keeps (nan when there is no gain to keep)."""
    gain = nonprivate - base
    return (private - base) / gain if gain and math.isfinite(gain) else float("nan")


def run(names: list[str], profile: str, overrides: dict, data: Path | None, keep: Path | None) -> list[dict]:
    from simulations.run import prepare, simulate

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = keep or Path(tmp)
        for name in names:
            started = time.perf_counter()
            harness = prepare(profile, {**overrides, **recipe(name)}, root / name, data=data)
            report = simulate(harness)
            eps = report["epsilon_record_level"]
            rows.append({"recipe": name, "overrides": recipe(name), **_served(report),
                         "max_epsilon": eps["max"], "refused": sum(sum(r["refused"].values()) for r in report["server"]["rounds"]),
                         "wall_s": round(time.perf_counter() - started, 1)})
            print(json.dumps(rows[-1]))
    base = next((r for r in rows if r["recipe"] == "nonprivate"), None)
    if base is not None:
        for r in rows:
            r["nll_retained"] = retained(r["nll"], r["base_nll"], base["nll"])
            for m in ("accuracy", "macro_f1"):
                if m in r:
                    r[f"{m}_retained"] = retained(r[m], r[f"base_{m}"], base[m])
    return rows


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny model, 3 users, 1 round, two recipes")
    ap.add_argument("--quick", action="store_true", help="SmolLM2, 6 users, 2 rounds")
    ap.add_argument("--data", type=Path, default=None, help="a per-user folder (e.g. from fedpersona import-annotators)")
    ap.add_argument("--recipes", default=None, help="comma-separated names (default: all of them, then 'all')")
    add_set_flag(ap, "every recipe's run")
    ap.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    ap.add_argument("--keep", type=Path, default=None, help="keep the run folders here")
    args = ap.parse_args(argv)
    overrides = {"scrub-mode": "patterns", **parse_sets(args.sets)}
    if args.smoke:
        profile, names = "quick", ["nonprivate", "calibrated"]
        overrides.update({"num-supernodes": 3, "persona-slots": 2, "num-server-rounds": 1})
    else:
        profile = "default"
        names = args.recipes.split(",") if args.recipes else [*RECIPES, "all"]
        if args.quick:
            overrides.update({"num-supernodes": 6, "num-server-rounds": 2})
    if args.recipes and args.smoke:
        names = args.recipes.split(",")
    rows = run(names, profile, overrides, args.data, args.keep)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))
    best = max((r for r in rows if recipe(r["recipe"]).get("dp") is not False), key=lambda r: r.get("nll_retained", float("-inf")) if not math.isnan(r.get("nll_retained", float("nan"))) else float("-inf"), default=None)
    fields = [f"{r['recipe']}_nll={r['nll']:.4f}" for r in rows]
    if best is not None and "nll_retained" in best:
        fields += [f"best={best['recipe']}", f"best_nll_retained={best['nll_retained']:.3f}", f"best_max_eps={best['max_epsilon']}"]
    print("RESULT recipes " + " ".join(fields))
    return rows


if __name__ == "__main__":
    main()
