"""Evaluate the on-device scrubber on a labelled PII span file.

    python -m benchmarks.pii_eval [--quick] [--file PATH] [--mode full|patterns]

Default file: ../shared/data/presidio_pii/synth_dataset_v2.json relative to
the repository root (presidio-research synthetic data, see PROVENANCE.txt).
Prints a markdown table; the last line is machine-readable:
``RESULT pii_eval key=value ...``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_FILE = REPO_ROOT.parent / "shared" / "data" / "presidio_pii" / "synth_dataset_v2.json"
QUICK_RECORDS = 300


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--file", type=Path, default=DEFAULT_FILE)
    ap.add_argument("--quick", action="store_true",
                    help=f"first {QUICK_RECORDS} records only")
    ap.add_argument("--mode", choices=("full", "patterns"), default="full")
    ap.add_argument("--config", type=Path, default=None, help="scrubber YAML")
    args = ap.parse_args(argv)

    # Everything must work offline; make accidental hub access fail fast.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from client.pii import Scrubber
    from simulations.pii_eval import evaluate_file, render_markdown, scrubber_predictor

    t0 = time.perf_counter()
    scrubber = Scrubber.from_config(args.config, mode=args.mode)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = evaluate_file(args.file, scrubber_predictor(scrubber),
                           limit=QUICK_RECORDS if args.quick else None)
    eval_s = time.perf_counter() - t0

    print(f"# PII eval: {result['file']} (mode={args.mode}, records={result['n_records']})\n")
    print(render_markdown(result))
    print(f"\nengine load {load_s:.1f}s, analysis {eval_s:.1f}s "
          f"({result['n_records'] / eval_s:.1f} records/s)")

    kv = {"records": result["n_records"], "mode": args.mode}
    for t, m in result["per_entity"].items():
        if m["recall"] is not None:
            kv[f"recall_{t}"] = f"{m['recall']:.3f}"
        if m["precision"] is not None:
            kv[f"precision_{t}"] = f"{m['precision']:.3f}"
    o = result["overall"]
    kv["precision_overall"] = f"{o['precision']:.3f}"
    kv["recall_overall"] = f"{o['recall']:.3f}"
    kv["f2_overall"] = f"{o['f2']:.3f}"
    kv["any_type_recall"] = f"{result['any_type_recall']:.3f}"
    print("RESULT pii_eval " + " ".join(f"{k}={v}" for k, v in kv.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
