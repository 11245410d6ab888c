"""DP-SGD step time versus a non-DP step on the same batch.

Both arms train what a device trains (``client/train.py``): every tier of the
PersonalLM the run config builds (global, persona while ``persona-slots`` > 0,
and user LoRA adapters; with ``lora-split=ffa`` only the B matrices) plus the
soft prompt, with the device's optimizer, on the same fixed batch. The DP arm
is Opacus (hooks mode) with the run's noise multiplier and clip norm:
per-sample gradients, per-sample clipping and Gaussian noise. Each arm reports
the median of its timed steps after a warm-up step.

    python -m benchmarks.dp_step            # SmolLM2-135M, batch 16, seq 64, 3 steps
    python -m benchmarks.dp_step --quick    # SmolLM2-135M, batch 8, seq 32, 2 steps (< 1 min)
    python -m benchmarks.dp_step --smoke    # tiny random model, batch 4, seq 16, 1 step (seconds)

Last line: ``RESULT dp_step key=value ...``.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

from benchmarks._common import add_size_flags, result_line


def _batch(model, batch: int, seq: int):
    from client.train import encode_pairs, trim_batch

    g = torch.Generator().manual_seed(0)
    words = ["status", "ok", "next", "deploy", "the", "cache", "team", "notes", "soup", "harbour"]
    pairs = []
    for i in range(batch):
        idx = torch.randint(len(words), (seq,), generator=g).tolist()
        pairs.append((f"Write note {i}.", " ".join(words[j] for j in idx)))
    return trim_batch(*encode_pairs(model.tokenizer, pairs, seq).tensors)


def _time_steps(step, n: int) -> list[float]:
    step()  # warm-up: first call allocates and builds hooks
    times = []
    for _ in range(n):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return times


def main(argv=None) -> dict:
    from opacus import PrivacyEngine

    from client.train import _grad_sample_module, _trainable, make_optimizer
    from common.config import build_config
    from common.models import AdapterSpec, personal_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="base model (default: smollm2-135m; tiny-random with --smoke)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3)
    add_size_flags(ap, quick="batch 8, seq 32, 2 steps (< 1 min)")
    args = ap.parse_args(argv)
    if args.quick:
        args.batch, args.seq, args.steps = 8, 32, 2
    if args.smoke:
        args.model, args.batch, args.seq, args.steps = "tiny-random", 4, 16, 1
    cfg = build_config("default", {"model": args.model or "smollm2-135m", "batch-size": args.batch, "max-len": args.seq})

    model = personal_model(AdapterSpec.from_config(cfg))
    # Exactly what train_local trains. Activating fewer tiers than the model has
    # leaves trainable tensors outside the forward pass, and Opacus then fails
    # with "Per sample gradient is not initialized": the persona tier did that.
    model.use(*model.tiers)
    model.train()
    ids, mask, labels = _batch(model, args.batch, args.seq)
    gsm = _grad_sample_module(model)
    t = cfg.train

    def make_step(net, opt):
        def step():
            opt.zero_grad(set_to_none=True)
            s, c = net(ids, mask, labels)
            (s / c.clamp(min=1)).mean().backward()
            opt.step()

        return step

    # Non-DP arm: the device's optimizer, Opacus hooks off.
    gsm.disable_hooks()
    plain = _time_steps(make_step(model, make_optimizer(_trainable(model), t)), args.steps)

    # DP arm: same batch every step (no Poisson sampling) so only the mechanism differs.
    gsm.enable_hooks()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids, mask, labels), batch_size=args.batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net, dp_opt, _ = PrivacyEngine(accountant="rdp").make_private(
            module=gsm,
            optimizer=make_optimizer(_trainable(model), t),
            data_loader=loader,
            noise_multiplier=t.noise_multiplier,
            max_grad_norm=t.max_grad_norm,
            poisson_sampling=False,
        )
    dp = _time_steps(make_step(net, dp_opt), args.steps)
    gsm.disable_hooks()
    model.reset_to_initial()

    res = {
        "model": cfg.model.model,
        "batch": args.batch,
        "seq": ids.shape[1],
        "threads": torch.get_num_threads(),
        "tiers": "+".join(model.tiers),
        "trainable": sum(p.numel() for p in _trainable(model)),
        "nondp_s": round(statistics.median(plain), 3),
        "dp_s": round(statistics.median(dp), 3),
    }
    res["dp_over_nondp"] = round(res["dp_s"] / res["nondp_s"], 3)
    print(f"non-DP step: {plain}")
    print(f"DP-SGD step: {dp}")
    print(result_line("dp_step", res))
    return res


if __name__ == "__main__":
    main()
