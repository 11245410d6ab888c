"""Quantile-based adaptive clipping of the user-level C (Andrew et al. 2021), through the privacy pipeline.

The clip bit is one more coordinate of the update that is clipped and noised:
the tests check that the whole release stays one Gaussian mechanism at the
accounted z, that C moves toward the target quantile from the sum alone, that a
device caps what the server sends, and that a real secure round carries the
next round's C in its messages and leaves user-level epsilon unchanged.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import ConfigRecord
from helpers import LoopbackGrid, codec_for, device_context, initial_arrays, quick, server_message, strategy_for, user_files

from client.app import app
from common.config import ConfigError
from common.kslot import CLIP_BIT_KEY, PROFILE_DIM, KSlotCodec
from common.privacy import DeviceUpdate, ServerAggregate, ServerRound, build_pipeline
from common.privacy.clip import Clip
from common.privacy.noise import GaussianNoise
from common.wire import ARRAYS, REFUSAL, Reason

SHAPES = {"global/w": (6,), "persona/w": (3,)}


def _codec(slots=2):
    return KSlotCodec(SHAPES, slots, clip_bit=True)


def _update(codec, model_norm, chosen=0):
    """A raw K-slot update whose model change has the given norm (plus a profile row and a count)."""
    return codec.encode({"global/w": np.zeros(6), "persona0/w": np.zeros(3), "persona1/w": np.zeros(3)},
                        {"global/w": np.full(6, model_norm / math.sqrt(9)), "persona/w": np.full(3, model_norm / math.sqrt(9))},
                        chosen, np.ones(PROFILE_DIM))


def test_the_clip_bit_is_in_the_update_and_never_in_the_servers_tensors():
    codec, plain = _codec(), KSlotCodec(SHAPES, 2)
    assert codec.length == plain.length + 1 and list(codec.update_shapes)[-1] == CLIP_BIT_KEY
    assert codec.update_shapes[CLIP_BIT_KEY] == (1,) and CLIP_BIT_KEY not in codec.server_shapes
    assert codec.server_shapes == plain.server_shapes
    assert CLIP_BIT_KEY not in codec.unflatten(np.ones(codec.length), server_only=True)
    assert codec.decode(np.ones(codec.length)).counts.tolist() == [1.0, 1.0]


@pytest.mark.parametrize("model_norm,bit", [(0.3, 0.5), (5.0, -0.5)])
def test_a_device_writes_its_centred_bit_and_stays_within_the_sensitivity(model_norm, bit):
    codec = _codec()
    clip = Clip(1.0, codec, quantile=0.5, lr=0.2, share=0.1)
    update = DeviceUpdate(codec, _update(codec, model_norm), clip_norm=1.0)
    metrics = clip.device(update)
    s = clip.sensitivity(1.0)
    assert s == pytest.approx(1.0 / math.sqrt(0.9)) and update.sensitivity == s
    assert update.vector[codec.offsets[CLIP_BIT_KEY]][0] == pytest.approx(bit * 2 * math.sqrt(0.1) * s)
    assert np.linalg.norm(update.vector) <= s * (1 + 1e-9)
    # The three parts keep their C/sqrt(3) bounds; the bit holds the rest of S^2.
    rest = np.delete(update.vector, codec.offsets[CLIP_BIT_KEY])
    assert np.linalg.norm(rest) <= 1.0 + 1e-9
    assert metrics["clipped"] == float(bit < 0) and metrics["clip-norm"] == 1.0


def test_a_device_not_drawn_sends_a_zero_bit():
    codec = _codec()
    update = DeviceUpdate(codec, np.zeros(codec.length), clip_norm=1.0, trained=False)
    Clip(1.0, codec, quantile=0.5).device(update)
    assert not update.vector.any()


def test_a_device_caps_the_servers_c_at_its_ceiling():
    codec = _codec()
    clip = Clip(1.0, codec, quantile=0.5)
    update = DeviceUpdate(codec, _update(codec, 50.0), clip_norm=40.0)
    assert clip.device(update)["clip-norm"] == 1.0
    assert np.linalg.norm(update.vector) <= clip.sensitivity(1.0) * (1 + 1e-9)


@pytest.mark.parametrize("z,share", [(0.5, 0.1), (1.0, 0.1), (2.0, 0.3), (1.3, 0.05)])
def test_bit_and_update_are_one_gaussian_mechanism_at_the_accounted_z(z, share):
    """z_Δ⁻² + (2σ_b)⁻² = z⁻² (Andrew et al., Theorem 1), read off the pipeline's own steps."""
    cfg = quick(user_dp=True, user_noise_multiplier=z, user_adaptive_clip_quantile=0.5, user_adaptive_clip_share=share, secagg=False)
    codec = KSlotCodec({"global/w": (4,)}, 0, clip_bit=cfg.user_dp.adaptive)
    pipeline = build_pipeline(cfg, codec)
    clip, noise = pipeline.step("clip"), pipeline.step("noise")
    c = 0.7
    std = noise.std_at(clip.sensitivity(c))
    z_update = std / c  # the noise on the model change, in units of its bound C
    sigma_bit = std / clip.bit_scale(c)  # the noise on the count of unclipped devices
    assert z_update ** -2 + (2 * sigma_bit) ** -2 == pytest.approx(z ** -2)
    assert pipeline.step("accounting").noise_multiplier == z


