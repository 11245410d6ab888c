"""Server-side aggregation: Flower's FedAvg, guarded and instrumented.

The server half of the egress guard runs here: a reply that breaks the wire
contract is dropped, never averaged. The strategy also records what the report
needs, which the stock FedAvg folds away: bytes received per client and round,
and each client's final evaluation metrics.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from common.wire import METRICS, EgressGuard, EgressViolation, WireSchema, reply_nbytes

log = logging.getLogger(__name__)

# Callables (round, num_rounds, metrics) the CLI registers to drive its progress bar.
ROUND_HOOKS: list = []


class GuardedFedAvg(FedAvg):
    def __init__(self, schema: WireSchema, num_rounds: int, **kwargs):
        super().__init__(**kwargs)
        self.guard = EgressGuard(schema)
        self.num_rounds = num_rounds
        self.bytes_received: dict[int, list[int]] = {}
        self.rejected: dict[int, int] = {}
        self.client_train_metrics: dict[int, list[dict]] = {}
        self.client_eval_metrics: list[dict] = []

    def _valid(self, server_round: int, replies: Iterable[Message], kind: str) -> list[Message]:
        valid = []
        for reply in replies:
            if not reply.has_content():
                continue
            try:
                self.guard.check(reply.content, kind)
            except EgressViolation as err:
                self.rejected[server_round] = self.rejected.get(server_round, 0) + 1
                log.warning("round %d: dropped a malformed %s reply: %s", server_round, kind, err)
                continue
            valid.append(reply)
        return valid

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        # Per-client evaluation costs three forward passes per user; run it once,
        # on the final model, instead of after every round.
        if server_round < self.num_rounds:
            return []
        return super().configure_evaluate(server_round, arrays, config, grid)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        config = ConfigRecord({**config, "server-round": server_round})
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        valid = self._valid(server_round, replies, "train")
        self.bytes_received[server_round] = [reply_nbytes(r.content) for r in valid]
        self.client_train_metrics[server_round] = [dict(r.content[METRICS]) for r in valid]
        if not valid:
            return None, None
        arrays, metrics = super().aggregate_train(server_round, valid)
        for hook in ROUND_HOOKS:
            hook(server_round, self.num_rounds, dict(metrics or {}))
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        valid = self._valid(server_round, list(replies), "evaluate")
        self.client_eval_metrics = [dict(r.content[METRICS]) for r in valid]
        if not valid:
            return None
        return super().aggregate_evaluate(server_round, valid)
