"""fedpersona ClientApp: the device side of a round (Flower Message API).

Train: admit the message against the device's policy, load the shared tiers
the server sent, choose this device's persona slot locally, swap in this
user's private tier, run DP-SGD, keep the private tier on the device, and
reply with the K-slot update after the privacy pipeline's device halves
(clip, noise share, secure-sum masking). Evaluate: score the held-out split
with each tier stack and keep the results, and the stack this user is served
(client/served.py), on the device. Query: the
secure-aggregation stages.

Two mods wrap every handler. The refusal mod turns any failure into a typed
refusal (a reason code, nothing else; details go to the device's local log
only), so no exception text ever reaches Flower's error channel. The egress
guard checks every reply before it leaves.
"""

from __future__ import annotations

import functools
import logging
import math
import warnings

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client import accounting, device
from client import context as in_context  # "context" is the Flower Context in every handler
from client.persona import device_profile, pick_and_load
from client.policy import PolicyError, Refused
from client.served import keep_served
from client.store import IngestError, StoreError
from client.accounting import calibrated_noise, epsilon_from_history, would_exceed
from client.train import classification_scores, encode_pairs, evaluate_nll, option_predictions, train_local
from common.config import ConfigError, RunConfig
from common.kslot import KSlotCodec
from common.models import COLD_START, FREQUENT, GLOBAL, OCCASIONAL, PERSONA, USER, AdapterSpec, ModelNotAvailable, personal_model, routing_group, tier_of
from common import csprng
from common.privacy import DeviceUpdate, Pipeline, build_pipeline, run_codec
from common.secagg import SecAggClient, SecAggProtocolError
from common.wire import ARRAYS, METRICS, SECAGG, EgressGuard, EgressViolation, Reason, refusal_content

log = logging.getLogger(__name__)

# Two known-harmless warnings, once per user and round, that would bury the log:
# Opacus' secure-RNG notice (see the README's threat model) and torch's note
# that full backward hooks fire on module outputs (the embedding input of the
# frozen base never requires grad).
warnings.filterwarnings("ignore", message="Secure RNG turned off")
warnings.filterwarnings("ignore", message="Full backward hook is firing")


# --------------------------------------------------------------------------- mods


def reason_for(err: BaseException) -> Reason:
    """The reason code a failure crosses the wire as."""
    if isinstance(err, Refused):
        return err.reason
    for kind, reason in (
        (IngestError, Reason.INGEST_ERROR),
        (device.DeviceDataMissing, Reason.DATA_MISSING),
        (PolicyError, Reason.POLICY_INVALID),
        (ConfigError, Reason.CONFIG_INVALID),
        (ModelNotAvailable, Reason.MODEL_UNAVAILABLE),
        (EgressViolation, Reason.EGRESS_VIOLATION),
        (SecAggProtocolError, Reason.PROTOCOL_ERROR),
    ):
        if isinstance(err, kind):
            return reason
    return Reason.DEVICE_ERROR


def refusal_mod(msg: Message, context: Context, call_next) -> Message:
    """Every failure becomes a typed refusal: a reason code crosses the wire, the details stay in the local log.

    Our own errors (ingestion, the store, policy, config) name files, lines and keys but
    never user text, so they are logged; a third-party exception's text may
    hold anything, so only its type is.
    """
    try:
        return call_next(msg, context)
    except Exception as err:  # noqa: BLE001 - the one place every device failure is caught
        reason = reason_for(err)
        own = isinstance(err, (Refused, IngestError, StoreError, device.DeviceDataMissing, PolicyError, ConfigError, ModelNotAvailable))
        log.warning("declined a %s message: %s (%s at %s)", msg.metadata.message_type, reason.name,
                    err if own else type(err).__name__, _where(err))
        return Message(content=refusal_content(reason), reply_to=msg)


def _where(err: BaseException) -> str:
    """Where an exception was raised (file:line), for the local log; never its message."""
    import traceback

    frames = traceback.extract_tb(err.__traceback__)
    return f"{frames[-1].filename.rsplit('/', 2)[-2:][-1]}:{frames[-1].lineno}" if frames else "?"


@functools.lru_cache(maxsize=8)
def _wire(cfg: RunConfig) -> tuple[KSlotCodec, Pipeline]:
    """This run's K-slot codec and privacy pipeline (built from the model's live shapes, never from the message)."""
    shared = personal_model(AdapterSpec.from_config(cfg)).shared_params()
    codec = run_codec(shared, cfg)
    return codec, build_pipeline(cfg, codec)


