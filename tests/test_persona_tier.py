"""The persona tier on the device: the choice (k-means or IFCA), its private tie-break, routing by volume."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from helpers import quick, spec

from client.persona import choose_persona, nearest_centroid, tie_break_rng
from common.models import personal_model
from common.models import COLD_START, FREQUENT, OCCASIONAL, routing_group


def test_nearest_centroid_choice_and_round_one_tie_break():
    from client.persona import nearest_centroid

    centroids = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    assert nearest_centroid(np.array([0.1, 0.9]), centroids, 3, random.Random(0)) == 1
    assert nearest_centroid(np.array([0.9, 0.1]), centroids, 3, random.Random(0)) == 0  # slot 2 has no centroid yet
    assert {nearest_centroid(np.array([1.0, 0.0]), np.zeros((3, 2)), 3, random.Random(s)) for s in range(30)} == {0, 1, 2}


def test_the_tie_break_is_keyed_by_the_device_secret_not_its_path(tmp_path):
    """A server that knows a store's path cannot predict the round-1 choice; the device itself gets a stable one."""
    from client.store import DeviceStore

    a, b = DeviceStore(tmp_path / "a.sqlite"), DeviceStore(tmp_path / "b.sqlite")
    draws = lambda store, rnd: [tie_break_rng(store, rnd).random() for _ in range(3)]  # noqa: E731
    assert draws(a, 1) == draws(DeviceStore(tmp_path / "a.sqlite"), 1)  # stable per device and round
    assert draws(a, 1) != draws(b, 1) and draws(a, 1) != draws(a, 2)
    (tmp_path / "c").mkdir()
    same_path_elsewhere = DeviceStore(tmp_path / "c" / "a.sqlite")
    assert draws(same_path_elsewhere, 1) != draws(a, 1)


def test_ifca_picks_the_slot_that_fits_the_device_data(tiny_data, tmp_path):
    from client.store import DeviceStore, ScrubOutcome
    from client.train import encode_pairs, evaluate_nll, train_local

    model = personal_model(spec())
    model.reset_to_initial()
    store = DeviceStore(tmp_path / "ifca.sqlite")
    store.ingest_jsonl(sorted((tiny_data / "data" / "users").glob("*.jsonl"))[0], scrub=lambda texts: [ScrubOutcome(t, 0, None) for t in texts])
    data = encode_pairs(model.tokenizer, store.tasks("train"), 48)
    live = {k: v.detach().clone() for k, v in model.shared_state().items() if k.startswith("persona/")}
    # Slot 1 is a persona adapter fitted to this device's data (a few non-private
    # steps); slots 0 and 2 are untouched.
    train_local(model, data, quick(secagg=False, local_steps=8, lr=0.05, dp=False, batch_size=8).train, None, None)
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


@pytest.mark.parametrize("n,group", [(0, COLD_START), (4, COLD_START), (5, OCCASIONAL), (19, OCCASIONAL), (20, FREQUENT), (400, FREQUENT)])
def test_routing_by_data_volume(n, group):
    assert routing_group(n, cold_start_below=5, frequent_from=20) == group


@pytest.mark.parametrize("adapter_layers", [0, 1])
def test_cached_generation_matches_step_by_step_greedy_decoding(adapter_layers):
    """The audits' KV-cached generator must produce what the plain model forward would (with the soft
    prompt at the input, and as a deep prompt at the top layer)."""
    from simulations.audits.view import STACKS, RunView

    model = personal_model(spec(**{"adapter-layers": adapter_layers}))
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
