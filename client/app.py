"""fedpersona ClientApp: the device side of one federated round.

Train: load the shared tier the server sent, swap in this user's private tier,
run DP-SGD locally, keep the private tier on the device, reply with the shared
tier only. Evaluate: score the held-out split with the base model, the shared
(global) adapter, and global + personal parts. Every reply passes the egress
guard mod before it leaves.
"""

from __future__ import annotations

import math
import uuid
import warnings
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from client import device
from client.train import TrainConfig, encode_pairs, epsilon_from_history, evaluate_nll, train_local
from common.models import AdapterSpec, personal_model, tier_of
from common.secagg import SecAggClient
from common.wire import ARRAYS, CONFIG, MASKED, METRICS, SECAGG, EgressGuard, WireSchema, flatten


def _config(msg: Message, context: Context) -> dict:
    """The run config with the server's per-message ConfigRecord on top."""
    return {**context.run_config, **(dict(msg.content[CONFIG]) if CONFIG in msg.content.keys() else {})}


def _setup(msg: Message, context: Context):
    config = _config(msg, context)
    spec = AdapterSpec.from_run_config(config)
    model = personal_model(spec)
    store = device.open_store(config, context.node_config)
    device.swap_in_user(model, store)
    if ARRAYS in msg.content.keys():
        shared = msg.content[ARRAYS].to_torch_state_dict()
        if any(tier_of(k) == "user" for k in shared):
            raise ValueError("the server sent a user-tier tensor; refusing to overwrite private state")
        model.load_trainable(shared)
    return config, spec, model, store


def egress_guard_mod(msg: Message, context: Context, call_next) -> Message:
    """Device half of the egress guard: check every reply before it is sent.

    With ``wire-audit-dir`` set, the reply is also recorded there in Flower's
    protobuf wire format, for the wire audit (``fedpersona audit``).
    """
    reply = call_next(msg, context)
    if not reply.has_content():
        return reply
    config = _config(msg, context)
    kind = msg.metadata.message_type
    if kind == "query":
        EgressGuard.check_secagg(reply.content)
    else:
        shared = personal_model(AdapterSpec.from_run_config(config)).shared_params()
        schema = WireSchema.masked(shared) if SECAGG in msg.content.keys() else WireSchema.from_tensors(shared)
        EgressGuard(schema).check(reply.content, kind=kind)
    if config.get("wire-audit-dir"):
        _record_wire(reply, Path(str(config["wire-audit-dir"])), context.node_id, kind)
    return reply


def _record_wire(reply: Message, folder: Path, node_id: int, kind: str) -> None:
    from flwr.common.serde import recorddict_to_proto

    folder.mkdir(parents=True, exist_ok=True)
    blob = recorddict_to_proto(reply.content).SerializeToString()
    (folder / f"{node_id}-{kind}-{uuid.uuid4().hex[:12]}.bin").write_bytes(blob)


def user_level_clip_mod(msg: Message, context: Context, call_next) -> Message:
    """Device half of DP-FedAvg: clip the whole shared update to the server's C.

    Delegates to Flower's ``fixedclipping_mod`` when the server's DP wrapper sent
    a clipping norm; without user-level DP there is nothing to clip.
    """
    if CONFIG in msg.content.keys() and KEY_CLIPPING_NORM in msg.content[CONFIG]:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


# Two known-harmless warnings, once per user and round, that would bury the log:
# Opacus' secure-RNG notice (see the README's threat model) and torch's note
# that full backward hooks fire on module outputs (the embedding input of the
# frozen base never requires grad).
warnings.filterwarnings("ignore", message="Secure RNG turned off")
warnings.filterwarnings("ignore", message="Full backward hook is firing")

app = ClientApp(mods=[egress_guard_mod])


