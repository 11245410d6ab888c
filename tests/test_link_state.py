"""The indexed link state hands each node what Flower's own state hands it, at O(own messages) per lookup."""

import time

import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.grid import InMemoryGrid

from simulations.link_state import IndexedLinkState, bare_federation, indexed_link_state


@pytest.fixture(autouse=True)
def _server_identity(monkeypatch):
    """Messages are stamped with the pushing task's identity; ``flwr.simulation`` sets it, so do we."""
    for name in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, name, getattr(TaskIdentity, name))


def _factory() -> LinkStateFactory:
    return LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())


def _message(grid: InMemoryGrid, tag: int, node: int, ttl: float | None = None) -> Message:
    content = RecordDict({"c": ConfigRecord({"tag": tag})})
    return grid.create_message(content, "train", node, "g", ttl=ttl)


def _poll_until_empty(state, nodes) -> list[list[tuple[int, int]]]:
    """The simulation engine's loop: each poll asks every node for one message; the (node, tag) log."""
    polls = []
    for _ in range(10):  # bounded: a state that redelivers fails here instead of hanging
        got = [(n, m.content["c"]["tag"]) for n in nodes for m in state.get_message_ins(node_id=n, limit=1)]
        if not got:
            return polls
        polls.append(got)
    raise AssertionError(f"still delivering after 10 polls: {polls[-1]}")


def _scenario(indexed: bool):
    state, grid, nodes = bare_federation(4, indexed)
    a, b, c, _ = nodes
    plan = [(0, a), (1, b), (2, a), (3, c), (4, a), (5, b)]
    ids = list(grid.push_messages([_message(grid, tag, node) for tag, node in plan]))
    expiring = list(grid.push_messages([_message(grid, 6, c, ttl=0.05)]))
    state.delete_messages({ids[2]})  # the server dropped a's second message before delivery
    time.sleep(0.1)  # the ttl = 0.05 message expires
    return state, nodes, _poll_until_empty(state, nodes), expiring


def test_every_node_gets_the_same_messages_in_the_same_order_as_from_flowers_state():
    plain_state, plain_nodes, plain, _ = _scenario(indexed=False)
    indexed_state, indexed_nodes, indexed, _ = _scenario(indexed=True)
    assert type(plain_state) is InMemoryLinkState and type(indexed_state) is IndexedLinkState
    # The two federations draw different node ids, so compare (node's rank, tag) per poll.
    rank = lambda polls, nodes: [[(nodes.index(n), t) for n, t in poll] for poll in polls]  # noqa: E731
    assert rank(indexed, indexed_nodes) == rank(plain, plain_nodes)
    # Spelled out: a gets 0 then 4 (2 was deleted), b 1 then 5, c 3 (6 expired), d nothing.
    assert rank(indexed, indexed_nodes) == [[(0, 0), (1, 1), (2, 3)], [(0, 4), (1, 5)]]


def test_limit_run_id_and_redelivery_follow_flower():
    state, grid, nodes = bare_federation(2, indexed=True)
    a, b = nodes
    grid.push_messages([_message(grid, t, a) for t in range(3)])
    assert [m.content["c"]["tag"] for m in state.get_message_ins(node_id=a, limit=None)] == [0, 1, 2]
    assert state.get_message_ins(node_id=a, limit=None) == []  # delivered once, never again
    assert state.get_message_ins(node_id=b, limit=1) == []
    grid.push_messages([_message(grid, 9, b)])
    other_run = next(iter(state.run_ids)) + 1
    assert state.get_message_ins(node_id=b, limit=1, run_id=other_run) == []
    assert [m.content["c"]["tag"] for m in state.get_message_ins(node_id=b, limit=1)] == [9]


def test_a_poll_over_n_nodes_validates_n_messages_not_n_squared(monkeypatch):
    """The reason the class exists, counted rather than timed: Flower's lookup checks every stored message."""
    counts = {}
    for indexed in (False, True):
        state, grid, nodes = bare_federation(40, indexed)
        grid.push_messages([_message(grid, i, n) for i, n in enumerate(nodes)])
        calls = []
        original = type(state)._check_stored_messages
        monkeypatch.setattr(type(state), "_check_stored_messages", lambda self, ids, run_id=None: (calls.append(len(ids)), original(self, ids, run_id))[1])
        for n in nodes:
            assert len(state.get_message_ins(node_id=n, limit=1)) == 1
        monkeypatch.undo()
        counts[indexed] = sum(calls)
    assert counts[True] == 40
    assert counts[False] > 40 * 20  # Flower's: each lookup walks what is still undelivered


def test_the_factory_builds_the_indexed_state_only_inside_the_block():
    with indexed_link_state():
        assert type(_factory().state()) is IndexedLinkState
    assert type(_factory().state()) is InMemoryLinkState
