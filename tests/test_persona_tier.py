"""The persona tier: IFCA choice on the device, K-slot arithmetic on the server, routing by volume."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from client.persona import add_noise_share, choose_persona, slot_update, split_slots
from common.models import AdapterSpec, personal_model
from common.tiers import COLD_START, FREQUENT, OCCASIONAL, routing_group, server_state, wire_shapes
from common.wire import flatten
from server.slot_strategy import apply_update_sum


def _arrays(d: dict) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v, dtype=np.float32)) for k, v in d.items()})


def test_server_layout_is_global_then_slots():
    shapes = {"global/a.lora_B": (2, 2), "persona/a.lora_B": (2, 2)}
    assert list(wire_shapes(shapes, 2)) == ["global/a.lora_B", "persona0/a.lora_B", "persona1/a.lora_B", "persona-centroids"]
    assert wire_shapes(shapes, 2)["persona-centroids"] == (2, 384)
    state = server_state({k: np.zeros(s) for k, s in shapes.items()}, 2, 1e-3, seed=0)
    # Distinct seeded starts, so IFCA's losses differ from round 1 on.
    assert not np.array_equal(state["persona0/a.lora_B"], state["persona1/a.lora_B"])
    assert np.array_equal(state["global/a.lora_B"], np.zeros((2, 2)))
    with pytest.raises(ValueError, match="no persona adapter"):
        wire_shapes({"global/a.lora_B": (2, 2)}, 2)


def test_slot_arithmetic_and_fold():
    arrays = _arrays({"global/w": np.zeros(2), "persona0/w": np.zeros(2), "persona1/w": np.ones(2)})
    # Three clients chose slot 0, one chose slot 1: sums [g | p0 | p1 | counts].
    total = np.array([4.0, 8.0, 3.0, 6.0, 0.5, 0.5, 3.0, 1.0])
    new, info = apply_update_sum(arrays, total, sampled=4, num_slots=2, min_size=2, clip_norm=None)
    got = {k: v.numpy() for k, v in new.items()}
    assert info.counts == [3.0, 1.0] and info.folded == [1]
    assert np.allclose(got["persona0/w"], [1.0, 2.0])  # slot sum / its count
    assert np.allclose(got["persona1/w"], [1.0, 1.0])  # below the minimum: unchanged...
    assert np.allclose(got["global/w"], [(4 + 0.5) / 4, (8 + 0.5) / 4])  # ...its sum folded into global
    with pytest.raises(ValueError, match="layout"):
        apply_update_sum(arrays, total[:-1], 4, 2, 2, None)


def test_noisy_counts_are_decoded_with_the_dp_count_scale():
    arrays = _arrays({"global/w": np.zeros(1), "persona0/w": np.zeros(1)})
    clip = 0.5
    scale = clip / math.sqrt(3)
    _, info = apply_update_sum(arrays, np.array([0.0, 0.0, 3.2 * scale]), 4, 1, 3, clip)
    assert info.counts == pytest.approx([3.2]) and info.folded == []


def test_centroids_are_the_mean_profile_of_each_slot():
    arrays = _arrays({"global/w": np.zeros(1), "persona0/w": np.zeros(1), "persona1/w": np.zeros(1), "persona-centroids": np.ones((2, 2))})
    # Two devices chose slot 0 (profiles [1,0] and [0,1]); nobody chose slot 1.
    total = np.array([0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 2.0, 0.0])
    new, info = apply_update_sum(arrays, total, sampled=2, num_slots=2, min_size=1, clip_norm=None)
    c = new["persona-centroids"].numpy()
    assert np.allclose(c[0], [0.5, 0.5]) and np.allclose(c[1], [1.0, 1.0])  # empty slot keeps its centroid
    assert np.allclose(new["global/w"].numpy(), 0.0)  # the centroid block is not a model update


def test_nearest_centroid_choice_and_round_one_tie_break():
    from client.persona import nearest_centroid

    slots = {k: {"persona-centroids": torch.tensor(c, dtype=torch.float32)} for k, c in enumerate([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])}
    assert nearest_centroid(np.array([0.1, 0.9]), slots, random.Random(0)) == 1
    assert nearest_centroid(np.array([0.9, 0.1]), slots, random.Random(0)) == 0  # slot 2 has no centroid yet
    empty = {k: {"persona-centroids": torch.zeros(2)} for k in range(3)}
    assert {nearest_centroid(np.array([1.0, 0.0]), empty, random.Random(s)) for s in range(30)} == {0, 1, 2}


def test_k_slot_update_hides_nothing_but_its_own_slot():
    sent = {"global/w": np.zeros(3, np.float32), "persona0/w": np.zeros(3, np.float32), "persona1/w": np.ones(3, np.float32)}
    trained = {"global/w": np.full(3, 0.1, np.float32), "persona/w": np.full(3, 1.5, np.float32)}
    upd = slot_update(sent, trained, chosen=1, num_slots=2, clip_norm=None)
    assert list(upd) == [*sent, "persona-count"]
    assert np.allclose(upd["persona0/w"], 0) and np.allclose(upd["persona1/w"], 0.5)
    assert upd["persona-count"].tolist() == [0.0, 1.0]
    clipped = slot_update(sent, trained, chosen=1, num_slots=2, clip_norm=0.1)
    vec = np.concatenate([v for k, v in clipped.items() if k != "persona-count"])
    assert np.linalg.norm(vec) == pytest.approx(0.1 / math.sqrt(3), rel=1e-5)
    assert np.linalg.norm(np.concatenate(list(clipped.values()))) <= 0.1 + 1e-6


def test_noise_share_variance_adds_up_to_the_target():
    rng = np.random.default_rng(0)
    zero = {"v": np.zeros(200_000, np.float32)}
    total = sum(add_noise_share(zero, 2.0, min_summands=8, rng=rng)["v"].astype(np.float64) for _ in range(8))
    assert total.std() == pytest.approx(2.0, rel=0.02)


def test_ifca_picks_the_slot_that_fits_the_device_data(tiny_data, tmp_path):
    from client.store import DeviceStore, ScrubOutcome
    from client.train import TrainConfig, encode_pairs, evaluate_nll, train_local

    model = personal_model(AdapterSpec(base_model="tiny-random"))
    model.reset_to_initial()
    store = DeviceStore(tmp_path / "ifca.sqlite")
    store.ingest_jsonl(sorted((tiny_data / "data" / "users").glob("*.jsonl"))[0], scrub=lambda texts: [ScrubOutcome(t, 0, None) for t in texts])
    data = encode_pairs(model.tokenizer, store.tasks("train"), 48)
    live = {k: v.detach().clone() for k, v in model.shared_state().items() if k.startswith("persona/")}
    # Slot 1 is a persona adapter fitted to this device's data (a few non-private
    # steps); slots 0 and 2 are untouched.
    train_local(model, data, TrainConfig(local_steps=8, lr=0.05, dp=False, batch_size=8), None, None)
    fitted = {k: v.detach().clone() for k, v in model.shared_state().items() if k.startswith("persona/")}
    slots = {0: live, 1: fitted, 2: live}
    k, losses = choose_persona(model, slots, data, 8, random.Random(0))
    assert k == 1 and len(losses) == 3 and losses[1] < min(losses[0], losses[2])
    # The loss it compared is the global + persona loss of that slot.
    model.load_trainable(slots[2])
    assert evaluate_nll(model, torch.utils.data.TensorDataset(*data[:8]), ("global", "persona"))[0] == pytest.approx(losses[2])
    # Identical slots: a uniform tie-break, driven only by the device's own RNG.
    same = {k: live for k in range(4)}
    picks = {choose_persona(model, same, data, 8, random.Random(seed))[0] for seed in range(40)}
    assert picks == {0, 1, 2, 3}
    model.reset_to_initial()


def test_split_slots_routes_server_keys():
    direct, slots = split_slots({"global/w": 1, "persona0/w": 2, "persona1/w": 3})
    assert direct == {"global/w": 1} and slots == {0: {"persona/w": 2}, 1: {"persona/w": 3}}


@pytest.mark.parametrize("n,group", [(0, COLD_START), (4, COLD_START), (5, OCCASIONAL), (19, OCCASIONAL), (20, FREQUENT), (400, FREQUENT)])
def test_routing_by_data_volume(n, group):
    assert routing_group(n, cold_start_below=5, frequent_from=20) == group


def test_cached_generation_matches_step_by_step_greedy_decoding():
    """The audits' KV-cached generator must produce what the plain model forward would."""
    from simulations.audit_view import STACKS, RunView

    model = personal_model(AdapterSpec(base_model="tiny-random"))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.trainable_state().values():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    view = RunView.__new__(RunView)  # only the model, not a run folder
    view.model, view.tokenizer, view.num_slots = model, model.tokenizer, 3
    tok = model.tokenizer
    try:
        for stack in STACKS:
            model.use(*STACKS[stack])
            ids = tok("Write a note.\n", add_special_tokens=False, return_tensors="pt")["input_ids"]
            expected = []
            with torch.no_grad():
                for _ in range(10):
                    nxt = int(model(ids, torch.ones_like(ids))[:, -1].argmax())
                    if nxt == tok.eos_token_id:
                        break
                    expected.append(nxt)
                    ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
            assert view.generate("Write a note.\n", stack, 10) == tok.decode(expected, skip_special_tokens=True)
    finally:
        model.reset_to_initial()
        model.use(*model.tiers)
