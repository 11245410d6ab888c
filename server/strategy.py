"""The one server strategy: sample a cohort, run the privacy pipeline's server halves, apply the K-slot sum.

Every configuration runs through :class:`TieredFedAvg`: plain or secure
summation, with or without user-level DP, with K persona slots or none. What
changes is the privacy pipeline (``common.privacy``), built from the run
config exactly as the devices build theirs.

Per round the strategy:

1. draws the cohort: every node, or each node independently with probability
   ``q`` (Poisson client sampling) from a CSPRNG; under secure aggregation every
   node joins and the devices draw their own coins, so the server never learns
   who trained;
2. lets the pipeline's steps prepare the round (secure aggregation's key and
   share stages) and sends each node the shared tiers, the round number, its
   stage-2 request and, under adaptive user-level clipping, the round's C;
   nothing else goes in the message (``common.wire``);
3. sorts the replies: Flower errors (counted as failed; their text is never
   logged, it may come from a device), refusals (counted by reason code), and
   updates, which the pipeline's server halves validate, sum, noise and
   account;
4. applies the sum to the global tier, the persona slots and the centroids
   (``server.aggregate``).

It keeps what the report needs, all of it aggregate: per round the cohort,
contributors, failures, refusals, rejected replies, bytes per client, the
persona counts and each server-side step's metrics.
"""

from __future__ import annotations

import logging
import random
import threading
from collections import Counter
from collections.abc import Iterable

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from common import csprng
from common.config import RunConfig
from common.kslot import KSlotCodec
from common.privacy import Pipeline, Reply, ServerAggregate, ServerRound
from common.wire import ARRAYS, CONFIG, SECAGG, EgressGuard, EgressViolation, refusal_reason, reply_nbytes
from server.aggregate import apply_sum

log = logging.getLogger(__name__)

# Callables (round, num_rounds, row) the CLI registers to drive its progress bar.
ROUND_HOOKS: list = []
# Set by a simulation harness whose engine died. Flower then sets its own stop event, which a
# ServerApp cannot see, and returns; the ServerApp thread would wait out the round timeout (an
# hour by default) for replies that will never come, and hold the process open. It stops instead.
ENGINE_STOPPED = threading.Event()


class EngineStopped(RuntimeError):
    """The simulation engine stopped while the server waited for replies."""


def wait_for_nodes(grid: Grid, count: int) -> list[int]:
    """Every node of the federation, once ``count`` are connected (Flower's ``sample_nodes`` wait, stoppable)."""
    import time

    waited = 0
    while len(node_ids := list(grid.get_node_ids())) < count:
        if ENGINE_STOPPED.is_set():
            raise EngineStopped(f"the simulation engine stopped with {len(node_ids)} of {count} nodes connected")
        if waited % 10 == 0:
            log.info("Waiting for nodes to connect: %d connected (minimum required: %d).", len(node_ids), count)
        time.sleep(1)
        waited += 1
    return sorted(random.sample(node_ids, count))  # as Flower's: ``count`` of them if more are connected


def collect_replies(grid: Grid, messages: Iterable[Message], timeout: float | None = None) -> list[Message]:
    """``grid.send_and_receive``, stoppable: every reply of a (small) stage, as a list."""
    return list(stream_replies(grid, messages, timeout))


def stream_replies(grid: Grid, messages: Iterable[Message], timeout: float | None = None):
    """``grid.send_and_receive`` as a generator: each reply is yielded as it is pulled, not collected.

    Flower's ``send_and_receive`` returns a list of the round's replies (1,000
    K-slot replies at K = 4 would be 3.7 GB); pulling deletes a reply from the
    link's state, so the server holds only the replies the sum has not yet
    added. Same push, pull and timeout as Flower's, with its pull interval.
    """
    import time

    pending = set(grid.push_messages(messages))
    deadline = None if timeout is None else time.time() + timeout
    while pending and (deadline is None or time.time() < deadline):
        if ENGINE_STOPPED.is_set():
            raise EngineStopped(f"the simulation engine stopped with {len(pending)} replies outstanding")
        arrived = list(grid.pull_messages(pending))
        pending.difference_update(m.metadata.reply_to_message_id for m in arrived)
        while arrived:
            yield arrived.pop(0)
        if pending:
            time.sleep(getattr(grid, "pull_interval", 0.1))


