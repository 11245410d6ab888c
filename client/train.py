"""Local training on the device: LoRA adapters + soft prompt under Opacus DP-SGD.

One process holds one :class:`~common.models.PersonalLM` and one Opacus
``GradSampleModule`` around it for its whole life. Each user's round swaps in
that user's tensors, optimizer state and accountant history, trains, and swaps
them out again. The record-level privacy accountant is therefore *persisted*
across rounds (in the device store), never reset.
"""

from __future__ import annotations

import io
import math
import secrets
import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch.utils.data import DataLoader, TensorDataset

from client import accounting
from client.adaptive_clip import QuantileClip, split_noise
from client.context import CONTEXT_TOKENS
from common.config import TrainConfig
from common.models import IGNORE, PROMPT_KEY, USER, PersonalLM, tier_of


# --------------------------------------------------------------------------- #
# Data
# --------------------------------------------------------------------------- #


def encode_pairs(tokenizer, pairs: list[tuple[str, str]], max_len: int, answer_room: list[int] | None = None,
                 context: str = "") -> TensorDataset:
    """Tokenise (input, output) pairs; the loss covers only the output tokens.

    The format is plain ``input\\n output<eos>`` for every model, so the base,
    global and personalised scores are comparable.

    A long prompt is cut to leave its answer room: the answer's own length,
    at most half the window. A written answer carries the style and keeps at
    least half of ``max_len``. A label is a few tokens, so the text to be
    labelled keeps the rest; cutting every prompt to half the window left
    about 6 tokens of a tweet after the instruction and the options.
    ``answer_room`` (tokens, one per pair) overrides the answer's length.
    Option scoring passes the longest option's length, so that every option
    of an example is scored after the same prompt.

    ``context`` (the device's released phrases, client/context.py) goes in
    front of every prompt, cut to ``CONTEXT_TOKENS``, on top of ``max_len``:
    it must not take the task's own prompt room.
    """
    ids_rows, label_rows = [], []
    head = tokenizer(context, add_special_tokens=False)["input_ids"][:CONTEXT_TOKENS] if context else []
    for i, (source, target) in enumerate(pairs):
        prompt = tokenizer(source + "\n", add_special_tokens=False)["input_ids"]
        answer = tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        room = len(answer) if answer_room is None else answer_room[i]
        prompt = prompt[: max_len - min(room, max_len // 2)]
        ids = head + (prompt + answer)[:max_len]
        labels = [IGNORE] * len(head) + ([IGNORE] * len(prompt) + answer)[:max_len]
        ids_rows.append(ids)
        label_rows.append(labels)
    width = max(len(r) for r in ids_rows) if ids_rows else 1
    pad = tokenizer.pad_token_id
    input_ids = torch.full((len(ids_rows), width), pad, dtype=torch.long)
    attention = torch.zeros((len(ids_rows), width), dtype=torch.long)
    labels = torch.full((len(ids_rows), width), IGNORE, dtype=torch.long)
    for i, (ids, lab) in enumerate(zip(ids_rows, label_rows)):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention[i, : len(ids)] = 1
        labels[i, : len(lab)] = torch.tensor(lab)
    return TensorDataset(input_ids, attention, labels)


def trim_batch(input_ids, attention, labels):
    """Drop padding columns beyond the batch's longest row.

    Rows are right-padded to the dataset-wide maximum; a few PII-bearing
    examples make that ~2x the typical length, and compute is linear in it.
    """
    width = max(int(attention.sum(1).max()), 1)
    return input_ids[:, :width], attention[:, :width], labels[:, :width]


def length_sorted(data: TensorDataset) -> TensorDataset:
    """The same rows, shortest first (stable), so that a logical batch splits into physical batches of similar length.

    Opacus' Poisson sampler yields a batch's indices in ascending order and
    ``BatchMemoryManager`` cuts them into physical batches in that order, so
    on a length-sorted dataset each physical batch is trimmed (``trim_batch``)
    to a width close to its rows' own. What a logical step releases, the sum
    of the clipped per-sample gradients plus noise, does not depend on the
    order of the rows, so this changes compute, not the mechanism.
    """
    order = torch.argsort(data.tensors[1].sum(1), stable=True)
    return TensorDataset(*(t[order] for t in data.tensors))


# --------------------------------------------------------------------------- #
# Training
# --------------------------------------------------------------------------- #


@dataclass
class TrainResult:
    loss: float
    steps: int
    num_examples: int
    epsilon: float  # record-level, cumulative over all rounds so far; inf without DP
    # Per-round DP-SGD instruments (simulation diagnostics, never sent): clip
    # fraction, per-sample gradient norm quantiles, noise std and signal-to-noise.
    instruments: dict | None = None
    # Under adaptive clipping, the clip norm the device's next step starts from (kept in its store).
    clip_norm: float | None = None


class DPAdamBC(torch.optim.Adam):
    """Adam with DP bias correction (Tang et al. 2024, "DP-AdamBC").

    Under DP-SGD the gradient Adam sees carries Gaussian noise of known
    per-coordinate variance ``(sigma * C / B)**2``. Adam's second moment then
    estimates gradient variance *plus* that noise variance, so coordinates
    with no signal are normalised to unit-size random steps. DP-AdamBC
    subtracts the known noise variance from the (bias-corrected) second
    moment before the update, with a floor ``gamma`` that keeps the step
    finite. The floor defaults to the noise variance itself: a coordinate
    with no signal then moves as under Adam, while one with signal ``g`` moves
    by about ``lr`` in its direction instead of Adam's ``lr * g / sigma``.
    """

    def __init__(self, params, lr: float, noise_variance: float, gamma: float | None = None):
        super().__init__(params, lr=lr)
        self.noise_variance = float(noise_variance)
        self.gamma = float(gamma) if gamma is not None else max(self.noise_variance, 1e-12)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = float(state["step"])
                state["exp_avg"].mul_(beta1).add_(p.grad, alpha=1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                m_hat = state["exp_avg"] / (1 - beta1**t)
                v_hat = state["exp_avg_sq"] / (1 - beta2**t)
                denom = (v_hat - self.noise_variance).clamp(min=self.gamma).sqrt()
                p.addcdiv_(m_hat, denom, value=-group["lr"])
        return None


def make_optimizer(params, cfg: TrainConfig, noise_variance: float = 0.0) -> torch.optim.Optimizer:
    """The local optimizer (``optimizer`` in the run config).

    Adam rescales every coordinate to its own noise level, so under DP every
    LoRA weight random-walks by ~lr per step; SGD with momentum keeps the
    noise at its true (small, per-coordinate) scale; DP-AdamBC removes the
    known noise variance from Adam's second moment. See docs/results.md.
    """
    name, lr = cfg.local_optimizer, cfg.learning_rate
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    if name == "adambc":
        return DPAdamBC(params, lr=lr, noise_variance=noise_variance)
    raise ValueError(f"unknown optimizer {name!r}")


FLAT = (1.0,)  # one clipping group with the whole clip norm: Opacus' flat clipping


def clip_factors(samples: Sequence[torch.Tensor], max_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Opacus' flat clipping of per-sample gradients (one tensor per parameter, samples first).

    Each sample's norm is taken over all its tensors together; its factor is
    ``min(1, C / (norm + 1e-6))``, as in Opacus' ``DPOptimizer.clip_and_accumulate``:
    :func:`group_clip_factors` with one group holding all of C.
    """
    norms, (factor,) = group_clip_factors(samples, [0] * len(samples), max_norm, FLAT)
    return norms, factor


def group_clip_factors(samples: Sequence[torch.Tensor], groups: Sequence[int], max_norm: float,
                       shares: Sequence[float]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Per-group clipping (McMahan et al. 2018): group k's part of each sample is clipped to ``C * sqrt(shares[k])``.

    ``groups[i]`` is the group of ``samples[i]``; the shares sum to 1, so a sample's clipped gradient
    has norm at most C, the sensitivity flat clipping has. Returns each sample's whole norm and one
    factor tensor per group (``min(1, C_k / (norm_k + 1e-6))``, as Opacus' flat factor).
    """
    norms = torch.stack([g.reshape(g.shape[0], -1).norm(dim=1) for g in samples], dim=1)
    factors = []
    for k, share in enumerate(shares):
        members = [i for i, grp in enumerate(groups) if grp == k]
        group_norm = norms[:, members].norm(dim=1) if members else norms.new_zeros(norms.shape[0])
        factors.append((max_norm * math.sqrt(share) / (group_norm + 1e-6)).clamp(max=1.0))
    return norms.norm(dim=1), factors


def prompt_groups(model: PersonalLM, params) -> list[int]:
    """Group 0 for the soft prompt, group 1 for every LoRA tensor (``prompt-clip-share``)."""
    names = {id(p): name for name, p in model.trainable_state().items()}
    return [0 if names.get(id(p)) == PROMPT_KEY else 1 for p in params]


def install_group_clipping(optimizer, groups: Sequence[int], shares: Sequence[float]) -> None:
    """Replace Opacus' flat clipping on this ``DPOptimizer`` by :func:`group_clip_factors`.

    The same steps as ``DPOptimizer.clip_and_accumulate`` (Opacus 1.6), with one factor per group in
    place of one per sample. Noise (sigma * C) and the accountant are untouched: the sensitivity is C.
    """
    from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

    def clip_and_accumulate() -> None:
        samples = optimizer.grad_samples
        if len(samples[0]) == 0:
            factors = [torch.zeros((0,), device=samples[0].device)] * len(shares)
        else:
            factors = group_clip_factors(samples, groups, optimizer.max_grad_norm, shares)[1]
        for p, grp in zip(optimizer.params, groups):
            _check_processed_flag(p.grad_sample)
            grad_sample = optimizer._get_flat_grad_sample(p).to(p.dtype)
            grad = torch.einsum("i,i...", factors[grp].to(grad_sample.device).to(p.dtype), grad_sample)
            p.summed_grad = grad if p.summed_grad is None else p.summed_grad + grad
            _mark_as_processed(p.grad_sample)

    optimizer.clip_and_accumulate = clip_and_accumulate


def per_sample_grads(params) -> list[torch.Tensor]:
    """Opacus' per-sample gradients of the current physical batch, one flat (samples, size) tensor per parameter."""
    return [p.grad_sample.reshape(p.grad_sample.shape[0], -1) for p in params if getattr(p, "grad_sample", None) is not None]


class _Instruments:
    """Per-step DP-SGD diagnostics from Opacus' per-sample gradients, before clipping.

    Per sample: the gradient norm (quantiles, and the share above the step's
    clip norm). Per logical step: the signal-to-noise ratio, the norm of the
    mean clipped gradient over the expected norm of the step's noise
    ``sigma * C * sqrt(d) / B``, and the noise std per coordinate. ``C`` and
    ``sigma`` are the step's own: adaptive clipping moves the first and splits
    the second (client/adaptive_clip.py).

    The same ratio per tier (``snr_by_tier``), over the tier's own coordinates:
    noise in one tier's coordinates never touches another tier's weights, so the
    whole-vector figure understates the tier whose stack is served when the other
    tiers hold most of the dimensions (docs/results.md, the user tier alone).
    """

    def __init__(self, params, expected_batch: float, tiers: Sequence[str] | None = None,
                 groups: Sequence[int] | None = None, shares: Sequence[float] | None = None):
        self.expected_batch = expected_batch
        self.groups, self.shares = groups, shares  # per-group clipping, as the optimizer does it (None: flat)
        self.dim = sum(p.numel() for p in params)
        self.tiers = list(tiers) if tiers is not None else ["all"] * len(params)
        self.tier_dims: dict[str, int] = {}
        for tier, p in zip(self.tiers, params):
            self.tier_dims[tier] = self.tier_dims.get(tier, 0) + p.numel()
        self.norms: list[float] = []
        self.clipped = 0
        self.snr: list[float] = []
        self.snr_by_tier: dict[str, list[float]] = {t: [] for t in self.tier_dims}
        self.noise_std: list[float] = []
        self.clip_norms: list[float] = []
        self._sums: list[tuple[torch.Tensor, str]] | None = None  # (clipped sum, tier) per parameter

    @torch.no_grad()
    def observe(self, params, clip: float) -> torch.Tensor | None:
        """The per-sample gradients of one physical batch (before ``optimizer.step()``); returns their norms."""
        shares = self.shares or FLAT
        groups = self.groups if self.shares else [0] * len(params)
        present = [(tier, grp, p) for tier, grp, p in zip(self.tiers, groups, params) if getattr(p, "grad_sample", None) is not None]
        samples = per_sample_grads([p for *_, p in present])
        if not samples or samples[0].shape[0] == 0:
            return None
        norms, by_group = group_clip_factors(samples, [grp for _, grp, _ in present], clip, shares)
        # A sample counts as clipped when any of its groups was scaled down (flat: its norm exceeds C).
        clipped = norms > clip if shares == FLAT else torch.stack([f < 1 for f in by_group], dim=1).any(dim=1)
        sums = [((g * by_group[grp][:, None]).sum(0), tier) for (tier, grp, _), g in zip(present, samples)]
        self._sums = sums if self._sums is None else [(a + b, tier) for (a, tier), (b, _) in zip(self._sums, sums)]
        self.norms += norms.tolist()
        self.clipped += int(clipped.sum())
        return norms

    def step_done(self, clip: float, noise_multiplier: float) -> None:
        """A logical step ended at clip norm ``clip`` with gradient noise ``noise_multiplier * clip``."""
        self.clip_norms.append(clip)
        self.noise_std.append(noise_multiplier * clip / self.expected_batch)
        if self._sums is None:
            return
        by_tier: dict[str, float] = {}
        for total, tier in self._sums:
            by_tier[tier] = by_tier.get(tier, 0.0) + float((total**2).sum())

        def ratio(sq_sum: float, dim: int) -> float:
            noise_norm = noise_multiplier * clip * math.sqrt(dim) / self.expected_batch
            return math.sqrt(sq_sum) / self.expected_batch / noise_norm if noise_norm > 0 else math.inf

        self.snr.append(ratio(sum(by_tier.values()), self.dim))
        for tier, dim in self.tier_dims.items():
            self.snr_by_tier[tier].append(ratio(by_tier.get(tier, 0.0), dim))
        self._sums = None

    def summary(self) -> dict:
        if not self.norms:
            return {}
        norms = sorted(self.norms)
        at = lambda f: norms[min(len(norms) - 1, int(f * len(norms)))]  # noqa: E731
        return {
            "clip_fraction": self.clipped / len(norms),
            "grad_norm_q10": at(0.1), "grad_norm_q50": at(0.5), "grad_norm_q90": at(0.9),
            "noise_std": sum(self.noise_std) / len(self.noise_std) if self.noise_std else None,
            "clip_norm": sum(self.clip_norms) / len(self.clip_norms) if self.clip_norms else None,
            "snr": sum(self.snr) / len(self.snr) if self.snr else None,
            "snr_by_tier": {t: sum(v) / len(v) for t, v in self.snr_by_tier.items() if v},
        }


_GSM: dict[int, tuple[frozenset, object]] = {}


def _grad_sample_module(model: PersonalLM):
    """Wrap the model once per process and trainable set; Opacus reuses an existing wrapper.

    Opacus hooks only the modules whose parameters train when it wraps; if the
    trainable set changes (``private-tier``), the old hooks are removed first.
    """
    from opacus import GradSampleModule

    trainable = frozenset(n for n, p in model.named_parameters() if p.requires_grad)
    cached = _GSM.get(id(model))
    if cached is None or cached[0] != trainable:
        if cached is not None:
            cached[1].remove_hooks()
        _GSM[id(model)] = (trainable, GradSampleModule(model, batch_first=True, loss_reduction="mean"))
    return _GSM[id(model)][1]


def _trainable(model: PersonalLM, cfg: TrainConfig | None = None) -> list[torch.nn.Parameter]:
    """The tensors this round trains, in a stable order (optimizer state is saved and restored by index).

    ``private-tier=prompt`` trains only the soft prompt of the user tier (its
    LoRA adapter stays frozen): far fewer dimensions for the noise to fill.
    """
    state = sorted(model.trainable_state().items())
    if cfg is not None and cfg.private_tier == "prompt":
        for name, p in state:
            if tier_of(name) == USER and name != PROMPT_KEY:
                p.requires_grad_(False)
        state = [(n, p) for n, p in state if tier_of(n) != USER or n == PROMPT_KEY]
    return [p for _, p in state]


def train_local(
    model: PersonalLM,
    data: TensorDataset,
    cfg: TrainConfig,
    accountant_state: str | None,
    optimizer_state: bytes | None,
    generator: torch.Generator | None = None,
    clip_start: float | None = None,
) -> tuple[TrainResult, str | None, bytes]:
    """Run ``cfg.local_steps`` optimizer steps on this user's data.

    Returns the result, the updated accountant state (Opacus ``state_dict`` as
    JSON) and the optimizer state. The model's current tensors are the
    starting point and are updated in place. Under adaptive clipping
    (``adaptive-clip-quantile``) the first step clips at ``clip_start`` (the
    norm the device's last round ended at; ``max-grad-norm`` when None), and
    ``result.clip_norm`` is where this round ended.
    """
    from opacus import PrivacyEngine

    model.use(*model.tiers)
    model.train()
    params = _trainable(model, cfg)
    batch_size = cfg.batch_for(len(data))
    clipper, grad_noise = None, cfg.noise_multiplier
    if cfg.dp and cfg.adaptive_clip_quantile:
        # The gradient gets noise z_delta >= z, the count of unclipped samples the rest of z's budget.
        grad_noise, count_noise = split_noise(cfg.noise_multiplier, cfg.adaptive_clip_share)
        clipper = QuantileClip(clip_start or cfg.max_grad_norm, cfg.max_grad_norm, cfg.adaptive_clip_quantile,
                               cfg.adaptive_clip_lr, count_noise, batch_size, _os_seeded_generator())
    clip = clipper.clip if clipper else cfg.max_grad_norm

    def noise_variance(clip: float) -> float:
        """The per-coordinate variance of the noise in the averaged gradient at clip norm ``clip`` (DP-AdamBC needs it)."""
        return (grad_noise * clip / batch_size) ** 2 if cfg.dp else 0.0

    optimizer = make_optimizer(params, cfg, noise_variance(clip))
    if optimizer_state:
        optimizer.load_state_dict(torch.load(io.BytesIO(optimizer_state), weights_only=True))
    if cfg.dp and generator is None:
        # Which records a Poisson batch holds must stay secret from the server:
        # amplification by sampling assumes it. So under DP the coins come from
        # the OS, never from a seed in the run config (a seeded generator is
        # for dp=false runs and tests).
        generator = _os_seeded_generator()
    if cfg.dp and batch_size > cfg.physical_batch:
        data = length_sorted(data)  # less padding per physical batch; the logical batch is the same set
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, generator=generator)

    # Per-group clipping (prompt-clip-share): the optimizer and the instruments clip with the same shares.
    clip_shares = (cfg.prompt_clip_share, 1 - cfg.prompt_clip_share) if cfg.prompt_clip_share else None
    gsm = _grad_sample_module(model)
    engine = None
    if cfg.dp:
        gsm.enable_hooks()
        engine = PrivacyEngine(accountant=cfg.accountant)
        engine.accountant = accounting.new_accountant(cfg.accountant)
        if accountant_state:
            engine.accountant.load_state_dict(accounting.load_state(accountant_state))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Opacus warns about secure RNG; see README threat model
            net, optimizer, loader = engine.make_private(
                module=gsm,
                optimizer=optimizer,
                data_loader=loader,
                noise_multiplier=grad_noise,
                max_grad_norm=clip,
                poisson_sampling=True,
                # Opacus' secure_mode needs torchcsprng (no wheel for Python 3.11);
                # the noise generator is at least seeded from the OS, never from
                # anything the server knows.
                noise_generator=_os_seeded_generator(),
            )
        rate = 1 / len(loader)
        if clip_shares:
            install_group_clipping(optimizer, prompt_groups(model, optimizer.params), clip_shares)
        if clipper is not None:
            # The accountant is charged the one Gaussian mechanism that the noised gradient and the
            # noised count are together (Andrew et al. 2021, Theorem 1): the calibrated z, not z_delta.
            optimizer.attach_step_hook(lambda optim: engine.accountant.step(
                noise_multiplier=cfg.noise_multiplier, sample_rate=rate * optim.accumulated_iterations))
    else:
        gsm.disable_hooks()
        net = model

    assert engine is None or abs(rate - accounting.sample_rate(cfg, len(data))) < 1e-12  # the rate the device's budget checks use
    tier_by_param = {id(p): tier_of(name) for name, p in model.trainable_state().items()}
    instruments = _Instruments(params, batch_size, [tier_by_param.get(id(p), "other") for p in params],
                               prompt_groups(model, params), clip_shares) if cfg.dp else None

    def step_taken() -> None:
        """A logical step's noise was added: record it, and move the clip norm for the next one."""
        if instruments is not None:
            instruments.step_done(optimizer.max_grad_norm, optimizer.noise_multiplier)
        if clipper is not None:
            optimizer.max_grad_norm = clipper.step_done()
            if isinstance(optimizer.original_optimizer, DPAdamBC):
                optimizer.original_optimizer.noise_variance = noise_variance(optimizer.max_grad_norm)

    # A logical batch larger than memory allows is split into physical batches:
    # under DP by Opacus' BatchMemoryManager (clipping per sample, noise once per
    # logical step), without DP by accumulating the loss over chunks.
    split = cfg.dp and batch_size > cfg.physical_batch
    batches = BatchMemoryManager(data_loader=loader, max_physical_batch_size=cfg.physical_batch, optimizer=optimizer) if split else nullcontext(loader)
    losses, steps = [], 0
    with batches as loader:
        while steps < cfg.local_steps:
            for input_ids, attention, labels in loader:
                if steps >= cfg.local_steps:
                    break
                optimizer.zero_grad(set_to_none=True)
                if len(input_ids) == 0:
                    # Poisson sampling drew an empty batch. The mechanism that is
                    # accounted releases noise in this step too, so run Opacus'
                    # noise-only step: zero per-sample gradients, clipped, summed,
                    # noised and applied, and charged to the accountant as usual.
                    for p in params:
                        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype)
                    optimizer.step()
                    steps += 1
                    step_taken()
                    continue
                losses.append(_backward(net, input_ids, attention, labels, None if cfg.dp else cfg.physical_batch))
                if instruments is not None:
                    norms = instruments.observe(params, optimizer.max_grad_norm)
                    if clipper is not None and norms is not None:
                        clipper.observe(norms)
                optimizer.step()
                if not (split and optimizer._is_last_step_skipped):
                    steps += 1
                    step_taken()

    if cfg.dp:
        gsm.disable_hooks()
        history = accounting.dump_state(engine.accountant)
        epsilon = engine.accountant.get_epsilon(delta=cfg.accountant_delta)
        raw_opt = optimizer.original_optimizer
    else:
        history = accountant_state
        epsilon = math.inf  # any non-private step voids the record-level guarantee
        raw_opt = optimizer
    model.eval()
    buf = io.BytesIO()
    torch.save(raw_opt.state_dict(), buf)
    loss = sum(losses) / len(losses) if losses else float("nan")
    result = TrainResult(loss=loss, steps=steps, num_examples=len(data), epsilon=epsilon,
                         instruments=instruments.summary() if instruments is not None else None,
                         clip_norm=clipper.clip if clipper is not None else None)
    return result, history, buf.getvalue()


def _backward(net, input_ids, attention, labels, chunk: int | None) -> float:
    """Forward and backward over one batch; returns its loss.

    The loss is the mean over samples of each sample's mean token NLL: what
    Opacus' ``loss_reduction="mean"`` assumes when it rescales per-sample
    gradients. Without DP a batch is split into chunks of ``chunk`` rows whose
    gradients add up to the whole batch's.
    """
    input_ids, attention, labels = trim_batch(input_ids, attention, labels)
    n = len(input_ids)
    total = 0.0
    for start in range(0, n, chunk or n):
        sl = slice(start, start + (chunk or n))
        nll_sum, count = net(input_ids[sl], attention[sl], labels[sl])
        loss = (nll_sum / count.clamp(min=1)).sum() / n
        loss.backward()
        total += loss.item()
    return total


def _os_seeded_generator() -> torch.Generator:
    return torch.Generator().manual_seed(secrets.randbits(63))


@torch.no_grad()
def option_predictions(model: PersonalLM, examples: list[tuple[str, list[str]]], adapters: tuple[str, ...], max_len: int,
                       batch_size: int = 32, context: str = "") -> list[int]:
    """Classification by scoring the label options (as LaMP does): the option with the highest likelihood.

    Each (input, options) example is scored once per option: the summed NLL
    of the option's tokens after the prompt, under the given adapters.
    """
    pairs = [(source, option) for source, options in examples for option in options]
    if not pairs:
        return []
    tok = model.tokenizer
    longest = [max(len(tok(o, add_special_tokens=False)["input_ids"]) for o in options) + 1 for _, options in examples]
    rooms = [room for room, (_, options) in zip(longest, examples) for _ in options]
    data = encode_pairs(tok, pairs, max_len, answer_room=rooms, context=context)
    model.use(*adapters)
    model.eval()
    scores = []
    for i in range(0, len(data), batch_size):
        input_ids, attention, labels = trim_batch(*data[i : i + batch_size])
        nll_sum, _ = model(input_ids, attention, labels)
        scores += nll_sum.tolist()
    model.use(*model.tiers)
    out, at = [], 0
    for _, options in examples:
        block = scores[at : at + len(options)]
        out.append(min(range(len(options)), key=block.__getitem__))
        at += len(options)
    return out


def classification_scores(predicted: list, gold: list) -> dict[str, float]:
    """Accuracy and macro-F1 (over the labels present in gold or predicted) of one user's predictions."""
    if not gold:
        return {"accuracy": float("nan"), "macro_f1": float("nan")}
    accuracy = sum(p == g for p, g in zip(predicted, gold)) / len(gold)
    f1s = []
    for c in sorted(set(gold) | set(predicted)):
        tp = sum(p == c and g == c for p, g in zip(predicted, gold))
        fp = sum(p == c and g != c for p, g in zip(predicted, gold))
        fn = sum(p != c and g == c for p, g in zip(predicted, gold))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return {"accuracy": accuracy, "macro_f1": sum(f1s) / len(f1s)}


@torch.no_grad()
def evaluate_nll(model: PersonalLM, data: TensorDataset, adapters: tuple[str, ...], batch_size: int = 16) -> tuple[float, int]:
    """Mean NLL per target token with the given adapters active (() = base model)."""
    model.use(*adapters)
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(data), batch_size):
        input_ids, attention, labels = trim_batch(*data[i : i + batch_size])
        s, c = model(input_ids, attention, labels)
        total += s.sum().item()
        count += int(c.sum().item())
    model.use(*model.tiers)
    return (total / count if count else float("nan")), count
