"""Privacy mechanisms as two-sided steps, run in order on the device and in reverse on the server.

After pfl-research's ``Postprocessor`` (``postprocess_one_user`` on the device,
``postprocess_server`` after aggregation): each :class:`Step` has a device half
that transforms one user's update and a server half that acts on the
aggregate. :class:`Pipeline` runs the device halves in order and the server
halves in reverse, checks its own order (clip before noise, noise before the
sum, the egress guard last), and collects each step's metrics.

Device-side metrics describe one user's data. They stay on the device (its
store keeps them for the simulation's diagnostics) and never go on the wire.
Server-side metrics describe the aggregate and go into the report.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from common.kslot import KSlotCodec


@dataclass
class DeviceUpdate:
    """One user's update on its way out: the flat K-slot vector, then the wire payload."""

    codec: KSlotCodec
    vector: np.ndarray  # float64, the K-slot layout
    payload: Any = None  # the ArrayRecord that will be sent (set by the summation step)
    secagg_request: dict | None = None  # the stage-2 request this round's message carried
    secagg_state: dict | None = None  # this device's secure-aggregation state (context.state), in and out
    min_contributors: int | None = None  # the fewest contributors the secure sum will unmask (from its setup)
    clip_norm: float | None = None  # this round's user-level C from the server (adaptive clipping), capped by the clip step
    sensitivity: float | None = None  # the update's norm bound once clipped (set by the clip step; the noise scales to it)
    trained: bool = True  # False for a device that was not drawn this round and sends zeros


@dataclass
class Reply:
    node_id: int
    content: Any  # the reply's RecordDict
    vector: np.ndarray | None = None  # its float update, when the round is not masked


@dataclass
class ServerAggregate:
    """A round's replies on their way in: validated, summed, noised, decoded."""

    codec: KSlotCodec
    replies: Iterable[Reply]  # consumed once, as they arrive: the sum keeps a running total, never the list
    expected: float  # the fixed denominator: the cohort size, or q*N under Poisson sampling
    total: np.ndarray | None = None  # the sum over contributors (float64, K-slot layout)
    contributors: int = 0
    rejected: int = 0  # replies a step refused (malformed, or over the clip bound)
    reply_ok: Callable[[np.ndarray], bool] = lambda v: True  # every step's per-reply check (plain rounds)


@dataclass
class ServerRound:
    """What a server half may use in a round: the cohort and a way to talk to it."""

    server_round: int
    node_ids: list[int]
    # Send one stage message per node (node id -> ConfigRecord-ready dict) and
    # return the valid replies (node id -> dict); set by the strategy.
    query: Callable[[dict[int, dict]], dict[int, dict]] | None = None
    state: dict = field(default_factory=dict)  # per-round state a step keeps between setup and aggregate


class Step:
    """One mechanism. Subclasses override what they need; every half returns metrics (a dict of numbers)."""

    name = "step"
    # Position in the pipeline: lower runs earlier on the device.
    rank = 0
    # True for a step that changes the update itself (clip, noise); False for
    # one that only carries it (the sums, the guard). A replayed update, already
    # clipped and noised once, passes only through the carriers.
    transforms = True

    def device(self, update: DeviceUpdate) -> dict[str, float]:
        return {}

    def check_reply(self, vector: np.ndarray) -> bool:
        """Server: may this one (unmasked) reply be summed? Only plain rounds can ask."""
        return True

    def setup(self, rnd: ServerRound) -> dict[int, dict]:
        """Server, before the train messages go out: per-node payloads to add to them."""
        return {}

    def server(self, agg: ServerAggregate, rnd: ServerRound) -> dict[str, float]:
        return {}


class Pipeline:
    """An ordered list of steps; checks the order on construction."""

    def __init__(self, steps: list[Step]):
        ranks = [s.rank for s in steps]
        if ranks != sorted(ranks) or len(set(ranks)) != len(ranks):
            names = [s.name for s in steps]
            raise ValueError(f"privacy steps out of order: {names} (clip, noise, accounting, sum, guard)")
        if not steps or steps[-1].name != "guard":
            raise ValueError("the egress guard must be the last privacy step")
        if sum(s.name in ("plain-sum", "secure-sum") for s in steps) != 1:
            raise ValueError("a pipeline needs exactly one summation step")
        self.steps = list(steps)

    def names(self) -> list[str]:
        return [s.name for s in self.steps]

    def step(self, name: str) -> Step | None:
        return next((s for s in self.steps if s.name == name), None)

    def run_device(self, update: DeviceUpdate, replay: bool = False) -> dict[str, dict[str, float]]:
        """Every device half in order; returns each step's metrics (they stay on the device).

        ``replay``: the update was clipped and noised before (a round the server
        lost and asked again); only the steps that carry it run, so the same
        release goes out again and nothing new is spent.
        """
        return {s.name: s.device(update) for s in self.steps if not (replay and s.transforms)}

    def setup(self, rnd: ServerRound) -> dict[int, dict]:
        payloads: dict[int, dict] = {}
        for s in self.steps:
            for nid, extra in s.setup(rnd).items():
                payloads.setdefault(nid, {}).update(extra)
        return payloads

    def run_server(self, agg: ServerAggregate, rnd: ServerRound) -> dict[str, dict[str, float]]:
        """Every server half in reverse order; returns each step's metrics (for the report)."""
        agg.reply_ok = self.reply_ok
        return {s.name: s.server(agg, rnd) for s in reversed(self.steps)}

    def reply_ok(self, vector: np.ndarray) -> bool:
        return all(s.check_reply(vector) for s in self.steps)