class TieredFedAvg(Strategy):
    def __init__(self, cfg: RunConfig, codec: KSlotCodec, pipeline: Pipeline, num_rounds: int):
        self.cfg = cfg
        self.codec = codec
        self.pipeline = pipeline
        self.num_rounds = num_rounds
        self.population = cfg.federation.num_supernodes
        self.rate = cfg.client_sample_rate
        # Under secure aggregation every device joins every round and samples itself,
        # so the server never learns the cohort (and cannot undo the amplification).
        self.self_sampling = pipeline.step("secure-sum") is not None and self.rate < 1.0
        self.timeout = cfg.federation.round_timeout
        self.rounds: dict[int, dict] = {}  # the report's per-round rows
        self.evaluation: dict = {}
        self._round: ServerRound | None = None
        self._arrays: ArrayRecord | None = None

    # -- cohort and messages ----------------------------------------------------------
    def _cohort(self, grid: Grid) -> list[int]:
        # Wait for every node of the federation, then keep each with probability q.
        node_ids = wait_for_nodes(grid, self.population)
        if self.rate < 1.0 and not self.self_sampling:
            keep = csprng.bernoulli(len(node_ids), self.rate)
            node_ids = [nid for nid, k in zip(node_ids, keep) if k]
        return node_ids

    def _message(self, nid: int, arrays: ArrayRecord, server_round: int, kind: str, extra: dict | None = None) -> Message:
        extra = dict(extra or {})
        # A step's per-round values (adaptive clipping's C) join the round number in the one config record.
        content = {ARRAYS: arrays, CONFIG: ConfigRecord({"server-round": server_round, **extra.pop(CONFIG, {})})}
        content.update({name: ConfigRecord(value) for name, value in extra.items()})
        return Message(RecordDict(content), dst_node_id=nid, message_type=kind)

    def _query(self, grid: Grid, server_round: int, payloads: dict[int, dict]) -> dict[int, dict]:
        """One secure-aggregation stage: a ``query`` message per node, the valid replies back."""
        messages = [Message(RecordDict({SECAGG: ConfigRecord(p)}), dst_node_id=nid, message_type="query") for nid, p in payloads.items()]
        row = self.rounds[server_round]
        out = {}
        for reply in collect_replies(grid, messages, timeout=self.timeout):
            nid = reply.metadata.src_node_id
            if reply.has_error() or not reply.has_content():
                row["failed_queries"] += 1
                continue
            row["secagg_bytes"][nid] = row["secagg_bytes"].get(nid, 0) + reply_nbytes(reply.content)
            reason = refusal_reason(reply.content)
            if reason is not None:
                row["refused"][reason.name] = row["refused"].get(reason.name, 0) + 1
                continue
            try:
                EgressGuard.check_secagg(reply.content)
            except EgressViolation as err:
                row["rejected"] += 1
                log.warning("round %d: dropped a malformed secure-aggregation reply: %s", server_round, err)
                continue
            out[nid] = dict(reply.content[SECAGG])
        return out

    # -- train ----------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        cohort = self._cohort(grid)
        self.rounds[server_round] = {
            "round": server_round, "sampled": len(cohort), "expected": self.rate * self.population,
            "contributors": 0, "failed": 0, "failed_queries": 0, "refused": {}, "rejected": 0,
            "train_bytes": {}, "secagg_bytes": {},
        }
        rnd = ServerRound(server_round, cohort, query=lambda payloads: self._query(grid, server_round, payloads))
        extra = self.pipeline.setup(rnd)
        if self.pipeline.step("secure-sum") is not None:
            cohort = [nid for nid in cohort if SECAGG in extra.get(nid, {})]  # the rest dropped out before training
        self._round, self._arrays = rnd, arrays
        return [self._message(nid, arrays, server_round, "train", extra.get(nid)) for nid in cohort]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        rnd, arrays = self._round, self._arrays
        row = self.rounds[server_round]
        # One pass, reply by reply: the sum step keeps a running total (plain or masked),
        # so with streamed replies (``stream_replies``) no round's replies are ever all held.
        agg = ServerAggregate(self.codec, self._contributions(replies, row), expected=row["expected"])
        row["steps"] = self.pipeline.run_server(agg, rnd)
        row["contributors"], row["rejected"] = agg.contributors, row["rejected"] + agg.rejected
        new = None
        if agg.total is not None and agg.contributors:
            tensors, slots = apply_sum(
                {k: v.numpy() for k, v in arrays.items()}, self.codec, agg.total, row["expected"],
                self.cfg.persona.min_size, exact_counts=not self.cfg.user_dp.enabled, server_lr=self.cfg.federation.server_lr,
            )
            new = ArrayRecord({k: Array(v) for k, v in tensors.items()})
            if self.codec.num_slots:
                row["persona_counts"], row["persona_folded"] = slots.counts, slots.folded
                if slots.folded:
                    log.info("round %d: persona slot(s) %s below the minimum size, folded into the global tier", server_round, slots.folded)
        else:
            log.warning("round %d: no update was applied (%d contributors)", server_round, agg.contributors)
        for hook in ROUND_HOOKS:
            hook(server_round, self.num_rounds, row)
        return new, MetricRecord({"contributors": agg.contributors, "refused": sum(row["refused"].values()), "failed": row["failed"]})

    # -- evaluate ---------------------------------------------------------------------------
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        # Devices evaluate every tier stack once, on the final model.
        if server_round < self.num_rounds:
            return []
        node_ids = wait_for_nodes(grid, self.population)
        return [self._message(nid, arrays, server_round, "evaluate") for nid in node_ids]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        refused: Counter = Counter()
        done = failed = 0
        for reply in replies:
            if reply.has_error() or not reply.has_content():
                failed += 1
            elif (reason := refusal_reason(reply.content)) is not None:
                refused[reason.name] += 1
            else:
                done += 1
        self.evaluation = {"round": server_round, "evaluated": done, "refused": dict(refused), "failed": failed}
        return MetricRecord({"evaluated": done, "refused": sum(refused.values()), "failed": failed})

    @staticmethod
    def _contributions(replies: Iterable[Message], row: dict):
        """The replies that carry an update, counting failures and refusals as they pass."""
        for reply in replies:
            nid = reply.metadata.src_node_id
            if reply.has_error() or not reply.has_content():
                # Flower's error text may carry a device's exception; only the count is kept.
                row["failed"] += 1
                continue
            row["train_bytes"][nid] = reply_nbytes(reply.content)
            reason = refusal_reason(reply.content)
            if reason is not None:
                row["refused"][reason.name] = row["refused"].get(reason.name, 0) + 1
                continue
            yield Reply(nid, reply.content)

    # -- rounds, checkpoints and resume ---------------------------------------------------
    def run(self, grid: Grid, arrays: ArrayRecord, start_round: int = 1, checkpoint=None) -> ArrayRecord:
        """Rounds ``start_round`` to ``num_rounds``: train, checkpoint, and evaluate after the last.

        The same calls as Flower's ``Strategy.start()``, which cannot resume:
        ``checkpoint(round, arrays)`` runs after every round's aggregation.
        """
        for server_round in range(start_round, self.num_rounds + 1):
            log.info("[ROUND %d/%d]", server_round, self.num_rounds)
            replies = stream_replies(grid, self.configure_train(server_round, arrays, ConfigRecord(), grid), timeout=self.timeout)
            new, _ = self.aggregate_train(server_round, replies)
            if new is not None:
                arrays = new
            if checkpoint is not None:
                checkpoint(server_round, arrays)
            messages = self.configure_evaluate(server_round, arrays, ConfigRecord(), grid)
            if messages:
                self.aggregate_evaluate(server_round, collect_replies(grid, messages, timeout=self.timeout))
        return arrays

    def state_dict(self) -> dict:
        """What a resumed server needs besides the tiers: the report rows and the user-level accountant."""
        accounting, clip = self.pipeline.step("accounting"), self.pipeline.step("clip")
        return {
            "rounds": {str(r): row for r, row in self.rounds.items()},
            "accountant": accounting.accountant.state_dict() if accounting else None,
            "epsilon_per_round": {str(r): e for r, e in accounting.epsilon_per_round.items()} if accounting else {},
            "adaptive-clip": clip.current if clip is not None else None,  # user-level C, where the next round starts
        }

    def load_state_dict(self, state: dict) -> None:
        self.rounds = {int(r): row for r, row in state["rounds"].items()}
        accounting = self.pipeline.step("accounting")
        if accounting is not None and state["accountant"] is not None:
            accounting.accountant.load_state_dict(state["accountant"])
            accounting.epsilon_per_round = {int(r): e for r, e in state["epsilon_per_round"].items()}
        clip = self.pipeline.step("clip")
        if clip is not None and state.get("adaptive-clip") is not None:
            clip.current = min(clip.ceiling, float(state["adaptive-clip"]))

    def summary(self) -> None:
        log.info("TieredFedAvg: privacy pipeline %s, %d persona slot(s), client sampling rate %.3f",
                 " -> ".join(self.pipeline.names()), self.codec.num_slots, self.rate)

