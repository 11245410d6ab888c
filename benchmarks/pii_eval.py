"""Evaluate the on-device scrubber on a labelled PII span file.

    python -m benchmarks.pii_eval [--file PATH] [--mode full|patterns]   # every record
    python -m benchmarks.pii_eval --quick    # the first 300 records
    python -m benchmarks.pii_eval --smoke    # a 4-record fixture written to a temp folder (seconds)

Default file: ../shared/data/presidio_pii/synth_dataset_v2.json relative to
the repository root (presidio-research synthetic data, see PROVENANCE.txt);
``--smoke`` reads nothing from there. Prints a markdown table; the last line
is machine-readable: ``RESULT pii_eval key=value ...``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from benchmarks._common import add_size_flags, result_line

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_FILE = REPO_ROOT.parent / "shared" / "data" / "presidio_pii" / "synth_dataset_v2.json"
QUICK_RECORDS = 300

# (text, [(value, dataset entity type), ...]): the smoke fixture, in the dataset's format and names.
SMOKE_RECORDS = [
    ("Please call Maria Lopez on 212-555-0199 tomorrow.", [("Maria Lopez", "PERSON"), ("212-555-0199", "PHONE_NUMBER")]),
    ("Send the invoice to j.smith@example.com before Friday.", [("j.smith@example.com", "EMAIL_ADDRESS"), ("Friday", "DATE_TIME")]),
    ("My card is 4111 1111 1111 1111 and I live in Berlin.", [("4111 1111 1111 1111", "CREDIT_CARD"), ("Berlin", "GPE")]),
    ("The server at 192.168.10.7 serves http://intranet.example.org/ now.", [("192.168.10.7", "IP_ADDRESS"), ("http://intranet.example.org/", "DOMAIN_NAME")]),
]


def write_smoke_file(folder: Path) -> Path:
    """The smoke fixture as a presidio-research style span file in ``folder``."""
    records = []
    for text, spans in SMOKE_RECORDS:
        rows = []
        for value, etype in spans:
            start = text.index(value)
            rows.append({"entity_type": etype, "entity_value": value, "start_position": start, "end_position": start + len(value)})
        records.append({"full_text": text, "spans": rows})
    path = Path(folder) / "smoke_spans.json"
    path.write_text(json.dumps(records, indent=1), encoding="utf-8")
    return path


def _fmt(x: float | None) -> str:
    return "na" if x is None else f"{x:.3f}"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--file", type=Path, default=DEFAULT_FILE)
    add_size_flags(ap, quick=f"first {QUICK_RECORDS} records only")
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
    with tempfile.TemporaryDirectory() as tmp:
        path = write_smoke_file(Path(tmp)) if args.smoke else args.file
        t0 = time.perf_counter()
        result = evaluate_file(path, scrubber_predictor(scrubber), limit=QUICK_RECORDS if args.quick else None)
        eval_s = time.perf_counter() - t0

    print(f"# PII eval: {result['file']} (mode={args.mode}, records={result['n_records']})\n")
    print(render_markdown(result))
    print(f"\nengine load {load_s:.1f}s, analysis {eval_s:.1f}s "
          f"({result['n_records'] / eval_s:.1f} records/s)")

    kv = {"records": result["n_records"], "mode": args.mode}
    for t, m in result["per_entity"].items():
        if m["recall"] is not None:
            kv[f"recall_{t}"] = _fmt(m["recall"])
        if m["precision"] is not None:
            kv[f"precision_{t}"] = _fmt(m["precision"])
    o = result["overall"]
    kv["precision_overall"] = _fmt(o["precision"])
    kv["recall_overall"] = _fmt(o["recall"])
    kv["f2_overall"] = _fmt(o["f2"])
    kv["any_type_recall"] = _fmt(result["any_type_recall"])
    print(result_line("pii_eval", kv))
    return kv


if __name__ == "__main__":
    main()
