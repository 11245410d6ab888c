"""Flower's own command lines, built in one place, and the SuperLink connection they name.

fedpersona wraps Flower's binaries and never replaces them. Every flag we pass
is built here, so ``tests/test_deployment.py`` can check each one against the
``--help`` of the pinned flwr (1.41.0) and fail when an upgrade renames or
deprecates one. What Flower 1.41 does and does not take:

* ``flower-superlink``: TLS is on unless ``--insecure``; ``--ssl-ca-certfile``,
  ``--ssl-certfile``, ``--ssl-keyfile``; ``--enable-supernode-auth`` (node keys
  are then registered through the Control API, ``flwr supernode register``;
  the old ``--auth-list-public-keys`` makes the SuperLink exit). Since 1.40 the
  Fleet, Control and Runtime APIs share one HTTP port (``--host``, ``--port``;
  it binds 127.0.0.1 unless told otherwise).
* ``flower-supernode``: ``--superlink host:port``, ``--root-certificates``
  (the CA that signed the SuperLink's certificate; without it the system store
  is used), ``--auth-supernode-private-key`` and ``--node-config``. Its own
  ``--port`` is the local API its ClientApp process talks to.
* ``flwr federation simulation-config @none/default local --num-supernodes N``:
  the node count of Flower's local simulation (2 unless set), kept in its state.
* ``flwr run APP CONNECTION`` and ``flwr supernode register KEY CONNECTION``:
  ``CONNECTION`` names a ``[superlink.NAME]`` table of ``$FLWR_HOME/config.toml``
  (``address`` plus ``root-certificates`` or ``insecure``), not a federation.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path

from simulations.deploy.certs import CertPaths

DEFAULT_PORT = 8000  # flower-superlink's own default for its shared HTTP port
DEFAULT_CONNECTION = "fedpersona"

# Set for every Flower process we start: no `uv sync` of the app's dependencies
# (it would pull a multi-GB CUDA torch) and no update check (no network).
FLOWER_ENV = {"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_DISABLE_UPDATE_CHECK": "1"}


def flower_bin(name: str) -> str:
    """A Flower binary: next to this Python first (a venv's bin/), else on PATH."""
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found next to {sys.executable} or on PATH (pip install flwr==1.41.0)")
    return found


def flower_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a Flower process.

    The SuperLink and SuperNode start ``flower-superexec`` and the app processes
    by name, so the folder of our Python's scripts goes first on PATH.
    """
    env = dict(os.environ)
    env.update(FLOWER_ENV)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(extra or {})
    return env


def local_address(host: str, port: int) -> str:
    """The address this machine reaches a SuperLink bound to ``host`` at (a wildcard bind is reached on loopback)."""
    reach = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    return f"[{reach}]:{port}" if ":" in reach else f"{reach}:{port}"


# -- command lines -----------------------------------------------------------------------


def superlink_command(certs: CertPaths, host: str = "127.0.0.1", port: int = DEFAULT_PORT, database: Path | None = None) -> list[str]:
    """``flower-superlink`` with TLS and SuperNode authentication; it runs the ServerApp in a subprocess."""
    cmd = [
        flower_bin("flower-superlink"),
        "--ssl-ca-certfile", str(certs.ca),
        "--ssl-certfile", str(certs.server_cert),
        "--ssl-keyfile", str(certs.server_key),
        "--enable-supernode-auth",
        "--host", host,
        "--port", str(port),
        "--disable-runtime-dependency-installation",
    ]
    if database is not None:
        cmd += ["--database", str(database)]
    return cmd


def _toml_string(value: str) -> str:
    """A TOML string Flower's ``key=value`` parser keeps whole (it does not read escapes inside quotes)."""
    if "'" not in value and "\n" not in value:
        return f"'{value}'"
    if '"' not in value and "\\" not in value and "\n" not in value:
        return f'"{value}"'
    raise ValueError("a value with both quote characters (or a newline) cannot be passed to Flower's --node-config/--run-config")


def config_string(values: Mapping[str, object]) -> str:
    """``key=value`` pairs in Flower's ``--node-config``/``--run-config`` syntax (TOML values)."""
    out = []
    for key, value in values.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (int, float)):
            text = repr(value)
        else:
            text = _toml_string(str(value))
        out.append(f"{key}={text}")
    return " ".join(out)


