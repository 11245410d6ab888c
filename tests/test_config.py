"""The run configuration: one typed RunConfig, validated once, mirrored for `flwr run .`, defaults in one place."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

from common.config import DEFAULTS, PROFILES, ConfigError, RunConfig, build_config

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_app_config_mirrors_the_defaults():
    flwr = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert set(flwr) == set(DEFAULTS)
    # Paths differ on purpose (flwr run writes its own run folder); every other value must agree.
    differing = {k for k in DEFAULTS if k not in ("run-dir",) and flwr[k] != DEFAULTS[k]}
    assert differing == set()
    RunConfig.from_flat(flwr)  # and it validates


def test_profiles_validate_and_round_trip():
    for name in PROFILES:
        cfg = build_config(name)
        assert set(cfg.flat()) == set(DEFAULTS)
        assert RunConfig.from_flat(cfg.flat()) == cfg


@pytest.mark.parametrize(
    "key,value",
    [
        ("noise-multiplier", -1),
        ("num-server-rounds", 0),
        ("lr", "abc"),
        ("persona-slots", 7),  # more slots than the quick profile's 6 users
        ("secagg", "maybe"),
        ("fraction-train", 0.0),
        ("server-lr", 0.0),
        ("delta", 1.0),
        ("scrub-mode", "none"),
        ("num-supernodes", 2.5),
    ],
)
def test_a_bad_value_names_its_key_and_not_its_value(key, value):
    with pytest.raises(ConfigError) as err:
        build_config("quick", {key: value})
    assert err.value.key == key and f"'{key}'" in str(err.value)
    assert str(value) not in str(err.value).replace(f"'{key}'", "")


def test_unknown_keys_are_errors():
    with pytest.raises(ConfigError, match="unknown configuration key") as err:
        build_config("quick", {"persona-slot": 3})
    assert err.value.key == "persona-slot"
    with pytest.raises(ConfigError, match="unknown"):
        RunConfig.from_flat({"store-dir": "/tmp/x"})


def test_booleans_from_a_command_line_parse_as_booleans():
    # '--set secagg=False' reaches the config as the string 'False'; it once turned secagg *on*.
    assert build_config("quick", {"secagg": "False"}).secagg.enabled is False
    assert build_config("quick", {"secagg": "true"}).secagg.enabled is True
    assert build_config("quick", {"lr": "0.5", "local-steps": "3"}).train.lr == 0.5


def test_the_default_optimizer_is_sgd_under_dp_and_adam_without_each_at_its_own_rate():
    import torch

    from client.train import make_optimizer

    private, plain = build_config("quick").train, build_config("quick", {"dp": False}).train
    assert (private.local_optimizer, private.learning_rate) == ("sgd", 0.5)
    assert (plain.local_optimizer, plain.learning_rate) == ("adam", 0.02)
    opt = make_optimizer([torch.nn.Parameter(torch.zeros(2))], private)
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["lr"] == 0.5 and opt.defaults["momentum"] == 0.9
    assert isinstance(make_optimizer([torch.nn.Parameter(torch.zeros(2))], plain), torch.optim.Adam)
    chosen = build_config("quick", {"optimizer": "adam", "lr": 0.003}).train  # an explicit choice is kept
    assert (chosen.local_optimizer, chosen.learning_rate) == ("adam", 0.003)
    assert build_config("quick", {"optimizer": "adambc"}).train.learning_rate == 0.02


def test_cross_key_rules():
    with pytest.raises(ConfigError, match="frequent-from"):
        build_config("quick", {"cold-start-below": 10, "frequent-from": 5})
    with pytest.raises(ConfigError, match="num-supernodes"):
        build_config("quick", {"secagg": True, "num-supernodes": 2, "persona-slots": 2})
    assert build_config("quick").noise_placement == "distributed"  # secure aggregation is the default
    assert build_config("quick", {"secagg": False}).noise_placement == "server"
    with pytest.raises(ConfigError, match="user-delta"):
        build_config("quick", {"user-dp": True, "user-delta": 0.05})  # not well below 1/6
    # A data-derived persona choice needs user-level DP with device-added noise under secure aggregation.
    with pytest.raises(ConfigError, match="persona-assign"):
        build_config("quick", {"persona-assign": "kmeans"})
    with pytest.raises(ConfigError, match="persona-assign"):
        build_config("quick", {"persona-assign": "ifca", "user-dp": True, "secagg-noise": "server"})
    assert build_config("quick", {"persona-assign": "kmeans", "user-dp": True}).persona.assign == "kmeans"


def test_a_bad_value_leaves_no_run_folder(tmp_path):
    from simulations.run import prepare

    with pytest.raises(ConfigError):
        prepare("quick", {"noise-multiplier": -1}, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_the_cli_exits_non_zero_on_a_bad_value(tmp_path):
    from typer.testing import CliRunner

    from simulations.cli import app

    result = CliRunner().invoke(app, ["simulate", "--profile", "quick", "--set", "noise-multiplier=-1", "--run-dir", str(tmp_path / "r")])
    assert result.exit_code == 2 and "noise-multiplier" in result.output
    assert not (tmp_path / "r").exists()


def _config_keys_with_defaults(path: Path) -> list[str]:
    """``something.get("<config key>", default)`` calls: a default held outside common/config.py."""
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "get"
            and len(node.args) == 2
            and isinstance(node.args[0], ast.Constant)
            and node.args[0].value in DEFAULTS
        ):
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}:{node.args[0].value}")
    return found


def test_no_other_module_holds_a_config_default():
    offenders = [hit for pkg in ("client", "server", "common", "simulations", "benchmarks") for f in sorted((ROOT / pkg).rglob("*.py")) for hit in _config_keys_with_defaults(f)]
    assert offenders == []
