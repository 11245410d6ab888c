"""In-process driver of a whole secure-aggregation round (tests and benchmarks only).

:func:`run_secagg_round` plays the server and every client of
:mod:`common.secagg` in one process, optionally pushing every message through
Flower's record protobufs (:class:`_FlowerWire`). It is not part of the
protocol library: the ServerApp and ClientApp wire the stages themselves.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

import numpy as np

from common.secagg import SecAggClient, SecAggParams, SecAggResult, SecAggServer


def run_secagg_round(
    vectors: Mapping[int, np.ndarray],
    params: SecAggParams | None = None,
    *,
    drop_before_keys: Iterable[int] = (),
    drop_after_keys: Iterable[int] = (),
    drop_after_shares: Iterable[int] = (),
    drop_before_unmask: Iterable[int] = (),
    encoded: bool = False,
    rng: np.random.Generator | None = None,
    via_flower_records: bool = False,
    **param_kwargs: Any,
) -> SecAggResult:
    """Run every stage between ``len(vectors)`` simulated clients and one server.

    ``vectors`` maps node id -> float vector (or, with ``encoded=True``, an
    already-encoded integer vector). The ``drop_*`` sets simulate clients that
    vanish at the named point: before advertising keys, after advertising keys,
    after sending shares (the classic mid-round dropout: keys and shares out,
    no masked input), or after the masked input (no unmask reply). Without
    ``params`` a fresh session is created from ``param_kwargs``. The result's
    ``seconds`` has the time spent in client code and in server code.

    ``via_flower_records=True`` pushes every message through a Flower
    ``ConfigRecord`` / ``ArrayRecord`` protobuf round trip and re-creates every
    client from its :meth:`SecAggClient.to_state` dict (also via a
    ``ConfigRecord``) between stages, as a stateless Message-API ClientApp
    must; it checks the wire types, not speed.
    """
    if params is None:
        params = SecAggParams.create(vectors.keys(), int(np.asarray(next(iter(vectors.values()))).size), **param_kwargs)
    elif param_kwargs:
        params = replace(params, **param_kwargs)
    d0, d1, d2, d3 = (set(s) for s in (drop_before_keys, drop_after_keys, drop_after_shares, drop_before_unmask))
    tc = ts = 0.0

    def timed(fn, *a, side="c", **kw):
        nonlocal tc, ts
        t = time.perf_counter()
        out = fn(*a, **kw)
        if side == "c":
            tc += time.perf_counter() - t
        else:
            ts += time.perf_counter() - t
        return out

    wire = _FlowerWire() if via_flower_records else None
    cfg = wire.config if wire else (lambda m: m)
    arr = wire.array if wire else (lambda a: a)

    server = SecAggServer(params)
    setup = cfg(timed(server.setup_message, side="s"))
    clients = {nid: timed(SecAggClient, nid, setup) for nid in params.node_ids}

    def client(nid: int) -> SecAggClient:
        if wire:  # a fresh ClientApp invocation: only context.state survives
            clients[nid] = SecAggClient.from_state(wire.config(clients[nid].to_state()))
        return clients[nid]

    for nid in params.node_ids:
        if nid not in d0:
            timed(server.receive_keys, nid, cfg(timed(client(nid).advertise_keys)), side="s")
    for nid, m in timed(server.share_keys_messages, side="s").items():
        if nid not in d1:
            timed(server.receive_shares, nid, cfg(timed(client(nid).share_keys, cfg(m))), side="s")
    for nid, m in timed(server.masked_input_messages, side="s").items():
        if nid not in d2:
            kw = {"encoded": vectors[nid]} if encoded else {"vector": vectors[nid]}
            y = timed(client(nid).masked_input, cfg(m), rng=rng, **kw)
            timed(server.receive_masked_input, nid, arr(y), side="s")
    for nid, m in timed(server.unmask_messages, side="s").items():
        if nid not in d3:
            timed(server.receive_unmask, nid, cfg(timed(client(nid).unmask, cfg(m))), side="s")
    result = timed(server.finalize, side="s")
    result.seconds = {"clients": tc, "server": ts, "total": tc + ts}
    return result


class _FlowerWire:
    """Round-trips messages through Flower's record protobufs (driver option)."""

    def __init__(self) -> None:
        from flwr.app import Array, ArrayRecord, ConfigRecord
        from flwr.common.serde import (
            array_record_from_proto,
            array_record_to_proto,
            config_record_from_proto,
            config_record_to_proto,
        )

        self._cr, self._ar, self._a = ConfigRecord, ArrayRecord, Array
        self._cr_to, self._cr_from = config_record_to_proto, config_record_from_proto
        self._ar_to, self._ar_from = array_record_to_proto, array_record_from_proto

    def config(self, msg: Mapping[str, Any]) -> dict[str, Any]:
        wire = self._cr_to(self._cr(dict(msg))).SerializeToString()
        proto = type(self._cr_to(self._cr({})))()
        proto.ParseFromString(wire)
        return dict(self._cr_from(proto))

    def array(self, y: np.ndarray) -> np.ndarray:
        wire = self._ar_to(self._ar({"masked": self._a(y)})).SerializeToString()
        proto = type(self._ar_to(self._ar({})))()
        proto.ParseFromString(wire)
        return self._ar_from(proto)["masked"].numpy()
