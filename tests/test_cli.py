"""The ``fedpersona`` command line (simulations/cli.py).

Span files are written by the tests themselves; nothing reads ../shared.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from simulations.cli import app

RECORDS = [
    {"full_text": "Write to jane.roe@example.org today.",
     "spans": [{"entity_type": "EMAIL_ADDRESS", "start_position": 9, "end_position": 29,
                "entity_value": "jane.roe@example.org"}]},
    {"full_text": "My SSN is 536-22-8726 for the form.",
     "spans": [{"entity_type": "US_SSN", "start_position": 10, "end_position": 21,
                "entity_value": "536-22-8726"}]},
]


def _span_file(tmp_path: Path) -> Path:
    path = tmp_path / "spans.json"
    path.write_text(json.dumps(RECORDS), encoding="utf-8")
    return path


def test_pii_eval_command_runs_with_mode_and_limit(tmp_path):
    spans = _span_file(tmp_path)
    result = CliRunner().invoke(app, ["pii-eval", str(spans), "--mode", "patterns"])
    assert result.exit_code == 0, result.output
    assert "| EMAIL_ADDRESS | 1 | 1 | 1.000 | 1.000 | 1.000 |" in result.output
    assert "Records: 2." in result.output
    limited = CliRunner().invoke(app, ["pii-eval", str(spans), "--mode", "patterns",
                                       "--limit", "1"])
    assert limited.exit_code == 0, limited.output
    assert "Records: 1." in limited.output and "US_SSN" not in limited.output


def test_pii_eval_command_rejects_an_unknown_mode(tmp_path):
    result = CliRunner().invoke(app, ["pii-eval", str(_span_file(tmp_path)), "--mode", "fast"])
    assert result.exit_code == 2
    assert "full" in result.output and "patterns" in result.output


def test_pii_eval_command_reports_a_malformed_file_without_a_traceback(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"full_text": "Ann Lee", "spans": "none"}]), encoding="utf-8")
    result = CliRunner().invoke(app, ["pii-eval", str(bad), "--mode", "patterns"])
    assert result.exit_code == 1
    assert f"{bad}: record 0: missing or non-list 'spans'" in result.output
    assert "Ann Lee" not in result.output


# A crash while a span file is being scrubbed: the scrubber raises while the
# frames above it (the predict adapter, evaluate_file) hold the file's text
# in local variables. typer's pretty exception handler is sys.excepthook, so
# it only runs in a real process, not under CliRunner.
_CRASH_SCRIPT = """
import sys
from client.pii import Scrubber

class CrashingScrubber:
    def analyze_batch(self, texts):
        raise RuntimeError("analyzer crashed")

Scrubber.from_config = classmethod(lambda cls, *args, **kwargs: CrashingScrubber())
from simulations.cli import app
app(["pii-eval", sys.argv[1], "--mode", "patterns"], prog_name="fedpersona")
"""


def test_crash_traceback_does_not_print_local_variables(tmp_path):
    planted = "Vandermeulenhoek"  # one word, so a wrapped line cannot split it
    spans = tmp_path / "spans.json"
    spans.write_text(json.dumps([{"full_text": f"Write to Anneke {planted} today.",
                                  "spans": []}]), encoding="utf-8")
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items()
           if k not in ("TYPER_STANDARD_TRACEBACK", "_TYPER_STANDARD_TRACEBACK")}
    env.update(PYTHONPATH=str(root), COLUMNS="200", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", _CRASH_SCRIPT, str(spans)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1
    # typer's rich traceback ran (it names the frames) ...
    assert "RuntimeError: analyzer crashed" in output and "evaluate_file" in output, output
    # ... and showed no local variables, so not the text being scrubbed.
    assert planted not in output, output


def test_ingest_command_shows_progress_then_is_up_to_date_and_reports_bad_lines(tmp_path):
    user = tmp_path / "me.jsonl"
    user.write_text(json.dumps({"type": "document", "id": "d1", "text": "Write to jane.roe@example.org today."}) + "\n"
                    + json.dumps({"type": "document", "id": "d2", "text": "x" * 20_001}) + "\n", encoding="utf-8")
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"user-file": "me.jsonl", "store-path": "me.sqlite", "min-scrub-mode": "patterns"}))
    args = ["ingest", "--policy-file", str(policy), "--scrub-mode", "patterns"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "ingested new lines: 1 records, 1 quarantined, scrub-mode=patterns" in first.output
    assert "quarantined: line 2: too_long:text" in first.output and "jane.roe" not in first.output
    second = CliRunner().invoke(app, args)
    assert second.exit_code == 0 and "up to date: 1 records" in second.output
    with user.open("a", encoding="utf-8") as f:
        f.write('{"type":"document","id":"d3","text":"Jane Roe"}\n{"type":"note"}\n')
    bad = CliRunner().invoke(app, args)
    assert bad.exit_code == 1 and f"{user}:4: bad_type_field" in bad.output and "Jane" not in bad.output
    assert CliRunner().invoke(app, args[:-1] + ["off"]).exit_code == 2
