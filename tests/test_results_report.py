"""The run folder's instruments picture: drawn from the devices' per-round DP-SGD figures, absent without DP-SGD."""

from __future__ import annotations

import struct

import pytest


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_instruments_picture_needs_dp_sgd_rounds_and_draws_them(tmp_path):
    from simulations.instruments import FILE, instruments_png, write_instruments

    no_dp = [{"round": 1, "devices": 3, "train_loss": 2.0}]
    assert instruments_png(no_dp) is None and write_instruments(tmp_path, no_dp) is None
    assert not (tmp_path / FILE).exists()
    rounds = [{"round": r, "devices": 3, "train_loss": 2.0, "clip_fraction": 0.5,
               "dp_sgd": {"clip_fraction": 1.0 / r, "grad_norm_q50": 3.0, "noise_std": 0.2, "snr": 0.1 * r,
                          "snr_by_tier": {"global": 0.05 * r, "user": 0.2 * r}}} for r in (1, 2, 3)]
    path = write_instruments(tmp_path, rounds)
    width, height = _png_size(path.read_bytes())
    assert path.name == FILE and width > 400 and height > 150
    assert instruments_png(rounds) == path.read_bytes()  # deterministic bytes: no timestamps


def test_training_rounds_average_each_tiers_signal_to_noise_over_the_devices():
    from simulations.results import training_rounds

    def device(user_snr: float, tiers: bool = True) -> dict:
        sgd = {"clip_fraction": 0.5, "snr": 0.1, **({"snr_by_tier": {"global": 0.05, "user": user_snr}} if tiers else {})}
        return {"diagnostics": {"1": {"sampled": True, "train_loss": 2.0, "dp_sgd": sgd}}}

    [row] = training_rounds([device(0.2), device(0.4), device(0.9, tiers=False)])
    assert row["dp_sgd"]["snr_by_tier"] == pytest.approx({"global": 0.05, "user": 0.3})
    [old] = training_rounds([device(0.2, tiers=False)])  # devices from before the per-tier figure
    assert "snr_by_tier" not in old["dp_sgd"]
