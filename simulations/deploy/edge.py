"""``fedpersona edge``: Flower's SuperNode for one device, its data and floor named by the owner's policy file.

Starts ``flower-supernode`` with TLS (``--root-certificates``: the CA that
signed the SuperLink's certificate), node authentication
(``--auth-supernode-private-key``) and ``--node-config 'policy-file=...'``.
The policy file is the device owner's (TOML or JSON, ``client/policy.py``); it
is read and validated here first, so a malformed floor fails before anything
connects. ``--data`` must be the policy's ``user-file``; a policy without one
gets it (and ``--store`` its ``store-path``) through the node config, which
the device reads on top of its file. Nothing here ever comes from a server.
"""

from __future__ import annotations

from pathlib import Path

from client.policy import DevicePolicy
from simulations.deploy import flower
from simulations.deploy.certs import CertPaths
from simulations.deploy.process import forward_signals, start
from simulations.deploy.serve import StartupError, check_certs


def node_config(policy_file: Path, data: Path | None, store: Path | None = None) -> dict[str, str]:
    """The SuperNode's ``--node-config``: the policy file, plus the data and store paths the policy leaves open."""
    policy_file = Path(policy_file).resolve()
    policy = DevicePolicy.from_file(policy_file)  # PolicyError names the file and key
    if data is None and not policy.user_file:
        raise StartupError(f"{policy_file} names no user-file; give the device's data with --data")
    data = Path(data if data is not None else policy.user_file).resolve()
    if not data.is_file():
        raise StartupError(f"{data}: no such user file")
    config = {"policy-file": str(policy_file)}
    for key, given, owned in (("user-file", data, policy.user_file), ("store-path", store, policy.store_path)):
        if given is None:
            continue
        given = Path(given).resolve()
        if owned and Path(owned).resolve() != given:
            raise StartupError(f"{policy_file}: its {key} is {owned}, not {given}; the device's policy decides where its data lives")
        if not owned:
            config[key] = str(given)
    return config


def edge(data: Path | None, policy_file: Path, certs_dir: Path, key: Path, superlink: str, port: int | None = None,
         store: Path | None = None) -> int:
    """Run the SuperNode until it exits; returns its exit code."""
    certs = CertPaths(Path(certs_dir).resolve())
    check_certs(certs, server=False)
    if not Path(key).is_file():
        raise StartupError(f"{key}: no such SuperNode private key (made by `fedpersona certs`, supernodes/node-N.key)")
    cmd = flower.supernode_command(superlink, Path(key).resolve(), node_config(policy_file, data, store), certs.ca, port)
    node = start("flower-supernode", cmd, flower.flower_env())
    forward_signals(node)
    return node.popen.wait()
