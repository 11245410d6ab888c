"""What the audits may look at in a finished simulation run, and the model views they attack.

A simulation holds every device on one machine, so the audit harness can play
both the attacker and the ground truth:

* the **server's view**: the final shared tiers (``shared-tiers.safetensors``:
  global + persona slots), what an honest-but-curious server holds;
* each **device's view**: its store (scrubbed data, private user tier, the
  persona slot it chose), what a personalised model on the device holds;
* the generator's **ground truth**: ``manifest.json`` (personas, canaries,
  hold-out users) and ``pii_sidecar.jsonl`` (planted PII).

Model stacks (active adapters): ``base`` (no adapters), ``global``,
``persona`` (global + the device's chosen slot), ``personal`` (global +
persona + user tier and soft prompt).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch

STACKS = {"base": (), "global": ("global",), "persona": ("global", "persona"), "personal": ("global", "persona", "user")}


class RunView:
    def __init__(self, run_dir: Path):
        from common.models import AdapterSpec, personal_model

        self.run_dir = Path(run_dir)
        self.report = json.loads((self.run_dir / "report.json").read_text())
        self.config = self.report["config"]
        self.data_dir = Path(self.config["data-dir"])
        self.manifest = json.loads((self.data_dir / "manifest.json").read_text())
        sidecar = self.data_dir / "pii_sidecar.jsonl"
        self.sidecar = [json.loads(line) for line in sidecar.read_text().splitlines() if line.strip()]
        self.model = personal_model(AdapterSpec.from_run_config(self.config))
        self.tokenizer = self.model.tokenizer
        self.max_len = int(self.config.get("max-len", 56))
        self.num_slots = int(self.config.get("persona-slots", 0))
        self._shared = self._load_shared()
        self._raw: dict[str, list[dict]] = {}

    # -- who is who ---------------------------------------------------------------
    @property
    def participants(self) -> list[dict]:
        return [u for u in self.manifest["users"] if not u.get("holdout")]

    @property
    def holdouts(self) -> list[dict]:
        return [u for u in self.manifest["users"] if u.get("holdout")]

    def store_path(self, user: dict) -> Path:
        # Hold-out users get stores outside the federation's store folder, so
        # nothing that enumerates the devices of the run ever sees them.
        folder = self.run_dir / "holdout-devices" if user.get("holdout") else Path(self.config["store-dir"])
        return folder / f"{Path(user['file']).stem}.sqlite"

    def raw_records(self, user: dict) -> list[dict]:
        """The user's raw JSONL (ground truth; only the harness reads it, never a model).

        Read once per user: every audit walks the same records.
        """
        if user["file"] not in self._raw:
            path = self.data_dir / user["file"]
            self._raw[user["file"]] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return self._raw[user["file"]]

    # -- model states ---------------------------------------------------------------
    def _load_shared(self) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        path = self.run_dir / "shared-tiers.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"{path} missing: the run predates saved shared tiers; re-run the simulation")
        return load_file(str(path))

    @contextmanager
    def device(self, user: dict):
        """Load ``user``'s full state (shared tiers, chosen slot, user tier) into the model.

        A hold-out user never trained: it gets the initial user tier and, like
        any device, the slot IFCA picks on its own data (the server's view of a
        non-member). Yields the device store.
        """
        from client import device
        from client.persona import CHOICE_STATE, load_slot, pick_and_load, split_slots
        from client.store import DeviceStore
        from client.train import encode_pairs

        model = self.model
        store_path = self.store_path(user)
        if user.get("holdout") and not store_path.is_file():
            store = device.open_store({**self.config}, {"user-file": str(self.data_dir / user["file"]), "store-path": str(store_path)})
        else:
            store = DeviceStore(store_path)
        direct, slots = split_slots(self._shared)
        model.load_trainable(direct)
        device.swap_in_user(model, store)
        if slots:
            choice = json.loads(store.get_state(CHOICE_STATE) or b"{}").get("evaluate", {})
            if choice:
                load_slot(model, slots[int(choice[max(choice, key=int)])])
            else:
                data = encode_pairs(self.tokenizer, store.tasks("train"), self.max_len)
                pick_and_load(model, slots, data, self.config, store, 0, "audit")
        try:
            yield store
        finally:
            model.reset_to_initial()
            model.use(*model.tiers)

    # -- measurements -------------------------------------------------------------
    def _adapters(self, stack: str) -> tuple[str, ...]:
        """The adapters of a stack in this run (a run without the persona tier has no persona adapter)."""
        return STACKS[stack] if self.num_slots else tuple(a for a in STACKS[stack] if a != "persona")

    @torch.no_grad()
    def record_nll(self, pairs: list[tuple[str, str]], stack: str, batch_size: int = 32) -> list[float]:
        """Mean NLL per target token of each (input, output) pair under a model stack."""
        from client.train import encode_pairs, per_sample_nll, trim_batch

        if not pairs:
            return []
        model = self.model
        adapters = self._adapters(stack)
        model.use(*adapters)
        model.eval()
        data = encode_pairs(self.tokenizer, pairs, self.max_len)
        out = []
        for i in range(0, len(data), batch_size):
            ids, att, lab = trim_batch(*data[i : i + batch_size])
            s, c = per_sample_nll(model(ids, att), lab)
            out += (s / c.clamp(min=1)).tolist()
        model.use(*model.tiers)
        return out

    @torch.no_grad()
    def generate(self, prompt: str, stack: str, max_new_tokens: int = 24) -> str:
        """Greedy continuation of ``prompt`` (the task format: ``input\\n``) under a stack.

        Runs the peft model directly with a KV cache: the soft prompt (when the
        stack includes the user tier) is prepended once, then one token per step.
        """
        from contextlib import nullcontext

        model = self.model
        adapters = self._adapters(stack)
        model.use(*adapters)
        model.eval()
        ids = self.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        embed = model.peft.get_input_embeddings()
        embeds = embed(ids)
        if model._prompt:
            n = model.spec.prompt_tokens
            embeds = torch.cat([model.user_embedding(torch.arange(n)).unsqueeze(0), embeds], dim=1)
        eos = self.tokenizer.eos_token_id
        new, past = [], None
        with model.peft.disable_adapter() if not adapters else nullcontext():
            for _ in range(max_new_tokens):
                length = embeds.shape[1] if past is None else past.get_seq_length() + 1
                out = model.peft(
                    inputs_embeds=embeds,
                    attention_mask=torch.ones(1, length, dtype=torch.long),
                    position_ids=torch.arange(length - embeds.shape[1], length).unsqueeze(0),
                    past_key_values=past,
                    use_cache=True,
                )
                nxt = int(out.logits[0, -1].argmax())
                if nxt == eos:
                    break
                new.append(nxt)
                past = out.past_key_values
                embeds = embed(torch.tensor([[nxt]]))
        model.use(*model.tiers)
        return self.tokenizer.decode(new, skip_special_tokens=True)
