"""The K-slot codec, the server's slot arithmetic, and the privacy pipeline's steps and order."""

from __future__ import annotations

import math

import numpy as np
import pytest
from helpers import quick

from common.kslot import CENTROID_KEY, COUNT_KEY, PROFILE_DIM, KSlotCodec, part_norms
from common.privacy import DeviceUpdate, Pipeline, Reply, ServerAggregate, ServerRound, build_pipeline
from common.privacy.clip import Clip
from common.privacy.guard import Guard
from common.privacy.noise import GaussianNoise
from common.privacy.sums import PlainSum
from common.wire import train_reply_schema
from server.aggregate import apply_sum

SHAPES = {"global/a.lora_B": (2, 2), "persona/a.lora_B": (2, 2)}


def test_server_layout_is_global_then_slots_then_centroids():
    codec = KSlotCodec(SHAPES, 2)
    assert list(codec.server_shapes) == ["global/a.lora_B", "persona0/a.lora_B", "persona1/a.lora_B", CENTROID_KEY]
    assert list(codec.update_shapes)[-1] == COUNT_KEY and codec.length == 4 * 3 + 2 * PROFILE_DIM + 2
    state = codec.initial_state({k: np.zeros(s) for k, s in SHAPES.items()}, 1e-3, seed=0)
    # Distinct seeded starts, so IFCA's losses differ from round 1 on; no centroid yet.
    assert not np.array_equal(state["persona0/a.lora_B"], state["persona1/a.lora_B"])
    assert np.array_equal(state["global/a.lora_B"], np.zeros((2, 2))) and not state[CENTROID_KEY].any()
    with pytest.raises(ValueError, match="no persona adapter"):
        KSlotCodec({"global/a.lora_B": (2, 2)}, 2)
    assert list(KSlotCodec(SHAPES, 0).update_shapes) == ["global/a.lora_B"]


def test_encode_shows_nothing_but_the_chosen_slot_and_round_trips():
    codec = KSlotCodec(SHAPES, 2)
    sent = {"global/a.lora_B": np.zeros((2, 2)), "persona0/a.lora_B": np.zeros((2, 2)), "persona1/a.lora_B": np.ones((2, 2)), CENTROID_KEY: np.zeros((2, PROFILE_DIM))}
    trained = {"global/a.lora_B": np.full((2, 2), 0.1), "persona/a.lora_B": np.full((2, 2), 1.5)}
    profile = np.zeros(PROFILE_DIM)
    profile[0] = 3.0
    vec = codec.encode(sent, trained, chosen=1, profile=profile)
    parts = codec.unflatten(vec)
    assert np.allclose(parts["persona0/a.lora_B"], 0) and np.allclose(parts["persona1/a.lora_B"], 0.5)
    assert parts[COUNT_KEY].tolist() == [0.0, 1.0]
    assert not parts[CENTROID_KEY][0].any() and parts[CENTROID_KEY][1][0] == 1.0  # unit norm, own row
    assert np.array_equal(codec.flatten(parts), vec.astype(np.float32))
    out = codec.encode(sent, trained, chosen=None, profile=profile)  # out of the persona tier
    assert not codec.unflatten(out)[COUNT_KEY].any() and not codec.unflatten(out)["persona1/a.lora_B"].any()


def test_slot_arithmetic_and_fold():
    codec = KSlotCodec({"global/w": (2,), "persona/w": (2,)}, 2)
    arrays = {"global/w": np.zeros(2), "persona0/w": np.zeros(2), "persona1/w": np.ones(2), CENTROID_KEY: np.zeros((2, PROFILE_DIM))}
    parts = {"global/w": np.array([4.0, 8.0]), "persona0/w": np.array([3.0, 6.0]), "persona1/w": np.array([0.5, 0.5]), CENTROID_KEY: np.zeros((2, PROFILE_DIM)), COUNT_KEY: np.array([3.0, 1.0])}
    new, info = apply_sum(arrays, codec, codec.flatten(parts), expected=4, min_size=2, exact_counts=True)
    assert info.counts == [3.0, 1.0] and info.folded == [1]
    assert np.allclose(new["persona0/w"], [1.0, 2.0])  # slot sum / its count
    assert np.allclose(new["persona1/w"], [1.0, 1.0])  # below the minimum: unchanged...
    assert np.allclose(new["global/w"], [(4 + 0.5) / 4, (8 + 0.5) / 4])  # ...its sum folded into global
    with pytest.raises(ValueError, match="layout"):
        apply_sum(arrays, codec, codec.flatten(parts)[:-1], 4, 2, True)
    # The server's learning rate scales every move of a shared tier; the centroids stay means.
    parts[CENTROID_KEY][0, 0] = 3.0
    fast, _ = apply_sum(arrays, codec, codec.flatten(parts), expected=4, min_size=2, exact_counts=True, server_lr=2.5)
    assert np.allclose(fast["persona0/w"], [2.5, 5.0])
    assert np.allclose(fast["persona1/w"], [1.0, 1.0])
    assert np.allclose(fast["global/w"], [2.5 * 4.5 / 4, 2.5 * 8.5 / 4])
    assert fast[CENTROID_KEY][0, 0] == 1.0