@app.train(mods=[user_level_clip_mod])
def train(msg: Message, context: Context) -> Message:
    config, spec, model, store = _setup(msg, context)
    cfg = TrainConfig.from_run_config(config)
    data = encode_pairs(model.tokenizer, store.tasks("train"), cfg.max_len)
    gen = torch.Generator().manual_seed(int(config.get("seed", 0)) * 1000 + int(config.get("server-round", 0)))
    result, history, opt_state = train_local(
        model, data, cfg, device.accountant_history(store), store.get_state(device.OPTIMIZER), generator=gen
    )
    device.swap_out_user(model, store, history, opt_state)
    if SECAGG in msg.content.keys():
        arrays = _masked_update(msg, context, model, config)
    else:
        arrays = ArrayRecord(model.shared_state())
    content = RecordDict(
        {
            ARRAYS: arrays,
            METRICS: MetricRecord(
                {
                    "train-loss": float(result.loss),
                    "num-examples": result.num_examples,
                    "steps": result.steps,
                    "epsilon": _finite(result.epsilon),
                }
            ),
        }
    )
    return Message(content=content, reply_to=msg)


def _masked_update(msg: Message, context: Context, model, config: dict) -> ArrayRecord:
    """Secure-aggregation stage 2: this client's shared update, clipped, then masked.

    The update is the change of the shared tier in the order of the keys the
    server sent, so the server can un-flatten the sum. With user-level DP the
    whole update is clipped to C here, on the device, before masking.
    """
    sent = msg.content[ARRAYS]
    update = flatten(ArrayRecord(model.shared_state()), sent.keys()) - flatten(sent)
    if bool(config.get("user-dp", False)):
        clip = float(config["user-clip-norm"])
        norm = float(np.linalg.norm(update))
        if norm > clip:
            update *= clip / norm
    client = SecAggClient.from_state(dict(context.state[SECAGG]))
    masked = client.masked_input(dict(msg.content[SECAGG]), update)
    context.state[SECAGG] = ConfigRecord(client.to_state())
    return ArrayRecord({MASKED: Array(masked)})


@app.query()
def secagg_stage(msg: Message, context: Context) -> Message:
    """Secure-aggregation stages 0, 1 and 3 (key advertisement, shares, unmasking).

    The protocol state (including this device's private keys) lives in
    ``context.state`` between stages and never leaves the device.
    """
    request = dict(msg.content[SECAGG])
    if request["stage"] == "setup":
        client = SecAggClient(context.node_id, request)
        reply = client.advertise_keys()
    else:
        client = SecAggClient.from_state(dict(context.state[SECAGG]))
        if request["stage"] == "share_keys":
            reply = client.share_keys(request)
        elif request["stage"] == "unmask":
            reply = client.unmask(request)
        else:
            raise ValueError("unknown secure-aggregation stage")
    context.state[SECAGG] = ConfigRecord(client.to_state())
    return Message(content=RecordDict({SECAGG: ConfigRecord(reply)}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    config, spec, model, store = _setup(msg, context)
    cfg = TrainConfig.from_run_config(config)
    data = encode_pairs(model.tokenizer, store.tasks("test"), cfg.max_len)
    base, tokens = evaluate_nll(model, data, ())
    glob, _ = evaluate_nll(model, data, ("global",))
    pers, _ = evaluate_nll(model, data, ("global", "user"))
    eps = epsilon_from_history(device.accountant_history(store), cfg.delta) if cfg.dp else math.inf
    metrics = {
        "nll-base": base,
        "nll-global": glob,
        "nll-personal": pers,
        "num-examples": len(data),
        "num-tokens": tokens,
        "epsilon": _finite(eps),
        "user-index": int(context.node_config.get("partition-id", -1)),
        "num-records": store.num_records(),
    }
    return Message(content=RecordDict({METRICS: MetricRecord(metrics)}), reply_to=msg)


def _finite(eps: float) -> float:
    # MetricRecord values travel as numbers; -1 encodes "no DP guarantee" (epsilon = inf).
    return float(eps) if math.isfinite(eps) else -1.0