def _bits_total(clip, codec, norms, c):
    """The (noiseless) sum of the devices' updates at clip norm C."""
    total = np.zeros(codec.length)
    for n in norms:
        update = DeviceUpdate(codec, _update(codec, n), clip_norm=c)
        clip.device(update)
        total += update.vector
    return total


def test_the_server_moves_c_geometrically_from_the_bits_alone():
    codec = _codec()
    clip = Clip(1.0, codec, quantile=0.5, lr=0.2)
    rnd = ServerRound(1, list(range(4)))
    clip.setup(rnd)
    agg = ServerAggregate(codec, [], expected=4, total=_bits_total(clip, codec, [0.1, 0.2, 0.3, 0.4], 1.0), contributors=4)
    metrics = clip.server(agg, rnd)
    assert metrics["unclipped-share"] == pytest.approx(1.0)
    assert clip.current == pytest.approx(math.exp(-0.2 * 0.5)) == metrics["next-clip-norm"]
    # Every device clipped: C would rise, but never above the ceiling.
    clip.current = 1.0
    clip.setup(rnd := ServerRound(2, list(range(4))))
    clip.server(ServerAggregate(codec, [], expected=4, total=_bits_total(clip, codec, [3.0] * 4, 1.0), contributors=4), rnd)
    assert clip.current == 1.0


def test_c_settles_at_the_target_quantile_of_the_update_norms():
    codec = _codec()
    norms = np.linspace(0.05, 1.0, 20) / math.sqrt(3)  # model-part norms; the part bound is C/sqrt(3)
    for quantile in (0.5, 0.8):
        clip = Clip(1.0, codec, quantile=quantile, lr=0.2)
        for r in range(200):
            rnd = ServerRound(r, list(range(20)))
            clip.setup(rnd)
            clip.server(ServerAggregate(codec, [], expected=20, total=_bits_total(clip, codec, norms, clip.current), contributors=20), rnd)
        share_within = float(np.mean(norms <= clip.part_bound(clip.current)))
        assert share_within == pytest.approx(quantile, abs=0.1)


def test_the_servers_message_carries_c_only_when_adaptive():
    codec = _codec()
    clip = Clip(1.0, codec, quantile=0.5)
    clip.current = 0.6
    rnd = ServerRound(1, [7, 8])
    assert clip.setup(rnd) == {7: {"config": {"user-clip-norm": 0.6}}, 8: {"config": {"user-clip-norm": 0.6}}}
    assert Clip(1.0, KSlotCodec(SHAPES, 2)).setup(ServerRound(1, [7])) == {}
    with pytest.raises(ValueError):
        Clip(1.0, KSlotCodec(SHAPES, 2), quantile=0.5)  # an adaptive clip needs the bit in the layout


