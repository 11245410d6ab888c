"""Deployment on Flower's own binaries: the flags we pass, the certificates, and a loopback federation.

The fast tests pin every flag our command builders pass against the ``--help``
of the pinned flwr, and check ``fedpersona certs``, the edge node config and
the connection profile. The slow tests start the real processes on
127.0.0.1: ``fedpersona serve`` (flower-superlink with TLS and SuperNode
authentication), two ``fedpersona edge`` SuperNodes behind a recording proxy,
a SuperNode whose key was never registered and one without the CA, and run a
2-round job with ``flwr run . CONNECTION`` to completion; and plain
``flwr run .`` on Flower's local simulation with the node count set on both
sides. Every process is started and stopped by its PID, and every wait has a
timeout.
"""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from simulations.cli import app as cli_app
from simulations.deploy import flower
from simulations.deploy.certs import CertPaths, make_certs, write_node_key
from simulations.deploy.edge import node_config
from simulations.deploy.process import descendants, start, stop_pid
from simulations.deploy.serve import READY, StartupError

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- flags


def _help(cmd: list[str]) -> str:
    env = flower.flower_env({"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"})
    done = subprocess.run(cmd + ["--help"], env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    return re.sub(r"\x1b\[[0-9;]*m", "", done.stdout + done.stderr)


ENTRY = re.compile(r"^(?:\*\s+)?(?:-\w,\s+)?(--[a-z0-9][a-z0-9-]*)")


def option_help(text: str) -> dict[str, str]:
    """Each option of an argparse or typer/rich ``--help`` page with its description."""
    out: dict[str, str] = {}
    current = None
    for raw in text.splitlines():
        line = raw.strip().strip("│╭╮╰╯─").strip()
        match = ENTRY.match(line)
        if match and match.group(1) not in out:  # a later line naming the flag (an example in its text) continues it
            current = match.group(1)
            out[current] = line[match.end():]
        elif current and line and not line.lower().startswith(("usage", "options", "arguments")):
            out[current] += " " + line
    return out


def _flags(cmd: list[str]) -> set[str]:
    return {tok.split("=")[0] for tok in cmd if tok.startswith("--")}


def test_every_flag_we_pass_is_in_the_pinned_flowers_help(tmp_path):
    certs = CertPaths(tmp_path)
    ours = {
        "flower-superlink": _flags(flower.superlink_command(certs, "0.0.0.0", 9000, database=tmp_path / "state.db")),
        "flower-supernode": _flags(flower.supernode_command("127.0.0.1:9000", tmp_path / "k", {"policy-file": "/p.toml"}, certs.ca, port=9094)),
        "flwr run": _flags(flower.run_command(ROOT, "c", {"model": "tiny-random"}, {"num-supernodes": 2}, stream=True)),
        "flwr supernode register": _flags(flower.register_command(tmp_path / "k.pub", "c")),
        "flwr federation simulation-config": _flags(flower.simulation_size_command(3)),
    }
    expected = {
        "flower-superlink": {"--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile", "--enable-supernode-auth", "--host", "--port",
                             "--disable-runtime-dependency-installation", "--database"},
        "flower-supernode": {"--superlink", "--root-certificates", "--auth-supernode-private-key", "--node-config", "--port"},
        "flwr run": {"--run-config", "--federation-config", "--stream"},
        "flwr supernode register": {"--format"},
        "flwr federation simulation-config": {"--num-supernodes"},
    }
    assert ours == expected  # the flag set is pinned: a new flag must be checked here too
    for program, flags in ours.items():
        page = _help([flower.flower_bin(program.split()[0]), *program.split()[1:]])
        listed = option_help(page)
        assert flags <= set(listed), f"{program}: not in --help: {sorted(flags - set(listed))}"
        deprecated = sorted(f for f in flags if "deprecated" in listed[f].lower())
        assert deprecated == [], f"{program}: deprecated flags passed: {deprecated}"
        if program == "flower-superlink":
            assert "--insecure" in listed and "--auth-list-public-keys" not in flags
        if program in ("flwr run", "flwr supernode register", "flwr federation simulation-config"):
            # The positional argument is a SuperLink connection, not a federation.
            assert "[SUPERLINK]" in page


def test_config_strings_parse_back_in_flower():
    from flwr.common.config import parse_config_args

    values = {"policy-file": "/a dir/it's.toml", "model": "tiny-random", "secagg": False, "num-supernodes": 2, "round-timeout": 120.0, "delta": 1e-5}
    assert parse_config_args([flower.config_string(values)]) == values
    with pytest.raises(ValueError):
        flower.config_string({"x": "both ' and \""})


# --------------------------------------------------------------------------- certs, edge config, connection


def test_certs_make_a_ca_a_server_certificate_and_node_keys(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key
    from flwr.cli.supernode.register import try_load_public_key

    out = tmp_path / "certs"
    result = CliRunner().invoke(cli_app, ["certs", str(out), "--host", "superlink", "--host", "10.0.0.5", "--nodes", "2"])
    assert result.exit_code == 0, result.output
    paths = CertPaths(out)
    for private in (paths.ca_key, paths.server_key, *paths.node_dir.glob("*.key")):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600, private
    ca = x509.load_pem_x509_certificate(paths.ca.read_bytes())
    server = x509.load_pem_x509_certificate(paths.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.DNSName)) == {"localhost", "superlink"}
    assert {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "10.0.0.5"}
    assert [p.name for p in paths.node_keys()] == ["node-0.pub", "node-1.pub"]
    for pub in paths.node_keys():
        try_load_public_key(pub)  # what `flwr supernode register` accepts
        key = load_ssh_private_key(pub.with_suffix(".key").read_bytes(), None)  # what flower-supernode loads
        assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    again = CliRunner().invoke(cli_app, ["certs", str(out)])
    assert again.exit_code == 2 and "--force" in again.output  # a new CA would lock every node out


def test_edge_fills_the_user_file_or_insists_on_the_policys(tmp_path):
    from client.policy import DevicePolicy
    from flwr.common.config import parse_config_args

    data = tmp_path / "me.jsonl"
    data.write_text("")
    open_policy = tmp_path / "open.toml"
    open_policy.write_text('min-scrub-mode = "patterns"\n')
    config = node_config(open_policy, data, store=tmp_path / "store.sqlite")
    assert config == {"policy-file": str(open_policy), "user-file": str(data), "store-path": str(tmp_path / "store.sqlite")}
    policy = DevicePolicy.for_node(parse_config_args([flower.config_string(config)]))
    assert policy.user_file == str(data) and policy.min_scrub_mode == "patterns"

    owned = tmp_path / "owned.json"
    owned.write_text(json.dumps({"user-file": "me.jsonl"}))  # relative to the policy file
    assert node_config(owned, data) == {"policy-file": str(owned)}
    assert node_config(owned, None) == {"policy-file": str(owned)}
    other = tmp_path / "other.jsonl"
    other.write_text("")
    with pytest.raises(StartupError, match="user-file"):
        node_config(owned, other)
    with pytest.raises(StartupError, match="no user-file"):
        node_config(open_policy, None)


def test_connection_profile_keeps_flowers_local_default(tmp_path, monkeypatch):
    from flwr.cli.flower_config import read_superlink_connection

    home = tmp_path / "flwr"
    make_certs(tmp_path / "certs", nodes=0)
    path = flower.write_connection("edge", "127.0.0.1:9999", tmp_path / "certs" / "ca.crt", home)
    flower.write_connection("other", "10.0.0.5:8000", tmp_path / "certs" / "ca.crt", home)
    monkeypatch.setenv("FLWR_HOME", str(home))
    conn = read_superlink_connection("edge")
    assert conn.address == "127.0.0.1:9999" and conn.root_certificates == str((tmp_path / "certs" / "ca.crt").resolve())
    assert read_superlink_connection("other").address == "10.0.0.5:8000"
    assert read_superlink_connection(None).name == "local"  # plain `flwr run .` still simulates
    assert path == home / "config.toml"


def test_serve_and_edge_fail_early_with_a_clear_message(tmp_path):
    runner = CliRunner()
    missing = runner.invoke(cli_app, ["serve", "--certs", str(tmp_path / "nothing")])
    assert missing.exit_code == 2 and "fedpersona certs" in missing.output
    make_certs(tmp_path / "certs", nodes=1)
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"user-file": "mine.jsonl", "min-scrub-mode": "loose"}))
    data = tmp_path / "other.jsonl"
    data.write_text("")
    args = ["edge", "--policy", str(policy), "--data", str(data), "--certs", str(tmp_path / "certs"),
            "--key", str(tmp_path / "certs" / "supernodes" / "node-0.key")]
    bad = runner.invoke(cli_app, args)  # the owner's policy is checked before anything starts
    assert bad.exit_code == 2 and "min-scrub-mode" in bad.output
    policy.write_text(json.dumps({"user-file": "mine.jsonl"}))
    other = runner.invoke(cli_app, args)
    assert other.exit_code == 2 and "user-file" in other.output


