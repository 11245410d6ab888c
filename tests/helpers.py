"""Test helpers: tiny configs, device contexts with their own policy files, and an in-process grid."""

from __future__ import annotations

from pathlib import Path

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from common.config import RunConfig, build_config
from common.kslot import KSlotCodec
from common.models import AdapterSpec, personal_model


def quick(**flat) -> RunConfig:
    """The quick profile (tiny model) with flat overrides given as keyword arguments (``persona_slots=0``)."""
    return build_config("quick", {k.replace("_", "-"): v for k, v in flat.items()})


def spec(**flat) -> AdapterSpec:
    return AdapterSpec.from_config(quick(**flat))


def codec_for(cfg: RunConfig) -> KSlotCodec:
    shared = personal_model(AdapterSpec.from_config(cfg)).shared_params()
    return KSlotCodec({k: tuple(v.shape) for k, v in shared.items()}, cfg.persona.slots)


def initial_arrays(cfg: RunConfig) -> ArrayRecord:
    """What the ServerApp starts from: the global tier, every persona slot and the centroids."""
    model = personal_model(AdapterSpec.from_config(cfg))
    state = codec_for(cfg).initial_state(model.initial_shared_state(), cfg.persona.init_std, cfg.seed)
    return ArrayRecord({k: Array(v) for k, v in state.items()})


def server_message(cfg: RunConfig, kind: str, server_round: int = 1, config: dict | None = None, arrays: ArrayRecord | None = None, dst: int = 1) -> Message:
    content = {"arrays": arrays if arrays is not None else initial_arrays(cfg), "config": ConfigRecord({"server-round": server_round, **(config or {})})}
    return Message(content=RecordDict(content), dst_node_id=dst, message_type=kind)


def device_context(tmp: Path, node_id: int, user_file: Path, cfg: RunConfig, run_config: dict | None = None, **policy) -> Context:
    """A device with its own policy file (the run's own settings as the floor, ``policy`` on top)."""
    from dataclasses import replace

    from client.policy import write_policy
    from simulations.run import device_policy

    folder = Path(tmp) / f"device-{node_id}"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "policy.json"
    write_policy(path, replace(device_policy(cfg, Path(user_file), folder / "store.sqlite"), **policy))
    return Context(run_id=1, node_id=node_id, node_config={"policy-file": str(path)}, state=RecordDict(), run_config=run_config if run_config is not None else cfg.flat())


def user_files(tiny_data: Path) -> list[Path]:
    return sorted((tiny_data / "data" / "users").glob("*.jsonl"))


class LoopbackGrid:
    """Routes messages to ClientApps in-process: a transport for tests, nothing more."""

    def __init__(self, app, contexts: dict[int, Context], drop=()):
        self.app, self.contexts, self.drop = app, contexts, set(drop)
        self.seen = []

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for msg in messages:
            nid = msg.metadata.dst_node_id
            self.seen.append((msg.metadata.message_type, msg.content))
            if (nid, msg.metadata.message_type) in self.drop:
                continue
            reply = self.app(msg, self.contexts[nid])
            # Flower's runtime stamps the sender on delivery; this loopback does it here.
            reply.metadata.__dict__["_src_node_id"] = nid
            replies.append(reply)
        return replies


def strategy_for(cfg: RunConfig, num_rounds: int = 1):
    from common.privacy import build_pipeline
    from server.strategy import TieredFedAvg

    codec = codec_for(cfg)
    return TieredFedAvg(cfg, codec, build_pipeline(cfg, codec), num_rounds)
