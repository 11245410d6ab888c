"""An in-process federation (tests and benchmarks only): the real strategy and ClientApp, no Flower runtime.

:class:`LoopbackGrid` routes the strategy's messages straight to a ClientApp,
one device context per node, and can make devices drop out at a chosen
message: never receive it (``drop``), or handle it and then vanish, so that
its reply never arrives and no later message reaches it (``lose``: the
device did the work, e.g. trained and was charged, but the server never
hears from it again). The other functions build what a ServerApp starts
from (codec, initial tiers, strategy) and devices with their own policy
files, as the simulation harness writes them.

It is a transport and a fixture, nothing more: the ServerApp and the
SuperNodes use Flower's own grid.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from flwr.app import Array, ArrayRecord, Context, RecordDict

from common.config import RunConfig
from common.kslot import KSlotCodec
from common.privacy import run_codec
from common.models import AdapterSpec, personal_model


def codec_for(cfg: RunConfig) -> KSlotCodec:
    shared = personal_model(AdapterSpec.from_config(cfg)).shared_params()
    return run_codec(shared, cfg)


def initial_arrays(cfg: RunConfig) -> ArrayRecord:
    """What the ServerApp starts from: the global tier, every persona slot and the centroids."""
    model = personal_model(AdapterSpec.from_config(cfg))
    state = codec_for(cfg).initial_state(model.initial_shared_state(), cfg.persona.init_std, cfg.seed)
    return ArrayRecord({k: Array(v) for k, v in state.items()})


def strategy_for(cfg: RunConfig, num_rounds: int = 1):
    from common.privacy import build_pipeline
    from server.strategy import TieredFedAvg

    codec = codec_for(cfg)
    return TieredFedAvg(cfg, codec, build_pipeline(cfg, codec), num_rounds)


def device_context(tmp: Path, node_id: int, user_file: Path, cfg: RunConfig, run_config: dict | None = None, **policy) -> Context:
    """A device with its own policy file (the run's own settings as the floor, ``policy`` on top).

    Its folder is ``tmp/device-<node_id>``, its store ``store.sqlite`` in it.
    """
    from client.policy import write_policy
    from simulations.run import device_policy

    folder = Path(tmp) / f"device-{node_id}"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "policy.json"
    write_policy(path, replace(device_policy(cfg, Path(user_file), folder / "store.sqlite"), **policy))
    return Context(run_id=1, node_id=node_id, node_config={"policy-file": str(path)}, state=RecordDict(), run_config=run_config if run_config is not None else cfg.flat())


class LoopbackGrid:
    """Routes messages to ClientApps in-process: a transport for tests and benchmarks, nothing more.

    ``drop``: (node id, message type) pairs that are never delivered.
    ``lose``: (node id, message type) pairs that are delivered and handled,
    whose reply is lost; the node is gone from then on (a new grid brings it
    back). ``seen`` records every message sent, ``lost`` every lost reply.
    """

    def __init__(self, app, contexts: dict[int, Context], drop=(), lose=()):
        self.app, self.contexts, self.drop, self.lose = app, contexts, set(drop), set(lose)
        self.seen: list = []
        self.lost: list = []  # (node id, reply) for every reply that never arrived
        self.gone: set[int] = set()
        self._waiting: dict[str, object] = {}  # message id -> its reply, until pulled
        self._next_id = 0

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):
        """Deliver each message now and keep its reply until pulled; returns the ids of the replies to expect.

        A message that is dropped, or whose reply is lost, gets no id back: the
        caller stops waiting for it at once, as Flower's would at its timeout.
        """
        ids = []
        for msg in messages:
            self._next_id += 1
            mid = f"loopback-{self._next_id}"
            msg.metadata.__dict__["_message_id"] = mid
            for reply in self.send_and_receive([msg]):
                reply.metadata.__dict__["_reply_to_message_id"] = mid
                self._waiting[mid] = reply
                ids.append(mid)
        return ids

    def pull_messages(self, message_ids):
        return [self._waiting.pop(mid) for mid in list(message_ids) if mid in self._waiting]

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for msg in messages:
            nid, kind = msg.metadata.dst_node_id, msg.metadata.message_type
            self.seen.append((kind, msg.content))
            if nid in self.gone or (nid, kind) in self.drop:
                continue
            reply = self.app(msg, self.contexts[nid])
            # Flower's runtime stamps the sender on delivery; this loopback does it here.
            reply.metadata.__dict__["_src_node_id"] = nid
            if (nid, kind) in self.lose:
                self.gone.add(nid)
                self.lost.append((nid, reply))
                continue
            replies.append(reply)
        return replies
