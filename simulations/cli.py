"""``fedpersona``: the single command-line entry point (typer + rich)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

# typer's pretty tracebacks print every frame's local variables by default; a
# crash during ingestion, scrubbing or training would then print user text.
app = typer.Typer(add_completion=False, no_args_is_help=True, help="Privacy-preserving federated personalization.", pretty_exceptions_show_locals=False)
console = Console()


def _parse_overrides(items: list[str]) -> dict:
    """``key=value`` pairs; values are parsed as JSON where possible (numbers, booleans)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise typer.BadParameter(f"expected key=value, got {item!r}")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


@app.command()
def simulate(
    profile: str = typer.Option("default", help="quick | default | full: trades size for time."),
    set_: list[str] = typer.Option([], "--set", help="Override a config key, e.g. --set num-server-rounds=5"),
    run_dir: Path = typer.Option(None, help="Output folder (default runs/<timestamp>)."),
    full: bool = typer.Option(False, "--full", help="Shortcut for --profile full."),
    audit: str = typer.Option("fast", help="Audits at the end: none | fast (ledger, wire, canary exposure, one-run DP audit, disparity) | full (+ membership signal, generation audits)."),
    data: Path = typer.Option(None, help="A folder of per-user JSONL files (users/*.jsonl or *.jsonl), one device per file, instead of the embedded dataset."),
    resume: Path = typer.Option(None, help="Continue a run that stopped (its folder): the server resumes after its last checkpointed round."),
) -> None:
    """Run a federated simulation on the embedded persona dataset (or your own per-user data) and write a report."""
    from common.config import ConfigError
    from simulations.run import DataFolderError, prepare, simulate as run_sim

    if audit not in ("none", "fast", "full"):
        raise typer.BadParameter("--audit must be none, fast or full")
    try:
        if resume is not None:
            from simulations.run import read_harness

            harness = read_harness(resume)
        else:
            harness = prepare("full" if full else profile, _parse_overrides(set_), run_dir, data=data)
    except ConfigError as err:
        console.print(f"[bold red]configuration error[/] {err}")
        raise typer.Exit(code=2) from None
    except DataFolderError as err:
        console.print(f"[bold red]data error[/] {err}")
        raise typer.Exit(code=2) from None
    cfg = harness["run"]
    console.print(
        f"[bold]fedpersona[/] {cfg['num-supernodes']} users, {cfg['num-server-rounds']} rounds, "
        f"model {cfg['model']}, DP {'on' if cfg['dp'] else 'off'} -> {cfg['run-dir']}"
    )
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(), console=console) as progress:
        task = progress.add_task("federated rounds", total=int(cfg["num-server-rounds"]))

        def on_round(rnd: int, total: int, row: dict) -> None:
            refused = sum(row["refused"].values())
            progress.update(task, completed=rnd, total=total, description=f"round {rnd}/{total}: {row['contributors']} of {row['sampled']} contributed, {refused} refused, {row['failed']} failed")

        report = run_sim(harness, on_round=on_round, record_wire=audit != "none")
    _print_results(report)
    if report["server"]["contributions"] == 0:
        console.print("[bold red]RUN FAILED[/] no device contributed an update in any round; see the refusal and failure counts in report.md")
        raise typer.Exit(code=1)
    if audit != "none":
        _audit(Path(cfg["run-dir"]), level=audit)


