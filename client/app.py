"""fedpersona ClientApp: the device side of one federated round.

Train: load the shared tier the server sent, swap in this user's private tier,
run DP-SGD locally, keep the private tier on the device, reply with the shared
tier only. Evaluate: score the held-out split with the base model, the shared
(global) adapter, and global + personal parts. Every reply passes the egress
guard mod before it leaves.
"""

from __future__ import annotations

import math
import warnings

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from client import device
from client.train import TrainConfig, encode_pairs, epsilon_from_history, evaluate_nll, train_local
from common.models import AdapterSpec, personal_model, tier_of
from common.wire import ARRAYS, CONFIG, METRICS, EgressGuard, WireSchema


def _setup(msg: Message, context: Context):
    config = dict(msg.content[CONFIG]) if CONFIG in msg.content.keys() else {}
    config = {**context.run_config, **config}
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
    """Device half of the egress guard: check every reply before it is sent."""
    reply = call_next(msg, context)
    if reply.has_content():
        config = {**context.run_config, **(dict(msg.content[CONFIG]) if CONFIG in msg.content.keys() else {})}
        schema = WireSchema.from_tensors(personal_model(AdapterSpec.from_run_config(config)).shared_state())
        EgressGuard(schema).check(reply.content, kind="train" if msg.metadata.message_type == "train" else "evaluate")
    return reply


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
    content = RecordDict(
        {
            ARRAYS: ArrayRecord(model.shared_state()),
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
