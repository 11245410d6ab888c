"""The summation step: how per-device updates become one sum.

* :class:`PlainSum`: each device sends its float32 update; the server adds them
  up, and so sees every update (its per-reply checks, e.g. the clip bound, run
  here).
* :class:`SecureSum`: SecAgg+ (``common/secagg.py``) inside an ordinary
  Message-API round. Before the train messages go out the server runs stage 0
  (keys) and stage 1 (encrypted Shamir shares) as ``query`` messages; each
  train message carries the device's stage-2 request; the device replies with
  its update fixed-point encoded and masked; the server runs stage 3 (unmask)
  and reconstructs the sum of the survivors' updates, never one update.
"""

from __future__ import annotations

import logging
import math

from common.kslot import KSlotCodec
from common.secagg_codec import clip_probability
from common.privacy.base import DeviceUpdate, ServerAggregate, ServerRound, Step
from common.wire import ARRAYS, MASKED, SECAGG

log = logging.getLogger(__name__)

# Far tails of a device's noise share are clipped by the fixed-point range;
# nine standard deviations make that a ~2e-19 event per coordinate, and the
# report adds the whole round's clipping probability to delta.
NOISE_RANGE_SIGMAS = 9.0


class PlainSum(Step):
    name = "plain-sum"
    rank = 40
    transforms = False

    def __init__(self, codec: KSlotCodec):
        self.codec = codec

    def device(self, update: DeviceUpdate) -> dict[str, float]:
        from flwr.app import Array, ArrayRecord

        update.payload = ArrayRecord({k: Array(v) for k, v in self.codec.unflatten(update.vector).items()})
        return {}

    def server(self, agg: ServerAggregate, rnd: ServerRound) -> dict[str, float]:
        total, n = None, 0
        for reply in agg.replies:
            vector = self.codec.flatten(reply.content[ARRAYS])
            if not agg.reply_ok(vector):
                agg.rejected += 1
                log.warning("round %d: dropped a reply that breaks a privacy step's bound", rnd.server_round)
                continue
            total = vector if total is None else total + vector
            n += 1
        agg.total, agg.contributors = total, n
        return {"contributors": float(n)}


def honest_contributors(min_survivors: int, cohort: int, colluder_fraction: float) -> int:
    """The fewest honest devices whose noise shares a released sum is guaranteed to hold.

    The protocol unmasks at least ``min_survivors`` inputs; up to
    ``ceil(colluder_fraction * cohort)`` of them may belong to colluders, who
    can subtract their own shares. Distributed noise shares are sized by this
    number, so the honest rest still add the full noise.
    """
    honest = min_survivors - math.ceil(colluder_fraction * cohort)
    if honest < 1:
        raise ValueError("the colluder budget leaves no honest contributor above the unmask floor")
    return honest


