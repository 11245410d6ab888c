"""DP-SGD on a device: physical batches cut from a length-sorted local set against index order.

Under the default full batch (``batch-size = 0``) a device's logical batch is all of its records,
which ``BatchMemoryManager`` cuts into physical batches of ``physical-batch`` rows in the order
Opacus' Poisson sampler yields them (ascending index). Each physical batch is padded to its longest
row, so on an unsorted set most of them are as wide as the device's longest record.
``client.train.length_sorted`` sorts the rows by length first. Both arms run ``train_local`` for
the same devices (the embedded persona generator's users, encoded as a device encodes them, the
frozen-prefix cache warmed by one untimed pass) with the default run config, except the noise, which is off in both
(``noise-multiplier = 0``) so that their end states can be compared: the clipped sum does not depend on
the order of the rows. It reports the wall time of each arm, their ratio, the padded share of the
positions each arm's physical batches compute, and the largest difference between the two arms' trained tensors.

    python -m benchmarks.train_bucketing            # SmolLM2-135M, 12 users, 3 repetitions
    python -m benchmarks.train_bucketing --quick    # SmolLM2-135M, 4 users, 1 repetition (< 1 min)
    python -m benchmarks.train_bucketing --smoke    # tiny random model, 4 users (seconds)

Last line: ``RESULT train_bucketing key=value ...``.
"""

from __future__ import annotations

import argparse
import statistics
import time

from benchmarks._common import add_set_flag, add_size_flags, parse_sets, result_line
from benchmarks.prefix_bucketing import device_sets, padded_share


def _train_all(model, sets, cfg) -> tuple[float, list[dict]]:
    from client.train import train_local

    ends = []
    t = time.perf_counter()
    for data in sets:
        model.reset_to_initial()
        train_local(model, data, cfg, None, None)
        ends.append({k: v.detach().clone() for k, v in model.trainable_state().items()})
    return time.perf_counter() - t, ends


def main(argv=None) -> dict:
    import client.train as train_mod
    from common.config import build_config
    from common.models import AdapterSpec, personal_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=3)
    add_set_flag(ap, "both arms (the noise stays off)")
    add_size_flags(ap, quick="SmolLM2-135M, 4 users, 1 repetition (< 1 min)")
    args = ap.parse_args(argv)
    model_name = "smollm2-135m"
    if args.quick:
        args.users, args.repeats = 4, 1
    if args.smoke:
        model_name, args.users, args.repeats = "tiny-random", 4, 1
    overrides = {"model": model_name, **parse_sets(args.sets), "noise-multiplier": 0.0, "target-epsilon": 0.0}
    cfg = build_config("default", overrides)
    model = personal_model(AdapterSpec.from_config(cfg))
    sets = device_sets(model.tokenizer, args.users, cfg.train.max_len)
    sorted_fn = train_mod.length_sorted
    _train_all(model, sets, cfg.train)  # warm-up, untimed: Opacus hooks, the allocator, every record's frozen prefix
    index_order, bucketed = [], []
    try:
        for _ in range(args.repeats):  # alternate the arms so that drift in the machine's speed hits both
            train_mod.length_sorted = lambda d: d
            t, ref = _train_all(model, sets, cfg.train)
            index_order.append(t)
            train_mod.length_sorted = sorted_fn
            t, got = _train_all(model, sets, cfg.train)
            bucketed.append(t)
    finally:
        train_mod.length_sorted = sorted_fn
    diff = max(float((a[k] - b[k]).abs().max()) for a, b in zip(ref, got) for k in a)
    t_index, t_sorted = statistics.median(index_order), statistics.median(bucketed)
    physical = cfg.train.physical_batch
    lengths = [data.tensors[1].sum(1).tolist() for data in sets]
    out = {
        "model": model_name, "devices": len(sets), "records": sum(len(d) for d in sets), "physical_batch": physical,
        "steps": cfg.train.local_steps, "index_order_s": round(t_index, 3), "length_sorted_s": round(t_sorted, 3),
        "speedup": round(t_index / t_sorted, 3),
        "padded_share_index_order": round(padded_share(lengths, physical, sort=False), 4),
        "padded_share_length_sorted": round(padded_share(lengths, physical), 4),
        "max_abs_diff": f"{diff:.2e}",
    }
    print(f"{out['devices']} devices, {out['records']} records, {out['steps']} DP steps each: index order {t_index:.2f} s "
          f"({out['padded_share_index_order']:.0%} padding), length-sorted {t_sorted:.2f} s "
          f"({out['padded_share_length_sorted']:.0%} padding): {t_index / t_sorted:.2f}x; trained tensors differ by {diff:.1e}", flush=True)
    print(result_line("train_bucketing", out))
    return out


if __name__ == "__main__":
    main()