def test_centroids_are_the_mean_profile_of_each_slot():
    codec = KSlotCodec({"global/w": (1,), "persona/w": (1,)}, 2)
    arrays = {"global/w": np.zeros(1), "persona0/w": np.zeros(1), "persona1/w": np.zeros(1), CENTROID_KEY: np.ones((2, PROFILE_DIM))}
    rows = np.zeros((2, PROFILE_DIM))
    rows[0, :2] = [1.0, 1.0]  # two devices chose slot 0, profiles e0 and e1; nobody chose slot 1
    parts = {"global/w": np.zeros(1), "persona0/w": np.zeros(1), "persona1/w": np.zeros(1), CENTROID_KEY: rows, COUNT_KEY: np.array([2.0, 0.0])}
    new, _ = apply_sum(arrays, codec, codec.flatten(parts), expected=2, min_size=1, exact_counts=True)
    assert np.allclose(new[CENTROID_KEY][0, :2], [0.5, 0.5]) and np.allclose(new[CENTROID_KEY][1], 1.0)
    assert np.allclose(new["global/w"], 0.0)  # the centroid block is not a model update


def test_clip_bounds_each_part_and_the_server_reads_counts_back():
    codec = KSlotCodec(SHAPES, 2)
    clip = Clip(0.1, codec)
    vec = codec.encode({"global/a.lora_B": np.zeros((2, 2)), "persona0/a.lora_B": np.zeros((2, 2)), "persona1/a.lora_B": np.zeros((2, 2))},
                       {"global/a.lora_B": np.full((2, 2), 3.0), "persona/a.lora_B": np.full((2, 2), 3.0)}, 0, np.ones(PROFILE_DIM))
    update = DeviceUpdate(codec, vec)
    metrics = clip.device(update)
    norms = part_norms(codec, update.vector)
    share = 0.1 / math.sqrt(3)
    assert metrics["clipped"] == 1.0 and metrics["model-norm"] > share
    assert all(n == pytest.approx(share) for n in norms.values())
    assert clip.check_reply(update.vector) and not clip.check_reply(vec * 0 + 1.0)
    agg = ServerAggregate(codec, [], expected=1, total=update.vector.copy(), contributors=1)
    clip.server(agg, ServerRound(1, [1]))
    assert codec.decode(agg.total).counts.tolist() == pytest.approx([1.0, 0.0])  # the count read back


def test_distributed_noise_shares_add_up_to_the_target_std():
    codec = KSlotCodec({"global/w": (200_000,)}, 0)
    noise = GaussianNoise(2.0, 1.0, "distributed")
    total = np.zeros(codec.length)
    for _ in range(8):
        update = DeviceUpdate(codec, np.zeros(codec.length), min_contributors=8)
        noise.device(update)
        total += update.vector
    assert total.std() == pytest.approx(2.0, rel=0.02)
    server = GaussianNoise(2.0, 1.0, "server")
    assert server.device(DeviceUpdate(codec, np.zeros(codec.length))) == {}  # the device adds none


def test_server_noise_is_added_once_and_reports_signal_to_noise():
    codec = KSlotCodec({"global/w": (100_000,)}, 0)
    noise = GaussianNoise(1.0, 0.5, "server")
    agg = ServerAggregate(codec, [], expected=1, total=np.zeros(codec.length), contributors=1)
    metrics = noise.server(agg, ServerRound(1, [1]))
    assert agg.total.std() == pytest.approx(0.5, rel=0.02) and metrics["noise-std"] == 0.5 and metrics["snr"] < 0.15  # pure noise: |excess| ~ (2d)^(1/4) / sqrt(d) = 0.07 per sd
    loud = ServerAggregate(codec, [], expected=1, total=np.full(codec.length, 5.0), contributors=1)
    assert noise.server(loud, ServerRound(1, [1]))["snr"] > 5


def test_the_pipeline_checks_its_own_order():
    codec = KSlotCodec(SHAPES, 0)
    guard = Guard(train_reply_schema(codec.update_shapes))
    with pytest.raises(ValueError, match="out of order"):
        Pipeline([GaussianNoise(1.0, 1.0, "server"), Clip(1.0, codec), PlainSum(codec), guard])
    with pytest.raises(ValueError, match="guard"):
        Pipeline([Clip(1.0, codec), PlainSum(codec)])
    with pytest.raises(ValueError, match="summation"):
        Pipeline([Clip(1.0, codec), guard])
    assert Pipeline([Clip(1.0, codec), PlainSum(codec), guard]).names() == ["clip", "plain-sum", "guard"]


