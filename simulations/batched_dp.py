"""DP-SGD for many simulated devices in one pass over one frozen base (issue 15's GPU path).

A simulation that trains one device at a time runs the frozen base once per
device and step, with Opacus' hooks around it. On a GPU that leaves the chip
idle: one device's batch (16 records of 64 tokens) is far too small to fill
it. Here the devices of a pass share the frozen base and each keeps its own
trainable tensors, stacked along a leading device axis:

* **Stacked state.** Every trainable tensor of :class:`~common.models.PersonalLM`
  (the LoRA of every tier, the soft prompt) is held as ``[devices, ...]``.
  Adam and SGD are elementwise, so one optimizer over the stacked tensors
  is exactly one optimizer per device.
* **The frozen prefix once.** With ``adapter-layers = N`` the layers below the
  first adapted one never change; their output is computed once per record
  (as the device's ``PrefixCache`` does) and only the top N layers run per step.
* **Per-sample gradients from saved activations.** In a pass, every sample row
  gets its own copy of its device's tensors (:class:`RowwiseLinear`,
  :class:`RowwisePrompt` swapped into the model). The forward of a row's LoRA
  is ``einsum("sti,soi->sto", x, W_s)``, so autograd's backward leaves in
  ``W_s.grad`` exactly ``sum_t g_t x_t^T`` for that row: the einsum Opacus'
  ``nn.Linear`` grad sampler forms from the activations and backprops it saves.
* **Clip per sample, noise per device, in fp32.** Each sample's gradient is
  clipped to C over all its tensors together (Opacus' flat clipping, the same
  ``C / (norm + 1e-6)`` factor), summed per device, noised with that device's
  own ``sigma * C`` Gaussian and divided by its expected batch, as Opacus'
  ``DPOptimizer`` does. The frozen base may run in bf16 on a GPU; the trainable
  tensors, per-sample gradients, clipping and noise stay fp32.
* **Accounting per device.** Each device keeps its own Opacus accountant
  (``client.accounting``), charged ``(sigma, q, steps)`` exactly as
  ``client.train.train_local`` charges it.

This is a simulation engine, not a device: it holds many users' tensors in
one process, which a real device never does. The noise comes from a generator
seeded by the OS (``secrets``), never from the run config or anything the
server knows. ``tests/test_batched_dp.py`` checks it against per-device
Opacus on the tiny model: per-sample gradients, clipping and the optimizer
step, and epsilon.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from client import accounting
from client.train import clip_factors, make_optimizer, trim_batch
from common.config import TrainConfig
from common.models import IGNORE, PROMPT_KEY, PersonalLM, canonical_lora_name


class RowwiseLinear(nn.Module):
    """A bias-free linear map with its own weight for every row of the batch: ``weight`` is ``[rows, out, in]``.

    peft's LoRA layer calls ``lora_A(x)`` and ``lora_B(...)`` and reads
    ``.weight.dtype`` to cast its input: this module stands in for either.
    """

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 rows under a bf16 base: peft does not cast the input up, so the stand-in does.
        return torch.einsum("sti,soi->sto", x.to(self.weight.dtype), self.weight)


class RowwisePrompt(nn.Module):
    """The soft prompt with its own ``[tokens, hidden]`` tensor for every row, cast to the base's dtype."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self.weight, self.dtype = weight, dtype

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        if token_ids.shape != self.weight.shape[:2]:
            raise ValueError(f"prompt ids {tuple(token_ids.shape)} do not match the rows' prompts {tuple(self.weight.shape[:2])}")
        return self.weight.to(self.dtype)


def _module_slots(model: PersonalLM) -> dict[str, tuple[nn.Module, str]]:
    """Each trainable tensor's canonical name -> (the container that holds its module, the key in it)."""
    names = set(model.trainable_state())
    slots: dict[str, tuple[nn.Module, str]] = {}
    for name, _ in model.named_parameters():
        if "lora_" not in name:
            continue
        canonical = canonical_lora_name(name)
        if canonical not in names:
            continue  # a frozen FFA A: shared by every device, it stays a plain nn.Linear
        path = name.rsplit(".", 2)  # "...lora_A", "global", "weight"
        slots[canonical] = (model.get_submodule(path[0]), path[1])
    slots[PROMPT_KEY] = (model, "user_embedding")
    return slots


@contextmanager
def rowwise(model: PersonalLM, rows: dict[str, torch.Tensor], dtype: torch.dtype):
    """Swap every trainable module of ``model`` for its row-wise stand-in for the duration of the block."""
    slots = _module_slots(model)
    saved = {}
    try:
        for name, (holder, key) in slots.items():
            if name == PROMPT_KEY:
                saved[name] = holder.user_embedding
                holder.user_embedding = RowwisePrompt(rows[name], dtype)
            else:
                saved[name] = holder[key]
                holder[key] = RowwiseLinear(rows[name])
        yield
    finally:
        for name, module in saved.items():
            holder, key = slots[name]
            if name == PROMPT_KEY:
                holder.user_embedding = module
            else:
                holder[key] = module