def egress_guard_mod(msg: Message, context: Context, call_next) -> Message:
    """Device half of the egress guard: check every reply before it is sent (raises; the refusal mod answers)."""
    reply = call_next(msg, context)
    if not reply.has_content():
        return reply
    kind = msg.metadata.message_type
    if kind == "train" and ARRAYS in reply.content.keys():
        codec, pipeline = _wire(device.admit(msg, context).cfg)
        pipeline.step("guard").guard.check(reply.content, kind)
    else:
        EgressGuard(None).check(reply.content, kind)
    return reply


PRODUCTION_MODS = (refusal_mod, egress_guard_mod)


# --------------------------------------------------------------------------- handlers


def train(msg: Message, context: Context) -> Message:
    dev = device.open_device(msg, context)
    cfg, store = dev.cfg, dev.store
    pairs = store.tasks("train")
    if not pairs:
        raise Refused(Reason.NO_TRAINING_DATA)
    codec, pipeline = _wire(cfg)
    sent = {k: v.numpy() for k, v in msg.content[ARRAYS].items()}
    masked = SECAGG in msg.content.keys()
    participation = device.get_json(store, device.PARTICIPATION, {"rounds": 0, "joined": 0})
    rate = cfg.client_sample_rate
    fingerprint = _fingerprint(sent, dev.server_round)
    replay = _replayable(store, fingerprint)
    declined = False
    if replay is not None:
        # The server lost this round after this device took part (a crash
        # before its checkpoint) and asks again with the same tiers: resend the
        # same clipped, noised update. Training again would charge the budget twice.
        vector, result, chosen = replay, None, None
    elif masked and rate < 1 and not csprng.bernoulli(1, rate)[0]:
        # Under secure aggregation devices sample themselves (OS entropy), so the
        # server never learns the cohort. A device not drawn this round trains
        # nothing and sends a zero update with its noise share: the noise total
        # does not depend on who was drawn.
        vector, result, chosen = np.zeros(codec.length), None, None
    else:
        vector, result, chosen = _train_round(dev, sent, codec, pairs, participation)
        declined = result is None  # drawn, and served a shared stack: it ran no DP-SGD (accounting.runs_dp_sgd)
    update = DeviceUpdate(codec, vector, clip_norm=dev.round_clip, trained=result is not None)
    if masked:
        update.secagg_request = dict(msg.content[SECAGG])
        update.secagg_state = dict(context.state[SECAGG])
        update.min_contributors = pipeline.step("secure-sum").honest_floor(SecAggClient.from_state(update.secagg_state).params)
    steps = pipeline.run_device(update, replay=replay is not None)
    if masked:
        context.state[SECAGG] = ConfigRecord(update.secagg_state)
    if replay is None:
        device.put_state_array(store, device.LAST_UPDATE, update.vector, fingerprint)
        participation["joined"] += 1  # user-level releases this device took part in (for its own epsilon)
        device.put_json(store, device.PARTICIPATION, participation)
        _note_diagnostics(store, dev.server_round, result, steps, chosen, declined)
    return Message(content=RecordDict({ARRAYS: update.payload}), reply_to=msg)


def _fingerprint(sent: dict, server_round: int) -> str:
    """What identifies a round's request: its number and the exact tiers the server sent."""
    import hashlib

    h = hashlib.sha256(str(server_round).encode())
    for key in sorted(sent):
        h.update(key.encode())
        h.update(np.ascontiguousarray(sent[key]).tobytes())
    return h.hexdigest()


def _replayable(store, fingerprint: str):
    """The update this device already released for exactly this request, if any."""
    cached = device.get_state_array(store, device.LAST_UPDATE)
    return cached[0] if cached is not None and cached[1] == fingerprint else None