def test_the_noise_and_the_reply_check_follow_the_rounds_c():
    codec = _codec(0)
    clip = Clip(1.0, codec, quantile=0.5)
    noise = GaussianNoise(2.0, clip.max_sensitivity, "distributed")
    update = DeviceUpdate(codec, np.zeros(codec.length), min_contributors=4, clip_norm=0.25)
    clip.device(update)
    assert noise.device(update)["noise-share-std"] == pytest.approx(2.0 * clip.sensitivity(0.25) / 2)
    clip.current = 0.25
    rnd = ServerRound(1, [1])
    clip.setup(rnd)
    rnd.state["min_contributors"] = 4
    agg = ServerAggregate(codec, [], expected=1, total=np.zeros(codec.length), contributors=4)
    assert noise.server(agg, rnd)["noise-std"] == pytest.approx(2.0 * clip.sensitivity(0.25))
    assert clip.check_reply(np.full(codec.length, 0.2 / math.sqrt(codec.length)))
    assert not clip.check_reply(np.full(codec.length, 0.5 / math.sqrt(codec.length)))


@pytest.mark.parametrize("flat,key", [
    ({"user-adaptive-clip-quantile": 0.5}, "user-adaptive-clip-quantile"),  # needs user-dp
    ({"user-dp": True, "user-adaptive-clip-quantile": 1.0}, "user-adaptive-clip-quantile"),
    ({"user-dp": True, "user-adaptive-clip-lr": 0.0}, "user-adaptive-clip-lr"),
    ({"user-dp": True, "user-adaptive-clip-share": 1.0}, "user-adaptive-clip-share"),
])
def test_bad_settings_name_their_key(flat, key):
    with pytest.raises(ConfigError) as err:
        quick(**{k.replace("-", "_"): v for k, v in flat.items()})
    assert err.value.key == key


# -- through the real ClientApp -------------------------------------------------------


def _reason(reply):
    return Reason(reply.content[REFUSAL]["reason"]) if REFUSAL in reply.content.keys() else None


@pytest.mark.parametrize("adaptive,config,reason", [
    (False, {"user-clip-norm": 0.5}, Reason.CONFIG_KEY_NOT_ALLOWED),  # a fixed-C run takes no C from the server
    (True, {}, Reason.PROTOCOL_ERROR),  # an adaptive run's train message must carry it
    (True, {"user-clip-norm": -1.0}, Reason.CONFIG_INVALID),
    (True, {"user-clip-norm": math.inf}, Reason.CONFIG_INVALID),
])
def test_the_device_refuses_a_missing_or_unasked_c(adaptive, config, reason, tmp_path, tiny_data, task_identity):
    cfg = quick(secagg=False, user_dp=True, user_adaptive_clip_quantile=0.5 if adaptive else 0.0)
    ctx = device_context(tmp_path, 7, user_files(tiny_data)[0], cfg)
    assert _reason(app(server_message(cfg, "train", config=config), ctx)) == reason


def test_a_c_above_the_ceiling_is_used_at_the_ceiling(tmp_path, tiny_data, task_identity):
    cfg = quick(secagg=False, user_dp=True, user_clip_norm=0.01, user_adaptive_clip_quantile=0.5)
    ctx = device_context(tmp_path, 7, user_files(tiny_data)[0], cfg)
    reply = app(server_message(cfg, "train", config={"user-clip-norm": 100.0}), ctx)
    assert _reason(reply) is None
    vector = codec_for(cfg).flatten(reply.content[ARRAYS])
    assert np.linalg.norm(vector) <= 0.01 / math.sqrt(0.9) * (1 + 1e-4)
    # The training moved the model well past 0.01, so its bit says "clipped".
    assert vector[codec_for(cfg).offsets[CLIP_BIT_KEY]][0] == pytest.approx(-math.sqrt(0.1) * 0.01 / math.sqrt(0.9), rel=1e-5)