@dataclass
class DeviceData:
    """One simulated device's encoded records (``client.train.encode_pairs`` rows, right-padded)."""

    input_ids: torch.Tensor
    attention: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.input_ids)


def _same_width(data: Sequence[DeviceData], pad_id: int) -> list[DeviceData]:
    """Right-pad every device's rows to the widest device's width, so that rows of several devices stack."""
    width = max(d.input_ids.shape[1] for d in data)

    def pad(t: torch.Tensor, value: int) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

    return [DeviceData(pad(d.input_ids, pad_id), pad(d.attention, 0), pad(d.labels, IGNORE)) for d in data]


class BatchedDPSGD:
    """Record-level DP-SGD for many devices at once, each with its own tensors, noise, optimizer and accountant.

    ``states`` are the devices' ``PersonalLM.trainable_state()`` dicts (any
    device), ``noise_multipliers`` their own sigma (``client.accounting.calibrated_noise``).
    ``devices_per_pass`` bounds how many devices' rows one forward holds.
    """

    def __init__(self, model: PersonalLM, data: Sequence[DeviceData], states: Sequence[dict[str, torch.Tensor]],
                 cfg: TrainConfig, noise_multipliers: Sequence[float], devices_per_pass: int = 64,
                 device: torch.device | str = "cpu"):
        if not model.spec.adapter_layers:
            raise ValueError("the batched path needs adapter-layers > 0 (a frozen prefix shared by every device)")
        if cfg.local_optimizer not in ("adam", "sgd"):
            # DP-AdamBC subtracts one noise variance per optimizer; here each device has its own.
            raise ValueError(f"the batched path runs optimizer = adam or sgd, not {cfg.local_optimizer!r}")
        if cfg.context != "none":
            # The phrase release runs per device (client/context.py); this path trains from encoded tensors only.
            raise ValueError("the batched path runs context = none")
        if not (len(data) == len(states) == len(noise_multipliers)):
            raise ValueError("data, states and noise_multipliers need one entry per device")
        self.model, self.cfg, self.device = model, cfg, torch.device(device)
        self.data = _same_width(data, model.tokenizer.pad_token_id)
        self.names = sorted(model.trainable_state())  # client.train's order
        self.params = {n: torch.stack([s[n].detach().float() for s in states]).to(self.device) for n in self.names}
        self.noise_multipliers = [float(z) for z in noise_multipliers]  # exact, for the accountants
        self.sigma = torch.tensor(self.noise_multipliers, dtype=torch.float32, device=self.device)
        self.rates = [accounting.sample_rate(cfg, len(d)) for d in self.data]
        # Opacus' DPOptimizer divides by int(records x rate) (privacy_engine.make_private).
        self.expected = torch.tensor([max(1, int(len(d) * q)) for d, q in zip(self.data, self.rates)],
                                     dtype=torch.float32, device=self.device)
        self.devices_per_pass = max(1, int(devices_per_pass))
        # The device's own optimizer (client.train.make_optimizer), over the stacked tensors.
        self.optimizer = make_optimizer(list(self.params.values()), cfg)
        self.accountants = [accounting.new_accountant(cfg.accountant) for _ in self.data]
        self.steps = 0
        # Which records a Poisson batch holds, and the noise, come from the OS: never from a seed the server knows.
        self.generator = torch.Generator(device=self.device).manual_seed(secrets.randbits(63))
        self.sample_generator = torch.Generator().manual_seed(secrets.randbits(63))
        self.base_dtype = next(p for n, p in model.named_parameters() if "lora_" not in n and "user_embedding" not in n).dtype
        self.prefix = self._prefix_states()

    # -- the frozen prefix, once per record ------------------------------------
    @torch.no_grad()
    def _prefix_states(self) -> list[torch.Tensor]:
        """Every device's hidden states entering the first adapted layer (the base is frozen below it)."""
        model, out = self.model, []
        for start in range(0, len(self.data), self.devices_per_pass):
            chunk = self.data[start : start + self.devices_per_pass]
            ids = torch.cat([d.input_ids for d in chunk]).to(self.device)
            mask = torch.cat([d.attention for d in chunk]).to(self.device)
            embeds = model.peft.get_input_embeddings()(ids)
            # Padding positions hold zeros, as in the device's PrefixCache.
            hidden = model._run_layers(embeds, mask, 0, model.first_adapted) * mask[..., None].to(embeds.dtype)
            out += list(hidden.split([len(d) for d in chunk]))
        return out

    # -- one step ----------------------------------------------------------------
    def _draw(self) -> list[torch.Tensor]:
        """Each device's Poisson batch: record i is in with probability q (every record at q = 1)."""
        picks = []
        for d, q in zip(self.data, self.rates):
            if q >= 1.0:
                picks.append(torch.arange(len(d)))
            else:
                picks.append(torch.nonzero(torch.rand(len(d), generator=self.sample_generator) < q).flatten())
        return picks

    def per_sample_grads(self, devices: Sequence[int], picks: Sequence[torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Per-sample gradients of each picked record's mean target-token NLL: ``{name: [rows, ...]}`` and each row's device."""
        model = self.model
        owner = torch.cat([torch.full((len(p),), i, dtype=torch.long) for i, p in zip(devices, picks)]).to(self.device)
        ids = torch.cat([self.data[i].input_ids[p] for i, p in zip(devices, picks)]).to(self.device)
        mask = torch.cat([self.data[i].attention[p] for i, p in zip(devices, picks)]).to(self.device)
        labels = torch.cat([self.data[i].labels[p] for i, p in zip(devices, picks)]).to(self.device)
        hidden = torch.cat([self.prefix[i][p.to(self.device)] for i, p in zip(devices, picks)])
        width = trim_batch(ids, mask, labels)[0].shape[1]
        hidden, mask, labels = hidden[:, :width], mask[:, :width], labels[:, :width]
        rows = {n: self.params[n][owner].detach().requires_grad_(True) for n in self.names}
        model.use(*model.tiers)
        with rowwise(model, rows, self.base_dtype), torch.enable_grad():
            nll_sum, count = model.forward_from_prefix(hidden, mask, labels)
            (nll_sum / count.clamp(min=1)).sum().backward()
        return {n: rows[n].grad for n in self.names}, owner

    def clipped_sums(self, picks: Sequence[torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Per device, the sum of its samples' gradients clipped to C (zeros for an empty batch); and every sample's norm."""
        sums = {n: torch.zeros_like(p) for n, p in self.params.items()}
        norms = []
        for start in range(0, len(self.data), self.devices_per_pass):
            devices = [i for i in range(start, min(start + self.devices_per_pass, len(self.data))) if len(picks[i])]
            if not devices:
                continue
            grads, owner = self.per_sample_grads(devices, [picks[i] for i in devices])
            norm, factor = clip_factors(list(grads.values()), self.cfg.max_grad_norm)
            for n, g in grads.items():
                sums[n].index_add_(0, owner, g * factor.view(-1, *[1] * (g.dim() - 1)))
            norms.append(norm.detach())
        return sums, torch.cat(norms) if norms else torch.zeros(0, device=self.device)

    def privatize(self, sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each device's noisy mean: its clipped sum plus its own N(0, (sigma C)^2), over its expected batch (fp32)."""
        out = {}
        for n, s in sums.items():
            shape = (-1, *[1] * (s.dim() - 1))
            noise = torch.randn(s.shape, generator=self.generator, device=self.device, dtype=torch.float32)
            out[n] = (s + noise * (self.sigma * self.cfg.max_grad_norm).view(shape)) / self.expected.view(shape)
        return out

    def step(self) -> dict[str, float]:
        """One DP-SGD step on every device; returns the step's clip fraction and median per-sample norm."""
        picks = self._draw()
        sums, norms = self.clipped_sums(picks)
        grads = self.privatize(sums)
        for n, p in self.params.items():
            p.grad = grads[n]
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        for acc, z, q in zip(self.accountants, self.noise_multipliers, self.rates):
            acc.step(noise_multiplier=z, sample_rate=q)  # Opacus folds repeated (sigma, q) steps into one entry
        self.steps += 1
        clipped = float((norms > self.cfg.max_grad_norm).float().mean()) if len(norms) else math.nan
        return {"clip_fraction": clipped, "grad_norm_q50": float(norms.median()) if len(norms) else math.nan}

    # -- results -----------------------------------------------------------------
    def state(self, i: int) -> dict[str, torch.Tensor]:
        """Device ``i``'s trained tensors (CPU, fp32), as ``PersonalLM.load_trainable`` takes them."""
        return {n: p[i].detach().to("cpu") for n, p in self.params.items()}

    def epsilons(self) -> list[float]:
        """Each device's record-level epsilon at the configured delta (devices with the same history share one answer)."""
        memo: dict[tuple, float] = {}
        out = []
        for acc in self.accountants:
            key = tuple(acc.history)
            if key not in memo:
                memo[key] = acc.get_epsilon(delta=self.cfg.accountant_delta) if acc.history else 0.0
            out.append(memo[key])
        return out