def _train_round(dev: device.Device, sent: dict, codec: KSlotCodec, pairs, participation: dict):
    """Check this device's budgets, choose its persona, run DP-SGD; returns (raw K-slot update, result, slot)."""
    cfg, store, model = dev.cfg, dev.store, dev.model
    if dev.policy.max_rounds and participation["rounds"] >= dev.policy.max_rounds:
        raise Refused(Reason.PARTICIPATION_BUDGET_SPENT)
    train_cfg = _device_train_config(dev, len(pairs))
    kept = device.get_json(store, device.CONTEXT, None)
    # The accountant as it will be once this round's phrase release (if one is due) is charged.
    acc_state = device.accountant_state(store)
    due = kept is None and train_cfg.context != "none"
    if due and train_cfg.phrase_release:
        acc_state = _charge_phrase_release(acc_state, train_cfg)
    if not accounting.runs_dp_sgd(train_cfg, len(pairs), cfg.routing.frequent_from):
        # Served a shared stack, this device spends its budget on its context phrases alone and sends
        # a zero update (accounting.runs_dp_sgd); the round still counts as one it took part in.
        if due and train_cfg.phrase_release and _past_cap(acc_state, train_cfg):
            raise Refused(Reason.RECORD_BUDGET_SPENT)
        if due:
            _release_phrases(store, train_cfg, pairs, acc_state)
        return np.zeros(codec.length), None, None
    if would_exceed(acc_state, train_cfg, len(pairs), train_cfg.max_epsilon):
        raise Refused(Reason.RECORD_BUDGET_SPENT)
    if train_cfg.context == "none":
        phrases = []  # whatever an earlier run left in the store
    else:
        phrases = _release_phrases(store, train_cfg, pairs, acc_state) if due else kept["phrases"]
    direct, slots, centroids = codec.split_received(sent)
    _load_shared(model, direct)
    data = encode_pairs(model.tokenizer, pairs, cfg.train.max_len, context=in_context.prefix(phrases))
    chosen = _persona(dev, slots, centroids, data, "train")
    # A seeded batch order only without DP: under DP the sample must stay secret (train_local draws it from the OS).
    gen = None if cfg.train.dp else torch.Generator().manual_seed(cfg.seed * 1000 + dev.server_round)
    # Under adaptive clipping the clip norm carries over between rounds, on the device only.
    clip_start = device.get_json(store, device.CLIP_NORM, {}).get("clip-norm")
    result, acc_state, opt_state = train_local(model, data, train_cfg, acc_state, store.get_state(device.OPTIMIZER),
                                               generator=gen, clip_start=clip_start)
    device.swap_out_user(model, store, acc_state, opt_state)
    if result.clip_norm is not None:
        device.put_json(store, device.CLIP_NORM, {"clip-norm": result.clip_norm})
    participation["rounds"] += 1
    trained = {k: v.numpy() for k, v in model.shared_state().items()}
    # Only k-means sends a profile row, and only under user-level DP (the run config enforces it).
    profile = device_profile(store) if chosen is not None and cfg.persona.assign == "kmeans" else None
    return codec.encode(sent, trained, chosen, profile), result, chosen


def _past_cap(acc_state: str | None, train_cfg) -> bool:
    """Whether the accountant as charged is already past the device's record-level cap (0 = none)."""
    cap = train_cfg.max_epsilon
    return cap > 0 and accounting.epsilon_from_history(acc_state, train_cfg.accountant_delta) > cap


def _charge_phrase_release(acc_state: str | None, train_cfg) -> str:
    """The accountant state with the phrase release's step (one Gaussian step, client/context.py) added."""
    acc = accounting.restore(acc_state, train_cfg.accountant)
    acc.history.extend(accounting.phrase_step(train_cfg))
    return accounting.dump_state(acc)


def _release_phrases(store, train_cfg, pairs, charged: str | None) -> list[tuple[str, str]]:
    """This device's context phrases: released once, on its own records, before its first DP-SGD step.

    Under DP ``charged`` is the accountant with the release's step; it is written before the phrases
    are, so a crash in between can only over-count.
    """
    outputs = [output for _, output in pairs]
    if train_cfg.phrase_release:
        store.put_state(device.ACCOUNTANT, charged.encode())
        phrases = in_context.private_phrases(outputs, train_cfg.context_noise, train_cfg.context_delta,
                                          in_context.PER_RECORD, in_context.MAX_PHRASES)
    else:
        phrases = in_context.exact_phrases(outputs, in_context.PER_RECORD, in_context.MAX_PHRASES)
    device.put_json(store, device.CONTEXT, {"phrases": phrases})
    return phrases


