"""fedpersona ClientApp: the device side of one federated round.

Train: load the shared tiers the server sent, choose this device's persona slot
locally (IFCA), swap in this user's private tier, run DP-SGD, keep the private
tier on the device, reply with the shared update only (K-slot when the persona
tier is on; masked under secure aggregation). Evaluate: score the held-out
split with the base model and each tier stack (global; global + persona;
global + persona + user) and with the stack the user's routing group is served.
Every reply passes the egress guard mod before it leaves.
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
from client.persona import add_noise_share, device_profile, pick_and_load, slot_update, split_slots
from client.train import TrainConfig, encode_pairs, epsilon_from_history, evaluate_nll, train_local
from common.models import AdapterSpec, personal_model, tier_of
from common.secagg import SecAggClient
from common.tiers import COLD_START, FREQUENT, GLOBAL, OCCASIONAL, PERSONA, USER, routing_group
from common.wire import ARRAYS, CONFIG, MASKED, METRICS, SECAGG, EgressGuard, WireSchema, train_reply_schema


def _config(msg: Message, context: Context) -> dict:
    """The run config with the server's per-message ConfigRecord on top."""
    return {**context.run_config, **(dict(msg.content[CONFIG]) if CONFIG in msg.content.keys() else {})}


def _setup(msg: Message, context: Context):
    """Load what the server sent; returns (config, model, store, persona slots)."""
    config = _config(msg, context)
    model = personal_model(AdapterSpec.from_run_config(config))
    store = device.open_store(config, context.node_config)
    device.swap_in_user(model, store)
    slots = {}
    if ARRAYS in msg.content.keys():
        direct, slots = split_slots(msg.content[ARRAYS].to_torch_state_dict())
        if any(tier_of(k) == USER for k in direct):
            raise ValueError("the server sent a user-tier tensor; refusing to overwrite private state")
        model.load_trainable(direct)
    return config, model, store, slots


def _wire_schema(msg: Message, config: dict) -> WireSchema:
    """What a train reply to ``msg`` may hold, derived from the model spec (not from the message)."""
    shared = personal_model(AdapterSpec.from_run_config(config)).shared_params()
    shapes = {k: tuple(v.shape) for k, v in shared.items()}
    return train_reply_schema(shapes, int(config.get("persona-slots", 0)), masked=SECAGG in msg.content.keys())


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
        EgressGuard(_wire_schema(msg, config)).check(reply.content, kind=kind)
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
    config, model, store, slots = _setup(msg, context)
    cfg = TrainConfig.from_run_config(config)
    data = encode_pairs(model.tokenizer, store.tasks("train"), cfg.max_len)
    server_round = int(config.get("server-round", 0))
    chosen = pick_and_load(model, slots, data, config, store, server_round, "train") if slots else None
    gen = torch.Generator().manual_seed(int(config.get("seed", 0)) * 1000 + server_round)
    result, history, opt_state = train_local(
        model, data, cfg, device.accountant_history(store), store.get_state(device.OPTIMIZER), generator=gen
    )
    device.swap_out_user(model, store, history, opt_state)
    if SECAGG in msg.content.keys():
        arrays = _masked_update(msg, context, model, config, chosen, store)
    elif slots:
        arrays = ArrayRecord({k: Array(v) for k, v in _update(msg, model, config, chosen, store).items()})
    else:
        # No persona tier, no secure aggregation: the new global values, as
        # Flower's FedAvg (and its DP wrapper with fixedclipping_mod) expect.
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


def _update(msg: Message, model, config: dict, chosen: int | None, store) -> dict[str, np.ndarray]:
    """This device's update in the wire layout (K-slot when the persona tier is on), clipped for user-level DP."""
    sent = {k: v.numpy() for k, v in msg.content[ARRAYS].items()}
    trained = {k: v.numpy() for k, v in model.shared_state().items()}
    clip = float(config["user-clip-norm"]) if bool(config.get("user-dp", False)) else None
    profile = device_profile(store) if chosen is not None else None
    return slot_update(sent, trained, chosen, int(config.get("persona-slots", 0)), clip, profile)


def _masked_update(msg: Message, context: Context, model, config: dict, chosen: int | None, store) -> ArrayRecord:
    """Secure-aggregation stage 2: this client's update, clipped, noised (distributed DP), then masked.

    The update is flattened in the key order the server sent (+ the count
    vector), so the server can un-flatten the sum.
    """
    client = SecAggClient.from_state(dict(context.state[SECAGG]))
    update = _update(msg, model, config, chosen, store)
    if bool(config.get("user-dp", False)) and str(config.get("secagg-noise", "distributed")) == "distributed":
        std = float(config["user-noise-multiplier"]) * float(config["user-clip-norm"])
        update = add_noise_share(update, std, client.params.min_survivors, np.random.default_rng())
    vector = np.concatenate([v.reshape(-1) for v in update.values()]).astype(np.float64)
    masked = client.masked_input(dict(msg.content[SECAGG]), vector)
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
    """Score the held-out split with each tier stack, and with the stack this user's routing group is served."""
    config, model, store, slots = _setup(msg, context)
    cfg = TrainConfig.from_run_config(config)
    test = encode_pairs(model.tokenizer, store.tasks("test"), cfg.max_len)
    train_pairs = store.tasks("train")
    if slots:
        pick_and_load(model, slots, encode_pairs(model.tokenizer, train_pairs, cfg.max_len), config, store, int(config.get("server-round", 0)), "evaluate")
    base, tokens = evaluate_nll(model, test, ())
    stacks = {"nll-global": (GLOBAL,), "nll-persona": (GLOBAL, PERSONA) if slots else (GLOBAL,), "nll-personal": (*model.tiers,) if slots else (GLOBAL, USER)}
    scores = {name: evaluate_nll(model, test, adapters)[0] for name, adapters in stacks.items()}
    group = routing_group(len(train_pairs), int(config.get("cold-start-below", 5)), int(config.get("frequent-from", 20)))
    served = {COLD_START: "nll-global", OCCASIONAL: "nll-persona", FREQUENT: "nll-personal"}[group]
    eps = epsilon_from_history(device.accountant_history(store), cfg.delta) if cfg.dp else math.inf
    metrics = {
        "nll-base": base,
        **scores,
        "nll-served": scores[served],
        "routing-group": group,
        "num-examples": len(test),
        "num-tokens": tokens,
        "epsilon": _finite(eps),
        "user-index": int(context.node_config.get("partition-id", -1)),
        "num-records": store.num_records(),
    }
    return Message(content=RecordDict({METRICS: MetricRecord(metrics)}), reply_to=msg)


def _finite(eps: float) -> float:
    # MetricRecord values travel as numbers; -1 encodes "no DP guarantee" (epsilon = inf).
    return float(eps) if math.isfinite(eps) else -1.0
