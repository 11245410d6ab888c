"""``fedpersona serve``: Flower's SuperLink with TLS and SuperNode authentication, its node keys registered.

Starts ``flower-superlink`` (which runs the ServerApp, ``server/app.py``, in a
subprocess for each run), waits until its HTTPS health endpoint answers with a
certificate our CA signed, writes a SuperLink connection for ``flwr`` into
``$FLWR_HOME/config.toml`` and registers each SuperNode public key with
``flwr supernode register``. It then stays in the foreground until the
SuperLink exits, passing SIGTERM and SIGINT on (it is the server container's
entrypoint).
"""

from __future__ import annotations

import ssl
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from simulations.deploy import flower
from simulations.deploy.certs import CertPaths
from simulations.deploy.process import Child, forward_signals, start

READY = "fedpersona serve: ready"


class StartupError(RuntimeError):
    pass


def check_certs(certs: CertPaths, server: bool) -> None:
    needed = [certs.ca] + ([certs.server_cert, certs.server_key] if server else [])
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        raise StartupError(f"missing {', '.join(missing)} (make them with `fedpersona certs {certs.root}`)")


def wait_ready(address: str, ca: Path, link: Child, timeout: float) -> float:
    """Poll ``https://ADDRESS/health`` (verified against ``ca``) until it answers 200; returns the seconds waited."""
    context = ssl.create_default_context(cafile=str(ca))
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if not link.alive():
            raise StartupError(f"flower-superlink exited with code {link.popen.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"https://{address}/health", context=context, timeout=2) as reply:
                if reply.status == 200:
                    return time.monotonic() - started
        except OSError:  # refused while starting; urllib's URLError and ssl errors are OSErrors
            pass
        time.sleep(0.25)
    raise StartupError(f"flower-superlink did not answer on https://{address}/health within {timeout:.0f} s")


def register_all(keys: list[Path], connection: str, env: dict) -> dict[str, str]:
    """Register every key (in parallel: each `flwr` call is a Python start-up); key file -> node id."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        ids = list(pool.map(lambda key: flower.register_key(key, connection, env), keys))
    return {str(k): i for k, i in zip(keys, ids)}


def serve(certs_dir: Path, host: str = "127.0.0.1", port: int = flower.DEFAULT_PORT, keys: list[Path] | None = None,
          connection: str = flower.DEFAULT_CONNECTION, database: Path | None = None, ready_timeout: float = 60.0,
          ready_file: Path | None = None, say=print) -> int:
    """Run the SuperLink until it exits; returns its exit code.

    ``ready_file`` is created once the keys are registered (a container health
    check: a SuperNode that connects before its key is registered is refused
    and exits) and removed when the SuperLink exits.
    """
    certs = CertPaths(Path(certs_dir).resolve())
    check_certs(certs, server=True)
    keys = [Path(k) for k in keys] if keys else certs.node_keys()
    missing = [str(k) for k in keys if not k.is_file()]
    if missing:
        raise StartupError(f"no such public key: {', '.join(missing)}")
    env = flower.flower_env()
    link = start("flower-superlink", flower.superlink_command(certs, host, port, database), env)
    forward_signals(link)
    try:
        address = flower.local_address(host, port)
        waited = wait_ready(address, certs.ca, link, ready_timeout)
        config = flower.write_connection(connection, address, certs.ca, flower.flwr_home(env))
        registered = register_all(keys, connection, env)
    except BaseException:
        link.stop()
        raise
    for key, node in registered.items():
        say(f"registered {key}: node {node}")
    say(f"{READY} on https://{address} (up in {waited:.1f} s; bound to {host}); {len(registered)} SuperNode key(s) registered; "
        f"`flwr run . {connection}` uses the connection in {config}")
    sys.stdout.flush()
    if ready_file is not None:
        Path(ready_file).write_text(f"{address}\n")
    try:
        return link.popen.wait()
    finally:
        if ready_file is not None:
            Path(ready_file).unlink(missing_ok=True)