def _device_train_config(dev: device.Device, num_records: int):
    """The record-level settings this device trains with: the run's, with its own calibrated noise.

    With ``target-epsilon`` set, the device picks the noise that ends its
    planned rounds at the target (never above its cap), once, from its own
    record count, and keeps it in its store; never below its policy's floor.
    So is the phrase release's noise (``accounting.release_noise``).
    """
    from dataclasses import replace

    t = dev.cfg.train
    floor, frequent_from = dev.policy.min_noise_multiplier, dev.cfg.routing.frequent_from
    if not (t.dp and t.target_epsilon > 0):
        return accounting.resolve_release(t, num_records, frequent_from, floor)
    target = min(t.target_epsilon, t.max_epsilon) if t.max_epsilon > 0 else t.target_epsilon
    if not accounting.runs_dp_sgd(t, num_records, frequent_from):
        # No DP-SGD to calibrate: the release takes the whole budget.
        return accounting.resolve_release(replace(t, target_epsilon=target), num_records, frequent_from, floor)
    saved = device.get_json(dev.store, device.CALIBRATION, None)
    if saved is None:
        aimed = accounting.resolve_release(replace(t, target_epsilon=target), num_records, frequent_from, floor)
        try:
            z = calibrated_noise(aimed, num_records, dev.cfg.federation.num_server_rounds)
        except ValueError:
            # No noise reaches so small a target (RDP's orders floor epsilon near 0.2 at delta 1e-5):
            # the device cannot train within its cap at all.
            raise Refused(Reason.RECORD_BUDGET_SPENT) from None
        saved = {"noise_multiplier": max(z, floor), "target_epsilon": target, "records": num_records,
                 "context_noise": aimed.context_noise}
        device.put_json(dev.store, device.CALIBRATION, saved)
    context_noise = saved.get("context_noise")
    if context_noise is None:  # a calibration saved before the release's noise was: resolved against its target
        aimed = accounting.resolve_release(replace(t, target_epsilon=saved["target_epsilon"]), num_records, frequent_from, floor)
        context_noise = aimed.context_noise
    return replace(t, noise_multiplier=saved["noise_multiplier"], context_noise=context_noise)


def _load_shared(model, direct: dict) -> None:
    """Load the server's global tier; a user-tier tensor from a server is refused, never loaded."""
    if any(tier_of(k) == USER for k in direct):
        raise Refused(Reason.PROTOCOL_ERROR, "the server sent a user-tier tensor; private state is never overwritten")
    model.load_trainable({k: torch.from_numpy(v) for k, v in direct.items()})


def _persona(dev: device.Device, slots, centroids, data, phase: str) -> int | None:
    """Load this device's persona slot (None, with the persona adapter at its initial zeros, when it stays out)."""
    if not slots or not dev.policy.persona_tier:
        if dev.model.spec.persona:
            dev.model.reset_to_initial({k for k in dev.model.trainable_state() if tier_of(k) == PERSONA})
        return None
    tensors = {k: {key: torch.from_numpy(v) for key, v in s.items()} for k, s in slots.items()}
    return pick_and_load(dev.model, tensors, centroids, data, dev.cfg, dev.store, dev.server_round, phase)


def _note_diagnostics(store, server_round: int, result, steps: dict, chosen: int | None, declined: bool) -> None:
    """What this round looked like on the device: kept in its store for the simulation's diagnostics, never sent.

    ``sampled`` is whether it ran DP-SGD this round; ``declined``, whether it was drawn and chose not to
    (served a shared stack, ``shared-stack-dp-sgd = false``), having released its phrases instead.
    """
    diag = device.get_json(store, device.DIAGNOSTICS, {"rounds": {}})
    entry = {"sampled": result is not None, "declined": declined, "privacy": {name: m for name, m in steps.items() if m}}
    if result is not None:
        entry.update({
            "train_loss": result.loss,
            "steps": result.steps,
            "num_examples": result.num_examples,
            "epsilon": result.epsilon if math.isfinite(result.epsilon) else None,
            "persona": chosen,
            "dp_sgd": result.instruments,
        })
    diag["rounds"][str(server_round)] = entry
    device.put_json(store, device.DIAGNOSTICS, diag)


def secagg_stage(msg: Message, context: Context) -> Message:
    """Secure-aggregation stages 0, 1 and 3 (key advertisement, shares, unmasking).

    The protocol state (this device's private keys, held shares) lives in
    ``context.state`` between stages, never leaves the device, and is dropped
    after the unmask stage.
    """
    adm = device.admit(msg, context)
    if not adm.cfg.secagg.enabled and not adm.policy.require_secagg:
        raise Refused(Reason.PROTOCOL_ERROR, "a secure-aggregation stage in a run without secure aggregation")
    request = dict(msg.content[SECAGG])
    stage = request.get("stage")
    if stage == "setup":
        client = SecAggClient(context.node_id, request)
        reply = client.advertise_keys()
    elif stage in ("share_keys", "unmask") and SECAGG in context.state.keys():
        client = SecAggClient.from_state(dict(context.state[SECAGG]))
        reply = client.share_keys(request) if stage == "share_keys" else client.unmask(request)
    else:
        raise SecAggProtocolError("unexpected secure-aggregation stage")
    if stage == "unmask":
        del context.state[SECAGG]
    else:
        context.state[SECAGG] = ConfigRecord(client.to_state())
    return Message(content=RecordDict({SECAGG: ConfigRecord(reply)}), reply_to=msg)


