"""The model this device serves its owner: kept in its store when it evaluates, rebuilt from there.

The server's last message of a run asks each device to evaluate the final
tiers (server/strategy.py). The device then scores every tier stack and
serves its user the stack of its routing group (common/models.py):

* cold-start: the global LoRA adapter;
* occasional: global + persona adapters (global alone for a device without a
  persona slot);
* frequent: global + persona + user adapters and the soft prompt (the user
  embedding).

At that moment the device keeps a snapshot of exactly that stack in its
store, one sealed state blob (:data:`SERVED_MODEL`): a safetensors file of
the served tiers' trainable tensors under their canonical names, with what
is needed to rebuild the model in its metadata (the adapter spec, the
adapters, the routing group, the round, the scrub settings the device was
admitted with and the run's max length). Frozen FFA ``A`` factors are not in
it: they are regenerated from the spec's seed, as both sides of every round
do. The user tier in the snapshot is the one that was evaluated, so the
served model is the one whose scores the device kept.

Nothing here leaves the device. ``fedpersona export`` and ``fedpersona
ask`` read the snapshot back with :func:`load_served` from a store opened by
:func:`client.device.read_store` (no ingestion, nothing written).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from client.store import DeviceStore
from common.config import RunConfig
from common.models import GROUP_NAMES, USER, AdapterSpec, PersonalLM, personal_model, tier_of

SERVED_MODEL = "served-model.safetensors"
_META_KEY = "fedpersona.served"


class NoServedModel(RuntimeError):
    """The store holds no served model yet (names the store, nothing else)."""


@dataclass(frozen=True)
class ServedStack:
    """What the device serves, and how to rebuild it."""

    spec: AdapterSpec
    adapters: tuple[str, ...]  # active LoRA adapters, in tier order
    routing_group: str
    server_round: int
    scrub_mode: str  # the scrubber the device was admitted with (at least its policy's floor)
    scrub_operator: str
    scrub_config: str
    max_len: int
    context: str = ""  # the device's context phrases, put before every prompt (client/context.py)

    @property
    def prompt(self) -> bool:
        """Whether the soft prompt is served (it belongs to the user tier)."""
        return USER in self.adapters

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "spec": asdict(self.spec)})

    @classmethod
    def from_json(cls, text: str) -> "ServedStack":
        raw = json.loads(text)
        spec = raw.pop("spec")
        return cls(spec=AdapterSpec(**{**spec, "target_modules": tuple(spec["target_modules"])}),
                   **{**raw, "adapters": tuple(raw["adapters"])})


def keep_served(store: DeviceStore, model: PersonalLM, cfg: RunConfig, adapters: tuple[str, ...],
                group: int, server_round: int, context: str = "") -> None:
    """Snapshot the stack this device serves (the model's live tensors of ``adapters``) into its store."""
    stack = ServedStack(
        spec=model.spec, adapters=tuple(adapters), routing_group=GROUP_NAMES[group], server_round=server_round,
        scrub_mode=cfg.scrub.mode, scrub_operator=cfg.scrub.operator, scrub_config=cfg.scrub.config,
        max_len=cfg.train.max_len, context=context,
    )
    tensors = {k: v.detach().contiguous().clone() for k, v in model.trainable_state().items()
               if tier_of(k) in adapters}
    store.put_state(SERVED_MODEL, save_tensors(tensors, metadata={_META_KEY: stack.to_json()}))


def read_served(store: DeviceStore) -> tuple[ServedStack, dict[str, torch.Tensor]]:
    """The served stack's description and tensors, as kept by :func:`keep_served`."""
    blob = store.get_state(SERVED_MODEL)
    if blob is None:
        raise NoServedModel(f"{store.path}: no served model yet (a device keeps it when it evaluates a run's final model)")
    tensors = load_tensors(blob)
    # The description is the safetensors header's metadata (an 8-byte length, then JSON).
    header_len = int.from_bytes(blob[:8], "little")
    meta = json.loads(blob[8 : 8 + header_len]).get("__metadata__") or {}
    if _META_KEY not in meta:
        raise NoServedModel(f"{store.path}: the served model has no description; let the device evaluate again")
    return ServedStack.from_json(meta[_META_KEY]), tensors


def load_served(store: DeviceStore) -> tuple[PersonalLM, ServedStack]:
    """This process's personalised model with the served stack loaded and active."""
    stack, tensors = read_served(store)
    model = personal_model(stack.spec)
    model.reset_to_initial()
    model.load_trainable(tensors)
    model.use(*stack.adapters)
    model.eval()
    return model, stack