def _print_results(report: dict) -> None:
    table = Table(title="Held-out utility (NLL per target token, lower is better)")
    table.add_column("model")
    table.add_column("NLL", justify="right")
    table.add_column("ppl", justify="right")
    for name, label in (("base", "base"), ("global", "global"), ("persona", "global + persona"), ("personal", "global + persona + user"), ("served", "served (by routing group)")):
        u = report["utility"][name]
        table.add_row(label, f"{u['nll']:.4f}", f"{u['ppl']:.2f}")
    console.print(table)
    groups = Table(title="Per routing group (NLL of the stack each group is served)")
    for col in ("group", "users", "served NLL", "global NLL"):
        groups.add_column(col)
    for name, g in report["utility"]["routing_groups"].items():
        groups.add_row(name, str(g["users"]), f"{g['served']:.4f}", f"{g['global']:.4f}")
    console.print(groups)
    u = report["utility"]
    for r in report["server"]["rounds"]:
        if r["refused"] or r["failed"] or r["rejected"]:
            console.print(f"[yellow]round {r['round']}[/]: refused {r['refused'] or 0}, failed {r['failed']}, rejected {r['rejected']}")
    eps = report["epsilon_record_level"]
    console.print(
        f"{u['users']} of {u['users_total']} devices evaluated; record-level epsilon: max {eps['max']} (delta {eps['delta']}); "
        f"report: {report['config']['run-dir']}/report.md"
    )


def _audit(run_dir: Path, level: str = "full", baseline: Path | None = None, compare: list[Path] = ()) -> None:
    from rich.markup import escape

    from simulations.audits import AuditFailure, run_audits

    console.print(f"[bold]audits[/] running ({level}) ...")
    failure = None
    try:
        result = run_audits(run_dir, level=level, baseline=baseline, compare=compare)
    except AuditFailure as err:
        failure, result = err, err.result
    table = Table(title="audits")
    for col in ("audit", "status", "detail"):
        table.add_column(col)
    style = {"FAILED": "bold red", "passed": "green", "skipped": "yellow"}
    for name, verdict in result["verdicts"].items():
        status = verdict["status"]
        table.add_row(name, f"[{style[status]}]{status}[/]" if status in style else status, escape(verdict["detail"]))
    console.print(table)
    console.print(f"report: {run_dir / 'report.html'}")
    if failure is not None:
        console.print(f"[bold red]AUDIT FAILED[/] {escape(str(failure))}")
        raise typer.Exit(code=1) from None


@app.command()
def audit(
    run_dir: Path = typer.Argument(..., help="A finished run directory (runs/<id>)."),
    level: str = typer.Option("full", help="fast | full (see fedpersona simulate --audit)."),
    baseline: Path = typer.Option(None, help="A non-private run of the same data, for DP disparate impact (skipped without one)."),
    compare: list[Path] = typer.Option([], help="Other audited runs for the privacy-utility chart."),
) -> None:
    """Privacy and bias audits of a finished run; writes audit.json and report.html."""
    _audit(run_dir, level=level, baseline=baseline, compare=compare)


@app.command()
def generate(
    out_dir: Path = typer.Argument(..., help="Folder for users/*.jsonl, manifest.json and the PII sidecar."),
    users: int = 24,
    personas: int = 4,
    seed: int = 0,
) -> None:
    """Write the embedded persona dataset (deterministic, no downloads)."""
    from simulations.personas import DatasetSpec, generate_dataset

    manifest = generate_dataset(out_dir, DatasetSpec(num_users=users, num_personas=personas, seed=seed))
    console.print(f"wrote {len(manifest['users'])} users to {out_dir}")


