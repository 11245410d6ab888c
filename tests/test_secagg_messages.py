"""Malformed secure-aggregation messages, stage by stage, to the server and to a client.

Every parse problem (missing field, wrong type, short list, bytes of the wrong
length) must surface as :class:`SecAggProtocolError` -- never a KeyError,
TypeError or ValueError from deep inside -- with a message that names the field
and never echoes a value (a value could be anything a peer chose to send). A
refused message must not consume the stage: the valid one is accepted after.
"""

from __future__ import annotations

import numpy as np
import pytest

from common.secagg import SecAggClient, SecAggParams, SecAggProtocolError, SecAggServer

TEXT = "Jane Doe"  # a value no error message may repeat
BLOB = b"Jane Doe, 1 Main St"


def _mutations(msg: dict):
    """(label, field, mutated message): each field missing, of the wrong type, short, of the wrong length."""
    for key, value in msg.items():
        yield f"{key}-missing", key, {k: v for k, v in msg.items() if k != key}
        yield f"{key}-text", key, {**msg, key: TEXT}
        yield f"{key}-none", key, {**msg, key: None}
        if isinstance(value, list):
            yield f"{key}-scalar", key, {**msg, key: 7}
            if value:
                yield f"{key}-short", key, {**msg, key: value[:-1]}
                yield f"{key}-item-text", key, {**msg, key: [TEXT, *value[1:]]}
                if isinstance(value[0], bytes):
                    yield f"{key}-item-length", key, {**msg, key: [value[0][:-1], *value[1:]]}
                    yield f"{key}-item-long", key, {**msg, key: [value[0] + BLOB, *value[1:]]}
                else:
                    yield f"{key}-item-float", key, {**msg, key: [1.5, *value[1:]]}
                    yield f"{key}-item-bool", key, {**msg, key: [True, *value[1:]]}
        elif isinstance(value, bytes):
            yield f"{key}-length", key, {**msg, key: value[:-1]}
            yield f"{key}-int", key, {**msg, key: 7}
            yield f"{key}-list", key, {**msg, key: [value]}
        elif isinstance(value, bool):
            yield f"{key}-int", key, {**msg, key: 1}
        elif isinstance(value, int):
            yield f"{key}-float", key, {**msg, key: 1.5}
            yield f"{key}-bool", key, {**msg, key: True}
            yield f"{key}-bytes", key, {**msg, key: BLOB}
            yield f"{key}-list", key, {**msg, key: [value]}
        elif isinstance(value, float):
            yield f"{key}-nan", key, {**msg, key: float("nan")}
            yield f"{key}-huge", key, {**msg, key: 10**400}
            yield f"{key}-bytes", key, {**msg, key: BLOB}


def _check_refused(deliver, msg: dict, skip=()) -> int:
    n = 0
    for label, key, bad in _mutations(msg):
        if label in skip:
            continue
        with pytest.raises(SecAggProtocolError) as err:
            deliver(bad)
        text = str(err.value)
        assert key in text, f"{label}: the error should name the field: {text}"
        assert "Jane" not in text and "1.5" not in text and repr(BLOB[:4])[2:-1] not in text, label
        n += 1
    return n


# Mutations that leave a message valid: a setup for fewer nodes is just another
# session (this client is still in it).
SETUP_VALID = {"node_ids-short"}


def test_malformed_messages_of_every_stage_are_protocol_errors():
    ids = [11, 22, 33, 44, 55, 66]
    params = SecAggParams.create(ids, 8)  # full graph: every client is every other's neighbour
    server = SecAggServer(params)
    setup = server.setup_message()
    checked = _check_refused(lambda m: SecAggClient(ids[0], m), setup, skip=SETUP_VALID)
    clients = {i: SecAggClient(i, setup) for i in ids}

    for i, c in clients.items():
        reply = c.advertise_keys()
        checked += _check_refused(lambda r, i=i: server.receive_keys(i, r), reply)
        server.receive_keys(i, reply)
    for i, m in server.share_keys_messages().items():
        checked += _check_refused(clients[i].share_keys, m)
        reply = clients[i].share_keys(m)
        checked += _check_refused(lambda r, i=i: server.receive_shares(i, r), reply)
        server.receive_shares(i, reply)
    late = ids[-1]  # sends shares, then drops: the unmask request lists it as dropped
    for i, m in server.masked_input_messages().items():
        checked += _check_refused(lambda msg, i=i: clients[i].masked_input(msg, np.ones(8)), m)
        y = clients[i].masked_input(m, np.ones(8))
        if i != late:
            server.receive_masked_input(i, y)
    for bad in (None, TEXT, [TEXT] * 8, y.astype(np.int64), y[:-1], np.stack([y, y]), y.astype(np.float32)):
        with pytest.raises(SecAggProtocolError):
            server.receive_masked_input(late, bad)
    for i, m in server.unmask_messages().items():
        assert m["dropped"] == [late]
        checked += _check_refused(clients[i].unmask, m)
        reply = clients[i].unmask(m)
        checked += _check_refused(lambda r, i=i: server.receive_unmask(i, r), reply)
        server.receive_unmask(i, reply)
    assert np.abs(server.finalize().sum - 5.0).max() <= params.codec.error_bound(5)
    assert checked > 300


def test_malformed_client_state_is_a_protocol_error():
    ids = [1, 2, 3, 4]
    params = SecAggParams.create(ids, 4)
    server = SecAggServer(params)
    setup = server.setup_message()
    clients = {i: SecAggClient(i, setup) for i in ids}
    for i, c in clients.items():
        server.receive_keys(i, c.advertise_keys())
    msgs = server.share_keys_messages()
    for i, c in clients.items():
        server.receive_shares(i, c.share_keys(msgs[i]))
    msgs = server.masked_input_messages()
    clients[1].masked_input(msgs[1], np.zeros(4))
    state = clients[1].to_state()  # mid-round: keys, peers and held shares all present
    SecAggClient.from_state(state)
    # A shorter node list is another valid session; this node is still in it.
    skip = {"p.node_ids-short"}
    assert _check_refused(SecAggClient.from_state, state, skip=skip) > 80
    with pytest.raises(SecAggProtocolError):
        SecAggClient.from_state({**state, "p.node_ids": [2, 3, 4, 5]})  # this node is not in it
    with pytest.raises(SecAggProtocolError):
        SecAggClient.from_state({**state, "stage": "unknown"})
