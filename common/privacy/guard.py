"""The egress guard as the last privacy step: the device's check before a reply leaves, the server's before it is summed."""

from __future__ import annotations

import logging

from common.privacy.base import DeviceUpdate, ServerAggregate, ServerRound, Step
from common.wire import ARRAYS, EgressGuard, EgressViolation, WireSchema

log = logging.getLogger(__name__)


class Guard(Step):
    name = "guard"
    rank = 50
    transforms = False

    def __init__(self, schema: WireSchema):
        self.guard = EgressGuard(schema)

    def device(self, update: DeviceUpdate) -> dict[str, float]:
        from flwr.app import RecordDict

        self.guard.check(RecordDict({ARRAYS: update.payload}), "train")
        return {}

    def server(self, agg: ServerAggregate, rnd: ServerRound) -> dict[str, float]:
        """Filter the replies as the sum pulls them: the server never holds a round's replies at once.

        The count of malformed replies is in ``agg.rejected`` once the sum has run.
        """
        agg.replies = self._checked(agg.replies, agg, rnd)
        return {}

    def _checked(self, replies, agg: ServerAggregate, rnd: ServerRound):
        for reply in replies:
            try:
                self.guard.check(reply.content, "train")
            except EgressViolation as err:
                agg.rejected += 1
                log.warning("round %d: dropped a malformed train reply: %s", rnd.server_round, err)
                continue
            yield reply
