"""Flower's in-memory link state with the undelivered messages indexed by their destination node.

Why this exists: Flower's simulation engine (``vce_api.add_messages_to_queue``, flwr 1.41)
polls every 0.1 s, and in each poll calls ``InMemoryLinkState.get_message_ins(node_id, limit=1)``
once for each of the N simulated nodes. That method walks the *whole* message store, and
re-validates every message in it, to find the one node's messages. While a round's N messages
wait, one poll costs N² validations under the state's lock: at N = 1,000 that is a million, again
every 0.1 s, which is where a 1,000-user round spent most of its driver time (issue 15, figure b).

``IndexedLinkState`` keeps, per destination node, the ids of its messages that have not been
delivered, in the order they were stored, so a node's lookup touches only its own messages. What
a node gets is unchanged: the same messages in the same order, each validated (TTL, federation)
by Flower's own ``_check_stored_messages`` just before it is handed out. The one difference is
when *other* nodes' expired messages are swept: Flower sweeps every message on every lookup;
here each is swept when its own node looks, or when the server pulls replies
(``get_message_res`` checks the messages it is asked about).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

from flwr.app import Message
from flwr.server.superlink.linkstate import linkstate_factory
from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
from flwr.supercore.date import now


class IndexedLinkState(InMemoryLinkState):
    """``InMemoryLinkState`` whose ``get_message_ins`` looks only at the asking node's messages."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # node id -> ids of its undelivered messages, in store order (a dict keeps insertion order).
        self._undelivered: dict[int, dict[str, None]] = {}

    def store_message_ins(self, message: Message) -> str | None:
        message_id = super().store_message_ins(message)
        if message_id is not None:
            with self.lock:
                self._undelivered.setdefault(message.metadata.dst_node_id, {})[message_id] = None
        return message_id

    def get_message_ins(self, node_id: int, limit: int | None, *, run_id: int | None = None) -> list[Message]:
        if limit is not None and limit < 1:
            raise AssertionError("`limit` must be >= 1")
        found: list[Message] = []
        with self.lock:
            waiting = self._undelivered.get(node_id)
            for message_id in list(waiting or ()):
                self._check_stored_messages({message_id})  # Flower's own TTL and federation checks
                message = self.message_ins_store.get(message_id)
                if message is None or message.metadata.delivered_at != "":
                    del waiting[message_id]  # deleted, expired or already delivered: never due again
                    continue
                if run_id is not None and message.metadata.run_id != run_id:
                    continue
                found.append(message)
                if limit and len(found) == limit:
                    break
            delivered_at = now().isoformat()
            for message in found:
                message.metadata.delivered_at = delivered_at
                del waiting[message.metadata.message_id]
        return found


def bare_federation(num_nodes: int, indexed: bool):
    """A link state with one run and ``num_nodes`` registered nodes, set up as ``flwr.simulation`` sets up its own.

    For the link-state benchmark and tests: ``(state, grid, node_ids)``, Flower's state or the
    indexed one. Like Flower's launcher it sets the process-wide ``TaskIdentity`` to the run.
    """
    from flwr.common.constant import RUN_ID_NUM_BYTES, SUPERLINK_NODE_ID, TASK_ID_NUM_BYTES
    from flwr.proto.task_pb2 import Task  # pylint: disable=E0611
    from flwr.server.superlink.fleet.vce.vce_api import _register_nodes
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
    from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.superlink.federation import NoOpFederationManager
    from flwr.superlink.grid import InMemoryGrid

    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    with indexed_link_state() if indexed else nullcontext():
        state = factory.state()
    run = Run.create_empty(run_id=generate_rand_int_from_bytes(RUN_ID_NUM_BYTES))
    run.primary_task_id = generate_rand_int_from_bytes(TASK_ID_NUM_BYTES)
    run.federation_id = NOOP_FEDERATION_ID
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run.run_id, SUPERLINK_NODE_ID
    state.run_ids[run.run_id] = RunRecord(run=run)
    state.task_store[run.primary_task_id] = Task(task_id=run.primary_task_id, run_id=run.run_id)
    nodes = sorted(_register_nodes(num_nodes, factory))
    grid = InMemoryGrid(state_factory=factory)
    grid.set_run(run)
    return state, grid, nodes


@contextmanager
def indexed_link_state():
    """Within the block, Flower's link-state factory builds an ``IndexedLinkState`` for in-memory state.

    The factory names its class through a module global, so replacing that global is the one
    seam that reaches the state ``_run_simulation`` builds for itself.
    """
    original = linkstate_factory.InMemoryLinkState
    linkstate_factory.InMemoryLinkState = IndexedLinkState
    try:
        yield
    finally:
        linkstate_factory.InMemoryLinkState = original
