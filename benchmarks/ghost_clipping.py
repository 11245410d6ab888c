"""Opacus ghost clipping against hooks mode on the device's model: same clipping, and which step is faster.

Hooks mode (what ``client/train.py`` runs) materialises every sample's
gradient of every trainable tensor, takes each sample's norm over all of them,
clips and sums. Ghost clipping (Opacus ``grad_sample_mode="ghost"``,
``GradSampleModuleFastGradientClipping``) never builds per-sample gradients:
for ``nn.Linear`` and ``nn.Embedding`` it gets each sample's gradient norm from
the layer's activations and output gradients (for a linear layer over T
positions, two B x T x T Gram matrices), then runs a second backward pass on
``sum_i min(1, C / norm_i) * loss_i``, whose ordinary gradient is the clipped
sum. Both are measured here on the PersonalLM the run config builds, with
every tier active and the device's optimizer, on one fixed batch.

Correctness (a small batch, no noise): the per-sample norms ghost mode
computes against hooks mode's (``clip_factors`` over ``p.grad_sample``), per
tensor and over the whole sample, and the clipped, averaged gradient of both
DP optimizers against each other. The clip norm there is the median hooks-mode
norm, so that half the samples are clipped, and every trainable tensor is
first moved off its initial value (at init every LoRA B is zero, so every A's
gradient is too): otherwise parts of the check would be vacuous.

What ghost mode does on this model (Opacus 1.6.0, peft LoRA):

* peft's LoRA matrices are plain ``nn.Linear`` modules (``lora_A[name]``,
  ``lora_B[name]``; dropout 0 is ``nn.Identity``), so ghost clipping handles
  them, frozen FFA A matrices and the frozen base included (those carry no
  hooks). Their norms match hooks mode to float precision.
* The soft prompt fails: ``PersonalLM`` looks its rows up with
  ``arange(n).expand(batch, n)``, a stride-0 index tensor, and Opacus'
  embedding norm sampler (``embedding_norm_sample.py``) flattens its input
  with ``input_ids.view(-1, 1)``, which raises "view size is not compatible
  with input tensor's size and stride" in the first backward pass. Hooks
  mode's embedding grad sampler has no such ``view``. The run here reports
  that failure (``ghost_as_is``) and then measures with the workaround: a
  forward pre-hook that hands the embedding a contiguous copy of its indices
  (:func:`contiguous_prompt_ids`), after which the prompt's norms match too.
* Opacus #732 (LoRA under ghost clipping, "Per sample gradient is not
  initialized"): the maintainers' answer is that in ghost mode
  ``make_private`` returns a *criterion* and the loss must go through it
  (``DPLossFastGradientClipping``, whose ``backward`` runs both passes);
  a plain ``loss.backward()`` is not a ghost-clipped step. It applies here:
  ``train_local`` calls ``loss.backward()`` on the model's own per-sample
  (NLL sum, token count), so ghost mode needs :class:`MeanTokenNLL` as the
  criterion. With Opacus 1.6 the mistake is silent rather than an error: the
  optimizer noises and applies the unclipped mean gradient, rescaled by
  1/batch once more (``plain_backward_rel_err``: its distance from the
  clipped gradient).

Timing: the median DP step (forward, backward(s), clip, noise, optimizer step)
of each mode, the run's noise multiplier and clip norm, same batch, same
optimizer. The modes take turns in one process, each turn a warm-up step and
one timed step (``--steps`` turns per mode), so a change in the machine's
load falls on both (``ghost_over_hooks`` < 1: ghost is faster). ``hooks_grad_sample_mb`` is what
hooks mode holds in per-sample gradients at once (batch x trainable x 4
bytes); ``ghost_gram_mb`` is ghost mode's transient per layer (two B x T x T
fp32 Gram matrices, T the positions an adapted layer sees, prompt included).
LoRA is the case ghost clipping is not built for: a rank-r adapter has r x d
weights per layer, about T^2, so the memory is a wash and ghost pays a second
backward pass.

    python -m benchmarks.ghost_clipping            # SmolLM2-135M, batch 16, seq 64, 3 steps
    python -m benchmarks.ghost_clipping --quick    # SmolLM2-135M, batch 8, seq 32, 2 steps (about a minute)
    python -m benchmarks.ghost_clipping --smoke    # tiny random model, batch 4, seq 16, 1 step (seconds)
    python -m benchmarks.ghost_clipping --quick --set adapter-layers=0   # adapters in every layer

Last line: ``RESULT ghost_clipping key=value ...``.
"""

