"""Local training on the device: LoRA adapters + soft prompt under Opacus DP-SGD.

One process holds one :class:`~common.models.PersonalLM` and one Opacus
``GradSampleModule`` around it for its whole life. Each user's round swaps in
that user's tensors, optimizer state and accountant history, trains, and swaps
them out again. The record-level privacy accountant is therefore *persisted*
across rounds (in the device store), never reset.
"""

from __future__ import annotations

import io
import json
import math
import secrets
import warnings
from dataclasses import dataclass

import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from common.config import TrainConfig
from common.models import PersonalLM

IGNORE = -100


# --------------------------------------------------------------------------- #
# Data
# --------------------------------------------------------------------------- #


def encode_pairs(tokenizer, pairs: list[tuple[str, str]], max_len: int) -> TensorDataset:
    """Tokenise (input, output) pairs; the loss covers only the output tokens.

    The format is plain ``input\\n output<eos>`` for every model, so the base,
    global and personalised scores are comparable.
    """
    ids_rows, label_rows = [], []
    for source, target in pairs:
        prompt = tokenizer(source + "\n", add_special_tokens=False)["input_ids"]
        answer = tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        prompt = prompt[: max_len // 2]  # keep room for the answer, which carries the style
        ids = (prompt + answer)[:max_len]
        labels = ([IGNORE] * len(prompt) + answer)[:max_len]
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


def per_sample_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (sum of token NLL, number of target tokens), next-token shifted."""
    logits = logits[:, :-1]
    labels = labels[:, 1:]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE, reduction="none")
    nll = nll.view(labels.shape)
    mask = labels != IGNORE
    return (nll * mask).sum(1), mask.sum(1)


# --------------------------------------------------------------------------- #
# Training
# --------------------------------------------------------------------------- #


@dataclass
class TrainResult:
    loss: float
    steps: int
    num_examples: int
    epsilon: float  # record-level, cumulative over all rounds so far; inf without DP


def make_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    # Adam rescales every coordinate to its own noise level, so under DP every
    # LoRA weight random-walks by ~lr per step; SGD keeps the noise at its true
    # (small, per-coordinate) scale. Both are offered; see docs/results.md.
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r} (adam or sgd)")


_GSM: dict[int, object] = {}


def _grad_sample_module(model: PersonalLM):
    """Wrap the model once per process; Opacus reuses an existing wrapper."""
    from opacus import GradSampleModule

    if id(model) not in _GSM:
        _GSM[id(model)] = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    return _GSM[id(model)]


def _trainable(model: PersonalLM) -> list[torch.nn.Parameter]:
    # A stable order matters: optimizer state is saved and restored by index.
    return [p for _, p in sorted(model.trainable_state().items())]


def train_local(
    model: PersonalLM,
    data: TensorDataset,
    cfg: TrainConfig,
    accountant_state: str | None,
    optimizer_state: bytes | None,
    generator: torch.Generator | None = None,
) -> tuple[TrainResult, str | None, bytes]:
    """Run ``cfg.local_steps`` optimizer steps on this user's data.

    Returns the result, the updated accountant state (Opacus ``state_dict`` as
    JSON) and the optimizer state. The model's current tensors are the
    starting point and are updated in place.
    """
    from opacus import PrivacyEngine

    model.use(*model.tiers)
    model.train()
    params = _trainable(model)
    optimizer = make_optimizer(params, cfg)
    if optimizer_state:
        optimizer.load_state_dict(torch.load(io.BytesIO(optimizer_state), weights_only=True))
    batch_size = min(cfg.batch_size, len(data))
    if cfg.dp and generator is None:
        # Which records a Poisson batch holds must stay secret from the server:
        # amplification by sampling assumes it. So under DP the coins come from
        # the OS, never from a seed in the run config (a seeded generator is
        # for dp=false runs and tests).
        generator = _os_seeded_generator()
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, generator=generator)

    gsm = _grad_sample_module(model)
    engine = None
    if cfg.dp:
        gsm.enable_hooks()
        engine = PrivacyEngine(accountant="rdp")
        if accountant_state:
            engine.accountant.load_state_dict(_load_accountant_state(accountant_state))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Opacus warns about secure RNG; see README threat model
            net, optimizer, loader = engine.make_private(
                module=gsm,
                optimizer=optimizer,
                data_loader=loader,
                noise_multiplier=cfg.noise_multiplier,
                max_grad_norm=cfg.max_grad_norm,
                poisson_sampling=True,
                # Opacus' secure_mode needs torchcsprng (no wheel for Python 3.11);
                # the noise generator is at least seeded from the OS, never from
                # anything the server knows.
                noise_generator=_os_seeded_generator(),
            )
        rate = 1 / len(loader)
    else:
        gsm.disable_hooks()
        net = model

    assert engine is None or abs(rate - sample_rate(cfg, len(data))) < 1e-12  # the rate the device's budget checks use
    losses, steps = [], 0
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
                continue
            input_ids, attention, labels = trim_batch(input_ids, attention, labels)
            logits = net(input_ids, attention)
            nll_sum, count = per_sample_nll(logits, labels)
            # Mean over samples of each sample's mean token NLL: what Opacus'
            # loss_reduction="mean" assumes when it rescales per-sample grads.
            loss = (nll_sum / count.clamp(min=1)).mean()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            steps += 1

    if cfg.dp:
        gsm.disable_hooks()
        history = _dump_accountant_state(engine.accountant)
        epsilon = engine.accountant.get_epsilon(delta=cfg.delta)
        raw_opt = optimizer.original_optimizer
    else:
        history = accountant_state
        epsilon = math.inf  # any non-private step voids the record-level guarantee
        raw_opt = optimizer
    model.eval()
    buf = io.BytesIO()
    torch.save(raw_opt.state_dict(), buf)
    loss = sum(losses) / len(losses) if losses else float("nan")
    return TrainResult(loss=loss, steps=steps, num_examples=len(data), epsilon=epsilon), history, buf.getvalue()


def _os_seeded_generator() -> torch.Generator:
    return torch.Generator().manual_seed(secrets.randbits(63))


def _dump_accountant_state(accountant) -> str:
    state = accountant.state_dict()
    return json.dumps({"history": [list(h) for h in state["history"]], "mechanism": state["mechanism"]})


def _load_accountant_state(blob: str) -> dict:
    state = json.loads(blob)
    return {"history": [tuple(h) for h in state["history"]], "mechanism": state["mechanism"]}


def _accountant(accountant_state: str | None):
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    if accountant_state:
        acc.load_state_dict(_load_accountant_state(accountant_state))
    return acc


def accountant_history(accountant_state: str | None) -> list[tuple[float, float, int]]:
    """(noise multiplier, sample rate, steps) entries of a persisted accountant state."""
    return list(_accountant(accountant_state).history)


def epsilon_from_history(accountant_state: str | None, delta: float) -> float:
    """Record-level epsilon of a persisted accountant state (0 before any step)."""
    acc = _accountant(accountant_state)
    return acc.get_epsilon(delta=delta) if acc.history else 0.0


def sample_rate(cfg: TrainConfig, num_records: int) -> float:
    """The Poisson sampling rate of one DP-SGD step: batch / records, at most 1 (as Opacus' DPDataLoader)."""
    return 1 / max(1, math.ceil(num_records / min(cfg.batch_size, num_records))) if num_records else 1.0


def would_exceed(accountant_state: str | None, cfg: TrainConfig, num_records: int, cap: float) -> bool:
    """Would one more round of ``cfg.local_steps`` DP-SGD steps take this device past ``cap`` (0 = none)?"""
    if not cfg.dp or cap <= 0:
        return False
    acc = _accountant(accountant_state)
    acc.history.append((cfg.noise_multiplier, sample_rate(cfg, num_records), cfg.local_steps))
    return acc.get_epsilon(delta=cfg.delta) > cap


@torch.no_grad()
def evaluate_nll(model: PersonalLM, data: TensorDataset, adapters: tuple[str, ...], batch_size: int = 16) -> tuple[float, int]:
    """Mean NLL per target token with the given adapters active (() = base model)."""
    model.use(*adapters)
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(data), batch_size):
        input_ids, attention, labels = trim_batch(*data[i : i + batch_size])
        s, c = per_sample_nll(model(input_ids, attention), labels)
        total += s.sum().item()
        count += int(c.sum().item())
    model.use(*model.tiers)
    return (total / count if count else float("nan")), count
