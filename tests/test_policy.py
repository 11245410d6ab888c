"""The device owns its privacy floor: the server may tighten it, never loosen it (the policy test matrix).

Every request below reaches the real ClientApp, either in the run config (which
comes from whoever submits the run) or in the message. Each is refused with a
reason code, and the device's data and state are unchanged.
"""

from __future__ import annotations

import hashlib
import json

import pytest
from helpers import device_context, quick, server_message, user_files

from client.app import app
from client.policy import DevicePolicy, PolicyError
from common.wire import REFUSAL, Reason


def _state(folder):
    """A fingerprint of everything the device keeps (the store and its WAL), or None before its first write."""
    files = sorted(p for p in folder.glob("store.sqlite*"))
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files} or None


def _reason(reply):
    assert set(reply.content.keys()) == {REFUSAL}, "expected a refusal"
    assert set(reply.content[REFUSAL].keys()) == {"reason"}
    return Reason(reply.content[REFUSAL]["reason"])


# (what the server asks, where it asks it, the floor's reason code)
MATRIX = {
    "scrub-mode=off": ({"scrub-mode": "off"}, "run", Reason.SCRUB_BELOW_FLOOR),
    "scrub-mode=patterns below a full floor": ({"scrub-mode": "patterns"}, "run", Reason.SCRUB_BELOW_FLOOR),
    "dp=false": ({"dp": False}, "run", Reason.DP_REQUIRED),
    # (With a target epsilon the device calibrates its own noise and ignores noise-multiplier.)
    "noise-multiplier=0": ({"noise-multiplier": 0.0, "target-epsilon": 0.0}, "run", Reason.NOISE_BELOW_FLOOR),
    "max-grad-norm=100": ({"max-grad-norm": 100.0}, "run", Reason.CLIP_ABOVE_CEILING),
    "delta=0.1": ({"delta": 0.1}, "run", Reason.DELTA_ABOVE_CEILING),
    "secagg=false to a device that requires it": ({"secagg": False}, "run", Reason.SECAGG_REQUIRED),
    "store-dir in the run config": ({"store-dir": "/tmp/elsewhere"}, "run", Reason.DEVICE_PATH_FROM_SERVER),
    "wire-audit-dir in the run config": ({"wire-audit-dir": "/tmp/wire"}, "run", Reason.DEVICE_PATH_FROM_SERVER),
    "wire-audit-dir in the message": ({"wire-audit-dir": "/tmp/wire"}, "message", Reason.DEVICE_PATH_FROM_SERVER),
    "store-path in the message": ({"store-path": "/tmp/x.sqlite"}, "message", Reason.DEVICE_PATH_FROM_SERVER),
    "key-file in the run config": ({"key-file": "/tmp/x.key"}, "run", Reason.DEVICE_PATH_FROM_SERVER),
    "dp=false in the message": ({"dp": False}, "message", Reason.CONFIG_KEY_NOT_ALLOWED),
    "scrub-mode=off in the message": ({"scrub-mode": "off"}, "message", Reason.CONFIG_KEY_NOT_ALLOWED),
    "an unknown run-config key": ({"unknown-key": 1}, "run", Reason.CONFIG_INVALID),
}


def _device(tmp_path, tiny_data, **policy):
    cfg = quick(secagg=False, scrub_mode="full")
    floor = {"min_scrub_mode": "full", "require_secagg": True, "max_rounds": 1, "min_noise_multiplier": 1.0, **policy}
    ctx = device_context(tmp_path, 7, user_files(tiny_data)[0], cfg, **floor)
    return cfg, ctx


@pytest.mark.parametrize("case", sorted(MATRIX))
@pytest.mark.parametrize("kind", ["train", "evaluate"])
def test_a_request_to_loosen_the_floor_is_refused_and_changes_nothing(case, kind, tmp_path, tiny_data, task_identity):
    asked, where, reason = MATRIX[case]
    cfg, ctx = _device(tmp_path, tiny_data)
    run = cfg.flat() | {"secagg": True}
    folder = tmp_path / "device-7"
    if where == "run":
        ctx.run_config.clear()
        ctx.run_config.update({**run, **asked})
        msg = server_message(cfg, kind)
    else:
        ctx.run_config.update(run)
        msg = server_message(cfg, kind, config=asked)
    before = _state(folder)
    reply = app(msg, ctx)
    assert _reason(reply) == reason
    assert _state(folder) == before  # nothing read into, or written to, the store
    assert before is None  # first contact: not even ingested


def test_a_round_past_the_participation_budget_is_refused_with_state_unchanged(tmp_path, tiny_data, task_identity):
    cfg, ctx = _device(tmp_path, tiny_data, require_secagg=False)
    first = app(server_message(cfg, "train", 1), ctx)
    assert "arrays" in first.content.keys()
    before = _state(tmp_path / "device-7")
    second = app(server_message(cfg, "train", 2), ctx)
    assert _reason(second) == Reason.PARTICIPATION_BUDGET_SPENT
    assert _state(tmp_path / "device-7") == before