def supernode_command(
    superlink: str,
    private_key: Path,
    node_config: Mapping[str, object],
    ca: Path | None,
    port: int | None = None,
) -> list[str]:
    """``flower-supernode`` for one device. ``ca=None`` leaves TLS on with the system trust store (the tests' node without our CA)."""
    cmd = [flower_bin("flower-supernode"), "--superlink", superlink]
    if ca is not None:
        cmd += ["--root-certificates", str(ca)]
    cmd += ["--auth-supernode-private-key", str(private_key), "--node-config", config_string(node_config)]
    if port is not None:
        cmd += ["--port", str(port)]
    return cmd


def register_command(public_key: Path, connection: str) -> list[str]:
    return [flower_bin("flwr"), "supernode", "register", str(public_key), connection, "--format", "json"]


def run_command(app: Path, connection: str | None = None, run_config: Mapping[str, object] | None = None,
                federation_config: Mapping[str, object] | None = None, stream: bool = True) -> list[str]:
    """``flwr run APP [CONNECTION]`` with run-config (and, for a local simulation, federation-config) overrides."""
    cmd = [flower_bin("flwr"), "run", str(app)]
    if connection:
        cmd.append(connection)
    if run_config:
        cmd += ["--run-config", config_string(run_config)]
    if federation_config:
        cmd += ["--federation-config", config_string(federation_config)]
    if stream:
        cmd.append("--stream")
    return cmd


def simulation_size_command(num_supernodes: int) -> list[str]:
    """Set the node count of Flower's local simulation once; it persists in the local SuperLink's state.

    Plain ``flwr run .`` then starts that many virtual SuperNodes (Flower's default is 2).
    """
    return [flower_bin("flwr"), "federation", "simulation-config", "@none/default", "local", "--num-supernodes", str(num_supernodes)]


# -- the connection profile ----------------------------------------------------------------


def flwr_home(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    return Path(env["FLWR_HOME"]) if env.get("FLWR_HOME") else Path.home() / ".flwr"


def write_connection(name: str, address: str, ca: Path, home: Path | None = None) -> Path:
    """Add or replace ``[superlink.NAME]`` in ``$FLWR_HOME/config.toml`` (address + the CA, absolute); other tables stay.

    A new config file starts from Flower's own default (its ``local``
    simulation connection stays the default one), so plain ``flwr run .`` keeps working.
    """
    import tomli_w
    from flwr.cli.constant import DEFAULT_FLOWER_CONFIG_TOML

    home = flwr_home() if home is None else Path(home)
    path = home / "config.toml"
    config = tomllib.loads(path.read_text()) if path.exists() else tomllib.loads(DEFAULT_FLOWER_CONFIG_TOML)
    config.setdefault("superlink", {})[name] = {"address": address, "root-certificates": str(Path(ca).resolve())}
    home.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(config))
    return path


class RegistrationError(RuntimeError):
    pass


def register_key(public_key: Path, connection: str, env: Mapping[str, str], timeout: float = 60.0) -> str:
    """Register one SuperNode public key; returns its node id, or ``"already registered"``."""
    done = subprocess.run(register_command(public_key, connection), env=dict(env), capture_output=True, text=True, timeout=timeout)
    try:
        reply = json.loads(done.stdout[done.stdout.index("{"):])
    except ValueError:
        raise RegistrationError(f"{public_key}: flwr supernode register gave no JSON (exit {done.returncode}): {done.stderr.strip()[-400:]}") from None
    if reply.get("success"):
        return str(reply["node-id"])
    message = str(reply.get("error-message", ""))
    if "[code: 23]" in message:  # "Public key already in use": a restarted SuperLink with --database
        return "already registered"
    raise RegistrationError(f"{public_key}: {message.strip()}")