def test_a_child_and_its_helpers_are_stopped_by_pid(tmp_path):
    script = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], start_new_session=True); print('up', flush=True); time.sleep(60)"
    child = start("sleeper", [PY, "-c", script], dict(os.environ), log=tmp_path / "log", new_session=True)
    assert child.wait_for("up", timeout=30)
    helpers = descendants(child.pid)
    assert len(helpers) == 1
    child.stop(grace=5, helpers_grace=0.5)
    assert not child.alive()
    assert descendants(child.pid) == []
    assert not Path(f"/proc/{helpers[0][0]}").exists() or "Z" in Path(f"/proc/{helpers[0][0]}/stat").read_text().split(")")[1][:3]


# --------------------------------------------------------------------------- the loopback federation

RUN_CONFIG = {
    "model": "tiny-random", "num-supernodes": 2, "persona-slots": 2, "persona-min-size": 1, "secagg": False,
    "num-server-rounds": 2, "local-steps": 1, "batch-size": 4, "max-len": 32, "scrub-mode": "patterns", "round-timeout": 150.0,
}
TEST_BUDGET_S = 420  # a hard bound for the whole loopback test; it takes about a minute on an idle 2-core machine


class Deadline:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self, cap: float | None = None) -> float:
        left = max(1.0, self.end - time.monotonic())
        return min(left, cap) if cap else left