def evaluate(msg: Message, context: Context) -> Message:
    """Score the held-out split with each tier stack and with the stack this user's routing group is served.

    The results stay in the device's store; the reply says only that it evaluated.
    """
    dev = device.open_device(msg, context)
    cfg, store, model = dev.cfg, dev.store, dev.model
    test_pairs = store.tasks("test")
    if not test_pairs:
        raise Refused(Reason.NO_TEST_DATA)
    codec, _ = _wire(cfg)
    direct, slots, centroids = codec.split_received({k: v.numpy() for k, v in msg.content[ARRAYS].items()})
    _load_shared(model, direct)
    train_pairs = store.tasks("train")
    chosen = _persona(dev, slots, centroids, encode_pairs(model.tokenizer, train_pairs, cfg.train.max_len), "evaluate")
    # The trained stacks are served with the device's context phrases (none until it has trained); the
    # zero-shot base stays the bare model, the reference every gain is measured from.
    phrases = device.served_phrases(store, cfg)
    head = in_context.prefix(phrases)
    test = encode_pairs(model.tokenizer, test_pairs, cfg.train.max_len)
    test_in_context = encode_pairs(model.tokenizer, test_pairs, cfg.train.max_len, context=head) if head else test
    persona = chosen is not None
    stacks = {"base": (), "global": (GLOBAL,), "persona": (GLOBAL, PERSONA) if persona else (GLOBAL,), "personal": model.tiers if persona else (GLOBAL, USER)}
    scores, tokens = {}, 0
    for name, adapters in stacks.items():
        scores[name], tokens = evaluate_nll(model, test if name == "base" else test_in_context, adapters)
    group = routing_group(len(train_pairs), cfg.routing.cold_start_below, cfg.routing.frequent_from)
    served = {COLD_START: "global", OCCASIONAL: "persona", FREQUENT: "personal"}[group]
    # The stack this user is served, kept on the device (fedpersona export / ask read it).
    keep_served(store, model, cfg, stacks[served], group, dev.server_round, head)
    labelled = [(i, o, opts) for i, o, opts in store.labelled_tasks("test") if opts]
    classification = None
    if labelled:
        # Classification by scoring the label options: accuracy and macro-F1 per tier stack.
        examples, gold = [(i, opts) for i, _, opts in labelled], [o for _, o, _ in labelled]
        classification = {}
        for name, adapters in stacks.items():
            picks = option_predictions(model, examples, adapters, cfg.train.max_len, context="" if name == "base" else head)
            classification[name] = classification_scores([opts[k] for (_, opts), k in zip(examples, picks)], gold)
        classification["served"] = classification[served]
        classification["examples"] = len(labelled)
    eps = epsilon_from_history(device.accountant_state(store), cfg.train.accountant_delta) if cfg.train.dp else math.inf
    joined = device.get_json(store, device.PARTICIPATION, {"joined": 0})["joined"]
    device.put_json(store, device.EVAL_RESULTS, {
        "round": dev.server_round,
        "nll": {**scores, "served": scores[served]},
        "classification": classification,
        "routing_group": group,
        "persona": chosen,
        "test_examples": len(test),
        "test_tokens": tokens,
        "train_records": len(train_pairs),
        "context_phrases": len(phrases),
        "records": store.num_records(),
        "epsilon": eps if math.isfinite(eps) else None,
        "delta": cfg.train.delta,
        "user_rounds_joined": joined,
        "user_epsilon_against_server": _user_epsilon_against_server(cfg, joined),
    })
    if SECAGG in context.state.keys():
        del context.state[SECAGG]  # a round that aborted before unmasking left protocol secrets behind
    return Message(content=RecordDict({METRICS: MetricRecord({})}), reply_to=msg)


def _user_epsilon_against_server(cfg: RunConfig, rounds_joined: int) -> float | None:
    """This device's own user-level epsilon against the server, from the releases it took part in (None = no guarantee).

    Only device-added noise under secure aggregation holds against the server;
    devices sample themselves there, so the amplification stands against it too.
    """
    from common.privacy.accounting import independent_user_epsilon

    if not (cfg.user_dp.enabled and cfg.noise_placement == "distributed"):
        return None
    return independent_user_epsilon(cfg.user_dp.noise_multiplier, rounds_joined, cfg.user_dp.delta, cfg.client_sample_rate)


def make_app(mods=()) -> ClientApp:
    """The ClientApp with the production mods; the simulation harness may add its own outside them."""
    app = ClientApp(mods=[*mods, *PRODUCTION_MODS])
    app.train()(train)
    app.evaluate()(evaluate)
    app.query()(secagg_stage)
    return app


app = make_app()
