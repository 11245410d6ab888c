"""``fedpersona``: the single command-line entry point (typer + rich)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Privacy-preserving federated personalization.")
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
) -> None:
    """Run a federated simulation on the embedded persona dataset and write a report."""
    from simulations.run import prepare, simulate as run_sim

    cfg = prepare("full" if full else profile, _parse_overrides(set_), run_dir)
    console.print(
        f"[bold]fedpersona[/] {cfg['num-supernodes']} users, {cfg['num-server-rounds']} rounds, "
        f"model {cfg['model']}, DP {'on' if cfg['dp'] else 'off'} -> {cfg['run-dir']}"
    )
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(), console=console) as progress:
        task = progress.add_task("federated rounds", total=int(cfg["num-server-rounds"]))

        def on_round(rnd: int, total: int, metrics: dict) -> None:
            progress.update(task, completed=rnd, description=f"round {rnd}/{total} loss {metrics.get('train-loss', float('nan')):.3f}")

        report = run_sim(cfg, on_round=on_round)
    table = Table(title="Held-out utility (NLL per target token, lower is better)")
    table.add_column("model")
    table.add_column("NLL", justify="right")
    table.add_column("ppl", justify="right")
    for name in ("base", "global", "personal"):
        u = report["utility"][name]
        table.add_row(name, f"{u['nll']:.4f}", f"{u['ppl']:.2f}")
    console.print(table)
    eps = report["epsilon_record_level"]
    console.print(f"record-level epsilon: max {eps['max']} (delta {eps['delta']}); report: {cfg['run-dir']}/report.md")


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


@app.command("pii-eval")
def pii_eval(
    file: Path = typer.Argument(..., help="Presidio-evaluator JSON: full_text + spans."),
    mode: str = typer.Option("full", help="full (NER + patterns) or patterns."),
    limit: int = typer.Option(0, help="Evaluate only the first N records (0 = all)."),
) -> None:
    """Precision, recall and F2 of the scrubber per entity type on a labelled span file."""
    from client import pii_eval as pe

    result = pe.evaluate_file(file, mode=mode, limit=limit or None)
    console.print(pe.render_markdown(result))


def main() -> None:  # console-script entry point
    app()


if __name__ == "__main__":
    main()