from __future__ import annotations

import argparse
import statistics
import warnings
from contextlib import contextmanager

import torch

from benchmarks._common import add_set_flag, add_size_flags, parse_sets, result_line
from benchmarks.dp_step import _batch, _time_steps

CHECK_ROWS = 4  # the correctness check's batch: per-sample gradients of the whole model stay small


class MeanTokenNLL:
    """The device's loss as an Opacus criterion: per sample, the mean NLL of its target tokens.

    ``client/train.py`` backpropagates ``mean_i(nll_sum_i / count_i)``. Ghost
    mode needs those per-sample losses themselves (it reweights them by their
    clip factors for its second backward pass), so ``DPLossFastGradientClipping``
    sets ``reduction = "none"`` around each call; ``"mean"`` is what it checks
    the module and the optimizer agree on.
    """

    def __init__(self):
        self.reduction = "mean"

    def __call__(self, nll_sum: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        per_sample = nll_sum / count.clamp(min=1)
        if self.reduction == "none":
            return per_sample
        return per_sample.mean() if self.reduction == "mean" else per_sample.sum()


def _hooks_loss(nll_sum: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """The loss ``client/train._backward`` backpropagates in hooks mode."""
    return (nll_sum / count.clamp(min=1)).sum() / len(nll_sum)


def contiguous_prompt_ids(model):
    """The workaround for ghost mode's embedding norm sampler: the soft prompt's indices as a contiguous tensor.

    Opacus records a module's input in a forward hook, which sees the
    arguments as forward pre-hooks left them, so the norm sampler then gets a
    tensor it can ``view``. The values, and so the forward pass, are unchanged.
    Returns the hook's handle (``.remove()`` it).
    """
    return model.user_embedding.register_forward_pre_hook(lambda _module, args: (args[0].contiguous(), *args[1:]))


@contextmanager
def wrapped(model, mode: str, max_grad_norm: float):
    """The model under one Opacus wrapper, removed again on exit.

    Opacus refuses to hook a model twice, and both wrappers keep state on the
    model's modules and parameters (recorded activations, per-sample
    gradients or norms), so the two modes take turns: everything either
    left behind, a failed backward pass's included, goes on exit.
    """
    from opacus import GradSampleModule
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    if mode == "hooks":  # as client/train._grad_sample_module wraps it
        gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    else:
        gsm = GradSampleModuleFastGradientClipping(model, batch_first=True, loss_reduction="mean", max_grad_norm=max_grad_norm)
    try:
        yield gsm
    finally:
        gsm.cleanup()
        for module in model.modules():
            for attr in ("activations", "max_batch_len"):
                if hasattr(module, attr):
                    delattr(module, attr)
        for p in model.parameters():
            p.grad = None


def _dp_optimizer(params, mode: str, max_grad_norm: float, batch: int):
    """A DP optimizer that moves nothing (SGD at lr 0) and adds no noise: after ``step()``, ``p.grad`` is the clipped mean."""
    from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping

    cls = DPOptimizer if mode == "hooks" else DPOptimizerFastGradientClipping
    return cls(torch.optim.SGD(params, lr=0.0), noise_multiplier=0.0, max_grad_norm=max_grad_norm, expected_batch_size=batch)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest relative difference of ``a`` from the reference ``b``, elementwise."""
    return float(((a - b).abs() / b.abs().clamp(min=1e-12)).max())


def _kind(name: str) -> str:
    return "prompt" if name.startswith("user_embedding") else "lora_A" if ".lora_A." in name else "lora_B"


def compare(model, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, max_grad_norm: float | None = None) -> dict:
    """Ghost mode's per-sample norms and clipped gradient against hooks mode's, noise off.

    ``model`` must be in training mode with its trainable set fixed. The clip
    norm defaults to the median hooks-mode norm. Returns the largest relative
    differences (per-sample norms over all tensors, per tensor by kind, and
    the clipped mean gradient as a whole), the clip norm and share clipped,
    whether ghost mode runs on the model as it is, and how far a plain
    ``loss.backward()`` under ghost mode lands from the clipped gradient.
    The check runs with every trainable tensor moved off its initial value
    (:func:`_moved`) and leaves them as they were.
    """
    from client.train import _trainable

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    assert {id(p) for p in params} == {id(p) for p in _trainable(model)}, "Opacus would hook tensors the device does not train"
    with _moved(params):
        return _compare(model, named, ids, mask, labels, max_grad_norm)


@contextmanager
def _moved(params, std: float = 0.05, seed: int = 0):
    """Every trainable tensor moved by seeded noise for the check, restored after.

    At initialisation every LoRA B is zero, so every trainable A has a zero
    gradient and comparing its norms would prove nothing.
    """
    saved = [p.detach().clone() for p in params]
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * std)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, v in zip(params, saved):
                p.copy_(v)


def _compare(model, named, ids, mask, labels, max_grad_norm: float | None) -> dict:
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    from client.train import clip_factors

    params = [p for _, p in named]
    batch = len(ids)
    out: dict = {}

    with wrapped(model, "hooks", 1.0) as gsm:
        _hooks_loss(*gsm(ids, mask, labels)).backward()
        per_tensor_h = {n: p.grad_sample.reshape(batch, -1).norm(dim=1) for n, p in named}
        norms_h, _ = clip_factors([p.grad_sample for p in params], 1.0)
        clip = float(norms_h.median()) if max_grad_norm is None else max_grad_norm
        opt = _dp_optimizer(params, "hooks", clip, batch)
        opt.step()
        grad_h = torch.cat([p.grad.reshape(-1) for p in params])
    out["clip_norm"] = round(clip, 6)
    out["clipped"] = round(float((norms_h > clip).float().mean()), 3)

    # Ghost mode on the model as it is: the soft prompt's stride-0 indices break its embedding norm sampler.
    with wrapped(model, "ghost", clip) as gsm:
        opt = _dp_optimizer(params, "ghost", clip, batch)
        try:
            DPLossFastGradientClipping(gsm, opt, MeanTokenNLL())(*gsm(ids, mask, labels)).backward()
            out["ghost_as_is"] = "works"
        except RuntimeError as err:
            if "view size is not compatible" not in str(err):
                raise
            out["ghost_as_is"] = "fails:prompt-embedding-view"

    workaround = contiguous_prompt_ids(model)
    try:
        with wrapped(model, "ghost", clip) as gsm:
            opt = _dp_optimizer(params, "ghost", clip, batch)
            DPLossFastGradientClipping(gsm, opt, MeanTokenNLL())(*gsm(ids, mask, labels)).backward()
            per_tensor_g = {n: p._norm_sample for n, p in named}
            norms_g = gsm.per_sample_gradient_norms
            opt.step()
            grad_g = torch.cat([p.grad.reshape(-1) for p in params])

        # Opacus #732: a plain backward under ghost mode, as train_local would call it.
        with wrapped(model, "ghost", clip) as gsm:
            opt = _dp_optimizer(params, "ghost", clip, batch)
            _hooks_loss(*gsm(ids, mask, labels)).backward()
            opt.step()
            grad_plain = torch.cat([p.grad.reshape(-1) for p in params])
    finally:
        workaround.remove()

    out["norm_rel_err"] = _rel(norms_g, norms_h)
    for kind in ("prompt", "lora_A", "lora_B"):
        errs = [_rel(per_tensor_g[n], per_tensor_h[n]) for n, _ in named if _kind(n) == kind]
        if errs:
            out[f"{kind}_norm_rel_err"] = max(errs)
    out["grad_rel_err"] = float((grad_g - grad_h).norm() / grad_h.norm())
    out["plain_backward_rel_err"] = round(float((grad_plain - grad_h).norm() / grad_h.norm()), 4)
    return out


@contextmanager
def dp_step(model, mode: str, ids, mask, labels, cfg):
    """One mode's DP step as a callable: the run's noise and clip norm, the device's optimizer, the same batch every step."""
    from opacus import PrivacyEngine

    from client.train import _trainable, make_optimizer

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids, mask, labels), batch_size=len(ids))
    with wrapped(model, mode, cfg.max_grad_norm) as gsm:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Opacus warns about secure RNG
            private = PrivacyEngine(accountant="rdp").make_private(
                module=gsm,
                optimizer=make_optimizer(_trainable(model), cfg),
                data_loader=loader,
                noise_multiplier=cfg.noise_multiplier,
                max_grad_norm=cfg.max_grad_norm,
                poisson_sampling=False,  # the same batch every step: only the mechanism differs
                grad_sample_mode=mode,
                criterion=MeanTokenNLL(),  # used by ghost mode only
            )
        net, opt = private[0], private[1]
        loss = private[2] if mode == "ghost" else _hooks_loss

        def step():
            opt.zero_grad(set_to_none=True)
            loss(*net(ids, mask, labels)).backward()
            opt.step()

        try:
            yield step
        finally:
            model.reset_to_initial()


