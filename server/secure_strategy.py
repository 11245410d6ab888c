"""FedAvg over secure aggregation, on Flower's Message API.

Flower 1.41's SecAgg+ (``SecAggPlusWorkflow``) runs only on the legacy API. This
strategy runs the SecAgg+ stages of ``common/secagg.py`` inside an ordinary
Message-API round:

* ``configure_train``: stage 0 (keys) and stage 1 (encrypted Shamir shares) as
  ``query`` messages, then the train messages carry the stage-2 request;
* the client trains, and replies with its update *masked* (uint32 mod 2**bits);
* ``aggregate_train``: stage 3 (unmask) as ``query`` messages, then the server
  reconstructs the sum of the survivors' updates, never one client's, and
  hands it to :class:`~server.slot_strategy.SlotFedAvg`'s slot arithmetic.

With user-level DP each client clips its whole update to ``C`` before masking.
Noise: with ``secagg-noise = distributed`` (default) every client adds a
Gaussian share of std ``z*C/sqrt(m)`` before masking, where ``m`` is the
minimum number of survivors the protocol will unmask; the released sum carries
noise of variance at least ``(z*C)**2`` and no party ever holds a noiseless sum.
With ``server`` the server adds ``N(0, (z*C)^2)`` to the unmasked sum and is
trusted to do so.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from common.secagg import SecAggParams, SecAggProtocolError, SecAggServer
from common.wire import ARRAYS, MASKED, SECAGG, EgressGuard, EgressViolation, reply_nbytes
from server.slot_strategy import SlotFedAvg

log = logging.getLogger(__name__)

# Far tails of a client's noise share are clipped by the fixed-point range;
# six standard deviations make that a ~2e-9 event per coordinate.
NOISE_RANGE_SIGMAS = 6.0


class SecAggFedAvg(SlotFedAvg):
    def __init__(
        self,
        *,
        num_rounds: int,
        clip_range: float,
        modulus_bits: int = 32,
        max_dropout: float = 0.3,
        **kwargs,
    ):
        super().__init__(num_rounds=num_rounds, **kwargs)
        self.clip_range = clip_range
        self.modulus_bits = modulus_bits
        self.max_dropout = max_dropout
        self.dropped: dict[int, int] = {}
        # Bytes of key-advertisement, share and unmask replies, per round and node.
        self.query_bytes: dict[int, dict[int, int]] = {}

    def _query(self, server_round: int, grid: Grid, payloads: dict[int, dict], receive) -> None:
        """Send one stage to each node; hand every valid reply to ``receive``."""
        messages = [
            Message(RecordDict({SECAGG: ConfigRecord(p)}), dst_node_id=nid, message_type="query") for nid, p in payloads.items()
        ]
        tally = self.query_bytes.setdefault(server_round, {})
        for reply in grid.send_and_receive(messages):
            nid = reply.metadata.src_node_id
            if not reply.has_content():
                continue
            tally[nid] = tally.get(nid, 0) + reply_nbytes(reply.content)
            try:
                EgressGuard.check_secagg(reply.content)
                receive(nid, dict(reply.content[SECAGG]))
            except (EgressViolation, SecAggProtocolError) as err:
                log.warning("secure aggregation: dropped a reply from a client: %s", err)

    def _params(self, node_ids: list[int], length: int) -> SecAggParams:
        params = SecAggParams.create(node_ids, length, clip_range=self.clip_range, modulus_bits=self.modulus_bits)
        # Refuse to unmask fewer than (1 - max_dropout) of the sample: that floor
        # is also the denominator of the clients' distributed noise shares.
        floor = max(params.threshold, math.ceil((1.0 - self.max_dropout) * len(node_ids)))
        clip_range = self.clip_range
        if self.user_dp and not self.server_noise:
            share = self.user_dp["noise_multiplier"] * self.user_dp["clip_norm"] / math.sqrt(floor)
            clip_range = max(clip_range, self.user_dp["clip_norm"] + NOISE_RANGE_SIGMAS * share)
        return dataclasses.replace(params, min_survivors=floor, clip_range=clip_range)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        messages = super().configure_train(server_round, arrays, config, grid)
        node_ids = [m.metadata.dst_node_id for m in messages]
        if len(node_ids) < 3:
            # Poisson sampling drew too few clients for secure aggregation; the
            # round is skipped (and still charged to the accountant).
            log.warning("round %d: %d clients sampled, secure aggregation needs 3; skipping the round", server_round, len(node_ids))
            return []
        length = sum(math.prod(a.shape) for a in arrays.values()) + self.num_slots
        server = SecAggServer(self._params(node_ids, length))
        setup = server.setup_message()
        self._query(server_round, grid, {nid: setup for nid in node_ids}, server.receive_keys)
        self._query(server_round, grid, server.share_keys_messages(), server.receive_shares)
        stage2 = server.masked_input_messages()
        self._sent["server"] = server
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

    def _sum_updates(self, server_round: int, replies: list[Message], state: dict) -> np.ndarray | None:
        server: SecAggServer = state["server"]
        for reply in replies:
            try:
                server.receive_masked_input(reply.metadata.src_node_id, reply.content[ARRAYS][MASKED].numpy())
            except (SecAggProtocolError, KeyError) as err:
                log.warning("secure aggregation: dropped a masked input: %s", err)
        self._query(server_round, state["grid"], server.unmask_messages(), server.receive_unmask)
        result = server.finalize()
        self.dropped[server_round] = state["sampled"] - len(result.survivors)
        return result.sum