@app.command("import-annotators")
def import_annotators(
    out_dir: Path = typer.Argument(..., help="Folder for users/*.jsonl and manifest.json (then: fedpersona simulate --data OUT_DIR)."),
    wide: Path = typer.Option(None, help="One CSV with one column per annotator (e.g. id,text,label_M_1,...)."),
    pattern: str = typer.Option(None, help="Regex for annotator columns of --wide; named groups: 'annotator' plus attributes (default: label_<gender>_<annotator>)."),
    texts: Path = typer.Option(None, help="Long layout: a texts CSV (id,text)."),
    labels: Path = typer.Option(None, help="Long layout: a labels CSV (text_id,annotator,label)."),
    annotators: Path = typer.Option(None, help="Long layout, optional: an annotators CSV (annotator plus attribute columns)."),
    test_share: float = typer.Option(0.2, help="Share of each annotator's labels held out for evaluation."),
    seed: int = typer.Option(0, help="Seed of each annotator's train/test split."),
    instruction: str = typer.Option("Label the text.", help="The task instruction put before the options and the text."),
) -> None:
    """Turn per-annotator label data into one user per annotator (tasks that name their label options)."""
    from simulations.annotators import WIDE_PATTERN, AnnotatorDataError, read_long, read_wide, write_users

    try:
        if wide is not None:
            data = read_wide(wide, pattern=pattern or WIDE_PATTERN)
        elif texts is not None and labels is not None:
            data = read_long(texts, labels, annotators)
        else:
            raise typer.BadParameter("give --wide FILE, or --texts FILE --labels FILE")
        manifest = write_users(data, out_dir, test_share=test_share, seed=seed, instruction=instruction)
    except AnnotatorDataError as err:
        console.print(f"[bold red]data error[/] {err}")
        raise typer.Exit(code=2) from None
    console.print(f"wrote {len(manifest['users'])} annotators ({', '.join(manifest['options'])}) to {out_dir}")


@app.command("import-chats")
def import_chats(
    out_dir: Path = typer.Argument(..., help="Folder for users/*.jsonl and manifest.json (then: fedpersona simulate --data OUT_DIR)."),
    conversations: Path = typer.Argument(..., help="A JSON file of conversations, chitchat's layout (chitchat_dataset/dataset.json)."),
    min_turns: int = typer.Option(10, help="A participant with fewer turns is left out."),
    max_turns: int = typer.Option(100, help="At most this many of a participant's turns are kept (the first ones)."),
    users: int = typer.Option(0, help="A seeded sample of this many eligible participants (0 = all of them)."),
    test_share: float = typer.Option(0.2, help="Share of each participant's turns held out for evaluation."),
    seed: int = typer.Option(0, help="Seed of the sample and of each participant's train/test split."),
) -> None:
    """Turn chat conversations into one user per participant (reply tasks: the other side's turn, then theirs)."""
    from simulations.chats import ChatDataError, read_turns, write_users

    try:
        manifest = write_users(read_turns(conversations), out_dir, min_turns=min_turns, max_turns=max_turns, users=users,
                               test_share=test_share, seed=seed, source=conversations.name)
    except ChatDataError as err:
        console.print(f"data error: {err}", style="bold red", markup=False)
        raise typer.Exit(code=2) from None
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    turns = sum(u["turns"] for u in manifest["users"])
    console.print(f"wrote {len(manifest['users'])} participants ({turns} turns) to {out_dir}", markup=False)


@app.command()
def ingest(
    policy_file: Path = typer.Option(None, help="The device's policy file: its user-file, store-path, key-file and scrubber."),
    user_file: Path = typer.Option(None, help="The user's JSONL file (instead of the policy's)."),
    store: Path = typer.Option(None, help="The device store (default: the policy's, else next to the user file)."),
    scrub_mode: str = typer.Option("", help="full | patterns; at least the policy's min-scrub-mode (the default)."),
) -> None:
    """Validate, scrub and store what is new in a user's file, with progress (a device does the same on its next message)."""
    from rich.progress import DownloadColumn

    from client import device
    from client.policy import SCRUB_RANK, DevicePolicy, PolicyError
    from client.store import IngestError, StoreError
    from common.config import ConfigError, build_config

    node = {key: str(value) for key, value in (("policy-file", policy_file), ("user-file", user_file), ("store-path", store)) if value}
    try:
        policy = DevicePolicy.for_node(node)
        mode = scrub_mode or policy.min_scrub_mode
        if mode not in ("full", "patterns") or SCRUB_RANK[mode] < SCRUB_RANK[policy.min_scrub_mode]:
            raise typer.BadParameter(f"must be full or patterns, and at least the policy's {policy.min_scrub_mode}", param_hint="--scrub-mode")
        cfg = build_config("default", {"scrub-mode": mode, "scrub-operator": policy.scrub_operator, "scrub-config": policy.scrub_config})
        phases = {"validate": "validating", "ingest": "scrubbing, encrypting, storing"}
        with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeElapsedColumn(), console=console) as bar:
            task = bar.add_task("checking for new lines", total=None)
            moved = []

            def on_progress(phase: str, done: int, total: int) -> None:
                moved.append(phase)
                bar.update(task, description=phases[phase], completed=done, total=total)

            opened = device.open_store(cfg, policy, {}, progress=on_progress)
    except (IngestError, StoreError, PolicyError, ConfigError, device.DeviceDataMissing) as err:
        # Our errors name files, lines and reason codes, never user text; no markup, so brackets in paths stay.
        console.print(f"error: {err}", style="red", markup=False, soft_wrap=True)
        raise typer.Exit(code=1) from None
    quarantined = opened.quarantined()
    console.print(f"{'ingested new lines' if moved else 'up to date'}: {opened.num_records()} records, "
                  f"{len(quarantined)} quarantined, scrub-mode={mode}; store {opened.path} (key {opened.key_file})",
                  markup=False, soft_wrap=True)
    for where, reason in quarantined:
        console.print(f"  quarantined: {where}: {reason}", markup=False)