# noise as given (the round would pass the cap); calibrated under RDP, whose conversion to (epsilon, delta)
# reaches no epsilon as small as 0.1 at any noise over Opacus' orders
@pytest.mark.parametrize("target, accountant", [(0.0, "prv"), (8.0, "rdp")])
def test_past_its_record_level_epsilon_cap_the_device_declines_to_train(target, accountant, tmp_path, tiny_data, task_identity):
    cfg, ctx = _device(tmp_path, tiny_data, require_secagg=False, max_rounds=0, max_epsilon=0.1)
    ctx.run_config.update({"target-epsilon": target, "accountant": accountant})
    reply = app(server_message(cfg, "train", 1), ctx)
    assert _reason(reply) == Reason.RECORD_BUDGET_SPENT


def test_under_a_cap_it_can_reach_the_device_calibrates_down_to_it(tmp_path, tiny_data, task_identity):
    """PRV reaches epsilon 0.1 with enough noise: the device trains, and ends at its cap, not above."""
    from client import device
    from client.accounting import epsilon_from_history

    cfg, ctx = _device(tmp_path, tiny_data, require_secagg=False, max_rounds=0, max_epsilon=0.1)
    ctx.run_config.update({"target-epsilon": 8.0, "accountant": "prv", "num-server-rounds": 1})
    reply = app(server_message(cfg, "train", 1), ctx)
    assert "arrays" in reply.content.keys()
    state = device.DeviceStore(tmp_path / "device-7" / "store.sqlite").get_state(device.ACCOUNTANT).decode()
    assert 0.09 <= epsilon_from_history(state, 1e-5) <= 0.1


def test_a_plain_round_in_a_secure_run_is_refused(tmp_path, tiny_data, task_identity):
    cfg, ctx = _device(tmp_path, tiny_data)
    ctx.run_config.update({"secagg": True})
    assert _reason(app(server_message(cfg, "train"), ctx)) == Reason.SECAGG_REQUIRED


def test_the_server_may_tighten_the_floor(tmp_path, tiny_data, task_identity):
    """More noise, a smaller clip, a lower epsilon cap, a stricter scrub mode: all accepted and used."""
    from client import device

    cfg = quick(secagg=False, scrub_mode="patterns", target_epsilon=0.0)  # noise as given (a target would calibrate it)
    ctx = device_context(tmp_path, 8, user_files(tiny_data)[1], cfg)
    ctx.run_config.update({"scrub-mode": "full", "noise-multiplier": 2.0, "max-grad-norm": 0.5, "max-epsilon": 5.0})
    msg = server_message(cfg, "train")
    admitted = device.admit(msg, ctx).cfg
    assert (admitted.scrub.mode, admitted.train.noise_multiplier, admitted.train.max_grad_norm) == ("full", 2.0, 0.5)
    assert admitted.train.max_epsilon == 5.0  # below the device's own cap (8), so the request stands
    reply = app(msg, ctx)
    assert "arrays" in reply.content.keys()
    history = json.loads(device.DeviceStore(tmp_path / "device-8" / "store.sqlite").get_state(device.ACCOUNTANT))["history"]
    assert history[-1][0] == 2.0  # trained with the requested, stricter noise (after the context phrases' release)


def test_policy_files_are_validated_and_name_the_key(tmp_path):
    bad = tmp_path / "p.json"
    bad.write_text(json.dumps({"min-scrub-mode": "off"}))
    with pytest.raises(PolicyError, match="audit-control-arm"):
        DevicePolicy.from_file(bad)
    bad.write_text(json.dumps({"max-clip-norm": "Jane Doe"}))
    with pytest.raises(PolicyError, match="max-clip-norm") as err:
        DevicePolicy.from_file(bad)
    assert "Jane" not in str(err.value)
    toml = tmp_path / "p.toml"
    toml.write_text('user-file = "me.jsonl"\nkey-file = "keys/me.key"\nrequire-secagg = true\nmax-rounds = 5\n')
    policy = DevicePolicy.from_file(toml)
    assert policy.user_file == str(tmp_path / "me.jsonl") and policy.require_secagg and policy.max_rounds == 5
    assert policy.key_file == str(tmp_path / "keys" / "me.key") and DevicePolicy().key_file == ""
    # node_config keys sit on top of the file.
    node = DevicePolicy.for_node({"policy-file": str(toml), "max-rounds": 2})
    assert node.max_rounds == 2 and node.require_secagg


def test_without_a_policy_the_shipping_floor_applies():
    p = DevicePolicy()
    assert (p.min_scrub_mode, p.dp_required, p.min_noise_multiplier, p.max_clip_norm, p.max_epsilon) == ("full", True, 1.0, 1.0, 8.0)
    with pytest.raises(PolicyError):
        DevicePolicy(min_scrub_mode="off")
