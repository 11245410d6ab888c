"""The three parameter tiers, persona slot names and routing groups, shared by both halves.

Tiers (see the README's architecture section):

* ``global``: one LoRA adapter, aggregated over every sampled client;
* ``persona``: K LoRA adapters ("slots"), slot k aggregated over the clients
  that chose persona k. The model holds one live ``persona/`` adapter; the
  server holds K copies under ``persona{k}/`` and the device loads the slot it
  chose into the live adapter;
* ``user``: a private LoRA adapter + the soft prompt; never leaves the device.

The K-slot update that hides the persona choice is laid out by
:mod:`common.kslot`.

Routing by data volume decides which tiers serve a user: cold-start users the
global tier, occasional users global + persona, frequent users all three.
"""

from __future__ import annotations

GLOBAL = "global"
PERSONA = "persona"
USER = "user"

# Routing groups (integer codes, as kept in the device store).
COLD_START, OCCASIONAL, FREQUENT = 0, 1, 2
GROUP_NAMES = {COLD_START: "cold-start", OCCASIONAL: "occasional", FREQUENT: "frequent"}


def slot_prefix(k: int) -> str:
    return f"{PERSONA}{k}/"


def slot_key(live_key: str, k: int) -> str:
    """``persona/layers.0...`` (the live adapter) -> ``persona{k}/layers.0...`` (slot k)."""
    return slot_prefix(k) + live_key.split("/", 1)[1]


def live_key(slot_key_: str) -> str:
    """``persona{k}/layers.0...`` -> ``persona/layers.0...``."""
    return f"{PERSONA}/" + slot_key_.split("/", 1)[1]


def slot_of(key: str) -> int | None:
    """The slot index of a server-side key, or None for non-slot keys."""
    head = key.split("/", 1)[0]
    if head.startswith(PERSONA) and head[len(PERSONA):].isdigit():
        return int(head[len(PERSONA):])
    return None


def routing_group(num_train_records: int, cold_start_below: int, frequent_from: int) -> int:
    """Which tiers serve a user, by how much data the device holds."""
    if num_train_records < cold_start_below:
        return COLD_START
    if num_train_records < frequent_from:
        return OCCASIONAL
    return FREQUENT
