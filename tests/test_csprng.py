"""The CSPRNG helpers: OS-seeded AES-CTR draws for noise shares and cohort sampling."""

from __future__ import annotations


import numpy as np
import pytest

from common import csprng


def test_gaussian_moments_tails_and_freshness():
    n, std = 1_000_000, 2.0
    z = csprng.gaussian(n, std)  # its speed is a benchmark question, never a test assertion
    assert z.shape == (n,) and z.dtype == np.float64 and np.isfinite(z).all()
    # Loose bounds, each about 10 standard errors wide at this sample size.
    assert abs(z.mean()) < 10 * std / np.sqrt(n)
    assert z.std() == pytest.approx(std, rel=0.01)
    assert np.mean(z**4) / z.var() ** 2 == pytest.approx(3.0, abs=0.05)  # Gaussian kurtosis
    assert np.mean(np.abs(z) > 2 * std) == pytest.approx(0.0455, abs=0.002)
    assert np.mean(z > 0) == pytest.approx(0.5, abs=0.005)  # symmetric
    assert not np.array_equal(z[:1000], csprng.gaussian(n, std)[:1000])  # fresh key every call
    assert csprng.gaussian((3, 4), 1.0).shape == (3, 4)
    assert csprng.gaussian(7, 0.0).tolist() == [0.0] * 7
    with pytest.raises(ValueError):
        csprng.gaussian(3, -1.0)


def test_bernoulli_cohort_draws():
    n = 200_000
    draws = csprng.bernoulli(n, 0.3)
    assert draws.dtype == bool and draws.shape == (n,)
    assert draws.mean() == pytest.approx(0.3, abs=0.005)
    assert not np.array_equal(draws, csprng.bernoulli(n, 0.3))
    assert not csprng.bernoulli(1000, 0.0).any() and csprng.bernoulli(1000, 1.0).all()
    with pytest.raises(ValueError):
        csprng.bernoulli(10, 1.5)


def test_stochastic_rounding_defaults_to_an_os_seeded_generator(monkeypatch):
    from common import secagg_codec

    calls = []
    real = csprng.rounding_rng

    def spy():
        calls.append(1)
        return real()

    monkeypatch.setattr(secagg_codec, "rounding_rng", spy)
    codec = secagg_codec.FixedPointCodec(1.0, 16, 4, stochastic=True)
    codec.encode(np.zeros(5))
    packer = secagg_codec.VectorPacker({"a": ((3,), 1.0)}, modulus_bits=16, max_summands=4)
    packer.encode({"a": np.zeros(3)})
    assert len(calls) == 2
    a, b = real().integers(0, 2**63, 4), real().integers(0, 2**63, 4)
    assert not np.array_equal(a, b)
