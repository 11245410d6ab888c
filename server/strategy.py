"""Server-side aggregation: Flower's FedAvg, optionally DP-FedAvg, guarded and instrumented.

The strategy is a stack of Flower strategies, outermost first:

1. :class:`GuardedStrategy`: the server half of the egress guard (a reply that
   breaks the wire contract is dropped, never averaged) plus the bookkeeping the
   report needs: bytes per client and round, per-client metrics, and user-level
   epsilon per round.
2. Flower's ``DifferentialPrivacyClientSideFixedClipping`` when user-level DP is
   on (DP-FedAvg): clients clip their whole shared update to ``C`` with
   ``fixedclipping_mod``, and the wrapper adds Gaussian noise with
   std ``z*C/n`` to the average and composes Flower's ``PrivacyAccountant``.
3. :class:`EvalAtEndFedAvg`: stock FedAvg aggregation (Flower's accounted DP
   wrapper requires ``FedAvg.aggregate_train`` unchanged), evaluating per client
   only after the final round.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy

from common.wire import METRICS, EgressGuard, EgressViolation, WireSchema, reply_nbytes

log = logging.getLogger(__name__)

# Callables (round, num_rounds, metrics) the CLI registers to drive its progress bar.
ROUND_HOOKS: list = []


class EvalAtEndFedAvg(FedAvg):
    def __init__(self, num_rounds: int, **kwargs):
        super().__init__(**kwargs)
        self.num_rounds = num_rounds

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        config = ConfigRecord({**config, "server-round": server_round})
        return super().configure_train(server_round, arrays, config, grid)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        # Per-client evaluation costs three forward passes per user; run it once,
        # on the final model, instead of after every round.
        if server_round < self.num_rounds:
            return []
        return super().configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        # FedAvg weights evaluation with the training key; DP-FedAvg trains with
        # uniform weights, but held-out metrics stay weighted by examples.
        train_key, self.weighted_by_key = self.weighted_by_key, "num-examples"
        try:
            return super().aggregate_evaluate(server_round, replies)
        finally:
            self.weighted_by_key = train_key


class GuardedStrategy(Strategy):
    """Outermost wrapper: refuse malformed replies, record what the report needs."""

    def __init__(self, inner: Strategy, schema: WireSchema, num_rounds: int, accountant=None, user_delta: float | None = None):
        self.inner = inner
        self.guard = EgressGuard(schema)
        self.num_rounds = num_rounds
        self.accountant = accountant
        self.user_delta = user_delta
        self.bytes_received: dict[int, dict[int, int]] = {}  # round -> node -> train-reply bytes
        self.rejected: dict[int, int] = {}
        self.client_train_metrics: dict[int, list[dict]] = {}
        self.client_eval_metrics: list[dict] = []
        self.user_epsilon: dict[int, float] = {}

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

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        valid = self._valid(server_round, list(replies), "train")
        self.bytes_received[server_round] = {r.metadata.src_node_id: reply_nbytes(r.content) for r in valid}
        self.client_train_metrics[server_round] = [dict(r.content[METRICS]) for r in valid]
        arrays, metrics = self.inner.aggregate_train(server_round, valid)
        if self.accountant is not None:
            self.user_epsilon[server_round] = self.accountant.get_epsilon(self.user_delta)
        for hook in ROUND_HOOKS:
            hook(server_round, self.num_rounds, dict(metrics or {}))
        return arrays, metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        valid = self._valid(server_round, list(replies), "evaluate")
        self.client_eval_metrics = [dict(r.content[METRICS]) for r in valid]
        return self.inner.aggregate_evaluate(server_round, valid) if valid else None

    def bytes_per_client(self, server_round: int) -> dict[str, list[int]]:
        """Bytes each client sent in a round: train reply, secure-aggregation replies, total."""
        train = self.bytes_received.get(server_round, {})
        query = getattr(self.inner, "query_bytes", {}).get(server_round, {})
        nodes = sorted(set(train) | set(query))
        return {
            "train_reply": [train.get(n, 0) for n in nodes],
            "secagg_replies": [query.get(n, 0) for n in nodes],
            "total": [train.get(n, 0) + query.get(n, 0) for n in nodes],
        }

    def summary(self) -> None:
        self.inner.summary()
