"""The device uses what it learned: ``fedpersona export`` (standard peft adapters) and ``fedpersona ask``.

One tiny simulation (module fixture) leaves device stores holding the stack
each device serves; the fast tests build their model or store directly.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from simulations.cli import app

PLANTED = ("jane.doe@example.com", "212-555-0147")
PII_PROMPT = f"Remind me to write to {PLANTED[0]} or call {PLANTED[1]} tomorrow."


def _cli(*args: str, **kwargs):
    return CliRunner().invoke(app, [str(a) for a in args], **kwargs)


def _model_with_trained_tiers(adapter_layers: int = 0):
    """The process-wide tiny model with every tier moved off its initial values."""
    from helpers import spec

    from common.models import personal_model

    model = personal_model(spec(**{"adapter-layers": adapter_layers}))
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        model.reset_to_initial()
        for tensor in model.trainable_state().values():
            tensor.add_(0.3 * torch.randn(tensor.shape, generator=gen))
    return model


def _peft_logits(out: Path, input_ids: torch.Tensor, with_prompt: bool) -> torch.Tensor:
    """What a peft user gets: the documented load on a fresh base model."""
    from peft import PeftModel

    from common.models import load_base_model

    meta = json.loads((out / "fedpersona-export.json").read_text())
    base, _ = load_base_model(meta["base_model"])
    model = PeftModel.from_pretrained(base, out)
    n = 0
    if with_prompt:
        model = PeftModel.from_pretrained(model.merge_and_unload(), out / "prompt")
        n = meta["prompt_tokens"]
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits[:, n:]


# --------------------------------------------------------------------------- fast: no simulation


@pytest.mark.parametrize("stack", [("global",), ("global", "persona"), ("global", "persona", "user")])
def test_export_merges_the_tiers_exactly_into_one_lora(tmp_path, stack):
    from client.export import export_stack

    model = _model_with_trained_tiers()
    ids = torch.tensor([[5, 17, 42, 9, 88, 3, 120]])
    meta = export_stack(model, stack, tmp_path / "out")
    model.use(*stack, prompt=False)
    with torch.no_grad():
        lora_only = model(ids, torch.ones_like(ids))
    assert (_peft_logits(tmp_path / "out", ids, with_prompt=False) - lora_only).abs().max() < 1e-5
    assert meta["lora"]["rank"] == sum(model.peft.peft_config[t].r for t in stack) and meta["tiers"] == list(stack)
    assert meta["soft_prompt"] == ("user" in stack) == (tmp_path / "out" / "prompt").is_dir()
    model.use(*model.tiers)


@pytest.mark.parametrize("adapter_layers", [0, 1])
def test_load_exported_is_the_served_model_exactly_deep_prompt_included(tmp_path, adapter_layers):
    from client.export import DEEP_PROMPT, load_exported, export_stack

    model = _model_with_trained_tiers(adapter_layers)
    ids = torch.tensor([[5, 17, 42, 9, 88, 3, 120]])
    try:
        for stack in (("global", "persona"), ("global", "persona", "user")):
            out = tmp_path / "-".join(stack)
            meta = export_stack(model, stack, out)
            model.use(*stack)
            with torch.no_grad():
                served = model(ids, torch.ones_like(ids))
                greedy = model.decode(ids, 5, None) if adapter_layers else None
            loaded = load_exported(out)
            with torch.no_grad():
                assert (loaded(ids, torch.ones_like(ids)) - served).abs().max() < 1e-5
            deep = adapter_layers > 0 and "user" in stack
            assert (out / DEEP_PROMPT).is_file() == deep == bool(meta["deep_prompt"])
            assert (out / "prompt").is_dir() == ("user" in stack and not deep)
            if adapter_layers:
                assert loaded.decode(ids, 5, None) == greedy
            if "user" in stack and not deep:  # peft's own load agrees too
                assert (_peft_logits(out, ids, with_prompt=True) - served).abs().max() < 1e-5
            if deep:  # the LoRA folder alone is the stack without the user embedding, as the metadata says
                model.use(*stack, prompt=False)
                with torch.no_grad():
                    lora_only = model(ids, torch.ones_like(ids))
                assert (_peft_logits(out, ids, with_prompt=False) - lora_only).abs().max() < 1e-5
                assert "load_exported" in meta["load"] and "load_exported" in (out / "README.md").read_text()
    finally:
        model.use(*model.tiers)


def test_load_exported_names_a_folder_that_is_not_an_export(tmp_path):
    from client.export import ExportError, load_exported

    (tmp_path / "fedpersona-export.json").write_text("{not json")
    with pytest.raises(ExportError, match="not a readable fedpersona export"):
        load_exported(tmp_path)


@pytest.mark.parametrize("adapter_layers", [0, 1])
def test_greedy_ask_is_the_served_model_decoding(tmp_path, adapter_layers):
    from client.ask import GenerationOptions, generate

    model = _model_with_trained_tiers(adapter_layers)
    model.use(*model.tiers)
    answer, n = generate(model, "plan my week", GenerationOptions(max_new_tokens=6))
    seq = torch.tensor([model.tokenizer("plan my week\n", add_special_tokens=False)["input_ids"]])
    start = seq.shape[1]
    with torch.no_grad():
        for _ in range(6):
            seq = torch.cat([seq, model(seq, torch.ones_like(seq))[:, -1:].argmax(-1)], dim=1)
    assert n == 6 and answer == model.tokenizer.decode(seq[0, start:].tolist(), skip_special_tokens=True).strip()
    sampled = [generate(model, "plan my week", GenerationOptions(max_new_tokens=6, sample=True, seed=3, temperature=0.8))[0] for _ in range(2)]
    assert sampled[0] == sampled[1]  # a seed makes sampling reproducible


def test_commands_name_a_missing_or_wrong_store_or_key_without_a_traceback(tmp_path):
    from client.store import DeviceStore

    a, b = DeviceStore(tmp_path / "a.sqlite"), DeviceStore(tmp_path / "b.sqlite")
    missing = tmp_path / "none.sqlite"
    cases = {
        "no such device store": ["--store", missing],
        "not a fedpersona device store": ["--store", tmp_path / "junk.sqlite"],
        "no served model yet": ["--store", a.path],
        "does not belong to this store": ["--policy-file", tmp_path / "policy.json"],
    }
    (tmp_path / "junk.sqlite").write_text("not a database\n")
    (tmp_path / "policy.json").write_text(json.dumps({"store-path": str(a.path), "key-file": str(b.key_file)}))
    for message, args in cases.items():
        for command in (["export", tmp_path / "out"], ["ask", PII_PROMPT]):
            result = _cli(*command, *args)
            assert result.exit_code == 2, (message, result.output)
            assert message in result.output and "Traceback" not in result.output
            assert PLANTED[0] not in result.output and not (tmp_path / "out").exists()
    assert not missing.exists() and not missing.with_suffix(".key").exists()  # nothing created
    b.key_file.rename(tmp_path / "moved.key")
    result = _cli("export", tmp_path / "out", "--store", b.path)
    assert result.exit_code == 2 and f"its key file {b.key_file} is missing" in result.output.replace("\n", "")


# --------------------------------------------------------------------------- one tiny simulation


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from simulations.run import prepare, simulate

    root = tmp_path_factory.mktemp("export-run")
    harness = prepare("quick", {"num-supernodes": 3, "num-server-rounds": 1, "scrub-mode": "patterns"}, root / "run")
    simulate(harness)
    return harness


def _stacks(run) -> dict[str, tuple]:
    from client.device import read_store
    from client.policy import DevicePolicy
    from client.served import read_served

    out = {}
    for dev in run["devices"]:
        stack, _ = read_served(read_store(DevicePolicy.for_node({"policy-file": dev["policy"]})))
        out[dev["store"]] = stack
    return out


@pytest.mark.slow
def test_each_device_keeps_the_stack_its_routing_group_is_served(run):
    expected = {"frequent": ("global", "persona", "user"), "occasional": ("global", "persona"), "cold-start": ("global",)}
    stacks = _stacks(run)
    assert len(stacks) == 3 and "frequent" in {s.routing_group for s in stacks.values()}
    for stack in stacks.values():
        assert stack.adapters == expected[stack.routing_group] and stack.server_round == 1
        assert stack.spec.base_model == "tiny-random" and stack.scrub_mode == "patterns"


@pytest.mark.slow
def test_exported_adapters_give_the_served_models_logits_in_peft(run, tmp_path):
    from client.device import read_store
    from client.policy import DevicePolicy
    from client.served import load_served

    for i, (store, stack) in enumerate(sorted(_stacks(run).items())):
        out = tmp_path / f"export-{i}"
        result = _cli("export", out, "--store", store)
        assert result.exit_code == 0, result.output
        meta = json.loads((out / "fedpersona-export.json").read_text())
        assert meta["tiers"] == list(stack.adapters) and meta["soft_prompt"] == stack.prompt and not meta["contains_user_text"]
        assert (out / "adapter_config.json").is_file() and (out / "prompt").is_dir() == stack.prompt
        model, _ = load_served(read_store(DevicePolicy.for_node({"store-path": store})))
        ids = torch.tensor([model.tokenizer("what should I cook tonight?\n", add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            served = model(ids, torch.ones_like(ids))
        assert (_peft_logits(out, ids, with_prompt=stack.prompt) - served).abs().max() < 1e-5
        if stack.prompt:  # the LoRA folder alone is the served stack without its soft prompt
            model.use(*stack.adapters, prompt=False)
            with torch.no_grad():
                lora_only = model(ids, torch.ones_like(ids))
            assert (_peft_logits(out, ids, with_prompt=False) - lora_only).abs().max() < 1e-5
    again = _cli("export", out, "--store", store)
    assert again.exit_code == 2 and "not an empty folder" in again.output


def _store_snapshot(store: Path) -> dict:
    """Every row of every table (sealed blobs carry fresh nonces: any rewrite shows)."""
    with closing(sqlite3.connect(f"file:{store}?mode=ro", uri=True)) as conn:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {t: conn.execute(f"SELECT * FROM {t}").fetchall() for t in tables}


@pytest.mark.slow
def test_ask_answers_with_the_served_model_and_stores_nothing(run, caplog):
    dev = next(d for d in run["devices"] if _stacks(run)[d["store"]].prompt)
    store = Path(dev["store"])
    before = _store_snapshot(store)
    caplog.set_level(logging.DEBUG)
    result = _cli("ask", "--policy-file", dev["policy"], "--max-new-tokens", "8", PII_PROMPT)
    assert result.exit_code == 0, result.output
    head, _, answer = result.output.partition("]\n")
    assert "global + persona + user + soft prompt" in head and "prompt scrubbed: 2 entities" in head
    assert head.endswith(" new tokens") and not head.endswith("; 0 new tokens")  # it generated (the tiny model's text is gibberish, maybe blank)
    sampled = _cli("ask", "--store", store, "--sample", "--seed", "1", "--temperature", "0.7", "--top-k", "20", "-", input=PII_PROMPT)
    assert sampled.exit_code == 0 and "prompt scrubbed: 2 entities" in sampled.output, sampled.output  # the prompt from stdin
    refused = _cli("ask", "--store", store, PII_PROMPT * 400)  # over the scrubber's 20,000 characters
    assert refused.exit_code == 1 and "too_long" in refused.output
    # The prompt's PII is nowhere: not in the output, a log record, or anything on the device's disk.
    assert _store_snapshot(store) == before
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for value in PLANTED:
        assert value not in result.output + sampled.output + refused.output and value not in logged
        for path in store.parent.rglob("*"):
            assert not path.is_file() or value.encode() not in path.read_bytes(), path
