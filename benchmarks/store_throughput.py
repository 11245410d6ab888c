"""Device store throughput with encryption on and off, and ingestion of a large user file.

    python -m benchmarks.store_throughput            # 20,000 records; a 50 MB user file (~10 minutes)
    python -m benchmarks.store_throughput --quick    # 5,000 records; a 0.5 MB user file (< 1 minute)
    python -m benchmarks.store_throughput --smoke    # tiny sizes, no scrubber (seconds)

Reported:

* **store write** (records/s): ingesting a file of documents and tasks with
  an identity scrubber, so the figure is validation, JSON and SQLite work plus
  AES-GCM sealing, with encryption on and off (``encrypt=False``, the
  benchmark's control arm);
* **store read** (records/s): ``documents()`` + ``tasks()``, on and off;
* **state** (MB/s): ``put_state`` / ``get_state`` of a 4 MiB blob, on and off;
* **ingestion of one large user file** (50 MB; 0.5 MB with ``--quick``) with
  the real scrubber in ``scrub-mode=patterns`` (tag operator; ``--smoke``
  uses none), in a child process: wall time (the scrubber's load reported
  apart), the child's peak RSS (``getrusage``), the cost of the
  unchanged-file check and of ingesting 100 appended lines.

The last line is ``RESULT store_throughput key=value ...``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZES = {  # mode -> (records for store write/read, user file MB, state blob MiB, scrub mode of the large ingest)
    "smoke": (300, 0.1, 1, "none"),  # no scrubber: loading Presidio alone takes ~20 s
    "quick": (5_000, 0.5, 4, "patterns"),
    "full": (20_000, 50.0, 4, "patterns"),
}
REPEATS = 3

_WORDS = ("the a of and to in we our team project meeting notes garden recipe weekend trip report budget plan "
          "review coffee morning evening train station market river music book chapter draft idea summary "
          "update schedule office client design code test release bug fix friday monday paper").split()
_NAMES = ("Jane Roe", "Carlos Mendes", "Aiko Tanaka", "Olumide Adeyemi", "Grzegorz Brzęczyszczykiewicz", "Marie Curie")


def _sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(words)).capitalize() + "."


def _text(rng: random.Random, words: int) -> str:
    parts = [_sentence(rng, rng.randint(8, 16)) for _ in range(max(1, words // 12))]
    pii = rng.random()
    if pii < 0.3:
        parts.insert(rng.randrange(len(parts) + 1), f"Write to {rng.choice(_NAMES).split()[0].lower()}.{rng.randint(1, 999)}@example.org.")
    elif pii < 0.5:
        parts.insert(rng.randrange(len(parts) + 1), f"Call {rng.choice(_NAMES)} on 555-{rng.randint(200, 999)}-{rng.randint(1000, 9999)}.")
    return " ".join(parts)


def write_user_file(path: Path, target_bytes: int, seed: int = 0, words: int = 120) -> int:
    """A user file of documents (2/3) and tasks (1/3) with some planted PII; returns its record count."""
    rng = random.Random(seed)
    n = 0
    with path.open("w", encoding="utf-8") as f:
        while f.tell() < target_bytes:
            if n % 3 == 2:
                rec = {"type": "task", "id": f"t{n:07d}", "split": "train" if n % 5 else "test",
                       "input": _sentence(rng, 10), "output": _text(rng, words // 2)}
            else:
                rec = {"type": "document", "id": f"d{n:07d}", "text": _text(rng, words),
                       "timestamp": f"2026-01-{1 + n % 28:02d}T10:00:00Z"}
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            n += 1
    return n


def _identity(texts):
    from client.store import ScrubOutcome

    return [ScrubOutcome(t, 0, None) for t in texts]


def store_figures(records: int, blob_mib: int, tmp: Path) -> dict:
    from client.store import DeviceStore

    src = tmp / "records.jsonl"
    n = write_user_file(src, records * 620, seed=1, words=80)
    out: dict = {"records": n, "record_bytes": round(src.stat().st_size / n)}
    blob = os.urandom(blob_mib << 20)
    times: dict[str, list[float]] = {}

    def timed(key: str, fn) -> None:
        t = time.perf_counter()
        fn()
        times.setdefault(key, []).append(time.perf_counter() - t)

    # Arms interleaved and repeated (medians): this is a shared machine.
    for rep in range(REPEATS):
        for arm, encrypt in (("on", True), ("off", False)):
            store = DeviceStore(tmp / f"store-{arm}-{rep}.sqlite", encrypt=encrypt)
            timed(f"write_{arm}", lambda: store.ingest_jsonl(src, _identity))
            timed(f"read_{arm}", lambda: len(store.documents()) + len(store.tasks("train")) + len(store.tasks("test")))
            assert store.num_records() == n
            timed(f"put_{arm}", lambda: store.put_state("blob", blob))
            timed(f"get_{arm}", lambda: store.get_state("blob"))
    for arm in ("on", "off"):
        out[f"write_rps_{arm}"] = round(n / statistics.median(times[f"write_{arm}"]))
        out[f"read_rps_{arm}"] = round(n / statistics.median(times[f"read_{arm}"]))
        out[f"state_put_mbs_{arm}"] = round(blob_mib / statistics.median(times[f"put_{arm}"]), 1)
        out[f"state_get_mbs_{arm}"] = round(blob_mib / statistics.median(times[f"get_{arm}"]), 1)
    return out


def child_ingest(user_file: Path, store_path: Path, scrub_mode: str) -> None:
    """Runs in the child: the scrubber, one full ingestion, the unchanged check, an append."""
    from client.store import DeviceStore

    t = time.perf_counter()
    if scrub_mode == "none":
        scrub = _identity
    else:  # what client.device.scrubber builds, without importing the model stack
        from client.pii import Scrubber

        scrub = Scrubber.from_config(mode=scrub_mode, operator="tag")
    load_s = time.perf_counter() - t
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    store = DeviceStore(store_path)
    t = time.perf_counter()
    counts = store.ingest_jsonl(user_file, scrub)
    ingest_s = time.perf_counter() - t
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    for _ in range(100):
        assert not store.needs_ingest(user_file)
    unchanged_ms = (time.perf_counter() - t) * 10
    with user_file.open("a", encoding="utf-8") as f:
        rng = random.Random(7)
        for i in range(100):
            f.write(json.dumps({"type": "document", "id": f"new{i:04d}", "text": _text(rng, 120)}) + "\n")
    t = time.perf_counter()
    appended = store.ingest_jsonl(user_file, scrub)
    append_s = time.perf_counter() - t
    print(json.dumps({"load_s": load_s, "ingest_s": ingest_s, "unchanged_ms": unchanged_ms, "append_s": append_s,
                      "appended": appended["document"], "records": sum(v for k, v in counts.items() if k != "scrubbed_entities"),
                      "quarantined": counts["quarantined"], "entities": counts["scrubbed_entities"],
                      "rss_loaded_mb": rss_loaded / 1024, "rss_peak_mb": rss_peak / 1024}))


def ingest_figures(megabytes: float, scrub_mode: str, tmp: Path) -> dict:
    user_file = tmp / "user.jsonl"
    write_user_file(user_file, int(megabytes * 1_000_000))
    size = user_file.stat().st_size
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.store_throughput", "--child-ingest", str(user_file),
                           str(tmp / "big.sqlite"), scrub_mode],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], check=False)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"the ingesting child failed (exit {proc.returncode})")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    children_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {
        "ingest_file_mb": round(size / 1e6, 1), "ingest_records": res["records"], "ingest_quarantined": res["quarantined"],
        "ingest_entities": res["entities"], "ingest_s": round(res["ingest_s"], 1),
        "ingest_mb_per_s": round(size / 1e6 / res["ingest_s"], 3), "engine_load_s": round(res["load_s"], 1),
        "child_wall_s": round(wall, 1), "rss_after_engine_mb": round(res["rss_loaded_mb"]),
        "peak_rss_mb": round(max(res["rss_peak_mb"], children_peak)),
        "unchanged_check_ms": round(res["unchanged_ms"], 3), "append_100_lines_s": round(res["append_s"], 2),
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (seconds)")
    ap.add_argument("--quick", action="store_true", help="small sizes (< 1 minute)")
    ap.add_argument("--child-ingest", nargs=3, metavar=("USER_FILE", "STORE", "SCRUB_MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child_ingest:
        child_ingest(Path(args.child_ingest[0]), Path(args.child_ingest[1]), args.child_ingest[2])
        return {}
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    records, megabytes, blob_mib, scrub_mode = SIZES[mode]
    with tempfile.TemporaryDirectory() as tmp:
        res = {"mode": mode}
        print(f"store write/read, encryption on and off ({records} records, identity scrubber) ...", flush=True)
        res |= store_figures(records, blob_mib, Path(tmp))
        print(f"ingesting a {megabytes} MB user file, scrub-mode={scrub_mode}, in a child process ...", flush=True)
        res |= {"scrub_mode": scrub_mode} | ingest_figures(megabytes, scrub_mode, Path(tmp))
    # What encryption costs: how much faster the unencrypted arm is (negative: within the noise).
    res["encryption_write_cost_pct"] = round(100 * (res["write_rps_off"] / res["write_rps_on"] - 1), 1)
    res["encryption_read_cost_pct"] = round(100 * (res["read_rps_off"] / res["read_rps_on"] - 1), 1)
    for k, v in res.items():
        print(f"  {k:>24}: {v}")
    print("RESULT store_throughput " + " ".join(f"{k}={v}" for k, v in res.items()))
    return res


if __name__ == "__main__":
    main()
