"""DP-SGD step time versus a non-DP step on the same batch.

Both arms train the same trainable set (global + user LoRA adapters and the soft
prompt) of the same PersonalLM on the same fixed batch. The DP arm is Opacus
(hooks mode): per-sample gradients, per-sample clipping and Gaussian noise.

    python -m benchmarks.dp_step            # SmolLM2-135M, batch 16, seq 64
    python -m benchmarks.dp_step --quick    # smaller batch, fewer steps (< 1 min)
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch


def _batch(model, batch: int, seq: int):
    from client.train import encode_pairs

    g = torch.Generator().manual_seed(0)
    words = ["status", "ok", "next", "deploy", "the", "cache", "team", "notes", "soup", "harbour"]
    pairs = []
    for i in range(batch):
        idx = torch.randint(len(words), (seq,), generator=g).tolist()
        pairs.append((f"Write note {i}.", " ".join(words[j] for j in idx)))
    data = encode_pairs(model.tokenizer, pairs, seq)
    return data.tensors


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

    from client.train import _grad_sample_module, _trainable, per_sample_nll
    from common.models import AdapterSpec, personal_model

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.batch, args.seq, args.steps = 8, 32, 2

    model = personal_model(AdapterSpec(base_model=args.model))
    model.use("global", "user")
    model.train()
    ids, mask, labels = _batch(model, args.batch, args.seq)
    gsm = _grad_sample_module(model)

    def make_step(net, opt):
        def step():
            opt.zero_grad(set_to_none=True)
            s, c = per_sample_nll(net(ids, mask), labels)
            (s / c.clamp(min=1)).mean().backward()
            opt.step()

        return step

    # Non-DP arm: plain Adam, Opacus hooks off.
    gsm.disable_hooks()
    plain = _time_steps(make_step(model, torch.optim.Adam(_trainable(model), lr=1e-4)), args.steps)

    # DP arm: same batch every step (no Poisson sampling) so only the mechanism differs.
    gsm.enable_hooks()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids, mask, labels), batch_size=args.batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net, dp_opt, _ = PrivacyEngine(accountant="rdp").make_private(
            module=gsm,
            optimizer=torch.optim.Adam(_trainable(model), lr=1e-4),
            data_loader=loader,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            poisson_sampling=False,
        )
    dp = _time_steps(make_step(net, dp_opt), args.steps)
    gsm.disable_hooks()
    model.reset_to_initial()

    res = {
        "model": args.model,
        "batch": args.batch,
        "seq": ids.shape[1],
        "threads": torch.get_num_threads(),
        "nondp_s": round(statistics.median(plain), 3),
        "dp_s": round(statistics.median(dp), 3),
    }
    res["dp_over_nondp"] = round(res["dp_s"] / res["nondp_s"], 3)
    print(f"non-DP step: {plain}")
    print(f"DP-SGD step: {dp}")
    print("RESULT dp_step " + " ".join(f"{k}={v}" for k, v in res.items()))
    return res


if __name__ == "__main__":
    main()