def main(argv=None) -> dict:
    from client.train import _trainable
    from common.config import build_config
    from common.models import AdapterSpec, personal_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="base model (default: smollm2-135m; tiny-random with --smoke)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3)
    add_size_flags(ap, quick="batch 8, seq 32, 2 steps (about a minute)")
    add_set_flag(ap, "the model and the DP step (e.g. adapter-layers=0, lora-split=separate)")
    args = ap.parse_args(argv)
    if args.quick:
        args.batch, args.seq, args.steps = 8, 32, 2
    if args.smoke:
        args.model, args.batch, args.seq, args.steps = "tiny-random", 4, 16, 1
    cfg = build_config("default", {"model": args.model or "smollm2-135m", "batch-size": args.batch, "max-len": args.seq,
                                   **parse_sets(args.sets)})

    model = personal_model(AdapterSpec.from_config(cfg))
    model.use(*model.tiers)  # what train_local trains: every tier and the soft prompt
    model.train()  # Opacus records activations only in training mode
    ids, mask, labels = _batch(model, args.batch, args.seq)
    check = compare(model, ids[:CHECK_ROWS], mask[:CHECK_ROWS], labels[:CHECK_ROWS])

    # Ghost mode needs the workaround for the soft prompt (see the docstring); hooks mode does not mind it.
    workaround = contiguous_prompt_ids(model)
    times: dict[str, list[float]] = {"hooks": [], "ghost": []}
    try:
        # The modes take turns, one timed step (after a warm-up) per turn, so
        # that a change in the machine's load falls on both alike.
        for _ in range(args.steps):
            for mode in times:
                with dp_step(model, mode, ids, mask, labels, cfg.train) as step:
                    times[mode] += _time_steps(step, 1)
    finally:
        workaround.remove()
    hooks, ghost = times["hooks"], times["ghost"]
    model.eval()

    trainable = sum(p.numel() for p in _trainable(model))
    positions = ids.shape[1] + (cfg.model.prompt_tokens if model.prompt_active else 0)
    res = {
        "model": cfg.model.model,
        "batch": args.batch,
        "seq": ids.shape[1],
        "adapter_layers": cfg.model.adapter_layers,
        "lora_split": cfg.model.lora_split,
        "threads": torch.get_num_threads(),
        "trainable": trainable,
        "ghost_as_is": check["ghost_as_is"],
        "check_rows": min(CHECK_ROWS, args.batch),
        "check_clip_norm": check["clip_norm"],
        "check_clipped": check["clipped"],
        **{k: f"{check[k]:.1e}" for k in ("norm_rel_err", "prompt_norm_rel_err", "lora_A_norm_rel_err", "lora_B_norm_rel_err", "grad_rel_err") if k in check},
        "plain_backward_rel_err": check["plain_backward_rel_err"],
        "hooks_grad_sample_mb": round(args.batch * trainable * 4 / 2**20, 2),
        "ghost_gram_mb": round(2 * args.batch * positions**2 * 4 / 2**20, 2),
        "hooks_s": round(statistics.median(hooks), 3),
        "ghost_s": round(statistics.median(ghost), 3),
    }
    res["ghost_over_hooks"] = round(res["ghost_s"] / res["hooks_s"], 3)
    print(f"hooks DP step: {hooks}")
    print(f"ghost DP step: {ghost}")
    print(result_line("ghost_clipping", res))
    return res


if __name__ == "__main__":
    main()