def _dataset(root: Path):
    from simulations.personas import DatasetSpec, generate_dataset

    spec = DatasetSpec(num_users=3, num_personas=3, seed=3, train_tasks=8, test_tasks=2, documents=4, interactions=4,
                       preferences=2, cold_start_share=0.0, occasional_share=0.0, pii_share=0.5, canary_users=2)
    manifest = generate_dataset(root, spec)
    sidecar = [json.loads(line) for line in (root / "pii_sidecar.jsonl").read_text().splitlines() if line]
    users = [u for u in manifest["users"] if u.get("canary")][:2]  # the two devices hold the canaries
    assert len(users) == 2
    planted = {u["user_id"]: sorted({r["value"] for r in sidecar if r["user_id"] == u["user_id"]} | {u["canary"]}) for u in users}
    return users, planted


def _scan(plaintexts: list[bytes], planted: list[str]) -> dict:
    from common.models import byte_tokenizer
    from simulations.audits.wire import NeedleFinder, needles

    patterns = sorted(set(needles(planted, byte_tokenizer())))
    finder = NeedleFinder(patterns)
    return {"patterns": len(patterns), "hits": sum(finder.count(p) for p in plaintexts)}


@pytest.mark.slow
def test_loopback_deployment_tls_node_auth_and_the_wire(tmp_path):
    from simulations.deploy.wiretap import TlsWiretap

    started = time.monotonic()
    deadline = Deadline(TEST_BUDGET_S)
    users, planted = _dataset(tmp_path / "data")
    assert CliRunner().invoke(cli_app, ["certs", str(tmp_path / "certs"), "--nodes", "3"]).exit_code == 0
    certs = CertPaths(tmp_path / "certs")  # node-0, node-1: the devices; node-2: registered, but its machine lacks ca.crt
    stray_key, _ = write_node_key(tmp_path / "stray", "never-registered")
    env = flower.flower_env({"FLWR_HOME": str(tmp_path / "flwr"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                             "FEDPERSONA_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)})
    port = free_port()
    superlink = f"127.0.0.1:{port}"
    policies = []
    for i, user in enumerate(users):
        folder = tmp_path / f"device-{i}"
        folder.mkdir()
        policy = folder / ("policy.toml" if i == 0 else "policy.json")
        # device 0's owner names the data in the policy; device 1's leaves it to `fedpersona edge --data`
        lines = {"min-scrub-mode": "patterns", "store-path": "store.sqlite"}
        if i == 0:
            lines["user-file"] = str(tmp_path / "data" / user["file"])
            policy.write_text("".join(f'{k} = "{v}"\n' for k, v in lines.items()))
        else:
            policy.write_text(json.dumps(lines))
        policies.append(policy)

    children, taps = [], []

    def launch(name, cmd, home=None):
        child_env = dict(env, FLWR_HOME=str(home)) if home else env
        child = start(name, cmd, child_env, log=tmp_path / f"{name}.log", cwd=ROOT, new_session=True)
        children.append(child)
        return child

    def edge_cmd(i, key, address):
        return [PY, "-m", "simulations.cli", "edge", "--data", str(tmp_path / "data" / users[i % 2]["file"]), "--policy", str(policies[i % 2]),
                "--certs", str(certs.root), "--key", str(key), "--superlink", address, "--port", str(free_port())]

    try:
        serve = launch("serve", [PY, "-m", "simulations.cli", "serve", "--certs", str(certs.root), "--port", str(port), "--connection", "loopback"])
        assert serve.wait_for(READY, deadline.left(90)), serve.output()[-3000:]
        assert serve.output().count("registered ") == 3
        ready_s = time.monotonic() - started

        taps = [TlsWiretap(("127.0.0.1", port), certs.server_cert, certs.server_key, certs.ca) for _ in users]
        for i, tap in enumerate(taps):
            launch(f"edge-{i}", edge_cmd(i, certs.node_dir / f"node-{i}.key", tap.address), home=tmp_path / f"device-{i}" / "flwr")
        stray = launch("unregistered", edge_cmd(0, stray_key, superlink), home=tmp_path / "stray" / "flwr")
        no_ca = launch("no-ca", flower.supernode_command(superlink, certs.node_dir / "node-2.key", {"policy-file": str(policies[1])}, ca=None, port=free_port()),
                       home=tmp_path / "no-ca-flwr")

        run_config = dict(RUN_CONFIG, **{"run-dir": str(tmp_path / "server-run")})
        job_started = time.monotonic()
        job = subprocess.run(flower.run_command(ROOT, "loopback", run_config), cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=deadline.left(), stdin=subprocess.DEVNULL)
        job_s = time.monotonic() - job_started
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]

        # The job finished, and the server's own report counts both devices in both rounds.
        report = json.loads((tmp_path / "server-run" / "server.json").read_text())
        assert [r["round"] for r in report["rounds"]] == [1, 2]
        for r in report["rounds"]:
            assert (r["sampled"], r["contributors"], r["failed"], r["refused"], r["rejected"]) == (2, 2, 0, {}, 0), r
            assert len(r["bytes_train_reply"]) == 2 and min(r["bytes_train_reply"]) > 0
        assert report["contributions"] == 4

        # The node whose key was never registered is refused by the SuperLink and never trains.
        assert stray.wait_for("Exit Code", deadline.left(30))
        stray_log = stray.output()
        refusal = next(line for line in stray_log.splitlines() if "[code: 20" in line)
        assert "[code: 2004] Failed to activate SuperNode" in refusal or "[code: 2001]" in refusal
        assert "No SuperNode found with the given public key" in serve.output()
        assert "train message" not in stray_log and not stray.alive()
        # The node without the CA certificate never gets past the TLS handshake.
        assert no_ca.wait_for("Exit Code", deadline.left(30))
        no_ca_log = no_ca.output()
        assert "CERTIFICATE_VERIFY_FAILED" in no_ca_log and "train message" not in no_ca_log and not no_ca.alive()
        listed = subprocess.run([flower.flower_bin("flwr"), "supernode", "list", "loopback", "--format", "json"], env=env,
                                capture_output=True, text=True, timeout=deadline.left(60))
        statuses = sorted(n["status"] for n in json.loads(listed.stdout[listed.stdout.index("{"):])["nodes"])
        assert statuses == ["online", "online", "registered"]  # node-2 registered but never came online

        # The wire, outside Flower: what each SuperNode sent, decrypted by the proxy, holds none of its planted values.
        lines = []
        for i, (tap, user) in enumerate(zip(taps, users)):
            plaintexts = tap.plaintext()
            joined = b"".join(plaintexts)
            assert b"POST /v1/fleet/push-object" in joined and b"POST /v1/fleet/push-messages" in joined  # the replies went this way
            scan = _scan(plaintexts, planted[user["user_id"]])
            assert scan["hits"] == 0, f"device {i}: {scan['hits']} planted values on the wire"
            lines.append(f"device {i} ({user['user_id']}): {tap.tcp_bytes():,} TCP bytes sent ({len(joined):,} plaintext, "
                         f"{joined.count(b'POST /v1/fleet/')} requests on {len(plaintexts)} connections, {len(tap.errors)} relay errors); "
                         f"{len(planted[user['user_id']])} planted values ({scan['patterns']} patterns: UTF-8, UTF-16 LE/BE, token ids int32/int64); "
                         f"hits {scan['hits']}")
    finally:
        for child in reversed(children):
            child.stop(grace=10)
        for tap in taps:
            tap.close()
    wall = time.monotonic() - started
    print(f"\nDEPLOYMENT loopback wall {wall:.1f} s (SuperLink ready + 3 keys registered {ready_s:.1f} s; 2-round job {job_s:.1f} s)")
    print(f"DEPLOYMENT unregistered node: {refusal.strip()}")
    print(f"DEPLOYMENT node without the CA: {next(l for l in no_ca_log.splitlines() if 'CERTIFICATE_VERIFY_FAILED' in l).strip()}")
    for line in lines:
        print(f"WIRE-TCP {line}")
    assert all(not c.alive() for c in children)


@pytest.mark.slow
def test_plain_flwr_run_on_flowers_local_simulation(tmp_path):
    """The README's `flwr run .`: Flower's local simulation sized once, then a run with no connection and no node count.

    Run in a copy of the app, so the run config's relative defaults (``data-dir =
    data/default``, ``run-dir = runs/flwr-run``) resolve as they do for a user.
    """
    import shutil

    from simulations.personas import DatasetSpec, generate_dataset

    app = tmp_path / "app"
    for part in ("client", "common", "server"):
        shutil.copytree(ROOT / part, app / part, ignore=shutil.ignore_patterns("__pycache__"))
    for part in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / part, app / part)
    # `fedpersona generate data/default`, smaller
    generate_dataset(app / "data" / "default", DatasetSpec(num_users=3, num_personas=3, seed=1, train_tasks=6, test_tasks=2, documents=3,
                                                           interactions=3, preferences=2, cold_start_share=0.0, occasional_share=0.0))
    home = tmp_path / "flwr"
    env = flower.flower_env({"FLWR_HOME": str(home), "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
                             "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                             "FEDPERSONA_CACHE": str(tmp_path / "cache")})
    # Only the model's size: the node count comes from the federation (3 here, 20 in the README).
    run_config = {"num-supernodes": 3, "persona-slots": 2, "persona-min-size": 1, "model": "tiny-random", "num-server-rounds": 1,
                  "local-steps": 1, "batch-size": 4, "max-len": 32}
    started = time.monotonic()
    try:
        sized = subprocess.run(flower.simulation_size_command(3), cwd=app, env=env, capture_output=True, text=True, timeout=120,
                               stdin=subprocess.DEVNULL)
        assert sized.returncode == 0, sized.stdout + sized.stderr
        job = subprocess.run(flower.run_command(Path("."), None, run_config), cwd=app, env=env,
                             capture_output=True, text=True, timeout=400, stdin=subprocess.DEVNULL)
    finally:
        # flwr starts its local SuperLink detached and leaves it running: stop it (and its helpers) by PID.
        for pid in _pids_with_argument(str(home)):
            stop_pid(pid)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "(3 simulated SuperNodes)" in job.stdout + job.stderr
    report = json.loads((app / "runs" / "flwr-run" / "server.json").read_text())
    # A simulated node without a policy file takes the n-th user file of data-dir and keeps the
    # shipping floor (full scrubbing, DP, secure aggregation on by default): all three took part.
    assert (report["rounds"][0]["contributors"], report["rounds"][0]["refused"]) == (3, {})
    print(f"\nFLWR-RUN local simulation sized to 3 nodes, 1 round, secure aggregation on: {time.monotonic() - started:.1f} s")


def _pids_with_argument(value: str) -> list[int]:
    """PIDs of processes whose command line holds ``value`` (a path only this test made)."""
    out = []
    for proc in Path("/proc").glob("[0-9]*"):
        if int(proc.name) == os.getpid():
            continue
        try:
            if value in proc.joinpath("cmdline").read_bytes().decode(errors="replace"):
                out.append(int(proc.name))
        except OSError:
            continue
    return out