class SecureSum(Step):
    name = "secure-sum"
    rank = 40
    transforms = False

    def __init__(self, codec: KSlotCodec, clip_range: float, modulus_bits: int, max_dropout: float,
                 colluder_fraction: float, noise=None, value_bound: float = 0.0):
        self.codec = codec
        self.clip_range = float(clip_range)
        self.modulus_bits = int(modulus_bits)
        self.max_dropout = float(max_dropout)
        self.colluder_fraction = float(colluder_fraction)
        # The distributed-noise step, if any: the fixed-point range must hold a value plus its noise share.
        self.noise = noise
        # Under user-level clipping no coordinate exceeds the update's norm bound, adaptive clipping's
        # bit included: the range holds it, so the fixed-point codec never clips a clipped update.
        self.value_bound = float(value_bound)

    def params(self, node_ids: list[int]):
        """The round's protocol parameters.

        Refuses to unmask fewer than (1 - max_dropout) of the cohort: that floor
        is also the denominator of the devices' distributed noise shares, and the
        fixed-point range is widened to hold a share's tails.
        """
        import dataclasses

        from common.secagg import SecAggParams

        params = SecAggParams.create(
            node_ids, self.codec.length, clip_range=self.clip_range, modulus_bits=self.modulus_bits,
            colluder_fraction=self.colluder_fraction, dropout_fraction=self.max_dropout,
        )
        floor = max(params.threshold, math.ceil((1.0 - self.max_dropout) * len(node_ids)))
        clip_range = max(self.clip_range, self.value_bound)
        if self.noise is not None:
            share = self.noise.share_std(honest_contributors(floor, len(node_ids), self.colluder_fraction))
            clip_range = max(clip_range, self.noise.clip_norm + NOISE_RANGE_SIGMAS * share)
        return dataclasses.replace(params, min_survivors=floor, clip_range=clip_range)

    def honest_floor(self, params) -> int:
        return honest_contributors(params.min_survivors, len(params.node_ids), self.colluder_fraction)

    # -- server: stages 0 and 1, before training -----------------------------------
    def setup(self, rnd: ServerRound) -> dict[int, dict]:
        from common.secagg import SecAggAbort, SecAggServer

        if len(rnd.node_ids) < 3:
            log.warning("round %d: %d clients sampled, secure aggregation needs 3; skipping the round", rnd.server_round, len(rnd.node_ids))
            return {}
        server = SecAggServer(self.params(rnd.node_ids))
        try:
            setup = server.setup_message()
            for nid, reply in rnd.query({nid: setup for nid in rnd.node_ids}).items():
                _receive(server.receive_keys, nid, reply)
            for nid, reply in rnd.query(server.share_keys_messages()).items():
                _receive(server.receive_shares, nid, reply)
            stage2 = server.masked_input_messages()
        except SecAggAbort as err:
            log.warning("round %d: secure aggregation aborted before training: %s", rnd.server_round, err)
            return {}
        rnd.state["secagg"] = server
        rnd.state["min_contributors"] = self.honest_floor(server.params)
        if self.noise is not None:
            # A share's far tail can still be clipped by the fixed-point range: a
            # failure of the Gaussian mechanism whose probability is added to delta.
            p = server.params
            rnd.state["clip_probability"] = clip_probability(
                p.clip_range, self.noise.clip_norm, self.noise.share_std(rnd.state["min_contributors"]), p.vector_len * len(p.node_ids)
            )
        return {nid: {SECAGG: payload} for nid, payload in stage2.items()}

    # -- device: stage 2 -------------------------------------------------------------
    def device(self, update: DeviceUpdate) -> dict[str, float]:
        from flwr.app import Array, ArrayRecord

        from common.secagg import SecAggClient

        client = SecAggClient.from_state(update.secagg_state)
        masked = client.masked_input(update.secagg_request, update.vector)
        update.secagg_state = client.to_state()
        update.payload = ArrayRecord({MASKED: Array(masked)})
        return {"clipped-coordinates": float(client.num_clipped)}

    # -- server: stage 3 ------------------------------------------------------------
    def server(self, agg: ServerAggregate, rnd: ServerRound) -> dict[str, float]:
        from common.secagg import SecAggAbort, SecAggProtocolError

        server = rnd.state.get("secagg")
        if server is None:
            return {"aborted": 1.0}
        for reply in agg.replies:
            try:
                server.receive_masked_input(reply.node_id, reply.content[ARRAYS][MASKED].numpy())
            except (SecAggProtocolError, KeyError, ValueError) as err:
                agg.rejected += 1
                log.warning("round %d: dropped a masked input: %s", rnd.server_round, err)
        try:
            for nid, reply in rnd.query(server.unmask_messages()).items():
                _receive(server.receive_unmask, nid, reply)
            result = server.finalize()
        except SecAggAbort as err:
            # The round is skipped; its accountant charge stays (the accounting step runs regardless).
            log.warning("round %d: secure aggregation aborted: %s", rnd.server_round, err)
            return {"aborted": 1.0}
        agg.total, agg.contributors = result.sum, len(result.survivors)
        metrics = {"survivors": float(len(result.survivors)), "dropped": float(len(rnd.node_ids) - len(result.survivors))}
        if "clip_probability" in rnd.state:
            metrics["fixed-point-clip-probability"] = rnd.state["clip_probability"]
        return metrics


def _receive(handler, node_id: int, reply: dict) -> None:
    """Hand one stage reply to the protocol; a reply it rejects makes that client a dropout."""
    from common.secagg import SecAggProtocolError

    try:
        handler(node_id, reply)
    except (SecAggProtocolError, KeyError, TypeError, ValueError) as err:
        log.warning("secure aggregation: dropped a reply from a client: %s", type(err).__name__)
