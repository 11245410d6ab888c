"""Crash and resume: the server checkpoints after every round; devices never pay twice for a lost round."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import LoopbackGrid, device_context, initial_arrays, quick, strategy_for, user_files

from client import device
from client.app import app
from server import checkpoint


def _devices(tmp_path, tiny_data, cfg):
    return {100 + i: device_context(tmp_path, 100 + i, f, cfg) for i, f in enumerate(user_files(tiny_data))}


def _max_diff(a, b) -> float:
    return max(float(np.abs(a[k].numpy() - b[k].numpy()).max()) for k in a.keys())


def test_a_resumed_server_ends_with_the_same_parameters_as_an_uninterrupted_one(tiny_data, task_identity, tmp_path):
    cfg = quick(secagg=False, dp=False, persona_slots=0, num_supernodes=3, num_server_rounds=3)
    whole = strategy_for(cfg, num_rounds=3)
    expected = whole.run(LoopbackGrid(app, _devices(tmp_path / "a", tiny_data, cfg)), initial_arrays(cfg))

    contexts = _devices(tmp_path / "b", tiny_data, cfg)
    first = strategy_for(cfg, num_rounds=3)
    first.num_rounds = 1  # the server dies after round 1's checkpoint
    first.run(LoopbackGrid(app, contexts), initial_arrays(cfg), checkpoint=lambda r, arrays: checkpoint.save(tmp_path, r, {k: v.numpy() for k, v in arrays.items()}, first.state_dict(), cfg.flat()))
    done, tensors, state = checkpoint.load(tmp_path, cfg.flat())
    resumed = strategy_for(cfg, num_rounds=3)
    resumed.load_state_dict(state)
    from flwr.app import Array, ArrayRecord

    final = resumed.run(LoopbackGrid(app, contexts), ArrayRecord({k: Array(v) for k, v in tensors.items()}), start_round=done + 1)
    assert done == 1 and sorted(resumed.rounds) == [1, 2, 3]
    assert _max_diff(final, expected) == 0.0


def test_a_checkpoint_of_another_configuration_is_refused(tmp_path):
    checkpoint.save(tmp_path, 1, {"w": np.zeros(2, np.float32)}, {"rounds": {}}, {"lr": 0.1})
    with pytest.raises(ValueError, match="different run configuration"):
        checkpoint.load(tmp_path, {"lr": 0.2})
    assert checkpoint.load(tmp_path / "none", {}) is None


def test_devices_never_pay_twice_for_a_round_the_server_lost(tiny_data, task_identity, tmp_path, monkeypatch):
    """The server dies after the devices trained round 2 but before its checkpoint; on restart it asks again."""
    from flwr.app import ConfigRecord

    from common.secagg import SecAggClient

    cfg = quick(dp=True, persona_slots=0, num_supernodes=3, num_server_rounds=2)
    contexts = _devices(tmp_path, tiny_data, cfg)
    released = []
    real = SecAggClient.masked_input

    def spy(self, msg, vector=None, **kw):
        released.append((self.node_id, np.array(vector)))
        return real(self, msg, vector, **kw)

    monkeypatch.setattr(SecAggClient, "masked_input", spy)
    grid = LoopbackGrid(app, contexts)
    first = strategy_for(cfg, num_rounds=1)
    after_one = first.run(grid, initial_arrays(cfg))
    lost = strategy_for(cfg, num_rounds=2)
    grid.send_and_receive(lost.configure_train(2, after_one, ConfigRecord(), grid))  # trained; the server died here
    stores = {n: device.DeviceStore(tmp_path / f"device-{n}" / "store.sqlite") for n in contexts}

    def steps():
        return {n: sum(h[2] for h in json.loads(s.get_state(device.ACCOUNTANT))["history"]) for n, s in stores.items()}

    spent = steps()
    first_release = dict(released[-3:])
    # The restarted server asks for round 2 again, with the same tiers.
    again = strategy_for(cfg, num_rounds=2)
    new, _ = again.aggregate_train(2, grid.send_and_receive(again.configure_train(2, after_one, ConfigRecord(), grid)))
    assert new is not None and again.rounds[2]["contributors"] == 3
    assert steps() == spent  # no second charge
    for n, vector in released[-3:]:
        assert np.array_equal(vector, first_release[n])  # the same release, not a second one


@pytest.mark.slow
def test_a_simulation_killed_after_a_round_resumes_to_the_same_result(tmp_path):
    """On Flower's simulation engine: the ServerApp dies after round 1; `simulate --resume` finishes the run."""
    from safetensors.numpy import load_file

    from server import strategy as strategy_mod
    from simulations.run import prepare, simulate

    # No audit canaries: their inclusion coins come from OS entropy, so two generated data folders would differ.
    overrides = {"num-supernodes": 3, "num-server-rounds": 3, "secagg": False, "dp": False, "persona-slots": 0, "scrub-mode": "patterns", "audit-canaries": 0}
    simulate(prepare("quick", overrides, tmp_path / "whole"))
    harness = prepare("quick", overrides, tmp_path / "killed")

    def die(server_round, total, row):
        if server_round == 2:
            raise KeyboardInterrupt("the server process dies during round 2")

    with pytest.raises(BaseException):
        simulate(harness, on_round=die)
    assert checkpoint.load(tmp_path / "killed", harness["run"])[0] == 1
    report = simulate(harness)  # what `fedpersona simulate --resume RUN_DIR` runs
    assert [r["round"] for r in report["server"]["rounds"]] == [1, 2, 3]
    a = load_file(str(tmp_path / "whole" / "shared-tiers.safetensors"))
    b = load_file(str(tmp_path / "killed" / "shared-tiers.safetensors"))
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) == 0.0
    strategy_mod.ROUND_HOOKS[:] = []