@pytest.mark.parametrize(
    "flat,names",
    [
        ({"secagg": False}, ["plain-sum", "guard"]),
        ({}, ["secure-sum", "guard"]),  # secure aggregation is the default
        ({"user-dp": True, "secagg": False}, ["clip", "noise", "accounting", "plain-sum", "guard"]),
        ({"user-dp": True, "secagg": True, "persona-slots": 0}, ["clip", "noise", "accounting", "secure-sum", "guard"]),
    ],
)
def test_one_builder_for_every_configuration(flat, names):
    from helpers import codec_for

    cfg = quick(**{k.replace("-", "_"): v for k, v in flat.items()})
    pipeline = build_pipeline(cfg, codec_for(cfg))
    assert pipeline.names() == names
    noise = pipeline.step("noise")
    if noise is not None:
        assert noise.placement == cfg.noise_placement


def test_a_plain_round_rejects_a_reply_over_the_clip_bound():
    from flwr.app import Array, ArrayRecord, RecordDict

    codec = KSlotCodec({"global/w": (4,)}, 0)
    pipeline = Pipeline([Clip(1.0, codec), PlainSum(codec), Guard(train_reply_schema(codec.update_shapes))])
    ok = RecordDict({"arrays": ArrayRecord({"global/w": Array(np.full(4, 0.25, np.float32))})})
    big = RecordDict({"arrays": ArrayRecord({"global/w": Array(np.full(4, 5.0, np.float32))})})
    bad = RecordDict({"arrays": ArrayRecord({"global/x": Array(np.zeros(4, np.float32))})})
    agg = ServerAggregate(codec, [Reply(1, ok), Reply(2, big), Reply(3, bad)], expected=3)
    metrics = pipeline.run_server(agg, ServerRound(1, [1, 2, 3]))
    assert agg.contributors == 1 and agg.rejected == 2 and np.allclose(agg.total, 0.25)
    assert list(metrics) == ["guard", "plain-sum", "clip"]  # the server runs the steps in reverse


def test_the_server_sums_replies_as_they_arrive_and_never_holds_them_all():
    import gc
    import weakref

    from flwr.app import Array, ArrayRecord, RecordDict

    codec = KSlotCodec({"global/w": (4,)}, 0)
    pipeline = Pipeline([Clip(1.0, codec), PlainSum(codec), Guard(train_reply_schema(codec.update_shapes))])
    alive, most_alive = [], 0

    def arriving():
        nonlocal most_alive
        for i in range(50):
            gc.collect()
            most_alive = max(most_alive, sum(r() is not None for r in alive))
            reply = Reply(i, RecordDict({"arrays": ArrayRecord({"global/w": Array(np.full(4, 0.01, np.float32))})}))
            alive.append(weakref.ref(reply))
            yield reply

    agg = ServerAggregate(codec, arriving(), expected=50)
    pipeline.run_server(agg, ServerRound(1, list(range(50))))
    assert agg.contributors == 50 and np.allclose(agg.total, 0.5)
    assert most_alive <= 1  # the reply being added, at most: never the round's replies


def test_stream_replies_yields_each_reply_when_pulled_and_stops_at_the_timeout():
    from server.strategy import stream_replies

    class Grid:
        pull_interval = 0.01

        def __init__(self, never):
            self.never, self.pulls = never, 0

        def push_messages(self, messages):
            return [f"m{i}" for i, _ in enumerate(messages)]

        def pull_messages(self, ids):
            self.pulls += 1
            ready = sorted(i for i in ids if i not in self.never)[:1]  # one reply arrives per pull

            class Reply:
                class metadata:
                    reply_to_message_id = ready[0] if ready else None

            return [Reply()] if ready else []

    grid = Grid(never=set())
    assert len(list(stream_replies(grid, range(5), timeout=10))) == 5 and grid.pulls == 5
    late = Grid(never={"m2"})
    assert len(list(stream_replies(late, range(3), timeout=0.2))) == 2  # m2 never replies: the timeout ends the wait


def test_the_server_stops_waiting_once_the_engine_has_stopped():
    """A dead simulation engine sends no more replies: the server's waits end instead of running out the timeout."""
    from server import strategy

    class Silent:
        pull_interval = 0.01

        def get_node_ids(self):
            return [1]  # one of the two nodes the server waits for

        def push_messages(self, messages):
            return ["m0"]

        def pull_messages(self, ids):
            return []

    strategy.ENGINE_STOPPED.set()
    try:
        with pytest.raises(strategy.EngineStopped):
            list(strategy.stream_replies(Silent(), [object()], timeout=3600))
        with pytest.raises(strategy.EngineStopped):
            strategy.collect_replies(Silent(), [object()], timeout=None)
        with pytest.raises(strategy.EngineStopped):
            strategy.wait_for_nodes(Silent(), 2)
    finally:
        strategy.ENGINE_STOPPED.clear()
