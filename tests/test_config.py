"""The run configuration: one set of keys, mirrored for `flwr run .`."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from common.config import DEFAULTS, PROFILES, build_config

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_app_config_mirrors_the_defaults():
    flwr = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert set(flwr) == set(DEFAULTS)
    # Paths differ on purpose (flwr run writes its own run folder); every other value must agree.
    differing = {k for k in DEFAULTS if k not in ("run-dir",) and flwr[k] != DEFAULTS[k]}
    assert differing == set()


def test_profiles_and_overrides_use_known_keys_only():
    for name in PROFILES:
        assert set(build_config(name)) == set(DEFAULTS)
    with pytest.raises(ValueError, match="unknown configuration keys"):
        build_config("quick", {"persona-slot": 3})
