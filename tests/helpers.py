"""Test helpers: tiny configs and messages; devices, the in-process grid and the strategy come from ``benchmarks.loopback``."""

from __future__ import annotations

from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from benchmarks.loopback import LoopbackGrid, codec_for, device_context, initial_arrays, strategy_for  # noqa: F401 - re-exported for the tests
from common.config import RunConfig, build_config
from common.models import AdapterSpec


def quick(**flat) -> RunConfig:
    """The quick profile (tiny model) with flat overrides given as keyword arguments (``persona_slots=0``)."""
    return build_config("quick", {k.replace("_", "-"): v for k, v in flat.items()})


def spec(**flat) -> AdapterSpec:
    return AdapterSpec.from_config(quick(**flat))


def server_message(cfg: RunConfig, kind: str, server_round: int = 1, config: dict | None = None, arrays: ArrayRecord | None = None, dst: int = 1) -> Message:
    content = {"arrays": arrays if arrays is not None else initial_arrays(cfg), "config": ConfigRecord({"server-round": server_round, **(config or {})})}
    return Message(content=RecordDict(content), dst_node_id=dst, message_type=kind)


def user_files(tiny_data: Path) -> list[Path]:
    return sorted((tiny_data / "data" / "users").glob("*.jsonl"))