def _served_model(store: Path | None, policy_file: Path | None):
    """Open a device store as the device does (its key file, no ingestion, nothing written) and load the model it serves.

    Returns (store, model, stack, policy or None). Every failure to find or open
    them is printed (paths and reason codes only) and exits with code 2.
    """
    from client import device
    from client.policy import DevicePolicy, PolicyError
    from client.served import NoServedModel, load_served
    from client.store import StoreError
    from common.models import ModelNotAvailable

    node = {key: str(value) for key, value in (("policy-file", policy_file), ("store-path", store)) if value}
    try:
        if not node:
            raise typer.BadParameter("give --store STORE (or --policy-file FILE naming its store-path)", param_hint="--store")
        policy = DevicePolicy.for_node(node)
        opened = device.read_store(policy)
        model, stack = load_served(opened)
    except (StoreError, PolicyError, NoServedModel, ModelNotAvailable, device.DeviceDataMissing) as err:
        console.print(f"error: {err}", style="red", markup=False, soft_wrap=True)
        raise typer.Exit(code=2) from None
    return opened, model, stack, policy if policy_file else None


def _stack_name(stack) -> str:
    return " + ".join(stack.adapters) + (" + soft prompt" if stack.prompt else "")


@app.command("export")
def export_cmd(
    out: Path = typer.Argument(..., help="A new (or empty) folder for the peft adapters."),
    store: Path = typer.Option(None, help="The device store (its key file: the policy's key-file, else STORE with the suffix .key)."),
    policy_file: Path = typer.Option(None, help="The device's policy file (its store-path and key-file)."),
) -> None:
    """Write the model this device serves: the merged LoRA tiers in OUT as a peft adapter, the soft prompt in OUT/prompt
    (or, entering at a later layer, OUT/deep_prompt.safetensors).

    Load with PeftModel.from_pretrained(base, OUT); if OUT/prompt exists, then
    PeftModel.from_pretrained(model.merge_and_unload(), OUT/prompt). A deep
    prompt only fedpersona's client.export.load_exported(OUT) applies (it loads
    every export exactly). OUT holds your private tier unencrypted (owner-only
    files): keep it on the device.
    """
    from client.export import ExportError, export_served

    _, model, stack, _ = _served_model(store, policy_file)
    try:
        meta = export_served(model, stack, out)
    except (ExportError, OSError) as err:
        console.print(f"error: {err}", style="red", markup=False, soft_wrap=True)
        raise typer.Exit(code=2) from None
    console.print(f"exported {_stack_name(stack)} ({meta['routing_group']} stack, round {meta['server_round']}) to {out}: "
                  f"one LoRA adapter of rank {meta['lora']['rank']} (exact merge)"
                  + (f", soft prompt in {out / 'prompt'}" if meta["soft_prompt"] else ""), markup=False, soft_wrap=True)