def test_a_secure_round_carries_the_next_c_and_leaves_epsilon_unchanged(tmp_path, tiny_data, task_identity):
    """Two secure rounds with device-added noise: round 2's messages carry the C round 1's bits chose."""
    flat = dict(secagg=True, dp=False, user_dp=True, user_noise_multiplier=0.5, user_clip_norm=5.0, num_supernodes=3)
    cfg = quick(**flat, user_adaptive_clip_quantile=0.5)
    users = user_files(tiny_data)
    contexts = {100 + i: device_context(tmp_path, 100 + i, users[i], cfg) for i in range(3)}
    strategy = strategy_for(cfg, num_rounds=2)
    grid = LoopbackGrid(app, contexts)
    arrays = initial_arrays(cfg)
    sent = []
    for r in (1, 2):
        messages = strategy.configure_train(r, arrays, ConfigRecord(), grid)
        sent.append({dict(m.content["config"])["user-clip-norm"] for m in messages})
        new, _ = strategy.aggregate_train(r, grid.send_and_receive(messages))
        arrays = new if new is not None else arrays
    assert sent[0] == {5.0}
    row = strategy.rounds[1]["steps"]["clip"]
    assert row["clip-norm"] == 5.0 and sent[1] == {row["next-clip-norm"]}
    assert strategy.rounds[1]["contributors"] == 3 and strategy.rounds[2]["contributors"] == 3
    # With noise 0.5 * 5.27 on the 3 bits, the noised share is not exact, but C moved by exp(-0.2 (share - 0.5)).
    assert row["next-clip-norm"] == pytest.approx(min(5.0, 5.0 * math.exp(-0.2 * (row["unclipped-share"] - 0.5))))
    assert strategy.rounds[2]["steps"]["noise"]["noise-std"] == pytest.approx(
        math.sqrt(3) * 0.5 * strategy.pipeline.step("clip").sensitivity(row["next-clip-norm"]) / math.sqrt(2))  # h = 2 honest of 3
    # The accountant charged z per round, exactly as a fixed-C run does.
    fixed = strategy_for(quick(**flat), num_rounds=2)
    for r in (1, 2):
        fixed.pipeline.step("accounting").server(ServerAggregate(codec_for(quick(**flat)), [], expected=3), ServerRound(r, []))
    assert strategy.pipeline.step("accounting").epsilon_per_round == fixed.pipeline.step("accounting").epsilon_per_round
    # A resumed server starts from the stored C.
    resumed = strategy_for(cfg, num_rounds=2)
    resumed.load_state_dict(strategy.state_dict())
    assert resumed.pipeline.step("clip").current == strategy.pipeline.step("clip").current


def test_the_signal_to_noise_estimate_leaves_the_bits_out():
    cfg = quick(user_dp=True, user_adaptive_clip_quantile=0.5, secagg=False)
    codec = KSlotCodec({"global/w": (10_000,)}, 0, clip_bit=True)
    pipeline = build_pipeline(cfg, codec)
    total = np.zeros(codec.length)
    total[codec.offsets[CLIP_BIT_KEY]] = -20 * 0.33  # 20 clipped devices' bits, and no model change
    rnd = ServerRound(1, [])
    pipeline.step("clip").setup(rnd)
    pipeline.step("noise").scale = 1e-9  # a nearly noiseless sum: the estimate is about the signal alone
    metrics = pipeline.step("noise").server(ServerAggregate(codec, [], expected=20, total=total, contributors=20), rnd)
    assert metrics["snr"] < 1  # with the bits counted it would be about 10^8


@pytest.mark.parametrize("placement", ["server", "distributed"])
def test_the_bits_survive_the_fixed_point_range_of_a_secure_sum(placement, tmp_path, tiny_data, task_identity, masked_updates):
    """A C far above ``secagg-clip-range`` (1): the range holds the bit, so the server reads the devices' true share."""
    masked = masked_updates
    cfg = quick(secagg=True, secagg_noise=placement, dp=False, user_dp=True, user_noise_multiplier=0.05, user_clip_norm=50.0,
                num_supernodes=3, user_adaptive_clip_quantile=0.5)
    users = user_files(tiny_data)
    contexts = {100 + i: device_context(tmp_path, 100 + i, users[i], cfg) for i in range(3)}
    strategy = strategy_for(cfg)
    grid = LoopbackGrid(app, contexts)
    strategy.aggregate_train(1, grid.send_and_receive(strategy.configure_train(1, initial_arrays(cfg), ConfigRecord(), grid)))
    clip = strategy.pipeline.step("clip")
    bit = codec_for(cfg).offsets[CLIP_BIT_KEY]
    # What the devices wrote, before masking (their own noise shares included, under distributed noise).
    truth = sum(v[bit][0] for v in masked.values()) / clip.bit_scale(50.0) / 3 + 0.5
    read = strategy.rounds[1]["steps"]["clip"]["unclipped-share"]
    assert read == pytest.approx(truth, abs=0.2 if placement == "server" else 1e-3)
    assert truth > 0.7  # the tiny model's updates are well within 50/sqrt(3): the bits say so
