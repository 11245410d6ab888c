"""The frozen-prefix forward at first contact: length buckets against one padded pass per device.

With ``adapter-layers`` > 0 a device runs the frozen layers below the first adapted one once per
record (``PersonalLM._cached_prefix``); at first contact that pass over all of a device's records
was the largest single cost of a device in the 100-user round of issue 15 (c). Both arms fill an
empty prefix cache for the same devices' training tasks (the embedded persona generator's users,
encoded as a device encodes them, every record of a device in one batch as under the default full
batch): (a) every miss in one pass at the batch's width, (b) ``PREFIX_CHUNK_ROWS`` rows at a
time, shortest first, each chunk cut to its own longest row. It reports the wall time of each, their
ratio, the share of padded positions each computes, and the largest difference between their states.

    python -m benchmarks.prefix_bucketing            # SmolLM2-135M, 40 users, 3 repetitions
    python -m benchmarks.prefix_bucketing --quick    # SmolLM2-135M, 12 users, 1 repetition (< 1 min)
    python -m benchmarks.prefix_bucketing --smoke    # tiny random model, 4 users (seconds)

Last line: ``RESULT prefix_bucketing key=value ...``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks._common import add_size_flags, result_line


def device_sets(tokenizer, users: int, max_len: int) -> list:
    """Each generated persona user's training tasks, encoded as a device encodes them (one TensorDataset a device)."""
    from client.train import encode_pairs
    from simulations.personas import DatasetSpec, generate_dataset

    out = []
    with tempfile.TemporaryDirectory() as tmp:
        generate_dataset(Path(tmp), DatasetSpec(num_users=users))
        for path in sorted(Path(tmp).glob("users/*.jsonl")):
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            pairs = [(r["input"], r["output"]) for r in rows if r.get("type") == "task" and r.get("split") == "train"]
            if pairs:
                out.append(encode_pairs(tokenizer, pairs, max_len))
    return out


def _device_batches(model, users: int, max_len: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each generated user's training tasks, trimmed as a device does (one batch a device)."""
    from client.train import trim_batch

    return [trim_batch(*data.tensors)[:2] for data in device_sets(model.tokenizer, users, max_len)]


def _fill(model, batches, chunk_rows: int) -> tuple[float, list[torch.Tensor]]:
    import common.models as models
    from common.models import PrefixCache

    models.PREFIX_CHUNK_ROWS = chunk_rows
    model.prefix_cache = PrefixCache()
    t = time.perf_counter()
    states = [model._cached_prefix(ids, att) for ids, att in batches]
    return time.perf_counter() - t, states


def padded_share(lengths_per_device: list[list[int]], rows: int, sort: bool = True) -> float:
    """Padded positions over all positions computed when each device's rows run ``rows`` at a time
    (0: all at once), each chunk padded to its longest row; ``sort``: shortest first, else as given."""
    real = total = 0
    for lengths in lengths_per_device:
        lengths = sorted(lengths) if sort else list(lengths)
        step = rows or len(lengths)
        for start in range(0, len(lengths), step):
            chunk = lengths[start : start + step]
            real += sum(chunk)
            total += max(chunk) * len(chunk)
    return 1 - real / total


def main(argv=None) -> dict:
    import common.models as models
    from common.config import build_config
    from common.models import AdapterSpec, personal_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chunk-rows", type=int, default=None, help="rows per bucket (default: common.models.PREFIX_CHUNK_ROWS)")
    add_size_flags(ap, quick="SmolLM2-135M, 12 users, 1 repetition (< 1 min)")
    args = ap.parse_args(argv)
    model_name = "smollm2-135m"
    if args.quick:
        args.users, args.repeats = 12, 1
    if args.smoke:
        model_name, args.users, args.repeats = "tiny-random", 4, 1
    cfg = build_config("default", {"model": model_name})
    model = personal_model(AdapterSpec.from_config(cfg))
    model.eval()
    batches = _device_batches(model, args.users, cfg.train.max_len)
    lengths = [att.sum(1).tolist() for _, att in batches]
    default_rows = models.PREFIX_CHUNK_ROWS
    bucket_rows = args.chunk_rows or default_rows
    one, bucketed = [], []
    for _ in range(args.repeats):  # alternate the arms so that drift in the machine's speed hits both
        t, ref = _fill(model, batches, 0)
        one.append(t)
        t, got = _fill(model, batches, bucket_rows)
        bucketed.append(t)
    models.PREFIX_CHUNK_ROWS = default_rows
    diff = max(float((a - b).abs().max()) for a, b in zip(ref, got))
    t_one, t_bucket = statistics.median(one), statistics.median(bucketed)
    out = {
        "model": model_name, "devices": len(batches), "records": sum(len(ids) for ids, _ in batches), "chunk_rows": bucket_rows,
        "one_pass_s": round(t_one, 3), "bucketed_s": round(t_bucket, 3), "speedup": round(t_one / t_bucket, 3),
        "padded_share_one_pass": round(padded_share(lengths, 0), 4), "padded_share_bucketed": round(padded_share(lengths, bucket_rows), 4),
        "max_abs_diff": f"{diff:.2e}",
    }
    print(f"{out['devices']} devices, {out['records']} records: one padded pass {t_one:.2f} s "
          f"({out['padded_share_one_pass']:.0%} padding), buckets of {bucket_rows} {t_bucket:.2f} s "
          f"({out['padded_share_bucketed']:.0%} padding): {t_one / t_bucket:.2f}x; states differ by {diff:.1e}", flush=True)
    print(result_line("prefix_bucketing", out))
    return out


if __name__ == "__main__":
    main()