@app.command()
def ask(
    prompt: str = typer.Argument(..., help="Your prompt, or - to read it from standard input (keeps it out of shell history)."),
    store: Path = typer.Option(None, help="The device store (its key file: the policy's key-file, else STORE with the suffix .key)."),
    policy_file: Path = typer.Option(None, help="The device's policy file (its store-path, key-file and scrubber floor)."),
    max_new_tokens: int = typer.Option(64, min=1, max=2048, help="At most this many new tokens."),
    sample: bool = typer.Option(False, "--sample/--greedy", help="Sample (with the options below) instead of greedy decoding."),
    temperature: float = typer.Option(1.0, help="Sampling temperature (> 0)."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling: keep the smallest token set of this probability (0 < p <= 1)."),
    top_k: int = typer.Option(0, min=0, help="Sample among the k most likely tokens (0 = all)."),
    seed: int = typer.Option(None, help="Seed for sampling (default: OS entropy)."),
) -> None:
    """Generate on the device with the model it serves. The prompt is scrubbed with the device's scrubber first.

    Stores nothing: neither the prompt nor the answer is written to the store
    or to any log, and errors never repeat them. PROMPT - reads the prompt
    from standard input, which keeps it out of the shell's history.
    """
    import sys

    from client.ask import GenerationOptions, PromptRefused, ask as run_ask

    try:
        options = GenerationOptions(max_new_tokens=max_new_tokens, sample=sample, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    if prompt == "-":
        prompt = sys.stdin.read()
    opened, model, stack, policy = _served_model(store, policy_file)
    try:
        answer = run_ask(opened, model, stack, policy, prompt, options)
    except PromptRefused as err:
        console.print(f"error: {err}", style="red", markup=False)
        raise typer.Exit(code=1) from None
    except Exception as err:  # noqa: BLE001 - a third-party message may quote the prompt: its type only
        console.print(f"error: generation failed ({type(err).__name__})", style="red", markup=False)
        raise typer.Exit(code=1) from None
    console.print(f"[{_stack_name(stack)}; prompt scrubbed: {answer.scrubbed_entities} entities; {answer.new_tokens} new tokens]",
                  style="dim", markup=False, highlight=False, soft_wrap=True)
    console.print(answer.text, markup=False, highlight=False, soft_wrap=True)


@app.command("pii-eval")
def pii_eval(
    file: Path = typer.Argument(..., help="Presidio-evaluator JSON: full_text + spans."),
    mode: str = typer.Option("full", help="full (NER + patterns) or patterns."),
    limit: int = typer.Option(0, min=0, help="Evaluate only the first N records (0 = all)."),
) -> None:
    """Precision, recall and F2 of the scrubber per entity type on a labelled span file."""
    from client.pii import Scrubber
    from client.pii.scrubber import MODES
    from simulations import pii_eval as pe

    if mode not in MODES:
        raise typer.BadParameter(f"must be one of {', '.join(MODES)}", param_hint="--mode")
    # evaluate_file scores any predict function, so the scrubber for the mode is built here.
    predict = pe.scrubber_predictor(Scrubber.from_config(mode=mode))
    try:
        result = pe.evaluate_file(file, predict, limit=limit or None)
    except pe.EvalDataError as err:
        # The message names the file and record only; printed without markup
        # so brackets in a path are not read as rich styles.
        console.print(f"error: {err}", style="red", markup=False, soft_wrap=True)
        raise typer.Exit(code=1) from None
    console.print(pe.render_markdown(result))


@app.command()
def certs(
    out: Path = typer.Argument(..., help="Folder for ca.crt, server.pem/server.key and supernodes/node-N.key/.pub."),
    host: list[str] = typer.Option([], "--host", help="A host name or IP address the SuperNodes reach the SuperLink at (a SAN; repeatable). 127.0.0.1 and localhost are always in."),
    nodes: int = typer.Option(3, min=0, help="SuperNode key pairs to make (EC P-384, OpenSSH format)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing CA (every SuperNode must then get the new ca.crt)."),
) -> None:
    """Make a CA, the SuperLink's TLS certificate and key, and one authentication key pair per SuperNode."""
    from simulations.deploy.certs import make_certs

    try:
        paths = make_certs(out, host, nodes, force=force)
    except (FileExistsError, ValueError) as err:
        console.print(f"error: {err}", style="red", markup=False)
        raise typer.Exit(code=2) from None
    console.print(f"wrote {paths.ca}, {paths.server_cert} and {nodes} SuperNode key pair(s) under {paths.node_dir}; private keys are 0600", markup=False)


def _deploy_errors():
    """The deployment commands' own errors, printed without a traceback (exit code 2)."""
    from client.policy import PolicyError
    from simulations.deploy.flower import RegistrationError
    from simulations.deploy.serve import StartupError

    return (StartupError, RegistrationError, PolicyError, FileNotFoundError, ValueError)


@app.command()
def serve(
    certs_dir: Path = typer.Option(..., "--certs", help="The folder `fedpersona certs` wrote."),
    host: str = typer.Option("127.0.0.1", help="Address the SuperLink binds (0.0.0.0 for SuperNodes on other machines)."),
    port: int = typer.Option(8000, help="The SuperLink's HTTPS port (Fleet, Control and Runtime APIs share it)."),
    register: list[Path] = typer.Option([], "--register", help="A SuperNode public key to register (repeatable); default: every key in CERTS/supernodes/."),
    connection: str = typer.Option("fedpersona", help="Name of the SuperLink connection written to $FLWR_HOME/config.toml (for `flwr run . NAME`)."),
    database: Path = typer.Option(None, help="SuperLink state file (registered nodes, runs); default: in memory."),
    ready_timeout: float = typer.Option(60.0, help="Seconds to wait for the SuperLink to answer."),
    ready_file: Path = typer.Option(None, help="A file created once the keys are registered (a container health check)."),
) -> None:
    """Start flower-superlink with TLS and SuperNode authentication, and register the SuperNodes' public keys."""
    from simulations.deploy.serve import serve as run_serve

    try:
        code = run_serve(certs_dir, host, port, list(register), connection, database, ready_timeout, ready_file,
                         say=lambda line: console.print(line, markup=False, soft_wrap=True))
    except _deploy_errors() as err:
        console.print(f"error: {err}", style="red", markup=False, soft_wrap=True)
        raise typer.Exit(code=2) from None
    raise typer.Exit(code=code)


@app.command()
def edge(
    policy: Path = typer.Option(..., "--policy", help="The device owner's policy file (TOML or JSON; see the README's device policy)."),
    data: Path = typer.Option(None, "--data", help="The device's user JSONL; must be the policy's user-file (default: that file)."),
    certs_dir: Path = typer.Option(..., "--certs", help="A folder with ca.crt, the CA that signed the SuperLink's certificate."),
    key: Path = typer.Option(..., "--key", help="This SuperNode's private key (supernodes/node-N.key); its .pub must be registered."),
    superlink: str = typer.Option("127.0.0.1:8000", help="The SuperLink as host:port (a name or IP in its certificate)."),
    port: int = typer.Option(None, help="Local port of the SuperNode's ClientApp API (Flower's default 9094; one per SuperNode on a machine)."),
    store: Path = typer.Option(None, help="The device store, if the policy names no store-path (default: next to the data)."),
) -> None:
    """Start flower-supernode for one device: TLS, node authentication and the owner's policy file."""
    from simulations.deploy.edge import edge as run_edge

    try:
        code = run_edge(data, policy, certs_dir, key, superlink, port, store)
    except _deploy_errors() as err:
        console.print(f"error: {err}", style="red", markup=False, soft_wrap=True)
        raise typer.Exit(code=2) from None
    raise typer.Exit(code=code)


def main() -> None:  # console-script entry point
    app()


if __name__ == "__main__":
    main()
