"""Answer the device's owner with the model the device serves, on the device (``fedpersona ask``).

The prompt is user text. It is scrubbed with the device's own scrubber (the
scrub mode, operator and Presidio YAML the device was admitted with when it
kept its served model, never below its policy's floor when a policy is
given, and never ``off``) before the model sees it: the model was trained on
scrubbed text, in the same plain ``input\\n`` format, and the raw prompt goes
no further than the scrubber.

**Nothing is stored.** The store is opened without ingestion
(:func:`client.device.read_store`) and only read: neither the prompt nor the
answer is written to it, to a log or to an exception. A prompt the scrubber
cannot scrub is refused with the scrubber's reason code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from client import device
from client.policy import SCRUB_RANK, DevicePolicy
from client.served import ServedStack
from client.store import DeviceStore
from common.models import PersonalLM


class PromptRefused(RuntimeError):
    """The prompt cannot be used; carries a reason code, never text."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(f"the prompt was not used: {reason}")


@dataclass(frozen=True)
class GenerationOptions:
    max_new_tokens: int = 64
    sample: bool = False  # greedy unless set
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None  # for sampling; None = OS entropy

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        if self.temperature <= 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError("temperature must be > 0, top_p in (0, 1] and top_k >= 0")


@dataclass(frozen=True)
class Answer:
    text: str
    scrubbed_entities: int  # how many PII entities the scrubber replaced in the prompt
    new_tokens: int


def scrub_settings(stack: ServedStack, policy: DevicePolicy | None) -> tuple[str, str, str]:
    """(mode, operator, YAML) of the device's scrubber: as admitted, tightened to the policy's floor; never off."""
    if policy is None:
        mode, operator, config = stack.scrub_mode, stack.scrub_operator, stack.scrub_config
    else:
        mode = max(stack.scrub_mode, policy.min_scrub_mode, key=SCRUB_RANK.__getitem__)
        operator, config = policy.scrub_operator, policy.scrub_config
    return max(mode, "patterns", key=SCRUB_RANK.__getitem__), operator, config


def scrub_prompt(store: DeviceStore, stack: ServedStack, policy: DevicePolicy | None, prompt: str) -> tuple[str, int]:
    """The scrubbed prompt and its entity count; :class:`PromptRefused` if it cannot be scrubbed."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise PromptRefused("empty")
    mode, operator, config = scrub_settings(stack, policy)
    secret = store.device_secret() if operator == "pseudonym" else b""
    outcome = device.scrubber(mode, operator, config, secret)([prompt])[0]
    if outcome.error is not None or outcome.text is None:
        raise PromptRefused(outcome.error or "scrub_no_text")
    return outcome.text, outcome.entity_count


@torch.no_grad()
def generate(model: PersonalLM, text: str, options: GenerationOptions) -> tuple[str, int]:
    """Generate after ``text`` with the model's active stack; returns (answer, new tokens)."""
    tok = model.tokenizer
    ids = tok(text + "\n", add_special_tokens=False)["input_ids"]
    room = int(getattr(model.peft.config, "max_position_embeddings", 0) or 0)
    if room:
        keep = room - options.max_new_tokens - (model.spec.prompt_tokens if model.prompt_active else 0)
        if keep < 1:
            raise PromptRefused("max_new_tokens_too_large")
        ids = ids[-keep:]  # the end of an over-long prompt, next to the answer
    input_ids = torch.tensor([ids], dtype=torch.long)
    kwargs = {"max_new_tokens": options.max_new_tokens, "pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id}
    if options.sample:
        kwargs.update(do_sample=True, temperature=options.temperature, top_p=options.top_p, top_k=options.top_k or None)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    rng = torch.random.fork_rng()
    with rng:
        if options.sample and options.seed is not None:
            torch.manual_seed(options.seed)
        out = model.generate(input_ids, torch.ones_like(input_ids), **kwargs)
    new = out[0].tolist()
    return tok.decode(new, skip_special_tokens=True).strip(), len(new)


def ask(store: DeviceStore, model: PersonalLM, stack: ServedStack, policy: DevicePolicy | None, prompt: str,
        options: GenerationOptions) -> Answer:
    """Scrub the prompt with the device's scrubber, then generate with the served model. Stores nothing."""
    text, entities = scrub_prompt(store, stack, policy, prompt)
    # The device's context phrases go first, as in training and evaluation; an over-long prompt
    # keeps its end (generate), so the user's own words are never the part cut.
    answer, new_tokens = generate(model, stack.context + text, options)
    return Answer(answer, entities, new_tokens)
