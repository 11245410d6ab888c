"""The run folder's instruments picture: drawn from the devices' per-round DP-SGD figures, absent without DP-SGD."""

from __future__ import annotations

import struct


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_instruments_picture_needs_dp_sgd_rounds_and_draws_them(tmp_path):
    from simulations.instruments import FILE, instruments_png, write_instruments

    no_dp = [{"round": 1, "devices": 3, "train_loss": 2.0}]
    assert instruments_png(no_dp) is None and write_instruments(tmp_path, no_dp) is None
    assert not (tmp_path / FILE).exists()
    rounds = [{"round": r, "devices": 3, "train_loss": 2.0, "clip_fraction": 0.5,
               "dp_sgd": {"clip_fraction": 1.0 / r, "grad_norm_q50": 3.0, "noise_std": 0.2, "snr": 0.1 * r}} for r in (1, 2, 3)]
    path = write_instruments(tmp_path, rounds)
    width, height = _png_size(path.read_bytes())
    assert path.name == FILE and width > 400 and height > 150
    assert instruments_png(rounds) == path.read_bytes()  # deterministic bytes: no timestamps
