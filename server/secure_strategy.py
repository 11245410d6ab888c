"""FedAvg over secure aggregation, on Flower's Message API.

Flower 1.41's SecAgg+ (``SecAggPlusWorkflow``) runs only on the legacy API. This
strategy runs the SecAgg+ stages of ``common/secagg.py`` inside an ordinary
Message-API round:

* ``configure_train``: stage 0 (keys) and stage 1 (encrypted Shamir shares) as
  ``query`` messages, then the train messages carry the stage-2 request;
* the client trains, and replies with its update *masked* (uint32 mod 2**bits);
* ``aggregate_train``: stage 3 (unmask) as ``query`` messages, then the server
  reconstructs the sum of the survivors' updates, never one client's.

With user-level DP the client clips its whole update to ``C`` before masking and
the server adds ``N(0, (z*C)^2)`` to the unmasked sum, composing Flower's
client-level accountant. The server is trusted to add that noise (distributed
noise shares are not implemented).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import GaussianPrivacyEvent, Grid

from common.secagg import SecAggParams, SecAggProtocolError, SecAggServer
from common.wire import ARRAYS, MASKED, SECAGG, EgressGuard, EgressViolation, flatten, unflatten
from server.strategy import EvalAtEndFedAvg

log = logging.getLogger(__name__)


class SecAggFedAvg(EvalAtEndFedAvg):
    def __init__(
        self,
        *,
        num_rounds: int,
        clip_range: float,
        modulus_bits: int = 32,
        user_dp: dict | None = None,
        accountant=None,
        **kwargs,
    ):
        super().__init__(num_rounds=num_rounds, **kwargs)
        self.clip_range = clip_range
        self.modulus_bits = modulus_bits
        self.user_dp = user_dp  # {"noise_multiplier": z, "clip_norm": C} or None
        self.accountant = accountant
        self.rng = np.random.default_rng()
        self._round: dict = {}
        self.dropped: dict[int, int] = {}

    def _query(self, grid: Grid, payloads: dict[int, dict], server: SecAggServer, receive) -> None:
        """Send one stage to each node; hand every valid reply to ``receive``."""
        messages = [
            Message(RecordDict({SECAGG: ConfigRecord(p)}), dst_node_id=nid, message_type="query") for nid, p in payloads.items()
        ]
        for reply in grid.send_and_receive(messages):
            nid = reply.metadata.src_node_id
            if not reply.has_content():
                continue
            try:
                EgressGuard.check_secagg(reply.content)
                receive(nid, dict(reply.content[SECAGG]))
            except (EgressViolation, SecAggProtocolError) as err:
                log.warning("secure aggregation: dropped a reply from a client: %s", err)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        messages = list(super().configure_train(server_round, arrays, config, grid))
        node_ids = [m.metadata.dst_node_id for m in messages]
        length = sum(math.prod(a.shape) for a in arrays.values())
        params = SecAggParams.create(node_ids, length, clip_range=self.clip_range, modulus_bits=self.modulus_bits)
        server = SecAggServer(params)
        setup = server.setup_message()
        self._query(grid, {nid: setup for nid in node_ids}, server, server.receive_keys)
        self._query(grid, server.share_keys_messages(), server, server.receive_shares)
        stage2 = server.masked_input_messages()
        self._round = {"server": server, "grid": grid, "arrays": arrays, "sampled": len(node_ids)}
        # FedAvg hands every node the same RecordDict object; each node needs its
        # own stage-2 payload, so build one content per message.
        return [
            Message(
                RecordDict({**dict(m.content.items()), SECAGG: ConfigRecord(stage2[m.metadata.dst_node_id])}),
                dst_node_id=m.metadata.dst_node_id,
                message_type=m.metadata.message_type,
            )
            for m in messages
            if m.metadata.dst_node_id in stage2
        ]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        state, self._round = self._round, {}
        server: SecAggServer = state["server"]
        replies = [r for r in replies if r.has_content()]
        for reply in replies:
            try:
                server.receive_masked_input(reply.metadata.src_node_id, reply.content[ARRAYS][MASKED].numpy())
            except (SecAggProtocolError, KeyError) as err:
                log.warning("secure aggregation: dropped a masked input: %s", err)
        self._query(state["grid"], server.unmask_messages(), server, server.receive_unmask)
        result = server.finalize()
        self.dropped[server_round] = state["sampled"] - len(result.survivors)
        total = result.sum
        if self.user_dp:
            z, clip = self.user_dp["noise_multiplier"], self.user_dp["clip_norm"]
            total = total + self.rng.normal(0.0, z * clip, size=total.shape)
            if self.accountant is not None:
                pop = self.accountant.config.population_size
                self.accountant.compose(GaussianPrivacyEvent(noise_multiplier=z, sample_size=pop, population_size=pop))
        # DP-FedAvg's fixed denominator: the number of clients asked, so a
        # dropout cannot change the sensitivity of the average.
        mean_update = total / state["sampled"]
        new_arrays = unflatten(flatten(state["arrays"]) + mean_update, state["arrays"])
        metrics = self.train_metrics_aggr_fn([r.content for r in replies], self.weighted_by_key) if replies else None
        return new_arrays, metrics
